"""Fine-tune a pretrained ViT (or train one from scratch) with MAE's recipe, on Accelerate.

    python finetune.py --finetune output/quickstart/export/encoder --dataset sample --epochs 10
    python finetune.py --model vit_base_patch16_224 --finetune mae_pretrain_vit_base.pth \\
        --data_path /imagenet --blr 5e-4 --layer_decay 0.65 --epochs 100
    python finetune.py --finetune runs/ft/export/best --eval --dataset sample

Layer-wise lr decay, drop path, RandAugment, mixup/cutmix with label smoothing, random
erasing, average pooling with fc_norm; top-1/top-5 on the whole validation set after every
epoch. With --pos_label abs|rel the paper's supervised auxiliary loss is added on all patch
tokens: L = L_cls + pos_weight * L_pos. The last line printed is "top1=<x> top5=<y>".
"""

from __future__ import annotations

import sys

import numpy as np
import torch
from accelerate.utils import set_seed
from timm.data import Mixup
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.optim import param_groups_layer_decay
from torch import nn

from maepl.checkpoint import raise_together
from maepl.checks import mixup_active
from maepl.config import SHAPE_KEYS, ConfigError, FinetuneConfig, parse_config
from maepl.data import build_finetune_transform, build_transform, default_crop_pct, load_splits
from maepl.export import export_encoder
from maepl.loaders import BadImageError, SeededTransformDataset, chain_seed, eval_loader
from maepl.loop import Run
from maepl.models.encoder import encoder_from_config, encoder_model_args
from maepl.models.pos_labels import PositionLabeler
from maepl.optim import build_adamw, param_groups_weight_decay
from maepl.run_dir import check_run_dir
from maepl.weights import fill_sincos, load_encoder_weights

FT_ARCH_KEYS = SHAPE_KEYS + ("pos_embed", "global_pool", "nb_classes", "pos_label", "pos_channels")


class Classifier(nn.Module):
    """A timm ViT classifier plus, optionally, a positional-label head on its patch tokens."""

    def __init__(self, vit: nn.Module, pos_head: PositionLabeler | None):
        super().__init__()
        self.vit, self.pos_head = vit, pos_head

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        tokens = self.vit.forward_features(x)  # [N, prefix + L, D]
        out = {"logits": self.vit.forward_head(tokens)}
        if self.pos_head is not None:
            z = tokens[:, self.vit.num_prefix_tokens :]
            if isinstance(self.vit.norm, nn.Identity):  # avg pooling: fc_norm is the last norm
                z = self.vit.fc_norm(z)
            n, m = z.shape[:2]
            pos = torch.arange(m, device=z.device).expand(n, -1)
            pairs = torch.rand(n, m * m, device=z.device) if self.pos_head.num_pairs else None
            out["pos_loss"], out["pos_acc"] = self.pos_head(z, pos, pair_noise=pairs)
        return out


def build_classifier(cfg: FinetuneConfig, nb_classes: int) -> tuple[Classifier, dict]:
    vit = encoder_from_config(
        cfg, num_classes=nb_classes, global_pool=cfg.global_pool, drop_path_rate=cfg.drop_path
    )
    report = {"notes": ["trained from scratch"]}
    if cfg.finetune:
        # --eval: the classifier exactly as trained (head, norms, position embedding)
        report = load_encoder_weights(vit, cfg.finetune, cfg.pos_embed, exact=cfg.eval)
    elif cfg.pos_embed == "sincos":
        fill_sincos(vit)
    if cfg.pos_embed == "sincos":
        vit.pos_embed.requires_grad_(False)  # fixed, as in MAE pretraining
    if cfg.finetune and not cfg.eval:  # MAE: the new head starts small
        nn.init.trunc_normal_(vit.head.weight, std=2e-5)
        nn.init.zeros_(vit.head.bias)
    head = None
    if cfg.pos_label != "none":
        gh, gw = vit.patch_embed.grid_size
        head = PositionLabeler(
            cfg.pos_label, vit.embed_dim, gh, gw, cfg.pos_channels, cfg.pos_pairs, cfg.pos_ce_chunk
        )
    return Classifier(vit, head), report


