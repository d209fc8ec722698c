"""``--data_pipeline gpu`` (maepl/gpu_aug.py, resample.py, encoded.py): crop parameters,
resampling, decoding, bad images, pretraining end to end. Runs on the CPU; the CUDA checks at the
end skip without a GPU."""

from __future__ import annotations

import io
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision.transforms.transforms as tv_transforms
import torchvision.transforms.v2.functional as TF
from PIL import Image
from safetensors.torch import load_file
from torch.utils.data import DataLoader
from torchvision.io import ImageReadMode, decode_image

import pretrain
from maepl.config import ConfigError, PretrainConfig, parse_config
from maepl.data import build_dataset, build_transform
from maepl.encoded import EncodedBatch, EncodedImages, decode_batch, nvjpeg_decodable, raw_dataset
from maepl.gpu_aug import ATTEMPTS, RATIO, GpuAugment, crop_boxes, draw_uniforms, flips
from maepl.loaders import BadImageError, SeededTransformDataset
from maepl.resample import resized_crop_batch, resized_crop_one, resized_crops

from .conftest import ROOT
from .test_reliability import TINY, make_messy_folder

# torchvision 0.29 deprecates its image decoders in favour of TorchCodec (docs/pretrain.md)
pytestmark = pytest.mark.filterwarnings("ignore:The image decoding:DeprecationWarning")

BICUBIC = TF.InterpolationMode.BICUBIC


