import dataclasses
import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from safetensors.torch import load_file

import pretrain
from maepl.config import ConfigError, PretrainConfig, config_from_dict
from maepl.models.mae import build_mae

from .conftest import ROOT, torchrun


def read_log(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


def test_few_steps_lower_the_loss_and_write_every_output(tiny_cfg):
    cfg = tiny_cfg(max_steps=40, log_every=5)
    summary = pretrain.main(cfg)
    out = Path(cfg.output_dir)
    rows = read_log(out)
    assert [r["step"] for r in rows] == list(range(5, 45, 5))
    assert rows[-1]["mae_loss"] < 0.8 * rows[0]["mae_loss"]
    assert rows[-1]["pos_loss"] < rows[0]["pos_loss"]
    assert summary["step"] == 40 and summary["ranks_in_sync"]
    for key in ("loss", "mae_loss", "pos_loss", "pos_acc", "lr", "img_per_s", "epoch"):
        assert key in rows[-1]
    assert (out / "checkpoints" / "step_00000040" / "COMPLETE").is_file()
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))
    assert list((out / "vis").glob("*.png"))
    # the saved config rebuilds the same resolved config
    import yaml

    saved = config_from_dict(PretrainConfig, yaml.safe_load((out / "config.yaml").read_text()))
    assert saved == cfg


@pytest.mark.parametrize("pos_embed", ["sincos", "none"])
def test_export_loads_strictly_in_timm_with_identical_features(tiny_cfg, pos_embed):
    cfg = tiny_cfg(max_steps=3, pos_embed=pos_embed)
    pretrain.main(cfg)
    export = Path(cfg.output_dir) / "export"
    enc_keys = set(load_file(export / "encoder" / "model.safetensors"))
    assert not any(k.startswith(("decoder", "pos_head", "mask_token")) for k in enc_keys)
    assert ("pos_embed" in enc_keys) == (pos_embed != "none")

    model = timm.create_model(f"local-dir:{export / 'encoder'}", pretrained=True).eval()
    # timm loads strictly: every key of the model came from the file and nothing is left over
    assert set(model.state_dict()) == enc_keys

    mae = build_mae(cfg)
    mae.load_state_dict(load_file(export / "mae.safetensors"))
    mae.eval()
    x = torch.randn(4, cfg.in_chans, cfg.input_size, cfg.input_size)
    with torch.no_grad():
        assert torch.equal(model.forward_features(x), mae.encoder.forward_features(x))
    assert model.pretrained_cfg["input_size"] == (1, 28, 28)
    card = (export / "encoder" / "README.md").read_text()
    assert "library_name: timm" in card and "positional label abs" in card
    # a classifier on top for fine-tuning: the new head is the only fresh part
    clf = timm.create_model(f"local-dir:{export / 'encoder'}", pretrained=True, num_classes=10)
    assert clf.head.out_features == 10
    assert torch.equal(clf.blocks[0].attn.qkv.weight, model.blocks[0].attn.qkv.weight)


def test_resume_reaches_the_same_weights(tiny_cfg, tmp_path):
    full = tiny_cfg(max_steps=8, output_dir=str(tmp_path / "full"), save_every=1)
    pretrain.main(full)
    part = tiny_cfg(max_steps=3, output_dir=str(tmp_path / "part"))
    pretrain.main(part)
    resumed = tiny_cfg(max_steps=8, output_dir=str(tmp_path / "part"), resume="auto")
    summary = pretrain.main(resumed)
    assert summary["step"] == 8
    a = load_file(tmp_path / "full" / "checkpoints" / "step_00000008" / "model.safetensors")
    b = load_file(tmp_path / "part" / "checkpoints" / "step_00000008" / "model.safetensors")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    steps = [r["step"] for r in read_log(tmp_path / "part")]
    assert steps == [3, 5, 8]  # the first run's last step, then every 5th and the end: no row twice
    # resumed once more at its last step: nothing to train, the final losses still reported
    again = pretrain.main(resumed)
    assert again["step"] == 8 and again["mae_loss"] == summary["mae_loss"] > 0
    on_disk = json.loads((tmp_path / "part" / "summary.json").read_text())
    assert on_disk["mae_loss"] == summary["mae_loss"]


