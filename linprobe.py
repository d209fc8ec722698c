"""Linear probing of a frozen pretrained ViT with MAE's recipe, on Accelerate.

    python linprobe.py --finetune output/quickstart/export/encoder --dataset sample --epochs 10
    python linprobe.py --finetune output/quickstart/export/encoder --dataset sample --knn
    python linprobe.py --model vit_base_patch16_224 --finetune mae_pretrain_vit_base.pth \\
        --data_path /imagenet --batch_size 512 --accum_iter 32   # MAE's effective 16384

Head: BatchNorm1d(affine=False, eps 1e-6) + Linear (init std 0.01) on the CLS token after
the final norm (or the mean of the patch tokens, --global_pool avg); LARS with no weight decay,
trust-ratio adaptation on the weight only; RandomResizedCrop + flip. The last line printed is
"top1=<x> top5=<y>" (with --knn: "knn_top1=<x>").
"""

from __future__ import annotations

import sys

import torch
from accelerate.utils import set_seed
from timm.optim import Lars
from torch import nn

from finetune import evaluate
from maepl.config import SHAPE_KEYS, ConfigError, LinprobeConfig, parse_config
from maepl.data import build_transform, default_crop_pct, load_splits
from maepl.evaluate import knn_accuracy
from maepl.loaders import BadImageError, SeededTransformDataset, eval_loader
from maepl.loop import Run
from maepl.models.encoder import encoder_from_config
from maepl.run_dir import check_run_dir
from maepl.weights import fill_sincos, load_encoder_weights

LP_ARCH_KEYS = SHAPE_KEYS + ("global_pool", "nb_classes", "finetune")


class Probe(nn.Module):
    """Frozen encoder (always in eval mode) + BatchNorm1d(affine=False) + Linear."""

    def __init__(self, encoder: nn.Module, nb_classes: int, global_pool: str):
        super().__init__()
        self.encoder, self.global_pool = encoder.requires_grad_(False), global_pool
        linear = nn.Linear(encoder.embed_dim, nb_classes)
        nn.init.trunc_normal_(linear.weight, std=0.01)
        nn.init.zeros_(linear.bias)
        self.head = nn.Sequential(nn.BatchNorm1d(encoder.embed_dim, affine=False, eps=1e-6), linear)

    def train(self, mode: bool = True):
        super().train(mode)
        self.encoder.eval()  # frozen: no drop path, no dropout, ever
        return self

    def features(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            tokens = self.encoder.forward_features(x)
        if self.global_pool == "avg":
            return tokens[:, self.encoder.num_prefix_tokens :].mean(1)
        return tokens[:, 0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).float())


def lars_groups(head: nn.Module, weight_decay: float) -> list[dict]:
    """LARS adapts the weight matrix only: biases (and the affine-free BN) are left alone.

    timm's Lars skips adaptation when a group's weight decay is 0 unless ``always_adapt``;
    MAE adapts weights at weight decay 0, so the weight group sets it.
    """
    weights = [p for p in head.parameters() if p.ndim > 1]
    others = [p for p in head.parameters() if p.ndim <= 1]
    return [
        dict(params=weights, weight_decay=weight_decay, always_adapt=True),
        dict(params=others, weight_decay=0.0, always_adapt=False),
    ]


def build_probe(cfg: LinprobeConfig, nb_classes: int) -> tuple[Probe, dict]:
    """The probe on the encoder exactly as pretrained: its position embedding (or none) as
    stored, never replaced or filled in."""
    # the encoder keeps its final norm (timm's avg pooling would swap it for fc_norm); the
    # probe pools itself. A model without a class token cannot be built for token pooling.
    no_cls = cfg.global_pool == "avg" and encoder_from_config(cfg, device="meta").cls_token is None
    pool = dict(global_pool="avg", fc_norm=False) if no_cls else dict(global_pool="token")
    encoder = encoder_from_config(cfg, cfg.pos_embed, **pool)
    report = {"notes": ["random init"]}
    if cfg.finetune:
        report = load_encoder_weights(encoder, cfg.finetune, cfg.pos_embed, exact=True)
    elif cfg.pos_embed == "sincos":  # a random encoder as MAE initialises it: fixed sin-cos
        fill_sincos(encoder)
        report["notes"].append("pos_embed sin-cos")
    return Probe(encoder, nb_classes, cfg.global_pool), report


