"""Typed loading of dataclass configs: YAML presets and command-line flags, checked against
each field's type (unknown keys and wrong types are a ``ConfigError`` naming the key), and
the YAML dump of a resolved config. What the keys mean and which values are valid is
maepl.config's business.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import re
import sys
import types
import typing
from dataclasses import fields
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A bad configuration value; the message names the key."""


# ---------------------------------------------------------------------------- type handling
def _base_type(tp: Any) -> tuple[Any, bool]:
    """(inner type, optional) for ``T`` or ``T | None``."""
    args = typing.get_args(tp)
    if typing.get_origin(tp) in (typing.Union, types.UnionType) and type(None) in args:
        (inner,) = [a for a in args if a is not type(None)]
        return inner, True
    return tp, False


def _parse_bool(text: str) -> bool:
    low = str(text).lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"not a boolean: {text!r}")


def _coerce(key: str, value: Any, tp: Any, from_text: bool) -> Any:
    """Check (YAML) or convert (command line) one value against the field's type."""
    inner, optional = _base_type(tp)
    empty = value is None or (from_text and str(value).lower() in ("none", "null"))
    if empty and optional:
        return None
    if empty and not (value is not None and inner is str):  # "--pos_label none" is a value
        raise ConfigError(f"{key}: may not be empty")
    try:
        if inner is bool:
            if from_text:
                return _parse_bool(value)
            if isinstance(value, bool):
                return value
        elif inner is int:
            if from_text:
                return int(value)
            if isinstance(value, int) and not isinstance(value, bool):
                return value
        elif inner is float:
            # YAML 1.1 reads 1e-4 (no decimal point) as a string; the command line takes it
            if from_text or isinstance(value, str):
                return float(value)
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                return float(value)
        elif inner is str:
            if isinstance(value, str):
                return value
            if isinstance(value, bool):  # YAML 1.1 reads no/off/yes/on as booleans
                raise ConfigError(
                    f"{key}: expected {_type_name(tp)}, got {value!r} (YAML reads an unquoted "
                    f'no, off, yes or on as a boolean): quote it, e.g. {key}: "no"'
                )
        elif typing.get_origin(inner) is list:
            items = value.split(",") if from_text and isinstance(value, str) else value
            if isinstance(items, (list, tuple)):
                return [float(v) for v in items]
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{key}: cannot read {value!r} as {_type_name(tp)} ({e})") from None
    raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r} ({type(value).__name__})")


def _type_name(tp: Any) -> str:
    inner, optional = _base_type(tp)
    name = getattr(inner, "__name__", str(inner))
    if typing.get_origin(inner) is list:
        name = "list of numbers"
    return f"{name} or null" if optional else name


def _user_fields(cls) -> list[dataclasses.Field]:
    return [f for f in fields(cls) if not f.metadata.get("internal")]


def _field_types(cls, internal: bool = False) -> dict[str, Any]:
    """Field name -> evaluated type (annotations are strings under postponed evaluation)."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in (fields(cls) if internal else _user_fields(cls))}


# ---------------------------------------------------------------------------- loading
def load_yaml(path: str | Path, cls) -> dict[str, Any]:
    """Read and type-check a YAML preset; unknown keys are errors."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config: no such file {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"config: {path} is not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config: {path} must hold a mapping of keys to values")
    types_ = _field_types(cls)
    out = {}
    for key, value in data.items():
        name = str(key).replace("-", "_")
        if name not in types_:
            raise ConfigError(f"{key}: unknown key in {path}{_suggest(name, types_)}")
        out[name] = _coerce(name, value, types_[name], from_text=False)
    return out


def _suggest(name: str, known) -> str:
    import difflib

    close = difflib.get_close_matches(name, list(known), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


_FIELD_LINE = re.compile(r"^\s+(\w+): [^=#]+=[^#]*?(?:#\s*(.*))?$")


def field_comments(cls) -> dict[str, str]:
    """Field name -> what the config class's source says of it: the comment on its line, else
    the comment lines just above it (a subclass's own wins). The ``--help`` of each flag, so
    that it reads what config.py says and cannot drift from it."""
    out: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass) or klass is object:
            continue
        above: list[str] = []
        for line in inspect.getsource(klass).splitlines():
            stripped = line.strip()
            if stripped.startswith("#"):
                text = stripped.lstrip("#").strip()
                above = [] if text.startswith("---") else [*above, text]  # "# --- model": a rule
                continue
            m = _FIELD_LINE.match(line)
            if m and not stripped.startswith(("def ", "return")):
                text = m.group(2) or " ".join(above)
                if text:
                    out[m.group(1)] = text
            above = []
    return out