# ---------------------------------------------------------------------------- crop parameters
class FeedDraws:
    """Stands in for ``torch`` inside torchvision's ``get_params`` and feeds it given uniforms
    (one column of ``u`` per attempt: area, log-ratio, top, left), mapped to values exactly as
    ``crop_boxes`` maps them."""

    def __init__(self, u: torch.Tensor):
        self.u, self.calls, self.randints = u, 0, 0
        self.log, self.tensor, self.exp = torch.log, torch.tensor, torch.exp

    def empty(self, *size):
        return self

    def uniform_(self, low, high):
        row, attempt = self.calls % 2, self.calls // 2
        self.calls += 1
        u = float(self.u[row, attempt])
        return torch.tensor([float(low) + (float(high) - float(low)) * u], dtype=torch.float64)

    def randint(self, low, high, size):
        u = float(self.u[2 + self.randints, self.calls // 2 - 1])
        self.randints += 1
        return torch.tensor([low + math.floor(u * (high - low))])


@pytest.mark.parametrize("scale", [(0.2, 1.0), (0.08, 1.0), (0.9, 1.0)])
def test_the_same_draws_give_torchvisions_boxes(monkeypatch, scale):
    g = torch.Generator().manual_seed(0)
    n = 1500
    sizes = torch.randint(1, 400, (n, 2), generator=g)
    sizes[:200, 1] = sizes[:200, 0] * 5  # very wide and very narrow: the fallback
    sizes[200:400, 0] = sizes[200:400, 1] * 5
    sizes[400:500] = torch.tensor([375, 500])
    u = draw_uniforms(n, g)
    boxes = crop_boxes(sizes, u, scale)
    fallbacks = 0
    for k in range(n):
        feed = FeedDraws(u[k, : 4 * ATTEMPTS].view(4, ATTEMPTS))
        monkeypatch.setattr(tv_transforms, "torch", feed)
        h, w = sizes[k].tolist()
        ref = tv_transforms.RandomResizedCrop.get_params(torch.empty(1, h, w), scale, RATIO)
        monkeypatch.undo()
        fallbacks += feed.randints == 0
        assert tuple(boxes[k].tolist()) == ref, (k, h, w)
    assert fallbacks > 100  # both branches were exercised


def test_crop_and_flip_statistics_follow_torchvision():
    n, (h, w), crop_min = 20000, (375, 500), 0.2
    u = draw_uniforms(n, torch.Generator().manual_seed(1))
    top, left, bh, bw = crop_boxes(torch.tensor([[h, w]]).expand(n, 2), u, (crop_min, 1.0)).T
    area = (bh * bw).double() / (h * w)
    aspect = bw.double() / bh
    assert (
        (top >= 0).all() and (left >= 0).all() and (top + bh <= h).all() and (left + bw <= w).all()
    )
    assert area.min() >= crop_min - 0.005 and area.max() <= 1  # rounding of the box sides
    assert aspect.min() >= 0.74 and aspect.max() <= 1.34
    assert abs(flips(u).double().mean() - 0.5) < 0.015
    # torchvision's own sampler (global RNG): the same distribution of areas and aspects
    torch.manual_seed(1)
    img = torch.empty(1, h, w)
    ref = torch.tensor(
        [
            tv_transforms.RandomResizedCrop.get_params(img, [crop_min, 1.0], list(RATIO))
            for _ in range(4000)
        ],
        dtype=torch.float64,
    )
    ref_area, ref_aspect = ref[:, 2] * ref[:, 3] / (h * w), ref[:, 3] / ref[:, 2]
    for ours, theirs in ((area, ref_area), (aspect, ref_aspect)):
        qs = torch.tensor([0.1, 0.25, 0.5, 0.75, 0.9], dtype=torch.float64)
        assert (torch.quantile(ours, qs) - torch.quantile(theirs, qs)).abs().max() < 0.03
    centre_x = (left + bw / 2).double() / w
    assert abs(centre_x.mean() - 0.5) < 0.01  # placement is uniform: centred on average


# ---------------------------------------------------------------------------- resampling
def random_image(h: int, w: int, c: int = 1, seed: int = 0) -> torch.Tensor:
    return torch.rand(1, c, h, w, generator=torch.Generator().manual_seed(seed)) * 255


@pytest.mark.parametrize("out", [28, 40, 20])
def test_full_image_box_without_flip_is_a_plain_resize(out):
    x = random_image(28, 28)
    y = resized_crop_batch(x, torch.tensor([[0, 0, 28, 28]]), torch.tensor([False]), out)
    ref = F.interpolate(x, size=(out, out), mode="bicubic", align_corners=False)
    torch.testing.assert_close(y, ref, atol=2e-3, rtol=0)
    if out == 28:  # same size: the image itself
        torch.testing.assert_close(y, x, atol=2e-3, rtol=0)


def taps_inside(start: int, length: int, out: int) -> torch.Tensor:
    """Output pixels whose 4 bicubic taps all lie inside [start, start + length)."""
    p = start + (torch.arange(out) + 0.5) * length / out - 0.5
    lo = torch.floor(p) - 1
    return (lo >= start) & (lo + 3 <= start + length - 1)


@pytest.mark.parametrize("box", [(3, 5, 14, 18), (10, 2, 17, 25), (0, 0, 12, 28), (6, 6, 22, 22)])
def test_grid_sample_crop_matches_torchvision_resized_crop(box):
    """Tolerance: 2e-3 (of 255) on every output pixel whose 4x4 bicubic taps lie inside the
    box. Near the box edge grid_sample reads the real neighbouring pixels where cropping first
    repeats the box's edge, so those pixels are only compared for the full-image box (above)."""
    x, out = random_image(28, 28, c=3), 28
    ref = TF.resized_crop(x, *box, size=[out, out], interpolation=BICUBIC, antialias=False)
    y = resized_crop_batch(
        x.expand(2, -1, -1, -1), torch.tensor([box] * 2), torch.tensor([0, 1]) > 0, out
    )
    inside = taps_inside(box[0], box[2], out)[:, None] & taps_inside(box[1], box[3], out)[None]
    assert inside.sum() > out * out / 3
    torch.testing.assert_close(y[0][:, inside], ref[0][:, inside], atol=2e-3, rtol=0)
    torch.testing.assert_close(y[1], y[0].flip(-1), atol=0, rtol=0)  # a flip mirrors the output


@pytest.mark.parametrize("luma", [False, True])
@pytest.mark.parametrize("size", [24, 64])
def test_batched_crops_equal_one_interpolate_per_image(size, luma):
    """resized_crops (CUDA's path: crops on a canvas, two batched products) gives what
    antialiased ``interpolate`` of each crop, then its flip, gives: downsampled and upsampled
    crops, odd sizes, a 1-pixel crop, luma; one group, several, one crop per group. torch
    computes the sampling positions in float32, resized_crops in float64: 0.02 of a step."""
    gen = torch.Generator().manual_seed(size + luma)
    shapes = [(h, w) for h, w in torch.randint(1, 130, (23, 2), generator=gen).tolist()]
    imgs = [torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=gen) for h, w in shapes]
    u = draw_uniforms(len(imgs), gen)
    boxes, flip = crop_boxes(torch.tensor(shapes), u, (0.08, 1.0)), flips(u)
    boxes[0] = torch.tensor([0, 0, 1, 1])  # a single pixel (when the first image is smaller)
    assert flip.any() and not flip.all()
    pairs = zip(imgs, boxes.tolist(), strict=True)
    ref = torch.stack([resized_crop_one(im, b, size, luma) for im, b in pairs])
    ref = torch.where(flip.view(-1, 1, 1, 1), ref.flip(-1), ref)
    assert ref.shape == (23, 1 if luma else 3, size, size)
    whole = resized_crops(imgs, boxes, flip, size, luma)
    torch.testing.assert_close(whole, ref, atol=0.02, rtol=0)
    for budget in (3 * 64 * 64, 1):  # several groups; one crop per group (over the budget)
        torch.testing.assert_close(
            resized_crops(imgs, boxes, flip, size, luma, canvas_elems=budget),
            whole,
            atol=1e-3,
            rtol=0,
        )


def test_batched_resize_in_the_augmentation_keeps_crops_flips_and_bad_images(tmp_path):
    """GpuAugment with the batched resize (CUDA's default) equals its per-image resize (the
    CPU's) to one step of 255 after rounding, the unreadable files replaced alike."""
    make_messy_folder(tmp_path / "data")
    jpeg_folder(tmp_path / "data", 6)
    raw = build_dataset("imagefolder", str(tmp_path / "data"), train=True)
    batch = EncodedImages.collate_fn([raw_dataset(raw)[k] for k in range(len(raw))])[0]
    for chans in (3, 1):
        aug = GpuAugment(32, chans, (0.5,) * chans, (0.5,) * chans, 0.2, 0, 0, "cpu")
        assert not aug.batched_resize
        x, bad = aug(batch, 1, 2)
        aug.batched_resize = True
        y, bad_y = aug(batch, 1, 2)
        assert bad_y == bad and len(bad) == 2
        steps = ((y - x) * 0.5 * 255).abs()  # normalised with std 0.5: back to steps of 255
        assert steps.max() <= 1 + 1e-4 and steps.mean() < 0.01, (steps.max(), steps.mean())


def smooth_image(h: int, w: int, seed: int) -> np.ndarray:
    """Natural-looking content: gradients, a disc and mild noise (uint8 RGB)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
    img = np.stack([xx * 200 + 30, yy * 180 + 40, (xx + yy) * 90 + 20], -1)
    cy, cx, r = rng.uniform(0.2, 0.8) * h / max(h, w), rng.uniform(0.2, 0.8), 0.25
    img[(yy - cy) ** 2 + (xx - cx) ** 2 < r * r] = rng.integers(0, 255, 3)
    img += rng.normal(0, 4, img.shape)
    return img.clip(0, 255).astype(np.uint8)


def jpeg_folder(root: Path, n: int, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    for k in range(n):
        folder = root / "train" / f"class{k % 2}"
        folder.mkdir(parents=True, exist_ok=True)
        h, w = (int(v) for v in rng.integers(24, 72, 2))
        Image.fromarray(smooth_image(h, w, seed + k)).save(folder / f"{k}.JPEG", quality=90)
    return root


def gpu_batches(root: Path, aug: GpuAugment, num_workers: int = 0, batch_size: int = 4):
    raw = build_dataset("imagefolder", str(root), train=True)
    ds = raw_dataset(raw)
    loader = DataLoader(
        ds, batch_size=batch_size, num_workers=num_workers, collate_fn=ds.collate_fn
    )
    for index, (batch, _, bad) in enumerate(loader):
        x, undecodable = aug(batch, 0, index)
        yield raw, batch, x, bad + undecodable


def test_a_worker_hands_over_each_batch_packed_in_one_tensor(tmp_path):
    """The bytes of a batch's files travel as one tensor (one shared-memory segment per batch
    instead of one per file) and come back per file, in order, None where unreadable."""
    files = make_messy_folder(tmp_path)
    raw = build_dataset("imagefolder", str(tmp_path), train=True)
    ds = raw_dataset(raw)
    loader = DataLoader(ds, batch_size=len(ds), num_workers=1, collate_fn=ds.collate_fn)
    ((batch, _, bad),) = list(loader)
    assert isinstance(batch, EncodedBatch) and len(batch) == len(raw)
    assert batch.flat.dtype == torch.uint8 and batch.flat.dim() == 1
    assert not bad  # every file of the messy folder can be read (some do not decode)
    total = 0
    for (path, _), data in zip(raw.samples, batch.data, strict=True):
        expected = Path(path).read_bytes()
        assert data.numpy().tobytes() == expected
        assert data.untyped_storage().data_ptr() == batch.flat.untyped_storage().data_ptr()
        total += len(expected)
    assert batch.flat.numel() == total and files["empty"].stat().st_size == 0
    # an unreadable file keeps its place as None, and an empty one is an empty view
    packed = EncodedBatch([torch.tensor([1, 2], dtype=torch.uint8), None, batch.data[0][:0]], [])
    assert [d if d is None else d.tolist() for d in packed.data] == [[1, 2], None, []]
    assert packed.sizes == [2, -1, 0] and len(packed) == 3
    assert EncodedBatch([None], []).data == [None]


@pytest.mark.parametrize("in_chans", [3, 1])
def test_jpeg_path_equals_cpu_decode_and_antialiased_resized_crop(tmp_path, in_chans):
    """Tolerance: 1 step of 255 (the reference rounds its uint8 output, as we do). One channel:
    PIL's convert("L") of the decoded image first, as the CPU path does."""
    root = jpeg_folder(tmp_path, 8)
    mean, std = (0.4, 0.5, 0.6)[:in_chans], (0.2, 0.25, 0.3)[:in_chans]
    aug = GpuAugment(32, in_chans, mean, std, 0.2, seed=3, rank=0, device="cpu")
    for _, batch, x, bad in gpu_batches(root, aug, batch_size=8):
        assert not bad and x.shape == (8, in_chans, 32, 32)
        imgs = [decode_image(d, mode=ImageReadMode.RGB) for d in batch.data]
        boxes, flip = aug.params(torch.tensor([list(i.shape[1:]) for i in imgs]), 0, 0)
        for k, img in enumerate(imgs):
            if in_chans == 1:
                img = TF.pil_to_tensor(TF.to_pil_image(img).convert("L"))
            ref = TF.resized_crop(img, *boxes[k].tolist(), size=[32, 32], interpolation=BICUBIC)
            ref = TF.hflip(ref) if flip[k] else ref
            ref = TF.normalize(ref.float() / 255, mean, std)
            torch.testing.assert_close(x[k], ref, atol=1 / 255 / min(std) + 1e-5, rtol=0)


