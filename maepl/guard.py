"""Graceful stops on SIGTERM/SIGINT, agreed by all processes at step boundaries; optimizer steps
with a non-finite gradient norm skipped, counted, and stopped when too many come in a row."""

from __future__ import annotations

import atexit
import functools
import multiprocessing
import signal
import threading
from collections.abc import Callable

import torch
import torch.distributed as dist

# long enough for a stop save written synchronously (a large model on slow storage); the
# main process shuts its workers down itself once it has saved
WORKER_GRACE_S = 600


def _worker_sigterm(_signum, _frame) -> None:
    # outlive the main process's step boundary, then go (a worker that ignored SIGTERM for good
    # would outlive a main process that is gone)
    signal.alarm(WORKER_GRACE_S)


@functools.cache  # registered once
def kill_workers_at_exit() -> None:
    """Main process, once: at exit, kill the DataLoader workers still alive. multiprocessing's
    own exit handler stops daemonic children with SIGTERM and then joins them; our workers
    outlive SIGTERM, so a main process that an exception ended with its loader's workers still
    running (the loop's generator kept alive by the traceback) waited WORKER_GRACE_S in that
    join. atexit runs handlers last-registered first, so this one runs before it."""
    atexit.register(_kill_daemonic_children)


def _kill_daemonic_children() -> None:
    children = [c for c in multiprocessing.active_children() if c.daemon]
    if children and threading.current_thread() is threading.main_thread():
        # torch's SIGCHLD handler would report the killed workers as the run's last error
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    for child in children:  # DataLoader workers: what multiprocessing's handler terminates
        child.kill()


def ignore_stop_signals(_worker_id: int = 0) -> None:
    """DataLoader ``worker_init_fn``: workers ignore SIGINT and outlive SIGTERM by 10 min.

    A scheduler signals the whole process group; workers that died at once would make the
    main process fail with "DataLoader worker exited unexpectedly" before it could save. The
    main process shuts its workers down itself once it has saved.
    """
    signal.signal(signal.SIGTERM, _worker_sigterm)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


class StopFlag:
    """SIGTERM or SIGINT only sets a flag; ``agreed()`` tells every rank whether any rank saw one.

    With several processes the flag is OR-reduced by an asynchronous all-reduce of a CPU tensor
    over a gloo group, read one boundary later: no GPU stream is involved, so the check never
    makes the host wait for the GPU; all ranks read the same reduction at the same boundary,
    so they stop at the same step.
    """

    def __init__(self, install: bool = True):
        self.flag = False
        self.distributed = dist.is_available() and dist.is_initialized()
        # collective: every rank builds its StopFlag at the same point of the script
        self.group = dist.new_group(backend="gloo") if self.distributed else None
        self._pending: tuple | None = None
        self._previous = {}
        if install and threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, _frame) -> None:
        if self.flag and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C stops at once
        self.flag = True
        print(
            f"received {signal.Signals(signum).name}: saving at the next step boundary", flush=True
        )

    def agreed(self) -> bool:
        if not self.distributed:
            return self.flag
        result = False
        if self._pending is not None:
            work, value = self._pending
            work.wait()
            result = bool(value.item() > 0)
        value = torch.tensor([float(self.flag)])
        self._pending = (dist.all_reduce(value, group=self.group, async_op=True), value)
        return result

    def settle(self) -> None:
        """Collective: complete the all-reduce in flight (the loop has ended)."""
        if self._pending is not None:
            self._pending[0].wait()
            self._pending = None

    def restore(self) -> None:
        """Put the previous handlers back (the run is over: saved, exported, closed)."""
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}
        self.settle()


class NonfiniteSteps:
    """Optimizer steps whose gradient norm is not finite: skipped, counted, reported; the run
    stops after ``max_run`` in a row (``--max_nonfinite``).

    The norm of the all-reduced gradients is the same on every rank, so all ranks skip a step
    together. With a fused AdamW (``device_skip``) the skip happens on the device (its
    ``found_inf`` input) and the verdicts are read later, in batches (:meth:`settle`, with the
    log): no host sync per step. Under fp16 (``scaler_skips``) Accelerate's GradScaler skips
    the step itself, and the verdicts are read in batches too (before session 19, once a step).
    Otherwise each is read at once, one host sync per step.
    """

    def __init__(self, max_run: int):
        self.max_run = max_run
        self.device_skip = self.scaler_skips = False  # set once the optimizer is known
        self.total = self.run = 0  # counters a checkpoint keeps
        self._pending: list[tuple[int, torch.Tensor]] = []  # (step, 1.0 if skipped), unread

    def step(self, optimizer, norm: torch.Tensor, step: int) -> None:
        """Take optimizer step number ``step`` unless ``norm`` is not finite."""
        nonfinite = (~torch.isfinite(norm)).float()
        if self.device_skip:  # fused AdamW leaves params, state and its step count alone
            optimizer.optimizer.found_inf = nonfinite
            optimizer.step()
        elif self.scaler_skips or not nonfinite.item():  # the GradScaler's step: no sync
            optimizer.step()
        self._pending.append((step, nonfinite))

    @property
    def due(self) -> bool:
        """Whether to read the verdicts now: at once, or every ``max_run`` steps at most when
        the device or the GradScaler skips (the run must stop within ``max_run`` bad steps)."""
        later = self.device_skip or self.scaler_skips
        return bool(self._pending) and (not later or len(self._pending) >= self.max_run)

    def settle(self, report: Callable[[int], None], last_saved: int) -> None:
        """Read the pending verdicts (one host sync): count them, ``report(step)`` each skipped
        step, raise ``FloatingPointError`` naming the step once ``max_run`` come in a row."""
        if not self._pending:
            return
        steps = [s for s, _ in self._pending]
        flags = torch.stack([f for _, f in self._pending]).tolist()
        self._pending = []
        for step, bad in zip(steps, flags, strict=True):
            self.run = self.run + 1 if bad else 0
            self.total += int(bad)
            if bad:
                report(step)
            if self.run >= self.max_run:
                good = (
                    f"the last checkpoint (step {last_saved}) holds finite weights"
                    if last_saved >= 0
                    else "no checkpoint was saved before them"
                )
                raise FloatingPointError(
                    f"step {step}: {self.run} consecutive steps with a non-finite gradient norm "
                    f"(max_nonfinite={self.max_run}); {good}"
                )
