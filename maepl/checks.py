"""Validation of the configs (maepl.config): every check raises a ``ConfigError`` naming the
key, before any model, data loader or process group exists. ``validate_*`` also resolve what
the user left to maepl: the preset's architecture, the values recorded beside --finetune weights.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import fields
from pathlib import Path

import torch

from .config import (
    SHAPE_KEYS,
    FinetuneConfig,
    LinprobeConfig,
    PretrainConfig,
    TrainConfig,
    resolve_precision,
)
from .config_io import ConfigError
from .recorded import as_recorded, from_resumed, stored_architecture


def _choice(key: str, value: str, options: tuple[str, ...]) -> None:
    if value not in options:
        raise ConfigError(f"{key}: must be one of {', '.join(options)}; got {value!r}")


def _check(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"{key}: {message}")


def resolve_model(cfg: TrainConfig, need_cls: bool = True) -> TrainConfig:
    """Fill shape fields from the preset or the timm model, without building weights."""
    import timm
    from timm.models.vision_transformer import VisionTransformer

    from .models.encoder import OFFICIAL_VIT_NAMES, PRESETS, encoder_from_config

    preset = dict(PRESETS.get(cfg.model, {}))
    if cfg.model in OFFICIAL_VIT_NAMES:
        preset = dict(encoder=OFFICIAL_VIT_NAMES[cfg.model])
    if not preset:
        if not cfg.model.startswith("vit_") or not timm.is_model(cfg.model):
            names = ", ".join(sorted(PRESETS) + sorted(OFFICIAL_VIT_NAMES))
            raise ConfigError(
                f"model: {cfg.model!r} is neither a preset or official MAE name ({names}) nor "
                "a timm vit_*"
            )
        preset = dict(encoder=cfg.model)
    preset = {"decoder_embed_dim": 512, "decoder_depth": 8, "decoder_num_heads": 16, **preset}
    names = {f.name for f in fields(cfg)}
    updates = {k: v for k, v in preset.items() if k in names and getattr(cfg, k) is None}
    cfg = dataclasses.replace(cfg, **updates)
    if cfg.input_size and cfg.patch_size and cfg.input_size % cfg.patch_size:
        raise ConfigError(
            f"input_size: {cfg.input_size} is not divisible by patch_size {cfg.patch_size}"
        )
    try:  # on the meta device: shapes only, no memory, no init cost
        enc = encoder_from_config(cfg, device="meta")
    except (AssertionError, ValueError, TypeError, RuntimeError) as e:
        raise ConfigError(f"model: cannot build {cfg.encoder!r} with these shapes: {e}") from None
    if not isinstance(enc, VisionTransformer) or (
        need_cls and (enc.cls_token is None or enc.num_reg_tokens)
    ):
        raise ConfigError(
            f"model: {cfg.encoder!r} cannot be pretrained here: MAE needs a plain timm "
            "VisionTransformer with a class token and no register tokens"
        )
    if getattr(cfg, "global_pool", None) == "token" and enc.cls_token is None:
        raise ConfigError(
            f"global_pool: token pooling needs a class token, which {cfg.encoder!r} has none "
            "of; use --global_pool avg"
        )
    return dataclasses.replace(
        cfg,
        input_size=enc.patch_embed.img_size[0],
        patch_size=enc.patch_embed.patch_size[0],
        in_chans=enc.patch_embed.proj.in_channels,
        embed_dim=enc.embed_dim,
        depth=len(enc.blocks),
        num_heads=enc.blocks[0].attn.num_heads,
    )


def _validate_common(cfg: TrainConfig) -> None:
    auto = () if isinstance(cfg, PretrainConfig) else ("auto",)  # resolved by validate_*
    _choice("pos_embed", cfg.pos_embed, ("sincos", "learned", "none", *auto))
    _choice("dataset", cfg.dataset, ("imagefolder", "fashion-mnist", "sample"))
    _choice("mixed_precision", cfg.mixed_precision, ("auto", "bf16", "fp16", "no"))
    _check(
        cfg.output_dir.strip() != "",
        "output_dir",
        "empty; the official MAE code's '' (save nothing) has no equivalent here: every run "
        "writes its config, checkpoints and log there, so give a folder (e.g. ./output_dir)",
    )
    _check(
        resolve_precision(cfg.mixed_precision) != "fp16" or torch.cuda.is_available(),
        "mixed_precision",
        "fp16 needs a CUDA GPU: on a CPU Accelerate neither casts to fp16 nor scales the loss, "
        "so the run would be float32 without the overflow guard; use bf16 or no"
        + (" (auto took fp16 from accelerate launch)" if cfg.mixed_precision == "auto" else ""),
    )
    modes = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
    _choice("compile_mode", cfg.compile_mode, modes)
    _check(
        cfg.compile or cfg.compile_mode == "default",
        "compile_mode",
        f"{cfg.compile_mode!r} takes effect only with --compile",
    )
    for key in ("batch_size", "accum_iter", "epochs", "log_every", "save_every", "max_nonfinite"):
        _check(getattr(cfg, key) >= 1, key, f"must be >= 1, got {getattr(cfg, key)}")
    # CUDA graphs own the .grad tensors their backward makes: the next micro-batch's replay
    # overwrites them, so gradients cannot be accumulated (pytorch/pytorch#169545)
    _check(
        cfg.accum_iter == 1 or not cfg.compile or cfg.compile_mode not in modes[1:3],
        "compile_mode",
        f"{cfg.compile_mode!r} records CUDA graphs, which cannot accumulate gradients over "
        f"accum_iter={cfg.accum_iter} micro-batches: use 'default' or "
        "'max-autotune-no-cudagraphs', or accum_iter 1",
    )
    for key in (
        "max_steps",
        "num_workers",
        "keep_last",
        "warmup_epochs",
        "min_lr",
        "blr",
        "save_every_steps",
        "weight_decay",
        "profile_steps",
        "profile_start",
    ):
        _check(getattr(cfg, key) >= 0, key, f"must be >= 0, got {getattr(cfg, key)}")
    _check(cfg.lr is None or cfg.lr > 0, "lr", "must be > 0")
    # set_seed seeds NumPy, which takes 0 <= seed < 2**32; seed * 1000 + rank seeds generators
    _check(
        0 <= cfg.seed < 2**32 // 1000, "seed", f"must be in [0, {2**32 // 1000}), got {cfg.seed}"
    )
    _check(
        not (cfg.profile_steps and cfg.max_steps)
        or cfg.profile_start + cfg.profile_steps <= cfg.max_steps,
        "profile_steps",
        f"profile_start + profile_steps = {cfg.profile_start + cfg.profile_steps} is past "
        f"max_steps = {cfg.max_steps}: nothing would be profiled",
    )
    _check(cfg.clip_grad is None or cfg.clip_grad > 0, "clip_grad", "must be > 0 or null")
    _check(
        cfg.dataset != "imagefolder" or bool(cfg.data_path),
        "data_path",
        "required for dataset imagefolder",
    )
    _check(
        not (cfg.data_path and cfg.dataset == "sample"),
        "data_path",
        f"{cfg.data_path!r} would be ignored: dataset 'sample' is the subset embedded in the "
        "package; drop --data_path, or read that folder with --dataset fashion-mnist or "
        "imagefolder",
    )
    _check(
        not (cfg.download and cfg.dataset != "fashion-mnist"),
        "download",
        f"only dataset fashion-mnist downloads; dataset {cfg.dataset!r} would ignore it",
    )
    if cfg.data_path and cfg.dataset == "imagefolder":
        _check(Path(cfg.data_path).is_dir(), "data_path", f"no such folder {cfg.data_path}")
    weights = getattr(cfg, "finetune", "")  # finetune.py, linprobe.py: before the model
    _check(not weights or Path(weights).exists(), "finetune", f"no such file or folder {weights}")
    if weights:
        _not_a_run_folder("finetune", weights)
    if cfg.resume and cfg.resume != "auto":  # a folder that is no checkpoint: before the data
        from .checkpoint import resolve_resume

        resolve_resume(cfg.resume, cfg.output_dir)


def _not_a_run_folder(key: str, path: str) -> None:
    """The likeliest first mistake: a run's output folder given where its weights belong."""
    from .checkpoint import is_run_folder

    if is_run_folder(path):
        exports = sorted(str(p) for p in Path(path, "export").glob("*") if p.suffix != ".json")
        raise ConfigError(
            f"{key}: {path} is a run's output folder, not weights; give what it exported ("
            + (", ".join(exports) or "nothing yet")
            + f") or one of its checkpoints ({Path(path, 'checkpoints')}/step_XXXXXXXX)"
        )