def pil_resized_crop(img: Image.Image, box, size: int, flip: bool) -> torch.Tensor:
    top, left, h, w = box
    out = img.crop((left, top, left + w, top + h)).resize((size, size), Image.BICUBIC)
    out = out.transpose(Image.FLIP_LEFT_RIGHT) if flip else out
    return TF.pil_to_tensor(out).float()


def test_same_boxes_as_the_pil_cpu_path_give_close_pixels(tmp_path):
    """The kernels differ: PIL's bicubic (a = -0.5, rounded between passes) vs torch's
    antialiased one for files (also a = -0.5) and grid_sample's (a = -0.75) for arrays.
    Measured here as the mean absolute difference in 0-255 steps over the same boxes."""
    # JPEG files: decode + antialiased interpolate
    root = jpeg_folder(tmp_path, 8, seed=5)
    aug = GpuAugment(32, 3, (0.0,) * 3, (1 / 255,) * 3, 0.2, seed=0, rank=0, device="cpu")
    diffs = []
    for raw, _, x, _ in gpu_batches(root, aug, batch_size=8):
        pils = [raw[k][0] for k in range(8)]
        boxes, flip = aug.params(torch.tensor([[p.height, p.width] for p in pils]), 0, 0)
        for k, p in enumerate(pils):
            diffs.append((x[k] - pil_resized_crop(p, boxes[k].tolist(), 32, flip[k])).abs())
    jpeg_mad = torch.stack(diffs).mean().item()
    assert jpeg_mad < 0.5, jpeg_mad
    # Fashion-MNIST arrays: grid_sample (a = -0.75, upsampling)
    raw = build_dataset("sample", None, train=True)
    imgs = torch.stack([raw_dataset(raw)[k][0] for k in range(64)])
    aug = GpuAugment(28, 1, (0.0,), (1 / 255,), 0.2, seed=0, rank=0, device="cpu")
    x, _ = aug(imgs, 0, 0)
    boxes, flip = aug.params(torch.tensor([[28, 28]]).expand(64, 2), 0, 0)
    ref = torch.stack(
        [pil_resized_crop(raw[k][0], boxes[k].tolist(), 28, flip[k]) for k in range(64)]
    )
    fmnist_mad = (x - ref).abs().mean().item()
    assert fmnist_mad < 4, fmnist_mad
    print(f"mean |gpu - PIL| in 0-255 steps: jpeg {jpeg_mad:.3f}, fashion-mnist {fmnist_mad:.3f}")


