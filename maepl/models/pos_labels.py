"""Positional-label heads, their targets and losses (Zhang & Gong, arXiv 2206.04981).

APL classifies the raster index of each labelled token; RPL classifies the offset between the
two tokens of every ordered pair. Both read a slice of the channels of the final-norm encoder
outputs and are discarded after training.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def grid_coords(grid_h: int, grid_w: int, device=None) -> torch.Tensor:
    """(row, col) of every raster index, shape [h*w, 2], long."""
    idx = torch.arange(grid_h * grid_w, device=device)
    return torch.stack([idx // grid_w, idx % grid_w], dim=1)


def abs_labels(pos: torch.Tensor) -> torch.Tensor:
    """APL target = raster index of each token: the identity on ``pos`` [N, m]."""
    return pos


def rel_labels(pos: torch.Tensor, grid_h: int, grid_w: int) -> torch.Tensor:
    """RPL targets for all ordered pairs (i, j), indexed like Swin's relative_position_index.

    pos: [N, m] raster indices. Returns [N, m, m] with
    label = (r_i - r_j + h - 1) * (2w - 1) + (c_i - c_j + w - 1).
    """
    r, c = pos // grid_w, pos % grid_w
    dr = r[:, :, None] - r[:, None, :] + grid_h - 1
    dc = c[:, :, None] - c[:, None, :] + grid_w - 1
    return dr * (2 * grid_w - 1) + dc


def class_coords(kind: str, grid_h: int, grid_w: int, device=None) -> torch.Tensor:
    """Grid coordinates of every class, [num_classes, 2] float: used for position smoothing."""
    if kind == "abs":
        return grid_coords(grid_h, grid_w, device).float()
    return grid_coords(2 * grid_h - 1, 2 * grid_w - 1, device).float()


def smooth_targets(
    labels: torch.Tensor, coords: torch.Tensor, sigma: float | torch.Tensor
) -> torch.Tensor:
    """DropPos-style soft targets: q(c | y) proportional to exp(-|coord_c - coord_y|^2 / sigma^2).

    labels: [P] long; coords: [C, 2]. Returns [P, C] rows summing to one.
    """
    d2 = (coords[labels][:, None, :] - coords[None]).pow(2).sum(-1)
    # sigma -> 0 is one-hot; the floor keeps the division finite at the end of a decay
    s2 = torch.as_tensor(sigma, device=d2.device).clamp_min(1e-3) ** 2
    return torch.softmax(-d2 / s2, dim=-1)


def position_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    coords: torch.Tensor,
    sigma: float | torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean cross-entropy and top-1 accuracy; soft Gaussian targets when ``sigma`` is given.

    ``sigma`` may be a tensor: a value that changes every step then does not make
    ``torch.compile`` recompile (a Python float would be baked into the graph).

    logits: [P, C] (any float dtype, computed in float32), labels: [P].
    """
    logits = logits.float()
    if sigma is not None:
        target = smooth_targets(labels, coords, sigma)
        loss = torch.sum(-target * F.log_softmax(logits, dim=-1), dim=-1).mean()
    else:
        loss = F.cross_entropy(logits, labels)
    acc = (logits.argmax(-1) == labels).float().mean()
    return loss, acc.detach()


