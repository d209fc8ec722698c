"""Crop-and-resize kernels of ``--data_pipeline gpu`` (:mod:`maepl.gpu_aug`).

Same-size batches (Fashion-MNIST) go through one ``grid_sample``; decoded files of any size are
cropped and resized with antialiased bicubic resampling: on CUDA all crops of a batch at once
(:func:`resized_crops`, two batched products with the weights of torch's antialiased
``interpolate``), elsewhere one ``interpolate`` per image (:func:`resized_crops_one_by_one`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F


def resized_crop_batch(
    x: torch.Tensor, boxes: torch.Tensor, flip: torch.Tensor, size: int
) -> torch.Tensor:
    """Float ``[n, C, H, W]`` -> ``[n, C, size, size]``: each box resized (bicubic), then flipped.

    One ``grid_sample``. Output pixel ``o`` samples the input at ``left + (o + 0.5) * w / size
    - 0.5`` (pixel centres), exactly as resizing the cropped box; a flip mirrors the sampling
    points. Differences from crop-then-resize: the 4x4 bicubic taps of points near the box edge
    read the real neighbouring pixels (resizing a crop repeats the box's edge instead; at the
    image border both repeat it), and nothing is antialiased, so use it for upsampling crops
    (e.g. Fashion-MNIST's 28 px images to 28 px).
    """
    n, _, H, W = x.shape
    top, left, h, w = boxes.double().unbind(1)
    theta = torch.zeros(n, 2, 3, dtype=torch.float64)
    theta[:, 0, 0] = torch.where(flip.to(w.device), -w / W, w / W)  # built on the host
    theta[:, 0, 2] = (2 * left + w) / W - 1
    theta[:, 1, 1] = h / H
    theta[:, 1, 2] = (2 * top + h) / H - 1
    theta = theta.to(device=x.device, dtype=x.dtype, non_blocking=True)
    grid = F.affine_grid(theta, [n, x.shape[1], size, size], align_corners=False)
    return F.grid_sample(x, grid, mode="bicubic", padding_mode="border", align_corners=False)


def resized_crop_one(
    img: torch.Tensor, box: Sequence[int], size: int, luma: bool = False
) -> torch.Tensor:
    """uint8 ``[C, H, W]`` -> float ``[C, size, size]``: crop, (RGB -> luma,) then antialiased
    bicubic resize (torch's antialiased kernel is PIL's, a = -0.5, widened to downsample)."""
    top, left, h, w = (int(v) for v in box)
    crop = img[:, top : top + h, left : left + w]  # before any conversion: crops are smaller
    crop = rgb_to_luma(crop) if luma else crop
    return F.interpolate(
        crop[None].float(), size=(size, size), mode="bicubic", antialias=True, align_corners=False
    )[0]


# values of one resampling group's canvas (256 MiB in float32, 512 in float64); a larger group
# is split, except that a single larger crop makes a group of its own
CANVAS_ELEMS = 1 << 26


def _cubic(x: torch.Tensor, a: float = -0.5) -> torch.Tensor:
    """The bicubic kernel of PIL and of torch's antialiased resize (a = -0.5)."""
    x = x.abs()
    near = ((a + 2) * x - (a + 3)) * x * x + 1
    far = (((x - 5) * x + 8) * x - 4) * a
    return torch.where(x < 1, near, torch.where(x < 2, far, torch.zeros_like(x)))


def aa_weights(lengths: torch.Tensor, size: int, span: int, dtype: torch.dtype) -> torch.Tensor:
    """``[n, size, span]``: row o of matrix k holds the weights that torch's antialiased bicubic
    ``interpolate`` (``align_corners=False``) gives the ``lengths[k]`` (<= ``span``) input pixels
    of one axis for output pixel o, zero beyond ``lengths[k]``.

    The weights are computed as ATen's ``compute_indices_weights_aa``: scale = length / size,
    support 2 * scale when downsampling (2 otherwise), the taps from ``center - support`` to
    ``center + support`` clipped to the input, normalised to sum 1."""
    dev = lengths.device
    taps = 2 * math.ceil(2 * max(1.0, span / size)) + 2  # >= the widest row's support, 2 * 2s + 1
    length = lengths.to(torch.float64)[:, None]  # [n, 1]
    scale = length / size
    down = scale >= 1
    support = torch.where(down, 2 * scale, torch.full_like(scale, 2.0))
    inv = torch.where(down, 1 / scale, torch.ones_like(scale))
    center = scale * (torch.arange(size, device=dev, dtype=torch.float64) + 0.5)  # [n, size]
    lo = (center - support + 0.5).floor().clamp_(min=0)
    hi = torch.minimum((center + support + 0.5).floor(), length)
    idx = lo[..., None] + torch.arange(taps, device=dev, dtype=torch.float64)  # [n, size, taps]
    w = _cubic((idx - center[..., None] + 0.5) * inv[..., None]) * (idx < hi[..., None])
    w = w / w.sum(-1, keepdim=True)
    out = torch.zeros(len(lengths), size, span, device=dev, dtype=dtype)
    return out.scatter_add_(2, idx.clamp_(max=span - 1).long(), w.to(dtype))


def tf32_products() -> bool:
    """Whether float32 CUDA matrix products may run in TF32, under the legacy switches
    (``allow_tf32``, ``set_float32_matmul_precision``) or the newer ``fp32_precision`` (after
    which reading the legacy ones raises). If it cannot tell, True: the caller stays exact."""
    matmul = torch.backends.cuda.matmul
    new = getattr(matmul, "fp32_precision", "none")
    if new == "none":  # inherits the global setting
        new = getattr(torch.backends, "fp32_precision", "none")
    if new != "none":
        return new != "ieee"
    try:
        return bool(matmul.allow_tf32) or torch.get_float32_matmul_precision() != "highest"
    except RuntimeError:  # legacy and new settings mixed
        return True


def resized_crops(
    imgs: Sequence[torch.Tensor],
    boxes: torch.Tensor,
    flip: torch.Tensor,
    size: int,
    luma: bool = False,
    canvas_elems: int = CANVAS_ELEMS,
) -> torch.Tensor:
    """uint8 ``[C, H, W]`` images (any sizes, one device) -> float ``[n, C', size, size]``:
    crop ``boxes`` (host, ``[n, 4]`` top, left, height, width), (RGB -> luma,) antialiased
    bicubic resize, then ``flip`` (host, ``[n]``): what ``resized_crop_one`` and a flip give
    each image, with one copy kernel per image (its crop onto the canvas) and about 15 per
    group, where per-image resizing takes two kernels an image and the Python around them.

    The crops are copied into a zero canvas, grouped by size (largest first, each group's canvas
    at most ``canvas_elems`` floats unless one crop is larger), and each group is resized by two
    batched products with the separable weights of :func:`aa_weights` (a flip reverses the
    rows of the width matrix). On CUDA with TF32 products allowed, the products run in float64,
    so that the result stays that of the float32 ``interpolate`` (fast on an H100; on GPUs with
    slow float64 keep TF32 off). Autocast is turned off inside. The dense products do about
    size / 4 times the multiply-adds of a separable filter: cheap on a GPU, not on a CPU.
    """
    with torch.autocast(imgs[0].device.type, enabled=False):
        return _resized_crops(imgs, boxes, flip, size, luma, canvas_elems)


def _resized_crops(imgs, boxes, flip, size, luma, canvas_elems) -> torch.Tensor:
    n = len(imgs)
    dev = imgs[0].device
    dtype = torch.float64 if dev.type == "cuda" and tf32_products() else torch.float32
    hw, box = boxes[:, 2:].long(), boxes.long().tolist()
    order = torch.argsort(hw[:, 0] * hw[:, 1], descending=True, stable=True).tolist()
    c_in = imgs[0].shape[0]
    ys, start = [], 0
    while start < n:  # greedy groups: the first (largest) crop sets the canvas
        hmax, wmax, end = 0, 0, start
        while end < n:
            h, w = box[order[end]][2:]
            nh, nw = max(hmax, h), max(wmax, w)
            if end > start and (end - start + 1) * c_in * nh * nw > canvas_elems:
                break
            hmax, wmax, end = nh, nw, end + 1
        group = order[start:end]
        start = end
        canvas = torch.zeros(len(group), c_in, hmax, wmax, device=dev, dtype=torch.uint8)
        for j, k in enumerate(group):
            top, left, h, w = box[k]
            canvas[j, :, :h, :w] = imgs[k][:, top : top + h, left : left + w]
        x = (rgb_to_luma(canvas) if luma else canvas).to(dtype)
        gh, gw = hw[group].T.to(dev, non_blocking=True)
        wy = aa_weights(gh, size, hmax, dtype)  # [g, size, hmax]
        wx = aa_weights(gw, size, wmax, dtype)  # [g, size, wmax]
        fl = flip[group].to(dev, non_blocking=True).view(-1, 1, 1)
        wx = torch.where(fl, wx.flip(1), wx)
        # the cheaper order: height first costs size*W*(H + size), width first size*H*(W + size)
        if wmax <= hmax:
            y = (wy[:, None] @ x) @ wx.transpose(1, 2)[:, None]
        else:
            y = wy[:, None] @ (x @ wx.transpose(1, 2)[:, None])
        ys.append(y.float())
    # back to the batch's order; host indices go over without a sync (no torch.tensor(device=))
    inverse = torch.empty(n, dtype=torch.long)
    inverse[order] = torch.arange(n)
    y = torch.cat(ys) if len(ys) > 1 else ys[0]
    return y[inverse.to(dev, non_blocking=True)]


def resized_crops_one_by_one(
    imgs: Sequence[torch.Tensor], boxes: torch.Tensor, flip: torch.Tensor, size: int, luma: bool
) -> torch.Tensor:
    """What :func:`resized_crops` computes, one ``interpolate`` per image (the CPU's path)."""
    pairs = zip(imgs, boxes.tolist(), strict=True)
    x = torch.stack([resized_crop_one(im, box, size, luma) for im, box in pairs])
    return torch.where(flip.to(x.device, non_blocking=True).view(-1, 1, 1, 1), x.flip(-1), x)


def rgb_to_luma(x: torch.Tensor) -> torch.Tensor:
    """uint8 RGB ``[..., 3, H, W]`` -> ``[..., 1, H, W]`` as PIL's ``convert("L")`` computes it
    (ITU-R 601-2 luma in the same fixed point)."""
    r, g, b = x.int().unbind(-3)
    return ((r * 19595 + g * 38470 + b * 7471 + 0x8000) >> 16).to(torch.uint8).unsqueeze(-3)
