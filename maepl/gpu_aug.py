"""``--data_pipeline gpu``: decode, random-resized-crop, flip and normalise on the device.

DataLoader workers only hand over raw images: the file bytes of an ImageFolder (JPEG decoding
is the CPU path's bottleneck) or the uint8 arrays of Fashion-MNIST. The training loop then calls
:class:`GpuAugment` on each batch, on the device Accelerate gives the run (the CPU without one):

- crop boxes follow torchvision's ``RandomResizedCrop.get_params`` exactly (scale
  ``(crop_min, 1)``, ratio ``(3/4, 4/3)``, 10 attempts, then the centre-crop fallback),
  vectorised over the batch; flips have p = 0.5. Both are drawn from a CPU generator seeded by
  (seed, rank, epoch, batch index), so a resumed run draws the same crops;
- same-size uint8 batches (Fashion-MNIST) are resampled in one ``grid_sample`` (bicubic) whose
  sampling points are those of resizing each crop box to the output size (images larger than
  the output go through the per-image antialiased path below instead);
- encoded files are decoded with ``torchvision.io.decode_jpeg`` (batched on CUDA), then each
  image is cropped and resized with antialiased bicubic resampling: on CUDA all crops of a
  batch at once (:func:`resized_crops`, two batched products with the weights of torch's
  antialiased ``interpolate``), on a CPU one ``interpolate`` per image. Only JPEGs that nvJPEG
  decodes as torchvision calls it go to the batched decode (see :func:`nvjpeg_decodable`: CMYK,
  12-bit, arithmetic-coded and lossless JPEGs do not); the others, and files the batched decode
  rejects, are decoded one by one (``decode_image``, then PIL); files that still fail are
  replaced in their batch by the batch's first readable image and reported, as in the CPU path.

On CUDA the decoded pixels are not libjpeg-turbo's: torchvision creates nvJPEG with its default
flags, which upsample subsampled chroma (4:2:0, 4:2:2) by repetition where libjpeg-turbo (the CPU
path, through PIL) interpolates. Luma is the same to within the IDCT's rounding; colour edges
differ by a few steps of 255 (measured in docs/performance.md). Crops, flips, resampling and
normalisation are the CPU path's given the same decoded image (tested on CUDA).

Resampled values are clamped to [0, 255] and rounded, like the uint8 images the CPU path's PIL
transform produces, before ``/255`` and the dataset's mean/std.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import Dataset
from torchvision.io import ImageReadMode, decode_image, decode_jpeg

from .data import ArrayImageDataset, pil_rgb
from .loaders import BadImageError, chain_seed

ATTEMPTS = 10  # torchvision RandomResizedCrop.get_params
RATIO = (3 / 4, 4 / 3)
# columns of the uniform draws per image: ATTEMPTS each of area, log-ratio, top, left; one flip
DRAWS = 4 * ATTEMPTS + 1
# frame markers nvJPEG decodes: baseline, extended and progressive Huffman (SOF0-2); the other
# SOFn (lossless, arithmetic-coded, hierarchical) go to the CPU
_SOF_NVJPEG = (0xC0, 0xC1, 0xC2)
_NOT_SOF = (0xC4, 0xC8, 0xCC)  # DHT, JPG extension, DAC share the SOF range


# ---------------------------------------------------------------------------- random parameters
def draw_uniforms(n: int, generator: torch.Generator) -> torch.Tensor:
    """``[n, DRAWS]`` float64 uniforms in [0, 1) from a CPU generator."""
    return torch.rand(n, DRAWS, dtype=torch.float64, generator=generator)


def crop_boxes(
    sizes: torch.Tensor,
    u: torch.Tensor,
    scale: tuple[float, float],
    ratio: tuple[float, float] = RATIO,
) -> torch.Tensor:
    """RandomResizedCrop boxes ``[n, 4]`` (top, left, height, width) for images ``[n, 2]`` (h, w).

    torchvision's ``get_params`` for each row, given its uniform draws ``u[:, :4 * ATTEMPTS]``:
    attempt k takes area ``scale0 + (scale1 - scale0) * u`` of the image and aspect ratio
    ``exp(log_r0 + (log_r1 - log_r0) * u)``, is accepted if the rounded box fits, and is placed
    at ``floor(u * (H - h + 1)), floor(u * (W - w + 1))``; the first accepted attempt wins,
    otherwise the centre crop at the nearest allowed ratio. float64 throughout, as Python's
    arithmetic in ``get_params``; round() is half-to-even in both.
    """
    H, W = sizes[:, :1].double(), sizes[:, 1:2].double()
    u_area, u_ratio, u_top, u_left = u[:, : 4 * ATTEMPTS].double().view(-1, 4, ATTEMPTS).unbind(1)
    log_r = torch.log(torch.tensor(ratio)).double()  # float32 logs, as get_params computes them
    target = H * W * (scale[0] + (scale[1] - scale[0]) * u_area)
    aspect = torch.exp(log_r[0] + (log_r[1] - log_r[0]) * u_ratio)
    w = torch.round(torch.sqrt(target * aspect))
    h = torch.round(torch.sqrt(target / aspect))
    ok = (w > 0) & (w <= W) & (h > 0) & (h <= H)
    top = torch.floor(u_top * (H - h + 1))
    left = torch.floor(u_left * (W - w + 1))
    first = ok.int().argmax(1, keepdim=True)  # index of the first accepted attempt

    def pick(t: torch.Tensor) -> torch.Tensor:
        return t.gather(1, first)[:, 0]

    # fallback: the centre crop at the nearest ratio in range
    in_ratio = W[:, 0] / H[:, 0]
    narrow, wide = in_ratio < min(ratio), in_ratio > max(ratio)
    fw = torch.where(wide, torch.round(H[:, 0] * max(ratio)), W[:, 0])
    fh = torch.where(narrow, torch.round(W[:, 0] / min(ratio)), H[:, 0])
    ftop, fleft = torch.div(H[:, 0] - fh, 2, rounding_mode="floor"), (W[:, 0] - fw) // 2
    found = ok.any(1)
    box = torch.stack(
        [
            torch.where(found, pick(top), ftop),
            torch.where(found, pick(left), fleft),
            torch.where(found, pick(h), fh),
            torch.where(found, pick(w), fw),
        ],
        1,
    )
    return box.long()


def flips(u: torch.Tensor) -> torch.Tensor:
    """Horizontal flips with p = 0.5 from the last column of the draws."""
    return u[:, -1] < 0.5


# ---------------------------------------------------------------------------- geometry
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


# ---------------------------------------------------------------------------- raw datasets
class ArrayImages(Dataset):
    """uint8 ``[1, H, W]`` tensors of an in-memory :class:`~maepl.data.ArrayImageDataset`."""

    def __init__(self, raw: ArrayImageDataset):
        self.images, self.labels = torch.from_numpy(raw.images), raw.labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int | tuple[int, int]) -> tuple[torch.Tensor, int]:
        index = index[1] if isinstance(index, tuple) else index  # (epoch, index) from the sampler
        return self.images[index][None], int(self.labels[index])


def nvjpeg_decodable(data: torch.Tensor | np.ndarray | bytes) -> bool:
    """Whether torchvision's nvJPEG decode gives these bytes' true RGB: a JPEG whose frame header
    says Huffman-coded (baseline, extended or progressive), 8-bit, with 1 or 3 components.

    False for anything else, so that it is decoded on the CPU: CMYK and YCCK JPEGs (4
    components; torchvision does not turn on nvJPEG's CMYK conversion; the ILSVRC-2012 training
    set has 22), 12-bit, lossless and arithmetic-coded JPEGs, other formats, headers that do not
    parse, and files that do not end with the end-of-image marker (truncated ones: the CPU path
    refuses them, and nvJPEG might decode what is there, so they go where the verdict is
    known). Reads only the segment headers up to the frame header (no copy of the file).
    """
    if isinstance(data, torch.Tensor):
        data = data.numpy()
    mv = memoryview(data).cast("B") if not isinstance(data, bytes) else data
    n = len(mv)
    if n < 4 or mv[0] != 0xFF or mv[1] != 0xD8 or mv[n - 2] != 0xFF or mv[n - 1] != 0xD9:
        return False
    pos = 2
    while pos + 4 <= n:
        if mv[pos] != 0xFF:
            return False
        marker = mv[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker == 0x01 or 0xD0 <= marker <= 0xD8:  # markers without a length
            pos += 2
            continue
        if 0xC0 <= marker <= 0xCF and marker not in _NOT_SOF:  # the frame header
            if pos + 10 > n:
                return False
            precision, components = mv[pos + 4], mv[pos + 9]
            return marker in _SOF_NVJPEG and precision == 8 and components in (1, 3)
        if marker in (0xDA, 0xD9):  # scan or end before any frame header
            return False
        pos += 2 + ((mv[pos + 2] << 8) | mv[pos + 3])
    return False


class EncodedBatch:
    """A batch of encoded files, packed: the bytes of all readable files in one uint8 tensor
    ``flat``, ``sizes`` (bytes per file, -1 where a file could not be read), ``paths`` and
    ``nvjpeg`` (per file, :func:`nvjpeg_decodable`: found by the DataLoader worker that packs
    the batch, so that the training process does not parse headers).

    One tensor, so that a DataLoader worker hands the batch over through one shared-memory
    segment: as a list of 256 small tensors (one segment each) the workers delivered 3,306
    img/s on a 16-core H100 machine and ~3,200 on 2 CPU cores; packed, see docs/performance.md.
    A plain object, so that the DataLoader's ``pin_memory`` leaves it alone.
    """

    def __init__(self, data: list[torch.Tensor | None], paths: list[str]):
        self.sizes = [-1 if d is None else d.numel() for d in data]
        self.nvjpeg = [d is not None and nvjpeg_decodable(d) for d in data]
        readable = [d for d in data if d is not None]
        self.flat = torch.cat(readable) if readable else torch.empty(0, dtype=torch.uint8)
        self.paths = paths

    @property
    def data(self) -> list[torch.Tensor | None]:
        """Each file's bytes (a view of ``flat``), None where it could not be read."""
        parts = iter(self.flat.split([n for n in self.sizes if n >= 0]))
        return [None if n < 0 else next(parts) for n in self.sizes]

    def __len__(self) -> int:
        return len(self.sizes)


