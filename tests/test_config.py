import subprocess
import sys

import pytest
import torch

from maepl.config import (
    ConfigError,
    FinetuneConfig,
    LinprobeConfig,
    PretrainConfig,
    load_yaml,
    parse_config,
)

from .conftest import ROOT


def test_defaults_resolve_official_base_shape():
    cfg = parse_config(PretrainConfig, ["--data_path", ROOT])
    assert (cfg.encoder, cfg.embed_dim, cfg.depth, cfg.num_heads) == (
        "vit_base_patch16_224",
        768,
        12,
        12,
    )
    assert (cfg.decoder_embed_dim, cfg.decoder_depth, cfg.decoder_num_heads) == (512, 8, 16)
    assert (cfg.input_size, cfg.patch_size, cfg.mask_ratio) == (224, 16, 0.75)


def test_precedence_defaults_yaml_flags_and_dashed_spelling(tmp_path):
    y = tmp_path / "c.yaml"
    y.write_text("model: mae_vit_micro_patch4_28\ndataset: sample\nmask_ratio: 0.6\nepochs: 3\n")
    cfg = parse_config(
        PretrainConfig, ["--config", str(y), "--mask-ratio", "0.5", "--norm_pix_loss", "false"]
    )
    assert cfg.mask_ratio == 0.5 and cfg.epochs == 3 and cfg.norm_pix_loss is False
    assert cfg.embed_dim == 96 and cfg.input_size == 28
    cfg = parse_config(PretrainConfig, ["--config", str(y), "--compile"])
    assert cfg.compile is True


@pytest.mark.parametrize(
    "yaml_text, key",
    [
        ("mask_ration: 0.5\n", "mask_ration"),
        ("batch_size: lots\n", "batch_size"),
        ("norm_pix_loss: 3\n", "norm_pix_loss"),
        ("pos_label: absolute\ndataset: sample\n", "pos_label"),
    ],
)
def test_bad_yaml_names_the_key(tmp_path, yaml_text, key):
    y = tmp_path / "bad.yaml"
    y.write_text(yaml_text)
    with pytest.raises(ConfigError, match=key):
        parse_config(PretrainConfig, ["--config", str(y)])


def test_unknown_yaml_key_suggests_the_right_one(tmp_path):
    y = tmp_path / "bad.yaml"
    y.write_text("mask_ration: 0.5\n")
    with pytest.raises(ConfigError, match="did you mean 'mask_ratio'"):
        load_yaml(y, PretrainConfig)


@pytest.mark.parametrize(
    "flags, key",
    [
        (["--mask_ratio", "1.0"], "mask_ratio"),
        (["--mask_ratio", "abc"], "mask_ratio"),
        (["--input_size", "30", "--patch_size", "4"], "input_size"),
        (["--pos_drop_ratio", "0.05"], "pos_drop_ratio"),  # 12 visible * 0.05 hides nothing
        (["--pos_pairs", "10", "--pos_label", "abs"], "pos_pairs"),
        (["--pos_ce_chunk", "-1"], "pos_ce_chunk"),
        (["--pos_ce_chunk", "64", "--pos_label", "none"], "pos_ce_chunk: only with a position"),
        (["--pos_smoothing", "1", "--pos_label", "none"], "pos_smoothing: only with a position"),
        (["--model", "resnet50"], "model"),
        (["--mixed_precision", "fp8"], "mixed_precision"),
        (["--pos_embed", "rope"], "pos_embed"),
        (["--pos_embed", "auto"], "pos_embed"),  # auto: fine-tuning and probing only
        (["--compile", "--compile_mode", "fast"], "compile_mode"),
        (["--compile_mode", "reduce-overhead"], "compile_mode"),  # without --compile
        # CUDA graphs cannot accumulate gradients over micro-batches
        (["--compile", "--compile_mode", "reduce-overhead", "--accum_iter", "2"], "accum_iter=2"),
        (["--compile", "--compile_mode", "max-autotune", "--accum_iter", "4"], "CUDA graphs"),
        (["--seed", "-1"], "seed"),  # NumPy's seed range: set_seed would fail after output_dir
        (["--seed", "4294967"], r"seed: must be in \[0, 4294967\)"),  # seed*1000+rank < 2**32
        (["--model", "vit_base_patch14_reg4_dinov2"], "model: .*no register tokens"),
        (["--std", "0"], "std: must be > 0"),
        (["--mean", "nan"], "mean: must be finite"),
        (["--output_dir", ""], "output_dir: empty"),  # the official "save nothing"; not "."
    ],
)
def test_bad_values_are_rejected_with_the_key(flags, key):
    base = ["--model", "mae_vit_micro_patch4_28", "--dataset", "sample"]
    with pytest.raises(ConfigError, match=key):
        parse_config(PretrainConfig, base + flags)


