"""Tests for maepl.data: idx reading, datasets, transforms and seeded augmentation."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from maepl import fmnist
from maepl.config import ConfigError
from maepl.data import build_dataset, build_transform, default_mean_std, load_data
from maepl.fmnist import FASHION_MNIST_CLASSES, ArrayImageDataset, find_fashion_mnist, read_idx
from maepl.loaders import SeededTransformDataset

DEBIAN_TRAIN_IMAGES = Path(fmnist.DEBIAN_FMNIST_DIR) / "train-images-idx3-ubyte.gz"


def write_idx(path: Path, array: np.ndarray, compress: bool) -> None:
    """Minimal idx writer for uint8 arrays, independent of the code under test."""
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim)
    header += struct.pack(f">{array.ndim}I", *array.shape)
    payload = header + array.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(payload, mtime=0) if compress else payload)


def tiny_fmnist(folder: Path, n: int = 6, compress: bool = False) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for split in ("train", "t10k"):
        images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        labels = np.arange(n, dtype=np.uint8) % 10
        ext = ".gz" if compress else ""
        write_idx(folder / f"{split}-images-idx3-ubyte{ext}", images, compress)
        write_idx(folder / f"{split}-labels-idx1-ubyte{ext}", labels, compress)


# ----------------------------------------------------------------------------- read_idx


@pytest.mark.parametrize("compress", [True, False])
def test_read_idx_round_trip(tmp_path: Path, compress: bool) -> None:
    array = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    path = tmp_path / ("a.idx.gz" if compress else "a.idx")
    write_idx(path, array, compress)
    out = read_idx(path)
    assert out.dtype == np.uint8 and out.shape == (2, 3, 4)
    np.testing.assert_array_equal(out, array)
    out[0, 0, 0] = 7  # must be writable (torch.from_numpy warns on read-only arrays)


def test_read_idx_int32(tmp_path: Path) -> None:
    values = np.array([-1, 0, 70000], dtype=">i4")
    path = tmp_path / "ints.idx"
    path.write_bytes(struct.pack(">BBBBI", 0, 0, 0x0C, 1, 3) + values.tobytes())
    np.testing.assert_array_equal(read_idx(path), [-1, 0, 70000])


def test_read_idx_bad_magic_names_path(tmp_path: Path) -> None:
    path = tmp_path / "bad.idx"
    path.write_bytes(b"\x12\x34\x08\x01" + struct.pack(">I", 1) + b"\x00")
    with pytest.raises(ValueError, match=r"bad\.idx"):
        read_idx(path)


def test_read_idx_wrong_size_names_path(tmp_path: Path) -> None:
    path = tmp_path / "short.idx.gz"
    array = np.zeros((4, 5), dtype=np.uint8)
    payload = struct.pack(">BBBB", 0, 0, 0x08, 2) + struct.pack(">2I", 4, 5) + array.tobytes()
    path.write_bytes(gzip.compress(payload[:-3]))
    with pytest.raises(ValueError, match=r"short\.idx\.gz"):
        read_idx(path)


# ----------------------------------------------------------------------------- datasets


@pytest.fixture(scope="module")
def sample_train() -> ArrayImageDataset:
    ds = build_dataset("sample", None, train=True)
    assert isinstance(ds, ArrayImageDataset)
    return ds


def test_sample_dataset_counts(sample_train: ArrayImageDataset) -> None:
    test = build_dataset("sample", "/ignored/path", train=False)
    assert len(sample_train) == 10_000 and len(test) == 2_000
    assert sample_train.images.shape == (10_000, 28, 28)
    assert np.bincount(sample_train.targets, minlength=10).tolist() == [1000] * 10
    assert np.bincount(test.targets, minlength=10).tolist() == [200] * 10
    assert sample_train.classes == list(FASHION_MNIST_CLASSES)
    img, label = test[0]
    assert isinstance(img, Image.Image) and img.mode == "L" and img.size == (28, 28)
    assert isinstance(label, int)


def test_sample_starts_with_fashion_mnists_first_training_images(sample_train) -> None:
    """Runs without the Debian files: the digest of Fashion-MNIST's first four training images
    (train-images-idx3-ubyte.gz, pixels after the 16-byte header; labels 9, 0, 0, 3)."""
    import hashlib

    pixels = np.stack([np.asarray(sample_train[i][0]) for i in range(4)]).tobytes()
    digest = "f320432bdc7b92ff96201b44977275600afde76be08ab27476c01c33f16ca593"
    assert hashlib.sha256(pixels).hexdigest() == digest
    assert [sample_train[i][1] for i in range(4)] == [9, 0, 0, 3]


@pytest.mark.skipif(not DEBIAN_TRAIN_IMAGES.exists(), reason="Debian Fashion-MNIST not installed")
def test_sample_first_image_matches_debian(sample_train: ArrayImageDataset) -> None:
    with gzip.open(DEBIAN_TRAIN_IMAGES, "rb") as f:
        f.read(16)  # idx3 header: magic + 3 dimensions
        first = np.frombuffer(f.read(28 * 28), dtype=np.uint8).reshape(28, 28)
    np.testing.assert_array_equal(np.asarray(sample_train[0][0]), first)


def test_fashion_mnist_torchvision_layout(tmp_path: Path) -> None:
    tiny_fmnist(tmp_path / "FashionMNIST" / "raw", compress=True)
    assert find_fashion_mnist(str(tmp_path)) == tmp_path / "FashionMNIST" / "raw"
    ds = build_dataset("fashion-mnist", str(tmp_path), train=False)
    assert len(ds) == 6 and ds[3][1] == 3


def test_fashion_mnist_missing_mentions_download(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(fmnist, "DEBIAN_FMNIST_DIR", str(tmp_path / "no-debian"))
    assert find_fashion_mnist(None) is None
    with pytest.raises(FileNotFoundError) as info:
        build_dataset("fashion-mnist", None, train=True)
    msg = str(info.value)
    assert "--download" in msg and "apt-get install dataset-fashion-mnist" in msg
    assert "no-debian" in msg


def test_a_data_path_without_the_files_does_not_fall_back_to_the_system_copy(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # a mistyped data_path (other idx data: MNIST, KMNIST) must not silently become Fashion-MNIST
    tiny_fmnist(tmp_path / "system", compress=True)
    monkeypatch.setattr(fmnist, "DEBIAN_FMNIST_DIR", str(tmp_path / "system"))
    assert find_fashion_mnist(None) == tmp_path / "system"
    assert find_fashion_mnist(str(tmp_path / "typo")) is None
    with pytest.raises(FileNotFoundError) as info:
        build_dataset("fashion-mnist", str(tmp_path / "typo"), train=True)
    msg = str(info.value)
    assert str(tmp_path / "typo" / "FashionMNIST" / "raw") in msg and "system" not in msg


def test_unknown_dataset() -> None:
    with pytest.raises(ValueError, match="imagefolder"):
        build_dataset("cifar", None, train=True)


def make_tree(root: Path) -> None:
    """Two classes: grayscale PNG; RGB JPEG, palette PNG and CMYK JPEG."""
    for split in ("train", "val"):
        (root / split / "cat").mkdir(parents=True)
        (root / split / "dog").mkdir(parents=True)
        Image.new("L", (20, 12), 100).save(root / split / "cat" / "gray.png")
        Image.new("RGB", (16, 16), (200, 10, 30)).save(root / split / "dog" / "rgb.jpg")
        Image.new("P", (8, 8), 3).save(root / split / "dog" / "palette.png")
        Image.new("CMYK", (10, 10), (0, 0, 0, 0)).save(root / split / "dog" / "cmyk.jpg")


def test_imagefolder_reads_tree(tmp_path: Path) -> None:
    make_tree(tmp_path)
    transform = build_transform(False, 16, 3, *default_mean_std("imagefolder", 3))
    for train in (True, False):
        ds = build_dataset("imagefolder", str(tmp_path), train=train)
        assert len(ds) == 4 and ds.classes == ["cat", "dog"]
        for i in range(len(ds)):
            img, label = ds[i]
            assert img.mode == "RGB"
            assert transform(img).shape == (3, 16, 16)
        gray, label = ds[0]
        assert label == 0 and gray.getpixel((0, 0)) == (100, 100, 100)


def test_imagefolder_flat_train_but_no_val(tmp_path: Path) -> None:
    make_tree(tmp_path)
    flat = tmp_path / "train"
    assert len(build_dataset("imagefolder", str(flat), train=True)) == 4
    with pytest.raises(FileNotFoundError, match=r"imagefolder needs the folder .*train[/\\]val'"):
        build_dataset("imagefolder", str(flat), train=False)
    (tmp_path / "train").rename(tmp_path / "elsewhere")  # val/ alone: "val" is no class
    with pytest.raises(FileNotFoundError, match=r"imagefolder needs the folder .*[/\\]train'"):
        build_dataset("imagefolder", str(tmp_path), train=True)


def test_imagefolder_missing_and_empty(tmp_path: Path) -> None:
    missing = tmp_path / "does-not-exist"
    with pytest.raises(FileNotFoundError) as info:
        build_dataset("imagefolder", str(missing), train=True)
    assert str(missing) in str(info.value) and "data_path" in str(info.value)
    with pytest.raises(FileNotFoundError, match="data_path"):
        build_dataset("imagefolder", None, train=True)
    (tmp_path / "empty" / "train" / "cls").mkdir(parents=True)
    with pytest.raises(ValueError, match=r"imagefolder: no images found under .*empty"):
        build_dataset("imagefolder", str(tmp_path / "empty"), train=True)


def test_load_splits_refuses_train_and_val_with_other_classes(tmp_path: Path) -> None:
    from maepl.data import load_splits

    make_tree(tmp_path)
    cfg = SimpleNamespace(
        dataset="imagefolder", data_path=str(tmp_path), download=False, in_chans=3, mean=None,
        std=None,
    )  # fmt: skip
    train, val, _, _ = load_splits(cfg)
    assert train.classes == val.classes == ["cat", "dog"]
    (tmp_path / "val" / "dog").rename(tmp_path / "val" / "eel")  # same count, other class
    with pytest.raises(ConfigError) as info:
        load_splits(cfg)
    message = str(info.value)
    assert message.startswith("data_path: ")
    assert str(tmp_path / "train") in message and str(tmp_path / "val") in message
    assert "['dog']" in message and "['eel']" in message


# ----------------------------------------------------------------------------- transforms


def test_default_mean_std() -> None:
    assert default_mean_std("imagefolder", 3) == ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    assert default_mean_std("sample", 1) == ((0.2860,), (0.3530,))
    assert default_mean_std("fashion-mnist", 3) == ((0.2860,) * 3, (0.3530,) * 3)
    with pytest.raises(ValueError, match="in_chans"):
        default_mean_std("sample", 2)


@pytest.mark.parametrize("train", [True, False])
@pytest.mark.parametrize("in_chans", [1, 3])
def test_transform_shape_and_constant_mean(train: bool, in_chans: int) -> None:
    mean, std = default_mean_std("fashion-mnist", in_chans)
    transform = build_transform(train, 32, in_chans, mean, std)
    for mode, fill in (("L", 128), ("RGB", (128, 128, 128))):
        out = transform(Image.new(mode, (28, 28), fill))
        assert out.dtype == torch.float32 and out.shape == (in_chans, 32, 32)
        expected = (128 / 255 - 0.2860) / 0.3530
        # Bicubic resampling of a constant image may be off by one grey level at most.
        assert abs(out.mean().item() - expected) < 1.5 / 255 / 0.3530


def test_eval_transform_is_identity_at_input_size() -> None:
    pixels = np.random.default_rng(1).integers(0, 256, size=(28, 28), dtype=np.uint8)
    out = build_transform(False, 28, 1, (0.0,), (1.0,))(Image.fromarray(pixels))
    torch.testing.assert_close(out[0], torch.from_numpy(pixels).float() / 255)


def test_transform_rejects_bad_in_chans() -> None:
    with pytest.raises(ValueError, match="in_chans"):
        build_transform(True, 32, 2, (0.5, 0.5), (0.5, 0.5))


def test_torchvision_transforms_use_global_torch_rng() -> None:
    """The premise of SeededTransformDataset: seeding torch fixes a v1 transform's output."""
    transform = build_transform(True, 28, 1, (0.0,), (1.0,), scale=(0.05, 1.0))
    img = Image.fromarray(np.random.default_rng(2).integers(0, 256, (28, 28), dtype=np.uint8))
    torch.manual_seed(5)
    a = transform(img)
    torch.manual_seed(5)
    b = transform(img)
    torch.manual_seed(6)
    c = transform(img)
    assert torch.equal(a, b) and not torch.equal(a, c)


