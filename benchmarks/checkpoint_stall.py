"""How long a checkpoint save stops training: ``--async_save false`` vs ``true`` (the default).

Builds a pretraining model (a ``--model`` preset, on CUDA when present) with a full AdamW state,
then calls ``maepl.checkpoint.save_checkpoint`` ``--saves`` times each way, as ``Run.save``
does. The stall is the time until the call returns: the whole write when synchronous; the
copy to host memory and the finite check when asynchronous, whose files are then written by a
background thread (its time is printed too: the next save waits for it if it comes sooner).

First it times that copy alone, two ways on the same state: ``pageable`` (what maepl did up to
session 9: per tensor ``.contiguous().clone().cpu()``, then the finite check on the host) and
``pinned`` (``assert_finite`` where the tensors live, then ``host_copies``: pinned buffers, one
synchronisation). On the CPU both are a clone and a host check. The first pinned copy includes
allocating the pinned buffers (torch's caching host allocator rounds each up to a power of two
and keeps them for the process's later saves), so each repeat is printed.

    python benchmarks/checkpoint_stall.py [--model mae_vit_base_patch16] [--saves 3] [--dir PATH]
                                          [--snapshot_only]

Lines ``snapshot_s=<pageable>,<pinned>`` and, last, ``stall_s=<synchronous>,<asynchronous>``
(median seconds per call).
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
from maepl.snapshot import assert_finite, host_copies, optimizer_to_files  # noqa: E402


def _pageable(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The copy as maepl made it up to session 9 (the baseline)."""
    out = {k: v.detach().contiguous().clone().cpu() for k, v in sd.items()}
    for k, v in out.items():
        if v.is_floating_point() and not torch.isfinite(v).all():
            raise FloatingPointError(k)
    return out


def _pinned(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    assert_finite(sd, "snapshot")
    return host_copies(sd)


def time_snapshots(model, opt, repeats: int, device: torch.device) -> tuple[float, float]:
    """Median seconds to copy the weights and AdamW state to the host, each way."""
    times: dict[str, list[float]] = {"pageable": [], "pinned": []}
    for _ in range(repeats):
        for name, copy in (("pageable", _pageable), ("pinned", _pinned)):
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            copies = (copy(model.state_dict()), copy(optimizer_to_files(opt.optimizer)[0]))
            times[name].append(time.perf_counter() - t0)
            del copies
    for name, ts in times.items():
        print(f"snapshot {name:8s}: {', '.join(f'{t:.3f}' for t in ts)} s")
    pageable, pinned = (statistics.median(times[n]) for n in ("pageable", "pinned"))
    print(f"snapshot_s={pageable:.3f},{pinned:.3f}")
    return pageable, pinned


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", default="mae_vit_base_patch16")
    p.add_argument("--saves", type=int, default=3)
    p.add_argument("--dir", default=None, help="where to write (default: a temporary folder)")
    p.add_argument(
        "--snapshot_only", action="store_true", help="time the host copy only (no files written)"
    )
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
    time_snapshots(model, opt, args.saves, acc.device)
    if args.snapshot_only:
        return
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
