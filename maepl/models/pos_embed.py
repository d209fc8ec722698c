"""Fixed 2-D sin-cos position embeddings with the exact layout of the official MAE release."""

from __future__ import annotations

import torch


def sincos_2d(dim: int, grid_h: int, grid_w: int, cls_token: bool = False) -> torch.Tensor:
    """2-D sin-cos embedding, float32, shape [grid_h * grid_w (+1), dim].

    Token t = row * grid_w + col. Channel blocks of dim/4 each, in this order (MAE's layout,
    which differs from timm's own sin-cos helper):
    sin(col * w_k), cos(col * w_k), sin(row * w_k), cos(row * w_k), w_k = 10000^(-k / (dim/4)).
    With ``cls_token`` a row of zeros is prepended for the class token.
    """
    if dim % 4 != 0:
        raise ValueError(f"sin-cos position embedding needs embed_dim divisible by 4, got {dim}")
    quarter = dim // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter)
    rows, cols = torch.meshgrid(
        torch.arange(grid_h, dtype=torch.float64),
        torch.arange(grid_w, dtype=torch.float64),
        indexing="ij",
    )
    col_out = cols.reshape(-1, 1) * omega[None]  # [L, dim/4]
    row_out = rows.reshape(-1, 1) * omega[None]
    emb = torch.cat([col_out.sin(), col_out.cos(), row_out.sin(), row_out.cos()], dim=1)
    if cls_token:
        emb = torch.cat([torch.zeros(1, dim, dtype=emb.dtype), emb], dim=0)
    return emb.float()
