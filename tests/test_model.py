import math

import pytest
import torch
from torch import nn

from maepl.models.encoder import build_encoder
from maepl.models.mae import MaskedAutoencoder
from maepl.models.pos_embed import sincos_2d


def make_mae(mask_ratio=0.75, pos_embed="sincos", **kw):
    enc = build_encoder("vit_tiny_patch16_224", 16, 4, 3, 32, 2, 2, pos_embed)
    return MaskedAutoencoder(enc, pos_embed, 16, 1, 2, mask_ratio=mask_ratio, **kw)


def test_sincos_values_match_mae_layout():
    # dim 8 on a 2x2 grid: quarter = 2, omega = [1, 1/100]; blocks sin(col), cos(col),
    # sin(row), cos(row)
    e = sincos_2d(8, 2, 2, cls_token=True)
    assert e.shape == (5, 8)
    assert torch.equal(e[0], torch.zeros(8))
    s1, s2, c1, c2 = math.sin(1), math.sin(0.01), math.cos(1), math.cos(0.01)
    expect = {
        1: [0, 0, 1, 1, 0, 0, 1, 1],  # token 0: row 0, col 0
        2: [s1, s2, c1, c2, 0, 0, 1, 1],  # token 1: row 0, col 1
        3: [0, 0, 1, 1, s1, s2, c1, c2],  # token 2: row 1, col 0
        4: [s1, s2, c1, c2, s1, s2, c1, c2],  # token 3: row 1, col 1
    }
    for row, values in expect.items():
        assert torch.allclose(e[row], torch.tensor(values, dtype=torch.float32), atol=1e-6), row


def test_a_pos_embed_that_does_not_match_the_encoder_is_refused():
    # "none" over an encoder with a PE would add it to every token and label them all
    with_pe = build_encoder("vit_tiny_patch16_224", 16, 4, 3, 32, 2, 2, "sincos")
    with pytest.raises(
        ValueError, match="pos_embed 'none' does not match the encoder, which has a"
    ):
        MaskedAutoencoder(with_pe, "none", 16, 1, 2, pos_label="abs", pos_drop_ratio=0.75)
    without = build_encoder("vit_tiny_patch16_224", 16, 4, 3, 32, 2, 2, "none")
    with pytest.raises(
        ValueError, match="pos_embed 'sincos' does not match the encoder, which has no"
    ):
        MaskedAutoencoder(without, "sincos", 16, 1, 2)


def test_encoder_and_decoder_pe_are_fixed_sincos():
    mae = make_mae()
    assert torch.equal(mae.encoder.pos_embed[0], sincos_2d(32, 4, 4, cls_token=True))
    assert not mae.encoder.pos_embed.requires_grad
    assert torch.equal(mae.decoder_pos_embed[0], sincos_2d(16, 4, 4, cls_token=True))
    learned = make_mae(pos_embed="learned")
    assert learned.encoder.pos_embed.requires_grad
    assert make_mae(pos_embed="none").encoder.pos_embed is None


def test_patchify_roundtrip_and_layout():
    mae = make_mae()
    imgs = torch.randn(2, 3, 16, 16)
    x = mae.patchify(imgs)
    assert x.shape == (2, 16, 4 * 4 * 3)
    assert torch.equal(mae.unpatchify(x), imgs)
    # patch 5 = row 1, col 1; inside it (p, q, c) order: element (p=2, q=3, c=1)
    assert x[1, 5, (2 * 4 + 3) * 3 + 1] == imgs[1, 1, 4 + 2, 4 + 3]


def test_masking_counts_and_restore():
    mae = make_mae(mask_ratio=0.75)
    imgs = torch.randn(3, 3, 16, 16)
    noise = torch.rand(3, 16)
    out = mae(imgs, noise)
    assert mae.len_keep == 4
    assert out["mask"].sum(1).tolist() == [12, 12, 12]
    # the kept patches are exactly the 4 lowest-noise ones
    kept = torch.argsort(noise, 1)[:, :4]
    assert (torch.gather(out["mask"], 1, kept) == 0).all()
    assert out["pred"].shape == (3, 16, 48)


