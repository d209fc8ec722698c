"""``--profile_steps``: a ``torch.profiler`` window over a run's optimizer steps."""

from __future__ import annotations

import gzip
import shutil
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from .loop import Run


class Profiler:
    """``--profile_steps N``: ``torch.profiler`` over optimizer steps ``profile_start + 1`` to
    ``profile_start + N`` of this launch (the first ``profile_start`` ones compile and warm up).

    It records the training thread's operators and, on CUDA, every kernel and copy on every
    stream, the prefetch thread's included (not that thread's host-side operators: the profiler
    follows the thread that started it; ``prefetch_ms`` in the log is its host time). Each rank
    writes ``<output_dir>/profile/trace_rank<r>.json.gz`` (open it in https://ui.perfetto.dev or
    chrome://tracing) and ``table_rank<r>.txt`` (operators by self device time, then by self
    CPU time); rank 0 prints the first rows.
    """

    def __init__(self, run: Run):
        cfg, self.run = run.cfg, run
        acts = [torch.profiler.ProfilerActivity.CPU]
        if run.device.type == "cuda":
            acts.append(torch.profiler.ProfilerActivity.CUDA)
        warmup = min(1, cfg.profile_start)
        schedule = torch.profiler.schedule(
            wait=cfg.profile_start - warmup, warmup=warmup, active=cfg.profile_steps, repeat=1
        )
        self.left = cfg.profile_start + cfg.profile_steps
        self.first = run.step + cfg.profile_start + 1  # the first profiled step
        if run.step + self.left > run.stop_step:
            run.accelerator.print(
                f"note: profile_start + profile_steps = {self.left} steps, but this launch "
                f"runs {run.stop_step - run.step}: the profile will be short or missing"
            )
        self.prof = torch.profiler.profile(
            activities=acts, schedule=schedule, on_trace_ready=self._write
        )
        self.prof.start()

    def step(self) -> None:
        if self.prof is None:
            return
        self.prof.step()  # the last one writes the files (on_trace_ready)
        self.left -= 1
        if self.left == 0:
            self.close()

    def close(self) -> None:
        if self.prof is not None:
            self.prof.stop()
            self.prof = None

    def _write(self, prof) -> None:
        run = self.run
        n = run.step - self.first + 1  # fewer than profile_steps if the run ended first
        if n < 1:
            return
        folder = run.out / "profile"
        folder.mkdir(parents=True, exist_ok=True)
        trace = folder / f"trace_rank{run.rank}.json"
        prof.export_chrome_trace(str(trace))
        with trace.open("rb") as src, gzip.open(f"{trace}.gz", "wb") as dst:
            shutil.copyfileobj(src, dst)
        trace.unlink()
        events = prof.key_averages()
        sorts = ["self_cpu_time_total"]
        if run.device.type == "cuda":
            sorts.insert(0, "self_device_time_total")
        tables = [events.table(sort_by=key, row_limit=40) for key in sorts]
        head = f"steps {self.first}-{run.step} ({n}), rank {run.rank}, {run.device}"
        (folder / f"table_rank{run.rank}.txt").write_text(
            "\n\n".join(f"{head}, by {key}:\n{t}" for key, t in zip(sorts, tables, strict=True))
        )
        if run.main:
            top = "\n".join(tables[0].splitlines()[:18])
            print(f"profile of {head}, by {sorts[0]}:\n{top}\n  all: {folder}", flush=True)