class EncodedImages(Dataset):
    """The bytes of each file of an ImageFolder as a uint8 tensor, with its label and path.

    A file that cannot be read is ``(None, -1, description)`` as in
    :class:`~maepl.loaders.SeededTransformDataset` (``strict`` raises instead); files that read
    but do not decode are found by :class:`GpuAugment`.
    """

    def __init__(self, samples: Sequence[tuple[str, int]], strict: bool = False):
        self.samples, self.strict = list(samples), strict

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int | tuple[int, int]) -> tuple[torch.Tensor | None, int, str]:
        index = index[1] if isinstance(index, tuple) else index
        path, label = self.samples[index]
        try:
            data = torch.from_numpy(np.frombuffer(Path(path).read_bytes(), np.uint8).copy())
        except OSError as err:
            if self.strict:
                raise BadImageError(f"unreadable image {path}: {err!r} (strict_data)") from err
            return None, -1, f"{path}: {err!r}"
        return data, int(label), str(path)

    @staticmethod
    def collate_fn(batch: list[tuple]) -> tuple[EncodedBatch, torch.Tensor, list[str]]:
        """(EncodedBatch, labels, descriptions of the files that could not be read)."""
        bad = [desc for data, _, desc in batch if data is None]
        if len(bad) == len(batch):
            raise BadImageError("every image of a batch is unreadable:\n  " + "\n  ".join(bad))
        labels = torch.tensor([label for _, label, _ in batch])
        return EncodedBatch([d for d, _, _ in batch], [p for _, _, p in batch]), labels, bad


