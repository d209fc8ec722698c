#!/usr/bin/env python
"""The resize of ``--data_pipeline gpu`` alone: one antialiased ``interpolate`` per image (the
CPU's path, and CUDA's before session 9) vs all crops of a batch at once
(``maepl.resample.resized_crops``: crops on a canvas, two batched products).

    python benchmarks/gpu_crops.py                        # batch 256 of 256-384 px images -> 224
    python benchmarks/gpu_crops.py --device cpu --batch_size 32 --batches 3

Decoded uint8 RGB images of random sizes (``--min_px``..``--max_px`` a side) wait on the device;
each batch draws RandomResizedCrop boxes (scale 0.2-1) and flips as ``GpuAugment`` does. Per
batch, both means over the timed batches: host ms (the Python and launch work of one call,
what the prefetch thread spends) and wall ms (calls back to back, synchronised at the end: the
device's time where it is the slower one). ``--tf32`` allows TF32 products, under which the
batched path computes in float64 to stay exact. Also prints the largest difference between the
two outputs, in steps of 255.

``--jpegs`` (default on; ``--jpegs 0`` skips it) also times what the prefetch thread of
``pretrain.py --data_pipeline gpu`` does per batch, on JPEGs of ``data_pipeline.py``'s synthetic
photos encoded at quality 90: ``decode`` (``decode_batch``: nvJPEG on CUDA) alone, then
``augment`` (``GpuAugment``: decode, crops, flips, normalisation) with the per-image and the
batched resize: how the prefetch thread's milliseconds divide.
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from maepl.encoded import EncodedBatch, decode_batch  # noqa: E402
from maepl.gpu_aug import GpuAugment, crop_boxes, draw_uniforms, flips  # noqa: E402
from maepl.resample import resized_crops, resized_crops_one_by_one  # noqa: E402


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch_size", type=int, default=256)
    p.add_argument("--batches", type=int, default=20, help="timed batches per method")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--min_px", type=int, default=256)
    p.add_argument("--max_px", type=int, default=384)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--tf32", action="store_true", help="allow TF32 products (batched: float64)")
    p.add_argument("--jpegs", type=int, default=1, help="also time decode and augment (0: no)")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args()
    device = torch.device(args.device)
    torch.backends.cuda.matmul.allow_tf32 = args.tf32
    gen = torch.Generator().manual_seed(0)
    shapes = torch.randint(args.min_px, args.max_px + 1, (args.batch_size, 2), generator=gen)
    imgs = [
        torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=gen).to(device)
        for h, w in shapes.tolist()
    ]
    draws = [draw_uniforms(args.batch_size, gen) for _ in range(args.warmup + args.batches)]
    params = [(crop_boxes(shapes, u, (0.2, 1.0)), flips(u)) for u in draws]
    print(
        f"device {device}, torch {torch.__version__}, batch {args.batch_size} of "
        f"{args.min_px}-{args.max_px} px -> {args.size}, {args.batches} timed batches"
    )
    results, outs = [], {}

    def timed(name, calls):
        """``calls``: warm-up calls then timed ones (each returns the batch's images)."""
        for call in calls[: args.warmup]:
            call()
        sync(device)
        host = []
        start = time.perf_counter()
        for call in calls[args.warmup :]:
            t = time.perf_counter()
            out = call()
            host.append((time.perf_counter() - t) * 1000)
        sync(device)
        wall = (time.perf_counter() - start) * 1000 / args.batches
        outs[name] = out
        row = {
            "name": name,
            "host_ms": statistics.fmean(host),
            "wall_ms": wall,
            "img_per_s": args.batch_size / wall * 1000,
        }
        results.append(row)
        print(
            f"  {name:16s} host {row['host_ms']:8.2f} ms/batch  wall {wall:8.2f} ms/batch  "
            f"{row['img_per_s']:9.0f} img/s"
        )

    for name, fn in (("per_image", resized_crops_one_by_one), ("batched", resized_crops)):
        timed(name, [lambda b=b, f=f, fn=fn: fn(imgs, b, f, args.size, False) for b, f in params])
    diff = (outs["batched"].float().cpu() - outs["per_image"].float().cpu()).abs().max().item()
    if args.jpegs:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from data_pipeline import synthetic_image

        data = []
        for k in range(args.batch_size):
            buf = io.BytesIO()
            synthetic_image(k).save(buf, "JPEG", quality=90)
            data.append(torch.frombuffer(bytearray(buf.getvalue()), dtype=torch.uint8))
        batch = EncodedBatch(data, [f"synthetic_{k}.JPEG" for k in range(args.batch_size)])
        kib = batch.flat.numel() / args.batch_size / 1024
        print(f"JPEGs: {args.batch_size} synthetic photos, {kib:.0f} KiB mean, quality 90")
        n = args.warmup + args.batches
        timed("decode", [lambda: decode_batch(batch.data, device, batch.nvjpeg)[0][0]] * n)
        aug = GpuAugment(args.size, 3, (0.5,) * 3, (0.5,) * 3, 0.2, 0, 0, device)
        for resize in ("per_image", "batched"):
            aug.batched_resize = resize == "batched"
            calls = [lambda k=k: aug(batch, 0, k)[0] for k in range(n)]
            timed(f"augment_{resize}", calls)
    print(f"max |batched - per_image| {diff:.4f} steps of 255 (last batch, before rounding)")
    print(f"batched_vs_per_image_wall={results[1]['wall_ms'] / results[0]['wall_ms']:.3f}")
    if args.json:
        meta = {"device": str(device), "torch": torch.__version__, **vars(args)}
        meta["json"] = str(args.json)
        if device.type == "cuda":
            meta["device_name"] = torch.cuda.get_device_name(device)
        args.json.write_text(
            json.dumps({"meta": meta, "results": results, "max_diff": diff}, indent=1)
        )


if __name__ == "__main__":
    main()
