"""finetune.py, linprobe.py and the weight loaders (issue: fine-tuning and linear probing)."""

import argparse
import json
import os
import pickle
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from timm.data import Mixup
from timm.optim import param_groups_layer_decay

import finetune
import linprobe
import pretrain
from maepl.config import ConfigError, FinetuneConfig, LinprobeConfig, PretrainConfig, parse_config
from maepl.loaders import BadImageError
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


@pytest.fixture(scope="module")
def token_classifier(colours, pretrained, tmp_path_factory) -> tuple[Path, dict]:
    """finetune.py's output folder of a 1-epoch fine-tune with --global_pool token (its
    export/last holds norm.*, no fc_norm.*, a 3-class head), and its summary."""
    out = tmp_path_factory.mktemp("ft_token") / "run"
    args = ["--finetune", str(pretrained / "export" / "encoder"), "--data_path", str(colours)]
    args += "--global_pool token --epochs 1 --warmup_epochs 0 --blr 5e-2 --aa null".split()
    args += "--mixup 0 --cutmix 0 --reprob 0 --batch_size 8 --num_workers 0".split()
    summary = finetune.main(parse_config(FinetuneConfig, args + ["--output_dir", str(out)]))
    return out, summary


def without_pos_embed(export: Path, dest: Path, record: bool = True) -> Path:
    """``export`` as a --pos_embed none run writes it: no pos_embed tensor and, if ``record``,
    config.json's model_args saying so (else no config.json: foreign weights)."""
    dest.mkdir(parents=True)
    sd = load_file(export / "model.safetensors")
    del sd["pos_embed"]
    save_file(sd, dest / "model.safetensors")
    if record:
        cfg = json.loads((export / "config.json").read_text())
        cfg["model_args"]["pos_embed"] = "none"
        (dest / "config.json").write_text(json.dumps(cfg))
    return dest


def foreign_copy(export: Path, dest: Path) -> Path:
    """The weights of ``export`` with nothing recorded beside them (as a foreign file)."""
    dest.mkdir(parents=True)
    (dest / "weights.safetensors").write_bytes((export / "model.safetensors").read_bytes())
    return dest / "weights.safetensors"


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


@pytest.mark.parametrize("in_chans", [1, 4])
def test_rgb_weights_adapt_to_another_channel_count_as_timm_does(pretrained, tmp_path, in_chans):
    """RGB weights (the official releases) fine-tuned on grey images: the patch embedding's
    filters are summed (1 channel) or repeated and rescaled, as timm's pretrained loading does;
    a frozen encoder (exact) still refuses, naming the tensor and --in_chans."""
    path = official_mae_pth(pretrained, tmp_path / "mae_pretrain.pth")
    rgb = load_file(pretrained / "export" / "encoder" / "model.safetensors")
    w = rgb["patch_embed.proj.weight"]
    model = tiny_vit(num_classes=5, in_chans=in_chans)
    notes = load_encoder_weights(model, path, "learned")["notes"]
    got = model.patch_embed.proj.weight.detach()
    if in_chans == 1:
        assert torch.allclose(got, w.sum(dim=1, keepdim=True))
    else:
        assert torch.allclose(got, torch.cat([w, w[:, :1]], dim=1) * 3 / 4)
    assert any("3 input channels" in n and f"to {in_chans}" in n for n in notes)
    assert torch.equal(model.blocks[1].attn.qkv.weight, rgb["blocks.1.attn.qkv.weight"])
    with pytest.raises(ConfigError, match=r"patch_embed\.proj\.weight .*--in_chans"):
        load_encoder_weights(tiny_vit(num_classes=0, in_chans=1), path, "learned", exact=True)
    # grey weights into an RGB model are not guessed at
    grey = tmp_path / "grey.safetensors"
    save_file({**rgb, "patch_embed.proj.weight": w[:, :1].contiguous()}, grey)
    with pytest.raises(ConfigError, match=r"\(32, 1, 4, 4\) in the file, \(32, 3, 4, 4\) here"):
        load_encoder_weights(tiny_vit(num_classes=5), grey, "learned")


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


@pytest.mark.parametrize("form", ["pickle", "torch.save"])
def test_a_pth_that_would_run_code_is_refused_by_every_script(form, colours, tmp_path, monkeypatch):
    """End to end, as each script meets such a file: pretrain.py --initial_checkpoint,
    finetune.py --finetune, the official `--eval --resume file.pth`, linprobe.py --finetune."""
    marker = tmp_path / "ran"
    monkeypatch.setenv("MAEPL_MARKER", str(marker))
    evil = tmp_path / "evil.pth"
    obj = {"model": {"w": Payload()}}
    evil.write_bytes(pickle.dumps(obj)) if form == "pickle" else torch.save(obj, evil)
    pre = ["--model", "vit_tiny_patch16_224", *SHAPE, "--in_chans", "3", "--dataset", "sample"]
    pre += ["--max_steps", "1", "--batch_size", "4", "--num_workers", "0"]
    runs = [
        (pretrain, PretrainConfig, [*pre, "--initial_checkpoint", str(evil)]),
        (finetune, FinetuneConfig, ft_args(colours, tmp_path / "ft", "--finetune", str(evil))),
        (
            finetune,
            FinetuneConfig,
            ft_args(colours, tmp_path / "ev", "--eval", "--resume", str(evil)),
        ),
        (linprobe, LinprobeConfig, ft_args(colours, tmp_path / "lp", "--finetune", str(evil))),
    ]
    for i, (mod, cls, args) in enumerate(runs):
        out = ["--output_dir", str(tmp_path / f"run{i}")]
        with pytest.raises(ConfigError, match=rf"{re.escape(str(evil))} needs more than tensors"):
            mod.main(parse_config(cls, args + out))
        assert not marker.exists()
        assert not (tmp_path / f"run{i}").exists()  # refused before the run wrote anything