def test_two_process_cpu_run_keeps_ranks_identical(tmp_path):
    """Two processes end with the same weights: each saves its own model's final state (a
    driver around pretrain.main), compared here tensor by tensor, beside the run's own check."""
    out = tmp_path / "dist"
    driver = tmp_path / "driver.py"
    driver.write_text(
        "import os, sys, torch, pretrain\n"
        "from maepl.config import PretrainConfig, parse_config\n"
        "built = []\n"
        "build = pretrain.build_mae\n"
        "pretrain.build_mae = lambda cfg: built.append(build(cfg)) or built[-1]\n"
        "pretrain.main(parse_config(PretrainConfig, sys.argv[2:]))\n"
        "state = {k: v.detach().clone() for k, v in built[0].state_dict().items()}\n"
        "torch.save(state, f\"{sys.argv[1]}/rank{os.environ['RANK']}.pt\")\n"
    )
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    cmd = [
        *torchrun(str(driver), 29531),
        str(tmp_path),
        "--model",
        "mae_vit_micro_patch4_28",
        "--dataset",
        "sample",
        "--embed_dim",
        "48",
        "--depth",
        "2",
        "--num_heads",
        "3",
        "--decoder_embed_dim",
        "32",
        "--decoder_depth",
        "1",
        "--decoder_num_heads",
        "2",
        "--batch_size",
        "16",
        "--max_steps",
        "6",
        "--log_every",
        "2",
        "--num_workers",
        "0",
        "--output_dir",
        str(out),
    ]
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["ranks_in_sync"] is True and summary["step"] == 6
    import yaml

    ranks = [torch.load(tmp_path / f"rank{i}.pt") for i in range(2)]
    saved = config_from_dict(PretrainConfig, yaml.safe_load((out / "config.yaml").read_text()))
    assert ranks[0].keys() == ranks[1].keys() == build_mae(saved).state_dict().keys()
    assert all(torch.equal(ranks[0][k], ranks[1][k]) for k in ranks[0])
    # one writer: each log step once, one events file, one export, rank files from both
    assert [row["step"] for row in read_log(out)] == [2, 4, 6]
    assert len(list((out / "tensorboard").glob("events.out.tfevents.*"))) == 1
    ckpt = out / "checkpoints" / "step_00000006"
    assert sorted(p.name for p in ckpt.glob("rng_rank*")) == [
        "rng_rank0.safetensors",
        "rng_rank1.safetensors",
    ]
    assert r.stdout.count("done: 6 steps") == 1
    # effective batch counts both processes
    assert "effective batch 32 = 16 x 1 accum x 2" in r.stdout


def test_accumulation_and_clipping_count_optimizer_steps(tiny_cfg, monkeypatch):
    from accelerate import Accelerator

    clips = []  # (max_norm, norm before, norm after) at each call
    clip = Accelerator.clip_grad_norm_

    def spy(self, parameters, max_norm, *args, **kwargs):
        parameters = [p for p in parameters if p.grad is not None]
        before = clip(self, parameters, max_norm, *args, **kwargs)
        after = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in parameters]))
        clips.append((max_norm, float(before), float(after)))
        return before

    monkeypatch.setattr(Accelerator, "clip_grad_norm_", spy)
    cfg = tiny_cfg(max_steps=3, accum_iter=2, clip_grad=0.5, log_every=1)
    summary = pretrain.main(cfg)
    # clipped once per optimizer step, to --clip_grad, and the step's gradients were above it
    assert [c[0] for c in clips] == [0.5] * 3
    assert all(before > 0.5 and after == pytest.approx(0.5, rel=1e-3) for _, before, after in clips)
    ckpt = Path(cfg.output_dir) / "checkpoints" / "step_00000003"
    state = json.loads((ckpt / "state.json").read_text())
    assert summary["step"] == 3 and state["batch_in_epoch"] == 6  # 2 micro-batches a step
    opt = load_file(ckpt / "optimizer.safetensors")
    steps = {v.item() for k, v in opt.items() if k.endswith(".step")}
    assert steps == {3.0}  # AdamW stepped once per accumulation, not per micro-batch
    assert [r["step"] for r in read_log(Path(cfg.output_dir))] == [1, 2, 3]


