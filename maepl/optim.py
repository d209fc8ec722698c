"""Parameter groups and the per-step learning rate (MAE's warmup + half-cycle cosine)."""

from __future__ import annotations

import math

import torch
from torch import nn

# Parameters that are tokens or embeddings rather than weights: no weight decay, as in MAE.
NO_DECAY_NAMES = ("cls_token", "mask_token", "pos_embed", "pos_mask_token", "reg_token")


def param_groups_weight_decay(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two groups: decayed weight matrices; biases, norms, tokens and PEs without decay.

    Frozen parameters (the fixed sin-cos embeddings) are left out.
    """
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        leaf = name.rsplit(".", 1)[-1]
        if p.ndim <= 1 or name.endswith(".bias") or leaf in NO_DECAY_NAMES:
            no_decay.append(p)
        else:
            decay.append(p)
    return [
        {"params": no_decay, "weight_decay": 0.0},
        {"params": decay, "weight_decay": weight_decay},
    ]


def lr_at(step: int, base_lr: float, min_lr: float, warmup_steps: int, total_steps: int) -> float:
    """Linear warmup from 0 over ``warmup_steps``, then half-cycle cosine to ``min_lr``.

    Evaluated at the optimizer step about to be taken (0-based), per step rather than per
    epoch fraction as in MAE; the two agree at every step boundary.
    """
    if step < warmup_steps:
        return base_lr * step / warmup_steps
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return min_lr + (base_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Write ``lr`` into every group, scaled by a group's ``lr_scale`` (layer decay) if any."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)


def build_adamw(
    groups: list[dict], lr: float, betas=(0.9, 0.95), device_type: str = "cpu"
) -> torch.optim.Optimizer:
    """AdamW, fused on CUDA (one kernel for all parameters), foreach elsewhere."""
    fused = device_type == "cuda"
    return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=fused, foreach=not fused)
