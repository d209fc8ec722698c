"""How long a checkpoint save stops training: ``--async_save false`` vs ``true`` (the default).

Builds a pretraining model (a ``--model`` preset, on CUDA when present) with a full AdamW state,
then calls ``maepl.checkpoint.save_checkpoint`` ``--saves`` times each way, as ``Run.save``
does. The stall is the time until the call returns: the whole write when synchronous; the
copy to host memory and the finite check when asynchronous, whose files are then written by a
background thread (its time is printed too: the next save waits for it if it comes sooner).

    python benchmarks/checkpoint_stall.py [--model mae_vit_base_patch16] [--saves 3] [--dir PATH]

Last line: ``stall_s=<synchronous>,<asynchronous>`` (median seconds per save).
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from accelerate import Accelerator

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from maepl.checkpoint import CheckpointWriter, save_checkpoint  # noqa: E402
from maepl.config import PretrainConfig  # noqa: E402
from maepl.models.mae import build_mae  # noqa: E402
from maepl.optim import build_adamw, param_groups_weight_decay  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", default="mae_vit_base_patch16")
    p.add_argument("--saves", type=int, default=3)
    p.add_argument("--dir", default=None, help="where to write (default: a temporary folder)")
    args = p.parse_args()
    cfg = PretrainConfig(model=args.model, dataset="sample").validate()
    acc = Accelerator(cpu=not torch.cuda.is_available())
    model = build_mae(cfg).to(acc.device)
    opt = build_adamw(param_groups_weight_decay(model, 0.05), 1e-4, device_type=acc.device.type)
    for q in model.parameters():  # one step, so that the optimizer holds its moments
        q.grad = torch.full_like(q, 1e-3)
    opt.step()
    model, opt = acc.prepare(model, opt)
    n = sum(q.numel() for q in model.parameters())
    print(
        f"{args.model}: {n / 1e6:.1f} M parameters, checkpoint ~{n * 12 / 2**30:.2f} GiB "
        f"(weights + 2 AdamW moments, fp32); device {acc.device}, torch {torch.__version__}"
    )
    root = Path(args.dir or tempfile.mkdtemp(prefix="maepl_ckpt_"))
    stalls: dict[str, list[float]] = {"sync": [], "async": []}
    background = []
    try:
        for mode in ("sync", "async"):
            writer = CheckpointWriter() if mode == "async" else None
            for k in range(args.saves):
                if acc.device.type == "cuda":
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                save_checkpoint(acc, root / mode, k + 1, model, opt, {}, None, 1, writer=writer)
                stalls[mode].append(time.perf_counter() - t0)
                if writer is not None:  # the write the training would not have waited for
                    writer.wait()
                    background.append(time.perf_counter() - t0)
            print(
                f"{mode:5s}: stall per save {', '.join(f'{s:.2f}' for s in stalls[mode])} s"
                + (
                    f"; written after {', '.join(f'{s:.2f}' for s in background)} s"
                    if writer
                    else ""
                )
            )
    finally:
        if args.dir is None:
            shutil.rmtree(root, ignore_errors=True)
    sync, asyn = (statistics.median(stalls[m]) for m in ("sync", "async"))
    print(f"stall_s={sync:.3f},{asyn:.3f}")


if __name__ == "__main__":
    main()
