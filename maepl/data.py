"""Datasets and transforms for MAE pretraining and evaluation.

Three dataset sources are supported, all yielding ``(PIL.Image, int)`` pairs:

- ``sample``: a 12,000-image Fashion-MNIST subset shipped inside the package (offline tests).
- ``fashion-mnist``: the full Fashion-MNIST idx files (Debian package, torchvision layout, or
  a download through torchvision).
- ``imagefolder``: any ``ImageFolder`` tree, with ``train/`` and ``val/`` subfolders.

Seeding, sharding and bad-image handling for the DataLoaders live in ``maepl.loaders``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision import datasets, transforms
from torchvision.transforms import InterpolationMode

from .fmnist import ArrayImageDataset, find_fashion_mnist, fmnist_candidates, load_fmnist_split

Transform = Callable[[Image.Image], torch.Tensor]

SAMPLE_DIR = Path(__file__).parent / "assets" / "fashion_mnist_sample"

DATASET_NAMES = ("sample", "fashion-mnist", "imagefolder")

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
FASHION_MNIST_MEAN = (0.2860,)
FASHION_MNIST_STD = (0.3530,)


def pil_rgb_loader(path: str) -> Image.Image:
    """Open an image file with PIL and return it as 3-channel RGB.

    Kept as a module-level function (not a lambda) so datasets stay picklable for
    DataLoader workers started with "spawn".
    """
    with open(path, "rb") as f:
        return pil_rgb(Image.open(f))


def pil_rgb(img: Image.Image) -> Image.Image:
    """``img`` as RGB, decoded (call it while the file is still open)."""
    # Palette images with transparency warn when converted straight to RGB; go via RGBA.
    if img.mode in ("P", "PA") and "transparency" in img.info:
        img = img.convert("RGBA")
    # convert() also forces the lazy decode.
    return img.convert("RGB")


def _build_imagefolder(data_path: str | None, train: bool) -> datasets.ImageFolder:
    if not data_path:
        raise FileNotFoundError(
            "the imagefolder dataset needs data_path (a folder with train/ and val/ subfolders "
            f"of class folders); got data_path={data_path!r}"
        )
    base = Path(data_path)
    if not base.is_dir():
        raise FileNotFoundError(f"data_path {str(base)!r} does not exist or is not a folder")
    root = base / ("train" if train else "val")
    if not root.is_dir():
        # A flat tree of class folders is accepted for training (pretraining needs no val/),
        # but not when val/ exists: "val" would silently become a class.
        if not train or (base / "val").is_dir():
            raise FileNotFoundError(
                f"imagefolder needs the folder {str(root)!r} (data_path={str(base)!r})"
            )
        root = base
    try:
        return datasets.ImageFolder(str(root), loader=pil_rgb_loader)
    except FileNotFoundError as err:
        # torchvision raises FileNotFoundError for "no class folders" / "no valid images";
        # root exists, so this is an empty tree and deserves a ValueError naming it.
        raise ValueError(f"imagefolder: no images found under {str(root)!r}: {err}") from err


def build_dataset(name: str, data_path: str | None, train: bool, download: bool = False) -> Dataset:
    """Build the train (``train=True``) or evaluation split of dataset ``name``.

    ``name`` is one of ``"sample"``, ``"fashion-mnist"``, ``"imagefolder"``. Every dataset
    yields ``(PIL.Image, int)``; the transform decides the final number of channels.
    """
    if name == "sample":
        return load_fmnist_split(SAMPLE_DIR, train)
    if name == "fashion-mnist":
        folder = find_fashion_mnist(data_path)
        if folder is not None:
            return load_fmnist_split(folder, train)
        if download:
            tv = datasets.FashionMNIST(root=data_path or "./data", train=train, download=True)
            return ArrayImageDataset(tv.data, tv.targets, tv.classes)
        tried = "\n  ".join(str(p) for p in fmnist_candidates(data_path))
        raise FileNotFoundError(
            "Fashion-MNIST idx files (train-images-idx3-ubyte[.gz] and the 3 others) not found; "
            f"tried:\n  {tried}\n"
            "Install them with `apt-get install dataset-fashion-mnist`, point data_path at a "
            "folder holding them, or pass --download to fetch them with torchvision."
        )
    if name == "imagefolder":
        return _build_imagefolder(data_path, train)
    raise ValueError(f"unknown dataset {name!r}; expected one of {DATASET_NAMES}")


def _check_in_chans(in_chans: int) -> None:
    if in_chans not in (1, 3):
        raise ValueError(f"in_chans must be 1 or 3, got in_chans={in_chans}")


def default_mean_std(dataset: str, in_chans: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel normalisation statistics for ``dataset`` with ``in_chans`` channels."""
    _check_in_chans(in_chans)
    if dataset == "imagefolder":
        if in_chans == 3:
            return IMAGENET_MEAN, IMAGENET_STD
        # Grayscale ImageNet-like data: average the RGB statistics (an approximation).
        return (sum(IMAGENET_MEAN) / 3,), (sum(IMAGENET_STD) / 3,)
    if dataset in ("sample", "fashion-mnist"):
        # A grayscale image replicated to RGB has the same statistics in every channel.
        return FASHION_MNIST_MEAN * in_chans, FASHION_MNIST_STD * in_chans
    raise ValueError(f"unknown dataset {dataset!r}; expected one of {DATASET_NAMES}")


