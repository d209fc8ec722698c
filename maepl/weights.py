"""Loading pretrained encoders for fine-tuning and probing, and whole MAE models to continue
pretraining from: maepl exports and checkpoints, and the official MAE release (``.pth``),
without running any pickled code.

Everything is read with safetensors or ``torch.load(weights_only=True)``; the only class the
unpickler may build beyond tensors and plain containers is ``argparse.Namespace`` (the ``args``
entry of MAE's training checkpoints), which holds attributes and runs no code of its own.
"""

from __future__ import annotations

import argparse
import math
import pickle
from pathlib import Path

import torch
from safetensors.torch import load_file
from timm.layers import resample_abs_pos_embed
from timm.models import adapt_input_conv
from torch import nn

from .config_io import ConfigError
from .models.pos_embed import sincos_2d
from .recorded import stored_architecture

# keys of MAE training that are not part of the encoder
_NOT_ENCODER = ("decoder", "mask_token", "pos_mask_token", "pos_head.")


def read_state_dict(
    path: str | Path, key: str = "finetune"
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Encoder tensors with timm's key names, and the keys dropped as not-encoder.

    Accepts an export folder, a checkpoint folder, a ``.safetensors`` file, or a ``.pth``
    holding a state dict directly or under ``model`` (MAE) / ``state_dict``. Errors name the
    config ``key`` that gave ``path``.
    """
    sd = _normalised_state_dict(path, key)
    dropped = sorted(k for k in sd if k.startswith(_NOT_ENCODER))
    return {k: v for k, v in sd.items() if k not in dropped}, dropped


def _normalised_state_dict(path: str | Path, key: str) -> dict[str, torch.Tensor]:
    """All tensors of ``path``, the encoder's under timm's names, the rest (decoder, position
    head) under maepl's, which are the official MAE code's too."""
    p = Path(path)
    if p.is_dir():
        p = p / "model.safetensors"
    if not p.exists():
        raise ConfigError(f"{key}: no such file {p}")
    if p.suffix == ".safetensors":
        try:
            sd = load_file(p)
        except Exception as e:  # safetensors' own errors name neither the file nor the key
            raise ConfigError(f"{key}: {p} cannot be read as safetensors: {e}") from None
    else:
        sd = _load_pth(p, key)
    # DDP-saved files carry "module." (outside "encoder."); maepl's MAE wraps the encoder
    sd = {k.removeprefix("module."): v for k, v in sd.items()}
    if any(k.startswith("encoder.") for k in sd):
        sd = {k: v for k, v in sd.items() if not k.startswith("encoder.")} | {
            k[len("encoder.") :]: v for k, v in sd.items() if k.startswith("encoder.")
        }
    if any(k.startswith("vit.") for k in sd):  # a maepl fine-tuning checkpoint
        sd = {k[len("vit.") :]: v for k, v in sd.items() if k.startswith("vit.")}
    return sd


def _numpy_globals() -> list:
    """NumPy scalars and dtypes, which checkpoints' ``args`` or ``epoch`` may hold: rebuilt from
    a dtype and bytes, data only. Under both module spellings (NumPy 1's ``numpy.core``, 2's
    ``numpy._core``), since a pickle names the one it was written with."""
    import numpy as np

    core = getattr(np, "_core", None) or np.core
    scalar = core.multiarray.scalar
    dtypes = [type(np.dtype(t)) for t in (np.float16, np.float32, np.float64, np.int32, np.int64)]
    dtypes += [type(np.dtype(t)) for t in (np.bool_, np.uint8, np.int8, np.int16)]
    return [
        (scalar, "numpy.core.multiarray.scalar"),
        (scalar, "numpy._core.multiarray.scalar"),
        np.dtype,
        *dtypes,
    ]


# what torch.load(weights_only=True) may build beyond tensors and plain containers
_SAFE_GLOBALS = [argparse.Namespace, *_numpy_globals()]


def _load_pth(p: Path, key: str) -> dict[str, torch.Tensor]:
    with open(p, "rb") as f:  # torch.save writes a zip archive (a pickle before torch 1.6)
        head = f.read(4)
    if head != b"PK\x03\x04" and head[:1] != b"\x80":
        raise ConfigError(
            f"{key}: {p} is not a torch file (neither a zip archive nor a pickle); weights "
            "are read from safetensors, maepl exports and checkpoints, or torch .pth files"
        )
    try:
        with torch.serialization.safe_globals(_SAFE_GLOBALS):
            obj = torch.load(p, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, AttributeError) as e:  # what weights_only refuses
        raise ConfigError(
            f"{key}: {p} needs more than tensors and plain containers to unpickle, so it was "
            f"refused (maepl reads .pth files only with torch.load(weights_only=True)): {e}"
        ) from None
    except (RuntimeError, EOFError, OSError, KeyError, ValueError) as e:  # truncated, or a
        # garbled pickle (unknown opcodes fail as KeyError or ValueError)
        raise ConfigError(
            f"{key}: {p} cannot be read as a torch file (damaged, or not one): "
            f"{type(e).__name__}: {e}"
        ) from None
    if isinstance(obj, dict):
        for entry in ("model", "state_dict"):
            if isinstance(obj.get(entry), dict):
                obj = obj[entry]
                break
    if not isinstance(obj, dict) or not all(torch.is_tensor(v) for v in obj.values()):
        raise ConfigError(f"{key}: {p} holds no state dict (expected tensors, or a 'model' entry)")
    return obj


def load_encoder_weights(
    model: nn.Module,
    path: str | Path,
    pos_embed: str,
    exact: bool = False,
    key: str = "finetune",
    state: tuple[dict, list[str]] | None = None,
) -> dict[str, list[str]]:
    """Load pretrained encoder weights into a timm ViT (with a new head); returns a report.

    Fails, listing the keys, unless the only missing keys are the new head (and ``fc_norm``
    with average pooling) and nothing unexpected remains. The position embedding is resampled
    to the model's grid; a checkpoint without one (``--pos_embed none`` pretraining) gets
    sin-cos values to start from, as MP3 does.

    ``exact``: the model must be the one the weights were trained as (evaluation, a frozen
    encoder): every parameter and buffer of the model loads from ``path``, its head and norms
    included, and nothing is dropped or filled in, position embedding included (it may still
    be resampled to another grid); ``pos_embed`` "sincos" then keeps the loaded values. Only
    ``head.*`` of a classifier is ignored when the model has no head (a frozen encoder).
    ``state``: ``read_state_dict(path)``'s answer, when the caller has read it already.
    """
    sd, dropped = state if state is not None else read_state_dict(path, key)
    adapted = None if exact else _adapt_rgb_patch_embed(model, sd)
    _check_widths(model, sd, path, key)
    notes = [f"dropped {len(dropped)} pretraining-only keys"] if dropped else []
    notes += [adapted] if adapted else []
    prefix = 0 if getattr(model, "no_embed_class", False) else model.num_prefix_tokens
    head = model.get_classifier()
    head_params = dict(head.named_parameters(prefix="head")) if head is not None else {}
    if exact:
        _check_exact(model, sd, head_params, path)
    if "pos_embed" in sd and model.pos_embed is None:
        sd.pop("pos_embed")
        notes.append("pos_embed of the checkpoint unused (--pos_embed none)")
    elif "pos_embed" in sd and sd["pos_embed"].shape != model.pos_embed.shape:
        old = sd["pos_embed"].shape
        grid = old[1] - prefix
        if grid <= 0 or math.isqrt(grid) ** 2 != grid:
            raise ConfigError(
                f"{key}: {path}: its pos_embed has {old[1]} tokens, which leave no square grid "
                f"after this model's {prefix} prefix (class / register) tokens: the file and "
                f"the model differ in class or register tokens ({model.pos_embed.shape[1]} "
                "position tokens here)"
            )
        # antialias off: MAE's interpolate_pos_embed (bicubic, no antialiasing), same values
        sd["pos_embed"] = resample_abs_pos_embed(
            sd["pos_embed"],
            new_size=model.patch_embed.grid_size,
            num_prefix_tokens=prefix,
            antialias=False,
        )
        notes.append(f"pos_embed resampled {tuple(old)} -> {tuple(sd['pos_embed'].shape)}")
    if isinstance(model.norm, nn.Identity):  # average pooling: fc_norm replaces norm
        for k in ("norm.weight", "norm.bias"):
            if sd.pop(k, None) is not None:
                notes.append(f"{k} unused (global_pool avg uses fc_norm)")
    for k in [k for k in sd if k.startswith("head.")]:
        target = head_params.get(k)
        if target is None or target.shape != sd[k].shape:
            sd.pop(k)
            notes.append(f"{k} of the checkpoint dropped (new head)")
    missing, unexpected = model.load_state_dict(sd, strict=False)
    if model.pos_embed is not None and "pos_embed" in missing:
        missing.remove("pos_embed")
        fill_sincos(model)
        notes.append("pos_embed absent from the checkpoint: initialised with sin-cos")
    allowed = () if exact else tuple(head_params)
    if not exact and not isinstance(model.fc_norm, nn.Identity):
        allowed += ("fc_norm.weight", "fc_norm.bias")
    bad_missing = [k for k in missing if k not in allowed]
    if bad_missing or unexpected:
        why = ""
        if "norm.weight" in bad_missing and "fc_norm.weight" in unexpected:
            why = (
                " (a classifier fine-tuned with global_pool avg, whose fc_norm replaced the "
                "final norm: evaluate it with --global_pool avg, or start from pretraining "
                "weights)"
            )
        raise ConfigError(
            f"{key}: {path} does not fit {type(model).__name__}: missing keys "
            f"{bad_missing}, unexpected keys {list(unexpected)}{why}"
        )
    if pos_embed == "sincos" and model.pos_embed is not None and not exact:
        fill_sincos(model)
        if "pos_embed" in sd:
            notes.append(
                "pos_embed of the checkpoint replaced by fixed sin-cos (--pos_embed sincos)"
            )
    return dict(missing=list(missing), unexpected=list(unexpected), notes=notes)


# the parts of maepl's MAE (and the official one's) beside the encoder, by key prefix;
# decoder_pos_embed is fixed sin-cos and never loaded
_DECODER = ("decoder_embed.", "decoder_blocks.", "decoder_norm.", "decoder_pred.", "mask_token")
# (part, key prefixes, tied to the grid: the position head's classes are grid positions)
_MAE_PARTS = (
    ("decoder", _DECODER, False),
    ("position head", ("pos_head.",), True),
    ("PE-drop token", ("pos_mask_token",), False),  # only with --pos_drop_ratio > 0
)


def load_mae_weights(mae: nn.Module, cfg) -> list[str]:
    """Start pretraining from ``cfg.initial_checkpoint`` (continued pretraining, e.g. from
    MAE's ImageNet release); returns notes on what was loaded and what starts fresh.

    The encoder loads from pretraining weights, encoder exports and classifiers fine-tuned
    with token pooling (resampling the position embedding to a new grid). The decoder and mask
    token load from the same file when it has them, and must then fit the decoder these flags
    build; a file without them (an encoder export, MAE's ``mae_pretrain_vit_*.pth``) leaves
    them fresh. The position head loads when the file has one of the same shapes on the same
    grid (its classes are grid positions), else starts fresh.
    """
    key, path = "initial_checkpoint", cfg.initial_checkpoint
    try:
        recorded = stored_architecture(path) or {}
    except ConfigError:  # a config.json that is not maepl's or timm's: a foreign file
        recorded = {}
    # (input_size may change: the position embedding is resampled to the new grid)
    fixed = {k: v for k, v in recorded.items() if k not in ("model", "input_size")}
    differ = {k: v for k, v in fixed.items() if getattr(cfg, k) != v}
    if differ:  # maepl weights say what they are: name the flags rather than the tensors
        flags = " ".join(f"--{k} {v}" for k, v in fixed.items())
        raise ConfigError(
            f"{key}: {path} records another architecture ("
            + ", ".join(f"{k} {v}, here {getattr(cfg, k)}" for k, v in differ.items())
            + f"); pretrain it with {flags}"
        )
    sd = _normalised_state_dict(path, key)
    encoder = {k: v for k, v in sd.items() if not k.startswith(_NOT_ENCODER)}
    if "fc_norm.weight" in encoder and "norm.weight" not in encoder:
        raise ConfigError(
            f"{key}: {path} is a classifier fine-tuned with average pooling (fc_norm, no final "
            "norm), which the MAE encoder has no place for; start from pretraining weights, an "
            "encoder export or a classifier fine-tuned with --global_pool token"
        )
    encoder = {k: v for k, v in encoder.items() if not k.startswith("head.")}  # a classifier's
    notes = load_encoder_weights(mae.encoder, path, cfg.pos_embed, key=key, state=(encoder, []))[
        "notes"
    ]
    # the grid the file was trained on, from a position embedding's token count
    here = {"decoder_pos_embed": mae.decoder_pos_embed, "pos_embed": mae.encoder.pos_embed}
    grid = next((n for n in here if n in sd and here[n] is not None), None)
    same_grid = grid is not None and sd[grid].shape[1] == here[grid].shape[1]
    notes.append(f"encoder loaded ({len(encoder)} tensors)")
    own = dict(mae.named_parameters())
    for part, prefixes, on_grid in _MAE_PARTS:
        theirs = {k: v for k, v in sd.items() if k.startswith(prefixes)}
        ours = {k: p for k, p in own.items() if k.startswith(prefixes)}
        if not ours or not theirs:
            if ours or theirs:
                notes.append(f"{part}: {'fresh (none in the file)' if ours else 'not used'}")
            continue
        misfit = sorted(
            k
            for k in ours.keys() | theirs.keys()
            if k not in ours or k not in theirs or ours[k].shape != theirs[k].shape
        )
        if misfit and part == "decoder":
            shown = ", ".join(
                f"{k} {tuple(theirs[k].shape) if k in theirs else 'absent'} in the file, "
                f"{tuple(ours[k].shape) if k in ours else 'absent'} here"
                for k in misfit[:4]
            )
            raise ConfigError(
                f"{key}: the decoder of {path} does not fit the one these flags build "
                f"({len(misfit)} keys differ: {shown}); set --decoder_embed_dim, "
                "--decoder_depth, --decoder_num_heads, --patch_size and --in_chans as it was "
                "trained"
            )
        if misfit:
            notes.append(f"{part}: fresh (the file's differs in {len(misfit)} keys)")
            continue
        if on_grid and not same_grid:
            notes.append(f"{part}: fresh (its classes are the positions of another grid)")
            continue
        with torch.no_grad():
            for k, p in ours.items():
                p.copy_(theirs[k])
        notes.append(f"{part} loaded ({len(ours)} tensors)")
    return notes


def _adapt_rgb_patch_embed(model: nn.Module, sd: dict) -> str | None:
    """RGB weights (the official MAE releases) into a model of another channel count, as timm
    does for ``create_model(pretrained=True, in_chans=...)``: ``adapt_input_conv`` sums the
    three input filters for one channel (the same response to a grey image replicated into
    RGB), or repeats and rescales them. Only the channel count may differ; returns a note."""
    k = "patch_embed.proj.weight"
    w, own = sd.get(k), model.state_dict().get(k)
    if w is None or own is None or w.ndim != 4 or w.shape == own.shape or w.shape[1] != 3:
        return None
    if (w.shape[0], *w.shape[2:]) != (own.shape[0], *own.shape[2:]):
        return None  # another width or patch: _check_widths names it
    sd[k] = adapt_input_conv(own.shape[1], w)
    how = "summed" if own.shape[1] == 1 else "repeated and rescaled"
    return f"{k}: 3 input channels {how} to {own.shape[1]} (timm's adapt_input_conv)"


def _check_widths(model: nn.Module, sd: dict, path, key: str) -> None:
    """Raise, naming the tensors, where the weights' shapes are not the model's (another width,
    patch or channel count): load_state_dict would only raise a RuntimeError. The position
    embedding may differ in its token count (it is resampled) and the head in its classes;
    RGB patch-embedding weights have been adapted to the model's channels before."""
    own = model.state_dict()
    wrong = []
    for k in sorted(sd, key=lambda k: (k.startswith("blocks."), k)):  # the telling ones first
        v = sd[k]
        if k not in own or own[k].shape == v.shape or k.startswith("head."):
            continue
        if k == "pos_embed" and own[k].shape[-1] == v.shape[-1]:
            continue
        wrong.append(f"{k} {tuple(v.shape)} in the file, {tuple(own[k].shape)} here")
    if wrong:
        raise ConfigError(
            f"{key}: {path} holds a model of other shapes than the one these flags build ("
            + "; ".join(wrong[:3])
            + (f"; {len(wrong) - 3} more" if len(wrong) > 3 else "")
            + "): set --model and --input_size --patch_size --in_chans --embed_dim --depth "
            "--num_heads as it was trained"
        )


def _check_exact(model: nn.Module, sd: dict, head_params: dict, path) -> None:
    """Raise, naming ``path`` and the keys, where loading ``sd`` into ``model`` would drop,
    replace or fill in a weight (see ``load_encoder_weights(exact=True)``)."""
    problems = []
    if "pos_embed" in sd and model.pos_embed is None:
        problems.append(
            "the weights have a position embedding (pos_embed) that the model, built with "
            "--pos_embed none, lacks"
        )
    if "pos_embed" not in sd and model.pos_embed is not None:
        problems.append(
            "the weights have no position embedding (pos_embed: trained with --pos_embed "
            "none); build the model with --pos_embed none"
        )
    norm = [k for k in ("norm.weight", "norm.bias") if k in sd]
    if norm and isinstance(model.norm, nn.Identity):
        problems.append(
            f"the weights have {norm} (global_pool token), which the model with global_pool "
            "avg has no place for"
        )
    missing_head = [k for k in head_params if k not in sd]
    if missing_head:
        problems.append(f"the weights have no classifier head: missing {missing_head}")
    for k in sorted(k for k in sd if k.startswith("head.") and head_params):
        target = head_params.get(k)
        if target is None:
            problems.append(f"{k} of the weights has no place in the model's head")
        elif target.shape != sd[k].shape:
            problems.append(
                f"{k} of the weights has shape {tuple(sd[k].shape)}, the model's "
                f"{tuple(target.shape)} (another nb_classes)"
            )
    fc_norm = [n for n, _ in model.fc_norm.named_parameters(prefix="fc_norm")]
    if fc_norm and not all(k in sd for k in fc_norm):
        problems.append(
            f"the weights lack {fc_norm}, which global_pool avg needs (weights fine-tuned with "
            "global_pool token have norm.* instead)"
        )
    if problems:
        raise ConfigError(
            f"finetune: {path} does not hold this model as it was trained: " + "; ".join(problems)
        )


def fill_sincos(model: nn.Module) -> None:
    """Set a timm ViT's pos_embed to MAE's 2-D sin-cos values (class-token row zero)."""
    gh, gw = model.patch_embed.grid_size
    cls = model.pos_embed.shape[1] == gh * gw + 1
    with torch.no_grad():
        model.pos_embed.copy_(sincos_2d(model.embed_dim, gh, gw, cls)[None])