# ----------------------------------------------------------------------------- seeding


@pytest.fixture(scope="module")
def small_base() -> ArrayImageDataset:
    rng = np.random.default_rng(3)
    images = rng.integers(0, 256, size=(24, 28, 28), dtype=np.uint8)
    return ArrayImageDataset(images, np.arange(24) % 10)


def seeded(base: ArrayImageDataset, seed: int = 0) -> SeededTransformDataset:
    transform = build_transform(True, 28, 1, (0.5,), (0.5,), scale=(0.05, 1.0))
    return SeededTransformDataset(base, transform, seed=seed)


def test_seeded_same_key_same_tensor(small_base: ArrayImageDataset) -> None:
    a, b = seeded(small_base), seeded(small_base)
    a.set_epoch(3)
    b.set_epoch(3)
    for i in (0, 5, 23):
        assert torch.equal(a[i][0], b[i][0]) and a[i][1] == small_base.targets[i]
    b.set_epoch(4)
    assert not torch.equal(a[5][0], b[5][0])
    assert not torch.equal(a[5][0], seeded(small_base, seed=1)[5][0])


def test_seeded_leaves_global_rng_untouched(small_base: ArrayImageDataset) -> None:
    import random

    ds = seeded(small_base)
    torch.manual_seed(123)
    random.seed(5)
    np.random.seed(6)
    before = torch.get_rng_state(), random.getstate(), np.random.get_state()[1].copy()
    ds[0]
    batch = ds.__getitems__([1, 2, 3])  # what a DataLoader with num_workers=0 calls
    assert torch.equal(torch.get_rng_state(), before[0]) and random.getstate() == before[1]
    assert np.array_equal(np.random.get_state()[1], before[2])
    # a batch is the items one by one: each image keeps its own seed
    for i, (x, y) in zip((1, 2, 3), batch, strict=True):
        assert torch.equal(x, ds[i][0]) and y == ds[i][1]


