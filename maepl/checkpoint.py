"""Step-named training checkpoints (safetensors + JSON, nothing pickled); exports: export.py.

A checkpoint is ``<output_dir>/checkpoints/step_XXXXXXXX/``: written into a hidden temporary
folder, renamed into place, then marked complete by a ``COMPLETE`` file written last, so a
crash during a save never leaves a folder that ``--resume auto`` would pick. With a
:class:`CheckpointWriter` the main process's files are written in a background thread from a
copy in host memory, so training goes on while they are written.
"""

from __future__ import annotations

import json
import re
import shutil
import threading
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .config_io import ConfigError
from .snapshot import (
    assert_finite,
    host_copies,
    optimizer_from_files,
    optimizer_to_files,
    rng_state,
    set_rng_state,
)

CKPT_DIR = "checkpoints"
MARKER = "COMPLETE"
ABANDONED = "abandoned"  # checkpoints/abandoned/after_step_XXXXXXXX/: a branch left by a resume
_STEP_RE = re.compile(r"^step_(\d{8})$")
# a complete checkpoint moved aside while the same step is saved again (``_move_into_place``)
_REPLACED_RE = re.compile(r"^\.replaced_step_(\d{8})$")


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write ``text`` to a temporary file beside ``path`` and rename it over ``path``: a kill or
    a full disk mid-write leaves the earlier file, never a truncated one."""
    path = Path(path)
    tmp = path.with_name(f".tmp_{path.name}")
    tmp.write_text(text)
    tmp.replace(path)


# ---------------------------------------------------------------------------- save / find / load
def step_dir(output_dir: str | Path, step: int) -> Path:
    return Path(output_dir) / CKPT_DIR / f"step_{step:08d}"


def step_of(path: Path) -> int:
    """The step of a checkpoint folder found by :func:`complete_checkpoints`."""
    return int((_STEP_RE.match(path.name) or _REPLACED_RE.match(path.name)).group(1))


def complete_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints, oldest first; incomplete or foreign folders are ignored.

    A complete ``.replaced_step_X`` stands for step X while ``step_X`` is not complete: a
    process killed while it saved step X again finds the earlier save of step X there.
    """
    root = Path(output_dir) / CKPT_DIR
    if not root.is_dir():
        return []
    found: dict[int, Path] = {}
    for pattern in (_STEP_RE, _REPLACED_RE):  # step_X first: it wins over .replaced_step_X
        for p in root.iterdir():
            m = pattern.match(p.name)
            if m and (p / MARKER).is_file():
                found.setdefault(int(m.group(1)), p)
    return [found[k] for k in sorted(found)]