def raw_dataset(raw: Dataset, strict: bool = False) -> Dataset:
    """What the DataLoader workers hand over under ``--data_pipeline gpu``."""
    if isinstance(raw, ArrayImageDataset):
        return ArrayImages(raw)
    if hasattr(raw, "samples"):  # torchvision ImageFolder
        return EncodedImages(raw.samples, strict)
    raise TypeError(f"data_pipeline gpu: no raw reader for {type(raw).__name__}")


# ---------------------------------------------------------------------------- decoding
def _decode_one(data: torch.Tensor) -> torch.Tensor:
    """One file on the CPU: torchvision's decoders (JPEG, PNG, GIF, WebP), else PIL (BMP,
    TIFF, ...). uint8 RGB ``[3, H, W]``; raises if neither can read it."""
    if data.numel() == 0:
        raise ValueError("empty file")
    try:
        return decode_image(data, mode=ImageReadMode.RGB)
    except RuntimeError as err:
        try:
            img = pil_rgb(Image.open(io.BytesIO(data.numpy().tobytes())))
        except Exception:  # PIL raises OSError, SyntaxError, ValueError, ...
            raise err from None
        return torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1)


def decode_batch(
    data: list[torch.Tensor | None], device: torch.device, nvjpeg: Sequence[bool] | None = None
) -> tuple[list[torch.Tensor | None], dict[int, str]]:
    """Decode to uint8 RGB ``[3, H, W]`` on ``device``; returns the images (None where a file
    does not decode) and the errors by position. The files that ``nvjpeg`` marks (default:
    :func:`nvjpeg_decodable` of each) go through one ``decode_jpeg`` call (batched on CUDA); if
    it raises, each is retried alone; the rest, and what still fails, are decoded on the CPU."""
    out: list[torch.Tensor | None] = [None] * len(data)
    errors: dict[int, str] = {}
    if nvjpeg is None:
        nvjpeg = [d is not None and nvjpeg_decodable(d) for d in data]
    jpegs = [k for k, d in enumerate(data) if d is not None and nvjpeg[k]]
    if jpegs:
        try:
            imgs = decode_jpeg([data[k] for k in jpegs], mode=ImageReadMode.RGB, device=device)
            for k, img in zip(jpegs, imgs, strict=True):
                out[k] = img
        except RuntimeError:
            if device.type != "cpu":  # the CPU retry below decodes the same way
                for k in jpegs:
                    try:
                        out[k] = decode_jpeg(data[k], mode=ImageReadMode.RGB, device=device)
                    except RuntimeError:
                        pass
    for k, d in enumerate(data):
        if out[k] is None and d is not None:
            try:
                out[k] = _decode_one(d).to(device, non_blocking=True)
            except Exception as err:
                errors[k] = repr(err)
    return out, errors


