"""How far ``--data_pipeline gpu``'s JPEG decode is from the CPU path's, in steps of 255.

torchvision creates nvJPEG with its default flags, which upsample subsampled chroma (4:2:0) by
repeating each sample where libjpeg-turbo, behind PIL and torchvision's CPU decoder, interpolates
("fancy upsampling"). This script decodes synthetic JPEGs with the CPU decoder and compares:

- ``repeat``: libjpeg-turbo's repeating upsampler (``djpeg -nosmooth``, Debian package
  libjpeg-turbo-progs; skipped if absent), the CPU's stand-in for nvJPEG's default;
- ``cuda``: ``decode_jpeg(..., device="cuda")`` itself, when a GPU is present.

For each: the mean absolute difference in RGB, in luma (ITU-R 601 Y, stored at full resolution, so
it should only differ by rounding) and in chroma (Cb, Cr); over the decoded images and over
GpuAugment's 224 px crops of them. Last line: ``rgb_mean_steps=<repeat>,<cuda>``.
``--pattern noise`` writes uniform random pixels instead of photo-like content: the worst case
for chroma upsampling (every chroma sample differs from its neighbours), as in the random-noise
JPEGs the CUDA tests once used.

    python benchmarks/jpeg_decoders.py [--images 32] [--size 256 384] [--pattern photo|noise]
"""

from __future__ import annotations

import argparse
import io
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from maepl.encoded import decode_batch  # noqa: E402
from maepl.gpu_aug import GpuAugment  # noqa: E402

warnings.filterwarnings("ignore", "The image decoding", DeprecationWarning)


def photo_like(h: int, w: int, rng: np.random.Generator) -> np.ndarray:
    """Gradients, a few flat-coloured discs with sharp edges and mild noise (uint8 RGB)."""
    yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
    a, b, c = rng.uniform(40, 200, 3)
    img = np.stack([a + xx * 50, b + yy * 50, c + (xx - yy) * 40], -1)
    for _ in range(4):
        cy, cx, r = rng.uniform(0, 1), rng.uniform(0, 1), rng.uniform(0.05, 0.25)
        img[(yy - cy) ** 2 + (xx - cx) ** 2 < r * r] = rng.integers(0, 255, 3)
    img += rng.normal(0, 3, img.shape)
    return img.clip(0, 255).astype(np.uint8)


def ycc(x: torch.Tensor) -> torch.Tensor:
    """RGB ``[..., 3, H, W]`` (0-255) -> Y, Cb, Cr (JFIF, without the 128 offset)."""
    r, g, b = x.double().unbind(-3)
    y = 0.299 * r + 0.587 * g + 0.114 * b
    return torch.stack([y, (b - y) / 1.772, (r - y) / 1.402], -3)


def repeat_decode(data: bytes) -> torch.Tensor:
    out = subprocess.run(
        ["djpeg", "-nosmooth", "-pnm"], input=data, capture_output=True, check=True
    )
    img = np.asarray(Image.open(io.BytesIO(out.stdout)).convert("RGB"))
    return torch.from_numpy(img.copy()).permute(2, 0, 1)


def differences(a: list[torch.Tensor], b: list[torch.Tensor]) -> dict[str, float]:
    """Mean |a - b| over all images: RGB, luma, chroma (steps of 255)."""
    rgb, y, c = [], [], []
    for p, q in zip(a, b, strict=True):
        p, q = p.cpu().double(), q.cpu().double()
        d = (ycc(p) - ycc(q)).abs()
        rgb.append((p - q).abs().mean())
        y.append(d[..., 0, :, :].mean())
        c.append(d[..., 1:, :, :].mean())
    return {k: float(torch.stack(v).mean()) for k, v in (("rgb", rgb), ("luma", y), ("chroma", c))}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--images", type=int, default=32)
    p.add_argument("--size", type=int, nargs=2, default=(256, 384), help="min and max side, px")
    p.add_argument("--quality", type=int, default=90)
    p.add_argument("--pattern", choices=("photo", "noise"), default="photo")
    args = p.parse_args()
    rng = np.random.default_rng(0)
    files = []
    for _ in range(args.images):
        h, w = (int(v) for v in rng.integers(args.size[0], args.size[1] + 1, 2))
        buf = io.BytesIO()
        if args.pattern == "noise":
            pixels = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        else:
            pixels = photo_like(h, w, rng)
        Image.fromarray(pixels).save(buf, "JPEG", quality=args.quality)
        files.append(buf.getvalue())  # PIL's default subsampling: 4:2:0
    tensors = [torch.frombuffer(bytearray(f), dtype=torch.uint8) for f in files]
    cpu, _ = decode_batch(tensors, torch.device("cpu"))
    others = {}
    if shutil.which("djpeg"):
        others["repeat"] = [repeat_decode(f) for f in files]
    else:
        print("repeat: skipped (no djpeg; apt-get install libjpeg-turbo-progs)")
    if torch.cuda.is_available():
        others["cuda"] = decode_batch(tensors, torch.device("cuda"))[0]
        print(f"cuda: {torch.cuda.get_device_name()}, torch {torch.__version__}")
    print(
        f"{args.images} {args.pattern} JPEGs, {args.size[0]}-{args.size[1]} px, "
        f"quality {args.quality}, 4:2:0"
    )
    augment = GpuAugment(224, 3, (0.5,) * 3, (0.5,) * 3, 0.2, seed=0, rank=0, device="cpu")

    def crops(images: list[torch.Tensor]) -> list[torch.Tensor]:
        x = augment.augment_decoded([i.cpu() for i in images], 0, 0)
        return list((x.double() * 0.5 + 0.5) * 255)

    cpu_crops = crops(cpu)
    rgb = {"repeat": float("nan"), "cuda": float("nan")}
    for name, imgs in others.items():
        full, crop = differences(imgs, cpu), differences(crops(imgs), cpu_crops)
        for what, d in (("decoded", full), ("224px crops", crop)):
            print(
                f"{name:6s} vs cpu, {what:11s}: rgb {d['rgb']:.3f}  luma {d['luma']:.3f}  "
                f"chroma {d['chroma']:.3f}  (mean |difference|, steps of 255)"
            )
        rgb[name] = full["rgb"]
    print(f"rgb_mean_steps={rgb['repeat']:.3f},{rgb['cuda']:.3f}")


if __name__ == "__main__":
    main()
