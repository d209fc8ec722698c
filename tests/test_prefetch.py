"""maepl/prefetch.py: the gpu pipeline's augmentation in a background thread gives the same
batches as inline, raises its errors in the main thread and leaves no thread behind."""

from __future__ import annotations

import threading
import time
import traceback

import psutil
import pytest
import torch
from torch.utils.data import DataLoader

import maepl.loop
import pretrain
from maepl.config import PretrainConfig, parse_config
from maepl.data import build_dataset
from maepl.encoded import raw_dataset
from maepl.gpu_aug import GpuAugment
from maepl.loaders import BadImageError, collate_skip_bad
from maepl.prefetch import Prefetcher

from .test_gpu_aug import jpeg_folder, tiny_args
from .test_reliability import make_messy_folder

pytestmark = pytest.mark.filterwarnings("ignore:The image decoding:DeprecationWarning")


def prefetch_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "maepl-prefetch"]


def loader_of(raw, batch_size: int, num_workers: int = 0) -> DataLoader:
    ds = raw_dataset(raw)
    return DataLoader(
        ds,
        batch_size=batch_size,
        num_workers=num_workers,
        collate_fn=getattr(ds, "collate_fn", None) or collate_skip_bad,
        persistent_workers=num_workers > 0,
    )


def inline(loader, aug, epoch: int, start: int, limit: int) -> list:
    out = []
    for k, (raw, labels, bad) in enumerate(loader):
        if k == limit:
            break
        x, undecodable = aug(raw, epoch, start + k)
        out.append((x, labels, bad + undecodable))
    return out


def assert_same(prefetched: list, reference: list) -> None:
    assert len(prefetched) == len(reference) > 0
    for (x, labels, bad), (x_ref, labels_ref, bad_ref) in zip(prefetched, reference, strict=True):
        assert torch.equal(x, x_ref) and torch.equal(labels, labels_ref) and bad == bad_ref


def test_prefetched_batches_equal_inline_ones_on_the_sample():
    raw = build_dataset("sample", None, train=True)
    aug = GpuAugment(28, 1, (0.286,), (0.353,), 0.2, seed=0, rank=0, device="cpu")
    loader = loader_of(raw, 256)
    for epoch, start, limit in ((0, 0, 5), (1, 7, 3)):  # a resumed epoch starts at index 7
        with Prefetcher(loader, aug, epoch, start, limit, "cpu") as batches:
            assert_same(list(batches), inline(loader, aug, epoch, start, limit))
    assert not prefetch_threads()


def test_prefetched_batches_equal_inline_ones_with_bad_files_and_workers(tmp_path):
    make_messy_folder(tmp_path / "data")  # 12 files, 2 unreadable
    jpeg_folder(tmp_path / "data", 8)
    raw = build_dataset("imagefolder", str(tmp_path / "data"), train=True)
    aug = GpuAugment(16, 3, (0.5,) * 3, (0.5,) * 3, 0.2, seed=1, rank=0, device="cpu")
    reference = inline(loader_of(raw, 4), aug, 2, 0, 10**9)  # 5 batches
    assert sum(len(bad) for *_, bad in reference) == 2
    loader = loader_of(raw, 4, num_workers=2)  # persistent workers, as the training loop's
    try:
        for _ in range(2):  # two passes over the same workers: the whole pass, then 3 batches
            with Prefetcher(loader, aug, 2, 0, 10**9, "cpu") as batches:
                assert_same(list(batches), reference)
            with Prefetcher(loader, aug, 2, 0, 3, "cpu") as batches:
                assert_same(list(batches), reference[:3])
    finally:
        loader._iterator = None
    assert not prefetch_threads()