class _LinearCrossEntropy(torch.autograd.Function):
    """Classifier product + (soft) cross-entropy, ``chunk`` rows at a time, with the gradient
    computed during the forward: the [P, C] logits never exist whole, neither for the loss nor
    for the backward, which only scales the stored gradients by the incoming one.

    h: [P, k] features; weight: [R, k], bias: [R] with R >= C rows (padding rows beyond
    ``num_classes`` take no part: their logits are set to -inf, so their gradient is zero).
    """

    @staticmethod
    def forward(ctx, h, weight, bias, labels, coords, sigma, num_classes, chunk, need_grad):
        rows, n = weight.shape[0], h.shape[0]
        # float16 cannot hold gradients of order 1/n (a GradScaler scales them only in the
        # backward): keep the input's gradient in float32 then; bfloat16 has float32's range
        if need_grad:
            grad_h = torch.empty_like(h, dtype=torch.float32 if h.dtype == torch.float16 else None)
            grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=h.device)
            grad_b = torch.zeros(rows, dtype=torch.float32, device=h.device)
        loss = torch.zeros((), dtype=torch.float32, device=h.device)
        correct = torch.zeros((), dtype=torch.float32, device=h.device)
        for s in range(0, n, chunk):
            hc, yc = h[s : s + chunk], labels[s : s + chunk]
            # under autocast F.linear runs in bf16 as nn.Linear would; the loss in float32
            logits = F.linear(hc, weight, bias)
            logits[:, num_classes:] = float("-inf")  # padding rows: softmax 0, no gradient
            logp = torch.log_softmax(logits, dim=-1, dtype=torch.float32)
            del logits
            correct = correct + (logp.argmax(-1) == yc).sum()
            if sigma is None:
                loss = loss - logp.gather(1, yc[:, None]).sum()
            else:
                target = smooth_targets(yc, coords, sigma)
                loss = loss - (target * logp[:, :num_classes]).sum()
            if not need_grad:  # under no_grad (reconstruction images): the loss only
                continue
            # n * d(loss)/d(logits) = softmax - target (in [-1, 1]), over the log-probabilities
            g = logp.exp_()
            if sigma is None:
                g.scatter_add_(1, yc[:, None], torch.full_like(g[:, :1], -1.0))
            else:
                g[:, :num_classes] -= target
            gd = g.to(h.dtype)  # the products in the input's dtype, as autograd's would be
            grad_h[s : s + chunk] = (gd @ weight.to(gd.dtype)).float().mul_(1.0 / n)
            grad_w += (gd.t() @ hc).float()
            grad_b += g.sum(0)
        if need_grad:
            grad_w, grad_b = grad_w.mul_(1.0 / n), grad_b.mul_(1.0 / n)
            # kept in float32: scaled in the backward first (a GradScaler's scale), then
            # autograd casts them to the weight's dtype (float16 would flush these to zero)
            ctx.save_for_backward(grad_h, grad_w, grad_b)
        acc = correct / n
        ctx.mark_non_differentiable(acc)
        return loss / n, acc

    @staticmethod
    def backward(ctx, grad_loss, _grad_acc):
        grad_h, grad_w, grad_b = ctx.saved_tensors
        # autograd casts each gradient to its input's dtype (float16's now holds the scale)
        return grad_h * grad_loss, grad_w * grad_loss, grad_b * grad_loss, *(None,) * 6


