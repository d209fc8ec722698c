import pytest
import torch

import pretrain
from maepl.models.pos_labels import (
    PositionLabeler,
    RelPosHead,
    abs_labels,
    class_coords,
    position_loss,
    rel_labels,
    smooth_targets,
)


def test_labels_on_a_3x3_grid_by_hand():
    # raster indices on 3x3: 0 (r0 c0), 2 (r0 c2), 4 (r1 c1), 6 (r2 c0), 8 (r2 c2)
    pos = torch.tensor([[0, 2, 4, 6, 8]])
    assert torch.equal(abs_labels(pos), pos)
    rel = rel_labels(pos, grid_w=3, grid_h=3)[0]
    # label = (r_i - r_j + 2) * 5 + (c_i - c_j + 2); 25 classes
    assert rel[2, 2] == 12  # i == j: zero offset is the centre class
    assert rel[0, 2] == 6  # (0-1+2)*5 + (0-1+2)
    assert rel[2, 0] == 18
    assert rel[0, 4] == 0  # most negative offset
    assert rel[4, 0] == 24  # most positive offset
    assert rel[1, 3] == 4  # (0-2+2)*5 + (2-0+2)
    assert rel[3, 1] == 20  # (2-0+2)*5 + (0-2+2)
    assert rel.min() >= 0 and rel.max() < 25


def test_rel_labels_non_square_grid():
    # 2 rows x 3 cols: (2h-1)(2w-1) = 3 * 5 = 15 classes
    pos = torch.tensor([[0, 5]])  # (0,0) and (1,2)
    rel = rel_labels(pos, grid_w=3, grid_h=2)[0]
    assert rel[0, 1] == (0 - 1 + 1) * 5 + (0 - 2 + 2)
    assert rel[1, 0] == (1 - 0 + 1) * 5 + (2 - 0 + 2) == 14


def test_factored_rpl_equals_naive_concatenation():
    torch.manual_seed(0)
    head = RelPosHead(in_dim=12, num_classes=25)
    z = torch.randn(3, 7, 24)
    fast, naive = head(z), head.forward_naive(z)
    assert fast.shape == (3, 7, 7, 25)
    assert torch.allclose(fast, naive, atol=1e-5)
    # sampled pairs pick the same logits as the full computation
    pairs = torch.tensor([[[0, 1], [6, 2], [3, 3]]]).expand(3, -1, -1)
    picked = head(z, pairs)
    assert torch.allclose(picked[:, 1], naive[:, 6, 2], atol=1e-5)
    assert torch.allclose(picked[:, 2], naive[:, 3, 3], atol=1e-5)