def test_seeded_batches_independent_of_workers(small_base: ArrayImageDataset) -> None:
    def batches(num_workers: int) -> list[torch.Tensor]:
        ds = seeded(small_base, seed=7)
        ds.set_epoch(2)
        loader = DataLoader(ds, batch_size=5, shuffle=False, num_workers=num_workers)
        return [x for x, _ in loader]

    single, multi = batches(0), batches(2)
    assert len(single) == len(multi) == 5
    for x, y in zip(single, multi, strict=True):
        assert torch.equal(x, y)


def _epoch_batches(num_workers: int) -> list[torch.Tensor]:
    from maepl.loaders import ShardedSampler

    base = ArrayImageDataset(
        np.random.default_rng(0).integers(0, 255, (24, 12, 12), dtype=np.uint8), np.arange(24) % 3
    )
    tf = build_transform(True, 8, 1, (0.5,), (0.5,))
    ds = SeededTransformDataset(base, tf, seed=3)
    sampler = ShardedSampler(len(ds), seed=3, with_epoch=True)
    loader = torch.utils.data.DataLoader(
        ds,
        batch_size=6,
        sampler=sampler,
        num_workers=num_workers,
        persistent_workers=num_workers > 0,
    )
    out = []
    for epoch in range(2):
        sampler.set_epoch(epoch)
        out.append(torch.cat([x for x, _ in loader]))
    return out


