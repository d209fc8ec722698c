"""Cheap evaluations of a frozen encoder: kNN and a linear probe on extracted features.

The protocol is the one behind the reference figures in shared/reference.md: frozen,
un-augmented features (CLS token after the final norm, or the mean of the patch tokens);
kNN with k = 20, cosine similarity, votes weighted exp(sim / 0.07); linear probe = features
standardised with the training mean and std, one linear layer trained 100 epochs with AdamW
(lr 1e-2, wd 1e-4, batch 1024, cosine schedule).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


@torch.no_grad()
def extract_features(
    encoder: nn.Module, loader, device: torch.device | str, autocast: bool = False
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Frozen features of a timm ViT: {"cls": [N, D], "avg": [N, D]} and labels [N]."""
    encoder.eval().to(device)
    feats: dict[str, list[torch.Tensor]] = {"cls": [], "avg": []}
    labels = []
    prefix = getattr(encoder, "num_prefix_tokens", 1)
    for x, y in loader:
        with torch.autocast(torch.device(device).type, torch.bfloat16, enabled=autocast):
            tokens = encoder.forward_features(x.to(device, non_blocking=True)).float()
        feats["cls"].append(tokens[:, 0].cpu())
        feats["avg"].append(tokens[:, prefix:].mean(1).cpu())
        labels.append(y)
    return {k: torch.cat(v) for k, v in feats.items()}, torch.cat(labels)


@torch.no_grad()
def knn_accuracy(
    train_f: torch.Tensor,
    train_y: torch.Tensor,
    test_f: torch.Tensor,
    test_y: torch.Tensor,
    k: int = 20,
    temperature: float = 0.07,
    chunk: int = 1024,
) -> float:
    """Top-1 (%) of a weighted kNN vote on cosine similarity. Features [N, D], labels [N]."""
    num_classes = int(max(train_y.max(), test_y.max())) + 1
    train_f = F.normalize(train_f.float(), dim=1)
    correct = 0
    for i in range(0, len(test_f), chunk):
        q = F.normalize(test_f[i : i + chunk].float(), dim=1)
        sim, idx = (q @ train_f.t()).topk(k, dim=1)
        votes = torch.zeros(len(q), num_classes)
        votes.scatter_add_(1, train_y[idx], (sim / temperature).exp())
        correct += (votes.argmax(1) == test_y[i : i + chunk]).sum().item()
    return 100.0 * correct / len(test_f)


def feature_probe(
    train_f: torch.Tensor,
    train_y: torch.Tensor,
    test_f: torch.Tensor,
    test_y: torch.Tensor,
    epochs: int = 100,
    lr: float = 1e-2,
    weight_decay: float = 1e-4,
    batch_size: int = 1024,
    device: torch.device | str = "cpu",
    seed: int = 0,
) -> float:
    """Top-1 (%) of one linear layer on standardised frozen features (reference protocol)."""
    gen = torch.Generator().manual_seed(seed)
    mean, std = train_f.mean(0), train_f.std(0) + 1e-6
    xtr, xte = ((train_f - mean) / std).to(device), ((test_f - mean) / std).to(device)
    ytr, yte = train_y.to(device), test_y.to(device)
    num_classes = int(max(train_y.max(), test_y.max())) + 1
    with torch.random.fork_rng(devices=[]):  # the head's initial weights from ``seed`` too,
        torch.manual_seed(seed)  # without moving the caller's global RNG
        head = nn.Linear(xtr.shape[1], num_classes).to(device)
    opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=weight_decay)
    steps_per_epoch = math.ceil(len(xtr) / batch_size)
    total = epochs * steps_per_epoch
    step = 0
    for _ in range(epochs):
        order = torch.randperm(len(xtr), generator=gen).to(device)
        for j in range(0, len(xtr), batch_size):
            for g in opt.param_groups:  # cosine over all steps
                g["lr"] = lr * 0.5 * (1 + math.cos(math.pi * step / total))
            sel = order[j : j + batch_size]
            loss = F.cross_entropy(head(xtr[sel]), ytr[sel])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
    with torch.no_grad():
        return 100.0 * (head(xte).argmax(1) == yte).float().mean().item()