def test_foreign_files_beside_records_numpy_args_and_mismatches_are_read_or_named(
    pretrained, tmp_path, token_classifier
):
    """Session 19's loading fixes: an official .pth put in an export folder is not read as
    that export; NumPy scalars in a checkpoint's args load (data only); DDP's "module."
    outside "encoder." is unwrapped; a class-token mismatch in pos_embed and an avg-pooled
    classifier loaded where a final norm is needed are ConfigErrors that say why."""
    import numpy as np

    from maepl.recorded import stored_architecture

    export = tmp_path / "export"
    shutil.copytree(pretrained / "export" / "encoder", export)
    pth = official_mae_pth(pretrained, export / "mae_pretrain.pth")
    assert stored_architecture(export) is not None and stored_architecture(pth) is None
    sd = read_state_dict(pth)[0]
    numpy_args = tmp_path / "numpy_args.pth"
    args = argparse.Namespace(lr=np.float64(1e-3), epochs=np.int64(400), model="mae_vit_base")
    torch.save({"model": sd, "epoch": np.int64(399), "args": args}, numpy_args)
    assert read_state_dict(numpy_args)[0].keys() == sd.keys()
    ddp = tmp_path / "ddp.pth"
    torch.save({"model": {f"module.encoder.{k}": v for k, v in sd.items()}}, ddp)
    assert read_state_dict(ddp)[0].keys() == sd.keys()
    gap = tiny_vit(class_token=False, global_pool="avg", num_classes=0)
    with pytest.raises(ConfigError, match=r"pos_embed has 17 tokens, which leave no square grid"):
        load_encoder_weights(gap, pth, "learned")
    out, _ = token_classifier  # fine-tuned with token pooling: has norm.*, no fc_norm.*
    sd = load_file(out / "export" / "last" / "model.safetensors")
    sd = {k.replace("norm.", "fc_norm.") if k.startswith("norm.") else k: v for k, v in sd.items()}
    save_file(sd, tmp_path / "avg_classifier.safetensors")  # as an avg-pooled one would be
    with pytest.raises(ConfigError, match=r"fine-tuned with global_pool avg.*--global_pool avg"):
        load_encoder_weights(
            tiny_vit(num_classes=3), tmp_path / "avg_classifier.safetensors", "learned", exact=True
        )


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


