"""``--data_pipeline gpu``: decode and augment the next batches while the model trains.

:class:`Prefetcher` runs one pass over the DataLoader in a background thread. For each raw
batch it calls ``augment(batch, epoch, index)`` (:class:`~maepl.gpu_aug.GpuAugment`) on a CUDA
stream of its own and hands the result through a queue of ``depth`` batches, so that the
decoding and cropping of the next batches overlap the training step instead of waiting for
the main thread to launch it. Without CUDA the thread runs the same code on the CPU.

The thread gives batch ``k`` of the pass the index ``start + k``: the index the loop would pass
inline, provided the loop counts one micro-batch per batch it takes. The crops are seeded by
that index, so the outputs are bit-identical to calling ``augment`` in the loop. An exception
in the thread (an unreadable image under ``--strict_data``, a failing worker) is raised in the
main thread when it reaches that batch, with its own traceback; batches produced ahead and
never taken are dropped with whatever they raised.
"""

from __future__ import annotations

import contextlib
import functools
import queue
import threading
import time
from collections.abc import Callable, Iterator

import torch

_END = object()  # the pass is over


@functools.cache
def prefetch_stream(device: torch.device) -> torch.cuda.Stream:
    """One stream per device for every epoch's prefetcher: the caching allocator keeps freed
    blocks per stream, so a new stream each epoch could not reuse the last one's memory."""
    return torch.cuda.Stream(device)


class Prefetcher:
    """At most ``limit`` batches ``(images, labels, bad)`` of one pass over ``loader``.

    ``images, undecodable = augment(raw, epoch, start + k)`` for the loader's k-th batch;
    ``bad`` are the loader's unreadable files followed by ``undecodable``. Use it as a context
    manager: leaving it stops the thread and releases the loader's iterator, also when the
    loop stops early or raises.
    """

    def __init__(
        self,
        loader,
        augment: Callable,
        epoch: int,
        start: int,
        limit: int,
        device: torch.device | str,
        depth: int = 2,
    ):
        self.augment, self.epoch, self.start, self.limit = augment, epoch, start, limit
        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.stream = prefetch_stream(self.device) if self.device.type == "cuda" else None
        self._queue: queue.Queue = queue.Queue(depth)
        self._stop = threading.Event()
        self._it = iter(loader)  # here: the sampler's epoch is set, worker errors raise here
        # host seconds augment() took for the batches handed out so far (the loop reads it): each
        # batch carries its own time, so a log window counts the batches it took, not the ones
        # the thread happened to finish ahead of it
        self.busy_s = 0.0
        self._thread = threading.Thread(target=self._work, name="maepl-prefetch", daemon=True)
        self._thread.start()

    def _work(self) -> None:
        try:
            context = contextlib.nullcontext()
            if self.stream is not None:
                torch.cuda.set_device(self.device)  # a new thread starts on device 0
                context = torch.cuda.stream(self.stream)
            with context:
                for k in range(self.limit):
                    if self._stop.is_set():
                        return
                    try:
                        raw, labels, bad = next(self._it)
                    except StopIteration:
                        break
                    t0 = time.perf_counter()
                    images, undecodable = self.augment(raw, self.epoch, self.start + k)
                    event = None
                    if self.stream is not None:  # the images are ready when this completes
                        event = torch.cuda.Event()
                        event.record(self.stream)
                    took = time.perf_counter() - t0
                    self._put((images, labels, bad + undecodable, event, took))
        except BaseException as err:  # raised again in the main thread, at this batch
            self._put(err)
            return
        self._put(_END)

    def _put(self, item) -> None:
        while not self._stop.is_set():  # until the consumer takes a batch, or close()
            try:
                self._queue.put(item, timeout=0.1)
                return
            except queue.Full:
                pass

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, list[str]]]:
        while (item := self._queue.get()) is not _END:
            if isinstance(item, BaseException):
                raise item
            images, labels, bad, event, took = item
            self.busy_s += took
            if event is not None:
                consumer = torch.cuda.current_stream(self.device)
                consumer.wait_event(event)
                images.record_stream(consumer)  # freed memory waits for the consumer's work
            yield images, labels, bad

    def close(self) -> None:
        """Stop the thread (after the batch it is reading or augmenting) and drop the iterator."""
        self._stop.set()
        self._thread.join()
        self._it = None
        self._queue = queue.Queue()  # batches made ahead go with it

    def __enter__(self) -> Prefetcher:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
