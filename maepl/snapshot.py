"""What a checkpoint holds, as tensors: the model and optimizer state copied to host memory
(checked finite first), the optimizer state split into tensors and JSON, every RNG's state.
Used by checkpoint.py (training checkpoints) and export.py (shared weights)."""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch


def host_copies(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Contiguous copies of ``sd``'s tensors in host memory, one buffer each (safetensors
    refuses shared or strided storage), which training may not change once this returns.

    CUDA tensors are copied into pinned buffers, queued without waiting and synchronised once
    (a ``.cpu()`` into pageable memory waits for each tensor in turn: hundreds for a ViT with
    AdamW moments). The pinned buffers come from torch's caching
    host allocator, which rounds each up to a power of two and keeps it for the process: later
    saves reuse them (ViT-B/16 with AdamW: about 1.9 GiB page-locked from the first save on).
    The copies run on the calling thread's current stream, which this waits for.
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