def test_batch_statistics_match_the_cpu_path():
    """Different random crops, the same distribution: per-channel mean and std of 1,024
    augmented Fashion-MNIST images through both pipelines."""
    raw = build_dataset("sample", None, train=True)
    mean, std = (0.2860,) * 3, (0.3530,) * 3
    cpu = SeededTransformDataset(raw, build_transform(True, 28, 3, mean, std), seed=0)
    a = torch.stack([cpu[k][0] for k in range(1024)])
    aug = GpuAugment(28, 3, mean, std, 0.2, seed=0, rank=0, device="cpu")
    b, _ = aug(torch.stack([raw_dataset(raw)[k][0] for k in range(1024)]), 0, 0)
    assert b.shape == a.shape
    assert abs(a.mean() - b.mean()) < 0.03 and abs(a.std() - b.std()) < 0.03
    # left-right balance: flips at p = 0.5 in both
    half = 14
    for x in (a, b):
        assert abs(x[..., :half].mean() - x[..., half:].mean()) < 0.03


# ---------------------------------------------------------------------------- bad images
def test_only_what_nvjpeg_decodes_right_goes_to_the_batched_decode(tmp_path, monkeypatch):
    """CMYK, 12-bit and arithmetic-coded JPEGs, other formats and broken headers are decoded on
    the CPU (torchvision's nvJPEG call would give CMYK wrong colours or fail); the worker that
    packs a batch marks them."""
    from maepl import encoded

    files = odd_jpegs(tmp_path)
    files.update(make_messy_folder(tmp_path / "messy"))
    data = {k: f.read_bytes() for k, f in files.items()}
    head = data["444"]
    sof = head.index(b"\xff\xc0")
    data["arithmetic"] = head[: sof + 1] + b"\xc9" + head[sof + 2 :]  # SOF9
    data["12bit"] = head[: sof + 4] + b"\x0c" + head[sof + 5 :]
    data["cut_header"] = head[: sof + 6]
    decodable = {k for k, v in data.items() if nvjpeg_decodable(v)}
    # a truncated file (no end-of-image marker) goes to the CPU, which refuses it
    assert decodable == {"444", "gray", "progressive", "tiny"} | {f"good{i}" for i in range(6)}
    tensor = {k: torch.frombuffer(bytearray(v), dtype=torch.uint8) for k, v in data.items() if v}
    assert all(nvjpeg_decodable(t) == (k in decodable) for k, t in tensor.items())
    batched = []

    def spy(inputs, *args, **kwargs):
        batched.append(len(inputs) if isinstance(inputs, list) else 1)
        return real(inputs, *args, **kwargs)

    real = encoded.decode_jpeg
    monkeypatch.setattr(encoded, "decode_jpeg", spy)
    names = [k for k in tensor if k in ("444", "cmyk", "gray", "png_named_jpeg", "progressive")]
    batch = EncodedBatch([tensor[k] for k in names], names)
    assert batch.nvjpeg == [k in decodable for k in names]
    imgs, errors = decode_batch(batch.data, torch.device("cpu"), batch.nvjpeg)
    assert batched == [3] and not errors  # 444, gray, progressive in one call; the rest alone
    for name, img in zip(names, imgs, strict=True):
        true = np.asarray(Image.open(files[name]).convert("RGB"))
        assert np.array_equal(img.permute(1, 2, 0).numpy(), true), name


