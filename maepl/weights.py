"""Loading pretrained encoders for fine-tuning and probing: maepl exports and checkpoints, and
the official MAE release (``.pth``), without running any pickled code.

Everything is read with safetensors or ``torch.load(weights_only=True)``; the only class the
unpickler may build beyond tensors and plain containers is ``argparse.Namespace`` (the ``args``
entry of MAE's training checkpoints), which holds attributes and runs no code of its own.
"""

from __future__ import annotations

import argparse
import json
import pickle
from pathlib import Path

import torch
from safetensors.torch import load_file
from timm.layers import resample_abs_pos_embed
from torch import nn

from .config import SHAPE_KEYS
from .models.pos_embed import sincos_2d

# keys of MAE training that are not part of the encoder
_NOT_ENCODER = ("decoder", "mask_token", "pos_mask_token", "pos_head.")


def _first(v):
    return v[0] if isinstance(v, (list, tuple)) else v


def stored_architecture(path: str | Path) -> dict | None:
    """``model`` and shape keys recorded beside maepl weights; None for foreign files."""
    p = Path(path)
    folder = p if p.is_dir() else p.parent
    if (folder / "config.json").is_file():  # encoder / classifier export (timm layout)
        cfg = json.loads((folder / "config.json").read_text())
        args = cfg.get("model_args", {})
        arch = dict(
            model=cfg["architecture"],
            input_size=_first(args.get("img_size")),
            patch_size=_first(args.get("patch_size")),
            in_chans=args.get("in_chans"),
            embed_dim=args.get("embed_dim"),
            depth=args.get("depth"),
            num_heads=args.get("num_heads"),
        )
        return {k: v for k, v in arch.items() if v is not None}
    run_cfg = None
    if p.suffix == ".safetensors" and p.with_suffix(".json").is_file():  # export/mae.safetensors
        run_cfg = json.loads(p.with_suffix(".json").read_text())
    elif (folder / "state.json").is_file():  # a maepl checkpoint folder
        run_cfg = json.loads((folder / "state.json").read_text()).get("config")
    if not run_cfg:
        return None
    model = run_cfg.get("encoder") or run_cfg.get("model")
    shape = {k: run_cfg[k] for k in SHAPE_KEYS[1:] if run_cfg.get(k) is not None}
    return {"model": model, **shape}


def read_state_dict(path: str | Path) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Encoder tensors with timm's key names, and the keys dropped as not-encoder.

    Accepts an export folder, a checkpoint folder, a ``.safetensors`` file, or a ``.pth``
    holding a state dict directly or under ``model`` (MAE) / ``state_dict``.
    """
    p = Path(path)
    if p.is_dir():
        p = p / "model.safetensors"
    if not p.exists():
        raise FileNotFoundError(f"finetune: no such file {p}")
    if p.suffix == ".safetensors":
        sd = load_file(p)
    else:
        sd = _load_pth(p)
    # maepl's MAE wraps the encoder as "encoder."; DDP-saved files carry "module."
    if any(k.startswith("encoder.") for k in sd):
        sd = {k: v for k, v in sd.items() if not k.startswith("encoder.")} | {
            k[len("encoder.") :]: v for k, v in sd.items() if k.startswith("encoder.")
        }
    sd = {k.removeprefix("module."): v for k, v in sd.items()}
    if any(k.startswith("vit.") for k in sd):  # a maepl fine-tuning checkpoint
        sd = {k[len("vit.") :]: v for k, v in sd.items() if k.startswith("vit.")}
    dropped = sorted(k for k in sd if k.startswith(_NOT_ENCODER))
    return {k: v for k, v in sd.items() if k not in dropped}, dropped


def _load_pth(p: Path) -> dict[str, torch.Tensor]:
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            obj = torch.load(p, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, AttributeError) as e:
        raise ValueError(
            f"finetune: {p} needs more than tensors and plain containers to unpickle, so it was "
            f"refused (maepl reads .pth files only with torch.load(weights_only=True)): {e}"
        ) from None
    if isinstance(obj, dict):
        for key in ("model", "state_dict"):
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not all(torch.is_tensor(v) for v in obj.values()):
        raise ValueError(
            f"finetune: {p} holds no state dict (expected tensors, or a 'model' entry)"
        )
    return obj


def load_encoder_weights(
    model: nn.Module, path: str | Path, pos_embed: str
) -> dict[str, list[str]]:
    """Load pretrained encoder weights into a timm ViT (with a new head); returns a report.

    Fails, listing the keys, unless the only missing keys are the new head (and ``fc_norm``
    with average pooling) and nothing unexpected remains. The position embedding is resampled
    to the model's grid; a checkpoint without one (``--pos_embed none`` pretraining) gets
    sin-cos values to start from, as MP3 does.
    """
    sd, dropped = read_state_dict(path)
    notes = [f"dropped {len(dropped)} pretraining-only keys"] if dropped else []
    prefix = 0 if getattr(model, "no_embed_class", False) else model.num_prefix_tokens
    if "pos_embed" in sd and model.pos_embed is None:
        sd.pop("pos_embed")
        notes.append("pos_embed of the checkpoint unused (--pos_embed none)")
    elif "pos_embed" in sd and sd["pos_embed"].shape != model.pos_embed.shape:
        old = sd["pos_embed"].shape
        sd["pos_embed"] = resample_abs_pos_embed(
            sd["pos_embed"], new_size=model.patch_embed.grid_size, num_prefix_tokens=prefix
        )
        notes.append(f"pos_embed resampled {tuple(old)} -> {tuple(sd['pos_embed'].shape)}")
    if isinstance(model.norm, nn.Identity):  # average pooling: fc_norm replaces norm
        for k in ("norm.weight", "norm.bias"):
            if sd.pop(k, None) is not None:
                notes.append(f"{k} unused (global_pool avg uses fc_norm)")
    head = model.get_classifier()
    for k in [k for k in sd if k.startswith("head.")]:
        target = dict(model.named_parameters()).get(k)
        if target is None or target.shape != sd[k].shape:
            sd.pop(k)
            notes.append(f"{k} of the checkpoint dropped (new head)")
    missing, unexpected = model.load_state_dict(sd, strict=False)
    if model.pos_embed is not None and "pos_embed" in missing:
        missing.remove("pos_embed")
        fill_sincos(model)
        notes.append("pos_embed absent from the checkpoint: initialised with sin-cos")
    allowed = tuple(n for n, _ in head.named_parameters(prefix="head")) if head is not None else ()
    allowed += (
        ("fc_norm.weight", "fc_norm.bias") if not isinstance(model.fc_norm, nn.Identity) else ()
    )
    bad_missing = [k for k in missing if k not in allowed]
    if bad_missing or unexpected:
        raise ValueError(
            f"finetune: {path} does not fit {type(model).__name__}: missing keys "
            f"{bad_missing}, unexpected keys {list(unexpected)}"
        )
    if pos_embed == "sincos" and model.pos_embed is not None:
        fill_sincos(model)
    return dict(missing=list(missing), unexpected=list(unexpected), notes=notes)


def fill_sincos(model: nn.Module) -> None:
    """Set a timm ViT's pos_embed to MAE's 2-D sin-cos values (class-token row zero)."""
    gh, gw = model.patch_embed.grid_size
    cls = model.pos_embed.shape[1] == gh * gw + 1
    with torch.no_grad():
        model.pos_embed.copy_(sincos_2d(model.embed_dim, gh, gw, cls)[None])