# ---------------------------------------------------------------------------- the augmentation
class GpuAugment:
    """Raw batch -> normalised float ``[n, in_chans, size, size]`` on ``device``.

    ``augment(batch, epoch, index)`` returns the images and the descriptions of the files that
    did not decode (each replaced by the batch's first readable image, as ``collate_skip_bad``
    does). The crops and flips depend only on (seed, rank, epoch, index) and the image sizes.
    """

    def __init__(
        self,
        input_size: int,
        in_chans: int,
        mean: Sequence[float],
        std: Sequence[float],
        crop_min: float,
        seed: int,
        rank: int,
        device: torch.device | str,
        strict: bool = False,
    ):
        if in_chans not in (1, 3) or len(mean) != in_chans or len(std) != in_chans:
            raise ValueError(f"in_chans={in_chans} needs 1 or 3 channels and as many mean/std")
        self.size, self.in_chans, self.scale = input_size, in_chans, (crop_min, 1.0)
        self.seed, self.rank, self.strict = seed, rank, strict
        self.device = torch.device(device)
        # all crops of a batch in a few kernels on CUDA (see _resize); per image on a CPU
        self.batched_resize = self.device.type == "cuda"
        # (x / 255 - mean) / std on [0, 255] values
        self.shift = torch.tensor(mean, device=self.device).view(1, -1, 1, 1) * 255
        self.div = torch.tensor(std, device=self.device).view(1, -1, 1, 1) * 255

    @classmethod
    def from_config(cls, cfg, mean, std, device: torch.device, rank: int) -> GpuAugment:
        if device.type == "cpu" and rank == 0:
            print("note: data_pipeline gpu without an accelerator decodes and crops on the CPU")
        size, chans = cfg.input_size, cfg.in_chans
        return cls(size, chans, mean, std, cfg.crop_min, cfg.seed, rank, device, cfg.strict_data)

    def params(self, sizes: torch.Tensor, epoch: int, index: int):
        """Crop boxes and flips of micro-batch ``index`` of ``epoch`` for images of ``sizes``."""
        gen = torch.Generator().manual_seed(chain_seed(self.seed, self.rank, epoch, index))
        u = draw_uniforms(len(sizes), gen)
        return crop_boxes(sizes, u, self.scale), flips(u)

    def __call__(self, batch, epoch: int, index: int) -> tuple[torch.Tensor, list[str]]:
        if isinstance(batch, EncodedBatch):
            imgs, errors = decode_batch(batch.data, self.device, batch.nvjpeg)
            bad = [f"{batch.paths[k]}: {err}" for k, err in errors.items()]
            if bad and self.strict:
                raise BadImageError(f"unreadable image {bad[0]} (strict_data)")
            x = self._crop_decoded(imgs, epoch, index, bad)
        else:
            x, bad = self._same_size(batch, epoch, index), []
        return self._normalise(x), bad

    def augment_decoded(
        self, imgs: list[torch.Tensor | None], epoch: int, index: int
    ) -> torch.Tensor:
        """What ``__call__`` does to encoded files once they are decoded: uint8 RGB images on
        the device (None where unreadable) -> the normalised batch. For comparing decoders."""
        return self._normalise(self._crop_decoded(imgs, epoch, index, []))

    def _normalise(self, x: torch.Tensor) -> torch.Tensor:
        x = x.clamp_(0, 255).round_()  # the range and steps of the CPU path's uint8 images
        if x.shape[1] != self.in_chans:  # gray -> RGB replicates, as PIL's convert("RGB")
            x = x.expand(-1, self.in_chans, -1, -1)
        return (x - self.shift) / self.div

    def _same_size(self, imgs: torch.Tensor, epoch: int, index: int) -> torch.Tensor:
        n, c, h, w = imgs.shape
        boxes, flip = self.params(torch.tensor([[h, w]]).expand(n, 2), epoch, index)
        x = imgs.to(self.device, non_blocking=True)
        if c == 3 and self.in_chans == 1:
            x = rgb_to_luma(x)
        if max(h, w) <= self.size:  # every crop is upsampled: no antialiasing needed
            return resized_crop_batch(x.float(), boxes, flip, self.size)  # boxes, flip: host
        return self._resize(list(x), boxes, flip, luma=False)

    def _crop_decoded(
        self, imgs: list[torch.Tensor | None], epoch: int, index: int, bad: list[str]
    ) -> torch.Tensor:
        good = [k for k, img in enumerate(imgs) if img is not None]
        if not good:
            raise BadImageError("every image of a batch is unreadable:\n  " + "\n  ".join(bad))
        sizes = torch.tensor([[1, 1] if img is None else list(img.shape[1:]) for img in imgs])
        boxes, flip = self.params(sizes, epoch, index)
        # an unreadable image is replaced by the first readable one: its crop and its flip
        src = [k if img is not None else good[0] for k, img in enumerate(imgs)]
        return self._resize([imgs[k] for k in src], boxes[src], flip[src], self.in_chans == 1)

    def _resize(
        self, imgs: list[torch.Tensor], boxes: torch.Tensor, flip: torch.Tensor, luma: bool
    ) -> torch.Tensor:
        """Each crop resized, then flipped. On CUDA batched (``resized_crops``): per-image
        resizing launched two kernels an image from Python, 7.8 ms of device time a ViT-B step
        on the H100 (session 9); on a CPU per image, which computes far less than the dense
        products."""
        resize = resized_crops if self.batched_resize else resized_crops_one_by_one
        return resize(imgs, boxes, flip, self.size, luma)