def test_bad_images_are_skipped_counted_and_named_like_the_cpu_path(tmp_path):
    files = make_messy_folder(tmp_path / "data")
    aug = GpuAugment(16, 3, (0.5,) * 3, (0.5,) * 3, 0.2, seed=0, rank=0, device="cpu")
    runs = []
    for workers in (0, 2):
        out = list(gpu_batches(tmp_path / "data", aug, num_workers=workers))
        runs.append((torch.cat([x for *_, x, _ in out]), [b for *_, bad in out for b in bad]))
    (x0, bad0), (x2, bad2) = runs
    assert torch.equal(x0, x2) and bad0 == bad2  # any worker count
    named = sorted(b.split(":")[0] for b in bad0)
    assert named == sorted([str(files["truncated"]), str(files["empty"])])
    assert x0.shape == (12, 3, 16, 16) and torch.isfinite(x0).all()
    # readable odd files decode to their true content (PIL's, which the CPU path uses)
    for name in ("cmyk", "png_named_jpeg", "gray", "tiny", "good0"):
        data = EncodedImages([(str(files[name]), 0)])[0][0]
        (img,), errors = decode_batch([data], torch.device("cpu"))
        true = np.asarray(Image.open(files[name]).convert("RGB"))
        assert not errors and np.array_equal(img.permute(1, 2, 0).numpy(), true), name
    # an unreadable image is replaced by its batch's first readable one, crop and flip included
    raw = build_dataset("imagefolder", str(tmp_path / "data"), train=True)
    batch = EncodedImages.collate_fn([raw_dataset(raw)[k] for k in range(len(raw))])[0]
    paths = [Path(p).name for p in batch.paths]
    x, bad = aug(batch, 0, 0)
    assert len(bad) == 2
    assert paths[0] == "cmyk.JPEG"  # it decodes: the batch's first readable image
    assert torch.equal(x[paths.index("empty.JPEG")], x[0])
    assert torch.equal(x[paths.index("truncated.JPEG")], x[0])
    strict = GpuAugment(16, 3, (0.5,) * 3, (0.5,) * 3, 0.2, 0, 0, "cpu", strict=True)
    with pytest.raises(BadImageError, match="truncated.JPEG|empty.JPEG"):
        strict(batch, 0, 0)


