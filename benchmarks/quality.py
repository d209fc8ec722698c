"""Does the positional label help? Pretrain variants at a fixed budget, then probe them.

    python benchmarks/quality.py --budget cpu            # ~30 min on 2 CPU cores
    python benchmarks/quality.py --budget gpu            # reference setup, one GPU
    python benchmarks/quality.py --budget cpu --sweeps   # + lambda and mask-ratio sweeps

Each variant is pretrained with pretrain.main for every seed, then its encoder export is read
with the protocol of shared/reference.md (frozen un-augmented features, CLS and mean of patch
tokens; linear probe on standardised features, 100 epochs AdamW; kNN k=20, T=0.07) and
fine-tuned briefly with finetune.main. Results (mean ± std over seeds) go to
<out>/results.json and <out>/results.md; the sweeps also write PNG plots when matplotlib is
installed (pip install -e .[bench]).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import finetune  # noqa: E402
import pretrain  # noqa: E402
from maepl.config import FinetuneConfig, PretrainConfig  # noqa: E402
from maepl.data import build_dataset, build_transform  # noqa: E402
from maepl.evaluate import extract_features, feature_probe, knn_accuracy  # noqa: E402
from maepl.loaders import SeededTransformDataset, collate_drop_bad  # noqa: E402

VARIANTS = {  # name -> pretraining overrides
    "mae": dict(pos_label="none"),
    "apl_pe_kept": dict(pos_label="abs", pos_drop_ratio=0.0),  # the trivial control
    "apl_no_pe": dict(pos_label="abs", pos_embed="none"),
    "apl_drop": dict(pos_label="abs", pos_drop_ratio=0.75),
    "apl_drop_smooth": dict(pos_label="abs", pos_drop_ratio=0.75, pos_smoothing=1.0),
    "rpl_drop": dict(pos_label="rel", pos_drop_ratio=0.75),
}
BUDGETS = {
    # reference setup (configs/fmnist_vit_tiny.yaml): all 60,000 images, 40 epochs
    "gpu": dict(
        pre=dict(
            model="mae_vit_tiny_patch4_28",
            dataset="fashion-mnist",
            epochs=40,
            warmup_epochs=5,
            batch_size=512,
            blr=1.5e-4,
            num_workers=8,
        ),
        ft_epochs=5,
        probe_epochs=100,
    ),
    # CPU-sized: the 10,000-image embedded sample, a 96-d x 6 ViT, small batches for steps
    "cpu": dict(
        pre=dict(
            model="mae_vit_micro_patch4_28",
            dataset="sample",
            epochs=10,
            warmup_epochs=1,
            batch_size=128,
            blr=1.5e-3,
            num_workers=2,
        ),
        ft_epochs=1,
        probe_epochs=50,
    ),
    "smoke": dict(
        pre=dict(
            model="mae_vit_micro_patch4_28",
            dataset="sample",
            epochs=1,
            max_steps=3,
            embed_dim=24,
            depth=1,
            decoder_depth=1,
            batch_size=32,
            num_workers=0,
        ),
        ft_epochs=0,
        probe_epochs=2,
    ),
}


def evaluate_export(
    folder: Path, dataset: str, data_path: str | None, probe_epochs: int, device: str
) -> dict[str, float]:
    import timm

    model = timm.create_model(f"local-dir:{folder}", pretrained=True)
    cfg = model.pretrained_cfg
    tf = build_transform(
        False, cfg["input_size"][-1], cfg["input_size"][0], cfg["mean"], cfg["std"]
    )
    feats = []
    for train in (True, False):
        ds = SeededTransformDataset(build_dataset(dataset, data_path, train), tf, 0)
        loader = DataLoader(ds, batch_size=512, num_workers=2, collate_fn=collate_drop_bad)
        f, y = extract_features(
            model, ((x, y) for x, y, _ in loader), device, autocast=device == "cuda"
        )
        feats.append((f, y))
    (tr, ytr), (te, yte) = feats
    out = {}
    for pool in ("cls", "avg"):
        out[f"probe_{pool}"] = feature_probe(
            tr[pool], ytr, te[pool], yte, epochs=probe_epochs, device=device
        )
        out[f"knn_{pool}"] = knn_accuracy(tr[pool], ytr, te[pool], yte)
    return out


def run_one(
    name: str,
    overrides: dict,
    seed: int,
    budget: dict,
    out: Path,
    data_path: str | None,
    device: str,
) -> dict:
    run_dir = out / f"{name}_s{seed}"
    cfg = PretrainConfig(
        **{
            **budget["pre"],
            **overrides,
            "seed": seed,
            "data_path": data_path,
            "output_dir": str(run_dir),
            "vis_every": 1000,
            "overwrite": True,
            "log_every": 10,
        }
    ).validate()
    t0 = time.perf_counter()
    summary = pretrain.main(cfg)
    row = dict(
        variant=name,
        seed=seed,
        pretrain_s=round(time.perf_counter() - t0, 1),
        pos_loss=summary.get("pos_loss"),
        pos_acc=summary.get("pos_acc"),
        mae_loss=summary.get("mae_loss"),
        **overrides,
    )
    row.update(
        evaluate_export(
            run_dir / "export" / "encoder", cfg.dataset, data_path, budget["probe_epochs"], device
        )
    )
    if budget["ft_epochs"]:
        ft = FinetuneConfig(
            finetune=str(run_dir / "export" / "encoder"),
            dataset=cfg.dataset,
            data_path=data_path,
            epochs=budget["ft_epochs"],
            warmup_epochs=0.2,
            blr=5e-3,
            mixup=0.0,
            cutmix=0.0,
            aa=None,
            reprob=0.0,
            seed=seed,
            batch_size=64,
            num_workers=budget["pre"]["num_workers"],
            output_dir=str(run_dir / "ft"),
            overwrite=True,
        ).validate()
        row["finetune_top1"] = finetune.main(ft)["top1"]
    print(json.dumps(row), flush=True)
    return row


def aggregate(rows: list[dict], keys: list[str]) -> dict[str, dict[str, str]]:
    table = {}
    for name in dict.fromkeys(r["variant"] for r in rows):
        mine = [r for r in rows if r["variant"] == name]
        table[name] = {}
        for k in keys:
            vals = [r[k] for r in mine if r.get(k) is not None]
            if vals:
                sd = statistics.stdev(vals) if len(vals) > 1 else 0.0
                table[name][k] = f"{statistics.mean(vals):.2f} ± {sd:.2f}"
    return table


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--budget", choices=sorted(BUDGETS), default="cpu")
    p.add_argument("--seeds", type=int, default=2)
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--sweeps", action="store_true", help="lambda and mask-ratio sweeps (apl_drop)")
    p.add_argument("--data_path", default=None)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    budget = BUDGETS[args.budget]
    out = Path(args.out or ROOT / "output" / f"quality_{args.budget}")
    out.mkdir(parents=True, exist_ok=True)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    rows = []
    for name in args.variants.split(","):
        for seed in range(args.seeds):
            rows.append(run_one(name, VARIANTS[name], seed, budget, out, args.data_path, device))
    sweeps = []
    if args.sweeps:
        for lam in (0.1, 0.25, 0.5, 0.75, 1.0):
            sweeps.append(
                run_one(
                    f"lambda_{lam}",
                    {**VARIANTS["apl_drop"], "pos_weight": lam},
                    0,
                    budget,
                    out,
                    args.data_path,
                    device,
                )
            )
        for mr in (0.5, 0.6, 0.7, 0.8, 0.9):
            sweeps.append(
                run_one(
                    f"mask_{mr}",
                    {**VARIANTS["apl_drop"], "mask_ratio": mr},
                    0,
                    budget,
                    out,
                    args.data_path,
                    device,
                )
            )
    keys = [
        "probe_cls",
        "probe_avg",
        "knn_cls",
        "knn_avg",
        "finetune_top1",
        "pos_loss",
        "pos_acc",
        "pretrain_s",
    ]
    table = aggregate(rows, keys)
    (out / "results.json").write_text(
        json.dumps(dict(budget=args.budget, device=device, rows=rows, sweeps=sweeps), indent=1)
    )
    lines = ["| variant | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
    lines += [
        f"| {n} | " + " | ".join(v.get(k, "–") for k in keys) + " |" for n, v in table.items()
    ]
    (out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    if sweeps:
        plot_sweeps(sweeps, out)


def plot_sweeps(sweeps: list[dict], out: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: sweep plots skipped (pip install -e .[bench])")
        return
    lam = [r for r in sweeps if r["variant"].startswith("lambda_")]
    fig, ax = plt.subplots(1, 2, figsize=(9, 3.5))
    x = [r["pos_weight"] for r in lam]
    ax[0].plot(x, [r["probe_cls"] for r in lam], "o-", label="probe CLS")
    ax[0].plot(x, [r["knn_cls"] for r in lam], "s-", label="kNN CLS")
    ax[0].set_xlabel("λ (pos_weight)"), ax[0].set_ylabel("top-1 %"), ax[0].legend()
    ax[1].plot(x, [r["pos_loss"] for r in lam], "o-")
    ax[1].set_xlabel("λ (pos_weight)"), ax[1].set_ylabel("final position loss")
    fig.tight_layout()
    fig.savefig(out / "lambda_sweep.png", dpi=120)
    mask = [r for r in sweeps if r["variant"].startswith("mask_")]
    fig, ax = plt.subplots(figsize=(4.5, 3.5))
    ax.plot([r["mask_ratio"] for r in mask], [r["pos_loss"] for r in mask], "o-")
    ax.set_xlabel("mask ratio"), ax.set_ylabel("final position loss")
    fig.tight_layout()
    fig.savefig(out / "mask_sweep.png", dpi=120)


if __name__ == "__main__":
    main()