def test_unclipped_steps_compute_the_norm_without_rescaling_the_gradients(
    tiny_cfg, tmp_path, monkeypatch
):
    """--clip_grad unset: the gradient norm (for the non-finite check) is computed without
    clip_grad_norm_(inf)'s multiply-by-one pass, and training is bit-identical to that path."""
    from accelerate import Accelerator

    calls = []
    clip = Accelerator.clip_grad_norm_

    def spy(self, parameters, max_norm, *args, **kwargs):
        calls.append(max_norm)
        return clip(self, parameters, max_norm, *args, **kwargs)

    monkeypatch.setattr(Accelerator, "clip_grad_norm_", spy)
    fast = tiny_cfg(max_steps=3, accum_iter=2, output_dir=str(tmp_path / "fast"))
    pretrain.main(fast)
    assert calls == []  # no clipping pass at all
    monkeypatch.delattr(torch.nn.utils, "get_total_norm")  # torch < 2.6: accelerate's path
    slow = tiny_cfg(max_steps=3, accum_iter=2, output_dir=str(tmp_path / "slow"))
    pretrain.main(slow)
    assert calls == [float("inf")] * 3
    a, b = (load_file(Path(c.output_dir) / "export" / "mae.safetensors") for c in (fast, slow))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_imagefolder_rgb_pretraining(tmp_path):
    from PIL import Image

    from maepl.config import parse_config

    rng = torch.Generator().manual_seed(0)
    for split in ("train", "val"):
        for cls in ("a", "b"):
            folder = tmp_path / "data" / split / cls
            folder.mkdir(parents=True)
            for i in range(12):
                arr = (torch.rand(20, 24, 3, generator=rng) * 255).byte().numpy()
                img = Image.fromarray(arr)
                (img.convert("L") if i % 3 == 0 else img).save(folder / f"{i}.png")
    cfg = parse_config(
        PretrainConfig,
        [
            "--model",
            "vit_tiny_patch16_224",
            "--input_size",
            "16",
            "--patch_size",
            "4",
            "--embed_dim",
            "32",
            "--depth",
            "1",
            "--num_heads",
            "2",
            "--decoder_embed_dim",
            "16",
            "--decoder_depth",
            "1",
            "--decoder_num_heads",
            "2",
            "--data_path",
            str(tmp_path / "data"),
            "--batch_size",
            "8",
            "--epochs",
            "2",
            "--warmup_epochs",
            "1",
            "--num_workers",
            "0",
            "--log_every",
            "1",
            "--output_dir",
            str(tmp_path / "run"),
        ],
    )
    summary = pretrain.main(cfg)
    assert summary["step"] == 6  # 24 training images (train/ only), batch 8, 2 epochs
    model = timm.create_model(
        f"local-dir:{tmp_path / 'run' / 'export' / 'encoder'}", pretrained=True
    )
    assert model.patch_embed.proj.in_channels == 3
    assert tuple(model.pretrained_cfg["mean"]) == (0.485, 0.456, 0.406)


@pytest.mark.parametrize(
    "settings",
    [
        dict(pos_label="rel", pos_pairs=40, pos_smoothing=1.0),
        dict(pos_label="abs", pos_embed="none"),
        dict(pos_label="abs", pos_smoothing=2.0, pos_drop_ratio=0.5),
        dict(pos_label="none"),
    ],
)
def test_positional_label_settings_train(tiny_cfg, settings):
    cfg = tiny_cfg(max_steps=12, log_every=4, **settings)
    pretrain.main(cfg)
    out = Path(cfg.output_dir)
    rows = [r for r in read_log(out) if "loss" in r]
    assert len(rows) == 3 and all(np.isfinite(r["loss"]) for r in rows)
    recorded = json.loads((out / "checkpoints" / "step_00000012" / "state.json").read_text())
    assert {k: recorded["config"][k] for k in settings} == settings
    weights = load_file(out / "checkpoints" / "step_00000012" / "model.safetensors")
    encoder = load_file(out / "export" / "encoder" / "model.safetensors")
    assert ("pos_embed" in encoder) == (cfg.pos_embed != "none")
    drops = cfg.pos_label != "none" and cfg.pos_embed != "none" and cfg.pos_drop_ratio > 0
    assert ("pos_mask_token" in weights) == drops
    if settings["pos_label"] == "none":
        assert not any("pos_loss" in r or "pos_acc" in r for r in rows)
        assert not any(k.startswith("pos_head") for k in weights)
    else:  # the logged loss is the reconstruction plus the weighted position loss
        for r in rows:
            assert r["loss"] == pytest.approx(r["mae_loss"] + cfg.pos_weight * r["pos_loss"])
        assert any(k.startswith("pos_head") for k in weights)