# ---------------------------------------------------------------------------- pretrain.py
def tiny_args(out: Path, *extra: str) -> list[str]:
    return [*TINY, "--num_workers", "0", "--output_dir", str(out), "--data_pipeline", "gpu", *extra]


def test_data_pipeline_is_checked():
    with pytest.raises(ConfigError, match="data_pipeline: must be one of cpu, gpu; got 'tpu'"):
        parse_config(PretrainConfig, ["--dataset", "sample", "--data_pipeline", "tpu"])


def test_pretrain_with_the_gpu_pipeline_on_the_sample(tmp_path, capsys):
    out = tmp_path / "run"
    summary = pretrain.main(
        parse_config(PretrainConfig, tiny_args(out, "--batch_size", "32", "--max_steps", "4"))
    )
    assert summary["step"] == 4 and np.isfinite(summary["loss"])
    if not torch.cuda.is_available():  # the note is for CPU-only machines
        assert "data_pipeline gpu without an accelerator" in capsys.readouterr().out
    assert load_file(out / "export" / "encoder" / "model.safetensors")
    assert (out / "export" / "mae.safetensors").is_file() and list((out / "vis").glob("*.png"))


def test_pretrain_with_the_gpu_pipeline_on_jpegs(tmp_path):
    root = jpeg_folder(tmp_path / "data", 12)
    make_messy_folder(tmp_path / "data")  # adds 12 more files to train/things, 2 unreadable
    args = tiny_args(
        tmp_path / "run",
        "--dataset", "imagefolder", "--data_path", str(root), "--input_size", "16",
        "--in_chans", "3", "--batch_size", "8", "--epochs", "2", "--log_every", "1",
    )  # fmt: skip
    summary = pretrain.main(parse_config(PretrainConfig, args))
    assert summary["step"] == 6 and summary["bad_images"] == 4  # 2 files x 2 epochs
    rows = [json.loads(r) for r in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    files = [f for r in rows if r.get("event") == "bad_images" for f in r["files"]]
    assert len(files) == 4 and any("empty.JPEG" in f for f in files)
    assert (tmp_path / "run" / "export" / "encoder" / "model.safetensors").is_file()
    with pytest.raises(BadImageError, match="truncated.JPEG|empty.JPEG"):
        pretrain.main(parse_config(PretrainConfig, args + ["--strict_data", "--overwrite"]))


# ---------------------------------------------------------------------------- CUDA only
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def luma(x: torch.Tensor) -> torch.Tensor:
    """Float ``[..., 3, H, W]`` RGB (0-255) -> ITU-R 601 luma ``[..., H, W]``, the Y that a JPEG
    stores at full resolution: RGB from the same Y with other chroma gives the same luma."""
    return (x.double() * torch.tensor([0.299, 0.587, 0.114]).view(3, 1, 1)).sum(-3)


def chroma(x: torch.Tensor) -> torch.Tensor:
    """Float ``[..., 3, H, W]`` RGB (0-255) -> Cb, Cr ``[..., 2, H, W]`` (JFIF, without the 128)."""
    y = luma(x)
    return torch.stack([(x[..., 2, :, :] - y) / 1.772, (x[..., 0, :, :] - y) / 1.402], -3)


def levels(x: torch.Tensor) -> torch.Tensor:
    """GpuAugment outputs normalised with mean = std = 0.5 -> 0-255."""
    return (x.cpu().double() * 0.5 + 0.5) * 255


def odd_jpegs(root: Path) -> dict[str, Path]:
    """JPEGs that nvJPEG decodes without chroma upsampling (4:4:4, gray), or not at all (CMYK),
    plus a progressive one, with noise content: any decoder difference shows."""
    rng = np.random.default_rng(1)
    noise = rng.integers(0, 255, (24, 32, 3), dtype=np.uint8)
    cls = root / "train" / "odd"
    cls.mkdir(parents=True)
    files = {k: cls / f"{k}.JPEG" for k in ("444", "gray", "cmyk", "progressive")}
    Image.fromarray(noise).save(files["444"], quality=90, subsampling=0)
    Image.fromarray(noise[..., 0]).save(files["gray"], quality=90)
    Image.fromarray(rng.integers(0, 255, (24, 32, 4), dtype=np.uint8), "CMYK").save(files["cmyk"])
    Image.fromarray(smooth_image(40, 56, 3)).save(files["progressive"], progressive=True)
    return files


@cuda
def test_cuda_decode_equals_cpu_decode(tmp_path):
    """nvJPEG (as torchvision creates it) repeats subsampled chroma where libjpeg-turbo
    interpolates, so colour edges of 4:2:0 JPEGs differ by a few steps of 255; luma, 4:4:4 and
    gray JPEGs agree to within the IDCT's rounding, and CMYK JPEGs are decoded on the CPU."""
    jpeg_folder(tmp_path, 16)
    odd = odd_jpegs(tmp_path)
    raw = build_dataset("imagefolder", str(tmp_path), train=True)
    data = [raw_dataset(raw)[k][0] for k in range(len(raw))]
    gpu, errors_gpu = decode_batch(data, torch.device("cuda"))
    cpu, errors_cpu = decode_batch(data, torch.device("cpu"))
    assert not errors_gpu and not errors_cpu
    exact = {str(f) for f in odd.values() if f.stem != "progressive"}
    for (path, _), a, b in zip(raw.samples, gpu, cpu, strict=True):
        assert a.device.type == "cuda" and a.shape == b.shape, path
        a, b = a.cpu().double(), b.double()
        dy = (luma(a) - luma(b)).abs().mean()
        dc = (chroma(a) - chroma(b)).abs().mean()
        assert dy < 1.0 and dc < 6.0, f"{path}: luma {dy:.2f}, chroma {dc:.2f} steps"
        if path in exact:
            assert (a - b).abs().mean() < 1.0, f"{path}: {(a - b).abs().mean():.2f} steps"


@cuda
def test_cuda_decode_never_overwrites_memory_the_callers_stream_still_reads():
    """pytorch/vision PR #9606's race: images the caller's stream freed while its reads of them
    were still queued must not be handed to nvJPEG, which writes on a stream of its own."""
    side, dev = torch.cuda.Stream(), torch.device("cuda")
    buf = io.BytesIO()
    Image.fromarray(smooth_image(64, 64, 0)).save(buf, format="JPEG", quality=90)
    data = [torch.frombuffer(bytearray(buf.getvalue()), dtype=torch.uint8)] * 8
    with torch.cuda.stream(side):
        for trial in range(20):
            victims = [torch.full((3, 64, 64), 7, dtype=torch.uint8, device=dev) for _ in data]
            torch.cuda._sleep(2**28)  # the reads below wait behind ~0.1 s of work
            sums = [v.sum(dtype=torch.int64) for v in victims]
            del victims  # freed with those reads queued: same-size blocks for the decode
            imgs, errors = decode_batch(data, dev)
            assert not errors and len(imgs) == 8
            assert [int(x) for x in sums] == [7 * 3 * 64 * 64] * 8, f"trial {trial}"


def augment_all(root: Path, device: str) -> tuple[torch.Tensor, list[str], list[str]]:
    aug = GpuAugment(16, 3, (0.5,) * 3, (0.5,) * 3, 0.2, seed=0, rank=0, device=device)
    out = list(gpu_batches(root, aug))
    x = torch.cat([x.cpu() for *_, x, _ in out])
    paths = [p for _, batch, *_ in out for p in batch.paths]
    return x, paths, sorted(b.split(":")[0] for *_, bad in out for b in bad)


@cuda
def test_cuda_augment_equals_cpu_augment(tmp_path, monkeypatch):
    """Given the same decoded images, crops, flips, resampling and normalisation on CUDA are
    the CPU's to one step of 255 (rounding); decoded on CUDA, the same files are unreadable and
    each output's luma is within 1.5 steps on average (chroma: see the decode test)."""
    from maepl import gpu_aug

    make_messy_folder(tmp_path / "data")
    jpeg_folder(tmp_path / "data", 8)
    odd_jpegs(tmp_path / "data")
    x_cpu, paths, bad_cpu = augment_all(tmp_path / "data", "cpu")
    x_gpu, _, bad_gpu = augment_all(tmp_path / "data", "cuda")
    assert bad_gpu == bad_cpu and len(bad_cpu) == 2
    dy = (luma(levels(x_gpu)) - luma(levels(x_cpu))).abs().flatten(1).mean(1)
    named = {Path(p).name: round(float(d), 2) for p, d in zip(paths, dy, strict=True)}
    # emulated with libjpeg-turbo's repeating upsampler (djpeg -nosmooth): at most 0.72 (noise,
    # where chroma pushes RGB to 0 or 255 and luma is clipped), 0.27 on smooth images
    assert dy.max() < 1.5, f"mean |luma cpu - luma cuda| per image, steps of 255: {named}"

    real = gpu_aug.decode_batch

    def on_cpu(data, device, nvjpeg=None):  # the CPU's decode, then the rest on CUDA
        imgs, errors = real(data, torch.device("cpu"), nvjpeg)
        return [None if i is None else i.to(device) for i in imgs], errors

    monkeypatch.setattr(gpu_aug, "decode_batch", on_cpu)
    x_geo, _, bad_geo = augment_all(tmp_path / "data", "cuda")
    d = (levels(x_geo) - levels(x_cpu)).abs()
    assert bad_geo == bad_cpu
    assert d.max() <= 1.0 + 1e-6 and d.mean() < 0.05, f"max {d.max():.2f}, mean {d.mean():.3f}"


@cuda
@pytest.mark.parametrize("tf32", [False, True])
@pytest.mark.parametrize("luma", [False, True])
def test_cuda_batched_crops_equal_the_cpu_per_image_resize(tf32, luma, monkeypatch):
    """On CUDA, with TF32 products allowed or not (then the products run in float64), in one
    group or several, the batched resize gives the CPU's per-image ``interpolate`` to 0.02 of a
    step, and never makes the host wait for the GPU (torch's sync debug mode raises if so)."""
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", tf32)
    gen = torch.Generator().manual_seed(5)
    shapes = torch.randint(40, 400, (40, 2), generator=gen)
    imgs = [
        torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=gen)
        for h, w in shapes.tolist()
    ]
    u = draw_uniforms(len(imgs), gen)
    boxes, flip = crop_boxes(shapes, u, (0.2, 1.0)), flips(u)
    pairs = zip(imgs, boxes.tolist(), strict=True)
    ref = torch.stack([resized_crop_one(im, b, 224, luma) for im, b in pairs])
    ref = torch.where(flip.view(-1, 1, 1, 1), ref.flip(-1), ref)
    on_gpu = [im.cuda() for im in imgs]
    torch.cuda.synchronize()
    for budget in (1 << 26, 3 * 200 * 200):
        torch.cuda.set_sync_debug_mode("error")
        try:
            y = resized_crops(on_gpu, boxes, flip, 224, luma, canvas_elems=budget)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        torch.testing.assert_close(y.cpu(), ref, atol=0.02, rtol=0)