def test_rel_pair_sampling_uses_matching_labels():
    torch.manual_seed(0)
    lab = PositionLabeler("rel", 16, 3, 3, channels=0.5, pairs=5)
    z = torch.randn(2, 4, 16)
    pos = torch.tensor([[0, 4, 8, 2], [1, 3, 5, 7]])
    noise = torch.rand(2, 16)
    loss, acc = lab(z, pos, pair_noise=noise)
    flat = torch.argsort(noise, 1)[:, :5]
    pairs = torch.stack([flat // 4, flat % 4], -1)
    logits = lab.head(z, pairs)
    labels = torch.gather(rel_labels(pos, grid_h=3, grid_w=3).flatten(1), 1, flat)
    ref = torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten())
    assert torch.allclose(loss, ref)


def test_smoothing_targets_peak_at_label_and_sum_to_one():
    coords = class_coords("abs", 3, 3)
    q = smooth_targets(torch.tensor([4, 0]), coords, sigma=1.0)
    assert torch.allclose(q.sum(-1), torch.ones(2))
    assert q[0].argmax() == 4 and q[1].argmax() == 0
    # neighbours at distance 1 get exp(-1) of the peak
    assert torch.allclose(q[0, 1] / q[0, 4], torch.tensor(torch.e**-1.0))
    logits = torch.randn(2, 9)
    hard, _ = position_loss(logits, torch.tensor([4, 0]), coords, None)
    tiny, _ = position_loss(logits, torch.tensor([4, 0]), coords, 0.0)
    assert torch.allclose(hard, tiny, atol=1e-5)  # sigma -> 0 is plain cross-entropy


def test_apl_head_reads_first_channels_only():
    lab = PositionLabeler("abs", 16, 3, 3, channels=0.5)
    z = torch.randn(1, 4, 16)
    z2 = z.clone()
    z2[..., 8:] = 99.0
    assert torch.equal(lab.head(z), lab.head(z2))


@pytest.mark.parametrize("kind,classes", [("abs", 49), ("rel", 169)])
def test_classifier_rows_are_padded_and_the_padding_is_inert(kind, classes):
    torch.manual_seed(0)
    lab = PositionLabeler(kind, 32, 7, 7)
    head = lab.head
    assert head.classifier.out_features % 16 == 0 and head.classifier.out_features >= classes
    z = torch.randn(2, 5, 32, requires_grad=True)
    pos = torch.tensor([[0, 8, 16, 24, 48], [1, 2, 3, 4, 5]])
    logits = head(z)
    assert logits.shape[-1] == classes
    loss, _ = lab(z, pos)
    loss.backward()
    grad = head.classifier.weight.grad
    assert grad[classes:].abs().sum() == 0 and grad[:classes].abs().sum() > 0
    # the same loss as a classifier holding only the real rows
    ref = torch.nn.Linear(head.classifier.in_features, classes)
    with torch.no_grad():
        ref.weight.copy_(head.classifier.weight[:classes])
        ref.bias.copy_(head.classifier.bias[:classes])
    head.classifier, lab_loss = ref, loss.detach()
    assert torch.allclose(lab(z, pos)[0], lab_loss, atol=1e-6)


def _loss_and_grads(lab: PositionLabeler, z, pos, sigma, noise):
    lab.zero_grad()
    z = z.clone().requires_grad_(True)
    loss, acc = lab(z, pos, sigma=sigma, pair_noise=noise)
    assert not acc.requires_grad  # a metric, detached in both paths
    loss.backward()
    grads = {n: p.grad.clone() for n, p in lab.named_parameters()}
    return loss.detach(), acc, z.grad, grads


@pytest.mark.parametrize(
    "kind, pairs, sigma", [("abs", 0, None), ("abs", 0, 1.5), ("rel", 0, None), ("rel", 10, 0.7)]
)
def test_fused_linear_cross_entropy_matches_plain_loss_and_gradients(kind, pairs, sigma):
    torch.manual_seed(0)
    plain = PositionLabeler(kind, 16, 3, 4, pairs=pairs).double()
    fused = PositionLabeler(kind, 16, 3, 4, pairs=pairs, ce_chunk=7).double()  # uneven chunks
    fused.load_state_dict(plain.state_dict())
    z = torch.randn(3, 5, 16, dtype=torch.float64)
    pos = torch.stack([torch.randperm(12)[:5] for _ in range(3)])
    noise = torch.rand(3, 25) if pairs else None
    l0, a0, gz0, g0 = _loss_and_grads(plain, z, pos, sigma, noise)
    l1, a1, gz1, g1 = _loss_and_grads(fused, z, pos, sigma, noise)
    torch.testing.assert_close(l1, l0)
    assert a1 == a0
    torch.testing.assert_close(gz1, gz0)
    for name in g0:
        torch.testing.assert_close(g1[name], g0[name], msg=name)
    rows = fused.head.classifier.weight.shape[0]
    assert rows > fused.head.num_classes  # the padded rows exist and get no gradient
    assert g1["head.classifier.weight"][fused.head.num_classes :].abs().sum() == 0


def test_fused_linear_cross_entropy_without_grad_computes_only_the_loss():
    """Under no_grad (reconstruction images) the fused loss does one product per chunk, not
    the three of its in-forward gradients, and gives the same loss and accuracy."""
    from torch.overrides import TorchFunctionMode

    from maepl.models.pos_labels import linear_cross_entropy

    class Products(TorchFunctionMode):
        n = 0

        def __torch_function__(self, func, types, args=(), kwargs=None):
            if getattr(func, "__name__", "") in ("linear", "matmul", "__matmul__"):
                Products.n += 1
            return func(*args, **(kwargs or {}))

    torch.manual_seed(0)
    clf = torch.nn.Linear(8, 16)
    h, y = torch.randn(20, 8, requires_grad=True), torch.randint(0, 12, (20,))
    coords = torch.stack(torch.meshgrid(torch.arange(4), torch.arange(3), indexing="ij"), -1)
    coords = coords.reshape(12, 2).float()
    counts, out = [], []
    for grad in (True, False):
        Products.n = 0
        with torch.set_grad_enabled(grad), Products():
            out.append(linear_cross_entropy(h, clf, 12, y, coords, chunk=7))
        counts.append(Products.n)
    assert counts == [9, 3]  # 3 chunks: linear + two gradient products each, then linear only
    assert not out[1][0].requires_grad and out[0][0].requires_grad
    torch.testing.assert_close(out[1][0], out[0][0].detach())
    assert out[1][1] == out[0][1]


def test_fused_linear_cross_entropy_under_bf16_autocast_is_close_to_plain():
    torch.manual_seed(0)
    plain = PositionLabeler("rel", 32, 4, 4)
    fused = PositionLabeler("rel", 32, 4, 4, ce_chunk=50)
    fused.load_state_dict(plain.state_dict())
    z = torch.randn(4, 6, 32)
    pos = torch.stack([torch.randperm(16)[:6] for _ in range(4)])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        l0, _, gz0, g0 = _loss_and_grads(plain, z, pos, None, None)
        l1, _, gz1, g1 = _loss_and_grads(fused, z, pos, None, None)
    assert l1.dtype == torch.float32 and gz1.dtype == torch.float32
    torch.testing.assert_close(l1, l0, atol=2e-3, rtol=2e-3)
    torch.testing.assert_close(gz1, gz0, atol=2e-3, rtol=5e-2)
    for name in g0:
        assert g1[name].dtype == torch.float32
        torch.testing.assert_close(g1[name], g0[name], atol=2e-3, rtol=5e-2, msg=name)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_fused_linear_cross_entropy_on_cuda_bf16_is_close_to_plain():
    torch.manual_seed(0)
    plain = PositionLabeler("rel", 64, 14, 14).cuda()
    fused = PositionLabeler("rel", 64, 14, 14, ce_chunk=1000).cuda()
    fused.load_state_dict(plain.state_dict())
    z = torch.randn(8, 12, 64, device="cuda")
    pos = torch.stack([torch.randperm(196)[:12] for _ in range(8)]).cuda()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        l0, _, gz0, g0 = _loss_and_grads(plain, z, pos, None, None)
        l1, _, gz1, g1 = _loss_and_grads(fused, z, pos, None, None)
    torch.testing.assert_close(l1, l0, atol=2e-3, rtol=2e-3)
    torch.testing.assert_close(gz1, gz0, atol=2e-3, rtol=5e-2)
    for name in g0:
        torch.testing.assert_close(g1[name], g0[name], atol=2e-3, rtol=5e-2, msg=name)


def test_fused_linear_cross_entropy_keeps_small_float16_gradients():
    # 50 x 20 x 20 = 20,000 pair rows: per-row gradients ~ 1/20,000 * softmax, below float16's
    # normal range unless scaled; with a GradScaler-style scaled loss they must come out right
    torch.manual_seed(0)
    ref = PositionLabeler("rel", 16, 6, 6).double()
    fused = PositionLabeler("rel", 16, 6, 6, ce_chunk=4096).half()
    fused.load_state_dict(ref.state_dict())
    z = torch.randn(50, 20, 16, dtype=torch.float64)
    pos = torch.stack([torch.randperm(36)[:20] for _ in range(50)])
    _, _, gz_ref, g_ref = _loss_and_grads(ref, z, pos, None, None)
    zh = z.half().requires_grad_(True)
    loss, _ = fused(zh, pos)
    (loss * 1024).backward()  # what torch.amp.GradScaler does to the loss
    assert zh.grad.dtype == torch.float16
    gz = zh.grad.double() / 1024
    assert (gz != 0).float().mean() > 0.99  # nothing flushed to zero
    torch.testing.assert_close(gz, gz_ref, atol=1e-6, rtol=5e-2)
    g_w = fused.head.classifier.weight.grad.double() / 1024
    torch.testing.assert_close(g_w, g_ref["head.classifier.weight"], atol=1e-5, rtol=5e-2)


def _unfolded_loss(lab: PositionLabeler, z, pos, sigma, noise):
    """The head as defined (last Linear, then the classifier), for the folded path to match."""
    if lab.kind == "abs":
        feats, labels = lab.head.features(z), pos
    else:
        labels, pairs = rel_labels(pos, lab.grid_h, lab.grid_w).flatten(1), None
        if lab.num_pairs:
            m = z.shape[1]
            flat = torch.argsort(noise, dim=1)[:, : lab.num_pairs]
            pairs, labels = torch.stack([flat // m, flat % m], -1), torch.gather(labels, 1, flat)
        feats = lab.head.features(z, pairs)
    logits = lab.head.classifier(feats.flatten(0, -2))[:, : lab.head.num_classes]
    return position_loss(logits, labels.flatten(), lab.coords, sigma)[0]


@pytest.mark.parametrize("chunk", [0, 7])
@pytest.mark.parametrize(
    "kind, pairs, sigma", [("abs", 0, None), ("abs", 0, 1.5), ("rel", 0, None), ("rel", 10, 0.7)]
)
def test_folded_classifier_gives_the_unfolded_loss_and_gradients(kind, pairs, sigma, chunk):
    """Training folds the head's last Linear into the classifier (one product over the rows
    instead of two): the loss and every gradient are those of the layers applied in turn."""
    torch.manual_seed(1)
    lab = PositionLabeler(kind, 16, 3, 4, pairs=pairs, ce_chunk=chunk).double()
    z, noise = torch.randn(3, 5, 16, dtype=torch.float64), torch.rand(3, 25)
    pos = torch.stack([torch.randperm(12)[:5] for _ in range(3)])
    loss, _, gz, grads = _loss_and_grads(lab, z, pos, sigma, noise)
    lab.zero_grad()
    z_ref = z.clone().requires_grad_(True)
    ref = _unfolded_loss(lab, z_ref, pos, sigma, noise)
    ref.backward()
    # the fused loss computes its log-probabilities in float32 whatever the input's dtype
    tol = dict(atol=1e-12, rtol=1e-9) if chunk == 0 else dict(atol=1e-7, rtol=1e-4)
    torch.testing.assert_close(loss, ref.detach(), **tol)
    torch.testing.assert_close(gz, z_ref.grad, **tol)
    for name, p in lab.named_parameters():
        torch.testing.assert_close(grads[name], p.grad, **tol, msg=name)
        assert p.grad.abs().sum() > 0, name  # every layer, the folded ones too, is trained


def test_folded_classifier_under_bf16_autocast_and_compile():
    """The fold runs in float32 outside autocast and compiles without a graph break; the
    loss stays within bf16 rounding of the float32 head's."""
    torch.manual_seed(0)
    lab = PositionLabeler("rel", 32, 4, 4)
    z, pos = torch.randn(4, 6, 32), torch.stack([torch.randperm(16)[:6] for _ in range(4)])
    ref = lab(z, pos)[0]
    compiled = torch.compile(lab, backend="aot_eager", fullgraph=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, _ = compiled(z, pos)
    loss.backward()
    assert loss.dtype == torch.float32 and abs(loss.item() - ref.item()) < 0.02 * ref.item()
    assert lab.head.fc2.weight.grad.abs().sum() > 0


def test_fused_loss_under_float16_autocast_keeps_small_weight_gradients():
    """float32 weights under float16 autocast with a GradScaler-style scaled loss: the fused
    loss's classifier gradients (the folded one's, which reach fc2 and the classifier) stay
    float32 until the scale is applied; cast to float16 first they lost 21-33 %."""
    torch.manual_seed(0)
    ref = PositionLabeler("rel", 16, 6, 6).double()
    with torch.no_grad():
        ref.head.fc1.bias.zero_()
        ref.head.fc2.bias.zero_()
    lab = PositionLabeler("rel", 16, 6, 6, ce_chunk=4096)
    lab.load_state_dict(ref.state_dict())
    z = 3e-4 * torch.randn(50, 20, 16, dtype=torch.float64)  # small features: small gradients
    pos = torch.stack([torch.randperm(36)[:20] for _ in range(50)])
    ref(z, pos)[0].backward()
    with torch.autocast("cpu", dtype=torch.float16):
        loss, _ = lab(z.float(), pos)
    (loss * 65536.0).backward()
    for name in ("head.classifier.weight", "head.fc2.weight"):
        got = dict(lab.named_parameters())[name].grad.double() / 65536.0
        want = dict(ref.named_parameters())[name].grad
        err = (got - want).abs().max() / want.abs().max()
        assert err < 0.01, (name, float(err))


@pytest.mark.parametrize(
    "drop, pos_embed, trivial",
    [(0.0, "sincos", True), (0.75, "sincos", False), (0.0, "none", False)],
)
def test_a_run_says_when_its_position_task_is_trivial(tiny_cfg, capsys, drop, pos_embed, trivial):
    """PE kept on every labelled token (the control the reference saw collapse): said at the
    start; not with the PE dropped, nor without any encoder PE."""
    pretrain.main(tiny_cfg(max_steps=1, pos_label="abs", pos_drop_ratio=drop, pos_embed=pos_embed))
    assert ("so the position task can be solved by reading it back" in capsys.readouterr().out) == (
        trivial
    )
