#!/usr/bin/env python
"""Input-pipeline throughput of pretrain.py: ``--data_pipeline cpu`` vs ``--data_pipeline gpu``.

Each pipeline produces what the training step consumes: a normalised float batch
``[batch, 3, size, size]`` on the device, with RandomResizedCrop (scale ``--crop_min``-1,
bicubic) + horizontal flip, from an ImageFolder of JPEGs.

    cpu          DataLoader workers decode with PIL and run the CPU transform (maepl.data
                 build_transform, seeded per sample); pinned batches copied to the device
    gpu          what pretrain.py runs: workers only read the file bytes; a background thread
                 (maepl.prefetch.Prefetcher) decodes them with torchvision.io.decode_jpeg on the
                 device (batched on CUDA), crops, flips and normalises them there
                 (maepl.gpu_aug.GpuAugment) on its own CUDA stream, two batches ahead
    gpu:inline   the same work in the main thread, batch by batch (pretrain.py before the
                 prefetcher): shows what the overlap gains
    gpu:read     the gpu pipeline's DataLoader alone (workers reading bytes): its upper bound
    gpu:device   the gpu pipeline's device work alone, in the main thread, on batches of bytes
                 read beforehand

The figure of each pipeline is images delivered / wall time over all ``--batches`` timed
batches, after ``--warmup`` batches (the consumer stream is synchronised at the end). img/s of
windows of ``--window`` batches are kept in the JSON and their min/max printed, for inspection
only: workers finish their batches in bursts, so short windows swing widely.

Steady state, as in a long ImageNet epoch: the DataLoader draws ``warmup + batches`` batches
in one pass (successive random permutations of the files), so the timed part never crosses an
epoch boundary, where the worker queues drain. The default warm-up (one batch per worker, at
least 8) lets every worker deliver once; the default 96 timed batches span 6 rounds of 16
workers, so the burst in progress at the end moves the figure by at most about 1/6, and less
with fewer workers. 8,000 synthetic files (31 batches of 256) are read about 3.5 times per
pipeline; they are in the page cache either way. On the H100 machine (16 cores) writing 4,000
files took 13.9 s, so the defaults (8,000 files, 5 x 112 batches) should take about 50 s; more
with ``--step_ms``, which makes each batch last at least that long.

``--step_ms X`` simulates a training step of X ms after each batch (not for gpu:read): on CUDA,
a loop of 4096x4096 float32 matmuls on the consumer stream, calibrated once with CUDA events
(the calibration is printed); without CUDA, a sleep of X ms. ``--step_ms 43`` is a ViT-B/16
step at batch 256 and 6,000 img/s. The matmuls occupy the GPU but not the main thread, which
an eager training step keeps busy launching kernels; ``--step_sync`` also makes the host wait
for each step, as a loop that reads a value from the device every step does.

Without ``--data_path`` the script writes a synthetic ImageFolder to a temporary folder (deleted
at the end): ``--images`` JPEGs at quality 90, half 500x375 or 375x500 (ImageNet's most
common sizes) and half of random width and height between 300 and 600 px, 10 classes. The
content is smooth and natural-looking: a two-colour gradient, a few filled ellipses and
rectangles in random colours, blurred slightly, a 1/f-like texture (random fields upsampled
from 1/32, 1/8 and 1/2 of the size) and Gaussian noise of sigma 3. (Random-noise JPEGs are
several times larger and decode unrealistically slowly.) They average about 50 KiB at about
445x445 px; ImageNet's training JPEGs average about 110 KB (138 GB over 1.28 M files) at a
similar size, so they hold more entropy to decode: pass --data_path for the figure that
counts. Files just written are in the page cache; a dataset on disk may be read more slowly.

Last line: ``gpu_pipeline_img_per_s=<img/s of the gpu pipeline over all timed batches>``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from itertools import pairwise
from multiprocessing import Pool
from pathlib import Path

import numpy as np
import PIL
import torch
import torchvision
from PIL import Image, ImageDraw, ImageFilter
from torch.utils.data import DataLoader, RandomSampler

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout too

from maepl.data import IMAGENET_MEAN, IMAGENET_STD, build_dataset, build_transform  # noqa: E402
from maepl.encoded import EncodedImages  # noqa: E402
from maepl.gpu_aug import GpuAugment  # noqa: E402
from maepl.loaders import SeededTransformDataset, collate_skip_bad  # noqa: E402
from maepl.prefetch import Prefetcher  # noqa: E402

PIPELINES = ("cpu", "gpu", "gpu:inline", "gpu:read", "gpu:device")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--data_path", help="an ImageFolder (train/ used when present)")
    p.add_argument("--images", type=int, default=8000, help="synthetic images to write")
    p.add_argument("--input_size", type=int, default=224)
    p.add_argument("--batch_size", type=int, default=256)
    p.add_argument("--num_workers", type=int, default=os.cpu_count() or 1)
    p.add_argument("--crop_min", type=float, default=0.2)
    p.add_argument("--batches", type=int, default=96, help="timed batches per pipeline")
    p.add_argument(
        "--warmup", type=int, help="untimed batches first (default: num_workers, at least 8)"
    )
    p.add_argument("--window", type=int, default=8, help="batches per window (for inspection)")
    p.add_argument("--step_ms", type=float, default=0.0, help="simulated training step (ms)")
    p.add_argument("--step_sync", action="store_true", help="the host waits for each step")
    p.add_argument("--only", default=",".join(PIPELINES), help="comma-separated subset")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--json", help="write the results here")
    args = p.parse_args(argv)
    if args.warmup is None:
        args.warmup = max(8, args.num_workers)
    unknown = set(args.only.split(",")) - set(PIPELINES)
    if unknown:
        p.error(f"--only: unknown {sorted(unknown)}; choose from {', '.join(PIPELINES)}")
    if args.batches < args.window or args.window < 1 or args.warmup < 0 or args.step_ms < 0:
        p.error("--batches must be >= --window >= 1; --warmup and --step_ms >= 0")
    return args


# ---------------------------------------------------------------------------- synthetic data
def synthetic_image(seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    if seed % 2:
        w, h = (500, 375) if rng.random() < 0.5 else (375, 500)
    else:
        w, h = (int(v) for v in rng.integers(300, 601, 2))
    # a gradient between two colours along a random direction
    yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
    angle = rng.uniform(0, 2 * np.pi)
    t = np.cos(angle) * xx + np.sin(angle) * yy
    t = ((t - t.min()) / (t.max() - t.min()))[..., None]
    a, b = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
    img = Image.fromarray((a + (b - a) * t).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(3, 8))):
        x0, y0 = rng.uniform(0, w), rng.uniform(0, h)
        x1, y1 = x0 + rng.uniform(20, w / 2), y0 + rng.uniform(20, h / 2)
        shape = draw.ellipse if rng.random() < 0.5 else draw.rectangle
        shape((x0, y0, x1, y1), fill=tuple(int(v) for v in rng.integers(0, 256, 3)))
    img = np.asarray(img.filter(ImageFilter.GaussianBlur(1.5)), dtype=np.float32)
    # texture: random fields smoothly upsampled from 1/32, 1/8 and 1/2 of the size (1/f-like)
    for scale, amp in ((32, 16), (8, 12), (2, 8)):
        small = rng.normal(0, 1, (max(1, h // scale), max(1, w // scale))).astype(np.float32)
        field = np.asarray(Image.fromarray(small, "F").resize((w, h), Image.BICUBIC))
        img = img + amp * field[..., None]
    img = img + rng.normal(0, 3, (h, w, 3))
    return Image.fromarray(img.clip(0, 255).astype(np.uint8))


def _write_one(job: tuple[int, str]) -> int:
    seed, path = job
    synthetic_image(seed).save(path, quality=90)
    return os.path.getsize(path)


def write_synthetic(root: Path, n: int, processes: int) -> int:
    jobs = []
    for k in range(n):
        folder = root / "train" / f"class{k % 10}"
        folder.mkdir(parents=True, exist_ok=True)
        jobs.append((k, str(folder / f"{k:06d}.JPEG")))
    with Pool(max(1, processes)) as pool:
        return sum(pool.map(_write_one, jobs, chunksize=16))


# ---------------------------------------------------------------------------- timing
def simulated_step(ms: float, device: torch.device, sync: bool) -> Callable[[], None]:
    """About ``ms`` of device work on the current stream (see the module docstring)."""
    if ms <= 0:
        return lambda: None
    if device.type != "cuda":
        print(f"simulated step: sleep {ms:g} ms (no CUDA)")
        return lambda: time.sleep(ms / 1000)
    a = torch.randn(4096, 4096, device=device)
    out = torch.empty_like(a)

    def matmuls(n: int) -> float:  # ms on the device
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(n):
            torch.mm(a, a, out=out)
        end.record()
        end.synchronize()
        return start.elapsed_time(end)

    matmuls(3)  # warm-up
    n = max(1, round(ms / (matmuls(20) / 20)))
    print(f"simulated step: {n} matmuls 4096x4096 fp32 = {matmuls(n):.1f} ms (asked {ms:g} ms)")
    stream = torch.cuda.current_stream(device)

    def step() -> None:
        for _ in range(n):
            torch.mm(a, a, out=out)
        if sync:
            stream.synchronize()

    return step


def time_batches(batches: Iterator, args, device: torch.device, step: Callable) -> dict:
    """img/s over ``args.batches`` batches of ``batches`` after ``args.warmup``, and per window.

    ``step`` runs after each batch of images (not after gpu:read's None)."""
    sync = torch.cuda.current_stream(device).synchronize if device.type == "cuda" else None
    sync = sync or (lambda: None)
    t_start = time.perf_counter()
    for _ in range(args.warmup):
        if next(batches) is not None:
            step()
    sync()
    marks = [(0, time.perf_counter())]  # (batches timed, time)
    for k in range(1, args.batches + 1):
        out = next(batches)
        if out is not None:
            step()
        if k % args.window == 0 or k == args.batches:
            sync()
            marks.append((k, time.perf_counter()))
    if out is not None:
        assert out.shape == (args.batch_size, 3, args.input_size, args.input_size), out.shape
        assert torch.isfinite(out).all()
    seconds, bs = marks[-1][1] - marks[0][1], args.batch_size
    windows = [(k1 - k0) * bs / (t1 - t0) for (k0, t0), (k1, t1) in pairwise(marks)]
    return dict(
        img_per_s=args.batches * bs / seconds,
        seconds=seconds,
        images=args.batches * bs,
        windows=windows,
        warmup_s=marks[0][1] - t_start,
    )


def loader_for(dataset, args, collate, device: torch.device) -> DataLoader:
    """One pass of ``warmup + batches`` batches: successive random permutations of the files."""
    n = (args.warmup + args.batches) * args.batch_size
    return DataLoader(
        dataset,
        batch_size=args.batch_size,
        sampler=RandomSampler(dataset, num_samples=n, generator=torch.Generator().manual_seed(0)),
        drop_last=True,
        num_workers=args.num_workers,
        pin_memory=device.type == "cuda",
        collate_fn=collate,
        prefetch_factor=4 if args.num_workers > 0 else None,
    )


def pipeline(name: str, raw, args, device: torch.device) -> Iterator[torch.Tensor | None]:
    """The batches that pipeline ``name`` hands the training step (gpu:read: None each)."""
    mean, std, size = IMAGENET_MEAN, IMAGENET_STD, args.input_size
    aug = GpuAugment(size, 3, mean, std, args.crop_min, seed=0, rank=0, device=device)
    encoded, n = EncodedImages(raw.samples), args.warmup + args.batches
    if name == "gpu:device":  # up to 8 batches of bytes read beforehand, cycled
        bs = args.batch_size
        pre = []
        for k in range(min(len(encoded) // bs, 8)):
            pre.append(encoded.collate_fn([encoded[i] for i in range(k * bs, (k + 1) * bs)])[0])
        for k in range(n):
            yield aug(pre[k % len(pre)], 0, k)[0]
    elif name == "cpu":
        tf = build_transform(True, size, 3, mean, std, (args.crop_min, 1.0))
        dataset = SeededTransformDataset(raw, tf, 0)
        for x, _, _ in loader_for(dataset, args, collate_skip_bad, device):
            yield x.to(device, non_blocking=True)
    elif name == "gpu":  # what pretrain.py runs: the micro-batch index seeds the crops
        loader = loader_for(encoded, args, encoded.collate_fn, device)
        with Prefetcher(loader, aug, 0, 0, n, device) as batches:
            for x, _, _ in batches:
                yield x
    elif name == "gpu:inline":
        for k, (batch, _, _) in enumerate(loader_for(encoded, args, encoded.collate_fn, device)):
            yield aug(batch, 0, k)[0]
    else:  # gpu:read
        for _ in loader_for(encoded, args, encoded.collate_fn, device):
            yield None


def run_pipeline(name: str, raw, args, device: torch.device, step: Callable) -> dict:
    batches = pipeline(name, raw, args, device)
    try:
        return time_batches(batches, args, device, step)
    finally:
        batches.close()  # stops the prefetcher and the workers now


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    t_total = time.perf_counter()
    tmp = None
    if args.data_path:
        root, gen_s, note = Path(args.data_path), 0.0, f"ImageFolder {args.data_path}"
    else:
        tmp = Path(tempfile.mkdtemp(prefix="maepl_pipeline_"))
        root = tmp
        t0 = time.perf_counter()
        size = write_synthetic(root, args.images, args.num_workers)
        gen_s = time.perf_counter() - t0
        note = f"synthetic JPEGs, {size / args.images / 1024:.0f} KiB mean, written in {gen_s:.1f}s"
    try:
        raw = build_dataset("imagefolder", str(root), train=True)
        if len(raw) < args.batch_size:
            sys.exit(f"error: {len(raw)} images hold no batch of {args.batch_size}")
        name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor()
        print(f"device: {device} ({name or platform.machine()}), {os.cpu_count()} CPU cores")
        print(
            f"torch {torch.__version__}, torchvision {torchvision.__version__}, "
            f"Pillow {PIL.__version__}, python {platform.python_version()}"
        )
        sizes = [Image.open(p).size for p, _ in raw.samples[:200]]
        mean_w = sum(w for w, _ in sizes) / len(sizes)
        mean_h = sum(h for _, h in sizes) / len(sizes)
        print(
            f"{len(raw)} images ({note}); mean size of the first {len(sizes)}: "
            f"{mean_w:.0f}x{mean_h:.0f}"
        )
        print(
            f"batch {args.batch_size}, output {args.input_size}px, crop_min {args.crop_min}, "
            f"{args.num_workers} workers; {args.warmup} warm-up + {args.batches} timed batches, "
            f"windows of {args.window}; simulated step {args.step_ms:g} ms"
            + (" (host waits)" if args.step_sync else "")
        )
        step = simulated_step(args.step_ms, device, args.step_sync)
        results = {}
        for pipe in args.only.split(","):
            results[pipe] = r = run_pipeline(pipe, raw, args, device, step)
            print(
                f"  {pipe:<11} {r['img_per_s']:9.0f} img/s over {r['images']} images in "
                f"{r['seconds']:.2f}s   windows {min(r['windows']):.0f}-{max(r['windows']):.0f}"
                f"   warm-up {r['warmup_s']:.1f}s",
                flush=True,
            )
        print()
        print(
            "| pipeline | img/s (all timed batches) | window min | window max |\n|---|---|---|---|"
        )
        for pipe, r in results.items():
            w = r["windows"]
            print(f"| {pipe} | {r['img_per_s']:.0f} | {min(w):.0f} | {max(w):.0f} |")
        total_s = time.perf_counter() - t_total
        print(f"\nbenchmark time {total_s:.1f}s (data generation {gen_s:.1f}s)")
        if args.json:
            Path(args.json).write_text(
                json.dumps(
                    dict(
                        device=str(device),
                        device_name=name,
                        cpu_count=os.cpu_count(),
                        torch=torch.__version__,
                        torchvision=torchvision.__version__,
                        images=len(raw),
                        data=note,
                        args=vars(args),
                        results=results,
                        total_s=total_s,
                    ),
                    indent=1,
                )
            )
            print(f"wrote {args.json}")
        gpu = results.get("gpu", {}).get("img_per_s", float("nan"))
        print(f"gpu_pipeline_img_per_s={gpu:.0f}")
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