def _unwrap_opt(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    return optimizer.optimizer if hasattr(optimizer, "optimizer") else optimizer


class CheckpointError(RuntimeError):
    """A checkpoint written in the background failed; the previous complete one is intact."""


class PeerError(RuntimeError):
    """Raised on the processes that did not fail when another one did (its error says why)."""


def raise_together(accelerator, error: BaseException | None, what: str) -> None:
    """Collective: every rank calls it at the same point. If any rank passes an error, every
    rank raises: that rank its own error, the others a :class:`PeerError` naming the failed
    rank(s), so that no rank is left waiting in a collective the failed one never reaches.

    With one process it only re-raises ``error`` (no collective, nothing else changes).
    """
    if accelerator.num_processes == 1:
        if error is not None:
            raise error
        return
    flag = torch.tensor([float(error is not None)], device=accelerator.device)
    failed = [r for r, f in enumerate(accelerator.gather(flag).tolist()) if f]
    if error is not None:
        raise error
    if failed:
        ranks = ", ".join(str(r) for r in failed)
        raise PeerError(
            f"{what}: failed on process {ranks} (its error says why); this process stops too"
        )


class CheckpointWriter:
    """Runs one checkpoint write at a time in a background thread (``--async_save``).

    ``submit`` first waits for the write before it; ``wait`` blocks until the current one is
    done and raises :class:`CheckpointError` if it failed; ``poll`` raises only if it is done.
    The thread is not a daemon: a process that ends (also by an exception) finishes the write
    first; a killed one leaves an incomplete folder that ``--resume auto`` skips.
    """

    THREAD_NAME = "maepl-checkpoint"  # wait_for_earlier_writes finds the writes by it

    def __init__(self):
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._what = ""

    def submit(self, what: str, job: Callable[[], None]) -> None:
        self.wait()
        self._what = what

        def run() -> None:
            try:
                job()
            except BaseException as err:  # raised in the training thread at the next wait
                self._error = err

        self._thread = threading.Thread(target=run, name=self.THREAD_NAME, daemon=False)
        self._thread.start()

    def poll(self) -> None:
        """Raise now if the write has already failed (does not wait)."""
        if self._thread is not None and not self._thread.is_alive():
            self.wait()

    def wait(self) -> None:
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            err, self._error = self._error, None
            raise CheckpointError(f"{self._what} was not written: {err!r}") from err


def wait_for_earlier_writes() -> None:
    """Join checkpoint writes still running in this process: a run that raised (in a
    notebook, a test, any caller of a script's ``main()``) leaves its write to finish in the
    background; the next run must not check, resume or ``--overwrite`` its folder meanwhile.
    A failed write was the earlier run's: its error stays there."""
    for thread in threading.enumerate():
        if thread.name == CheckpointWriter.THREAD_NAME and thread is not threading.current_thread():
            print("waiting for an earlier run's checkpoint write in this process", flush=True)
            thread.join()


def save_checkpoint(
    accelerator,
    output_dir: str | Path,
    step: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    state: dict,
    generator: torch.Generator | None,
    keep_last: int,
    with_grads: bool = False,
    writer: CheckpointWriter | None = None,
) -> Path:
    """Collective: every rank calls it. Rank files first, then the main process writes the
    shared files, renames the folder into place, marks it complete and prunes old ones.

    ``with_grads``: stopped mid-accumulation; each rank's partial local gradients are part of
    the state (under DDP's no_sync they differ per rank).

    ``writer``: the main process copies the model and optimizer state to host memory (checked
    finite) and returns; ``writer`` writes them, renames, marks and prunes in its thread. The
    rank files are written before it returns, so no other rank waits for the thread. Pass a
    writer on every rank or on none: the ranks' barriers must match.
    """
    final = step_dir(output_dir, step)
    tmp = final.parent / f".tmp_{final.name}"
    # an error on one rank is raised on all of them (raise_together) before the next barrier
    error = None
    if accelerator.is_main_process:
        try:
            if writer is not None:
                writer.wait()  # the previous save, normally long done; its error is raised here
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir(parents=True)
        except Exception as err:
            error = err
    raise_together(accelerator, error, f"checkpoint {final}")
    accelerator.wait_for_everyone()
    rank = accelerator.process_index
    job = None
    try:
        save_file(host_copies(rng_state(generator)), tmp / f"rng_rank{rank}.safetensors")
        if with_grads:
            named = accelerator.unwrap_model(model).named_parameters()
            grads = {n: p.grad for n, p in named if p.grad is not None}
            save_file(host_copies(grads), tmp / f"grads_rank{rank}.safetensors")
        if accelerator.is_main_process:
            # checked where they live, then copied to host memory: training may change the
            # live tensors once this returns
            sd = accelerator.unwrap_model(model).state_dict()
            assert_finite(sd, f"checkpoint step {step}")
            opt_tensors, opt_meta = optimizer_to_files(_unwrap_opt(optimizer))
            assert_finite(opt_tensors, f"checkpoint step {step} (optimizer)")
            sd, opt_tensors = host_copies(sd), host_copies(opt_tensors)
            scaler = accelerator.scaler.state_dict() if accelerator.scaler is not None else None
            meta = dict(
                state, optimizer=opt_meta, scaler=scaler, num_processes=accelerator.num_processes
            )
            meta_text = json.dumps(meta, indent=1)

            def job() -> None:
                save_file(sd, tmp / "model.safetensors")
                save_file(opt_tensors, tmp / "optimizer.safetensors")
                (tmp / "state.json").write_text(meta_text)
                _move_into_place(tmp, final)
                for old in complete_checkpoints(output_dir)[:-keep_last] if keep_last else []:
                    shutil.rmtree(old, ignore_errors=True)

    except Exception as err:
        error = err
    raise_together(accelerator, error, f"checkpoint {final}")
    accelerator.wait_for_everyone()  # every rank's files are in tmp
    if job is not None:
        if writer is None:
            job()
        else:
            writer.submit(f"checkpoint {final}", job)
    if writer is None:
        accelerator.wait_for_everyone()
    return final


def _move_into_place(tmp: Path, final: Path) -> None:
    """Rename ``tmp`` to ``final`` and mark it complete. A complete folder already at ``final``
    (the same step saved again, e.g. stopped mid-accumulation just after a periodic save) is
    moved aside first and deleted only once its replacement is complete."""
    aside = final.parent / f".replaced_{final.name}"
    if final.exists():
        if (final / MARKER).is_file():
            if aside.exists():  # left by a killed save; final is complete
                shutil.rmtree(aside)
            final.rename(aside)
        else:  # a stale, incomplete folder of the same step
            shutil.rmtree(final)
    tmp.rename(final)
    (final / MARKER).write_text("ok\n")  # written last: the folder is now complete
    if aside.exists():
        shutil.rmtree(aside, ignore_errors=True)


def set_aside_checkpoints_after(output_dir: str | Path, step: int) -> Path | None:
    """Move the complete checkpoints of ``output_dir`` beyond ``step`` to
    ``checkpoints/abandoned/after_step_XXXXXXXX[_n]/`` and return that folder (None if none).

    Called when a run resumes from an older checkpoint than its newest: the later ones belong
    to the branch it leaves. Left in place, ``--keep_last`` would prune the new branch's
    checkpoints before them and ``--resume auto`` would continue the old branch. They are
    kept (not deleted), out of the way of both.
    """
    later = [p for p in complete_checkpoints(output_dir) if step_of(p) > step]
    if not later:
        return None
    base = Path(output_dir) / CKPT_DIR / ABANDONED / f"after_step_{step:08d}"
    dest, n = base, 1
    while dest.exists():
        n += 1
        dest = base.with_name(f"{base.name}_{n}")
    dest.mkdir(parents=True)
    for p in later:
        p.rename(dest / f"step_{step_of(p):08d}")
    return dest


def is_run_folder(path: str | Path) -> bool:
    """A maepl run's output folder (its config.yaml, checkpoints/, export/), which holds
    weights only below it."""
    path = Path(path)
    return (
        (path / "config.yaml").is_file()
        and not (path / "model.safetensors").exists()
        and ((path / "checkpoints").is_dir() or (path / "export").is_dir())
    )


def resolve_resume(resume: str, output_dir: str | Path) -> Path | None:
    """``auto``: newest complete checkpoint under output_dir (None if none); else a path."""
    if not resume:
        return None
    if resume == "auto":
        found = complete_checkpoints(output_dir)
        return found[-1] if found else None
    path = Path(resume)
    if path.is_file():
        raise ConfigError(
            f"resume: {path} is a file: maepl resumes only from its own checkpoint folders "
            "(step_XXXXXXXX). Weights to start from (an official MAE .pth, an export) are given "
            f"as pretrain.py's --initial_checkpoint {path} or finetune.py's and linprobe.py's "
            "--finetune; finetune.py --eval evaluates such a file given as --resume too"
        )
    if is_run_folder(path):
        raise ConfigError(
            f"resume: {path} is a run's folder, not one of its checkpoints: --resume auto "
            f"--output_dir {path} continues its latest complete checkpoint (or give one of "
            f"{path / 'checkpoints'}/step_XXXXXXXX)"
        )
    if not path.is_dir() or not (path / MARKER).is_file() or not (path / "state.json").is_file():
        raise ConfigError(
            f"resume: {path} is not a complete maepl checkpoint folder (a step_XXXXXXXX folder "
            f"holding {MARKER} and state.json); maepl resumes only from its own safetensors "
            "checkpoints"
        )
    return path


def load_checkpoint(
    path: Path,
    accelerator,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    generator: torch.Generator | None,
    partial_grads: bool = True,
) -> dict:
    """Restore weights, optimizer, scaler, this rank's RNG and (``partial_grads``) the partial
    gradients of a checkpoint saved mid-accumulation.

    Returns the counters and config stored in state.json. Only safetensors and JSON are read.
    """
    meta = json.loads((path / "state.json").read_text())
    accelerator.unwrap_model(model).load_state_dict(load_file(path / "model.safetensors"))
    opt_state = optimizer_from_files(load_file(path / "optimizer.safetensors"), meta["optimizer"])
    try:
        _unwrap_opt(optimizer).load_state_dict(opt_state)
    except ValueError as err:  # torch's message names neither the file nor the cause
        raise ConfigError(
            f"resume: the optimizer state in {path} does not fit this run's optimizer ({err}); "
            "its parameter groups were built under other settings (e.g. layer_decay, "
            "weight_decay or which parameters train)"
        ) from err
    if meta.get("scaler") and accelerator.scaler is not None:
        accelerator.scaler.load_state_dict(meta["scaler"])
    rank = accelerator.process_index
    rng_file = path / f"rng_rank{rank}.safetensors"
    # under another number of processes the streams do not map onto the ranks: the caller
    # draws new ones (Run._reseed) where "rng_restored" is False
    meta["rng_restored"] = (
        meta.get("num_processes") == accelerator.num_processes and rng_file.is_file()
    )
    if meta["rng_restored"]:
        set_rng_state(load_file(rng_file), generator)
    grads_file = path / f"grads_rank{rank}.safetensors"
    if partial_grads and grads_file.is_file():  # stopped mid-accumulation: put them back
        grads = load_file(grads_file)
        for n, p in accelerator.unwrap_model(model).named_parameters():
            if n in grads:
                p.grad = grads[n].to(p.device)
    return meta
