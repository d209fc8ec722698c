"""The benchmark scripts run end to end (tiny settings) and print what they promise."""

import contextlib
import functools
import importlib.util
import io
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from .conftest import ROOT

# the quality benchmark's smallest study: plain MAE, one seed, the smoke budget
SMOKE_MAE = ("benchmarks/quality.py", "--budget", "smoke", "--seeds", "1", "--variants", "mae")


def quality_args(**changes):
    """quality.py's parsed arguments for a smoke-budget job (as run_jobs / run_one get them)."""
    import argparse

    base = dict(
        budget="smoke",
        data_path=None,
        workers=None,
        compile_mode=None,
        mixed_precision=None,
        epochs=None,
        resume=False,
        parallel=1,
        time_limit=None,
    )
    return argparse.Namespace(**{**base, **changes})


def load_script(name: str):
    """benchmarks/<name>.py as a module (the benchmarks are scripts, not part of the package)."""
    spec = importlib.util.spec_from_file_location(name, f"{ROOT}/benchmarks/{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run(*args, timeout=300):
    return subprocess.run(
        [sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout
    )


def quality_here(*args: str) -> subprocess.CompletedProcess:
    """quality.py's main in this process, with its exit status and output as a subprocess's: for
    the calls that refuse or only report (a subprocess costs ~5 s of imports on 2 cores). Calls
    that train stay subprocesses, as a user runs them."""
    quality = load_quality()
    out, err, code = io.StringIO(), io.StringIO(), 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            quality.main([str(a) for a in args])
        except SystemExit as e:  # sys.exit("message") prints it and exits 1, as Python does
            if isinstance(e.code, str):
                print(e.code, file=sys.stderr)
            code = e.code if isinstance(e.code, int) else (1 if e.code else 0)
    return subprocess.CompletedProcess(args, code, out.getvalue(), err.getvalue())


@functools.cache
def load_quality():
    return load_script("quality")


@pytest.fixture(scope="module")
def smoke_mae_study(tmp_path_factory):
    """A finished SMOKE_MAE study (results.json, the run's export), shared read-only by the
    tests that start from one: each smoke run costs ~20 s of CI on 2 cores."""
    out = tmp_path_factory.mktemp("smoke_mae")
    r = run(*SMOKE_MAE, "--out", str(out))
    assert r.returncode == 0, r.stderr[-3000:]
    return out


def test_quality_smoke_budget(tmp_path):
    r = run(
        "benchmarks/quality.py",
        "--budget",
        "smoke",
        "--seeds",
        "2",
        "--variants",
        "mae,apl_drop",
        "--out",
        str(tmp_path),
    )
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads((tmp_path / "results.json").read_text())
    # seed-major: every variant once before any second seed
    assert [(row["variant"], row["seed"]) for row in res["rows"]] == [
        ("mae", 0),
        ("apl_drop", 0),
        ("mae", 1),
        ("apl_drop", 1),
    ]
    for row in res["rows"]:
        assert 0 <= row["probe_cls"] <= 100 and 0 <= row["knn_avg"] <= 100
    table = (tmp_path / "results.md").read_text()
    assert "| apl_drop |" in table and "±" in table
    # the paired table: apl_drop minus mae of the same seed, over both seeds
    gains = table.split("paired by seed")[1]
    mae, apl = (
        {r["seed"]: r["probe_cls"] for r in res["rows"] if r["variant"] == v}
        for v in ("mae", "apl_drop")
    )
    d = [apl[s] - mae[s] for s in (0, 1)]
    assert f"| apl_drop | 2 | {load_script('quality').num(sum(d) / 2, '+')} ± " in gains
    assert f"({sum(x > 0 for x in d)}/2 up)" in gains


def test_throughput_prints_its_ratio_last(tmp_path, monkeypatch):
    r = run("benchmarks/throughput.py", "--only", "plain,apl", "--steps", "2", "--warmup", "1")
    assert r.returncode == 0, r.stderr[-3000:]
    lines = r.stdout.strip().splitlines()
    assert lines[-1] == "ratio_vs_hf=nan"  # hf not run
    assert any(line.strip().startswith("apl") and "img/s" in line for line in lines)
    # a bf16 residual stream without bf16 autocast is refused by name, before any work
    r = run("benchmarks/throughput.py", "--only", "plain,apl_bf16s", "--precision", "no")
    assert r.returncode == 2 and "apl_bf16s: a bf16 residual stream needs" in r.stderr
    # sequential: the JSON is rewritten after each configuration, so a cut run keeps them
    throughput = load_script("throughput")
    seen = []
    monkeypatch.setattr(
        throughput,
        "report_line",
        lambda res: seen.append(
            json.loads((tmp_path / "t.json").read_text())["results"]
            if (tmp_path / "t.json").exists()
            else []
        ),
    )
    monkeypatch.setattr(
        sys,
        "argv",
        [
            "throughput.py",
            "--only",
            "plain,apl",
            "--steps",
            "1",
            "--warmup",
            "0",
            "--schedule",
            "sequential",
            "--json",
            str(tmp_path / "t.json"),
        ],
    )
    assert throughput.main() == 0
    assert [len(s) for s in seen] == [0, 1]  # before each config's line: the ones before it
    final = json.loads((tmp_path / "t.json").read_text())
    assert final["complete"] and [r["name"] for r in final["results"]] == ["plain", "apl"]


def test_throughput_cpp_wrapper_needs_compile(capsys):
    """--cpp_wrapper changes how compiled graphs run: without --compile it is refused by name."""
    tp = load_script("throughput")
    assert tp.parse_args(["--only", "plain", "--compile", "--cpp_wrapper"]).cpp_wrapper
    with pytest.raises(SystemExit) as exit_info:
        tp.parse_args(["--only", "plain", "--cpp_wrapper"])
    assert (
        exit_info.value.code == 2
        and "--cpp_wrapper: only with --compile" in capsys.readouterr().err
    )


def test_throughput_bf16_levers_train_like_autocast():
    """The bf16-residual-stream and bf16-weights (fp32 master weights) configurations follow the
    bf16-autocast one step for step on one batch; the bf16 weights are the rounded fp32 masters
    after each step."""
    tp = load_script("throughput")
    import torch

    args = tp.parse_args(["--only", "plain,plain_bf16w", "--precision", "bf16"])
    shape = dict(tp.PRESETS["cpu"], depth=2, decoder_depth=1)
    torch.manual_seed(0)
    imgs = torch.randn(16, 3, 32, 32)
    losses = {}
    for name in ("plain", "plain_bf16s", "plain_bf16w"):
        runner = tp.Runner(name, args, shape, imgs)
        torch.manual_seed(1)  # the same masks for each
        losses[name] = []
        for _ in range(12):
            losses[name].append(float(runner.step()))
            if name == "plain_bf16w":  # after each step: the weights are the rounded masters
                for p, m in zip(runner.params, runner.masters, strict=True):
                    assert m.dtype == torch.float32 and torch.equal(
                        p.detach(), m.to(torch.bfloat16)
                    )
    assert next(runner.model.parameters()).dtype == torch.bfloat16
    a = losses["plain"]
    for b in (losses["plain_bf16s"], losses["plain_bf16w"]):
        assert b[-1] < 0.7 * b[0]  # it learns
        assert all(abs(x - y) < 0.02 * x for x, y in zip(a, b, strict=True)), (a, b)


def test_throughput_official_style_computes_maepls_loss_and_gradients(tmp_path):
    """The "official" baseline computes plain MAE as the official model code does (all patches
    embedded, index copies): on the same parameters and noise, maepl's loss and gradients."""
    tp = load_script("throughput")
    args = tp.parse_args(["--only", "plain,official", "--precision", "no"])
    shape = dict(tp.PRESETS["cpu"], depth=2, decoder_depth=1)
    torch.manual_seed(0)
    imgs = torch.randn(8, 3, 32, 32, dtype=torch.float64)
    mae = tp.Runner("official", args, shape, imgs.float()).model.double()
    ref = tp.OfficialStyle(mae)
    noise = torch.rand(8, mae.num_patches, dtype=torch.float64)
    ours = mae(imgs, noise)["mae_loss"]
    grads = torch.autograd.grad(ours, [p for p in mae.parameters() if p.requires_grad])
    theirs = ref(imgs, noise)
    ref_grads = torch.autograd.grad(theirs, [p for p in mae.parameters() if p.requires_grad])
    assert ours.item() > 0.5 and theirs.item() == pytest.approx(ours.item(), rel=1e-12)
    assert len(grads) > 10 and all(g.abs().sum() > 0 for g in grads[:3])
    for g, h in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(h, g, rtol=1e-9, atol=1e-12)

    out = tmp_path / "t.json"
    r = run(
        "benchmarks/throughput.py",
        "--only",
        "apl,official",
        "--steps",
        "2",
        "--warmup",
        "1",
        "--json",
        str(out),
    )
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(out.read_text())
    speed = {x["name"]: x["img_per_s"] for x in res["results"]}
    assert res["apl_vs_official"] == pytest.approx(speed["apl"] / speed["official"])
    assert f"apl_vs_official={speed['apl'] / speed['official']:.3f}" in r.stdout.splitlines()


def test_quality_reuses_earlier_rows_and_runs_the_rest_in_parallel(tmp_path, smoke_mae_study):
    first = smoke_mae_study
    second = tmp_path / "second"
    args = ["--budget", "smoke", "--seeds", "1", "--variants", "mae,apl_no_pe", "--out"]
    # the study in this process; its run goes to a subprocess (--parallel)
    r = quality_here(*args, second, "--parallel", "2", "--reuse", first / "results.json")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "reusing 1 rows" in r.stdout
    assert not (second / "rows" / "mae_s0.json").exists()  # taken over, not rerun
    assert (second / "rows" / "apl_no_pe_s0.json").exists()  # run as a subprocess
    res = json.loads((second / "results.json").read_text())
    assert [(row["variant"], row["seed"]) for row in res["rows"]] == [("mae", 0), ("apl_no_pe", 0)]
    assert res["rows"][0] == json.loads((first / "results.json").read_text())["rows"][0]
    assert res["not_run"] == []
    assert res["rows"][0]["pos_loss"] is None and res["rows"][1]["pos_loss"] > 0

    # a time limit that has passed before the first run starts: nothing runs, all is listed
    late = tmp_path / "late"
    r = quality_here(*args, late, "--parallel", "2", "--time_limit", "1e-9")
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads((late / "results.json").read_text())
    assert res["rows"] == [] and res["not_run"] == ["mae_s0", "apl_no_pe_s0"]


def test_quality_reports_linprobe_and_fills_it_into_older_rows(tmp_path, smoke_mae_study):
    first = smoke_mae_study  # read only: --fill_lp probes into --out
    res = json.loads((first / "results.json").read_text())
    row = res["rows"][0]
    # linprobe.py's MAE recipe, with MAE's ImageNet lr x steps of the probe's schedule: smoke
    # lp = one epoch at batch 64 (cut and evaluated at step 20)
    steps = 10_000 // 64
    assert row["lp_blr"] * 64 / 256 * steps == pytest.approx(6.4 * 7037, rel=1e-3)
    assert 0 <= row["lp_cls"] <= 100
    assert row["lp_precision"] == ("bf16" if torch.cuda.is_available() else "no")  # auto
    assert "lp_cls" in (first / "results.md").read_text()

    # a row of older code lacks the column: --fill_lp computes it from the run's kept export
    old = dict(res, rows=[{k: v for k, v in row.items() if not k.startswith("lp_")}])
    (tmp_path / "old.json").write_text(json.dumps(old))
    second = tmp_path / "second"
    fill = ["--reuse", str(tmp_path / "old.json"), "--fill_lp", str(first), "--out", str(second)]
    r = run(*SMOKE_MAE, *fill)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "--fill_lp: mae seed 0 lp_cls" in r.stdout
    filled = json.loads((second / "results.json").read_text())["rows"][0]
    assert filled["lp_cls"] == pytest.approx(row["lp_cls"])  # same export, seed and recipe
    assert filled["lp_precision"] == row["lp_precision"]
    assert json.loads((second / "rows" / "mae_s0.json").read_text())["lp_cls"] == filled["lp_cls"]
    # the filled row is saved: a second call takes it instead of probing again
    r = quality_here(*SMOKE_MAE[1:], *fill)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "--fill_lp: mae seed 0" not in r.stdout
    assert json.loads((second / "results.json").read_text())["rows"][0] == filled

    r = quality_here(*SMOKE_MAE[1:], "--fill_lp", tmp_path / "nowhere", "--out", tmp_path / "x")
    assert r.returncode == 2 and "--fill_lp: no such folder" in r.stderr
    assert not (tmp_path / "x").exists()  # refused before any work


def test_quality_rejects_a_reuse_file_of_another_budget(tmp_path):
    other = tmp_path / "results.json"
    other.write_text(json.dumps(dict(budget="gpu", rows=[], sweeps=[])))
    r = quality_here("--budget", "smoke", "--reuse", other, "--out", tmp_path / "o")
    assert r.returncode != 0 and "budget 'gpu', not 'smoke'" in r.stderr


def test_data_pipeline_smoke_prints_the_gpu_rate_last(tmp_path):
    out = tmp_path / "pipeline.json"
    r = run(
        "benchmarks/data_pipeline.py",
        "--images",
        "24",
        "--batch_size",
        "4",
        "--input_size",
        "32",
        "--batches",
        "4",
        "--window",
        "2",
        "--warmup",
        "1",
        "--num_workers",
        "1",
        "--step_ms",
        "2",
        "--json",
        str(out),
    )
    assert r.returncode == 0, r.stderr[-3000:]
    last = r.stdout.strip().splitlines()[-1]
    assert last.startswith("gpu_pipeline_img_per_s=") and float(last.split("=")[1]) > 0
    res = json.loads(out.read_text())
    assert set(res["results"]) == {"cpu", "gpu", "gpu:inline", "gpu:read", "gpu:device"}
    for row in res["results"].values():  # the figure is over all timed batches
        assert row["images"] == 16 and len(row["windows"]) == 2
        assert row["img_per_s"] == pytest.approx(row["images"] / row["seconds"])
    assert round(res["results"]["gpu"]["img_per_s"]) == float(last.split("=")[1])
    assert "simulated step: sleep 2 ms" in r.stdout
    assert "| gpu |" in r.stdout and "24 images (synthetic JPEGs" in r.stdout


def test_pos_loss_compares_plain_and_fused_with_equal_losses(tmp_path):
    out = tmp_path / "pos_loss.json"
    r = run(
        "benchmarks/pos_loss.py",
        *("--batch_size", "4", "--labelled", "6", "--embed_dim", "32", "--grid", "5"),
        *("--chunk", "40", "--steps", "2", "--json", str(out)),
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.strip().splitlines()[-1].startswith("fused_vs_plain_ms=")
    rows = json.loads(out.read_text())
    assert [(x["kind"], x["chunk"]) for x in rows] == [
        ("abs", 0),
        ("abs", 40),
        ("rel", 0),
        ("rel", 40),
    ]
    for plain, fused in (rows[:2], rows[2:]):
        assert fused["loss"] == pytest.approx(plain["loss"], rel=1e-5)
        assert plain["ms"] > 0 and fused["ms"] > 0


def test_quality_resume_continues_a_run_from_its_own_checkpoint(tmp_path):
    args = ["benchmarks/quality.py", "--budget", "smoke", "--job", "mae:0", "--resume"]
    r = run(*args, "--out", str(tmp_path))
    assert r.returncode == 0, r.stderr[-3000:]
    first = json.loads((tmp_path / "rows" / "mae_s0.json").read_text())
    r = run(*args, "--out", str(tmp_path))  # a second session: nothing left to train
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resumed from" in r.stdout and "at step 3" in r.stdout
    second = json.loads((tmp_path / "rows" / "mae_s0.json").read_text())
    assert second["pretrain_s"] > first["pretrain_s"]  # seconds add up over sessions
    # a session with other training settings is refused by name: its row would mix two runs
    r = quality_here(*args[1:], "--out", tmp_path, "--epochs", "2")
    assert r.returncode != 0 and "was trained with other settings (epochs: 1, now 2)" in r.stderr
    assert second["probe_cls"] == first["probe_cls"]  # the same weights, read the same way
    # the study itself with --resume: the finished run is taken, not run again
    r = quality_here(*SMOKE_MAE[1:], "--resume", "--out", tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resume: 1 runs already finished" in r.stdout and "resumed from" not in r.stdout
    res = json.loads((tmp_path / "results.json").read_text())
    assert res["rows"] == [second]


@pytest.mark.parametrize("resume", [True, False])
def test_quality_time_limit_lets_a_resumable_run_save_first(tmp_path, monkeypatch, resume):
    # at the deadline a --resume run gets SIGTERM (pretrain.py saves a checkpoint on it) and
    # time to exit; without --resume it is killed outright. A stand-in run records the signal.
    import subprocess as sp

    quality = load_script("quality")
    marker = tmp_path / "saved"
    stand_in = (
        "import signal, sys, time\n"
        f"signal.signal(signal.SIGTERM, lambda *a: (open({str(marker)!r}, 'w').close(), "
        "sys.exit(3)))\n"
        "time.sleep(60)\n"
    )
    real_popen = sp.Popen
    monkeypatch.setattr(
        quality.subprocess,
        "Popen",
        lambda cmd, **kw: real_popen([sys.executable, "-c", stand_in], **kw),
    )
    monkeypatch.setattr(quality, "SAVE_GRACE_S", 20)
    (tmp_path / "rows").mkdir()
    (tmp_path / "logs").mkdir()
    args = quality_args(time_limit=2.0, resume=resume)
    assert quality.run_jobs(args, [("mae", 0)], tmp_path) == ["mae_s0"]  # not finished
    assert marker.exists() == resume
    # the next session's attempt is appended to the job's log, after the first one's
    quality.run_jobs(args, [("mae", 0)], tmp_path)
    log = (tmp_path / "logs" / "mae_s0.log").read_text()
    assert log.count("=== ") == 2 and log.count("--job mae:0") == 2


def test_quality_pairs_rows_of_the_same_seed_and_device_only():
    quality = load_script("quality")
    cpu, gpu = "cpu x2", "NVIDIA H200"
    rows = [
        dict(variant="mae", seed=0, device=cpu, probe_cls=85.0),
        dict(variant="mae", seed=1, device=cpu, probe_cls=84.0),
        dict(variant="apl_drop", seed=0, device=cpu, probe_cls=86.0),
        dict(variant="apl_drop", seed=1, device=cpu, probe_cls=84.5),
        dict(variant="rpl_drop", seed=0, device=gpu, probe_cls=90.0),  # no GPU plain MAE
        dict(variant="mae", seed=2, device=gpu, probe_cls=80.0),
        dict(variant="apl_pe_kept", seed=2, device=gpu, probe_cls=81.5),
        dict(variant="apl_pe_kept", seed=0, device=gpu, probe_cls=99.0),  # CPU MAE only
    ]
    rows.append(dict(variant="apl_no_pe", seed=1, device=cpu, precision="bf16", probe_cls=95.0))
    gains = quality.paired_gains(rows, ["probe_cls"])
    assert gains["apl_drop"] == {"seeds": "2", "probe_cls": "+0.75 ± 0.35 (2/2 up)"}
    assert gains["apl_pe_kept"] == {"seeds": "1", "probe_cls": "+1.50 (1/1 up)"}  # no spread
    assert "rpl_drop" not in gains and "apl_no_pe" not in gains  # bf16 against fp32: not paired
    assert quality.unpaired(rows) == [
        "rpl_drop_s0 (NVIDIA H200, unknown precision)",
        "apl_pe_kept_s0 (NVIDIA H200, unknown precision)",
        "apl_no_pe_s1 (cpu x2, bf16)",
    ]
    # a column some rows lack is averaged over the rows that have it, and says so
    table = quality.aggregate([*rows, dict(variant="mae", seed=3, device=cpu)], ["probe_cls"])
    assert table["mae"] == {"seeds": "4", "probe_cls": "83.00 ± 2.65 (n=3)"}


def test_quality_report_only_merges_a_finished_run_without_running_the_rest(tmp_path):
    # a run finished with --job joins a study's rows; the study's other runs are not started
    row = dict(device="cpu x2", pretrain_s=1.0)
    rows = [dict(row, variant="mae", seed=0, probe_cls=85.0)]
    rows += [dict(row, variant="apl_drop", seed=0, probe_cls=86.0)]
    reuse = tmp_path / "old.json"
    reuse.write_text(json.dumps(dict(budget="smoke", epochs=1, rows=rows, sweeps=[])))
    out = tmp_path / "out"
    (out / "rows").mkdir(parents=True)
    finished = dict(row, variant="apl_pe_kept", seed=0, probe_cls=87.5)
    (out / "rows" / "apl_pe_kept_s0.json").write_text(json.dumps(finished))
    on_gpu = dict(row, variant="rpl_drop", seed=0, probe_cls=90.0, device="NVIDIA H200")
    (out / "rows" / "rpl_drop_s0.json").write_text(json.dumps(on_gpu))  # no GPU MAE to pair
    variants = "mae,apl_drop,apl_pe_kept,rpl_drop"
    study = ["--seeds", "2", "--variants", variants, "--reuse", str(reuse)]
    r = quality_here(*SMOKE_MAE[1:3], *study, "--resume", "--report_only", "--out", str(out))
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads((out / "results.json").read_text())
    assert res["rows"] == rows + [finished, on_gpu]
    assert res["not_run"] == ["mae_s1", "apl_drop_s1", "apl_pe_kept_s1", "rpl_drop_s1"]
    assert "| apl_pe_kept | 1 | +2.50 (1/1 up) |" in r.stdout
    assert "rows from 2 devices (NVIDIA H200, cpu x2;" in r.stdout
    assert "| rpl_drop | 1 | +" not in r.stdout  # listed with its mean, never paired
    assert "left out of the gains): rpl_drop_s0 (NVIDIA H200, unknown precision)" in r.stdout
    # without --resume the rows under --out are not the study's: none is merged (before
    # session 19 they were, while also listed as not run)
    r = quality_here(*SMOKE_MAE[1:3], *study, "--report_only", "--out", str(out))
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads((out / "results.json").read_text())["rows"] == rows
    # --resume takes a finished row only of the same budget and epochs (rows record them)
    (out / "rows" / "apl_pe_kept_s0.json").write_text(
        json.dumps(dict(finished, budget="smoke", epochs=3))
    )
    r = quality_here(*SMOKE_MAE[1:3], *study, "--resume", "--report_only", "--out", str(out))
    assert r.returncode != 0
    assert (
        "apl_pe_kept_s0.json is a row of budget 'smoke' at 3 epochs, not 'smoke' at 1" in r.stderr
    )
    assert not list((out / "logs").glob("*")) and "resumed from" not in r.stdout
    r = quality_here(*SMOKE_MAE[1:], "--report_only", "--job", "mae:0", "--out", out)
    assert r.returncode != 0 and "--report_only runs nothing" in r.stderr


def test_quality_rows_are_replaced_whole(tmp_path, monkeypatch):
    """A study's rows span sessions: a write that fails half-way leaves the earlier row."""

    quality = load_script("quality")
    row = tmp_path / "mae_s0.json"
    quality.write_text_atomic(row, json.dumps({"probe_cls": 85.5}))
    real_write = Path.write_text

    def half_then_full_disk(self, text, *a, **k):
        real_write(self, text[: len(text) // 2], *a, **k)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Path, "write_text", half_then_full_disk)
    with pytest.raises(OSError, match="No space left"):
        quality.write_text_atomic(row, json.dumps({"probe_cls": 86.0, "lp_cls": 78.1}))
    monkeypatch.undo()
    assert json.loads(row.read_text()) == {"probe_cls": 85.5}


def test_quality_sweeps_run_every_seed_with_its_centre_point(tmp_path):
    quality = load_script("quality")
    args = quality_args(seeds=1, variants=["mae"], sweeps=True, sweep_seeds=2)
    jobs = quality.job_list(args)
    sweeps = list(quality.SWEEPS)
    # the variants, then each sweep seed's centre (apl_drop), then the sweeps seed-major
    assert jobs == [("mae", 0), ("apl_drop", 0), ("apl_drop", 1)] + [
        (name, s) for s in (0, 1) for name in sweeps
    ]
    # a centre point the study runs anyway is not run twice
    args = quality_args(seeds=2, variants=["mae", "apl_drop"], sweeps=True, sweep_seeds=2)
    assert quality.job_list(args)[:5] == [
        ("mae", 0),
        ("apl_drop", 0),
        ("mae", 1),
        ("apl_drop", 1),
        (sweeps[0], 0),
    ]
    r = quality_here(*SMOKE_MAE[1:], "--sweep_seeds", "2", "--out", tmp_path / "o")
    assert r.returncode == 2 and "--sweep_seeds must be >= 1, and goes with --sweeps" in r.stderr
    assert not (tmp_path / "o").exists()


def test_quality_sweep_table_and_plots_average_each_point_over_its_seeds(tmp_path):
    quality = load_script("quality")
    rows = []
    for seed, shift in ((0, 0.0), (1, 2.0)):
        base = dict(seed=seed, probe_cls=70.0 + shift, probe_avg=71.0, knn_cls=60.0, knn_avg=61.0)
        rows.append(dict(base, variant="apl_drop", pos_loss=3.0, pos_acc=0.1))
        acc = 0.07 + shift / 1000  # an sd of 0.0014: three decimals, not e-notation
        rows.append(dict(base, variant="lambda_0.1", pos_weight=0.1, pos_loss=3.4, pos_acc=acc))
        rows.append(dict(base, variant="mask_0.9", mask_ratio=0.9, pos_loss=3.6, pos_acc=0.05))
    lines = quality.sweep_table(rows)
    # the centre point (apl_drop: lambda 0.5, mask 0.75) sits in both sweeps; sd = |a - b| / sqrt 2
    assert "| λ 0.1 | 2 | 71.00 ± 1.41 | 71.00 ± 0.00 | 60.00 ± 0.00 | 61.00 ± 0.00 | 3.40" in (
        "\n".join(lines)
    )
    assert "| 3.400 ± 0.000 | 0.071 ± 0.001 |" in lines[4]
    assert [line.split(" |")[0] for line in lines[4:]] == [
        "| λ 0.1",
        "| λ 0.5",
        "| mask 0.75",
        "| mask 0.9",
    ]
    pytest.importorskip("matplotlib")
    quality.plot_sweeps(rows, tmp_path)
    for name in ("lambda_sweep.png", "mask_sweep.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_quality_table_has_no_position_columns_for_plain_mae():
    quality = load_script("quality")
    rows = [  # older code stored 0.0 for MAE's position loss
        dict(variant="mae", seed=0, pos_label="none", pos_loss=0.0, probe_cls=75.0),
        dict(variant="apl_drop", seed=0, pos_label="abs", pos_loss=3.37, probe_cls=77.0),
    ]
    table = quality.aggregate(rows, ["probe_cls", "pos_loss"])
    assert "pos_loss" not in table["mae"] and table["mae"]["probe_cls"] == "75.00"
    assert table["apl_drop"]["pos_loss"] == "3.37"  # one seed: the value, no ± 0.00


def test_quality_tables_keep_a_collapsed_position_loss_visible():
    quality = load_script("quality")
    rows = [
        dict(variant="apl_pe_kept", seed=s, pos_label="abs", pos_loss=v, probe_cls=85.0 + s)
        for s, v in ((0, 0.00021), (1, 0.00017))
    ]
    table = quality.aggregate(rows, ["probe_cls", "pos_loss"])
    assert table["apl_pe_kept"]["pos_loss"] == "1.9e-04 ± 2.8e-05"  # not "0.00 ± 0.00"
    assert table["apl_pe_kept"]["probe_cls"] == "85.50 ± 0.71"


def test_jpeg_decoders_compares_luma_and_chroma_of_the_decoders():
    """Without djpeg or a GPU nothing is compared and it says so; with djpeg, repeated chroma
    changes chroma far more than luma (luma is stored at full resolution), and far more on
    random-pixel JPEGs (``--pattern noise``) than on photo-like ones."""
    r = run("benchmarks/jpeg_decoders.py", "--images", "3", "--size", "48", "64")
    assert r.returncode == 0, r.stderr[-3000:]
    last = r.stdout.strip().splitlines()[-1]
    assert last.startswith("rgb_mean_steps=")
    repeat, cuda = (float(v) for v in last.split("=")[1].split(","))
    assert math.isnan(cuda) == (not torch.cuda.is_available())
    if shutil.which("djpeg") is None:
        assert math.isnan(repeat) and "repeat: skipped (no djpeg" in r.stdout
        pytest.skip("djpeg (libjpeg-turbo-progs) not installed: decoders not compared")
    (line,) = [s for s in r.stdout.splitlines() if s.startswith("repeat vs cpu, decoded")]
    luma, chroma = (float(line.split(k)[1].split()[0]) for k in ("luma", "chroma"))
    assert 0 < repeat and luma < chroma / 2
    # random pixels: every chroma sample differs from its neighbours, the upsampler's worst case
    r = run(
        "benchmarks/jpeg_decoders.py", "--images", "3", "--size", "48", "64", "--pattern", "noise"
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert "3 noise JPEGs" in r.stdout
    noise = float(r.stdout.strip().splitlines()[-1].split("=")[1].split(",")[0])
    assert noise > 5 * repeat, (noise, repeat)


def test_checkpoint_stall_prints_both_stalls(tmp_path):
    r = run(
        "benchmarks/checkpoint_stall.py",
        "--model",
        "mae_vit_micro_patch4_28",
        "--saves",
        "2",
        "--dir",
        str(tmp_path),
    )
    assert r.returncode == 0, r.stderr[-3000:]
    sync, asyn = (float(v) for v in r.stdout.strip().splitlines()[-1].split("=")[1].split(","))
    assert sync > 0 and asyn > 0
    assert "written after" in r.stdout
    (line,) = [s for s in r.stdout.splitlines() if s.startswith("snapshot_s=")]
    assert all(float(v) > 0 for v in line.split("=")[1].split(","))
    for mode in ("sync", "async"):  # keep_last 1: the second save, complete
        assert [p.name for p in (tmp_path / mode / "checkpoints").iterdir()] == ["step_00000002"]
        assert (tmp_path / mode / "checkpoints" / "step_00000002" / "COMPLETE").is_file()
    only = run(
        "benchmarks/checkpoint_stall.py",
        *("--model", "mae_vit_micro_patch4_28", "--saves", "1", "--snapshot_only"),
        *("--dir", str(tmp_path / "only")),
    )
    assert only.returncode == 0, only.stderr[-3000:]
    assert only.stdout.strip().splitlines()[-1].startswith("snapshot_s=")
    assert not (tmp_path / "only").exists()  # nothing written


def test_quality_epochs_reach_every_run_and_reuse_checks_them(tmp_path):
    out = tmp_path / "long"
    args = ["--budget", "smoke", "--seeds", "1", "--variants", "mae,apl_no_pe", "--epochs", "2"]
    r = quality_here(*args, "--parallel", "2", "--out", out)  # its runs: subprocesses
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads((out / "results.json").read_text())["epochs"] == 2
    for name in ("mae_s0", "apl_no_pe_s0"):  # the subprocesses got it too
        assert "\nepochs: 2\n" in (out / name / "config.yaml").read_text()
    r = quality_here(*SMOKE_MAE[1:], "--reuse", out / "results.json", "--out", tmp_path / "o")
    assert r.returncode != 0 and "2 pretraining epochs, not 1" in r.stderr
    r = quality_here(*SMOKE_MAE[1:], "--reuse", tmp_path / "none.json", "--out", tmp_path / "o")
    assert r.returncode != 0 and "none.json: no such file" in r.stderr
    assert "Traceback" not in r.stderr


def test_gpu_crops_times_both_resizes_and_they_agree(tmp_path):
    out = tmp_path / "crops.json"
    r = run(
        "benchmarks/gpu_crops.py",
        *("--device", "cpu", "--batch_size", "6", "--batches", "2", "--warmup", "1"),
        *("--min_px", "40", "--max_px", "90", "--size", "32", "--json", str(out)),
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.strip().splitlines()[-1].startswith("batched_vs_per_image_wall=")
    res = json.loads(out.read_text())
    names = ["per_image", "batched", "decode", "augment_per_image", "augment_batched"]
    assert [x["name"] for x in res["results"]] == names
    assert all(x["wall_ms"] > 0 and x["host_ms"] > 0 for x in res["results"])
    assert res["max_diff"] < 0.02  # steps of 255, before rounding


def test_quality_refcpu_budget_probes_on_another_test_set(tmp_path, monkeypatch):
    """The refcpu budget (the reference's CPU-sized run) trains its probes on the 10,000-image
    sample and tests them on the full Fashion-MNIST test split; without that split it stops
    before any pretraining, naming --data_path."""
    out = tmp_path / "out"
    args = ("--budget", "refcpu", "--data_path", str(tmp_path), "--out", str(out))
    r = quality_here(*args)
    assert r.returncode == 2 and "--data_path" in r.stderr and "fashion-mnist" in r.stderr
    assert not out.exists()  # stopped before it made its output folder

    import timm

    from maepl.fmnist import ArrayImageDataset

    quality = load_script("quality")
    assert quality.BUDGETS["refcpu"]["test_dataset"] == "fashion-mnist"
    # the gpu budget's model, batch and recipe, on 10,000 images for 190 steps, float32, eager
    gpu, ref = quality.BUDGETS["gpu"]["pre"], quality.BUDGETS["refcpu"]["pre"]
    changed = {k for k in gpu.keys() | ref.keys() if gpu.get(k) != ref.get(k)}
    assert changed == {"dataset", "epochs", "num_workers", "compile", "mixed_precision"}
    assert (ref["dataset"], ref["epochs"], ref["compile"]) == ("sample", 10, False)
    calls = []

    def fake_dataset(name, data_path, train):
        calls.append((name, train))
        n = 24 if train else 12  # sizes tell the splits apart in the result
        gen = torch.Generator().manual_seed(len(calls))
        images = torch.randint(0, 256, (n, 28, 28), generator=gen, dtype=torch.uint8)
        return ArrayImageDataset(images, torch.arange(n) % 3)

    encoder = timm.create_model(
        "vit_tiny_patch16_224",
        img_size=28,
        patch_size=4,
        in_chans=1,
        embed_dim=24,
        depth=1,
        num_heads=2,
        num_classes=0,
    )
    encoder.pretrained_cfg = dict(input_size=(1, 28, 28), mean=(0.5,), std=(0.5,))
    monkeypatch.setattr(quality, "build_dataset", fake_dataset)
    monkeypatch.setattr(timm, "create_model", lambda *a, **k: encoder)
    out = quality.evaluate_export(tmp_path, "sample", None, 2, "cpu", "fashion-mnist")
    assert calls == [("sample", True), ("fashion-mnist", False)]
    assert sorted(out) == ["knn_avg", "knn_cls", "probe_avg", "probe_cls"]
    # accuracies over the 12 test images: multiples of 100 / 12
    for v in out.values():
        assert abs(v * 12 / 100 - round(v * 12 / 100)) < 1e-6


def test_eval_encoder_tests_on_another_dataset_and_checks_it_first(tmp_path, tiny_cfg):
    """eval_encoder.py --test_dataset: probes trained on one dataset's training split, tested on
    another's test split; a missing one is named before any feature is extracted."""
    import pretrain

    from .test_data import tiny_fmnist

    pretrain.main(tiny_cfg(max_steps=1, epochs=1))
    encoder = tmp_path / "run" / "export" / "encoder"
    tiny_fmnist(tmp_path / "fm", n=30)
    out = tmp_path / "eval.json"
    args = ("benchmarks/eval_encoder.py", str(encoder), "--probe_epochs", "1", "--num_workers")
    r = run(*args, "0", "--dataset", "fashion-mnist", "--data_path", str(tmp_path / "fm"),
            "--test_dataset", "sample", "--json", str(out))  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(out.read_text())
    assert (res["dataset"], res["test_dataset"]) == ("fashion-mnist", "sample")
    assert (res["train"], res["test"]) == (30, 2000)  # the tiny idx folder's 30, the sample's 2000
    for k in ("probe_cls", "probe_avg", "knn_cls", "knn_avg"):
        assert 0 <= res[k] <= 100
    (tmp_path / "empty").mkdir()
    r = run(*args, "0", "--test_dataset", "fashion-mnist", "--dataset", "sample",
            "--data_path", str(tmp_path / "empty"))  # fmt: skip
    assert r.returncode != 0 and "--data_path" in r.stderr and "not found" in r.stderr
    assert "linear probe" not in r.stdout


def test_quality_evaluation_stages_survive_a_stopped_session(tmp_path, monkeypatch, capsys):
    # the gpu budget's evaluation takes an hour on a CPU: with --resume a stage done is kept (for
    # the export and settings it read), a stage stopped by a signal exits asking for --resume and
    # continues its own checkpoint next time. The pretraining is real (smoke); the stages are
    # stand-ins.
    import time

    from maepl.config import ConfigError

    quality = load_script("quality")
    monkeypatch.setitem(quality.BUDGETS, "smoke", dict(quality.BUDGETS["smoke"], ft_epochs=1))
    probed, lp_cfgs, ft_cfgs = [], [], []
    probes = dict(probe_cls=70.0, probe_avg=71.0, knn_cls=60.0, knn_avg=61.0)
    monkeypatch.setattr(quality, "evaluate_export", lambda *a: probed.append(a) or probes)
    lp_answers = [dict(stopped_by_signal=True, step=7), dict(top1=55.5)]

    def linprobe_main(cfg):
        lp_cfgs.append(cfg)
        time.sleep(0.2)  # each attempt's time is added to the stage's
        answer = lp_answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer

    monkeypatch.setattr(quality.linprobe, "main", linprobe_main)
    monkeypatch.setattr(quality.finetune, "main", lambda c: ft_cfgs.append(c) or dict(top1=44.4))
    # a --data_path (the refcpu budget's test set) reaches no run on the sample: its scripts
    # would refuse one there rather than ignore it
    args = quality_args(resume=True, data_path=str(tmp_path / "test_set"))
    stages_file = tmp_path / "mae_s0" / "eval_stages.json"

    def run_one(a=args):
        return quality.run_one("mae", quality.JOBS["mae"], 0, a, tmp_path)

    with pytest.raises(
        SystemExit, match=r"linprobe.py in .*stopped at step 7; rerun with --resume"
    ):
        run_one()
    kept = json.loads(stages_file.read_text())
    assert kept["done"] == {"probes": probes} and kept["started"] == ["probes", "linprobe"]
    assert kept["key"]["precision"] == ("bf16" if torch.cuda.is_available() else "no")
    assert (lp_cfgs[0].resume, lp_cfgs[0].overwrite) == ("", True)  # a first attempt: fresh
    assert kept["seconds"]["linprobe"] >= 0.2  # the stopped attempt's time is recorded

    row = run_one()  # the next session
    assert len(probed) == 1  # kept, not probed again
    assert (lp_cfgs[1].resume, lp_cfgs[1].overwrite) == ("auto", False)  # continues its own
    assert (ft_cfgs[0].resume, ft_cfgs[0].overwrite) == ("", True)
    assert row["probe_cls"] == 70.0 and row["lp_cls"] == 55.5 and row["finetune_top1"] == 44.4
    assert lp_cfgs[0].data_path is None and ft_cfgs[0].data_path is None
    seconds = json.loads(stages_file.read_text())["seconds"]  # both sessions' stages
    assert set(seconds) == {"probes", "linprobe", "finetune"}
    assert seconds["linprobe"] >= 0.4  # the two attempts added up
    assert row["eval_s"] == pytest.approx(sum(seconds.values()), abs=0.2)

    again = run_one()  # all kept
    assert (len(probed), len(lp_cfgs), len(ft_cfgs)) == (1, 2, 1)
    assert {k: again[k] for k in probes} == probes and again["lp_cls"] == 55.5

    # results for another export are not taken: here the record names other weights
    kept = json.loads(stages_file.read_text())
    kept["key"]["export_sha256"] = "0" * 64
    stages_file.write_text(json.dumps(kept))
    lp_answers.append(dict(top1=56.0))
    row = run_one()
    assert (len(probed), len(lp_cfgs), len(ft_cfgs)) == (2, 3, 2)
    assert (lp_cfgs[2].resume, lp_cfgs[2].overwrite) == ("", True) and row["lp_cls"] == 56.0
    assert "another export or other settings; evaluating anew" in capsys.readouterr().out
    # ... nor for another evaluation recipe (a budget edited between sessions)
    monkeypatch.setitem(quality.BUDGETS, "smoke", dict(quality.BUDGETS["smoke"], probe_epochs=3))
    lp_answers.append(dict(top1=56.5))
    assert run_one()["lp_cls"] == 56.5 and len(probed) == 3

    # a stage whose checkpoint cannot be resumed (its folder moved, say) starts over
    kept = json.loads(stages_file.read_text())
    stages_file.write_text(json.dumps(dict(kept, done={"probes": probes}, started=kept["started"])))
    lp_answers += [ConfigError("finetune: the checkpoint names another path"), dict(top1=58.0)]
    row = run_one()
    assert [c.resume for c in lp_cfgs[-2:]] == ["auto", ""] and row["lp_cls"] == 58.0
    assert (
        "note: linprobe: cannot resume (finetune: the checkpoint names" in capsys.readouterr().out
    )

    # without --resume nothing kept is read
    lp_answers.append(dict(top1=57.0))
    row = run_one(quality_args(resume=False))
    assert len(probed) == 4 and row["lp_cls"] == 57.0


def _session_archive(out) -> dict[str, bytes]:
    import tarfile

    with tarfile.open(out / "outputs.tar.gz") as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers() if m.isfile()}


def test_the_device_session_packs_its_outputs_into_one_archive(tmp_path):
    """A device call brings back at most 8 files: h100_session.sh leaves in $OUT only the
    caller's session.log and one archive of what its sections wrote."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "session.log").write_text("partial")  # the caller's tee
    tmp = tmp_path / "tmp"  # the work folder goes in $TMPDIR: no other run's is seen here
    tmp.mkdir()
    env = dict(
        os.environ, SECTIONS="selftest,no_such_section,selftest", OUT=str(out), TMPDIR=str(tmp)
    )
    run = subprocess.run(
        ["bash", "benchmarks/h100_session.sh"], cwd=ROOT, env=env, capture_output=True, text=True
    )
    assert run.returncode == 0, run.stderr
    missing = [ln for ln in run.stderr.splitlines() if "not found" in ln or "invalid" in ln]
    assert all("nvidia-smi" in ln for ln in missing), run.stderr  # the script's own helpers run
    assert "unknown section 'no_such_section'" in run.stdout
    assert sorted(p.name for p in out.iterdir()) == ["outputs.tar.gz", "session.log"]
    files = _session_archive(out)
    assert sorted(files) == ["./selftest_1.txt", "./selftest_2.txt"], files
    assert (out / "session.log").read_text() == "partial"
    assert not list(tmp.glob("maepl_work.*"))  # its work folder removed


def test_a_device_session_killed_mid_section_keeps_the_sections_before(tmp_path):
    """The device tool kills a command past its limit with its whole process group: the
    archive, rebuilt after each section, still holds what the finished sections wrote."""
    import signal
    import time

    out = tmp_path / "out"
    tmp = tmp_path / "tmp"  # the work folder, left behind by the kill, goes with tmp_path
    tmp.mkdir()
    env = dict(
        os.environ, SECTIONS="selftest,selftest", SELFTEST_SLEEP="5", OUT=str(out), TMPDIR=str(tmp)
    )
    proc = subprocess.Popen(
        ["bash", "benchmarks/h100_session.sh"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 120
        while not (out / "outputs.tar.gz").exists() and time.monotonic() < deadline:
            time.sleep(0.5)  # the first section ends after its 5 s pause, then is packed
        time.sleep(1)  # the second section has started: its file exists, unpacked
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    files = _session_archive(out)
    assert list(files) == ["./selftest_1.txt"], files  # not the second section's
