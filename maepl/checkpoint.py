"""Step-named training checkpoints (safetensors + JSON, nothing pickled); exports: export.py.

A checkpoint is ``<output_dir>/checkpoints/step_XXXXXXXX/``: written into a hidden temporary
folder, renamed into place, then marked complete by a ``COMPLETE`` file written last, so a
crash during a save never leaves a folder that ``--resume auto`` would pick. With a
:class:`CheckpointWriter` the main process's files are written in a background thread from a
copy in host memory, so training goes on while they are written.
"""

from __future__ import annotations

import json
import random
import re
import shutil
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .config_io import ConfigError

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


def host_copies(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Contiguous copies of ``sd``'s tensors in host memory, one buffer each (safetensors
    refuses shared or strided storage), which training may not change once this returns.

    CUDA tensors are copied into pinned buffers, queued without waiting and synchronised once:
    ``.cpu()`` into pageable memory waits for each tensor in turn (hundreds for a ViT with AdamW
    moments), and a ``clone()`` on the device first would double its memory for the copy. The
    pinned buffers come from torch's caching host allocator, so later saves reuse them.
    """
    out, devices = {}, set()
    for k, v in sd.items():
        v = v.detach()
        if v.is_cuda:
            out[k] = torch.empty(v.shape, dtype=v.dtype, pin_memory=True)
            out[k].copy_(v, non_blocking=True)
            devices.add(v.device)
        elif v.device.type == "cpu":
            out[k] = v.clone(memory_format=torch.contiguous_format)
        else:  # the copy to the host is the copy
            out[k] = v.contiguous().cpu()
    for device in devices:
        torch.cuda.current_stream(device).synchronize()
    return out


def assert_finite(sd: dict[str, torch.Tensor], what: str) -> None:
    """Refuse to write a non-finite tensor: the error names the first bad key.

    Each tensor is checked where it lives, and the flags are read back once per device (one
    synchronisation, not one per tensor; on the GPU the check takes milliseconds, not the host's
    pass over 1.25 GiB for a ViT-B/16 checkpoint).
    """
    flags: dict[torch.device, list[tuple[str, torch.Tensor]]] = {}
    for k, v in sd.items():
        if v.is_floating_point() and v.numel():
            flags.setdefault(v.device, []).append((k, torch.isfinite(v).all()))
    bad = set()
    for pairs in flags.values():
        ok = torch.stack([flag for _, flag in pairs]).tolist()
        bad.update(k for (k, _), good in zip(pairs, ok, strict=True) if not good)
    for k in sd:  # the first in the dict's order
        if k in bad:
            raise FloatingPointError(f"{what}: tensor {k!r} holds non-finite values; not written")


# ---------------------------------------------------------------------------- optimizer state
def optimizer_to_files(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """Split an optimizer state_dict into tensors (safetensors) and plain JSON."""
    sd = opt.state_dict()
    tensors, extra = {}, {}
    for pid, st in sd["state"].items():
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"state.{pid}.{k}"] = v
            else:
                extra[f"{pid}.{k}"] = v
    groups = [
        {k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()}
        for g in sd["param_groups"]
    ]
    return tensors, {"param_groups": groups, "extra": extra}


def optimizer_from_files(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    """Inverse of ``optimizer_to_files``: a state_dict for ``Optimizer.load_state_dict``."""
    state: dict[int, dict[str, Any]] = {}
    for key, v in tensors.items():
        _, pid, name = key.split(".", 2)
        state.setdefault(int(pid), {})[name] = v
    for key, v in meta["extra"].items():
        pid, name = key.split(".", 1)
        state.setdefault(int(pid), {})[name] = v
    groups = [
        {k: (tuple(v) if k == "betas" else v) for k, v in g.items()} for g in meta["param_groups"]
    ]
    return {"state": state, "param_groups": groups}


# ---------------------------------------------------------------------------- RNG state
def rng_state(generator: torch.Generator | None) -> dict[str, torch.Tensor]:
    """Every RNG that influences training on this process, as tensors (NumPy's and Python's
    drive timm's Mixup/CutMix in the main process)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    version, py_state, py_gauss = random.getstate()
    out = {
        "torch_cpu": torch.get_rng_state(),
        "numpy_keys": torch.from_numpy(keys.astype(np.int64)),
        "numpy_extra": torch.tensor([pos, has_gauss, gauss], dtype=torch.float64),
        "python_state": torch.tensor(py_state, dtype=torch.int64),
        "python_extra": torch.tensor(
            [version, float("nan") if py_gauss is None else py_gauss], dtype=torch.float64
        ),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["torch_cuda"] = torch.cuda.get_rng_state()
    if generator is not None:
        out["mask_generator"] = generator.get_state()
    return out


def set_rng_state(state: dict[str, torch.Tensor], generator: torch.Generator | None) -> None:
    torch.set_rng_state(state["torch_cpu"])
    if "numpy_keys" in state:
        pos, has_gauss, gauss = state["numpy_extra"].tolist()
        keys = state["numpy_keys"].numpy().astype(np.uint32)
        np.random.set_state(("MT19937", keys, int(pos), int(has_gauss), gauss))
        version, py_gauss = state["python_extra"].tolist()
        py_gauss = None if py_gauss != py_gauss else py_gauss  # NaN encodes None
        random.setstate((int(version), tuple(state["python_state"].tolist()), py_gauss))
    if "torch_cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["torch_cuda"])
    if generator is not None and "mask_generator" in state:
        generator.set_state(state["mask_generator"])


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

        self._thread = threading.Thread(target=run, name="maepl-checkpoint", daemon=False)
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


def resolve_resume(resume: str, output_dir: str | Path) -> Path | None:
    """``auto``: newest complete checkpoint under output_dir (None if none); else a path."""
    if not resume:
        return None
    if resume == "auto":
        found = complete_checkpoints(output_dir)
        return found[-1] if found else None
    path = Path(resume)
    if not path.is_dir() or not (path / MARKER).is_file():
        raise FileNotFoundError(
            f"resume: {path} is not a complete maepl checkpoint folder (a step_XXXXXXXX folder "
            f"holding {MARKER}); maepl resumes only from its own safetensors checkpoints"
        )
    return path


def load_checkpoint(
    path: Path,
    accelerator,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    generator: torch.Generator | None,
) -> dict:
    """Restore weights, optimizer, scaler, this rank's RNG and partial gradients.

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
    if meta.get("num_processes") == accelerator.num_processes and rng_file.is_file():
        set_rng_state(load_file(rng_file), generator)
    else:
        accelerator.print(
            f"resume: {path} was written by {meta.get('num_processes')} "
            "processes; RNG streams restart from the seed"
        )
    grads_file = path / f"grads_rank{rank}.safetensors"
    if grads_file.is_file():  # stopped mid-accumulation: put the partial gradients back
        grads = load_file(grads_file)
        for n, p in accelerator.unwrap_model(model).named_parameters():
            if n in grads:
                p.grad = grads[n].to(p.device)
    return meta
