"""What one log line averages: the scalar metrics of the micro-batches since the last line.

The sums stay on the device, so a step costs no host sync; they are reduced over the ranks
once per log line (:meth:`LogWindow.reduce`), together with the counters the caller adds.
"""

from __future__ import annotations

import time

import torch


class LogWindow:
    """Metrics and host timings since the last log line, for one rank."""

    def __init__(self, device: torch.device, gpu_pipeline: bool):
        self.device, self.gpu_pipeline = device, gpu_pipeline
        # prefetch thread seconds: of finished epochs, of the running epoch's Prefetcher, and
        # the total at the last log line (the row reports the difference, per step)
        self.prefetch_done = self._prefetch_logged = 0.0
        self.prefetcher = None
        self.reset()

    def reset(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.finite = torch.zeros((), device=self.device)  # micro-batches whose metrics counted
        self.n_micro, self.t0 = 0, time.perf_counter()
        self.data_s = 0.0  # host seconds the loop waited for its batches

    def add(self, metrics: dict[str, torch.Tensor]) -> None:
        """One micro-batch's scalar tensors; a micro-batch with any non-finite value is left
        out of every average (where() on the device, not a Python branch: no sync)."""
        values = torch.stack([v.detach().float() for v in metrics.values()])
        ok = torch.isfinite(values).all()
        for k, v in zip(metrics, torch.where(ok, values, 0.0), strict=True):
            self.sums[k] = self.sums.get(k, 0.0) + v
        self.finite = self.finite + ok.float()
        self.n_micro += 1

    def end_epoch(self) -> None:
        if self.prefetcher is not None:
            self.prefetch_done += self.prefetcher.busy_s
            self.prefetcher = None

    def reduce(
        self, accelerator, extra: float, images_per_micro: int, accum_iter: int
    ) -> tuple[dict[str, float], dict[str, float], float]:
        """Collective, one host sync: (metric averages over the finite micro-batches of all
        ranks, timings, ``extra`` summed over ranks). The caller calls :meth:`reset` once the
        line is written, so that writing it counts in neither window.

        Timings: ``img_per_s`` of all ranks; ``data_ms`` (and, with the GPU pipeline,
        ``prefetch_ms``) this rank's host milliseconds per optimizer step."""
        keys = list(self.sums)
        packed = torch.stack(
            [self.sums[k] for k in keys]
            + [self.finite, torch.full((), float(extra), device=self.device)]
        )
        tot = accelerator.reduce(packed, "sum").tolist()
        extra_total = tot.pop()
        averages = {k: v / max(tot[-1], 1.0) for k, v in zip(keys, tot[:-1], strict=True)}
        steps = max(self.n_micro / accum_iter, 1e-9)
        timings = dict(
            img_per_s=self.n_micro * images_per_micro / (time.perf_counter() - self.t0),
            data_ms=1000 * self.data_s / steps,
        )
        if self.gpu_pipeline:
            busy = self.prefetch_done + (self.prefetcher.busy_s if self.prefetcher else 0.0)
            timings["prefetch_ms"] = 1000 * (busy - self._prefetch_logged) / steps
            self._prefetch_logged = busy
        return averages, timings, extra_total