def test_persistent_workers_see_each_epoch():
    single, workers = _epoch_batches(0), _epoch_batches(2)
    assert not torch.equal(single[0], single[1])  # epochs differ
    for a, b in zip(single, workers, strict=True):
        assert torch.equal(a, b)


def test_sharded_sampler_partitions_and_resumes():
    from maepl.loaders import ShardedSampler

    shards = [ShardedSampler(10, num_replicas=3, rank=r, seed=1) for r in range(3)]
    for s in shards:
        s.set_epoch(4)
    seen = [list(s) for s in shards]
    assert all(len(x) == 3 for x in seen)  # 10 // 3 each, tail dropped
    assert len(set(sum(seen, []))) == 9  # disjoint
    resumed = ShardedSampler(10, num_replicas=3, rank=1, seed=1)
    resumed.set_epoch(4, start=2)
    assert list(resumed) == seen[1][2:] and len(resumed) == 1
    shards[0].set_epoch(5)
    assert list(shards[0]) != seen[0]  # a new permutation each epoch


def test_one_mean_value_is_repeated_without_touching_std() -> None:
    cfg = SimpleNamespace(dataset="sample", data_path=None, download=False, in_chans=3)
    cfg.mean, cfg.std = [0.5], None
    raw, mean, std = load_data(cfg)
    assert mean == [0.5] * 3 and std == [0.3530] * 3  # the default std, once per channel
    assert build_transform(False, 28, 3, mean, std)(raw[0][0]).shape == (3, 28, 28)
    cfg.mean, cfg.std = None, [0.25]
    assert load_data(cfg)[1:] == ([0.2860] * 3, [0.25] * 3)


@pytest.mark.parametrize("key", ["mean", "std"])
def test_mean_or_std_of_another_length_names_the_key(key: str) -> None:
    cfg = SimpleNamespace(dataset="sample", data_path=None, download=False, in_chans=3)
    cfg.mean, cfg.std = None, None
    setattr(cfg, key, [0.5, 0.5])
    with pytest.raises(ConfigError, match=rf"^{key}: needs 1 or 3 values"):
        load_data(cfg)