def test_missing_data_path_is_named():
    with pytest.raises(ConfigError, match="data_path"):
        parse_config(PretrainConfig, ["--dataset", "imagefolder"])
    with pytest.raises(ConfigError, match="/no/such/dir"):
        parse_config(PretrainConfig, ["--data_path", "/no/such/dir"])


@pytest.mark.parametrize(
    "cls,base", [(PretrainConfig, []), (FinetuneConfig, ["--model", "vit_tiny_patch16_224"])]
)
def test_a_flag_the_dataset_would_ignore_is_refused(cls, base, tmp_path):
    # the embedded sample reads no folder: a --data_path beside it was silently unused
    with pytest.raises(ConfigError, match="data_path: .*would be ignored"):
        parse_config(cls, base + ["--dataset", "sample", "--data_path", str(tmp_path)])
    with pytest.raises(ConfigError, match="download: .*'imagefolder'"):
        parse_config(cls, base + ["--data_path", str(tmp_path), "--download", "true"])
    ok = parse_config(cls, base + ["--dataset", "fashion-mnist", "--data_path", str(tmp_path)])
    assert ok.data_path == str(tmp_path)


FT = ["--model", "vit_tiny_patch16_224", "--dataset", "sample"]


def test_official_mae_flags_run_or_say_why_not(capsys):
    # the official README's linear-probe and fine-tune commands, in their own flag words
    lp = parse_config(LinprobeConfig, FT + ["--cls_token", "--dist_eval", "--no_pin_mem"])
    assert lp.global_pool == "token" and lp.pin_mem is False
    ft = parse_config(FinetuneConfig, FT + ["--cls_token"])  # fine-tuning's default is avg
    assert ft.global_pool == "token"
    assert (
        parse_config(FinetuneConfig, FT + ["--cls_token", "--global_pool", "token"]).global_pool
        == "token"
    )
    ft = parse_config(FinetuneConfig, FT + ["--local_rank", "--no_pin_mem"])
    assert ft.pin_mem is False  # a flag after a bare --local_rank is not taken as its value
    lp = parse_config(LinprobeConfig, FT + ["--global_pool"])  # official: no value = mean pool
    assert lp.global_pool == "avg"
    ft = parse_config(FinetuneConfig, FT + ["--local-rank=1", "--dist_eval", "--local_rank", "-1"])
    assert ft.global_pool == "avg" and ft.pin_mem is True
    # the official models_vit.py names build timm's ViTs of the same shapes
    official = ["--model", "vit_large_patch16", "--dataset", "sample"]
    ft = parse_config(FinetuneConfig, official)
    assert (ft.encoder, ft.embed_dim, ft.depth, ft.patch_size) == (
        "vit_large_patch16_224",
        1024,
        24,
        16,
    )
    ft = parse_config(FinetuneConfig, FT + ["--cutmix_minmax", "0.2", "0.8"])  # nargs '+'
    assert ft.cutmix_minmax == [0.2, 0.8]
    for words in (["0.5,0.5,0.5"], ["0.5", "0.5", "0.5"], ["0.5,", "0.5,", "0.5"]):
        assert parse_config(FinetuneConfig, FT + ["--mean", *words]).mean == [0.5] * 3
    for flag, says in [
        (["--log_dir", "x"], "log_dir: .*<output_dir>/tensorboard"),
        (["--device", "cuda"], "device: .*CUDA_VISIBLE_DEVICES"),
        (["--world_size", "8"], "world_size: .*torchrun"),
        (["--dist_url", "env://"], "dist_url: .*torchrun"),
        (["--start_epoch", "3"], "start_epoch: .*--resume"),
        (["--resplit"], "resplit: .*never uses it"),
        (["--cls_token", "--global_pool", "avg"], "global_pool: given as avg and token"),
        (["--no-pin-mem=false"], "no_pin_mem: takes no value"),
        (["--cls_token=false"], "cls_token: takes no value"),
    ]:
        with pytest.raises(ConfigError, match=says):
            parse_config(FinetuneConfig, FT + flag)
    # refused by name in all three scripts
    for flag, says in [
        (["--log_dir", "x"], "log_dir: .*<output_dir>/tensorboard"),
        (["--device", "cuda"], "device: .*CUDA_VISIBLE_DEVICES"),
        (["--world_size", "8"], "world_size: .*torchrun"),
        (["--dist_url", "env://"], "dist_url: .*torchrun"),
        (["--dist_on_itp"], "dist_on_itp: .*torchrun"),
        (["--start_epoch", "3"], "start_epoch: .*--resume"),
    ]:
        for cls in (PretrainConfig, FinetuneConfig, LinprobeConfig):
            with pytest.raises(ConfigError, match=says):
                parse_config(cls, FT + flag)
    # another maepl script's way to start from weights names that script's flag
    with pytest.raises(ConfigError, match="initial_checkpoint: not a flag .*--finetune"):
        parse_config(FinetuneConfig, FT + ["--initial_checkpoint", "w.pth"])
    with pytest.raises(ConfigError, match="finetune: not a flag .*--initial_checkpoint"):
        parse_config(PretrainConfig, ["--dataset", "sample", "--finetune", "w.pth"])
    # where the official script has no such flag, argparse names it as unknown
    with pytest.raises(SystemExit):
        parse_config(PretrainConfig, ["--dataset", "sample", "--cls_token"])
    assert "unrecognized arguments: --cls_token" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="cutmix_minmax: .*0 < min < max"):
        parse_config(FinetuneConfig, FT + ["--cutmix_minmax", "0.8", "0.2"])


