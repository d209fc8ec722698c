#!/usr/bin/env python
"""The positional-label head and its loss alone: plain classifier + cross-entropy vs the fused,
chunked one (``--pos_ce_chunk``), forward + backward, time and peak memory.

    python benchmarks/pos_loss.py                       # ViT-B/16 RPL at batch 256 (heavy on CPU)
    python benchmarks/pos_loss.py --batch_size 32 --steps 3

The input is what the head sees in a ViT-B/16 MAE step at the default settings: 36 labelled
tokens per image (49 visible, PE dropped on 3/4), 768-d, a 14x14 grid; RPL pairs all 36x36 of
them (1,296 pairs, 729 classes), APL labels the 36 tokens (196 classes). Each configuration runs
in its own subprocess, so that its peak memory is its own: on CUDA
``torch.cuda.max_memory_allocated``, on CPU the growth of the process's peak resident set
(``ru_maxrss``) over its state before the first step (inputs and weights already allocated).
The last line is ``fused_vs_plain_ms=<ratio>`` for RPL (below 1: the fused loss is faster).
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from maepl.models.pos_labels import PositionLabeler  # noqa: E402


def measure(kind: str, chunk: int, args: argparse.Namespace) -> dict:
    device = torch.device(args.device)
    torch.manual_seed(0)
    lab = PositionLabeler(kind, args.embed_dim, args.grid, args.grid, ce_chunk=chunk).to(device)
    n, m = args.batch_size, args.labelled
    z = torch.randn(n, m, args.embed_dim, device=device, requires_grad=True)
    pos = torch.stack([torch.randperm(args.grid**2)[:m] for _ in range(n)]).to(device)
    precision = args.precision or ("bf16" if device.type == "cuda" else "no")
    amp = torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")
    fwd = torch.compile(lab) if args.compile else lab

    def step() -> float:
        with amp:
            loss, _ = fwd(z, pos)
        loss.backward()
        lab.zero_grad(set_to_none=True)
        z.grad = None
        return loss.item()  # also synchronises the device

    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # inputs and weights exist
    step()  # warm-up (and compilation)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times, loss = [], 0.0
    for _ in range(args.steps):
        t = time.perf_counter()
        loss = step()
        times.append((time.perf_counter() - t) * 1e3)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated() / 2**20
    else:  # growth of the peak resident set over the steps (warm-up included): what a step
        # needs beyond its inputs and weights (large CPU blocks go back to the system)
        peak = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0) / 2**10
    return dict(kind=kind, chunk=chunk, ms=statistics.median(times), peak_mib=peak, loss=loss)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch_size", type=int, default=256)
    p.add_argument("--labelled", type=int, default=36, help="labelled tokens per image")
    p.add_argument("--embed_dim", type=int, default=768)
    p.add_argument("--grid", type=int, default=14)
    p.add_argument("--chunk", type=int, default=32768, help="rows per chunk (fused)")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument(
        "--precision", choices=("bf16", "no"), default=None, help="default: bf16 on CUDA"
    )
    p.add_argument("--compile", action="store_true")
    p.add_argument("--only", default="abs,rel", help="abs, rel or both")
    p.add_argument("--json", default=None, help="write the results here")
    p.add_argument("--one", default=None, help=argparse.SUPPRESS)  # KIND:CHUNK, in a subprocess
    args = p.parse_args()
    if args.one:
        kind, chunk = args.one.split(":")
        print(json.dumps(measure(kind, int(chunk), args)))
        return

    rows = []
    print(
        f"device {args.device}, torch {torch.__version__}; batch {args.batch_size} x "
        f"{args.labelled} labelled tokens, {args.embed_dim}-d, {args.grid}x{args.grid} grid, "
        f"compile {args.compile}, median of {args.steps} steps"
    )
    for kind in [k.strip() for k in args.only.split(",")]:
        for chunk in (0, args.chunk):
            cmd = [sys.executable, __file__, "--one", f"{kind}:{chunk}"]
            cmd += [a for a in sys.argv[1:] if a != "--one"]
            out = subprocess.run(cmd, capture_output=True, text=True)
            if out.returncode:
                sys.exit(f"error: {kind} chunk {chunk} failed:\n{out.stderr[-2000:]}")
            r = json.loads(out.stdout.strip().splitlines()[-1])
            rows.append(r)
            label = "plain" if chunk == 0 else f"fused/{chunk}"
            print(
                f"  {kind} {label:<12} {r['ms']:9.1f} ms  peak {r['peak_mib']:8.0f} MiB  "
                f"loss {r['loss']:.4f}",
                flush=True,
            )
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    rel = [r for r in rows if r["kind"] == "rel"]
    ratio = rel[1]["ms"] / rel[0]["ms"] if len(rel) == 2 else float("nan")
    print(f"fused_vs_plain_ms={ratio:.3f}")


if __name__ == "__main__":
    main()
