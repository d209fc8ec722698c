"""finetune.py, linprobe.py and the weight loaders (issue: fine-tuning and linear probing)."""

import argparse
import json
import os
import pickle
import subprocess
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from timm.optim import param_groups_layer_decay

import finetune
import linprobe
import pretrain
from maepl.config import ConfigError, FinetuneConfig, LinprobeConfig, PretrainConfig, parse_config
from maepl.models.pos_embed import sincos_2d
from maepl.weights import load_encoder_weights, read_state_dict

from .conftest import ROOT, torchrun

SHAPE = [
    "--input_size",
    "16",
    "--patch_size",
    "4",
    "--embed_dim",
    "32",
    "--depth",
    "2",
    "--num_heads",
    "2",
]


@pytest.fixture(scope="module")
def colours(tmp_path_factory) -> Path:
    """An easy 3-class task: noisy red / green / blue images; 27 validation images (odd)."""
    root = tmp_path_factory.mktemp("colours")
    rng = np.random.default_rng(0)
    for split, n in (("train", 40), ("val", 9)):
        for c, name in enumerate(("red", "green", "blue")):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(n):
                arr = rng.integers(0, 90, (16, 16, 3))
                arr[..., c] += 160
                Image.fromarray(arr.astype(np.uint8)).save(folder / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory) -> Path:
    """A tiny maepl pretraining run (its exports and checkpoint are the inputs below)."""
    out = tmp_path_factory.mktemp("pre") / "run"
    cfg = parse_config(
        PretrainConfig,
        [
            "--model",
            "vit_tiny_patch16_224",
            *SHAPE,
            "--in_chans",
            "3",
            "--dataset",
            "sample",
            "--decoder_embed_dim",
            "16",
            "--decoder_depth",
            "1",
            "--decoder_num_heads",
            "2",
            "--batch_size",
            "16",
            "--max_steps",
            "3",
            "--num_workers",
            "0",
            "--output_dir",
            str(out),
        ],
    )
    pretrain.main(cfg)
    return out


def tiny_vit(img_size=16, **kw):
    """The pretrained fixture's shape (32-d x 2 blocks, patch 4) as a timm classifier."""
    return timm.create_model(
        "vit_tiny_patch16_224",
        img_size=img_size,
        patch_size=4,
        embed_dim=32,
        depth=2,
        num_heads=2,
        **kw,
    )


def official_mae_pth(pretrained: Path, path: Path, with_args: bool = True) -> Path:
    """An official-MAE-format checkpoint: timm encoder keys + decoder keys + mask_token under
    'model', as in facebookresearch/mae's released files (and its training checkpoints)."""
    sd = {
        k[len("encoder.") :]: v
        for k, v in load_file(pretrained / "export" / "mae.safetensors").items()
        if k.startswith("encoder.")
    }
    sd.update(
        {
            "mask_token": torch.zeros(1, 1, 16),
            "decoder_embed.weight": torch.zeros(16, 32),
            "decoder_pos_embed": torch.zeros(1, 17, 16),
            "decoder_pred.bias": torch.zeros(48),
        }
    )
    obj = {"model": sd, "epoch": 399}
    if with_args:
        obj["args"] = argparse.Namespace(model="mae_vit_base_patch16", norm_pix_loss=True)
    torch.save(obj, path)
    return path


def ft_args(colours, out, *extra):
    return [
        "--model",
        "vit_tiny_patch16_224",
        *SHAPE,
        "--in_chans",
        "3",
        "--data_path",
        str(colours),
        "--batch_size",
        "8",
        "--num_workers",
        "0",
        "--output_dir",
        str(out),
        "--log_every",
        "5",
        *extra,
    ]


@pytest.mark.parametrize(
    "kind", ["export_dir", "export_file", "mae_full", "checkpoint", "official_pth"]
)
def test_each_checkpoint_kind_loads(pretrained, tmp_path, kind):
    reference = load_file(pretrained / "export" / "encoder" / "model.safetensors")
    path = {
        "export_dir": pretrained / "export" / "encoder",
        "export_file": pretrained / "export" / "encoder" / "model.safetensors",
        "mae_full": pretrained / "export" / "mae.safetensors",
        "checkpoint": pretrained / "checkpoints" / "step_00000003",
        "official_pth": None,
    }[kind] or official_mae_pth(pretrained, tmp_path / "mae_pretrain.pth")
    sd, dropped = read_state_dict(path)
    assert set(sd) == set(reference)
    assert all(torch.equal(sd[k], reference[k]) for k in sd)
    if kind in ("official_pth", "mae_full", "checkpoint"):
        assert "mask_token" in dropped and any(k.startswith("decoder") for k in dropped)
    model = tiny_vit(img_size=16, num_classes=5, global_pool="avg")
    report = load_encoder_weights(model, path, "learned")
    assert set(report["missing"]) == {"head.weight", "head.bias", "fc_norm.weight", "fc_norm.bias"}
    assert torch.equal(model.blocks[1].mlp.fc2.weight, reference["blocks.1.mlp.fc2.weight"])