def main(cfg: LinprobeConfig) -> dict:
    # ------------------------------------------------------------------ data (checked first)
    raw_train, raw_val, mean, std = load_splits(cfg)  # with the same classes
    nb_classes = cfg.nb_classes or len(raw_train.classes)
    crop_pct = cfg.crop_pct or default_crop_pct(cfg.input_size)
    val_tf = build_transform(False, cfg.input_size, cfg.in_chans, mean, std, crop_pct=crop_pct)
    # MAE's linear-probe augmentation: RandomResizedCrop (scale 0.08-1) + flip
    train_tf = build_transform(True, cfg.input_size, cfg.in_chans, mean, std, (0.08, 1.0))
    dataset = SeededTransformDataset(raw_train, train_tf, cfg.seed, strict=cfg.strict_data)

    # ------------------------------------------------------------------ model
    # built and loaded before Run writes anything: weights that do not fit leave no run behind
    check_run_dir(cfg)  # (and an --overwrite that would delete them is refused before reading)
    set_seed(cfg.seed)
    model, report = build_probe(cfg, nb_classes)
    run = Run(cfg, "linprobe", LP_ARCH_KEYS)
    if cfg.finetune:
        run.accelerator.print("; ".join([f"encoder from {cfg.finetune}", *report["notes"]]))

    if cfg.knn:  # cheap check: frozen, un-augmented features, no training (so no step plan:
        # a training split smaller than one batch is fine here)
        top1 = knn_probe(run, model, raw_train, raw_val, val_tf, cfg)
        run.accelerator.print(f"knn_top1={top1:.2f}")
        run.write_summary({"knn_top1": top1})
        run.close()
        return {"knn_top1": top1}

    loader, sampler = run.train_loader(dataset)
    optimizer = Lars(lars_groups(model.head, cfg.weight_decay), lr=run.lr, momentum=0.9)
    model, optimizer = run.prepare(model, optimizer, cfg.seed)
    probe = run.unwrapped
    run.accelerator.print(
        f"{cfg.encoder} frozen, probe on {cfg.global_pool}; "
        f"{len(dataset)} training images; {run.describe()}"
    )
    run.resume()
    if cfg.eval:
        top = evaluate(run, probe, raw_val, val_tf, cfg)
        run.accelerator.print(f"top1={top['top1']:.2f} top5={top['top5']:.2f}")
        run.close()
        return top

    evaluated: dict[int, dict] = {}  # step -> accuracy: the final weights are evaluated once

    def on_epoch_end() -> None:
        top = evaluated[run.step] = evaluate(run, probe, raw_val, val_tf, cfg)
        run.log({f"val_{k}": v for k, v in top.items()})
        run.accelerator.print(
            f"epoch {run.epoch}: val top1 {top['top1']:.2f} top5 {top['top5']:.2f}"
        )

    # ------------------------------------------------------------------ train
    criterion = nn.CrossEntropyLoss()
    model.train()
    for imgs, labels in run.batches(loader, sampler, on_epoch_end):
        with run.accumulate():
            loss = criterion(model(imgs), labels)
            run.backward(loss)
        run.end_micro(dict(loss=loss))

    summary = run.finish()
    if not run.stopped:  # the last epoch's figures, or those at --max_steps if it ended earlier
        top = evaluated.get(run.step) or evaluate(run, probe, raw_val, val_tf, cfg)
        summary.update(top)
        run.accelerator.print(f"top1={top['top1']:.2f} top5={top['top5']:.2f}")
        run.write_summary(summary)
    run.close()
    return summary


@torch.no_grad()
def knn_probe(run: Run, model: Probe, raw_train, raw_val, transform, cfg) -> float:
    """kNN top-1 (%) on frozen features; computed on the main process, broadcast to all."""
    result = torch.zeros(1, device=run.device)

    def compute() -> None:  # main process; an error there stops every process (on_main)
        model.to(run.device).eval()
        feats = []
        for raw in (raw_train, raw_val):
            xs, ys = [], []
            loader = eval_loader(
                raw, transform, cfg.batch_size, cfg.num_workers, 1, 0, cfg.strict_data
            )
            for x, y, bad in loader:
                if bad:  # features of the readable images only
                    print(f"kNN probe skipped unreadable images: {bad}", file=sys.stderr)
                if len(y):
                    with run.accelerator.autocast():
                        xs.append(model.features(x.to(run.device)).float().cpu())
                    ys.append(y)
            feats.append((torch.cat(xs), torch.cat(ys)))
        (tr_f, tr_y), (te_f, te_y) = feats
        result[0] = knn_accuracy(tr_f, tr_y, te_f, te_y, k=cfg.knn_k, temperature=cfg.knn_t)

    run.on_main("the kNN probe", compute)
    return float(run.accelerator.reduce(result, "sum").item())


if __name__ == "__main__":
    try:
        main(parse_config(LinprobeConfig, description=__doc__))
    except ConfigError as e:
        sys.exit(f"error: {e}")
    except BadImageError as e:  # --strict_data: the file is named, the traceback is noise
        sys.exit(f"error: {e.user_message()}")
