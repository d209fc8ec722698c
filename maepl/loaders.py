"""Per-sample seeding, resumable sharded sampling and bad-image handling for DataLoaders.

:class:`SeededTransformDataset` makes random augmentations a pure function of
``(seed, epoch, index)`` so that a resumed run sees exactly the augmentations it would have
seen without interruption, whatever the number of DataLoader workers.
"""

from __future__ import annotations

import random

import numpy as np
import torch
from torch.utils.data import Dataset

from .data import Transform
from .guard import ignore_stop_signals, kill_workers_at_exit

_MASK64 = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    """One SplitMix64 step: a cheap, well-mixed bijection on 64-bit integers."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def chain_seed(*parts: int) -> int:
    """Deterministic 63-bit seed for a tuple of integers (seed, epoch, index, ...): one SplitMix64
    step per part, chained, so that different tuples do not collide as sums or XORs would."""
    h = 0
    for part in parts:
        h = _splitmix64(h ^ (part & _MASK64))
    return h >> 1  # 63 bits: a non-negative int64, accepted by every RNG seeding API


def _seed_all(key: int) -> None:
    # torchvision v1 transforms draw from the global torch RNG; Python's and NumPy's are pinned
    # too for transforms that use them (e.g. timm's RandAugment). The CPU generator is seeded
    # directly: torch.manual_seed also reseeds CUDA and costs ~65 us per call.
    torch.random.default_generator.manual_seed(key)
    random.seed(key)
    np.random.seed(key & 0xFFFFFFFF)  # NumPy's legacy seed is 32-bit


class SeededTransformDataset(Dataset):
    """Apply ``transform`` with randomness fixed by ``(seed, epoch, index)``.

    With the usual per-worker RNG streams an image's augmentation depends on which worker
    reads it and on how many workers there are, so a resumed run cannot replay an epoch.
    Here every sample reseeds the RNGs from its own key inside a forked RNG scope, which also
    leaves the caller's global RNG untouched (the transform runs in the main process when
    ``num_workers=0``).

    Call :meth:`set_epoch` before creating the epoch's DataLoader iterator: workers receive a
    copy of the dataset when the iterator starts, so with ``persistent_workers=True`` the
    epoch would never reach them.
    """

    def __init__(self, dataset: Dataset, transform: Transform, seed: int, strict: bool = False):
        self.dataset = dataset
        self.transform = transform
        self.seed = int(seed)
        self.strict = strict  # raise on the first unreadable image instead of skipping it
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def _item(self, index: int | tuple[int, int]) -> tuple:
        """(image tensor, label) with the augmentation seeded from (seed, epoch, index), or the
        bad-image triple (None, -1, reason) that collate_drop_bad / collate_skip_bad count."""
        # (epoch, index) pairs come from ShardedSampler(with_epoch=True): persistent workers
        # hold a copy of this dataset made once, so the epoch must travel with the index
        epoch, index = index if isinstance(index, tuple) else (self.epoch, index)
        try:
            img, label = self.dataset[index]
        except Exception as err:  # PIL raises OSError, SyntaxError, ValueError, struct.error...
            path = sample_path(self.dataset, index)
            if self.strict:
                raise BadImageError(f"unreadable image {path}: {err!r} (strict_data)") from err
            return None, -1, f"{path}: {err!r}"
        _seed_all(chain_seed(self.seed, epoch, int(index)))
        return self.transform(img), int(label)

    def __getitem__(self, index: int | tuple[int, int]) -> tuple[torch.Tensor, int]:
        return self.__getitems__([index])[0]

    def __getitems__(self, indices: list) -> list[tuple]:
        """A batch (the DataLoader's fetcher calls this when it exists). In the main process
        (num_workers=0) the caller's RNG streams are saved once per batch and left untouched:
        per image that cost 0.3-0.5 ms on 2 cores, about what a 28-px crop, flip and
        normalisation cost (docs/performance.md, session 22)."""
        if torch.utils.data.get_worker_info() is not None:
            # in a DataLoader worker nothing else draws from these RNGs: seed and go
            return [self._item(i) for i in indices]
        py_state, np_state = random.getstate(), np.random.get_state()
        try:
            with torch.random.fork_rng(devices=[]):
                return [self._item(i) for i in indices]
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)


class ShardedSampler(torch.utils.data.Sampler[int]):
    """Epoch-seeded shuffle, split across processes, resumable mid-epoch.

    Epoch e's order is a permutation drawn from ``seed + e`` alone, so it does not depend on
    worker count or on how the run was interrupted. Process ``rank`` of ``num_replicas`` reads
    every num_replicas-th index (each rank gets len // num_replicas; the tail is dropped so all
    ranks take the same number of steps). ``set_epoch(e, start)`` skips this rank's first
    ``start`` indices, which is how a resumed run continues mid-epoch without re-reading data.
    ``with_epoch`` yields ``(epoch, index)`` pairs for :class:`SeededTransformDataset`.
    """

    def __init__(
        self,
        length: int,
        num_replicas: int = 1,
        rank: int = 0,
        seed: int = 0,
        shuffle: bool = True,
        with_epoch: bool = False,
    ):
        self.length, self.num_replicas, self.rank = length, num_replicas, rank
        self.seed, self.shuffle, self.with_epoch = seed, shuffle, with_epoch
        self.per_rank = length // num_replicas
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = epoch, start

    def __len__(self) -> int:
        return self.per_rank - self.start

    def __iter__(self):
        if self.shuffle:
            gen = torch.Generator().manual_seed(self.seed + self.epoch)
            order = torch.randperm(self.length, generator=gen)
        else:
            order = torch.arange(self.length)
        mine = order[self.rank : self.per_rank * self.num_replicas : self.num_replicas]
        mine = mine[self.start :].tolist()
        if self.with_epoch:  # for SeededTransformDataset under persistent workers
            return iter([(self.epoch, i) for i in mine])
        return iter(mine)


class BadImageError(RuntimeError):
    """An image that cannot be decoded, under ``strict_data``."""

    def user_message(self) -> str:
        """The message alone: re-raised from a DataLoader worker, torch prepends the worker's
        traceback to it (the message itself may span lines: a batch of unreadable files)."""
        text, tag = str(self), f"{type(self).__name__}: "
        at = text.rfind(tag)
        return (text[at + len(tag) :] if at >= 0 else text).strip()


def sample_path(dataset: Dataset, index: int) -> str:
    """The file behind sample ``index`` (ImageFolder), else a description of the index."""
    samples = getattr(dataset, "samples", None)
    return str(samples[index][0]) if samples is not None else f"sample {index}"


def collate_skip_bad(batch: list[tuple]) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """Stack a batch, replacing each unreadable sample by the batch's first readable one.

    Returns (images [B, C, H, W], labels [B], descriptions of the skipped files). The batch
    keeps its size, so every process takes the same steps, and the substitution depends only
    on the batch's content, not on the number of workers.
    """
    good = [item for item in batch if item[0] is not None]
    bad = [item[2] for item in batch if item[0] is None]
    if not good:
        raise BadImageError("every image of a batch is unreadable:\n  " + "\n  ".join(bad))
    items = [item if item[0] is not None else good[0] for item in batch]
    images = torch.stack([x for x, _ in items])
    labels = torch.tensor([y for _, y in items])
    return images, labels, bad


def collate_drop_bad(batch: list[tuple]) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """For evaluation: unreadable samples are left out (each sample counts once or not at all)."""
    good = [item for item in batch if item[0] is not None]
    bad = [item[2] for item in batch if item[0] is None]
    if not good:
        return torch.empty(0), torch.empty(0, dtype=torch.long), bad
    return torch.stack([x for x, _ in good]), torch.tensor([y for _, y in good]), bad


def eval_loader(
    dataset: Dataset,
    transform: Transform,
    batch_size: int,
    num_workers: int,
    num_replicas: int = 1,
    rank: int = 0,
    strict: bool = False,
) -> torch.utils.data.DataLoader:
    """Rank ``rank`` reads samples rank, rank + num_replicas, ...: every sample exactly once
    over all processes, no padding (so counts can simply be summed across processes).
    Unreadable images come back named in each batch's third item (``strict``: raise)."""
    ds = SeededTransformDataset(dataset, transform, seed=0, strict=strict)
    shard = list(range(rank, len(ds), num_replicas))
    if num_workers:
        kill_workers_at_exit()
    return torch.utils.data.DataLoader(
        torch.utils.data.Subset(ds, shard),
        batch_size=batch_size,
        num_workers=num_workers,
        collate_fn=collate_drop_bad,
        # a signal to the process group during an evaluation stops the run at its next step
        # boundary: the workers must outlive it as the training loader's do
        worker_init_fn=ignore_stop_signals,
    )


def train_loader(
    dataset: Dataset, cfg, num_replicas: int, rank: int, pin_memory: bool
) -> tuple[torch.utils.data.DataLoader, ShardedSampler]:
    """Rank ``rank``'s shuffled shard of ``dataset`` in batches of ``cfg.batch_size`` (full
    batches only), resumable mid-epoch through the sampler; unreadable images are replaced.

    A dataset with its own ``collate_fn`` (encoded files, ``maepl.encoded``) batches with it.
    """
    sampler = ShardedSampler(len(dataset), num_replicas, rank, cfg.seed, with_epoch=True)
    if cfg.num_workers:
        kill_workers_at_exit()
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_size=cfg.batch_size,
        sampler=sampler,
        # each iterator draws its workers' base seed from this generator: from the global
        # CPU RNG it would shift drop path and other draws after a resume (exact resume).
        # The base seed itself is unused: augmentations are seeded per sample.
        generator=torch.Generator().manual_seed(cfg.seed * 1000 + rank),
        num_workers=cfg.num_workers,
        pin_memory=pin_memory,
        drop_last=True,
        collate_fn=getattr(dataset, "collate_fn", None) or collate_skip_bad,
        worker_init_fn=ignore_stop_signals,
        persistent_workers=cfg.num_workers > 0,  # epochs travel with the indices
    )
    return loader, sampler