def linear_cross_entropy(
    h: torch.Tensor,
    classifier: nn.Linear | tuple[torch.Tensor, torch.Tensor],
    num_classes: int,
    labels: torch.Tensor,
    coords: torch.Tensor,
    sigma: float | torch.Tensor | None = None,
    chunk: int = 32768,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``position_loss(classifier(h)[:, :num_classes], labels, coords, sigma)`` without keeping
    the logits: same loss, accuracy and gradients (up to rounding), less memory and traffic.
    ``classifier``: a Linear, or its (weight, bias)."""
    if sigma is not None and not torch.is_tensor(sigma):
        sigma = torch.full((), float(sigma), device=h.device)
    weight, bias = (
        classifier if isinstance(classifier, tuple) else (classifier.weight, classifier.bias)
    )
    need_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (h, weight, bias))
    return _LinearCrossEntropy.apply(
        h, weight, bias, labels, coords, sigma, num_classes, chunk, need_grad
    )


def folded_classifier(
    linear: nn.Linear, classifier: nn.Linear, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """(W, b) with ``classifier(linear(h)) = h @ W.T + b``: W = Wc Wl, b = Wc bl + bc.

    The heads end in a Linear followed by the classifier with no nonlinearity between them, so
    the two products over every labelled row (RPL: 331,776 pair rows a ViT-B/16 step) can be one
    with the folded matrix, computed once per forward. The parameters, their gradients (autograd
    goes through the fold) and the checkpoints are those of the two layers: the same model,
    computed in another order. The fold is computed in float32 (float64 for float64 weights)
    outside autocast and returned in ``dtype``, the rows' dtype."""
    wide = torch.promote_types(classifier.weight.dtype, torch.float32)
    with torch.autocast(classifier.weight.device.type, enabled=False):
        wc = classifier.weight.to(wide)
        weight = wc @ linear.weight.to(wide)
        bias = classifier.bias.to(wide) + wc @ linear.bias.to(wide)
    return weight.to(dtype), bias.to(dtype)


def padded(num_classes: int, multiple: int = 16) -> int:
    """Classifier rows rounded up to a multiple of 16: bf16 matrix products whose output width
    is not a multiple of 8 (APL's 196, RPL's 729 classes on a 14x14 grid) miss cuBLAS's fast
    kernels. The extra rows' logits are sliced off before the loss (they get no gradient)."""
    return -(-num_classes // multiple) * multiple


class AbsPosHead(nn.Module):
    """APL: first ``in_dim`` channels -> Linear -> GELU -> Linear(in_dim/2) -> classifier(h*w)."""

    def __init__(self, in_dim: int, num_classes: int):
        super().__init__()
        self.in_dim = in_dim
        self.mlp = nn.Sequential(
            nn.Linear(in_dim, in_dim), nn.GELU(), nn.Linear(in_dim, in_dim // 2)
        )
        self.num_classes = num_classes
        self.classifier = nn.Linear(in_dim // 2, padded(num_classes))

    def features(self, z: torch.Tensor) -> torch.Tensor:
        """z: [N, m, C] encoder outputs -> the classifier's input [N, m, in_dim/2]."""
        return self.mlp(z[..., : self.in_dim])

    def hidden(self, z: torch.Tensor) -> torch.Tensor:
        """The input of the MLP's last Linear (``last``), which training folds into the
        classifier (:func:`folded_classifier`)."""
        return self.mlp[1](self.mlp[0](z[..., : self.in_dim]))

    @property
    def last(self) -> nn.Linear:
        return self.mlp[2]

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """z: [N, m, C] encoder outputs -> logits [N, m, h*w]."""
        return self.classifier(self.features(z))[..., : self.num_classes]


class RelPosHead(nn.Module):
    """RPL: pair feature [first in_dim channels of z_i ; last in_dim channels of z_j].

    MLP Linear(2*in_dim -> in_dim) -> GELU -> Linear(in_dim -> in_dim) -> classifier. The first
    layer is computed factored, W [a; b] + bias = W_a a + (W_b b + bias), so the per-token
    projections cost O(m d k) and only the sum is paired: O(m^2 k) instead of O(m^2 d k).
    """

    def __init__(self, in_dim: int, num_classes: int):
        super().__init__()
        self.in_dim = in_dim
        self.fc1 = nn.Linear(2 * in_dim, in_dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(in_dim, in_dim)
        self.num_classes = num_classes
        self.classifier = nn.Linear(in_dim, padded(num_classes))

    def pair_hidden(self, z: torch.Tensor, pairs: torch.Tensor | None = None) -> torch.Tensor:
        """First layer for all pairs -> [N, m, m, k], or for ``pairs`` [N, K, 2] -> [N, K, k]."""
        k = self.in_dim
        w_a, w_b = self.fc1.weight[:, :k], self.fc1.weight[:, k:]
        a = z[..., :k] @ w_a.t()  # [N, m, k]
        b = F.linear(z[..., -k:], w_b, self.fc1.bias)  # [N, m, k]
        if pairs is None:
            return a[:, :, None, :] + b[:, None, :, :]
        gather = lambda t, i: torch.gather(t, 1, i[..., None].expand(-1, -1, t.shape[-1]))  # noqa: E731
        return gather(a, pairs[..., 0]) + gather(b, pairs[..., 1])

    def features(self, z: torch.Tensor, pairs: torch.Tensor | None = None) -> torch.Tensor:
        """The classifier's input: [N, m, m, in_dim], or [N, K, in_dim] for ``pairs``."""
        return self.fc2(self.act(self.pair_hidden(z, pairs)))

    def hidden(self, z: torch.Tensor, pairs: torch.Tensor | None = None) -> torch.Tensor:
        """The input of ``fc2`` (``last``), which training folds into the classifier."""
        return self.act(self.pair_hidden(z, pairs))

    @property
    def last(self) -> nn.Linear:
        return self.fc2

    def forward(self, z: torch.Tensor, pairs: torch.Tensor | None = None) -> torch.Tensor:
        """z: [N, m, C] -> logits [N, m, m, (2h-1)(2w-1)], or [N, K, classes] for ``pairs``."""
        return self.classifier(self.features(z, pairs))[..., : self.num_classes]

    def forward_naive(self, z: torch.Tensor) -> torch.Tensor:
        """Reference: builds every concatenated pair explicitly (for tests and benchmarks)."""
        k, m = self.in_dim, z.shape[1]
        a = z[..., :k][:, :, None, :].expand(-1, -1, m, -1)
        b = z[..., -k:][:, None, :, :].expand(-1, m, -1, -1)
        h = self.fc2(self.act(self.fc1(torch.cat([a, b], dim=-1))))
        return self.classifier(h)[..., : self.num_classes]


class PositionLabeler(nn.Module):
    """Owns the head, the labels and the loss for one positional-label setting.

    ``kind``: "abs" or "rel"; ``channels``: fraction of the embedding width each side reads;
    ``pairs``: sampled ordered pairs per image for "rel" (0 = all m^2 pairs); ``ce_chunk``:
    rows per chunk of the fused classifier + cross-entropy (``linear_cross_entropy``), 0 = the
    plain classifier then cross-entropy.
    """

    def __init__(
        self,
        kind: str,
        embed_dim: int,
        grid_h: int,
        grid_w: int,
        channels: float = 0.5,
        pairs: int = 0,
        ce_chunk: int = 0,
    ):
        super().__init__()
        if kind not in ("abs", "rel"):
            raise ValueError(f"pos_label must be 'abs' or 'rel', got {kind!r}")
        self.kind, self.grid_h, self.grid_w, self.num_pairs = kind, grid_h, grid_w, pairs
        self.ce_chunk = ce_chunk
        in_dim = max(2, round(channels * embed_dim))
        if kind == "abs":
            self.head: nn.Module = AbsPosHead(in_dim, grid_h * grid_w)
        else:
            self.head = RelPosHead(in_dim, (2 * grid_h - 1) * (2 * grid_w - 1))
        self.register_buffer("coords", class_coords(kind, grid_h, grid_w), persistent=False)

    def forward(
        self,
        z: torch.Tensor,
        pos: torch.Tensor,
        sigma: float | torch.Tensor | None = None,
        pair_noise: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Loss and top-1 accuracy of the labelled tokens.

        z: [N, m, C] final-norm encoder outputs of the labelled tokens; pos: [N, m] their raster
        indices on the patch grid; pair_noise: [N, m*m] uniform noise choosing the sampled pairs
        (required when ``pairs`` > 0).
        """
        if self.kind == "abs":
            hidden, labels = self.head.hidden(z), abs_labels(pos)
        else:
            labels = rel_labels(pos, self.grid_h, self.grid_w).flatten(1)  # [N, m*m]
            pairs = None
            if self.num_pairs:
                m = z.shape[1]
                # random pairs without replacement, a fixed count per image (static shapes)
                flat = torch.argsort(pair_noise, dim=1)[:, : self.num_pairs]
                pairs = torch.stack([flat // m, flat % m], dim=-1)
                labels = torch.gather(labels, 1, flat)
            hidden = self.head.hidden(z, pairs)
        hidden, labels = hidden.flatten(0, -2), labels.flatten()
        # the head's last Linear and the classifier as one product over the rows
        weight, bias = folded_classifier(self.head.last, self.head.classifier, hidden.dtype)
        classes = self.head.num_classes
        if self.ce_chunk:
            return linear_cross_entropy(
                hidden, (weight, bias), classes, labels, self.coords, sigma, self.ce_chunk
            )
        logits = F.linear(hidden, weight, bias)[:, :classes]
        return position_loss(logits, labels, self.coords, sigma)