class _ConvertMode:
    """Picklable ``img.convert(mode)`` (a lambda would break "spawn" DataLoader workers)."""

    def __init__(self, mode: str) -> None:
        self.mode = mode

    def __call__(self, img: Image.Image) -> Image.Image:
        return img if img.mode == self.mode else img.convert(self.mode)

    def __repr__(self) -> str:  # shown when the transform pipeline is logged
        return f"_ConvertMode({self.mode!r})"


def build_transform(
    train: bool,
    input_size: int,
    in_chans: int,
    mean: Sequence[float],
    std: Sequence[float],
    scale: tuple[float, float] = (0.2, 1.0),
    crop_pct: float = 1.0,
) -> Transform:
    """PIL image -> normalised float tensor ``[in_chans, input_size, input_size]``.

    Training uses the MAE pretraining recipe (random resized crop + horizontal flip);
    evaluation resizes the short side to ``input_size / crop_pct`` and centre-crops (MAE's
    evaluation uses crop_pct 0.875 at 224 px; 1.0 is the identity at ``input_size``).
    """
    _check_in_chans(in_chans)
    if len(mean) != in_chans or len(std) != in_chans:
        raise ValueError(
            f"mean/std need {in_chans} values for in_chans={in_chans}, got {mean} / {std}"
        )
    bicubic = InterpolationMode.BICUBIC
    if train:
        geometry: list[Any] = [
            transforms.RandomResizedCrop(input_size, scale=scale, interpolation=bicubic),
            transforms.RandomHorizontalFlip(),
        ]
    else:
        geometry = [
            transforms.Resize(int(input_size / crop_pct), interpolation=bicubic),
            transforms.CenterCrop(input_size),
        ]
    convert = _ConvertMode("L" if in_chans == 1 else "RGB")
    to_tensor = [transforms.ToTensor(), transforms.Normalize(tuple(mean), tuple(std))]
    return transforms.Compose([convert, *geometry, *to_tensor])


def _posterize(img: Image.Image, bits_to_keep: int, **_: Any) -> Image.Image:
    # timm's RandAugment asks for 0 bits at the top magnitudes of PosterizeIncreasing; Pillow
    # >= 11 rejects bits outside 1-8 where older Pillow returned a black image. Keep that.
    if bits_to_keep >= 8:
        return img
    if bits_to_keep <= 0:
        return Image.new(img.mode, img.size)
    from PIL import ImageOps

    return ImageOps.posterize(img, bits_to_keep)


def default_crop_pct(input_size: int) -> float:
    """Evaluation crop: MAE's 224/256 up to 224 px and 1.0 above (its main_finetune.py); 1.0
    for images of 32 px or less too, whose borders hold the object (Fashion-MNIST's 28 px)."""
    return 0.875 if 32 < input_size <= 224 else 1.0