@torch.no_grad()
def evaluate(run: Run, model: nn.Module, raw_val, transform, cfg) -> dict[str, float]:
    """Top-1/top-5 (%) of ``model`` (images -> logits) over the whole validation set, each
    image counted once over all processes."""
    loader = eval_loader(
        raw_val, transform, cfg.batch_size, cfg.num_workers, run.world, run.rank, cfg.strict_data
    )
    was_training = model.training
    model.eval()
    counts = torch.zeros(3, device=run.device)  # correct@1, correct@5, images
    skipped, error = [], None
    try:  # --strict_data: an unreadable image stops every process, none waits in reduce
        for x, y, bad in loader:
            skipped += bad
            if not len(y):
                continue
            x, y = x.to(run.device), y.to(run.device)
            with run.accelerator.autocast():
                logits = model(x).float()
            top5 = logits.topk(min(5, logits.shape[1]), dim=1).indices
            counts += torch.stack(
                [
                    (top5[:, 0] == y).sum(),
                    (top5 == y[:, None]).any(1).sum(),
                    torch.tensor(len(y), device=run.device),
                ]
            ).float()
    except BadImageError as err:
        error = err
    raise_together(run.accelerator, error, "evaluation")
    # shards are disjoint and unpadded, so summing counts is exact (no gather needed)
    c1, c5, n = run.accelerator.reduce(counts, "sum").tolist()
    if skipped:  # the accuracy is over the readable images only: say so
        print(f"[rank {run.rank}] evaluation skipped unreadable images: {skipped}", file=sys.stderr)
    model.train(was_training)
    return dict(top1=100 * c1 / max(n, 1), top5=100 * c5 / max(n, 1), n=int(n))


