"""kNN and linear-probe accuracy of a frozen encoder export (protocol of shared/reference.md).

    python benchmarks/eval_encoder.py output/quickstart/export/encoder --dataset sample
    python benchmarks/eval_encoder.py runs/mae/export/encoder --dataset fashion-mnist
    python benchmarks/eval_encoder.py runs/mae/export/encoder --random_init   # baseline

Prints one line per pooling (CLS token, mean of patch tokens) and a final JSON line.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import timm
import torch
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from maepl.data import build_dataset, build_transform  # noqa: E402
from maepl.evaluate import extract_features, feature_probe, knn_accuracy  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("encoder", help="an export folder (export/encoder) holding config.json")
    p.add_argument("--dataset", default="fashion-mnist", choices=["sample", "fashion-mnist"])
    p.add_argument("--data_path", default=None)
    p.add_argument(
        "--test_dataset",
        default=None,
        choices=["sample", "fashion-mnist"],
        help="test on this dataset's test split instead (e.g. probes trained on the 10,000-image\n"
        "sample, tested on all 10,000 Fashion-MNIST test images: the refcpu budget of quality.py)",
    )
    p.add_argument(
        "--random_init",
        action="store_true",
        help="same architecture, untrained (timm init, learned PE: not MAE's sin-cos random init)",
    )
    p.add_argument("--probe_epochs", type=int, default=100)
    p.add_argument("--batch_size", type=int, default=512)
    p.add_argument("--num_workers", type=int, default=4)
    p.add_argument("--json", default=None, help="also write the results here")
    args = p.parse_args()

    folder = Path(args.encoder)
    if not (folder / "config.json").is_file():
        sys.exit(f"error: encoder: {folder} has no config.json (expected an export folder)")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    model = timm.create_model(f"local-dir:{folder}", pretrained=not args.random_init)
    cfg = model.pretrained_cfg
    chans, size = cfg["input_size"][0], cfg["input_size"][-1]
    tf = build_transform(False, size, chans, cfg["mean"], cfg["std"])

    test_dataset = args.test_dataset or args.dataset
    splits = {}  # both before the slow part, so that a missing one stops it first
    for name, train in ((args.dataset, True), (test_dataset, False)):
        try:
            splits[train] = build_dataset(name, args.data_path, train=train)
        except FileNotFoundError as e:
            sys.exit(f"error: --data_path: {e}")

    def loader(train: bool) -> DataLoader:
        ds = _Mapped(splits[train], tf)
        return DataLoader(ds, batch_size=args.batch_size, num_workers=args.num_workers)

    t0 = time.perf_counter()
    train_f, train_y = extract_features(model, loader(True), device, autocast=device == "cuda")
    test_f, test_y = extract_features(model, loader(False), device, autocast=device == "cuda")
    t_feat = time.perf_counter() - t0
    results = {
        "encoder": str(folder),
        "random_init": args.random_init,
        "dataset": args.dataset,
        "test_dataset": test_dataset,
        "train": len(train_y),
        "test": len(test_y),
    }
    for pool in ("cls", "avg"):
        knn = knn_accuracy(train_f[pool], train_y, test_f[pool], test_y)
        probe = feature_probe(
            train_f[pool], train_y, test_f[pool], test_y, epochs=args.probe_epochs, device=device
        )
        results[f"knn_{pool}"], results[f"probe_{pool}"] = round(knn, 2), round(probe, 2)
        print(f"{pool}: linear probe {probe:.2f}  kNN {knn:.2f}")
    results["seconds"] = round(time.perf_counter() - t0, 1)
    results["feature_seconds"] = round(t_feat, 1)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    print(json.dumps(results))


class _Mapped(torch.utils.data.Dataset):
    """Applies a deterministic eval transform to a (PIL, label) dataset."""

    def __init__(self, ds, tf):
        self.ds, self.tf = ds, tf

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, i):
        img, y = self.ds[i]
        return self.tf(img), y


if __name__ == "__main__":
    main()