def test_tf32_products_reads_the_legacy_and_the_new_precision_settings():
    """Under the newer fp32_precision setting, reading the legacy allow_tf32 raises; the check
    must answer under both (each case in its own process: the settings are global)."""
    cases = {
        "pass": "False",
        "torch.backends.cuda.matmul.allow_tf32 = True": "True",
        "torch.set_float32_matmul_precision('high')": "True",
        "torch.backends.cuda.matmul.fp32_precision = 'tf32'": "True",
        "torch.backends.cuda.matmul.fp32_precision = 'ieee'": "False",
    }
    for setting, answer in cases.items():
        code = f"import torch; {setting}; from maepl.resample import tf32_products as f; print(f())"
        r = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120
        )
        assert r.returncode == 0, r.stderr[-2000:]
        assert r.stdout.strip() == answer, (setting, r.stdout)


def test_same_size_arrays_larger_than_the_input_take_the_batched_resize_alike():
    """Arrays larger than ``input_size`` (28 px at 16) go through _resize: the batched path
    (CUDA's) equals the per-image one to a step of 255, RGB arrays turned to luma included."""
    gen = torch.Generator().manual_seed(3)
    for c, chans in ((1, 1), (3, 3), (3, 1)):
        imgs = torch.randint(0, 256, (8, c, 28, 28), dtype=torch.uint8, generator=gen)
        aug = GpuAugment(16, chans, (0.5,) * chans, (0.5,) * chans, 0.2, 0, 0, "cpu")
        x, _ = aug(imgs, 0, 1)
        aug.batched_resize = True
        y, _ = aug(imgs, 0, 1)
        assert y.shape == x.shape == (8, chans, 16, 16)
        steps = ((y - x) * 0.5 * 255).abs()
        assert steps.max() <= 1 + 1e-4 and steps.mean() < 0.01, (c, chans, steps.max())


def test_augment_decoded_is_the_call_after_decoding(tmp_path):
    """``augment_decoded`` (what jpeg_decoders.py compares decoders with) is ``__call__`` minus
    the decode: same crops, flips and normalisation, the first readable image for a bad one."""
    make_messy_folder(tmp_path / "data")
    raw = build_dataset("imagefolder", str(tmp_path / "data"), train=True)
    batch = EncodedImages.collate_fn([raw_dataset(raw)[k] for k in range(len(raw))])[0]
    aug = GpuAugment(16, 3, (0.5,) * 3, (0.5,) * 3, 0.2, seed=0, rank=0, device="cpu")
    x, bad = aug(batch, 3, 5)
    imgs, errors = decode_batch(batch.data, torch.device("cpu"), batch.nvjpeg)
    assert len(bad) == len(errors) == 2
    assert torch.equal(aug.augment_decoded(imgs, 3, 5), x)