def main(cfg: FinetuneConfig) -> dict:
    # ------------------------------------------------------------------ data (checked first)
    raw_train, raw_val, mean, std = load_splits(cfg)  # with the same classes
    nb_classes = cfg.nb_classes or len(raw_train.classes)
    crop_pct = cfg.crop_pct or default_crop_pct(cfg.input_size)
    val_tf = build_transform(False, cfg.input_size, cfg.in_chans, mean, std, crop_pct=crop_pct)
    train_tf = build_finetune_transform(
        cfg.input_size,
        cfg.in_chans,
        mean,
        std,
        cfg.aa,
        cfg.reprob,
        cfg.remode,
        cfg.recount,
        cfg.color_jitter,
    )
    dataset = SeededTransformDataset(raw_train, train_tf, cfg.seed, strict=cfg.strict_data)
    mixup_on = mixup_active(cfg)

    # ------------------------------------------------------------------ model
    # built and loaded before Run writes anything: weights that do not fit leave no run behind
    check_run_dir(cfg)  # (and an --overwrite that would delete them is refused before reading)
    set_seed(cfg.seed)  # identical initial weights on every rank
    model, report = build_classifier(cfg, nb_classes)
    run = Run(cfg, "finetune", FT_ARCH_KEYS)
    loader, sampler = run.train_loader(dataset)
    # From here on each rank draws its own drop-path masks and pair noise from torch's global
    # RNG (MAE seeds seed + rank); a resume then restores each rank's saved state.
    torch.manual_seed(chain_seed(cfg.seed, run.rank))
    run.accelerator.print(
        "; ".join(
            [f"{cfg.encoder}: {nb_classes} classes", f"weights: {cfg.finetune or 'random init'}"]
            + report["notes"]
        )
    )
    vit = model.vit
    groups = param_groups_layer_decay(
        vit, cfg.weight_decay, vit.no_weight_decay(), layer_decay=cfg.layer_decay
    )
    groups = [g for g in groups if any(p.requires_grad for p in g["params"])]
    for g in groups:
        g["params"] = [p for p in g["params"] if p.requires_grad]
    if model.pos_head is not None:
        groups += param_groups_weight_decay(model.pos_head, cfg.weight_decay)
    optimizer = build_adamw(groups, run.lr, betas=(0.9, 0.999), device_type=run.device.type)
    model, optimizer = run.prepare(model, optimizer, cfg.seed)
    clf = run.unwrapped
    run.accelerator.print(
        f"{len(dataset)} training images, {len(raw_val)} validation; {run.describe()}"
    )
    # Mixup draws from NumPy's RNG in this process: seed it per rank before a resume restores it
    np.random.seed(cfg.seed * 1000 + run.rank)
    run.resume()
    best = run.extra_state.get("best_top1", -1.0)

    def export(name: str, top: dict) -> None:  # written by the main process; an error
        # there stops every process (run.on_main)
        def write() -> None:
            export_encoder(
                clf.vit,
                run.out / "export" / name,
                cfg.encoder,
                {
                    **encoder_model_args(clf.vit, cfg.pos_embed),
                    "num_classes": nb_classes,
                    "global_pool": cfg.global_pool,
                },
                data_cfg=dict(
                    input_size=[cfg.in_chans, cfg.input_size, cfg.input_size],
                    mean=mean,
                    std=std,
                    interpolation="bicubic",
                    crop_pct=crop_pct,
                ),
                card=dict(
                    name=f"maepl {cfg.encoder} classifier ({name})",
                    description=f"Vision Transformer classifier fine-tuned with maepl from "
                    f"{cfg.finetune or 'random init'}; validation top-1 {top['top1']:.2f} %.",
                    dataset=cfg.dataset,
                    steps=run.step,
                ),
                num_classes=nb_classes,
            )

        run.on_main(str(run.out / "export" / name), write)

    if cfg.eval:
        top = evaluate(run, clf.vit, raw_val, val_tf, cfg)
        run.accelerator.print(
            f"evaluated {top['n']} images\ntop1={top['top1']:.2f} top5={top['top5']:.2f}"
        )
        run.close()
        return top

    evaluated: dict[int, dict] = {}  # step -> accuracy: the final weights are evaluated once

    def on_epoch_end() -> None:
        nonlocal best
        top = evaluated[run.step] = evaluate(run, clf.vit, raw_val, val_tf, cfg)
        run.log({f"val_{k}": v for k, v in top.items()})
        run.accelerator.print(
            f"epoch {run.epoch}: val top1 {top['top1']:.2f} "
            f"top5 {top['top5']:.2f} ({top['n']} images)"
        )
        if top["top1"] > best:
            best = top["top1"]
            run.extra_state["best_top1"] = best
            export("best", top)

    # ------------------------------------------------------------------ train
    mixup = (
        Mixup(
            mixup_alpha=cfg.mixup,
            cutmix_alpha=cfg.cutmix,
            cutmix_minmax=cfg.cutmix_minmax,
            prob=cfg.mixup_prob,
            switch_prob=cfg.mixup_switch_prob,
            mode=cfg.mixup_mode,
            label_smoothing=cfg.smoothing,
            num_classes=nb_classes,
        )
        if mixup_on
        else None
    )
    if mixup is not None:
        criterion: nn.Module = SoftTargetCrossEntropy()
    elif cfg.smoothing > 0:
        criterion = LabelSmoothingCrossEntropy(cfg.smoothing)
    else:
        criterion = nn.CrossEntropyLoss()
    model.train()
    for imgs, labels in run.batches(loader, sampler, on_epoch_end):
        targets = labels
        if mixup is not None:
            imgs, targets = mixup(imgs, labels)
        with run.accumulate():
            out = model(imgs)
            cls_loss = criterion(out["logits"], targets)
            loss, metrics = cls_loss, dict(cls_loss=cls_loss)
            if "pos_loss" in out:  # without a position head no position column (not zeros)
                loss = loss + cfg.pos_weight * out["pos_loss"]
                metrics["pos_loss"] = out["pos_loss"]
            run.backward(loss)
        run.end_micro(dict(loss=loss, **metrics))

    # ------------------------------------------------------------------ finish
    summary = run.finish()
    if not run.stopped:  # the last epoch's figures, or those at --max_steps if it ended earlier
        top = evaluated.get(run.step) or evaluate(run, clf.vit, raw_val, val_tf, cfg)
        summary.update(top, best_top1=max(best, top["top1"]))
        export("last", top)
        if top["top1"] > best:
            export("best", top)
        run.accelerator.print(
            f"exports: {run.out / 'export' / 'best'} (best top-1 "
            f"{summary['best_top1']:.2f}), {run.out / 'export' / 'last'}"
        )
        run.accelerator.print(f"top1={top['top1']:.2f} top5={top['top5']:.2f}")
        run.write_summary(summary)
    run.close()
    return summary


if __name__ == "__main__":
    try:
        main(parse_config(FinetuneConfig, description=__doc__))
    except ConfigError as e:
        sys.exit(f"error: {e}")
    except BadImageError as e:  # --strict_data: the file is named, the traceback is noise
        sys.exit(f"error: {e.user_message()}")