def test_fused_position_loss_trains_like_the_plain_one(tiny_cfg, tmp_path):
    # --pos_ce_chunk changes how the RPL loss is computed, not what: same losses, step by step
    logs = []
    for chunk in (0, 50):  # 32 images x 9 labelled tokens^2 = 2,592 pair rows: many chunks
        out = tmp_path / f"chunk{chunk}"
        cfg = tiny_cfg(
            max_steps=6, log_every=2, pos_label="rel", pos_ce_chunk=chunk, output_dir=str(out)
        )
        assert build_mae(cfg).pos_head.ce_chunk == chunk  # the key reaches the head
        pretrain.main(cfg)
        logs.append(read_log(out))
    assert [r["step"] for r in logs[0]] == [2, 4, 6]  # rows to compare
    for plain, fused in zip(*logs, strict=True):
        assert plain["step"] == fused["step"]
        assert plain["pos_loss"] == pytest.approx(fused["pos_loss"], rel=1e-4)
        assert plain["loss"] == pytest.approx(fused["loss"], rel=1e-4)


def test_compile_mode_reaches_torch_compile(tiny_cfg, monkeypatch):
    modes = []
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, **kw: modes.append(kw["mode"]))
    pretrain.main(tiny_cfg(max_steps=1, compile=True, compile_mode="reduce-overhead"))
    assert modes == ["reduce-overhead"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize(
    "pipeline, precision", [("cpu", "auto"), ("gpu", "auto"), ("cpu", "fp16")]
)  # fp16: the GradScaler's skips (added in session 19, not yet run on a GPU)
def test_cuda_steps_never_make_the_host_wait_for_the_gpu(
    tiny_cfg, monkeypatch, pipeline, precision
):
    """Between log lines a step has no host sync (a blocking copy, .item(), .tolist()): the
    host keeps queueing work ahead of the GPU. torch's sync debug mode turns any sync into an
    error from the end of step 2 to the end of step 7: batch loading, transfer, forward,
    backward, optimizer step and book-keeping; step 8 writes the log (one sync) and saves."""
    from maepl import loop

    real = loop.Run.batches

    def watched(self, *args, **kwargs):
        for k, batch in enumerate(real(self, *args, **kwargs)):
            yield batch
            torch.cuda.set_sync_debug_mode("error" if 1 <= k <= 5 else 0)
        torch.cuda.set_sync_debug_mode(0)

    monkeypatch.setattr(loop.Run, "batches", watched)
    cfg = tiny_cfg(
        max_steps=8,
        log_every=1000,
        vis_every=1000,
        data_pipeline=pipeline,
        pos_label="abs",
        mixed_precision=precision,
    )
    try:
        summary = pretrain.main(cfg)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert summary["step"] == 8 and np.isfinite(summary["loss"])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("pipeline", ["cpu", "gpu"])
def test_cuda_graphs_train_like_the_default_compile(tiny_cfg, tmp_path, pipeline):
    """--compile_mode reduce-overhead (CUDA graphs: each replay reuses the last one's output
    memory) logs the losses of the default compile, step for step, and finishes with its
    exports; also when the batches come from the prefetch thread's own CUDA stream
    (``--data_pipeline gpu``)."""
    logs = []
    for mode in ("default", "reduce-overhead"):
        out = tmp_path / mode
        cfg = tiny_cfg(
            data_pipeline=pipeline,
            max_steps=40,
            log_every=4,
            vis_every=1000,
            pos_label="abs",
            compile=True,
            compile_mode=mode,
            output_dir=str(out),
        )
        summary = pretrain.main(cfg)
        assert summary["step"] == 40 and (out / "export" / "mae.safetensors").exists()
        logs.append(read_log(out))
    for default, graphs in zip(*logs, strict=True):
        assert default["step"] == graphs["step"]
        for key in ("loss", "mae_loss", "pos_loss"):
            assert graphs[key] == pytest.approx(default[key], rel=2e-2, abs=1e-3), key
        # a log row's accuracy counts 4 x 32 x 9 = 1,152 tokens: a few argmax flips apart
        assert graphs["pos_acc"] == pytest.approx(default["pos_acc"], abs=6 / 1152)


@pytest.mark.parametrize("pipeline", ["cpu", "gpu"])
def test_log_lines_say_how_long_the_loop_waited_for_data(tiny_cfg, monkeypatch, pipeline):
    """data_ms: the loop's wait for its batches per step (a loader slowed by 30 ms a batch shows
    at least that); prefetch_ms: the GPU pipeline's augment time per step (slowed by 20 ms)."""
    import time

    from maepl import gpu_aug, loaders

    real_collate, real_augment = loaders.collate_skip_bad, gpu_aug.GpuAugment.__call__

    def slow_collate(batch):
        time.sleep(0.03)
        return real_collate(batch)

    def slow_augment(self, *args):
        time.sleep(0.02)
        return real_augment(self, *args)

    monkeypatch.setattr(loaders, "collate_skip_bad", slow_collate)
    monkeypatch.setattr(gpu_aug.GpuAugment, "__call__", slow_augment)
    pretrain.main(tiny_cfg(max_steps=8, log_every=4, data_pipeline=pipeline))
    rows = [json.loads(line) for line in (Path(tiny_cfg().output_dir) / "log.jsonl").open()]
    rows = [r for r in rows if "data_ms" in r]
    assert [r["step"] for r in rows] == [4, 8]
    for r in rows:
        if pipeline == "cpu":  # the sample's ArrayImageDataset collates with collate_skip_bad
            assert r["data_ms"] >= 30 and "prefetch_ms" not in r
        else:  # the loader feeds the prefetch thread; the loop waits for that
            # data_ms is then the wait for the prefetch thread, which may round to 0
            assert r["prefetch_ms"] >= 20 and isinstance(r["data_ms"], float)


def test_profile_steps_writes_a_trace_and_tables(tiny_cfg, capsys):
    import gzip

    pretrain.main(tiny_cfg(max_steps=6, profile_steps=2, profile_start=3))
    folder = Path(tiny_cfg().output_dir) / "profile"
    trace = json.loads(gzip.open(folder / "trace_rank0.json.gz").read())
    names = {e.get("name") for e in trace["traceEvents"]}
    assert "maepl.wait_for_batch" in names and any(str(n).startswith("aten::") for n in names)
    assert sum(str(n).startswith("ProfilerStep#") for n in names) == 2  # steps 4 and 5
    table = (folder / "table_rank0.txt").read_text()
    assert table.startswith("steps 4-5 (2), rank 0, cpu, by self_cpu_time_total")
    assert "profile of steps 4-5" in capsys.readouterr().out
    with pytest.raises(ConfigError, match="profile_steps.*past max_steps = 6"):
        tiny_cfg(max_steps=6, profile_steps=4, profile_start=3)


def test_pretraining_continues_from_an_initial_checkpoint(tiny_cfg, tmp_path, capsys):
    """--initial_checkpoint: continued pretraining (MAE's ImageNet weights on one's own data).
    A first step at the warm-up's lr 0 leaves the weights as loaded, so the new run's export
    must equal the file it started from: encoder, decoder and position head."""
    first = tiny_cfg(max_steps=3, output_dir=str(tmp_path / "a"))
    pretrain.main(first)
    full = tmp_path / "a" / "export" / "mae.safetensors"
    start = dict(max_steps=1, warmup_epochs=1, seed=5)  # another seed: other initial weights
    pretrain.main(tiny_cfg(**start, initial_checkpoint=str(full), output_dir=str(tmp_path / "b")))
    assert "initial_checkpoint: decoder loaded" in capsys.readouterr().out
    theirs, ours = load_file(full), load_file(tmp_path / "b" / "export" / "mae.safetensors")
    assert theirs.keys() == ours.keys() and any(k.startswith("pos_head.") for k in ours)
    assert all(torch.equal(theirs[k], ours[k]) for k in ours)

    # an official-release-style .pth with the encoder only: the decoder starts fresh
    enc = load_file(tmp_path / "a" / "export" / "encoder" / "model.safetensors")
    torch.save({"model": enc}, tmp_path / "mae_pretrain.pth")
    pth = str(tmp_path / "mae_pretrain.pth")
    pretrain.main(tiny_cfg(**start, initial_checkpoint=pth, output_dir=str(tmp_path / "c")))
    assert "initial_checkpoint: decoder: fresh (none in the file)" in capsys.readouterr().out
    ours = load_file(tmp_path / "c" / "export" / "encoder" / "model.safetensors")
    assert all(torch.equal(enc[k], ours[k]) for k in enc)

    # on another grid the position head's classes mean other positions: it starts fresh
    grid = tiny_cfg(**start, input_size=32, initial_checkpoint=str(full))
    pretrain.main(dataclasses.replace(grid, output_dir=str(tmp_path / "e")))
    out = capsys.readouterr().out
    assert "pos_embed resampled" in out and "decoder loaded" in out
    assert "position head: fresh (its classes are the positions of another grid)" in out
    # maepl weights record their architecture: other shape flags are named as flags
    with pytest.raises(ConfigError, match="records another architecture .*--embed_dim 48"):
        pretrain.main(
            tiny_cfg(initial_checkpoint=str(full), embed_dim=24, output_dir=str(tmp_path / "f"))
        )

    # a decoder that does not fit the flags is named, and nothing is written
    bad = tiny_cfg(
        initial_checkpoint=str(full), decoder_embed_dim=16, output_dir=str(tmp_path / "d")
    )
    with pytest.raises(ConfigError, match="initial_checkpoint: the decoder of .* --decoder_embed"):
        pretrain.main(bad)
    assert not (tmp_path / "d").exists()
    with pytest.raises(ConfigError, match="initial_checkpoint: no such file"):
        tiny_cfg(initial_checkpoint=str(tmp_path / "nope.pth"))
    # --overwrite of the run that holds the file would delete it before it is read
    again = tiny_cfg(initial_checkpoint=str(full), output_dir=str(tmp_path / "a"), overwrite=True)
    with pytest.raises(ConfigError, match="initial_checkpoint: .* lies in .*export"):
        pretrain.main(again)
    assert full.exists()


def test_initial_checkpoint_parts_load_on_their_own_terms(tiny_cfg, tmp_path, capsys):
    """The PE-drop token does not decide whether the position head loads; an avg-pooled
    classifier is refused by name; a resume does not need the file any more."""
    first = tiny_cfg(max_steps=2, output_dir=str(tmp_path / "a"))
    pretrain.main(first)
    full = str(tmp_path / "a" / "export" / "mae.safetensors")
    cfg = tiny_cfg(max_steps=1, pos_drop_ratio=0.0, initial_checkpoint=full)
    pretrain.main(dataclasses.replace(cfg, output_dir=str(tmp_path / "b")))
    out = capsys.readouterr().out
    assert "position head loaded" in out and "PE-drop token: not used" in out
    enc = load_file(tmp_path / "a" / "export" / "encoder" / "model.safetensors")
    enc = {k: v for k, v in enc.items() if not k.startswith("norm.")}
    enc.update({"fc_norm.weight": torch.ones(48), "fc_norm.bias": torch.zeros(48)})
    torch.save({"model": enc}, tmp_path / "ft_avg.pth")
    bad = tiny_cfg(initial_checkpoint=str(tmp_path / "ft_avg.pth"), output_dir=str(tmp_path / "c"))
    with pytest.raises(ConfigError, match="initial_checkpoint: .*average pooling"):
        pretrain.main(bad)
    # the run resumes from its own checkpoint once the file it started from is gone
    gone = tmp_path / "gone.safetensors"
    shutil.copy(full, gone)
    run = tiny_cfg(max_steps=1, initial_checkpoint=str(gone), output_dir=str(tmp_path / "d"))
    pretrain.main(run)
    gone.unlink()  # validated again: the check looks for the checkpoint --resume will load
    pretrain.main(tiny_cfg(**{**vars(run), "resume": "auto", "max_steps": 2, "encoder": None}))
    assert "initial_checkpoint: not read" in capsys.readouterr().out


@pytest.mark.parametrize("lr", [None, 4e-3])
def test_the_start_line_states_the_base_lr_the_run_uses(tiny_cfg, lr):
    from maepl.loop import Run

    cfg = tiny_cfg(lr=lr, blr=1.5e-3, batch_size=16, accum_iter=2)
    run = Run(cfg, "pretrain", ())
    run.plan(320)  # effective batch 32: lr = blr * 32 / 256 unless --lr is given
    base, actual = (1.5e-3, 1.5e-3 / 8) if lr is None else (4e-3 * 8, 4e-3)
    assert run.lr == pytest.approx(actual)
    assert f"base lr {base:.2e}, actual lr {actual:.2e}" in run.describe()