def _validate_resolved(cfg: TrainConfig) -> None:
    _check(cfg.in_chans in (1, 3), "in_chans", f"must be 1 or 3, got {cfg.in_chans}")
    for key in ("mean", "std"):
        v = getattr(cfg, key)
        _check(
            v is None or len(v) in (1, cfg.in_chans),
            key,
            f"needs one value, or one per channel ({cfg.in_chans}); got {len(v or [])}",
        )
        _check(v is None or all(math.isfinite(x) for x in v), key, f"must be finite, got {v}")
    _check(cfg.std is None or min(cfg.std) > 0, "std", f"must be > 0, got {cfg.std}")
    _check(
        cfg.embed_dim % 4 == 0 or cfg.pos_embed == "none",
        "pos_embed",
        f"sin-cos values need embed_dim divisible by 4, got {cfg.embed_dim}",
    )


def _validate_pos_label(cfg, labelled: int) -> None:
    _choice("pos_label", cfg.pos_label, ("none", "abs", "rel"))
    _check(0 < cfg.pos_channels <= 1, "pos_channels", "must be in (0, 1]")
    _check(cfg.pos_weight >= 0, "pos_weight", "must be >= 0")
    _check(cfg.pos_pairs >= 0, "pos_pairs", "must be >= 0")
    _check(cfg.pos_ce_chunk >= 0, "pos_ce_chunk", "must be >= 0 (0 = plain cross-entropy)")
    _check(cfg.pos_pairs == 0 or cfg.pos_label == "rel", "pos_pairs", "only for pos_label rel")
    head = "only with a position head (pos_label abs or rel); it would do nothing"
    _check(cfg.pos_ce_chunk == 0 or cfg.pos_label != "none", "pos_ce_chunk", head)
    _check(getattr(cfg, "pos_smoothing", 0) == 0 or cfg.pos_label != "none", "pos_smoothing", head)
    if cfg.pos_label == "rel" and cfg.pos_pairs:
        _check(
            cfg.pos_pairs <= labelled**2,
            "pos_pairs",
            f"at most {labelled**2} pairs of {labelled} labelled tokens",
        )