def run_cli(*args, cwd=ROOT):
    return subprocess.run(
        [sys.executable, "pretrain.py", *args], cwd=cwd, capture_output=True, text=True, timeout=120
    )


def test_cli_bad_config_exits_nonzero_naming_the_key(tmp_path):
    r = run_cli(
        "--dataset",
        "sample",
        "--model",
        "mae_vit_micro_patch4_28",
        "--mask_ratio",
        "1.5",
        "--output_dir",
        str(tmp_path / "o"),
    )
    assert r.returncode != 0
    assert "mask_ratio" in r.stderr
    assert not (tmp_path / "o").exists()  # nothing written before validation passed
    r = run_cli("--mask_rato", "0.5")
    assert r.returncode == 2 and "--mask_rato" in r.stderr


def test_cli_refuses_an_output_dir_holding_another_run(tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    (out / "config.yaml").write_text("model: x\n")
    r = run_cli(
        "--dataset", "sample", "--model", "mae_vit_micro_patch4_28", "--output_dir", str(out)
    )
    assert r.returncode != 0 and "output_dir" in r.stderr and "--resume" in r.stderr
    assert (out / "config.yaml").read_text() == "model: x\n"  # left untouched


def test_none_on_the_command_line_is_a_value_for_string_keys():
    # pos_label / pos_embed take the word "none"; optional keys (aa) read it as null
    base = ["--model", "mae_vit_micro_patch4_28", "--dataset", "sample"]
    cfg = parse_config(PretrainConfig, base + ["--pos_label", "none", "--pos_embed", "none"])
    assert (cfg.pos_label, cfg.pos_embed) == ("none", "none")
    ft = parse_config(
        FinetuneConfig, ["--model", "vit_tiny_patch16_224", "--dataset", "sample", "--aa", "none"]
    )
    assert ft.aa is None
    # unset keys of fine-tuning resolve to their documented values (no --eval record here)
    assert (ft.pos_embed, ft.global_pool, ft.nb_classes) == ("learned", "avg", None)
    ft = parse_config(
        FinetuneConfig,
        ["--model", "vit_tiny_patch16_224", "--dataset", "sample", "--pos_embed", "none"],
    )
    assert ft.pos_embed == "none"
    with pytest.raises(ConfigError, match="batch_size: may not be empty"):
        parse_config(PretrainConfig, base + ["--batch_size", "none"])


FT = ["--model", "vit_tiny_patch16_224", "--dataset", "sample"]


@pytest.mark.parametrize(
    "flags, key",
    [
        (["--aa", "randaug-m9"], "aa: timm cannot build"),
        (["--aa", "autoaug"], "aa: timm cannot build"),
        (["--remode", "pixl"], "remode"),
        (["--color_jitter", "-0.1"], "color_jitter"),
        (["--batch_size", "7"], "batch_size: mixup/cutmix need an even"),
        (["--batch_size", "7", *"--mixup 0 --cutmix 0 --cutmix_minmax 0.2,0.8".split()], "batch"),
    ],
)
def test_bad_finetune_augmentation_is_named_before_any_data(flags, key):
    with pytest.raises(ConfigError, match=key):
        parse_config(FinetuneConfig, FT + flags)
    odd = parse_config(FinetuneConfig, FT + ["--batch_size", "7", "--mixup", "0", "--cutmix", "0"])
    assert odd.batch_size == 7  # an odd batch is refused only with mixup or cutmix on


def test_yaml_spellings_the_command_line_accepts(tmp_path):
    y = tmp_path / "c.yaml"
    y.write_text("dataset: sample\nblr: 1e-4\naa: none\n")  # YAML 1.1: 1e-4 is a string
    cfg = parse_config(FinetuneConfig, ["--config", str(y), "--model", "vit_tiny_patch16_224"])
    assert cfg.blr == 1e-4 and cfg.aa is None
    y.write_text("dataset: sample\nmixed_precision: no\n")  # YAML 1.1: no is False
    with pytest.raises(
        ConfigError, match='mixed_precision: .*quote it, e.g. mixed_precision: "no"'
    ):
        parse_config(FinetuneConfig, ["--config", str(y), "--model", "vit_tiny_patch16_224"])


@pytest.mark.parametrize(
    "flag, value, says",
    [
        ("smoothing", "1.0", r"\[0, 1\)"),  # timm's LabelSmoothingCrossEntropy asserts < 1
        ("drop_path", "1.5", r"\[0, 1\)"),  # a keep probability of -0.5 in the first step
        ("reprob", "2", r"\[0, 1\]"),
        ("mixup_prob", "3", r"\[0, 1\]"),
        ("mixup_switch_prob", "-0.1", r"\[0, 1\]"),
        ("mixup", "-1", ">= 0"),
    ],
)
def test_finetune_rates_out_of_range_are_refused_before_the_run(flag, value, says, tmp_path):
    """Refused while parsing, so no run folder is claimed (a traceback from timm after
    config.yaml was written made the corrected command meet 'already holds a run')."""
    out = ["--output_dir", str(tmp_path / "run")]
    with pytest.raises(ConfigError, match=rf"{flag}: must be (in )?{says}"):
        parse_config(FinetuneConfig, FT + out + [f"--{flag}", value])
    assert not (tmp_path / "run").exists()


def test_finetune_colour_jitter_only_when_asked_as_in_mae():
    from torchvision import transforms

    from maepl.data import build_finetune_transform, default_crop_pct

    def jitters(**kw):
        tf = build_finetune_transform(28, 1, [0.5], [0.5], None, 0.0, "pixel", 1, **kw)
        return [t for t in tf.transforms[1].transforms if isinstance(t, transforms.ColorJitter)]

    assert jitters() == [] and jitters(color_jitter=None) == []  # timm alone would add 0.4
    (cj,) = jitters(color_jitter=0.4)
    assert cj.brightness == (0.6, 1.4)
    # MAE's evaluation crop: 224/256 up to 224 px, 1.0 above; 1.0 for small images
    assert [default_crop_pct(s) for s in (28, 32, 64, 224, 384)] == [1.0, 1.0, 0.875, 0.875, 1.0]


def test_accumulation_is_allowed_where_no_cuda_graphs_are_recorded():
    base = ["--model", "mae_vit_micro_patch4_28", "--dataset", "sample", "--accum_iter", "2"]
    for extra in ([], ["--compile"], ["--compile", "--compile_mode", "max-autotune-no-cudagraphs"]):
        assert parse_config(PretrainConfig, base + extra).accum_iter == 2


def test_every_flag_has_help_from_the_config_comments(capsys):
    """--help reads each flag's meaning from the comments in maepl/config.py (so it cannot drift
    from them): every key of the three scripts has one; the usage lines stay lines."""
    from maepl.config import LinprobeConfig
    from maepl.config_io import _user_fields, build_parser, field_comments

    for cls in (PretrainConfig, FinetuneConfig, LinprobeConfig):
        comments = field_comments(cls)
        assert [f.name for f in _user_fields(cls) if not comments.get(f.name)] == [], cls
    assert field_comments(PretrainConfig)["pos_weight"] == "lambda in L = L_mae + lambda * L_pos"
    assert field_comments(FinetuneConfig)["pos_weight"] == "lambda in L = L_cls + lambda * L_pos"
    # a subclass's own comment wins; one above a field counts; a "# ---" rule does not
    assert field_comments(FinetuneConfig)["model"].startswith("None: the architecture stored")
    assert field_comments(PretrainConfig)["compile_mode"].startswith("torch.compile mode:")
    assert "---" not in " ".join(field_comments(FinetuneConfig).values())

    parser = build_parser(PretrainConfig, "MAE pretraining.\n\n    python pretrain.py --x\n")
    with pytest.raises(SystemExit):
        parser.parse_args(["--help"])
    out = " ".join(capsys.readouterr().out.split())  # argparse wraps the flags' help
    assert "--mask_ratio V, --mask-ratio V fraction of patches removed from the encoder's " in out
    assert "input (default: 0.75)" in out
    parser.print_help()
    assert "\n    python pretrain.py --x\n" in capsys.readouterr().out  # not reflowed


def test_channels_resume_folder_and_normalisation_are_checked_before_any_data(tmp_path):
    base = ["--model", "mae_vit_micro_patch4_28", "--dataset", "sample"]
    with pytest.raises(ConfigError, match="in_chans: must be 1 or 3, got 2"):
        parse_config(PretrainConfig, [*base, "--in_chans", "2"])
    with pytest.raises(
        ConfigError, match=r"mean: needs one value, or one per channel \(1\); got 2"
    ):
        parse_config(PretrainConfig, [*base, "--mean", "0.1,0.2"])
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "COMPLETE").write_text("ok")  # but no state.json
    for folder in (tmp_path / "missing", tmp_path / "ckpt"):
        with pytest.raises(ConfigError, match="resume: .* is not a complete maepl checkpoint"):
            parse_config(PretrainConfig, [*base, "--resume", str(folder)])


