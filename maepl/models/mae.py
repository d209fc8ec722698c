"""Masked autoencoder around an unmodified timm VisionTransformer, with positional labels.

The encoder is a stock timm ``VisionTransformer`` held by composition: its state_dict keys are
timm's, so exporting it is saving ``mae.encoder``. Decoder, mask token and position heads live
beside it and never enter the encoder export.
"""

from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F
from timm.models.vision_transformer import Block, VisionTransformer
from torch import nn

from .encoder import encoder_from_config
from .pos_embed import sincos_2d
from .pos_labels import PositionLabeler


class MaskedAutoencoder(nn.Module):
    """MAE (He et al. 2021) + optional positional-label head on the visible encoder outputs.

    Args:
        encoder: timm VisionTransformer with a class token (num_classes=0).
        pos_embed: encoder position embedding: "sincos" (fixed, MAE values), "learned", "none".
        mask_ratio: fraction of patches removed; the kept count is fixed (static shapes).
        pos_label: "none", "abs" (APL) or "rel" (RPL).
        pos_drop_ratio: fraction of visible tokens whose encoder PE is replaced by one learned
            token (DropPos); the position loss then counts only those tokens.
        residual_dtype: if set (``torch.bfloat16``), the token sequences of the encoder and the
            decoder are cast to it after their position embeddings, so that under autocast the
            residual stream stays in it (autocast alone keeps it in float32); weights and their
            gradients stay float32. A speed lever, timed by ``benchmarks/throughput.py``
            (``plain_bf16s``); not used by ``pretrain.py``.
    """

    def __init__(
        self,
        encoder: VisionTransformer,
        pos_embed: str = "sincos",
        decoder_embed_dim: int = 512,
        decoder_depth: int = 8,
        decoder_num_heads: int = 16,
        mlp_ratio: float = 4.0,
        mask_ratio: float = 0.75,
        norm_pix_loss: bool = True,
        pos_label: str = "none",
        pos_channels: float = 0.5,
        pos_pairs: int = 0,
        pos_drop_ratio: float = 0.0,
        pos_ce_chunk: int = 0,
        residual_dtype: torch.dtype | None = None,
    ):
        super().__init__()
        self.residual_dtype = residual_dtype
        if encoder.cls_token is None or encoder.num_reg_tokens:
            raise ValueError("encoder: MAE needs a class token and no register tokens")
        self.encoder = encoder
        self.pos_embed_type = pos_embed
        self.patch_size = encoder.patch_embed.patch_size[0]
        self.in_chans = encoder.patch_embed.proj.in_channels
        self.grid_h, self.grid_w = encoder.patch_embed.grid_size
        self.num_patches = self.grid_h * self.grid_w
        self.mask_ratio, self.norm_pix_loss = mask_ratio, norm_pix_loss
        self.len_keep = int(self.num_patches * (1 - mask_ratio))
        dim = encoder.embed_dim

        has_pe = pos_embed != "none"
        if has_pe != (encoder.pos_embed is not None):
            # "none" over an encoder with a PE would add it to every token and label them all
            raise ValueError(
                f"pos_embed {pos_embed!r} does not match the encoder, which has "
                f"{'a' if encoder.pos_embed is not None else 'no'} position embedding"
            )
        # PE dropping exists for the position task: plain MAE (pos_label none) never drops
        dropping = has_pe and pos_label != "none"
        self.num_drop = int(self.len_keep * pos_drop_ratio) if dropping else 0
        if dropping and pos_drop_ratio > 0 and self.num_drop == 0:
            # silently labelling PE-carrying tokens would be the trivial task
            raise ValueError(
                f"pos_drop_ratio: {pos_drop_ratio} of {self.len_keep} visible tokens hides no "
                "position embedding; raise it, or use pos_drop_ratio 0 deliberately"
            )
        if has_pe and encoder.pos_embed.shape[1] not in (self.num_patches, self.num_patches + 1):
            raise ValueError(f"encoder.pos_embed has shape {tuple(encoder.pos_embed.shape)}")
        if pos_embed == "sincos":
            self._fill_sincos(encoder.pos_embed, dim)
        self.pos_mask_token = nn.Parameter(torch.zeros(1, 1, dim)) if self.num_drop else None

        # decoder: its own fixed sin-cos PE, as in MAE
        self.decoder_embed = nn.Linear(dim, decoder_embed_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_embed_dim))
        self.decoder_pos_embed = nn.Parameter(
            torch.zeros(1, self.num_patches + 1, decoder_embed_dim), requires_grad=False
        )
        self._fill_sincos(self.decoder_pos_embed, decoder_embed_dim)
        norm = partial(nn.LayerNorm, eps=1e-6)
        self.decoder_blocks = nn.Sequential(
            *[
                Block(
                    decoder_embed_dim, decoder_num_heads, mlp_ratio, qkv_bias=True, norm_layer=norm
                )
                for _ in range(decoder_depth)
            ]
        )
        self.decoder_norm = norm(decoder_embed_dim)
        self.decoder_pred = nn.Linear(decoder_embed_dim, self.patch_size**2 * self.in_chans)

        self.pos_label = pos_label
        self.pos_head = None
        if pos_label != "none":
            self.pos_head = PositionLabeler(
                pos_label, dim, self.grid_h, self.grid_w, pos_channels, pos_pairs, pos_ce_chunk
            )
        self._init_weights()

    # ------------------------------------------------------------------ init
    def _fill_sincos(self, param: torch.Tensor, dim: int) -> None:
        cls = param.shape[1] == self.num_patches + 1
        with torch.no_grad():
            param.copy_(sincos_2d(dim, self.grid_h, self.grid_w, cls)[None])
        param.requires_grad_(False)

    def _init_weights(self) -> None:
        # MAE's initialisation (xavier-uniform linears, normal(0.02) tokens), applied to the whole
        # model so that results compare with the official code; timm's own init differs.
        w = self.encoder.patch_embed.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        for t in (self.encoder.cls_token, self.mask_token, self.pos_mask_token):
            if t is not None:
                nn.init.normal_(t, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    # ------------------------------------------------------------------ patches
    def patchify(self, imgs: torch.Tensor) -> torch.Tensor:
        """[N, C, H, W] -> [N, L, p*p*C], MAE's (p, q, c) order inside a patch."""
        p, (h, w) = self.patch_size, (self.grid_h, self.grid_w)
        n, c = imgs.shape[:2]
        x = imgs.reshape(n, c, h, p, w, p)
        return torch.einsum("nchpwq->nhwpqc", x).reshape(n, h * w, p * p * c)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """[N, L, p*p*C] -> [N, C, H, W]."""
        p, (h, w), c = self.patch_size, (self.grid_h, self.grid_w), self.in_chans
        x = x.reshape(x.shape[0], h, w, p, p, c)
        return torch.einsum("nhwpqc->nchpwq", x).reshape(x.shape[0], c, h * p, w * p)

    # ------------------------------------------------------------------ forward
    def embed_visible(self, imgs: torch.Tensor, ids_keep: torch.Tensor) -> torch.Tensor:
        """Patch embeddings of the visible patches only, [N, K, D].

        timm's patch embedding is a convolution with kernel = stride = patch: on the visible
        patches it is one matrix product with the flattened kernel, a quarter of the work of
        embedding every patch and dropping three in four (MAE's order). Other patch
        embeddings (a norm, dynamic padding) take that route.
        """
        pe = self.encoder.patch_embed
        conv, p, (h, w) = pe.proj, self.patch_size, (self.grid_h, self.grid_w)
        plain = (
            isinstance(conv, nn.Conv2d)
            and conv.kernel_size == conv.stride == (p, p)
            and conv.padding == (0, 0)
            and isinstance(pe.norm, nn.Identity)
            and pe.flatten
            and not getattr(pe, "dynamic_img_pad", False)
            and tuple(imgs.shape[2:]) == (h * p, w * p)
        )
        if not plain:
            x = pe(imgs)
            return torch.gather(x, 1, ids_keep[..., None].expand(-1, -1, x.shape[-1]))
        n, c = imgs.shape[:2]
        # [N, L, C*p*p] in the kernel's (c, p, q) order
        patches = imgs.reshape(n, c, h, p, w, p).permute(0, 2, 4, 1, 3, 5).reshape(n, h * w, -1)
        patches = torch.gather(patches, 1, ids_keep[..., None].expand(-1, -1, patches.shape[-1]))
        return F.linear(patches, conv.weight.flatten(1), conv.bias)

    def forward_encoder(
        self, imgs: torch.Tensor, noise: torch.Tensor, drop_noise: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Encode the visible patches.

        imgs: [N, C, H, W]; noise: [N, L] (the len_keep lowest are kept); drop_noise: [N, K]
        (the num_drop lowest visible tokens lose their PE). Returns latent [N, 1+K, D] after the
        final norm, ids_keep [N, K] (raster index of each visible token), ids_restore [N, L]
        and drop_idx [N, num_drop] (indices into the visible tokens) or None.
        """
        enc = self.encoder
        ids_shuffle = torch.argsort(noise, dim=1)
        ids_restore = torch.argsort(ids_shuffle, dim=1)
        ids_keep = ids_shuffle[:, : self.len_keep]
        x = self.embed_visible(imgs, ids_keep)  # [N, K, D]
        n, _, d = x.shape

        drop_idx, cls = None, enc.cls_token
        if enc.pos_embed is not None:
            pe = enc.pos_embed
            if pe.shape[1] == self.num_patches + 1:
                cls, pe = cls + pe[:, :1], pe[:, 1:]
            pe_vis = pe[0][ids_keep]  # [N, K, D]
            if self.num_drop:
                drop_idx = torch.argsort(drop_noise, dim=1)[:, : self.num_drop]
                dropped = torch.zeros_like(ids_keep, dtype=torch.bool).scatter_(1, drop_idx, True)
                pe_vis = torch.where(dropped[..., None], self.pos_mask_token.to(pe_vis), pe_vis)
            x = x + pe_vis
        x = torch.cat([cls.expand(n, -1, -1), x], dim=1)
        if self.residual_dtype is not None:
            x = x.to(self.residual_dtype)
        # timm's pos_drop (dropout) is honoured; its patch_drop is not: masking replaces it
        x = enc.norm_pre(enc.pos_drop(x))
        x = enc.blocks(x)
        return enc.norm(x), ids_keep, ids_restore, drop_idx

    def forward_decoder(self, latent: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
        """latent [N, 1+K, D] -> pixel predictions [N, L, p*p*C] for every patch."""
        x = self.decoder_embed(latent)
        n, _, d = x.shape
        mask_tokens = self.mask_token.to(x.dtype).expand(n, self.num_patches - self.len_keep, -1)
        x_ = torch.cat([x[:, 1:], mask_tokens], dim=1)
        x_ = torch.gather(x_, 1, ids_restore[..., None].expand(-1, -1, d))  # unshuffle
        x = torch.cat([x[:, :1], x_], dim=1) + self.decoder_pos_embed
        if self.residual_dtype is not None:
            x = x.to(self.residual_dtype)
        x = self.decoder_norm(self.decoder_blocks(x))
        return self.decoder_pred(x[:, 1:])

    def reconstruction_loss(
        self, imgs: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor
    ) -> torch.Tensor:
        """Mean squared error over the masked patches only. mask: [N, L], 1 = removed."""
        target = self.patchify(imgs)
        if self.norm_pix_loss:
            mean, var = target.mean(-1, keepdim=True), target.var(-1, keepdim=True)
            target = (target - mean) / (var + 1.0e-6) ** 0.5
        loss = (pred.float() - target).pow(2).mean(-1)
        return (loss * mask).sum() / mask.sum()

    def forward(
        self,
        imgs: torch.Tensor,
        noise: torch.Tensor,
        drop_noise: torch.Tensor | None = None,
        pair_noise: torch.Tensor | None = None,
        pos_sigma: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """One pretraining forward pass.

        Returns mae_loss, pos_loss and pos_acc (zeros without a head), pred [N, L, p*p*C] and
        mask [N, L] (1 = removed).
        """
        latent, ids_keep, ids_restore, drop_idx = self.forward_encoder(imgs, noise, drop_noise)
        pred = self.forward_decoder(latent, ids_restore)
        mask = torch.ones_like(noise)
        mask[:, : self.len_keep] = 0
        mask = torch.gather(mask, 1, ids_restore)
        out = dict(mae_loss=self.reconstruction_loss(imgs, pred, mask), pred=pred, mask=mask)

        zero = out["mae_loss"].new_zeros(())
        out["pos_loss"], out["pos_acc"] = zero, zero
        if self.pos_head is not None:
            z, pos = latent[:, 1:], ids_keep  # visible tokens, before any mask token exists
            if drop_idx is not None:  # only tokens whose PE was hidden carry a real task
                z = torch.gather(z, 1, drop_idx[..., None].expand(-1, -1, z.shape[-1]))
                pos = torch.gather(pos, 1, drop_idx)
            out["pos_loss"], out["pos_acc"] = self.pos_head(z, pos, pos_sigma, pair_noise)
        return out

    # ------------------------------------------------------------------ helpers
    @property
    def num_labelled(self) -> int:
        """Tokens per image that the position head reads."""
        return self.num_drop or self.len_keep

    def make_noise(
        self, n: int, device: torch.device, generator: torch.Generator | None = None
    ) -> dict[str, torch.Tensor | None]:
        """The random inputs of one forward pass (mask, PE drop, pair sampling)."""

        def rand(*shape):
            return torch.rand(*shape, device=device, generator=generator)

        pairs = self.pos_head.num_pairs if self.pos_head is not None else 0
        return dict(
            noise=rand(n, self.num_patches),
            drop_noise=rand(n, self.len_keep) if self.num_drop else None,
            pair_noise=rand(n, self.num_labelled**2) if pairs else None,
        )


def build_mae(cfg) -> MaskedAutoencoder:
    """Build the model from a resolved ``PretrainConfig`` (see maepl.config)."""
    enc = encoder_from_config(cfg)
    return MaskedAutoencoder(
        enc,
        cfg.pos_embed,
        cfg.decoder_embed_dim,
        cfg.decoder_depth,
        cfg.decoder_num_heads,
        mask_ratio=cfg.mask_ratio,
        norm_pix_loss=cfg.norm_pix_loss,
        pos_label=cfg.pos_label,
        pos_channels=cfg.pos_channels,
        pos_pairs=cfg.pos_pairs,
        pos_drop_ratio=cfg.pos_drop_ratio,
        pos_ce_chunk=cfg.pos_ce_chunk,
    )