def validate_pretrain(cfg: PretrainConfig) -> PretrainConfig:
    """Range and consistency checks; returns the resolved config."""
    _validate_common(cfg)
    _check(0 < cfg.mask_ratio < 1, "mask_ratio", f"must be in (0, 1), got {cfg.mask_ratio}")
    _check(0 <= cfg.pos_drop_ratio < 1, "pos_drop_ratio", "must be in [0, 1)")
    _check(cfg.pos_smoothing >= 0, "pos_smoothing", "must be >= 0")
    _check(cfg.vis_every >= 1, "vis_every", "must be >= 1")
    _check(0 < cfg.crop_min <= 1, "crop_min", "must be in (0, 1]")
    _choice("data_pipeline", cfg.data_pipeline, ("cpu", "gpu"))
    init = cfg.initial_checkpoint
    if init:
        _not_a_run_folder("initial_checkpoint", init)
    if init and not Path(init).exists():  # unread when --resume finds a checkpoint
        from .checkpoint import resolve_resume

        resumes = bool(cfg.resume) and resolve_resume(cfg.resume, cfg.output_dir) is not None
        _check(resumes, "initial_checkpoint", f"no such file or folder {init}")
    _check(cfg.model is not None, "model", "required")
    cfg = resolve_model(cfg, need_cls=True)
    _validate_resolved(cfg)
    _check(cfg.decoder_embed_dim % 4 == 0, "decoder_embed_dim", "must be divisible by 4")
    _check(
        cfg.decoder_embed_dim % cfg.decoder_num_heads == 0,
        "decoder_num_heads",
        f"must divide decoder_embed_dim {cfg.decoder_embed_dim}",
    )
    grid = cfg.input_size // cfg.patch_size
    keep = int(grid * grid * (1 - cfg.mask_ratio))
    _check(keep >= 1, "mask_ratio", f"{cfg.mask_ratio} leaves no visible patch of {grid * grid}")
    dropping = cfg.pos_label != "none" and cfg.pos_embed != "none" and cfg.pos_drop_ratio > 0
    if dropping:
        _check(
            int(keep * cfg.pos_drop_ratio) >= 1,
            "pos_drop_ratio",
            f"{cfg.pos_drop_ratio} of {keep} visible tokens hides no position embedding",
        )
    _validate_pos_label(cfg, int(keep * cfg.pos_drop_ratio) if dropping else keep)
    return cfg