def test_loss_counts_masked_patches_only():
    mae = make_mae(norm_pix_loss=False)
    imgs = torch.randn(2, 3, 16, 16)
    pred = torch.randn(2, 16, 48)
    mask = torch.zeros(2, 16)
    mask[:, :5] = 1
    base = mae.reconstruction_loss(imgs, pred, mask)
    visible_changed = pred.clone()
    visible_changed[:, 5:] += 100
    assert torch.equal(mae.reconstruction_loss(imgs, visible_changed, mask), base)
    masked_changed = pred.clone()
    masked_changed[:, 0] += 1
    assert mae.reconstruction_loss(imgs, masked_changed, mask) > base
    # the value: mean over masked patches of the per-patch MSE
    target = mae.patchify(imgs)
    assert torch.allclose(base, (pred[:, :5] - target[:, :5]).pow(2).mean())


def test_norm_pix_loss_normalises_each_patch():
    mae = make_mae(norm_pix_loss=True)
    imgs = torch.randn(1, 3, 16, 16)
    t = mae.patchify(imgs)
    pred = (t - t.mean(-1, keepdim=True)) / (t.var(-1, keepdim=True) + 1e-6).sqrt()
    assert mae.reconstruction_loss(imgs, pred, torch.ones(1, 16)) < 1e-10


def test_unmasked_encoder_equals_timm_forward_features():
    # composition check: our masked path with nothing removed and identity order is timm's
    mae = make_mae(mask_ratio=0.0).eval()
    imgs = torch.randn(2, 3, 16, 16)
    noise = torch.arange(16.0).expand(2, -1)
    latent, ids_keep, _, _ = mae.forward_encoder(imgs, noise)
    assert torch.equal(ids_keep[0], torch.arange(16))
    assert torch.allclose(latent, mae.encoder.forward_features(imgs), atol=1e-6)


def test_position_drop_hides_pe_of_exactly_the_chosen_tokens():
    mae = make_mae(mask_ratio=0.5, pos_label="abs", pos_drop_ratio=0.5)
    assert mae.len_keep == 8 and mae.num_drop == 4
    enc = mae.encoder
    enc.blocks, enc.norm = nn.Identity(), nn.Identity()  # latent = tokens + PE, readable
    imgs = torch.randn(2, 3, 16, 16)
    noise, drop_noise = torch.rand(2, 16), torch.rand(2, 8)
    latent, ids_keep, _, drop_idx = mae.forward_encoder(imgs, noise, drop_noise)
    assert torch.equal(drop_idx, torch.argsort(drop_noise, 1)[:, :4])
    tokens = torch.gather(enc.patch_embed(imgs), 1, ids_keep[..., None].expand(-1, -1, 32))
    added = latent[:, 1:] - tokens  # what was added to each visible token
    pe = enc.pos_embed[0, 1:]
    for b in range(2):
        for k in range(8):
            if k in drop_idx[b].tolist():
                expected = mae.pos_mask_token[0, 0]
            else:
                expected = pe[ids_keep[b, k]]
            assert torch.allclose(added[b, k], expected, atol=1e-5), (b, k)


def test_plain_mae_never_drops_pe():
    mae = make_mae(pos_label="none", pos_drop_ratio=0.75)
    assert mae.num_drop == 0 and mae.pos_mask_token is None and mae.pos_head is None


@pytest.mark.parametrize("kind", ["abs", "rel"])
def test_position_loss_reads_only_labelled_tokens(kind):
    mae = make_mae(mask_ratio=0.5, pos_label=kind, pos_drop_ratio=0.5).eval()
    with torch.no_grad():
        mae.pos_mask_token.normal_()
    imgs = torch.randn(2, 3, 16, 16)
    noise = mae.make_noise(2, torch.device("cpu"))
    # which visible tokens lost their PE, found from behaviour: the encoder inputs that change
    # when the PE mask token changes
    inputs = []
    hook = mae.encoder.blocks.register_forward_pre_hook(lambda m, a: inputs.append(a[0].clone()))
    read = {}
    head_forward = mae.pos_head.forward
    mae.pos_head.forward = lambda z, pos, *a: read.update(z=z, pos=pos) or head_forward(z, pos, *a)
    out = mae(imgs, **noise)
    latent, ids_keep, _, _ = mae.forward_encoder(imgs, noise["noise"], noise["drop_noise"])
    with torch.no_grad():
        mae.pos_mask_token.add_(1.0)
    mae.forward_encoder(imgs, noise["noise"], noise["drop_noise"])
    hook.remove()
    changed = (inputs[1] != inputs[2]).any(-1)[:, 1:]  # [N, K] visible tokens, CLS excluded
    assert changed.sum(1).tolist() == [mae.num_drop] * 2 and 0 < mae.num_drop < mae.len_keep
    for b in range(2):  # the head read exactly those tokens' encoder outputs and positions
        rows = changed[b].nonzero().flatten()
        assert sorted(read["pos"][b].tolist()) == sorted(ids_keep[b, rows].tolist())
        order = read["pos"][b].argsort()
        want = latent[b, 1:][rows][ids_keep[b, rows].argsort()]
        assert torch.allclose(read["z"][b][order], want, atol=1e-6)
    # chance level of the head's classes at init
    classes = 16 if kind == "abs" else 49
    assert abs(out["pos_loss"].item() - math.log(classes)) < 1.0
    out["pos_loss"].backward()  # the hidden tokens' stand-in PE learns from the position task
    assert mae.pos_mask_token.grad is not None and mae.pos_mask_token.grad.abs().sum() > 0