def build_finetune_transform(
    input_size: int,
    in_chans: int,
    mean: Sequence[float],
    std: Sequence[float],
    aa: str | None,
    reprob: float,
    remode: str,
    recount: int,
    color_jitter: float | None = None,
) -> Transform:
    """MAE's fine-tuning augmentation through timm: random resized crop (0.08-1, bicubic),
    flip, RandAugment ``aa``, random erasing ``reprob``; colour jitter only if ``color_jitter``
    is set and ``aa`` is not (timm's default would add 0.4 whenever ``aa`` is null)."""
    import timm.data.auto_augment as timm_aa
    from timm.data import create_transform

    for name in ("Posterize", "PosterizeIncreasing", "PosterizeOriginal"):
        timm_aa.NAME_TO_OP[name] = _posterize  # see _posterize; forked workers inherit it
    _check_in_chans(in_chans)
    tf = create_transform(
        input_size,
        is_training=True,
        auto_augment=aa,
        color_jitter=color_jitter,
        interpolation="bicubic",
        re_prob=reprob,
        re_mode=remode,
        re_count=recount,
        mean=tuple(mean),
        std=tuple(std),
    )
    return transforms.Compose([_ConvertMode("L" if in_chans == 1 else "RGB"), tf])


def load_data(cfg, train: bool = True) -> tuple[Dataset, list[float], list[float]]:
    """The raw split named by a run config, with its normalisation (one value per channel).

    Data errors become ``ConfigError`` naming ``data_path``, raised before any process group.
    """
    from .config import ConfigError

    try:
        raw = build_dataset(cfg.dataset, cfg.data_path, train=train, download=cfg.download)
    except (FileNotFoundError, ValueError) as e:
        raise ConfigError(f"data_path: {e}") from None
    if len(raw) == 0:
        raise ConfigError(f"data_path: dataset {cfg.dataset} at {cfg.data_path} is empty")
    mean, std = default_mean_std(cfg.dataset, cfg.in_chans)
    return raw, _per_channel(cfg, "mean", mean), _per_channel(cfg, "std", std)


def _per_channel(cfg, key: str, default: Sequence[float]) -> list[float]:
    """``cfg.<key>`` (else ``default``) with one value per channel: a single value is
    repeated; any other length than 1 or in_chans is a ConfigError naming ``key``."""
    from .config import ConfigError

    values = list(getattr(cfg, key) or default)
    if len(values) == 1:
        values *= cfg.in_chans
    if len(values) != cfg.in_chans:
        raise ConfigError(
            f"{key}: needs 1 or {cfg.in_chans} values (in_chans={cfg.in_chans}), got {values}"
        )
    return values


def load_splits(cfg) -> tuple[Dataset, Dataset, list[float], list[float]]:
    """The train and evaluation splits named by a run config, with their normalisation.

    Labels are class indices, so both splits must have the same classes in the same order:
    an ImageFolder ``val/`` without one of ``train/``'s class folders, or with another, would
    shift every label after it. That is a ``ConfigError`` naming the folders that differ; so
    is a ``nb_classes`` below the classes' count (labels past the head would fail in a step).
    """
    from .config import ConfigError

    raw_train, mean, std = load_data(cfg, train=True)
    raw_val, _, _ = load_data(cfg, train=False)
    train_classes, val_classes = list(raw_train.classes), list(raw_val.classes)
    if train_classes != val_classes:
        where = [getattr(raw, "root", cfg.data_path) for raw in (raw_train, raw_val)]
        only_train = sorted(set(train_classes) - set(val_classes))
        only_val = sorted(set(val_classes) - set(train_classes))
        raise ConfigError(
            f"data_path: the class folders of {where[0]} and {where[1]} differ, so their "
            f"labels (class indices) would not match: only in the first {only_train}, only "
            f"in the second {only_val}"
            + ("" if only_train or only_val else " (same names in another order)")
        )
    nb_classes = getattr(cfg, "nb_classes", None)  # a config of finetune.py or linprobe.py
    if nb_classes and nb_classes < len(train_classes):
        raise ConfigError(
            f"nb_classes: {nb_classes}, but {cfg.dataset} has {len(train_classes)} classes"
        )
    return raw_train, raw_val, mean, std


def load_train_data(cfg) -> tuple[Dataset, list[float], list[float]]:
    return load_data(cfg, train=True)


def readable_images(raw: Dataset, n: int) -> list[Image.Image]:
    """The first ``n`` images of ``raw`` that decode (for reconstruction grids)."""
    out = []
    for i in range(min(len(raw), 10 * n)):
        try:
            out.append(raw[i][0])
        except Exception:  # unreadable files are counted by the training loop, not here
            continue
        if len(out) == n:
            break
    return out