def test_missing_encoder_keys_are_refused_by_name(pretrained, tmp_path):
    sd = load_file(pretrained / "export" / "encoder" / "model.safetensors")
    del sd["blocks.1.attn.qkv.weight"], sd["cls_token"]
    save_file(sd, tmp_path / "broken.safetensors")
    model = tiny_vit(img_size=16, num_classes=5)
    with pytest.raises(ValueError, match=r"blocks\.1\.attn\.qkv\.weight.*cls_token|cls_token.*qkv"):
        load_encoder_weights(model, tmp_path / "broken.safetensors", "learned")


class Payload:
    def __reduce__(self):
        return (os.system, ("touch " + str(Path(os.environ["MAEPL_MARKER"])),))


def test_pickle_that_would_run_code_is_refused(tmp_path, monkeypatch):
    marker = tmp_path / "ran"
    monkeypatch.setenv("MAEPL_MARKER", str(marker))
    (tmp_path / "evil.pth").write_bytes(pickle.dumps({"model": {"w": Payload()}}))
    with pytest.raises(ValueError, match="refused"):
        read_state_dict(tmp_path / "evil.pth")
    assert not marker.exists()


def test_pos_embed_resampled_and_added_for_pe_free_encoders(pretrained, tmp_path):
    model = tiny_vit(img_size=32, num_classes=3)
    report = load_encoder_weights(model, pretrained / "export" / "encoder", "learned")
    assert model.pos_embed.shape == (1, 65, 32) and any("resampled" in n for n in report["notes"])
    sd = load_file(pretrained / "export" / "encoder" / "model.safetensors")
    del sd["pos_embed"]  # as exported by --pos_embed none pretraining
    save_file(sd, tmp_path / "nope.safetensors")
    model = tiny_vit(img_size=16, num_classes=3)
    load_encoder_weights(model, tmp_path / "nope.safetensors", "learned")
    assert torch.equal(model.pos_embed[0], sincos_2d(32, 4, 4, cls_token=True))
    assert model.pos_embed.requires_grad  # learned, starting from sin-cos (MP3)


def test_layer_decay_groups_and_lr_scales():
    model = tiny_vit(img_size=16, num_classes=3)
    groups = param_groups_layer_decay(model, 0.05, model.no_weight_decay(), layer_decay=0.5)
    scales = {}
    for g in groups:
        for p in g["params"]:
            name = next(n for n, q in model.named_parameters() if q is p)
            scales[name] = (g["lr_scale"], g["weight_decay"])
    # 2 blocks -> layers 0 (embeddings) .. 3 (head): scale 0.5 ** (3 - layer)
    assert scales["patch_embed.proj.weight"] == (0.125, 0.05)
    assert scales["cls_token"] == (0.125, 0.0) and scales["pos_embed"] == (0.125, 0.0)
    assert scales["blocks.0.attn.qkv.weight"] == (0.25, 0.05)
    assert scales["blocks.1.mlp.fc1.bias"] == (0.5, 0.0)
    assert scales["head.weight"] == (1.0, 0.05)
    from maepl.optim import set_lr

    opt = torch.optim.AdamW(groups, lr=1.0)
    set_lr(opt, 0.8)
    assert sorted({g["lr"] for g in opt.param_groups}) == [0.1, 0.2, 0.4, 0.8]


def test_lars_adapts_weights_and_leaves_biases_alone():
    from timm.optim import Lars

    head = torch.nn.Linear(4, 3)
    with torch.no_grad():
        head.weight.fill_(2.0)
        head.bias.fill_(2.0)
    w0, b0 = head.weight.clone(), head.bias.clone()
    opt = Lars(linprobe.lars_groups(head, 0.0), lr=1.0, momentum=0.0)
    head.weight.grad = torch.ones_like(head.weight)
    head.bias.grad = torch.ones_like(head.bias)
    opt.step()
    # weight: the update is scaled by trust = 0.001 * |w| / |g| = 0.001 * 2; bias: plain SGD
    trust = 0.001 * w0.norm() / head.weight.grad.norm()
    assert torch.allclose(w0 - head.weight, torch.full_like(w0, trust.item()), atol=1e-7)
    assert torch.allclose(b0 - head.bias, torch.ones_like(b0))