def test_a_drop_ratio_that_hides_nothing_is_refused():
    with pytest.raises(ValueError, match="pos_drop_ratio"):
        make_mae(mask_ratio=0.75, pos_label="abs", pos_drop_ratio=0.2)  # int(4 * 0.2) == 0


def test_visible_patches_are_embedded_as_the_conv_would():
    # the product with the flattened kernel on kept patches = timm's conv on all, then gather
    torch.manual_seed(0)
    mae = make_mae()
    imgs = torch.randn(3, 3, 16, 16, requires_grad=True)
    ids_keep = torch.argsort(torch.rand(3, 16), 1)[:, : mae.len_keep]
    fast = mae.embed_visible(imgs, ids_keep)
    full = mae.encoder.patch_embed(imgs)
    ref = torch.gather(full, 1, ids_keep[..., None].expand(-1, -1, full.shape[-1]))
    assert torch.allclose(fast, ref, atol=1e-5)
    w = mae.encoder.patch_embed.proj.weight
    (g_fast,) = torch.autograd.grad(fast.square().sum(), w)
    (g_ref,) = torch.autograd.grad(ref.square().sum(), w)
    assert torch.allclose(g_fast, g_ref, atol=1e-4)
    # a patch embedding with a norm is not a plain convolution: the general route is taken
    mae.encoder.patch_embed.norm = nn.LayerNorm(32)
    normed = mae.encoder.patch_embed(imgs)
    expect = torch.gather(normed, 1, ids_keep[..., None].expand(-1, -1, 32))
    assert torch.allclose(mae.embed_visible(imgs, ids_keep), expect, atol=1e-6)


def test_reconstruction_grid_does_not_run_the_compiled_forward():
    """A model compiled in place (--compile) must not be recompiled for the visualisation's
    batch size and eval mode: the grid calls the plain forward."""
    from maepl.tracking import reconstruction_grid

    graphs = []

    def counting_backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    mae = make_mae()
    torch._dynamo.reset()
    mae.compile(backend=counting_backend)
    imgs = torch.randn(2, 3, 16, 16)
    mae(imgs, **mae.make_noise(2, imgs.device))  # the training call compiles
    compiled = len(graphs)
    assert compiled >= 1
    grid = reconstruction_grid(mae, imgs[:1], [0.5] * 3, [0.5] * 3)
    assert grid.shape[0] == 3 and len(graphs) == compiled and mae.training
    torch._dynamo.reset()


@pytest.mark.parametrize("residual_dtype", [None, torch.bfloat16])
def test_residual_dtype_sets_the_stream_dtype_under_autocast(residual_dtype):
    """Under bf16 autocast the residual stream stays float32 unless residual_dtype is set;
    weights and their gradients stay float32 either way."""
    mae = make_mae(residual_dtype=residual_dtype)
    seen = {}
    for name, block in (("enc", mae.encoder.blocks[-1]), ("dec", mae.decoder_blocks[-1])):
        block.register_forward_hook(lambda m, i, o, name=name: seen.__setitem__(name, o.dtype))
    imgs = torch.randn(2, 3, 16, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = mae(imgs, **mae.make_noise(2, imgs.device))
    want = residual_dtype or torch.float32
    assert seen == {"enc": want, "dec": want}
    out["mae_loss"].backward()
    assert all(p.dtype == torch.float32 for p in mae.parameters())
    assert all(p.grad.dtype == torch.float32 for p in mae.parameters() if p.grad is not None)