def _from_checkpoint(cfg):
    """Without --model, take the architecture stored with the --finetune weights."""
    if cfg.model is None:
        arch = stored_architecture(cfg.finetune) if cfg.finetune else None
        if arch is None:
            raise ConfigError(
                "model: required (a timm vit_* name) unless --finetune or --resume points at "
                "maepl weights that record their architecture"
            )
        updates = {k: v for k, v in arch.items() if getattr(cfg, k, None) is None}
        cfg = dataclasses.replace(cfg, **updates)
    return resolve_model(cfg, need_cls=False)


def mixup_active(cfg: FinetuneConfig) -> bool:
    """Mixup or cutmix is on (timm's Mixup turns cutmix on for a cutmix_minmax, as MAE does)."""
    return cfg.mixup > 0 or cfg.cutmix > 0 or cfg.cutmix_minmax is not None


def validate_finetune(cfg: FinetuneConfig) -> FinetuneConfig:
    resume_file = cfg.resume not in ("", "auto") and Path(cfg.resume).is_file()
    if cfg.eval and resume_file and not cfg.finetune:
        # the official `main_finetune.py --eval --resume mae_finetuned_vit_base.pth`: here
        # --resume continues checkpoint folders, and a weights file is evaluated as --finetune
        cfg = dataclasses.replace(cfg, finetune=cfg.resume, resume="")
    _validate_common(cfg)
    cfg = from_resumed(cfg, (*SHAPE_KEYS, "pos_embed", "global_pool", "nb_classes"))
    _check(
        not cfg.eval or bool(cfg.finetune or cfg.resume),
        "eval",
        "needs the weights to evaluate: --finetune <export or checkpoint> or --resume",
    )
    if cfg.eval:  # the classifier as it was trained: head, pooling, position embedding
        cfg = as_recorded(cfg, ("nb_classes", "global_pool"))
    pos_embed = "learned" if cfg.pos_embed == "auto" else cfg.pos_embed
    cfg = dataclasses.replace(cfg, pos_embed=pos_embed, global_pool=cfg.global_pool or "avg")
    _choice("global_pool", cfg.global_pool, ("avg", "token"))
    _choice("mixup_mode", cfg.mixup_mode, ("batch", "pair", "elem"))
    _choice("remode", cfg.remode, ("pixel", "rand", "const"))
    if cfg.aa is not None and cfg.aa.lower() in ("none", "null", ""):  # YAML: aa: none
        cfg = dataclasses.replace(cfg, aa=None)
    _check(cfg.color_jitter is None or cfg.color_jitter >= 0, "color_jitter", "must be >= 0")
    for key in ("mixup", "cutmix"):  # Beta distribution concentrations (0: off)
        _check(getattr(cfg, key) >= 0, key, "must be >= 0")
    for key in ("reprob", "mixup_prob", "mixup_switch_prob"):  # probabilities
        _check(0 <= getattr(cfg, key) <= 1, key, f"must be in [0, 1], got {getattr(cfg, key)}")
    for key in ("drop_path", "smoothing"):  # 1 would drop every block, or every label
        _check(0 <= getattr(cfg, key) < 1, key, f"must be in [0, 1), got {getattr(cfg, key)}")
    _check(0 < cfg.layer_decay <= 1, "layer_decay", "must be in (0, 1]")
    mm = cfg.cutmix_minmax
    _check(
        mm is None or (len(mm) == 2 and 0 < mm[0] < mm[1] <= 1),
        "cutmix_minmax",
        f"must be two fractions min,max with 0 < min < max <= 1, got {mm}",
    )
    _check(
        not (mixup_active(cfg) and cfg.batch_size % 2),
        "batch_size",
        f"mixup/cutmix need an even batch size, got {cfg.batch_size}",
    )
    _check(cfg.crop_pct is None or 0 < cfg.crop_pct <= 1, "crop_pct", "must be in (0, 1]")
    _check(cfg.nb_classes is None or cfg.nb_classes >= 2, "nb_classes", "must be >= 2")
    cfg = _from_checkpoint(cfg)
    _validate_resolved(cfg)
    _check_augmentation(cfg)
    grid = cfg.input_size // cfg.patch_size
    _validate_pos_label(cfg, grid * grid)
    return cfg


