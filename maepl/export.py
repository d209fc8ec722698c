"""Exports users share: a timm ``local-dir`` encoder folder and the full model (safetensors +
JSON). Both replace an earlier export only once the new one is completely written, so a run
killed (or out of disk) while exporting leaves the previous export whole, never half of each.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from safetensors.torch import save_file
from torch import nn

from .snapshot import assert_finite, host_copies

MODEL_CARD = """---
library_name: timm
license: {license}
tags: [maepl, mae]
---
# {name}

{description}

- architecture: `{arch}` with {model_args}
- training: {dataset}, {steps} optimizer steps
- input: {input_size} px, mean {mean}, std {std}

```python
import timm
model = timm.create_model("local-dir:<this folder>", pretrained=True)
```
"""


def export_encoder(
    encoder: nn.Module,
    folder: str | Path,
    architecture: str,
    model_args: dict,
    data_cfg: dict,
    card: dict,
    num_classes: int = 0,
) -> Path:
    """Write a timm ``local-dir`` folder: model.safetensors, config.json, README.md.

    We write config.json ourselves instead of timm's save_for_hf: that copies the timm
    architecture's default pretrained_cfg (hub id, 0.5 mean/std of another checkpoint), which
    would describe the wrong weights. The files are written into ``.tmp_<name>`` beside the
    folder, which then takes the folder's place (``_replace_folder``).
    """
    folder = Path(folder)
    sd = encoder.state_dict()
    assert_finite(sd, f"export {folder}")  # before anything is written
    sd = host_copies(sd)
    cfg = {
        "architecture": architecture,
        "num_classes": num_classes,
        "num_features": model_args["embed_dim"],
        "global_pool": model_args.get("global_pool", "token"),
        "model_args": model_args,
        "pretrained_cfg": dict(
            num_classes=num_classes,
            classifier="head",
            first_conv="patch_embed.proj",
            fixed_input_size=True,
            license=card.get("license", "apache-2.0"),
            **data_cfg,
        ),
    }
    readme = MODEL_CARD.format(
        arch=architecture,
        model_args=model_args,
        license=cfg["pretrained_cfg"]["license"],
        **card,
        **data_cfg,
    )
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.with_name(f".tmp_{folder.name}")
    if tmp.exists():  # left by a killed export
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        save_file(sd, tmp / "model.safetensors", metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2))
        (tmp / "README.md").write_text(readme)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _replace_folder(tmp, folder)
    return folder


def _replace_folder(tmp: Path, folder: Path) -> None:
    """``tmp`` (complete) takes ``folder``'s place. An earlier export there is moved to
    ``.replaced_<name>`` first and deleted last, so at every moment one complete export exists:
    ``folder``, or, if the process dies between the two renames, ``.replaced_<name>``."""
    aside = folder.with_name(f".replaced_{folder.name}")
    if folder.exists():
        if aside.exists():
            shutil.rmtree(aside)
        folder.rename(aside)
    # (folder missing, aside present: a killed export's previous one; it stays until tmp is in)
    tmp.rename(folder)
    shutil.rmtree(aside, ignore_errors=True)


def export_full(model: nn.Module, path: str | Path, config: dict) -> None:
    """Encoder + decoder + position head (``mae.safetensors``) and its config (``mae.json``),
    each written to a temporary file and renamed over the earlier one."""
    path = Path(path)
    sd = model.state_dict()
    assert_finite(sd, f"export {path}")
    sd = host_copies(sd)
    path.parent.mkdir(parents=True, exist_ok=True)
    config_path = path.with_suffix(".json")
    tmp, tmp_config = (p.with_name(f".tmp_{p.name}") for p in (path, config_path))
    try:
        save_file(sd, tmp, metadata={"format": "pt"})
        tmp_config.write_text(json.dumps(config, indent=1))
    except BaseException:
        tmp.unlink(missing_ok=True)
        tmp_config.unlink(missing_ok=True)
        raise
    os.replace(tmp, path)
    os.replace(tmp_config, config_path)
