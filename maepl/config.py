"""Typed configs: dataclass defaults < YAML preset (--config) < command-line flags.

Every key is checked: an unknown key, a value of the wrong type or out of range is a
``ConfigError`` naming the key, raised before any model, data loader or process group exists
(loading in config_io.py, ``validate()`` in checks.py).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch

from .config_io import (  # noqa: F401  (the loading API is used as maepl.config's)
    ConfigError,
    build_parser,
    config_from_dict,
    dump_config,
    load_yaml,
    parse_config,
)

# keys that define the weights' shapes: a checkpoint only resumes under the same values
SHAPE_KEYS = ("model", "input_size", "patch_size", "in_chans", "embed_dim", "depth", "num_heads")
ARCH_KEYS = SHAPE_KEYS + (
    "encoder",
    "pos_embed",
    "decoder_embed_dim",
    "decoder_depth",
    "decoder_num_heads",
    "mask_ratio",
    "pos_label",
    "pos_channels",
    "pos_drop_ratio",
)


@dataclass
class TrainConfig:
    """Keys shared by pretrain.py, finetune.py and linprobe.py (MAE's names where it has one)."""

    # --- model
    # a preset: mae_vit_base_patch16 | mae_vit_large_patch16 | mae_vit_huge_patch14 (MAE's) |
    # mae_vit_tiny_patch4_28 | mae_vit_micro_patch4_28 | mae_vit_small_patch4_32; or a timm vit_*
    model: str | None = "mae_vit_base_patch16"
    input_size: int | None = None  # None: from the preset / timm model (/ the checkpoint)
    patch_size: int | None = None  # None: from the preset / timm model (/ the checkpoint)
    in_chans: int | None = None  # image channels, 1 or 3; None: from the preset / timm model
    embed_dim: int | None = None  # encoder width; None: from the preset / timm model
    depth: int | None = None  # encoder blocks; None: from the preset / timm model
    num_heads: int | None = None  # encoder attention heads; None: from the preset / timm model
    pos_embed: str = "sincos"  # encoder PE: sincos (fixed, MAE values) | learned | none
    # --- optimisation
    batch_size: int = 64  # per process
    accum_iter: int = 1  # micro-batches per optimizer step (gradient accumulation)
    epochs: int = 400  # the schedule's length (lr warm-up + cosine decay over it)
    max_steps: int = 0  # stop at this optimizer step (0: run all epochs); schedule unchanged
    blr: float = 1.5e-4  # lr = blr * effective batch / 256
    lr: float | None = None  # absolute lr; overrides blr
    min_lr: float = 0.0  # lr at the end of the cosine decay
    warmup_epochs: float = 40  # linear lr warm-up from 0, in epochs (fractions allowed)
    weight_decay: float = 0.05  # none on norms, biases, tokens and position embeddings
    clip_grad: float | None = None  # clip the global gradient norm to this; None: no clipping
    # auto | bf16 | fp16 | no; auto: `accelerate launch --mixed_precision` bf16 or fp16 if
    # given, else bf16 on GPUs that support it, else no
    mixed_precision: str = "auto"
    compile: bool = False  # torch.compile the model (static shapes: masking keeps len_keep)
    # torch.compile mode: default | reduce-overhead (CUDA graphs) | max-autotune |
    # max-autotune-no-cudagraphs
    compile_mode: str = "default"
    seed: int = 0  # initial weights, data order, augmentations and masks
    max_nonfinite: int = 20  # stop after this many consecutive steps with a non-finite grad norm
    # --- data
    dataset: str = "imagefolder"  # imagefolder | fashion-mnist | sample
    data_path: str | None = None  # imagefolder: root holding train/ (and val/); else the files
    download: bool = False  # fashion-mnist only: allow a torchvision download
    num_workers: int = 8  # data-loading worker processes per process
    pin_mem: bool = True  # page-locked host batches for faster copies to the GPU
    strict_data: bool = False  # fail on the first unreadable image (train or eval), not skip it
    mean: list[float] | None = None  # None: the dataset's
    std: list[float] | None = None  # None: the dataset's
    # --- output
    output_dir: str = "./output_dir"  # checkpoints, log.jsonl, TensorBoard events, exports
    log_every: int = 20  # optimizer steps between log lines
    # torch.profiler over this many optimizer steps (0: off), after profile_start steps of this
    # launch: <output_dir>/profile/ (a Chrome/Perfetto trace and tables of the ops)
    profile_steps: int = 0
    profile_start: int = 10  # optimizer steps of this launch before the profiled ones
    save_every: int = 1  # epochs between checkpoints (and at the end)
    save_every_steps: int = 0  # also save every N optimizer steps (0: off)
    keep_last: int = 2  # complete checkpoints kept (0: all)
    # write the main process's checkpoint files in a background thread from a copy in host
    # memory (training goes on meanwhile); false: every process waits for the files
    async_save: bool = True
    resume: str = ""  # "" | auto | path to a checkpoint folder
    overwrite: bool = False  # start over: deletes the checkpoints, logs, exports there

    # resolved from the preset, not user-settable
    encoder: str | None = field(default=None, metadata={"internal": True})


@dataclass
class PretrainConfig(TrainConfig):
    """MAE + positional-label pretraining."""

    def validate(self) -> PretrainConfig:
        from .checks import validate_pretrain

        return validate_pretrain(self)

    decoder_embed_dim: int | None = None  # None: preset, else MAE's 512 / 8 / 16
    decoder_depth: int | None = None  # decoder blocks; None: preset, else MAE's 8
    decoder_num_heads: int | None = None  # decoder attention heads; None: preset, else MAE's 16
    # weights to start from (continued pretraining): a maepl export or checkpoint, or an
    # official MAE .pth; a decoder or position head the file lacks starts fresh. --resume wins
    initial_checkpoint: str = ""
    mask_ratio: float = 0.75  # fraction of patches removed from the encoder's input
    norm_pix_loss: bool = True  # regress each patch's pixels normalised by its mean and std
    crop_min: float = 0.2  # RandomResizedCrop scale lower bound
    # cpu: workers decode and augment with PIL | gpu: workers read raw bytes / uint8 arrays,
    # the loop decodes, crops, flips and normalises on the accelerator (maepl/gpu_aug.py)
    data_pipeline: str = "cpu"
    vis_every: int = 20  # epochs between reconstruction image grids (and at the end)
    # --- positional labels
    pos_label: str = "abs"  # none | abs (APL) | rel (RPL)
    pos_weight: float = 0.5  # lambda in L = L_mae + lambda * L_pos
    pos_channels: float = 0.5  # fraction of channels each side of the head reads
    pos_pairs: int = 0  # rel: ordered pairs sampled per image, 0 = all
    pos_drop_ratio: float = 0.75  # fraction of visible tokens whose encoder PE is hidden
    # rows per chunk of the fused classifier + cross-entropy (the logits are never stored
    # whole); 0 = plain classifier, then cross-entropy. Same loss and gradients either way.
    pos_ce_chunk: int = 0
    pos_smoothing: float = 0.0  # initial sigma of Gaussian targets, decays linearly to 0


@dataclass
class FinetuneConfig(TrainConfig):
    """Fine-tuning (or training from scratch) with MAE's recipe; optional positional labels."""

    def validate(self) -> FinetuneConfig:
        from .checks import validate_finetune

        return validate_finetune(self)

    model: str | None = None  # None: the architecture stored with --finetune
    # learned (starts from the checkpoint's, else sin-cos) | sincos | none | auto (learned;
    # with --eval, none if the --finetune weights record that they have no PE)
    pos_embed: str = "auto"
    finetune: str = ""  # weights to start from (export, checkpoint, official MAE .pth)
    eval: bool = False  # evaluate --finetune / --resume weights and exit
    # None: the dataset's; with --eval, the classifier's recorded with --finetune
    nb_classes: int | None = None
    # avg (with fc_norm) | token; None: avg, with --eval the one recorded with --finetune
    global_pool: str | None = None
    drop_path: float = 0.1  # stochastic depth rate
    layer_decay: float = 0.75  # lr multiplier per block from the top (MAE's layer-wise decay)
    blr: float = 1e-3
    min_lr: float = 1e-6
    epochs: int = 100
    warmup_epochs: float = 5
    smoothing: float = 0.1  # label smoothing
    mixup: float = 0.8  # mixup alpha; 0: off
    cutmix: float = 1.0  # cutmix alpha; 0: off
    # cutmix box side as a fraction of the image, drawn in [min, max] instead of from the
    # alpha (timm's cutmix_minmax; turns cutmix on): e.g. 0.2,0.8
    cutmix_minmax: list[float] | None = None
    mixup_prob: float = 1.0  # probability of mixup or cutmix per batch (or pair, element)
    mixup_switch_prob: float = 0.5  # probability of cutmix instead of mixup when both are on
    mixup_mode: str = "batch"  # batch | pair | elem: what one mixing draw applies to
    aa: str | None = "rand-m9-mstd0.5-inc1"  # RandAugment policy (timm), null: none
    # colour jitter factor, used only without aa (as MAE's --color_jitter; timm's own default
    # would be 0.4)
    color_jitter: float | None = None
    reprob: float = 0.25  # random-erasing probability
    remode: str = "pixel"  # random-erasing fill: pixel | rand | const
    recount: int = 1  # random-erasing boxes per image
    # eval resize = input_size / crop_pct; None: 1 up to 32 px, 0.875 up to 224, 1 above (MAE)
    crop_pct: float | None = None
    # --- supervised positional labels: L = L_cls + pos_weight * L_pos on all patch tokens
    pos_label: str = "none"  # none | abs (APL) | rel (RPL)
    pos_weight: float = 0.5  # lambda in L = L_cls + lambda * L_pos
    pos_channels: float = 0.5  # fraction of channels each side of the head reads
    pos_pairs: int = 0  # rel: ordered pairs sampled per image, 0 = all
    pos_ce_chunk: int = 0  # rows per chunk of the fused classifier + cross-entropy; 0: plain


@dataclass
class LinprobeConfig(TrainConfig):
    """Linear probing of a frozen encoder with MAE's recipe (BatchNorm + Linear, LARS)."""

    def validate(self) -> LinprobeConfig:
        from .checks import validate_linprobe

        return validate_linprobe(self)

    model: str | None = None  # None: the architecture stored with --finetune
    # auto: the encoder's as pretrained (none if the --finetune weights record none, else the
    # stored values, never replaced); learned | sincos | none must agree with that record
    pos_embed: str = "auto"
    finetune: str = ""  # the encoder to probe (export, checkpoint, official MAE .pth)
    eval: bool = False  # evaluate the trained probe of --resume (a checkpoint) and exit
    nb_classes: int | None = None  # None: the dataset's
    global_pool: str = "token"  # token (CLS after the final norm) | avg (mean of patch tokens)
    batch_size: int = 512
    blr: float = 0.1
    weight_decay: float = 0.0  # LARS weight decay, on the head's weight matrix only (MAE: 0)
    epochs: int = 90
    warmup_epochs: float = 10
    crop_pct: float | None = None  # eval resize = input_size / crop_pct; None: as finetune.py
    knn: bool = False  # report kNN accuracy on frozen, un-augmented features and exit (no probe)
    knn_k: int = 20  # neighbours that vote
    knn_t: float = 0.07  # temperature of the votes' weights exp(similarity / t)


def resolve_precision(name: str) -> str:
    """``auto``: what ``accelerate launch --mixed_precision`` (or ``accelerate config``) chose,
    if bf16 or fp16; else bf16 on GPUs that support it, full precision elsewhere. The launcher
    writes "no" when nothing was chosen, so "no" from it cannot override: ask maepl for it."""
    if name != "auto":
        return name
    launcher = os.environ.get("ACCELERATE_MIXED_PRECISION", "").lower()
    if launcher in ("bf16", "fp16"):
        return launcher
    return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"