@pytest.mark.parametrize("mix", ["alphas", "cutmix_minmax"])
def test_finetune_of_a_pretrained_export_with_mixup_runs(
    colours, pretrained, tmp_path, mix, monkeypatch
):
    built = []  # the Mixup finetune.py builds: MAE's --cutmix_minmax reaches it
    monkeypatch.setattr(finetune, "Mixup", lambda **kw: built.append(kw) or Mixup(**kw))
    minmax = ["--mixup", "0", "--cutmix", "0", "--cutmix_minmax", "0.3", "0.7"]
    args = (minmax if mix == "cutmix_minmax" else []) + [
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
    # three colours, 27 images: it learns them (100 % measured on a CPU), far above chance (33 %)
    assert summary["top1"] >= 70 and np.isfinite(summary["loss"])
    assert "pos_loss" not in summary  # no position head: no column, not zeros
    assert len(built) == 1 and built[0]["cutmix_minmax"] == (
        None if mix == "alphas" else [0.3, 0.7]
    )
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
    # kNN trains nothing: a batch larger than the 120 training images is no reason to refuse
    big = ["--knn", "--batch_size", "512", "--output_dir", str(tmp_path / "k512")]
    assert linprobe.main(parse_config(LinprobeConfig, args + big))["knn_top1"] == pytest.approx(
        knn["knn_top1"]
    )
    # --knn --eval on the probe's own run reads its checkpoint and writes nothing there (its
    # summary.json used to be replaced by the kNN figure)
    before = files_of(tmp_path / "lp")
    out = ["--output_dir", str(tmp_path / "lp"), "--knn", "--eval", "--resume", "auto"]
    assert linprobe.main(parse_config(LinprobeConfig, args + out))["knn_top1"] == knn["knn_top1"]
    assert files_of(tmp_path / "lp") == before


def test_unreadable_validation_images_are_named_or_fatal_under_strict_data(
    colours, pretrained, tmp_path, capsys
):
    data = tmp_path / "data"
    shutil.copytree(colours, data)
    (data / "val" / "red" / "empty.png").write_bytes(b"")  # 28 files, 27 readable
    args = [
        "--finetune",
        str(pretrained / "export" / "encoder"),
        "--data_path",
        str(data),
        *"--batch_size 16 --num_workers 0 --epochs 1 --warmup_epochs 0".split(),
    ]
    summary = linprobe.main(
        parse_config(LinprobeConfig, args + ["--output_dir", str(tmp_path / "a")])
    )
    assert summary["n"] == 27  # the accuracy is over the readable images, and says so
    assert "evaluation skipped unreadable images" in capsys.readouterr().err
    linprobe.main(
        parse_config(LinprobeConfig, args + ["--knn", "--output_dir", str(tmp_path / "b")])
    )
    assert re.search(r"kNN probe skipped unreadable images: .*empty\.png", capsys.readouterr().err)
    for extra in ([], ["--knn"]):  # --strict_data covers validation too
        out = ["--strict_data", "--output_dir", str(tmp_path / f"strict{len(extra)}")]
        with pytest.raises(BadImageError, match=r"unreadable image .*empty\.png"):
            linprobe.main(parse_config(LinprobeConfig, args + extra + out))


@pytest.mark.parametrize("pos_embed", ["sincos", "learned"])
def test_a_random_probe_encoder_gets_the_position_embedding_asked_for(colours, pos_embed):
    args = ["--model", "vit_tiny_patch16_224", *SHAPE, "--data_path", str(colours)]
    args += ["--pos_embed", pos_embed]
    probe, report = linprobe.build_probe(parse_config(LinprobeConfig, args), 3)
    sincos = sincos_2d(32, 4, 4, cls_token=True)
    assert torch.equal(probe.encoder.pos_embed[0], sincos) == (pos_embed == "sincos")
    assert ("pos_embed sin-cos" in report["notes"]) == (pos_embed == "sincos")


def test_finetune_without_model_or_weights_names_the_key(colours):
    with pytest.raises(ConfigError, match="model: required .* unless --finetune or --resume"):
        parse_config(FinetuneConfig, ["--data_path", str(colours)])


def test_distributed_evaluation_counts_each_image_once(colours, tmp_path, token_classifier):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [
        *torchrun("finetune.py", 29541),
        "--finetune",
        str(token_classifier[0] / "export" / "last"),
        "--data_path",
        str(colours),
        "--eval",
        "--batch_size",
        "4",
        "--num_workers",
        "0",
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


def test_an_unreadable_image_in_distributed_evaluation_stops_every_process(
    colours, tmp_path, token_classifier
):
    """--strict_data on 2 processes: the rank that reads the bad file raises, the other one
    stops too with a PeerError naming it (before, it waited in the evaluation's reduce until
    torchrun, seeing the first rank fail, killed it)."""
    data = tmp_path / "data"
    shutil.copytree(colours, data)
    (data / "val" / "red" / "empty.png").write_bytes(b"")  # one file: one rank reads it
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [
        *torchrun("finetune.py", 29547),
        "--finetune",
        str(token_classifier[0] / "export" / "last"),
        "--data_path",
        str(data),
        "--eval",
        "--strict_data",
        *"--batch_size 4 --num_workers 0 --output_dir".split(),
        str(tmp_path / "dist"),
    ]
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert r.returncode != 0
    assert re.search(r"unreadable image .*empty\.png", r.stderr), r.stderr[-3000:]
    assert "evaluation: failed on process" in r.stderr, r.stderr[-3000:]


def test_finetune_passes_the_fused_position_loss_to_its_head(colours, tmp_path):
    args = ft_args(colours, tmp_path / "ft", "--pos_label", "rel", "--pos_ce_chunk", "16")
    model, _ = finetune.build_classifier(parse_config(FinetuneConfig, args), 3)
    assert model.pos_head.kind == "rel" and model.pos_head.ce_chunk == 16


def test_runs_of_different_precision_follow_each_other_in_one_process(
    colours, pretrained, tmp_path, monkeypatch
):
    """Accelerate keeps one precision per process: a bf16 fine-tune, then a float32 linear probe
    (`--mixed_precision no`) in the same process (benchmarks/quality.py does this) must both run,
    each at its own precision."""
    import accelerate

    used, real_init = [], accelerate.Accelerator.__init__

    def recording_init(self, *args, **kwargs):
        real_init(self, *args, **kwargs)
        used.append(self.mixed_precision)

    monkeypatch.setattr(accelerate.Accelerator, "__init__", recording_init)
    common = ["--finetune", str(pretrained / "export" / "encoder"), "--data_path", str(colours)]
    common += "--batch_size 8 --num_workers 0 --epochs 1 --warmup_epochs 0".split()
    ft = finetune.main(
        parse_config(
            FinetuneConfig,
            common + ["--mixed_precision", "bf16", "--output_dir", str(tmp_path / "ft")],
        )
    )
    lp = linprobe.main(
        parse_config(
            LinprobeConfig,
            common + ["--mixed_precision", "no", "--output_dir", str(tmp_path / "lp")],
        )
    )
    assert np.isfinite(ft["loss"]) and lp["n"] == 27
    assert used == ["bf16", "no"]


def test_official_eval_command_evaluates_a_finetuned_pth(colours, token_classifier, tmp_path):
    # main_finetune.py --eval --resume mae_finetuned_vit_base.pth: a fine-tuned classifier
    # saved the official way ('model' holds timm keys and the head), evaluated as it is
    out, trained = token_classifier
    pth = tmp_path / "mae_finetuned.pth"
    sd = load_file(out / "export" / "last" / "model.safetensors")
    torch.save({"model": sd, "epoch": 0, "args": argparse.Namespace(global_pool=False)}, pth)
    args = ["--eval", "--resume", str(pth), "--model", "vit_tiny_patch16_224", *SHAPE]
    args += ["--cls_token", "--nb_classes", "3", "--data_path", str(colours)]
    args += ["--output_dir", str(tmp_path / "ev"), "--num_workers", "0", "--dist_eval"]
    cfg = parse_config(FinetuneConfig, args)
    assert (cfg.finetune, cfg.resume) == (str(pth), "")
    top = finetune.main(cfg)
    assert top["top1"] == pytest.approx(trained["top1"]) and top["n"] == 27
    # training cannot continue from it: the error says what to pass instead
    with pytest.raises(
        ConfigError, match=f"resume: .*is a file.*--initial_checkpoint {pth}.*--finetune"
    ):
        parse_config(FinetuneConfig, [a for a in args if a != "--eval"])


def test_official_eval_command_as_written_evaluates_an_avg_pooled_pth(
    colours, pretrained, tmp_path
):
    """The official README's command has no --cls_token: its classifiers (global_pool=True)
    hold fc_norm.* and no norm.*; evaluated as saved, at the accuracy they trained to."""
    out = tmp_path / "ft"
    args = ["--finetune", str(pretrained / "export" / "encoder"), "--data_path", str(colours)]
    args += "--global_pool avg --epochs 1 --warmup_epochs 0 --blr 5e-2 --aa null".split()
    args += "--mixup 0 --cutmix 0 --reprob 0 --batch_size 8 --num_workers 0".split()
    trained = finetune.main(parse_config(FinetuneConfig, args + ["--output_dir", str(out)]))
    sd = load_file(out / "export" / "last" / "model.safetensors")
    assert any(k.startswith("fc_norm.") for k in sd) and not any(k.startswith("norm.") for k in sd)
    pth = tmp_path / "mae_finetuned.pth"
    torch.save({"model": sd, "epoch": 0, "args": argparse.Namespace(global_pool=True)}, pth)
    args = ["--eval", "--resume", str(pth), "--model", "vit_tiny_patch16_224", *SHAPE]
    args += ["--nb_classes", "3", "--data_path", str(colours), "--num_workers", "0"]
    cfg = parse_config(FinetuneConfig, args + ["--output_dir", str(tmp_path / "ev")])
    assert cfg.global_pool == "avg"
    top = finetune.main(cfg)
    assert top["top1"] == pytest.approx(trained["top1"]) and top["n"] == 27


def test_eval_takes_pooling_classes_and_pos_embed_from_the_export(
    colours, token_classifier, tmp_path
):
    out, trained = token_classifier
    args = ["--finetune", str(out / "export" / "last"), "--data_path", str(colours), "--eval"]
    args += "--batch_size 8 --num_workers 0".split()
    cfg = parse_config(FinetuneConfig, args + ["--output_dir", str(tmp_path / "ev")])
    assert (cfg.global_pool, cfg.nb_classes, cfg.pos_embed) == ("token", 3, "learned")
    top = finetune.main(cfg)
    assert top["top1"] == pytest.approx(trained["top1"]) and top["n"] == 27
    # a classifier fine-tuned without position embedding is evaluated without one
    pe_free = without_pos_embed(out / "export" / "last", tmp_path / "pe_free")
    args[1] = str(pe_free)
    cfg = parse_config(FinetuneConfig, args + ["--output_dir", str(tmp_path / "ev2")])
    assert cfg.pos_embed == "none"
    model, _ = finetune.build_classifier(cfg, cfg.nb_classes)
    assert model.vit.pos_embed is None


def test_eval_refuses_weights_that_are_not_the_classifier(
    colours, pretrained, token_classifier, tmp_path
):
    export = token_classifier[0] / "export" / "last"
    base = ["--data_path", str(colours), "--eval", "--output_dir", str(tmp_path / "ev")]
    encoder = pretrained / "export" / "encoder"
    with pytest.raises(ConfigError, match=rf"finetune: {encoder} .*without a classifier head"):
        parse_config(FinetuneConfig, base + ["--finetune", str(encoder)])
    with pytest.raises(ConfigError, match=r"nb_classes: .*nb_classes 3 .*but 5 was given"):
        parse_config(FinetuneConfig, base + ["--finetune", str(export), "--nb_classes", "5"])
    with pytest.raises(ConfigError, match=r"global_pool: .*'token' .*but 'avg' was given"):
        parse_config(FinetuneConfig, base + ["--finetune", str(export), "--global_pool", "avg"])
    pe_free = without_pos_embed(export, tmp_path / "pe_free")
    with pytest.raises(ConfigError, match=r"pos_embed: .*has none .*'learned' was given"):
        parse_config(FinetuneConfig, base + ["--finetune", str(pe_free), "--pos_embed", "learned"])
    # foreign weights (nothing recorded): loading checks the head, norms and PE by name
    weights = foreign_copy(export, tmp_path / "foreign")
    arch = ["--model", "vit_tiny_patch16_224", *SHAPE, "--in_chans", "3"]
    cases = [
        ([], r"norm\.weight.*fc_norm\.weight"),  # default avg pooling
        (["--global_pool", "token", "--nb_classes", "5"], r"head\.weight .*\(5, 32\)"),
    ]
    for extra, names in cases:
        cfg = parse_config(FinetuneConfig, base + arch + ["--finetune", str(weights), *extra])
        with pytest.raises(ValueError, match=rf"{weights} .*{names}"):
            finetune.build_classifier(cfg, cfg.nb_classes or 3)
    encoder_weights = foreign_copy(encoder, tmp_path / "foreign_encoder")
    args = base + arch + ["--finetune", str(encoder_weights), "--global_pool", "token"]
    with pytest.raises(ValueError, match=r"no classifier head: missing \['head\.weight'"):
        finetune.build_classifier(parse_config(FinetuneConfig, args), 3)
    pe_free = without_pos_embed(export, tmp_path / "pe_free_foreign", record=False)
    args = base + arch + ["--finetune", str(pe_free), "--global_pool", "token"]
    with pytest.raises(ValueError, match=r"no position embedding.*--pos_embed none"):
        finetune.build_classifier(parse_config(FinetuneConfig, args), 3)


def test_linprobe_uses_the_encoder_as_pretrained(colours, pretrained, tmp_path):
    export = pretrained / "export" / "encoder"
    base = ["--data_path", str(colours), "--output_dir", str(tmp_path / "lp")]
    # an encoder pretrained with --pos_embed none gets none (no sin-cos filled in)
    pe_free = without_pos_embed(export, tmp_path / "pe_free")
    cfg = parse_config(LinprobeConfig, base + ["--finetune", str(pe_free)])
    assert cfg.pos_embed == "none"
    probe, _ = linprobe.build_probe(cfg, 3)
    assert probe.encoder.pos_embed is None
    # one with a position embedding keeps its stored values
    probe, _ = linprobe.build_probe(
        parse_config(LinprobeConfig, base + ["--finetune", str(export)]), 3
    )
    stored = load_file(export / "model.safetensors")["pos_embed"]
    assert torch.equal(probe.encoder.pos_embed, stored)
    for given in ("learned", "sincos"):
        with pytest.raises(ConfigError, match=rf"pos_embed: .*has none .*'{given}' was given"):
            parse_config(LinprobeConfig, base + ["--finetune", str(pe_free), "--pos_embed", given])
    with pytest.raises(ConfigError, match=r"pos_embed: .*has a position embedding.*'none'"):
        parse_config(LinprobeConfig, base + ["--finetune", str(export), "--pos_embed", "none"])
    # foreign PE-free weights: refused by name unless --pos_embed none is given
    foreign = without_pos_embed(export, tmp_path / "foreign", record=False)
    arch = ["--model", "vit_tiny_patch16_224", *SHAPE, "--in_chans", "3"]
    cfg = parse_config(LinprobeConfig, base + arch + ["--finetune", str(foreign)])
    with pytest.raises(ValueError, match=rf"{foreign} .*no position embedding"):
        linprobe.build_probe(cfg, 3)
    cfg = parse_config(
        LinprobeConfig, base + arch + ["--finetune", str(foreign), "--pos_embed", "none"]
    )
    assert linprobe.build_probe(cfg, 3)[0].encoder.pos_embed is None


@pytest.mark.parametrize("script", ["finetune", "linprobe"])
def test_train_and_val_with_other_class_folders_are_refused(script, tmp_path):
    for split, names in (("train", ("blue", "green", "red")), ("val", ("blue", "red", "teal"))):
        for name in names:
            (tmp_path / "data" / split / name).mkdir(parents=True)
            Image.new("RGB", (16, 16)).save(tmp_path / "data" / split / name / "0.png")
    mod, cls = (finetune, FinetuneConfig) if script == "finetune" else (linprobe, LinprobeConfig)
    args = ["--model", "vit_tiny_patch16_224", *SHAPE, "--data_path", str(tmp_path / "data")]
    cfg = parse_config(cls, args + ["--output_dir", str(tmp_path / "out")])
    train, val = tmp_path / "data" / "train", tmp_path / "data" / "val"
    with pytest.raises(ConfigError, match=rf"{train} and {val} .*\['green'\].*\['teal'\]"):
        mod.main(cfg)
    assert not (tmp_path / "out").exists()  # refused before the run started


@pytest.mark.parametrize("event", ["sigterm", "error"])
def test_a_sigterm_or_an_error_during_evaluation_with_workers(event, colours, tmp_path):
    """sigterm: a scheduler signals the whole process group during the epoch's evaluation; the
    validation loader's workers outlive it as the training loader's do, and the run stops at
    the next step with a checkpoint (before session 19 they died, and the run failed with
    "DataLoader worker exited unexpectedly", unsaved). error: an exception there ends the run
    at once with that error last (before, the exit waited 10 minutes on the training loader's
    workers, which outlive the SIGTERM that multiprocessing's exit handler sends)."""
    action = "os.killpg(0, signal.SIGTERM)" if event == "sigterm" else "raise OSError('planted')"
    driver = tmp_path / "driver.py"
    driver.write_text(
        "import os, signal, sys, time, finetune\n"
        "from maepl.config import FinetuneConfig, parse_config\n"
        "make = finetune.eval_loader\n"
        "class Eventful:\n"
        "    def __init__(self, loader): self.loader = loader\n"
        "    def __iter__(self):\n"
        "        it = iter(self.loader)\n"
        "        yield next(it)  # the workers are running now\n"
        f"        {action}  # a signal: this process and its workers\n"
        "        time.sleep(1)\n"
        "        yield from it\n"
        "finetune.eval_loader = lambda *a, **k: Eventful(make(*a, **k))\n"
        "finetune.main(parse_config(FinetuneConfig, sys.argv[1:]))\n"
    )
    out = tmp_path / "ft"
    args = ft_args(colours, out, *"--epochs 3 --aa null --mixup 0 --cutmix 0".split())
    args[args.index("--num_workers") + 1] = "1"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    start = time.monotonic()
    r = subprocess.run(
        [sys.executable, str(driver), *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
        start_new_session=True,  # its own process group: the signal reaches no test process
    )
    if event == "error":
        assert r.returncode != 0 and r.stderr.strip().endswith("OSError: planted"), r.stderr
        assert time.monotonic() - start < 150  # not the workers' 600 s grace (slack for load)
        return
    assert r.returncode == 0, r.stderr[-3000:]
    assert "DataLoader worker" not in r.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["stopped_by_signal"] is True
    assert (out / "checkpoints" / f"step_{summary['step']:08d}" / "COMPLETE").is_file()
    assert summary["step"] < 3 * 15  # stopped in the second epoch, not run to the end


def test_finetune_ranks_draw_their_own_noise(colours, tmp_path):
    """Two processes build the same weights but draw different drop-path masks (torch's RNG
    state at the first forward differs by rank)."""
    driver = tmp_path / "driver.py"
    driver.write_text(
        "import sys, torch, finetune\n"
        "from maepl.config import FinetuneConfig, parse_config\n"
        "forward = finetune.Classifier.forward\n"
        "def record(self, x):\n"
        "    if not hasattr(record, 'done'):\n"
        "        record.done = True\n"
        "        rank = torch.distributed.get_rank()\n"
        "        weights = sum(float(p.double().sum()) for p in self.parameters())\n"
        "        out = sys.argv[1] + f'/rank{rank}.pt'\n"
        "        torch.save(dict(rng=torch.get_rng_state(), weights=weights), out)\n"
        "    return forward(self, x)\n"
        "finetune.Classifier.forward = record\n"
        "finetune.main(parse_config(FinetuneConfig, sys.argv[2:]))\n"
    )
    extra = "--max_steps 1 --drop_path 0.5 --aa null --mixup 0 --cutmix 0".split()
    cmd = [*torchrun(str(driver), 29543), str(tmp_path), *ft_args(colours, tmp_path / "o", *extra)]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{i}.pt") for i in range(2)]
    assert ranks[0]["weights"] == ranks[1]["weights"]
    assert not torch.equal(ranks[0]["rng"], ranks[1]["rng"])


def test_config_json_without_architecture_names_the_file(colours, tmp_path):
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text(json.dumps({"model_type": "vit"}))
    config = tmp_path / "hf" / "config.json"
    with pytest.raises(ConfigError, match=rf"finetune: {config} has no 'architecture' entry"):
        parse_config(FinetuneConfig, ["--finetune", str(tmp_path / "hf"), "--dataset", "sample"])


def test_crop_probe_runs_and_every_export_sees_the_same_crops(pretrained, tmp_path):
    """benchmarks/crop_probe.py: the feature probe on clean images, on crops for training, and
    on crops for testing; the crops are seeded per image, so the same export twice (here under
    a second name) gives the same three figures."""
    export = pretrained / "export" / "encoder"
    same = tmp_path / "same"
    same.symlink_to(export, target_is_directory=True)
    out = tmp_path / "crop.json"
    cmd = [sys.executable, "benchmarks/crop_probe.py", str(export), str(same), "--dataset"]
    cmd += ["sample", "--epochs", "2", "--workers", "0", "--json", str(out)]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = list(json.loads(out.read_text()).values())
    keys = ("clean", "crop_train", "crop_test")
    assert len(rows) == 2 and all(0 <= row[k] <= 100 for row in rows for k in keys)
    assert [rows[0][k] for k in keys] == [rows[1][k] for k in keys]


def files_of(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def test_eval_resume_auto_takes_the_trained_settings(colours, pretrained, tmp_path):
    """--eval --resume auto --output_dir <run> alone evaluates the run as it was trained, also
    where maepl has a default of its own: the data, --pos_label, --crop_pct, --mean/--std, and
    linprobe's --global_pool (before session 15 they had to be given again). What the command
    gives still wins, and the data is taken only as a pair."""
    enc = str(pretrained / "export" / "encoder")
    ft, lp = tmp_path / "ft", tmp_path / "lp"
    train = ["--finetune", enc, "--data_path", str(colours), "--num_workers", "0"]
    train += ["--crop_pct", "0.8", "--mean", "0.4", "0.5", "0.6", "--std", "0.2", "0.25", "0.3"]
    train += "--epochs 1 --warmup_epochs 0 --batch_size 8".split()
    recipe = "--pos_label abs --blr 5e-2 --aa null --mixup 0 --cutmix 0 --reprob 0".split()
    calls, evaluate = [], finetune.evaluate
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(finetune, "evaluate", lambda *a: calls.append(1) or evaluate(*a))
        trained = finetune.main(
            parse_config(FinetuneConfig, train + recipe + ["--output_dir", str(ft)])
        )
    assert len(calls) == 1  # the epoch's evaluation is the final one (not repeated)
    bare = ["--eval", "--resume", "auto", "--num_workers", "0"]
    cfg = parse_config(FinetuneConfig, bare + ["--output_dir", str(ft)])
    got = (cfg.pos_label, cfg.crop_pct, cfg.mean, cfg.std, cfg.data_path, cfg.encoder)
    assert got == (
        "abs",
        0.8,
        [0.4, 0.5, 0.6],
        [0.2, 0.25, 0.3],
        str(colours),
        "vit_tiny_patch16_224",
    )
    assert finetune.main(cfg)["top1"] == pytest.approx(trained["top1"])
    cfg = parse_config(FinetuneConfig, bare + ["--output_dir", str(ft), "--crop_pct", "1"])
    assert (cfg.crop_pct, cfg.mean) == (1.0, [0.4, 0.5, 0.6])  # given wins, the rest taken
    # another dataset given: its data path is not the trained run's (sample reads none)
    cfg = parse_config(FinetuneConfig, bare + ["--output_dir", str(ft), "--dataset", "sample"])
    assert (cfg.dataset, cfg.data_path) == ("sample", None)
    probe = [*train, "--global_pool", "avg", "--output_dir", str(lp)]
    first = linprobe.main(parse_config(LinprobeConfig, probe))
    cfg = parse_config(LinprobeConfig, bare + ["--output_dir", str(lp)])
    assert (cfg.global_pool, cfg.crop_pct, cfg.finetune) == ("avg", 0.8, enc)
    assert linprobe.main(cfg)["top1"] == pytest.approx(first["top1"])


def test_a_run_folder_given_for_its_weights_names_what_to_give(pretrained):
    run = str(pretrained)
    export = re.escape(str(pretrained / "export" / "encoder"))
    data = ["--dataset", "sample"]
    for cls, key in ((FinetuneConfig, "finetune"), (LinprobeConfig, "finetune")):
        with pytest.raises(ConfigError, match=rf"{key}: .* a run's output folder.*{export}"):
            parse_config(cls, [*data, "--finetune", run])
    with pytest.raises(ConfigError, match=rf"initial_checkpoint: .*run's output folder.*{export}"):
        parse_config(PretrainConfig, [*data, "--initial_checkpoint", run])
    ft = [*data, "--model", "vit_tiny_patch16_224", "--resume", run]
    with pytest.raises(ConfigError, match=rf"resume: .*--resume auto --output_dir {run} "):
        parse_config(FinetuneConfig, ft)


def test_a_probe_resumes_with_its_encoder_moved_or_named_another_way(
    colours, pretrained, tmp_path, monkeypatch, capsys
):
    """The probe's checkpoint holds its frozen encoder: another spelling of the export's path,
    or the export moved (given at its new place, or not at all), still resumes; a different
    encoder is refused, naming both paths."""
    shutil.copytree(pretrained / "export" / "encoder", tmp_path / "enc")
    shutil.copytree(pretrained / "export" / "encoder", tmp_path / "other")
    monkeypatch.chdir(tmp_path)
    data = ["--data_path", str(colours), "--num_workers", "0", "--output_dir", "lp"]
    train = [*data, "--finetune", str(tmp_path / "enc"), "--global_pool", "avg"]
    train += "--epochs 2 --warmup_epochs 0 --batch_size 8 --blr 10".split()
    calls = []
    monkeypatch.setattr(linprobe, "evaluate", lambda *a: calls.append(1) or finetune.evaluate(*a))
    first = linprobe.main(parse_config(LinprobeConfig, train))
    assert len(calls) == 2  # once an epoch; the final figures are the last epoch's
    logged = [r["val_top1"] for r in map(json.loads, open("lp/log.jsonl")) if "val_top1" in r]
    assert logged[-1] == first["top1"]
    monkeypatch.undo()
    monkeypatch.chdir(tmp_path)
    bare = [*data, "--eval", "--resume", "auto"]
    for path in ("enc", "./enc/"):  # relative, where the run recorded an absolute path
        cfg = parse_config(LinprobeConfig, [*bare, "--finetune", path])
        assert linprobe.main(cfg)["top1"] == pytest.approx(first["top1"])
    assert "the checkpoint's copy is resumed" in capsys.readouterr().out
    with pytest.raises(ConfigError, match=rf"finetune='{tmp_path}/enc', now 'other'"):
        linprobe.main(parse_config(LinprobeConfig, [*bare, "--finetune", "other"]))
    (tmp_path / "enc").rename(tmp_path / "moved")
    for given in ([], ["--finetune", "moved"]):
        cfg = parse_config(LinprobeConfig, bare + given)
        assert linprobe.main(cfg)["top1"] == pytest.approx(first["top1"])


def test_eval_of_a_checkpoint_leaves_its_run_as_it_was(colours, token_classifier, tmp_path):
    """--eval --resume <checkpoint> in the run's own output_dir reads it and writes nothing:
    before session 8 it cut log.jsonl back to the checkpoint's step, purged TensorBoard events
    and replaced config.yaml with the evaluation's."""
    import shutil

    run = tmp_path / "run"
    shutil.copytree(token_classifier[0], run)
    before = files_of(run)
    (ckpt,) = sorted((run / "checkpoints").glob("step_*"))[:1]
    args = ["--resume", str(ckpt), "--eval", "--global_pool", "token"]
    top = finetune.main(parse_config(FinetuneConfig, ft_args(colours, run, *args)))
    assert top["n"] > 0 and 0 <= top["top1"] <= 100
    assert files_of(run) == before
    # and --eval with nothing to evaluate is refused, for both scripts
    with pytest.raises(ConfigError, match="eval: needs the weights"):
        parse_config(FinetuneConfig, ft_args(colours, tmp_path / "x", "--eval"))
    args = ["--finetune", str(token_classifier[0] / "export" / "last"), "--eval"]
    with pytest.raises(ConfigError, match="eval: needs --resume"):
        parse_config(LinprobeConfig, args + ["--data_path", str(colours)])
    cfg = parse_config(
        FinetuneConfig, ft_args(colours, tmp_path / "empty", "--eval", "--resume", "auto")
    )
    with pytest.raises(ConfigError, match="resume: --eval --resume auto found no complete"):
        finetune.main(cfg)


def test_weights_that_do_not_fit_leave_no_run_behind(colours, pretrained, tmp_path):
    """Loading fails before Run writes config.yaml, so the corrected command can use the same
    output_dir (before session 8 it was refused: 'already holds a run')."""
    sd = load_file(pretrained / "export" / "encoder" / "model.safetensors")
    del sd["blocks.1.attn.qkv.weight"]
    save_file(sd, tmp_path / "broken.safetensors")
    out = tmp_path / "ft"
    args = ["--finetune", str(tmp_path / "broken.safetensors"), "--epochs", "1"]
    cfg = parse_config(FinetuneConfig, ft_args(colours, out, *args))
    with pytest.raises(ConfigError, match=r"blocks\.1\.attn\.qkv\.weight"):
        finetune.main(cfg)
    assert not out.exists()


def test_loading_reports_replaced_pe_resamples_as_mae_and_names_damaged_files(pretrained, tmp_path):
    import torch.nn.functional as F

    export = pretrained / "export" / "encoder"
    model = tiny_vit(img_size=16, num_classes=3)
    report = load_encoder_weights(model, export, "sincos")
    assert any("replaced by fixed sin-cos" in n for n in report["notes"])
    # another grid: the values of MAE's interpolate_pos_embed (bicubic, no antialiasing)
    model = tiny_vit(img_size=28, num_classes=3)
    load_encoder_weights(model, export, "learned")
    pe = load_file(export / "model.safetensors")["pos_embed"]
    grid = pe[:, 1:].reshape(1, 4, 4, 32).permute(0, 3, 1, 2)
    want = F.interpolate(grid, size=(7, 7), mode="bicubic", align_corners=False)
    torch.testing.assert_close(model.pos_embed[:, 1:], want.permute(0, 2, 3, 1).reshape(1, 49, 32))
    # a truncated .pth is called damaged, not refused as unsafe
    torch.save({"model": load_file(export / "model.safetensors")}, tmp_path / "w.pth")
    data = (tmp_path / "w.pth").read_bytes()
    (tmp_path / "trunc.pth").write_bytes(data[: len(data) // 2])
    with pytest.raises(ConfigError, match="cannot be read as a torch file"):
        read_state_dict(tmp_path / "trunc.pth")


def test_linprobe_of_a_vit_without_class_token(tmp_path):
    # token pooling is refused by name before any data; average pooling keeps the final norm
    base = ["--model", "vit_medium_patch16_gap_256", "--input_size", "32", "--patch_size", "16"]
    base += ["--embed_dim", "32", "--depth", "1", "--num_heads", "2", "--dataset", "sample"]
    base += ["--output_dir", str(tmp_path / "lp")]
    with pytest.raises(ConfigError, match="global_pool: token pooling needs a class token"):
        parse_config(LinprobeConfig, base)
    cfg = parse_config(LinprobeConfig, base + ["--global_pool", "avg"])
    probe, _ = linprobe.build_probe(cfg, 10)
    assert probe.encoder.cls_token is None and isinstance(probe.encoder.norm, torch.nn.LayerNorm)
    assert probe.features(torch.randn(2, 3, 32, 32)).shape == (2, 32)


@pytest.mark.parametrize("script", ["finetune", "linprobe"])
def test_bad_weights_and_class_counts_are_named_before_any_run(
    colours, pretrained, tmp_path, script
):
    """A missing --finetune path, a file that is not weights (text, garbage safetensors) and a
    head smaller than the dataset's classes: each a ConfigError naming the key or the file,
    before anything is written."""
    cls, mod = (FinetuneConfig, finetune) if script == "finetune" else (LinprobeConfig, linprobe)
    out = tmp_path / "out"
    with pytest.raises(ConfigError, match=r"finetune: no such file or folder .*nope\.pth"):
        parse_config(cls, ft_args(colours, out, "--finetune", str(tmp_path / "nope.pth")))
    (tmp_path / "w.txt").write_text("not weights\n")
    (tmp_path / "w.safetensors").write_bytes(b"\xff" * 64)
    for bad, why in (("w.txt", "is not a torch file"), ("w.safetensors", "safetensors")):
        cfg = parse_config(cls, ft_args(colours, out, "--finetune", str(tmp_path / bad)))
        with pytest.raises(ConfigError, match=rf"finetune: .*{bad}.* {why}"):
            mod.main(cfg)
    cfg = parse_config(cls, ft_args(colours, out, "--nb_classes", "2", "--epochs", "1"))
    with pytest.raises(ConfigError, match="nb_classes: 2, but imagefolder has 3 classes"):
        mod.main(cfg)
    # a foreign file of another width: named with the flags to set (was a RuntimeError)
    pth = tmp_path / "w.pth"
    torch.save({"model": load_file(pretrained / "export" / "encoder" / "model.safetensors")}, pth)
    cfg = parse_config(cls, ft_args(colours, out, "--finetune", str(pth), "--embed_dim", "48"))
    with pytest.raises(
        ConfigError,
        match=r"finetune: .*w\.pth holds a model of other shapes .*"
        r"\(1, 1, 32\) in the file, \(1, 1, 48\) here.*--embed_dim",
    ):
        mod.main(cfg)
    assert not out.exists()


def test_eval_resume_auto_needs_no_architecture_flags(
    colours, pretrained, token_classifier, tmp_path, capsys
):
    """--eval --resume auto evaluates the run in --output_dir as it was trained: the model,
    shapes, pooling and classes come from its checkpoint (before, --model was required)."""
    run, trained = token_classifier
    base = ["--data_path", str(colours), "--num_workers", "0", "--batch_size", "8"]
    base += ["--output_dir", str(run)]
    # (an evaluation plans no training: a batch above the 120 training images is no error)
    cfg = parse_config(FinetuneConfig, base + ["--eval", "--resume", "auto", "--batch_size", "512"])
    assert (cfg.encoder, cfg.embed_dim, cfg.global_pool) == ("vit_tiny_patch16_224", 32, "token")
    assert finetune.main(cfg)["top1"] == pytest.approx(trained["top1"])
    assert "evaluation only" in capsys.readouterr().out  # not a training schedule's lr, steps
    lp = tmp_path / "lp"
    args = ["--finetune", str(pretrained / "export" / "encoder"), "--epochs", "1"]
    args += ["--warmup_epochs", "0", "--batch_size", "8", "--num_workers", "0"]
    args += ["--data_path", str(colours)]
    first = linprobe.main(parse_config(LinprobeConfig, args + ["--output_dir", str(lp)]))
    again = parse_config(
        LinprobeConfig, [*base[:6], "--output_dir", str(lp), "--eval", "--resume", "auto"]
    )
    assert again.finetune == str(pretrained / "export" / "encoder") and again.embed_dim == 32
    assert linprobe.main(again)["top1"] == pytest.approx(first["top1"])
