"""Graceful stops on SIGTERM/SIGINT, agreed by all processes at step boundaries."""

from __future__ import annotations

import signal
import threading

import torch
import torch.distributed as dist

# long enough for a stop save written synchronously (a large model on slow storage); the
# main process shuts its workers down itself once it has saved
WORKER_GRACE_S = 600


def _worker_sigterm(_signum, _frame) -> None:
    # outlive the main process's step boundary, then go: multiprocessing's exit handler also
    # stops workers with SIGTERM, and a worker that ignored it for good would hang the exit
    signal.alarm(WORKER_GRACE_S)


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