def test_finetune_from_scratch_and_with_positional_labels_beats_chance(colours, tmp_path):
    extra = "--epochs 4 --blr 5e-2 --warmup_epochs 1 --pos_label abs --aa null --mixup 0 --cutmix 0"
    cfg = parse_config(FinetuneConfig, ft_args(colours, tmp_path / "ft", *extra.split()))
    summary = finetune.main(cfg)
    assert summary["top1"] > 80 and summary["n"] == 27  # chance is 33
    assert summary["pos_loss"] > 0
    export = tmp_path / "ft" / "export"
    model = timm.create_model(f"local-dir:{export / 'best'}", pretrained=True)
    assert model.num_classes == 3 and not any("pos_head" in k for k in model.state_dict())
    again = finetune.main(
        parse_config(
            FinetuneConfig,
            ft_args(colours, tmp_path / "ev", "--finetune", str(export / "last"), "--eval"),
        )
    )
    assert again["top1"] == pytest.approx(summary["top1"]) and again["n"] == 27


def test_finetune_of_a_pretrained_export_with_mixup_runs(colours, pretrained, tmp_path):
    args = [
        "--finetune",
        str(pretrained / "export" / "encoder"),
        "--data_path",
        str(colours),
        "--output_dir",
        str(tmp_path / "ft"),
        *"--batch_size 8 --num_workers 0 --epochs 3 --blr 5e-2 --warmup_epochs 1".split(),
    ]
    cfg = parse_config(FinetuneConfig, args)  # architecture read from the export
    assert (cfg.encoder, cfg.embed_dim, cfg.input_size) == ("vit_tiny_patch16_224", 32, 16)
    summary = finetune.main(cfg)
    assert summary["top1"] > 45 and np.isfinite(summary["loss"])
    written = json.loads((tmp_path / "ft" / "summary.json").read_text())
    assert written["top1"] == summary["top1"] and written["best_top1"] == summary["best_top1"]


def test_linprobe_beats_chance_and_knn(colours, pretrained, tmp_path):
    args = [
        "--finetune",
        str(pretrained / "export" / "encoder"),
        "--data_path",
        str(colours),
        *"--batch_size 16 --num_workers 0 --epochs 10 --blr 100 --warmup_epochs 1".split(),
    ]
    summary = linprobe.main(
        parse_config(LinprobeConfig, args + ["--output_dir", str(tmp_path / "lp")])
    )
    assert summary["top1"] > 80 and summary["n"] == 27  # chance is 33
    assert json.loads((tmp_path / "lp" / "summary.json").read_text())["top1"] == summary["top1"]
    knn = linprobe.main(
        parse_config(LinprobeConfig, args + ["--knn", "--output_dir", str(tmp_path / "k")])
    )
    assert knn["knn_top1"] > 60
    assert json.loads((tmp_path / "k" / "summary.json").read_text()) == knn


def test_finetune_without_model_or_weights_names_the_key(colours):
    with pytest.raises(ConfigError, match="model"):
        parse_config(FinetuneConfig, ["--data_path", str(colours)])


def test_distributed_evaluation_counts_each_image_once(colours, tmp_path, pretrained):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [
        *torchrun("finetune.py", 29541),
        "--finetune",
        str(pretrained / "export" / "encoder"),
        "--data_path",
        str(colours),
        "--eval",
        "--batch_size",
        "4",
        "--num_workers",
        "0",
        "--nb_classes",
        "3",
        "--output_dir",
        str(tmp_path / "dist"),
    ]
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "evaluated 27 images" in r.stdout  # 14 + 13 over two ranks, no padding
    single = finetune.main(
        parse_config(
            FinetuneConfig,
            cmd[cmd.index("--finetune") : -2] + ["--output_dir", str(tmp_path / "one")],
        )
    )
    assert f"top1={single['top1']:.2f}" in r.stdout.splitlines()[-1]


def test_finetune_passes_the_fused_position_loss_to_its_head(colours, tmp_path):
    args = ft_args(colours, tmp_path / "ft", "--pos_label", "rel", "--pos_ce_chunk", "16")
    model, _ = finetune.build_classifier(parse_config(FinetuneConfig, args), 3)
    assert model.pos_head.kind == "rel" and model.pos_head.ce_chunk == 16


def test_runs_of_different_precision_follow_each_other_in_one_process(
    colours, pretrained, tmp_path
):
    """Accelerate keeps one precision per process: a bf16 fine-tune, then a linear probe at the
    default precision in the same process (benchmarks/quality.py does this) must both run."""
    common = ["--finetune", str(pretrained / "export" / "encoder"), "--data_path", str(colours)]
    common += "--batch_size 8 --num_workers 0 --epochs 1 --warmup_epochs 0".split()
    ft = finetune.main(
        parse_config(
            FinetuneConfig,
            common + ["--mixed_precision", "bf16", "--output_dir", str(tmp_path / "ft")],
        )
    )
    lp = linprobe.main(
        parse_config(LinprobeConfig, common + ["--output_dir", str(tmp_path / "lp")])
    )
    assert np.isfinite(ft["loss"]) and lp["n"] == 27