def test_busy_time_counts_the_batches_taken_not_those_made_ahead():
    """prefetch_ms of a log window: augment time of the batches the loop took in it. The
    thread runs up to depth + 1 batches ahead; those must not count until they are taken."""
    raw = build_dataset("sample", None, train=True)
    aug = GpuAugment(28, 1, (0.286,), (0.353,), 0.2, seed=0, rank=0, device="cpu")
    took = {}  # batch index -> seconds its augment call took, as measured here

    def timed_augment(batch, epoch, index):
        t0 = time.perf_counter()
        time.sleep(0.02 if index == 0 else 0.2)  # the bound below leaves 0.2 s for preemption
        out = aug(batch, epoch, index)
        took[index] = time.perf_counter() - t0
        return out

    with Prefetcher(loader_of(raw, 64), timed_augment, 0, 0, 5, "cpu") as prefetcher:
        batches = iter(prefetcher)
        next(batches)
        deadline = time.time() + 60
        while 3 not in took:  # the thread makes batches 1..3 ahead (2 queued, 1 waiting)
            assert time.time() < deadline, "the thread never ran ahead"
            time.sleep(0.01)
        after_first = prefetcher.busy_s
        rest = list(batches)
    assert len(rest) == 4
    assert took[0] <= after_first < took[0] + took[1], (after_first, took)
    assert prefetcher.busy_s >= sum(took.values())


def test_an_error_in_the_thread_is_raised_in_the_main_thread_at_its_batch():
    raw = build_dataset("sample", None, train=True)
    aug = GpuAugment(28, 1, (0.286,), (0.353,), 0.2, seed=0, rank=0, device="cpu")

    def broken_augment(batch, epoch, index):
        if index == 2:
            raise ValueError(f"cannot augment batch {index}")
        return aug(batch, epoch, index)

    taken = []
    with pytest.raises(ValueError, match="cannot augment batch 2") as err:
        with Prefetcher(loader_of(raw, 64), broken_augment, 0, 0, 10, "cpu") as batches:
            for batch in batches:
                taken.append(batch)
    assert len(taken) == 2  # the batches before it arrive first
    frames = [f.name for f in traceback.extract_tb(err.value.__traceback__)]
    assert "broken_augment" in frames  # the thread's own traceback comes along
    assert not prefetch_threads()


def test_strict_data_error_from_the_thread_names_the_file(tmp_path):
    make_messy_folder(tmp_path / "data")
    raw = build_dataset("imagefolder", str(tmp_path / "data"), train=True)
    strict = GpuAugment(16, 3, (0.5,) * 3, (0.5,) * 3, 0.2, 0, 0, "cpu", strict=True)
    with pytest.raises(BadImageError, match="truncated.JPEG|empty.JPEG"):
        with Prefetcher(loader_of(raw, 12), strict, 0, 0, 1, "cpu") as batches:
            list(batches)
    assert not prefetch_threads()


def test_leaving_early_stops_the_thread_while_it_waits_on_a_full_queue():
    raw = build_dataset("sample", None, train=True)
    aug = GpuAugment(28, 1, (0.286,), (0.353,), 0.2, seed=0, rank=0, device="cpu")
    with Prefetcher(loader_of(raw, 32), aug, 0, 0, 10**9, "cpu") as batches:
        for _ in batches:
            break
        deadline = time.monotonic() + 30  # let the thread fill the queue and block on it
        while not batches._queue.full() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert batches._queue.full() and prefetch_threads()
    assert not prefetch_threads()


def test_an_exception_in_the_training_step_stops_the_thread_and_the_workers(tmp_path, monkeypatch):
    calls = []
    end_micro = maepl.loop.Run.end_micro

    def failing_end_micro(run, metrics):
        end_micro(run, metrics)
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("step failed")

    monkeypatch.setattr(maepl.loop.Run, "end_micro", failing_end_micro)
    args = tiny_args(tmp_path / "run", "--batch_size", "32", "--max_steps", "10")
    args[args.index("--num_workers") + 1] = "2"
    with pytest.raises(RuntimeError, match="step failed"):
        pretrain.main(parse_config(PretrainConfig, args))
    assert not prefetch_threads()
    assert not psutil.Process().children()  # the DataLoader workers are gone


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_prefetchers_of_every_epoch_share_one_stream():
    """A new stream each epoch could not reuse the cached memory of the last one's (the
    allocator pools freed blocks per stream); added in session 19, not yet run on a GPU."""
    raw = build_dataset("sample", None, train=True)
    aug = GpuAugment(28, 1, (0.286,), (0.353,), 0.2, seed=0, rank=0, device="cuda")
    streams = []
    for epoch in range(2):
        with Prefetcher(loader_of(raw, 64), aug, epoch, 0, 2, "cuda") as batches:
            assert len(list(batches)) == 2
            streams.append(batches.stream)
    assert streams[0] is streams[1] and streams[0] != torch.cuda.current_stream()