def test_a_bad_image_from_a_worker_is_reported_without_the_workers_traceback():
    from maepl.loaders import BadImageError

    msg = "strict_data: /data/train/a/x.jpg cannot be read (cannot identify image file)"
    reraised = BadImageError(
        "Caught BadImageError in DataLoader worker process 0.\nOriginal Traceback (most recent "
        f'call last):\n  File "loaders.py", line 9, in get\nmaepl.loaders.BadImageError: {msg}\n'
    )
    assert reraised.user_message() == msg
    assert BadImageError(msg).user_message() == msg  # raised in the main process (workers 0)
    batch = "every image of a batch is unreadable:\n  a.jpg: OSError\n  b.jpg: OSError"
    worker = "Caught BadImageError in DataLoader worker process 1.\nOriginal Traceback:\n  x\n"
    assert BadImageError(f"{worker}maepl.loaders.BadImageError: {batch}\n").user_message() == batch


def test_auto_precision_follows_accelerate_launch(monkeypatch):
    from maepl.config import resolve_precision

    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION", raising=False)
    cpu = resolve_precision("auto")  # this machine's own choice
    for launcher, expected in [("bf16", "bf16"), ("fp16", "fp16"), ("no", cpu), ("", cpu)]:
        # accelerate launch --mixed_precision X writes X; "no" when nothing was chosen
        monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", launcher)
        assert resolve_precision("auto") == expected
        assert resolve_precision("no") == "no"  # maepl's own flag wins, as Accelerator's does


@pytest.mark.skipif(torch.cuda.is_available(), reason="fp16 is real on CUDA")
def test_fp16_without_cuda_is_refused(monkeypatch):
    # on a CPU Accelerate neither casts to fp16 nor builds a GradScaler: a silent float32 run
    # whose non-finite steps would not be skipped
    with pytest.raises(ConfigError, match="mixed_precision: fp16 needs a CUDA GPU"):
        parse_config(PretrainConfig, ["--dataset", "sample", "--mixed_precision", "fp16"])
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "fp16")
    with pytest.raises(ConfigError, match="auto took fp16 from accelerate launch"):
        parse_config(PretrainConfig, ["--dataset", "sample"])
