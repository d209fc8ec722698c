"""What maepl records beside the weights it writes (an export's config.json, mae.json, a
checkpoint's state.json), read back, and the config keys a command leaves unset filled in
from it: the architecture of a --finetune export, the classifier of an --eval, the run a
--resume continues.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from .config import ARCH_KEYS, SHAPE_KEYS
from .config_io import ConfigError


def _first(v):
    return v[0] if isinstance(v, (list, tuple)) else v


def _record(path: str | Path, strict: bool = True) -> tuple[str, Path, dict] | None:
    """What maepl wrote beside the weights at ``path``: ("export", file, config.json of a timm
    local-dir export) or ("run", file, the run config of mae.json / a checkpoint's state.json);
    None for foreign files. A config.json without ``architecture`` (a Hugging Face folder, say)
    is a ConfigError naming it if ``strict``, else read as foreign."""
    p = Path(path)
    folder = p if p.is_dir() else p.parent
    # the folder's records describe the folder and its model.safetensors only: another file
    # beside them (an official .pth put in an export folder, say) is foreign
    own = p.is_dir() or p.name == "model.safetensors"
    if own and (folder / "config.json").is_file():  # encoder / classifier export (timm layout)
        file = folder / "config.json"
        cfg = json.loads(file.read_text())
        if "architecture" in cfg:
            return "export", file, cfg
        if not strict:
            return None
        raise ConfigError(
            f"finetune: {file} has no 'architecture' entry, so the architecture cannot be read "
            "from it (maepl and timm local-dir exports write 'architecture' and 'model_args'); "
            "for other weights pass --model and the shape flags (--input_size --patch_size "
            "--in_chans --embed_dim --depth --num_heads)"
        )
    if p.suffix == ".safetensors" and p.with_suffix(".json").is_file():  # export/mae.safetensors
        file = p.with_suffix(".json")
        run_cfg = json.loads(file.read_text())
    elif own and (folder / "state.json").is_file():  # a maepl checkpoint folder
        file = folder / "state.json"
        run_cfg = json.loads(file.read_text()).get("config")
    else:
        return None
    return ("run", file, run_cfg) if run_cfg else None


def stored_architecture(path: str | Path) -> dict | None:
    """``model`` and shape keys recorded beside maepl weights; None for foreign files."""
    record = _record(path)
    if record is None:
        return None
    kind, _, cfg = record
    if kind == "export":
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
    model = cfg.get("encoder") or cfg.get("model")
    shape = {k: cfg[k] for k in SHAPE_KEYS[1:] if cfg.get(k) is not None}
    return {"model": model, **shape}


def stored_model(path: str | Path) -> dict | None:
    """How the model the weights at ``path`` belong to was built, as recorded beside them;
    None for foreign files. Keys (each only where recorded):

    - ``file``: the file it was read from;
    - ``pos_embed``: False if the weights have no position embedding (``--pos_embed none``);
    - ``nb_classes``: the classifier's classes, 0 for an encoder without a head;
    - ``global_pool``: the classifier's pooling (``avg`` with ``fc_norm``, or ``token``).
    """
    record = _record(path, strict=False)
    if record is None:
        return None
    kind, file, cfg = record
    if kind == "export":
        args = cfg.get("model_args", {})
        out = dict(file=file, pos_embed=args.get("pos_embed") != "none")
        out["nb_classes"] = cfg.get("num_classes", args.get("num_classes", 0))
        if out["nb_classes"]:
            out["global_pool"] = args.get("global_pool", cfg.get("global_pool", "token"))
        return out
    out = dict(file=file, pos_embed=cfg.get("pos_embed") != "none")
    if "mask_ratio" in cfg:  # a pretraining run: encoder (+ decoder), no classifier
        out["nb_classes"] = 0
    elif "layer_decay" in cfg:  # a fine-tuning run; nb_classes null: the dataset's
        if cfg.get("nb_classes"):
            out["nb_classes"] = cfg["nb_classes"]
        if cfg.get("global_pool"):
            out["global_pool"] = cfg["global_pool"]
    return out


def _resumed_config(resume: str, output_dir: str) -> dict | None:
    """The config recorded by the checkpoint ``--resume`` names (None: no resume, or auto
    found none; Run then names what is missing)."""
    from .checkpoint import resolve_resume
    from .run_dir import read_state

    ckpt = resolve_resume(resume, output_dir) if resume else None
    return None if ckpt is None else read_state(ckpt).get("config", {})


def from_resumed(cfg, keys: tuple[str, ...]):
    """With ``--resume``, take what the checkpoint records for those of ``keys`` the command
    leaves unset (None, "" or auto): the resumed or evaluated run is the one trained, so
    ``--eval --resume auto`` needs no architecture flags."""
    saved = _resumed_config(cfg.resume, cfg.output_dir)
    if saved is None:
        return cfg
    updates = {
        k: saved[k]
        for k in keys
        if saved.get(k) is not None and getattr(cfg, k) in (None, "", "auto")
    }
    if "finetune" in updates and not Path(updates["finetune"]).exists():
        del updates["finetune"]  # the probe's checkpoint holds its encoder; the check names it
    return dataclasses.replace(cfg, **updates)


# what --eval --resume takes from the checkpoint where the command (flags or --config) does
# not give it: the model with its heads, and the transform of the evaluation; the data too,
# as a pair (another --data_path with the trained run's --dataset would mix two datasets)
EVAL_KEYS = (*ARCH_KEYS, "global_pool", "nb_classes", "crop_pct", "mean", "std")
DATA_KEYS = ("dataset", "data_path")


def evaluated_as_trained(cls, given: dict) -> dict:
    """``--eval --resume <checkpoint folder or auto>``: ``given`` (the keys the command set)
    with the EVAL_KEYS it leaves out as the checkpoint records them, so a run fine-tuned with
    ``--pos_label abs --crop_pct 0.9`` or probed with ``--global_pool avg`` is evaluated as it
    was trained, also where maepl has a default of its own. Training resumes keep the
    command's values (changes are reported, architecture changes refused)."""
    from .config_io import _user_fields

    resume = given.get("resume") or ""
    if not given.get("eval") or (resume != "auto" and Path(resume).is_file()):
        return given  # (finetune.py --eval --resume <weights file>: evaluated as --finetune)
    saved = _resumed_config(resume, given.get("output_dir", cls.output_dir))
    if saved is None:
        return given
    names = {f.name for f in _user_fields(cls)}
    keys = [k for k in EVAL_KEYS if k in names and k in saved and k not in given]
    if not any(k in given for k in DATA_KEYS):
        keys += [k for k in DATA_KEYS if k in saved]
    return {**given, **{k: saved[k] for k in keys}}


def as_recorded(cfg, keys: tuple[str, ...]):
    """Fill ``pos_embed`` (when auto) and ``keys`` (when unset) from what maepl recorded beside
    the --finetune weights; a value set that contradicts the record is a ConfigError naming
    both. Weights without a record keep the values given (loading checks them)."""
    rec = stored_model(cfg.finetune) if cfg.finetune else None
    if rec is None:
        return cfg
    updates = {}
    if "nb_classes" in keys and rec.get("nb_classes") == 0:
        raise ConfigError(
            f"finetune: {cfg.finetune} holds an encoder without a classifier head "
            f"({rec['file']} records num_classes 0); --eval needs a fine-tuned classifier, "
            "such as export/best or export/last of finetune.py"
        )
    for key in keys:
        stored, given = rec.get(key), getattr(cfg, key)
        if stored is None:
            continue
        if given is None:
            updates[key] = stored
        elif given != stored:
            raise ConfigError(
                f"{key}: {cfg.finetune} was trained with {key} {stored!r} ({rec['file']}), "
                f"but {given!r} was given; evaluating it needs its own value"
            )
    if cfg.pos_embed == "auto":
        updates["pos_embed"] = "learned" if rec["pos_embed"] else "none"
    elif (cfg.pos_embed != "none") != rec["pos_embed"]:
        has = "has a position embedding" if rec["pos_embed"] else "has none (--pos_embed none)"
        raise ConfigError(
            f"pos_embed: the encoder of {cfg.finetune} {has} ({rec['file']}), but "
            f"{cfg.pos_embed!r} was given; leave pos_embed at auto to use the encoder as it "
            "was trained"
        )
    return dataclasses.replace(cfg, **updates)
