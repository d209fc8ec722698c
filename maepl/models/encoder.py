"""The encoder: a stock timm ``VisionTransformer`` by name, with MAE's named presets.

Kept apart from the MAE wrapper so that fine-tuning, probing and exports build the very same
encoder (``encoder_from_config``) and record how to rebuild it (``encoder_model_args``).
"""

from __future__ import annotations

import timm
import torch
from timm.models.vision_transformer import VisionTransformer

# Named presets: encoder (timm name + shape overrides) and decoder. The first three carry the
# official MAE names and recipe (decoder 512-d x 8 blocks, 16 heads).
PRESETS: dict[str, dict] = {
    "mae_vit_base_patch16": dict(encoder="vit_base_patch16_224"),
    "mae_vit_large_patch16": dict(encoder="vit_large_patch16_224"),
    "mae_vit_huge_patch14": dict(encoder="vit_huge_patch14_224"),
    # Fashion-MNIST reference setup of shared/reference.md: ViT-Tiny widths, patch 4 on 28 px.
    "mae_vit_tiny_patch4_28": dict(
        encoder="vit_tiny_patch16_224",
        input_size=28,
        patch_size=4,
        in_chans=1,
        embed_dim=192,
        depth=12,
        num_heads=3,
        decoder_embed_dim=128,
        decoder_depth=4,
        decoder_num_heads=4,
    ),
    # CPU-sized: a few minutes per epoch on 2 cores for 10,000 28-px images.
    "mae_vit_micro_patch4_28": dict(
        encoder="vit_tiny_patch16_224",
        input_size=28,
        patch_size=4,
        in_chans=1,
        embed_dim=96,
        depth=6,
        num_heads=3,
        decoder_embed_dim=64,
        decoder_depth=2,
        decoder_num_heads=4,
    ),
    "mae_vit_small_patch4_32": dict(
        encoder="vit_small_patch16_224",
        input_size=32,
        patch_size=4,
        in_chans=3,
        embed_dim=384,
        depth=12,
        num_heads=6,
        decoder_embed_dim=256,
        decoder_depth=4,
        decoder_num_heads=8,
    ),
}


# The official MAE fine-tuning and linear-probe names (its models_vit.py): the same ViTs as
# timm's *_224 models, so that `--model vit_base_patch16` in a command written for
# main_finetune.py or main_linprobe.py builds what it built there.
OFFICIAL_VIT_NAMES = {
    "vit_base_patch16": "vit_base_patch16_224",
    "vit_large_patch16": "vit_large_patch16_224",
    "vit_huge_patch14": "vit_huge_patch14_224",
}


def build_encoder(
    name: str,
    input_size: int | None = None,
    patch_size: int | None = None,
    in_chans: int | None = None,
    embed_dim: int | None = None,
    depth: int | None = None,
    num_heads: int | None = None,
    pos_embed: str = "sincos",
    device: torch.device | str | None = None,
    **extra,
) -> VisionTransformer:
    """A timm ViT by name with optional shape overrides; no classifier unless ``extra`` sets
    ``num_classes`` (``extra`` goes to ``timm.create_model``: global_pool, drop_path_rate...)."""
    kwargs = dict(
        img_size=input_size,
        patch_size=patch_size,
        in_chans=in_chans,
        embed_dim=embed_dim,
        depth=depth,
        num_heads=num_heads,
    )
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    if pos_embed == "none":
        kwargs["pos_embed"] = "none"
    kwargs = {"num_classes": 0, **kwargs, **extra}
    with torch.device(device or "cpu"):
        model = timm.create_model(name, pretrained=False, **kwargs)
    if not isinstance(model, VisionTransformer):
        raise ValueError(f"model: {name!r} is not a timm VisionTransformer")
    return model


def encoder_from_config(cfg, pos_embed: str | None = None, **extra) -> VisionTransformer:
    """``build_encoder`` with a config's encoder name and shape fields; ``pos_embed`` defaults
    to the config's."""
    return build_encoder(
        cfg.encoder,
        cfg.input_size,
        cfg.patch_size,
        cfg.in_chans,
        cfg.embed_dim,
        cfg.depth,
        cfg.num_heads,
        pos_embed or cfg.pos_embed,
        **extra,
    )


def encoder_model_args(enc: VisionTransformer, pos_embed: str) -> dict:
    """The create_model kwargs that rebuild ``enc`` exactly (stored in exports)."""
    args = dict(
        img_size=list(enc.patch_embed.img_size),
        patch_size=list(enc.patch_embed.patch_size),
        in_chans=enc.patch_embed.proj.in_channels,
        embed_dim=enc.embed_dim,
        depth=len(enc.blocks),
        num_heads=enc.blocks[0].attn.num_heads,
        num_classes=0,
    )
    if pos_embed == "none":
        args["pos_embed"] = "none"
    return args