# ---------------------------------------------------------------------------- official flags
# Flags of the official MAE scripts (main_pretrain.py, main_finetune.py, main_linprobe.py)
# that maepl spells or handles otherwise: a command written for them runs, or says why not.
# Each applies where the config has the key named second (None: every config).
_OFFICIAL_SAME = {  # the same setting in maepl's words
    "cls_token": (["--global_pool", "token"], "global_pool"),
    "no_pin_mem": (["--pin_mem", "false"], None),
}
_OFFICIAL_DONE = {  # accepted and dropped: maepl always does what they ask for
    "dist_eval": (
        "the classifier's evaluation is always split over the processes (linprobe.py --knn "
        "runs on the main process)",
        "global_pool",
    ),
    "local_rank": (
        "`python -m torch.distributed.launch` passes it; the rank is read from "
        "the launcher's environment",
        None,
    ),
}
_LAUNCHER = (
    "the process group comes from the launcher: `torchrun --nproc_per_node N` (with --nnodes "
    "and --rdzv_endpoint for several nodes) or `accelerate launch`"
)
_OFFICIAL_REFUSED = {
    "log_dir": ("TensorBoard events go to <output_dir>/tensorboard (log.jsonl beside them)", None),
    "device": (
        "Accelerate places each process on its GPU when CUDA is visible (choose them "
        "with CUDA_VISIBLE_DEVICES), else on the CPU",
        None,
    ),
    "world_size": (_LAUNCHER, None),
    "dist_url": (_LAUNCHER, None),
    "dist_on_itp": (_LAUNCHER, None),
    "start_epoch": (
        "a resume continues at the step, epoch and batch its checkpoint records "
        "(--resume <checkpoint folder> or --resume auto)",
        None,
    ),
    "resplit": ("the official main_finetune.py parses it but never uses it", "reprob"),
}
_BARE = {"global_pool": "avg"}  # the official --global_pool takes no value: mean pooling
# a flag of another maepl script (timm's --initial_checkpoint where --finetune is meant, ...)
_OTHER_SCRIPT = {
    "initial_checkpoint": (
        "finetune",
        "finetune.py and linprobe.py start from weights with --finetune",
    ),
    "finetune": ("initial_checkpoint", "pretrain.py starts from weights with --initial_checkpoint"),
}


def _flag_name(word: str) -> str | None:
    return word[2:].split("=", 1)[0].replace("-", "_") if word.startswith("--") else None


def translate_official_flags(cls, argv: list[str]) -> list[str]:
    """``argv`` with the official MAE flags above put in maepl's words; a ConfigError names
    one maepl has no use for and says what to do instead."""
    keys = {f.name for f in _user_fields(cls)}
    out: list[str] = []
    skip = False
    for i, word in enumerate(argv):
        if skip:  # the value of --local_rank N
            skip = False
            continue
        name = _flag_name(word)
        if name in keys or name is None:
            out.append(word)
            continue
        if name in _OTHER_SCRIPT and _OTHER_SCRIPT[name][0] in keys:
            raise ConfigError(f"{name}: not a flag of this script: {_OTHER_SCRIPT[name][1]}")
        for table in (_OFFICIAL_SAME, _OFFICIAL_DONE, _OFFICIAL_REFUSED):
            if name in table and (table[name][1] is None or table[name][1] in keys):
                break
        else:
            out.append(word)  # argparse names it, with the flags it knows
            continue
        if name in _OFFICIAL_REFUSED:
            raise ConfigError(
                f"{name}: an official MAE flag maepl has no use for: "
                f"{_OFFICIAL_REFUSED[name][0]}; drop --{name}"
            )
        if name != "local_rank" and "=" in word:  # the official ones take no value
            raise ConfigError(f"{name}: takes no value (got {word!r})")
        if name in _OFFICIAL_SAME:
            out += _OFFICIAL_SAME[name][0]
        elif name == "local_rank" and "=" not in word:  # a flag after it is not its value
            skip = i + 1 < len(argv) and not argv[i + 1].startswith("--")
    pools = set(_flag_values(out, "global_pool", bare=_BARE["global_pool"]))
    if "global_pool" in keys and len(pools) > 1:
        raise ConfigError(
            f"global_pool: given as {' and '.join(sorted(pools))} (--cls_token means "
            "--global_pool token); give one"
        )
    return out


