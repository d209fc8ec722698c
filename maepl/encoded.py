"""What DataLoader workers hand over under ``--data_pipeline gpu``, and its decoding.

Workers read raw images only: the uint8 arrays of Fashion-MNIST (:class:`ArrayImages`) or the
file bytes of an ImageFolder, packed per batch (:class:`EncodedImages`, :class:`EncodedBatch`).
:func:`decode_batch` decodes files on the device: JPEGs that nvJPEG reads correctly
(:func:`nvjpeg_decodable`) in one batched ``decode_jpeg``, the rest on the CPU.
"""

from __future__ import annotations

import functools
import io
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision.io import ImageReadMode, decode_image, decode_jpeg

from .data import pil_rgb
from .fmnist import ArrayImageDataset
from .loaders import BadImageError

# frame markers nvJPEG decodes: baseline, extended and progressive Huffman (SOF0-2); the other
# SOFn (lossless, arithmetic-coded, hierarchical) go to the CPU
_SOF_NVJPEG = (0xC0, 0xC1, 0xC2)
_NOT_SOF = (0xC4, 0xC8, 0xCC)  # DHT, JPG extension, DAC share the SOF range


class ArrayImages(Dataset):
    """uint8 ``[1, H, W]`` tensors of an in-memory :class:`~maepl.fmnist.ArrayImageDataset`."""

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


@functools.cache
def _decode_stream(device: torch.device) -> torch.cuda.Stream:
    return torch.cuda.Stream(device)


def _decode_jpegs(data: list[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
    """``decode_jpeg`` on ``device``. On CUDA, torchvision allocates the outputs on the current
    stream, but nvJPEG writes them on a stream of its own that does not wait for the current
    one (pytorch/vision PR #9606, closed unmerged: 199 of 200 runs corrupted on an H100). Memory
    that the caller's stream freed with reads still queued (the previous batch's images and
    canvases) could be handed to the decode and overwritten under those reads. So the decode
    runs with a stream of its own current, which has no work queued: its outputs come from that
    stream's pool, the caller's stream waits for them, and ``record_stream`` keeps each output
    from being reused before the caller's work on it is done. No host sync."""
    if device.type != "cuda":
        return decode_jpeg(data, mode=ImageReadMode.RGB, device=device)
    if device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    caller = torch.cuda.current_stream(device)
    side = _decode_stream(device)
    with torch.cuda.stream(side):
        imgs = decode_jpeg(data, mode=ImageReadMode.RGB, device=device)
    caller.wait_stream(side)
    for img in imgs:
        img.record_stream(caller)
    return imgs


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
            imgs = _decode_jpegs([data[k] for k in jpegs], device)
            for k, img in zip(jpegs, imgs, strict=True):
                out[k] = img
        except RuntimeError:
            if device.type != "cpu":  # the CPU retry below decodes the same way
                for k in jpegs:
                    try:
                        out[k] = _decode_jpegs([data[k]], device)[0]
                    except RuntimeError:
                        pass
    for k, d in enumerate(data):
        if out[k] is None and d is not None:
            try:
                out[k] = _decode_one(d).to(device, non_blocking=True)
            except Exception as err:
                errors[k] = repr(err)
    return out, errors