def _check_augmentation(cfg: FinetuneConfig) -> None:
    """Build the training transform once (cheap, no data): timm refuses an unknown RandAugment
    policy with a bare AssertionError, which would otherwise come after the datasets load."""
    from .data import build_finetune_transform

    c = cfg.in_chans
    try:
        build_finetune_transform(
            cfg.input_size,
            c,
            [0.5] * c,
            [0.5] * c,
            cfg.aa,
            cfg.reprob,
            cfg.remode,
            cfg.recount,
            cfg.color_jitter,
        )
    except (AssertionError, ValueError, KeyError, IndexError) as e:
        raise ConfigError(
            f"aa: timm cannot build the augmentation policy {cfg.aa!r} ({type(e).__name__}: "
            f"{e}); e.g. rand-m9-mstd0.5-inc1, or null for none"
        ) from None


def validate_linprobe(cfg: LinprobeConfig) -> LinprobeConfig:
    _validate_common(cfg)
    cfg = from_resumed(cfg, (*SHAPE_KEYS, "pos_embed", "nb_classes", "finetune"))
    _check(
        not cfg.eval or bool(cfg.resume),
        "eval",
        "needs --resume <linprobe checkpoint, or auto>: the probe's head is saved only in "
        "linprobe.py's checkpoints (an encoder export has none)",
    )
    cfg = as_recorded(cfg, ())  # the frozen encoder as pretrained
    if cfg.pos_embed == "auto":  # no --finetune, or foreign weights: loading checks the PE
        cfg = dataclasses.replace(cfg, pos_embed="learned")
    _choice("global_pool", cfg.global_pool, ("avg", "token"))
    _check(cfg.crop_pct is None or 0 < cfg.crop_pct <= 1, "crop_pct", "must be in (0, 1]")
    _check(cfg.nb_classes is None or cfg.nb_classes >= 2, "nb_classes", "must be >= 2")
    _check(cfg.knn_k >= 1, "knn_k", "must be >= 1")
    _check(cfg.knn_t > 0, "knn_t", "must be > 0")
    cfg = _from_checkpoint(cfg)
    _validate_resolved(cfg)
    return cfg