def _flag_values(argv: list[str], key: str, bare: str) -> list[str]:
    """The values ``argv`` gives flag ``key`` (``bare`` where it has none)."""
    found = []
    for i, word in enumerate(argv):
        if _flag_name(word) == key:
            if "=" in word:
                found.append(word.split("=", 1)[1])
            elif i + 1 < len(argv) and not argv[i + 1].startswith("--"):
                found.append(argv[i + 1])
            else:
                found.append(bare)
    return found


def official_flags_help(cls) -> str:
    """The epilog of --help: which official MAE flags this script reads, and how."""
    keys = {f.name for f in _user_fields(cls)}

    def fits(table: dict) -> list[str]:
        return [k for k, (_, need) in table.items() if need is None or need in keys]

    lines = ["official MAE flags:"]
    lines += [f"  --{k}: read as {' '.join(_OFFICIAL_SAME[k][0])}" for k in fits(_OFFICIAL_SAME)]
    lines += [f"  --{k}: accepted; {_OFFICIAL_DONE[k][0]}" for k in fits(_OFFICIAL_DONE)]
    if "global_pool" in keys:
        lines.append("  --global_pool with no value: --global_pool avg")
    lines.append(f"  refused, with what to do instead: {', '.join(fits(_OFFICIAL_REFUSED))}")
    return "\n".join(lines)


def build_parser(cls, description: str = "") -> argparse.ArgumentParser:
    """argparse with one flag per field, MAE's underscore names plus dashed spellings; each
    flag's help is the field's comment in maepl/config.py and its default."""
    parser = argparse.ArgumentParser(
        description=description,
        epilog=official_flags_help(cls),
        allow_abbrev=False,
        formatter_class=argparse.RawDescriptionHelpFormatter,  # the docstring's usage lines
    )
    parser.add_argument("--config", help="YAML file of defaults (flags override it)")
    comments = field_comments(cls)
    for f in _user_fields(cls):
        names = [f"--{f.name}"] + ([f"--{f.name.replace('_', '-')}"] if "_" in f.name else [])
        inner, _ = _base_type(typing.get_type_hints(cls)[f.name])
        kw: dict[str, Any] = dict(dest=f.name, default=argparse.SUPPRESS, metavar="V")
        if inner is bool:  # "--flag" alone means true, "--flag false" is accepted too
            kw.update(nargs="?", const="true")
        elif f.name in _BARE:
            kw.update(nargs="?", const=_BARE[f.name])
        elif typing.get_origin(inner) is list:  # "--mean 0.5 0.5 0.5" (timm) or "0.5,0.5,0.5"
            kw.update(nargs="+")
        what = comments.get(f.name)
        help_ = f"{what} (default: {f.default!r})" if what else f"default: {f.default!r}"
        parser.add_argument(*names, **kw, help=help_.replace("%", "%%"))
    return parser


def parse_config(cls, argv: list[str] | None = None, description: str = ""):
    """Defaults < --config YAML < flags; returns a validated, resolved config."""
    parser = build_parser(cls, description)
    argv = translate_official_flags(cls, sys.argv[1:] if argv is None else argv)
    ns = vars(parser.parse_args(argv))
    values = load_yaml(ns.pop("config"), cls) if ns.get("config") else {}
    ns.pop("config", None)
    types_ = _field_types(cls)
    for key, text in ns.items():
        if isinstance(text, list):  # a list flag's words: "0.5 0.5", "0.5,0.5", "0.5, 0.5"
            text = ",".join(w.strip(",") for w in text if w.strip(","))
        values[key] = _coerce(key, text, types_[key], from_text=True)
    if "eval" in values:  # finetune.py, linprobe.py
        from .recorded import evaluated_as_trained

        values = evaluated_as_trained(cls, values)
    cfg = cls(**values)
    return cfg.validate() if hasattr(cfg, "validate") else cfg


def dump_config(cfg, path: str | Path) -> None:
    """Write the resolved config as YAML (the run directory's config.yaml)."""
    Path(path).write_text(yaml.safe_dump(dataclasses.asdict(cfg), sort_keys=False))


def config_from_dict(cls, data: dict[str, Any]):
    """Rebuild a config saved by ``dump_config`` (checkpoints, exports); unknown keys fail."""
    names = _field_types(cls, internal=True)
    for key in data:
        if key not in names:
            raise ConfigError(f"{key}: unknown key in saved config")
    return cls(**{k: _coerce(k, v, names[k], from_text=False) for k, v in data.items()})
