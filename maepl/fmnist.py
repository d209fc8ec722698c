"""Fashion-MNIST from its idx files: the Debian package, torchvision's layout, the sample shipped
in the package (``maepl/assets/fashion_mnist_sample``), held in memory as uint8 arrays."""

from __future__ import annotations

import gzip
import os
import struct
import zlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

FASHION_MNIST_CLASSES: tuple[str, ...] = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)

DEBIAN_FMNIST_DIR = "/usr/share/datasets/fashion-mnist"
# idx type codes -> big-endian numpy dtypes (the format stores everything big-endian).
_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
_GZIP_MAGIC = b"\x1f\x8b"
_FMNIST_STEMS = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "t10k": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def read_idx(path: str | os.PathLike[str]) -> np.ndarray:
    """Read an idx file (gzip-compressed or raw) into a native-endian, writable array.

    Raises:
        ValueError: naming ``path`` if the file is not a valid idx file or is truncated.
    """
    path = Path(path)
    raw = path.read_bytes()
    # Detect compression from the content, not just the name: torchvision's raw/ folder holds
    # both forms and users rename files; a ".gz" name without gzip content is still an error.
    if raw[:2] == _GZIP_MAGIC:
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as err:
            raise ValueError(f"{path}: corrupt gzip data ({err})") from err
    elif path.suffix == ".gz":
        raise ValueError(f"{path}: named .gz but is not gzip-compressed")

    if len(raw) < 4 or raw[:2] != b"\x00\x00" or raw[2] not in _IDX_DTYPES or raw[3] == 0:
        raise ValueError(f"{path}: bad idx magic number {raw[:4].hex() or '(empty file)'}")
    dtype, ndim = np.dtype(_IDX_DTYPES[raw[2]]), raw[3]
    header_len = 4 + 4 * ndim
    if len(raw) < header_len:
        raise ValueError(f"{path}: truncated idx header")
    shape = struct.unpack(f">{ndim}I", raw[4:header_len])
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(raw) - header_len != expected:
        raise ValueError(
            f"{path}: idx header says shape {shape} ({expected} bytes) "
            f"but the file holds {len(raw) - header_len} bytes of data"
        )
    data = np.frombuffer(raw, dtype=dtype, offset=header_len).reshape(shape)
    # astype copies: gives a writable array (torch.from_numpy warns on read-only buffers).
    return data.astype(dtype.newbyteorder("="))


class ArrayImageDataset(Dataset):
    """In-memory grayscale images ``uint8 [N, H, W]`` with ``int64 [N]`` labels.

    Items are ``(PIL.Image mode "L", int)`` like every other dataset here, so the same
    transforms apply to Fashion-MNIST and to ImageFolder data.
    """

    def __init__(
        self,
        images: np.ndarray | torch.Tensor,
        labels: np.ndarray | torch.Tensor | Sequence[int],
        classes: Sequence[str] = FASHION_MNIST_CLASSES,
    ) -> None:
        images = images.numpy() if isinstance(images, torch.Tensor) else np.asarray(images)
        labels = labels.numpy() if isinstance(labels, torch.Tensor) else np.asarray(labels)
        if images.ndim != 3:
            raise ValueError(f"images must have shape [N, H, W], got {images.shape}")
        if labels.shape != (images.shape[0],):
            raise ValueError(f"labels must have shape [{images.shape[0]}], got {labels.shape}")
        self.images = np.ascontiguousarray(images, dtype=np.uint8)
        self.labels = labels.astype(np.int64)
        self.classes = list(classes)
        # A plain list, matching torchvision's ImageFolder.targets.
        self.targets: list[int] = self.labels.tolist()

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[Image.Image, int]:
        # A 2-D uint8 array becomes a mode "L" image.
        return Image.fromarray(self.images[index]), int(self.labels[index])


def _find_idx_file(folder: Path, stem: str) -> Path | None:
    # Prefer the uncompressed file when both exist (torchvision keeps both); it loads faster.
    for name in (stem, stem + ".gz"):
        if (folder / name).is_file():
            return folder / name
    return None


def load_fmnist_split(folder: Path, train: bool) -> ArrayImageDataset:
    img_stem, lbl_stem = _FMNIST_STEMS["train" if train else "t10k"]
    img_path, lbl_path = _find_idx_file(folder, img_stem), _find_idx_file(folder, lbl_stem)
    if img_path is None or lbl_path is None:
        raise FileNotFoundError(f"{folder}: missing {img_stem}[.gz] or {lbl_stem}[.gz]")
    images, labels = read_idx(img_path), read_idx(lbl_path)
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise ValueError(f"{folder}: images {images.shape} and labels {labels.shape} do not match")
    return ArrayImageDataset(images, labels)


def fmnist_candidates(data_path: str | None) -> list[Path]:
    """Folders searched for Fashion-MNIST, in priority order."""
    if data_path:  # only there: another idx dataset with a typo must not become Fashion-MNIST
        return [Path(data_path), Path(data_path) / "FashionMNIST" / "raw"]
    # Read the module global at call time so tests (and users) can redirect it.
    return [Path(DEBIAN_FMNIST_DIR)]


def find_fashion_mnist(data_path: str | None) -> Path | None:
    """Return the first folder holding all four Fashion-MNIST idx files, or ``None``.

    Searched: ``data_path``, then ``data_path/FashionMNIST/raw`` (torchvision's layout); without
    ``data_path``, :data:`DEBIAN_FMNIST_DIR`. Each file may be gzip-compressed or not.
    """
    stems = [stem for pair in _FMNIST_STEMS.values() for stem in pair]
    for folder in fmnist_candidates(data_path):
        if all(_find_idx_file(folder, stem) is not None for stem in stems):
            return folder
    return None
