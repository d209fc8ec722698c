"""The promises of docs/reliability.md, one test (or more) each."""

import dataclasses
import json
import multiprocessing
import os
import pickle
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import maepl.loaders
import maepl.loop
import pretrain
from maepl.checkpoint import complete_checkpoints, resolve_resume, step_of
from maepl.config import ConfigError, PretrainConfig, parse_config
from maepl.data import build_dataset, build_transform
from maepl.export import export_encoder
from maepl.guard import StopFlag, ignore_stop_signals
from maepl.loaders import BadImageError, SeededTransformDataset, collate_skip_bad
from maepl.metrics import LogWindow

from .conftest import ROOT, torchrun

TINY = [
    "--model",
    "mae_vit_micro_patch4_28",
    "--dataset",
    "sample",
    "--embed_dim",
    "24",
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
    "--warmup_epochs",
    "0.5",
    "--blr",
    "1e-3",
]


def tensors_equal(a: Path, b: Path) -> None:
    x, y = load_file(a), load_file(b)
    assert x.keys() == y.keys(), a
    for k in x:
        assert torch.equal(x[k], y[k]), f"{a.name}: {k}"


def scalar_rows(out: Path) -> list[dict]:
    rows = [json.loads(r) for r in (out / "log.jsonl").read_text().splitlines()]
    return [r for r in rows if "event" not in r]


# ---------------------------------------------------------------------------- 1. exact resume
class StopAtMicroStep(StopFlag):
    """Acts as if a signal arrived during micro-step ``k`` (1-based) of this process."""

    k = 0

    def __init__(self, install=True):
        super().__init__(install=False)
        self.calls = 0

    def agreed(self) -> bool:
        self.calls += 1
        return self.calls == self.k


def resume_cfg(out: Path, **kw) -> PretrainConfig:
    # 10,000 images / batch 128 = 78 micro-batches = 39 optimizer steps per epoch
    base = dict(
        batch_size=128,
        accum_iter=2,
        epochs=3,
        max_steps=45,
        num_workers=0,
        log_every=5,
        output_dir=str(out),
    )
    base.update(kw)
    args = list(TINY)
    for k, v in base.items():
        args += [f"--{k}", str(v)]
    return parse_config(PretrainConfig, args)


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ref") / "run"
    pretrain.main(resume_cfg(out))
    return out


@pytest.mark.parametrize(
    "stop_micro, where", [(78, "epoch boundary"), (50, "mid-epoch"), (51, "mid-accumulation")]
)
def test_exact_resume(reference_run, monkeypatch, tmp_path, stop_micro, where):
    ref, cut = reference_run, tmp_path / "cut"
    StopAtMicroStep.k = stop_micro
    monkeypatch.setattr(maepl.loop, "StopFlag", StopAtMicroStep)
    first = pretrain.main(resume_cfg(cut))
    assert first["stopped_by_signal"] and first["step"] == stop_micro // 2
    ckpt = complete_checkpoints(cut)[-1]
    state = json.loads((ckpt / "state.json").read_text())
    # 78 micro-batches an epoch: every stop lies in epoch 0, the boundary one after its last batch
    assert (state["epoch"], state["batch_in_epoch"]) == (0, stop_micro)
    assert (ckpt / "grads_rank0.safetensors").exists() == (where == "mid-accumulation")
    monkeypatch.undo()
    # a new run with another worker count: data order and augmentations must not depend on it
    pretrain.main(resume_cfg(cut, resume="auto", num_workers=2))
    final = "step_00000045"
    for f in ("model.safetensors", "optimizer.safetensors"):
        tensors_equal(ref / "checkpoints" / final / f, cut / "checkpoints" / final / f)
    a = json.loads((ref / "checkpoints" / final / "state.json").read_text())
    b = json.loads((cut / "checkpoints" / final / "state.json").read_text())
    for key in ("step", "epoch", "batch_in_epoch"):
        assert a[key] == b[key]
    assert a["optimizer"]["param_groups"] == b["optimizer"]["param_groups"]  # lr included
    for f in ("encoder/model.safetensors", "mae.safetensors"):
        tensors_equal(ref / "export" / f, cut / "export" / f)
    # the log is one increasing history
    steps = [r["step"] for r in scalar_rows(cut)]
    assert steps == sorted(set(steps)) and steps[-1] == 45


@pytest.mark.parametrize(
    "data, stop_micro",
    [("sample", 7), ("jpeg folder with bad files", 7)],  # both mid-accumulation
)
@pytest.mark.filterwarnings("ignore:The image decoding:DeprecationWarning")  # torchvision 0.29
def test_exact_resume_with_the_gpu_pipeline(monkeypatch, tmp_path, data, stop_micro):
    """--data_pipeline gpu: crops and flips are drawn per (seed, rank, epoch, micro-batch)."""
    if data == "sample":  # one epoch of 312 micro-batches: stop mid-epoch
        kw = dict(batch_size=32, accum_iter=2, epochs=1, max_steps=6)
    else:  # 12 files (2 unreadable), 4 micro-batches = 2 steps per epoch: stop in epoch 1
        make_messy_folder(tmp_path / "data")
        kw = dict(
            dataset="imagefolder",
            data_path=tmp_path / "data",
            input_size=16,
            batch_size=3,
            accum_iter=2,
            epochs=4,
            max_steps=7,
        )
    kw.update(data_pipeline="gpu", log_every=2)
    ref, cut = tmp_path / "ref", tmp_path / "cut"
    pretrain.main(resume_cfg(ref, **kw))
    StopAtMicroStep.k = stop_micro
    monkeypatch.setattr(maepl.loop, "StopFlag", StopAtMicroStep)
    assert pretrain.main(resume_cfg(cut, **kw))["stopped_by_signal"]
    monkeypatch.undo()
    summary = pretrain.main(resume_cfg(cut, resume="auto", num_workers=2, **kw))
    final = f"step_{kw['max_steps']:08d}"
    for f in ("model.safetensors", "optimizer.safetensors"):
        tensors_equal(ref / "checkpoints" / final / f, cut / "checkpoints" / final / f)
    for f in ("encoder/model.safetensors", "mae.safetensors"):
        tensors_equal(ref / "export" / f, cut / "export" / f)
    if data != "sample":  # unreadable files counted across the resume as without it
        ref_summary = json.loads((ref / "summary.json").read_text())
        assert summary["bad_images"] == ref_summary["bad_images"] > 0


# ---------------------------------------------------------------------------- 2. atomic saves
KILL_DURING_SAVE = """
import os, signal, sys
sys.path.insert(0, {root!r})
import maepl.checkpoint as ck, pretrain
from maepl.config import PretrainConfig, parse_config
real = ck.save_file
def save_then_die(tensors, path, *a, **k):
    real(tensors, path, *a, **k)
    if "step_00000004" in str(path) and str(path).endswith("optimizer.safetensors"):
        os.kill(os.getpid(), signal.SIGKILL)
ck.save_file = save_then_die
pretrain.main(parse_config(PretrainConfig, sys.argv[1:]))
"""


def test_sigkill_during_a_save_leaves_the_previous_checkpoint(tmp_path):
    out = tmp_path / "run"
    args = TINY + [
        "--batch_size",
        "16",
        "--max_steps",
        "6",
        "--save_every_steps",
        "2",
        "--num_workers",
        "0",
        "--output_dir",
        str(out),
    ]
    code = KILL_DURING_SAVE.format(root=ROOT)
    r = subprocess.run(
        [sys.executable, "-c", code, *args], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert r.returncode == -signal.SIGKILL, r.stderr[-2000:]
    ckroot = out / "checkpoints"
    assert (ckroot / ".tmp_step_00000004").is_dir()  # the half-written save
    assert not (ckroot / "step_00000004").exists()
    assert resolve_resume("auto", out) == ckroot / "step_00000002"
    load_file(ckroot / "step_00000002" / "model.safetensors")  # loadable
    # an incomplete folder under the final name is skipped too
    (ckroot / "step_00000005").mkdir()
    assert resolve_resume("auto", out) == ckroot / "step_00000002"
    cfg = parse_config(PretrainConfig, args + ["--resume", "auto", "--keep_last", "1"])
    summary = pretrain.main(cfg)
    assert summary["step"] == 6
    assert [p.name for p in complete_checkpoints(out)] == ["step_00000006"]  # pruned


def test_a_run_after_one_that_raised_mid_write_waits_for_that_write(tmp_path, monkeypatch, capsys):
    """A run that raises while --async_save writes (in a notebook, say) leaves the write to
    finish in the background; the next run in the process joins it before it looks at, resumes
    or --overwrites the folder, so no half-written checkpoint of the first lands in the second."""
    import maepl.checkpoint as ck

    real_save, real_end_micro, real_check = ck.save_file, maepl.loop.Run.end_micro, None

    def slow_save(tensors, path, *args, **kwargs):
        if Path(path).name == "model.safetensors":
            time.sleep(2)
        real_save(tensors, path, *args, **kwargs)

    def failing_end_micro(self, metrics):
        real_end_micro(self, metrics)
        if self.step == 3:  # step 2's checkpoint is being written
            raise RuntimeError("planted")

    writes_alive = []

    def watched_check(cfg):
        writes_alive.append([t for t in threading.enumerate() if t.name == "maepl-checkpoint"])
        real_check(cfg)

    real_check = maepl.loop.check_run_dir
    monkeypatch.setattr(ck, "save_file", slow_save)
    monkeypatch.setattr(maepl.loop.Run, "end_micro", failing_end_micro)
    out = tmp_path / "run"
    args = [*TINY, "--batch_size", "16", "--max_steps", "6", "--save_every_steps", "2"]
    args += ["--num_workers", "0", "--output_dir", str(out)]
    with pytest.raises(RuntimeError, match="planted"):
        pretrain.main(parse_config(PretrainConfig, args))
    assert [t.name for t in threading.enumerate()].count("maepl-checkpoint") == 1  # still writing
    monkeypatch.setattr(maepl.loop.Run, "end_micro", real_end_micro)
    monkeypatch.setattr(maepl.loop, "check_run_dir", watched_check)
    args[args.index("--max_steps") + 1] = "1"
    capsys.readouterr()
    pretrain.main(parse_config(PretrainConfig, [*args, "--overwrite"]))
    assert writes_alive == [[]]  # joined before the second run checked the folder
    assert "waiting for an earlier run's checkpoint write" in capsys.readouterr().out
    assert [p.name for p in complete_checkpoints(out)] == ["step_00000001"]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_00000001"]


@pytest.mark.parametrize("async_save", [True, False])
def test_async_save_lets_training_go_on_and_the_run_ends_complete(
    tmp_path, monkeypatch, async_save
):
    """With --async_save (default) save_checkpoint returns before the main files are written
    (slowed here by 0.3 s each); the run still ends with every checkpoint complete and equal to
    a synchronous run's. Without it, a checkpoint is complete when the call returns."""
    import maepl.checkpoint as ck

    real_save, real_checkpoint = ck.save_file, maepl.loop.save_checkpoint
    complete_on_return = []

    def slow_save(tensors, path, *args, **kwargs):
        if Path(path).name in ("model.safetensors", "optimizer.safetensors"):
            time.sleep(0.3)
        real_save(tensors, path, *args, **kwargs)

    def watched(*args, **kwargs):
        final = real_checkpoint(*args, **kwargs)
        complete_on_return.append((final / "COMPLETE").is_file())
        return final

    monkeypatch.setattr(ck, "save_file", slow_save)
    monkeypatch.setattr(maepl.loop, "save_checkpoint", watched)
    args = [*TINY, "--batch_size", "16", "--max_steps", "6", "--save_every_steps", "2"]
    args += ["--num_workers", "0", "--keep_last", "0", "--output_dir", str(tmp_path / "a")]
    pretrain.main(parse_config(PretrainConfig, args + ["--async_save", str(async_save)]))
    assert complete_on_return == [not async_save] * 3  # steps 2, 4, 6
    names = [p.name for p in complete_checkpoints(tmp_path / "a")]
    assert names == ["step_00000002", "step_00000004", "step_00000006"]
    if async_save:  # the same files as a synchronous run's
        monkeypatch.setattr(ck, "save_file", real_save)
        args[-1] = str(tmp_path / "b")
        pretrain.main(parse_config(PretrainConfig, args + ["--async_save", "false"]))
        for name in names:
            for f in ("model.safetensors", "optimizer.safetensors"):
                tensors_equal(
                    tmp_path / "a" / "checkpoints" / name / f,
                    tmp_path / "b" / "checkpoints" / name / f,
                )


def test_a_failed_background_write_stops_the_run_and_names_the_checkpoint(tmp_path, monkeypatch):
    import maepl.checkpoint as ck

    real_save = ck.save_file

    def disk_full(tensors, path, *args, **kwargs):
        if "step_00000004" in str(path) and Path(path).name == "model.safetensors":
            raise OSError(28, "No space left on device")  # in the background writer
        real_save(tensors, path, *args, **kwargs)

    monkeypatch.setattr(ck, "save_file", disk_full)
    out = tmp_path / "run"
    args = [*TINY, "--batch_size", "16", "--max_steps", "8", "--save_every_steps", "2"]
    args += ["--num_workers", "0", "--output_dir", str(out)]
    with pytest.raises(ck.CheckpointError, match=r"step_00000004 was not written.*No space left"):
        pretrain.main(parse_config(PretrainConfig, args))
    # raised at the next log line or save, before step 6's: step 2 stays the newest complete
    assert resolve_resume("auto", out) == out / "checkpoints" / "step_00000002"
    load_file(out / "checkpoints" / "step_00000002" / "model.safetensors")
    assert not (out / "checkpoints" / "step_00000006").exists()


def saved_steps(monkeypatch) -> list[int]:
    """The steps of the checkpoints the loop saves, in order."""
    real, steps = maepl.loop.save_checkpoint, []

    def recorded(accelerator, output_dir, step, *args, **kwargs):
        steps.append(step)
        return real(accelerator, output_dir, step, *args, **kwargs)

    monkeypatch.setattr(maepl.loop, "save_checkpoint", recorded)
    return steps


def test_a_stop_at_a_step_just_saved_does_not_save_it_again(tmp_path, monkeypatch):
    """A signal acted on at the step that --save_every_steps has just saved: that checkpoint
    is the stop's checkpoint; writing it again would only put it at risk."""
    steps = saved_steps(monkeypatch)
    StopAtMicroStep.k = 4  # accumulation 1: the end of step 4, saved every 2 steps
    monkeypatch.setattr(maepl.loop, "StopFlag", StopAtMicroStep)
    args = [*TINY, "--batch_size", "16", "--max_steps", "10", "--save_every_steps", "2"]
    args += ["--num_workers", "0", "--output_dir", str(tmp_path / "run")]
    summary = pretrain.main(parse_config(PretrainConfig, args))
    assert summary["stopped_by_signal"] and summary["step"] == 4
    assert steps == [2, 4]
    assert resolve_resume("auto", tmp_path / "run").name == "step_00000004"


def test_saving_a_step_again_replaces_its_checkpoint_only_once_the_new_one_is_in_place(
    tmp_path, monkeypatch
):
    """Stopped mid-accumulation right after a periodic save: the same step is saved again (now
    with the partial gradients). With --keep_last 1 the earlier save of that step is the only
    complete checkpoint: it is moved aside and deleted only after its replacement is complete,
    and a process killed between the two renames still finds it."""
    out = tmp_path / "run"
    early_deletes = []
    real_rmtree = shutil.rmtree

    def checked_rmtree(path, *args, **kwargs):
        path = Path(path)
        if (path / "COMPLETE").is_file():  # allowed only with a complete successor in place
            others = [p for p in complete_checkpoints(out) if p != path]
            if not any(step_of(p) >= step_of(path) for p in others):
                early_deletes.append(path.name)
        real_rmtree(path, *args, **kwargs)

    steps = saved_steps(monkeypatch)
    monkeypatch.setattr(shutil, "rmtree", checked_rmtree)
    StopAtMicroStep.k = 5  # accumulation 2: step 2 ends at micro-batch 4 (saved), stop at 5
    monkeypatch.setattr(maepl.loop, "StopFlag", StopAtMicroStep)
    args = [*TINY, "--batch_size", "16", "--accum_iter", "2", "--max_steps", "10"]
    args += ["--save_every_steps", "2", "--keep_last", "1", "--num_workers", "0"]
    summary = pretrain.main(parse_config(PretrainConfig, args + ["--output_dir", str(out)]))
    assert summary["stopped_by_signal"] and steps == [2, 2]
    assert early_deletes == []
    ckpt = out / "checkpoints" / "step_00000002"
    assert [p.name for p in complete_checkpoints(out)] == [ckpt.name]
    assert json.loads((ckpt / "state.json").read_text())["batch_in_epoch"] == 5
    assert (ckpt / "grads_rank0.safetensors").is_file()  # the second save's
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == [ckpt.name]
    # killed between the renames: the earlier save, moved aside, is the one auto resumes
    ckpt.rename(out / "checkpoints" / ".replaced_step_00000002")
    (out / "checkpoints" / ".tmp_step_00000002").mkdir()
    assert resolve_resume("auto", out) == out / "checkpoints" / ".replaced_step_00000002"


def test_resume_from_an_older_checkpoint_sets_the_later_ones_aside(tmp_path, capsys):
    """--resume <older step>: the later checkpoints belong to the abandoned branch. They must
    not outlive the new branch's under --keep_last, nor be what --resume auto continues."""
    out = tmp_path / "run"
    args = [*TINY, "--batch_size", "16", "--save_every_steps", "2", "--num_workers", "0"]
    args += ["--output_dir", str(out)]
    pretrain.main(parse_config(PretrainConfig, args + ["--max_steps", "6", "--keep_last", "3"]))
    ckroot = out / "checkpoints"
    assert [p.name for p in complete_checkpoints(out)] == [f"step_0000000{i}" for i in (2, 4, 6)]
    old_model = (ckroot / "step_00000006" / "model.safetensors").read_bytes()
    resumed = ["--max_steps", "4", "--keep_last", "2", "--resume", str(ckroot / "step_00000002")]
    capsys.readouterr()
    assert pretrain.main(parse_config(PretrainConfig, args + resumed))["step"] == 4
    assert "moved to" in capsys.readouterr().out
    assert [p.name for p in complete_checkpoints(out)] == ["step_00000002", "step_00000004"]
    assert resolve_resume("auto", out) == ckroot / "step_00000004"
    aside = ckroot / "abandoned" / "after_step_00000002"
    assert sorted(p.name for p in aside.iterdir()) == ["step_00000004", "step_00000006"]
    assert (aside / "step_00000006" / "model.safetensors").read_bytes() == old_model  # kept
    assert (aside / "step_00000006" / "COMPLETE").is_file()


def launch_two(code: str, args: list[str], port: int, timeout: float = 240) -> list[tuple]:
    """Two processes of one distributed run, each launched on its own (no torchrun agent
    that would kill the other when one fails): (returncode, stderr) per rank; a rank that
    does not end within ``timeout`` fails the test. stderr goes to files: a pipe read only
    after the wait would block a rank that writes more than the pipe holds."""
    procs, errs = [], []
    for rank in (0, 1):
        env = dict(
            os.environ,
            OMP_NUM_THREADS="1",
            RANK=str(rank),
            LOCAL_RANK=str(rank),
            WORLD_SIZE="2",
            LOCAL_WORLD_SIZE="2",
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(port),
        )
        errs.append(tempfile.TemporaryFile("w+"))
        procs.append(
            subprocess.Popen(
                [sys.executable, "-c", code, *args],
                cwd=ROOT,
                env=env,
                stdout=subprocess.DEVNULL,
                stderr=errs[-1],
                text=True,
            )
        )
    results = []
    try:
        for rank, (proc, err) in enumerate(zip(procs, errs, strict=True)):
            try:
                returncode = proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                pytest.fail(f"rank {rank} still runs {timeout} s on: stuck in a collective")
            err.seek(0)
            results.append((returncode, err.read()))
    finally:
        for proc, err in zip(procs, errs, strict=True):
            proc.kill()
            proc.wait()
            err.close()
    return results


FAIL_ON_THE_MAIN_PROCESS = """
import pathlib, sys
sys.path.insert(0, {root!r})
import maepl.checkpoint as ck, maepl.export as ex, maepl.tracking as tr, pretrain
from maepl.config import PretrainConfig, parse_config
where = {where!r}
real_save, real_finite, real_log = ck.save_file, ck.assert_finite, tr.Tracker.log
def save(tensors, path, *a, **k):  # model.safetensors: written by the main process only
    if where == "background" and "step_00000004" in str(path) and path.name == "model.safetensors":
        raise OSError(28, "No space left on device")
    if where == "export" and path.parent.name.endswith("encoder"):
        raise OSError(28, "No space left on device: " + str(path))
    real_save(tensors, path, *a, **k)
def log(self, step, values):  # log.jsonl: written by the main process only
    if where == "log" and step == 4:
        raise OSError(28, "No space left on device: log.jsonl")
    real_log(self, step, values)
tr.Tracker.log = log
def finite(sd, what):  # checked by the main process only
    if where == "finite" and what == "checkpoint step 4":
        raise FloatingPointError(what + ": tensor 'w' holds non-finite values; not written")
    real_finite(sd, what)
ck.save_file, ex.save_file, ck.assert_finite = save, save, finite
real_image, real_write = pretrain.save_image, pathlib.Path.write_text
def image(grid, path, *a, **k):  # the reconstruction grid: main process only
    if where == "vis":
        raise OSError(28, "No space left on device: " + str(path))
    real_image(grid, path, *a, **k)
def write_text(self, *a, **k):
    if where == "summary" and self.name == "summary.json":
        raise OSError(28, "No space left on device: " + str(self))
    return real_write(self, *a, **k)
pretrain.save_image, pathlib.Path.write_text = image, write_text
pretrain.main(parse_config(PretrainConfig, sys.argv[1:]))
"""


@pytest.mark.parametrize(
    "where, flags, error, last",
    [
        ("background", ["--log_every", "100"], "CheckpointError: .*step_00000004 was not", 2),
        ("background", ["--log_every", "1"], "CheckpointError: .*step_00000004 was not", 2),
        ("finite", ["--log_every", "100"], "FloatingPointError: checkpoint step 4: tensor", 2),
        ("log", ["--log_every", "2"], "OSError: .*No space left on device: log.jsonl", 2),
        ("export", ["--log_every", "100"], "OSError: .*export/.tmp_encoder/model.safetensors", 8),
        ("vis", ["--log_every", "100"], "OSError: .*No space left on device: .*vis/epoch_", 8),
        (
            "summary",
            ["--log_every", "100"],
            "OSError: .*No space left on device: .*summary.json",
            8,
        ),
    ],
    ids=[
        "background write, seen at the next save",
        "background write, seen at the next log line",
        "non-finite tensor",
        "log line",
        "final export",
        "reconstruction image",
        "summary.json",
    ],
)
def test_an_error_on_the_main_process_stops_every_process(tmp_path, where, flags, error, last):
    """An error that only the main process sees (its background checkpoint write failed, a
    non-finite tensor in the state it copies, a log line or the export it writes) is raised on
    every process: the others do not wait in a collective the main one never reaches (under
    NCCL: until its timeout). The checkpoints already written stay resumable."""
    out = tmp_path / "run"
    args = [*TINY, "--batch_size", "8", "--max_steps", "8", "--save_every_steps", "2"]
    args += ["--num_workers", "0", "--output_dir", str(out), *flags]
    code = FAIL_ON_THE_MAIN_PROCESS.format(root=ROOT, where=where)
    (rc0, err0), (rc1, err1) = launch_two(code, args, 29551)
    assert rc0 != 0 and re.search(error, err0), err0[-3000:]
    assert rc1 != 0 and "PeerError" in err1 and "failed on process 0" in err1, err1[-3000:]
    assert resolve_resume("auto", out) == out / "checkpoints" / f"step_{last:08d}"


KNN_FAILS_ON_THE_MAIN_PROCESS = """
import sys
sys.path.insert(0, {root!r})
import linprobe
from maepl.config import LinprobeConfig, parse_config
def knn_accuracy(*a, **k):  # computed on the main process only
    raise MemoryError("planted: kNN features do not fit")
linprobe.knn_accuracy = knn_accuracy
linprobe.main(parse_config(LinprobeConfig, sys.argv[1:]))
"""


def test_a_failed_knn_probe_on_the_main_process_stops_every_process(tmp_path):
    args = ["--model", "vit_tiny_patch16_224", "--dataset", "sample", "--input_size", "28"]
    args += ["--patch_size", "7", "--in_chans", "1", "--embed_dim", "24", "--depth", "1"]
    args += ["--num_heads", "2", "--knn", "--num_workers", "0", "--output_dir", str(tmp_path)]
    code = KNN_FAILS_ON_THE_MAIN_PROCESS.format(root=ROOT)
    (rc0, err0), (rc1, err1) = launch_two(code, args, 29569)
    assert rc0 != 0 and "MemoryError: planted" in err0, err0[-3000:]
    assert rc1 != 0 and "PeerError" in err1 and "failed on process 0" in err1, err1[-3000:]


# ---------------------------------------------------------------------------- 3. preemption
def _worker_after_ignore_stop_signals(ready) -> None:
    ignore_stop_signals()
    ready.set()
    time.sleep(60)


def test_sigint_sets_the_flag_a_second_stops_at_once_and_workers_outlive_both():
    before = signal.getsignal(signal.SIGINT)
    stop = StopFlag(install=True)
    try:
        os.kill(os.getpid(), signal.SIGINT)  # the handler runs before the next bytecode
        assert stop.agreed()
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(5)
    finally:
        stop.restore()
    assert signal.getsignal(signal.SIGINT) is before
    # a DataLoader worker (its worker_init_fn): Ctrl-C and a scheduler's SIGTERM to the group
    # leave it running, so the main process can still read batches until it has saved
    ctx = multiprocessing.get_context("fork")
    ready = ctx.Event()
    worker = ctx.Process(target=_worker_after_ignore_stop_signals, args=(ready,), daemon=True)
    worker.start()
    try:
        assert ready.wait(30)
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGTERM):
            os.kill(worker.pid, sig)
        time.sleep(0.5)
        assert worker.is_alive()
    finally:
        worker.kill()
        worker.join(10)


def test_sigterm_on_one_rank_stops_both_cleanly_and_resumes(tmp_path):
    out = tmp_path / "dist"
    base = [
        *torchrun("pretrain.py", 29537),
        *TINY,
        "--batch_size",
        "8",
        "--num_workers",
        "1",
        "--log_every",
        "2",
        "--output_dir",
        str(out),
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen(
        base + ["--max_steps", "100000"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.time() + 120
        while not (out / "log.jsonl").exists() or not (out / "log.jsonl").read_text():
            assert time.time() < deadline and proc.poll() is None, "training never started"
            time.sleep(0.2)
        ranks = [
            p for p in psutil.Process(proc.pid).children() if "pretrain.py" in " ".join(p.cmdline())
        ]
        assert len(ranks) == 2
        rank1 = max(ranks, key=lambda p: p.pid)
        # a scheduler signals whole process trees: the rank and its DataLoader worker
        for p in [rank1, *rank1.children(recursive=True)]:
            p.send_signal(signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 0, stderr[-3000:]
    assert "DataLoader worker" not in stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["stopped_by_signal"] is True
    stopped_at = summary["step"]
    ckpt = out / "checkpoints" / f"step_{stopped_at:08d}"
    assert (ckpt / "COMPLETE").is_file()
    assert sorted(p.name for p in ckpt.glob("rng_rank*")) == [
        "rng_rank0.safetensors",
        "rng_rank1.safetensors",
    ]
    r = subprocess.run(
        base + ["--max_steps", str(stopped_at + 4), "--resume", "auto"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["step"] == stopped_at + 4 and summary["ranks_in_sync"] is True


LATE_RANK = """
import os, sys, time
sys.path.insert(0, {root!r})
import maepl.run_dir, pretrain
from maepl.config import PretrainConfig, parse_config
real_check = maepl.run_dir.check_output_dir
def late_check(cfg):  # rank 1 reaches the output_dir check long after rank 0
    if os.environ["RANK"] == "1":
        time.sleep(4)
    real_check(cfg)
maepl.run_dir.check_output_dir = late_check
pretrain.main(parse_config(PretrainConfig, sys.argv[1:]))
"""


def test_a_late_rank_does_not_find_the_new_run_in_a_fresh_output_dir(tmp_path):
    """Rank 0 writes config.yaml only once every rank has checked output_dir. The lazily
    connected gloo group stands in for NCCL, whose Accelerator() does not wait for the other
    ranks: rank 0 would otherwise write it before rank 1 looked."""
    out = tmp_path / "fresh"
    script = tmp_path / "late_rank.py"
    script.write_text(LATE_RANK.format(root=ROOT))
    cmd = [*torchrun(str(script), 29553), *TINY, "--batch_size", "8", "--max_steps", "2"]
    cmd += ["--num_workers", "0", "--output_dir", str(out)]
    env = dict(os.environ, OMP_NUM_THREADS="1", TORCH_GLOO_LAZY_INIT="1")
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "already holds a run" not in r.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["step"] == 2 and summary["ranks_in_sync"] is True


# ---------------------------------------------------------------------------- 4. non-finite
def poison(monkeypatch, bad_batches):
    calls = {"n": 0}

    def collate(batch):
        imgs, labels, bad = collate_skip_bad(batch)
        calls["n"] += 1
        if bad_batches == "all" or calls["n"] in bad_batches:
            imgs = torch.full_like(imgs, float("nan"))
        return imgs, labels, bad

    monkeypatch.setattr(maepl.loaders, "collate_skip_bad", collate)


def fused_adamw(monkeypatch):
    """The CUDA optimizer (fused AdamW, skipping on the device without a host sync) on CPU."""
    build = pretrain.build_adamw
    monkeypatch.setattr(
        pretrain, "build_adamw", lambda *a, **k: build(*a, **{**k, "device_type": "cuda"})
    )


@pytest.mark.parametrize("fused", [False, True], ids=["foreach", "fused"])
def test_nonfinite_steps_are_skipped_and_counted(tiny_cfg, monkeypatch, fused):
    if fused:
        fused_adamw(monkeypatch)
    poison(monkeypatch, {3, 4})
    cfg = tiny_cfg(max_steps=8, log_every=1)
    summary = pretrain.main(cfg)
    out = Path(cfg.output_dir)
    assert summary["nonfinite_steps"] == 2 and summary["step"] == 8
    events = [json.loads(r) for r in (out / "log.jsonl").read_text().splitlines()]
    assert [e["step"] for e in events if e.get("event") == "nonfinite_grad_norm"] == [3, 4]
    rows = scalar_rows(out)
    assert all(np.isfinite(r["loss"]) for r in rows)
    sd = load_file(out / "checkpoints" / "step_00000008" / "model.safetensors")
    assert all(torch.isfinite(v).all() for v in sd.values())
    opt = load_file(out / "checkpoints" / "step_00000008" / "optimizer.safetensors")
    assert {v.item() for k, v in opt.items() if k.endswith(".step")} == {6.0}  # 8 - 2 skipped


@pytest.mark.skipif(not torch.cuda.is_available(), reason="fp16 needs CUDA (refused on CPU)")
def test_fp16_on_cuda_skips_nonfinite_steps_with_the_grad_scaler_and_counts_them(
    tiny_cfg, monkeypatch
):
    """Under fp16 the GradScaler skips a step whose scaled gradients overflow (the poisoned
    ones, and any early overflow while its scale settles): each is still counted and logged,
    and the optimizer took exactly the other steps."""
    poison(monkeypatch, {3, 4})
    cfg = tiny_cfg(max_steps=8, log_every=1, mixed_precision="fp16")
    summary = pretrain.main(cfg)
    out = Path(cfg.output_dir)
    events = [json.loads(r) for r in (out / "log.jsonl").read_text().splitlines()]
    skipped = [e["step"] for e in events if e.get("event") == "nonfinite_grad_norm"]
    assert {3, 4} <= set(skipped) and summary["nonfinite_steps"] == len(skipped)
    sd = load_file(out / "checkpoints" / "step_00000008" / "model.safetensors")
    assert all(torch.isfinite(v).all() for v in sd.values())
    opt = load_file(out / "checkpoints" / "step_00000008" / "optimizer.safetensors")
    assert {v.item() for k, v in opt.items() if k.endswith(".step")} == {8.0 - len(skipped)}


@pytest.mark.parametrize("fused", [False, True], ids=["foreach", "fused"])
def test_consecutive_nonfinite_steps_stop_the_run_naming_the_step(tiny_cfg, monkeypatch, fused):
    if fused:
        fused_adamw(monkeypatch)
    poison(monkeypatch, "all")
    with pytest.raises(FloatingPointError, match="step 3: 3 consecutive.*no checkpoint was saved"):
        pretrain.main(tiny_cfg(max_steps=8, max_nonfinite=3))
    # good steps 1-2, then bad ones, saved every 2 steps: the error names the last checkpoint
    # (before session 19, without any checkpoint it named "step -1")
    poison(monkeypatch, {3, 4, 5, 6, 7, 8})
    import maepl.checkpoint as ck

    real_save = ck.save_file

    def slow_save(tensors, path, *args, **kwargs):  # the background write outlasts step 5
        if Path(path).name == "model.safetensors":
            time.sleep(0.5)
        real_save(tensors, path, *args, **kwargs)

    monkeypatch.setattr(ck, "save_file", slow_save)
    cfg = tiny_cfg(max_steps=8, max_nonfinite=3, save_every_steps=2, overwrite=True)
    # (step 4 was skipped: saved with the weights of step 2, finite)
    with pytest.raises(FloatingPointError, match=r"step 5: 3 .*last checkpoint \(step 4\) holds"):
        pretrain.main(cfg)
    # the checkpoint the error names is complete when it is raised (--async_save, the default)
    assert (Path(cfg.output_dir) / "checkpoints" / "step_00000004" / "COMPLETE").is_file()


POISON_ON_RANK_1 = """
import os, sys, torch
sys.path.insert(0, {root!r})
import maepl.loaders as loaders, pretrain
from maepl.config import PretrainConfig, parse_config
real, calls = loaders.collate_skip_bad, [0]
def collate(batch):  # NaN images in rank 1's batches 3 and 4 only
    imgs, labels, bad = real(batch)
    calls[0] += 1
    if os.environ["RANK"] == "1" and calls[0] in (3, 4):
        imgs = torch.full_like(imgs, float("nan"))
    return imgs, labels, bad
loaders.collate_skip_bad = collate
pretrain.main(parse_config(PretrainConfig, sys.argv[1:]))
"""


def test_a_nonfinite_step_on_one_rank_is_skipped_on_every_rank(tmp_path):
    """The gradient norm is taken after the all-reduce, so NaN on one rank makes every rank
    skip that step: both keep identical weights, and rank 0 logs the steps and the count."""
    out = tmp_path / "run"
    args = [*TINY, "--batch_size", "8", "--max_steps", "6", "--log_every", "1"]
    args += ["--num_workers", "0", "--output_dir", str(out)]
    (rc0, err0), (rc1, err1) = launch_two(POISON_ON_RANK_1.format(root=ROOT), args, 29567)
    assert rc0 == 0 and rc1 == 0, (err0[-2000:], err1[-2000:])
    summary = json.loads((out / "summary.json").read_text())
    assert summary["ranks_in_sync"] is True and summary["step"] == 6
    rows = [json.loads(r) for r in (out / "log.jsonl").read_text().splitlines()]
    skipped = [r["step"] for r in rows if r.get("event") == "nonfinite_grad_norm"]
    assert skipped == [3, 4]
    assert [r["nonfinite_steps"] for r in rows if "loss" in r][-1] == 2


def test_log_window_leaves_nonfinite_micro_batches_out_and_sums_over_ranks():
    class TwoRanks:  # reduce("sum") as if a second rank held the same values
        def reduce(self, t, op):
            assert op == "sum"
            return 2 * t

    w = LogWindow(torch.device("cpu"), gpu_pipeline=False)
    w.add({"loss": torch.tensor(1.0), "acc": torch.tensor(0.5)})
    w.add({"loss": torch.tensor(float("nan")), "acc": torch.tensor(0.9)})  # left out whole
    w.add({"loss": torch.tensor(3.0), "acc": torch.tensor(0.7)})
    w.data_s = 0.3
    averages, timings, bad = w.reduce(TwoRanks(), extra=5, images_per_micro=8, accum_iter=3)
    assert averages == pytest.approx({"loss": 2.0, "acc": 0.6})
    assert bad == 10  # this rank's 5, summed over the two
    assert timings["data_ms"] == pytest.approx(300.0)  # 3 micro-batches = one step
    assert timings["img_per_s"] > 0 and "prefetch_ms" not in timings
    w.reset()
    assert w.sums == {} and w.n_micro == 0 and w.finite.item() == 0


def test_nothing_nonfinite_is_exported(tmp_path):
    enc = torch.nn.Linear(2, 2)
    with torch.no_grad():
        enc.weight[0, 0] = float("inf")
    with pytest.raises(FloatingPointError, match="'weight'"):
        export_encoder(enc, tmp_path / "e", "vit_tiny_patch16_224", {"embed_dim": 2}, {}, {})
    assert not (tmp_path / "e" / "model.safetensors").exists()


DEVICES = [
    "cpu",
    pytest.param(
        "cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
    ),
]


def _checkpoint_like_state(device: str) -> dict[str, torch.Tensor]:
    base = torch.arange(24.0, device=device).reshape(4, 6)
    return {
        "w": base,
        "w_t": base.t(),  # strided view of the same storage
        "tied": base,  # the same tensor twice (tied weights)
        "half": torch.full((3,), 2.5, dtype=torch.bfloat16, device=device),
        "count": torch.tensor(7, device=device),
        "empty": torch.empty(0, 3, device=device),
    }


@pytest.mark.parametrize("device", DEVICES)
def test_host_copies_are_separate_contiguous_and_writable(tmp_path, device):
    """The checkpoint snapshot: host tensors, one buffer each (safetensors refuses shared
    storage), equal to the live ones, and unchanged when training changes those afterwards."""
    from safetensors.torch import save_file

    from maepl.snapshot import host_copies

    live = _checkpoint_like_state(device)
    copies = host_copies(live)
    assert list(copies) == list(live)
    for k, v in copies.items():
        assert v.device.type == "cpu" and v.is_contiguous() and v.dtype == live[k].dtype
        assert torch.equal(v, live[k].cpu()), k
        if v.numel():  # an empty tensor has no memory to pin
            assert v.is_pinned() == (device == "cuda"), k
    assert len({v.untyped_storage().data_ptr() for v in copies.values() if v.numel()}) == 5
    live["w"].add_(100)  # an optimizer step after the snapshot returned
    assert copies["w"][0, 1] == 1 and copies["w_t"][1, 0] == 1 and copies["tied"][3, 5] == 23
    save_file(copies, tmp_path / "model.safetensors")
    back = load_file(tmp_path / "model.safetensors")
    assert torch.equal(back["w_t"], torch.arange(24.0).reshape(4, 6).t())


@pytest.mark.parametrize("device", DEVICES)
def test_assert_finite_names_the_first_bad_tensor(device):
    from maepl.snapshot import assert_finite

    state = _checkpoint_like_state(device)
    state["step"] = torch.tensor(3.0)  # AdamW's step count stays on the host
    assert_finite(state, "checkpoint step 5")  # finite: no error
    state["half"][1] = float("nan")
    state["step"][()] = float("inf")
    with pytest.raises(FloatingPointError, match=r"checkpoint step 5: tensor 'half' holds"):
        assert_finite(state, "checkpoint step 5")
    state["half"][1] = 0
    with pytest.raises(FloatingPointError, match=r"tensor 'step' holds"):
        assert_finite(state, "checkpoint step 5")
    assert_finite({"empty": torch.empty(0), "ints": torch.arange(3)}, "x")


def test_a_failed_export_leaves_the_previous_export_whole(tmp_path, monkeypatch):
    """An export replaces the earlier one only once it is completely written: one that fails
    half-way (disk full after part of the weights) leaves the earlier folder as it was, loadable
    by timm, and no temporary files; one killed between its two renames is completed by the
    next export."""
    import timm

    import maepl.export as ex

    args = dict(img_size=28, patch_size=4, embed_dim=24, depth=1, num_heads=2, in_chans=1)
    data_cfg = dict(input_size=[1, 28, 28], mean=[0.5], std=[0.5], crop_pct=1.0)
    card = dict(name="t", description="t", dataset="sample", steps=1)
    enc = timm.create_model("vit_tiny_patch16_224", num_classes=0, **args)
    folder = tmp_path / "export" / "encoder"
    full = tmp_path / "export" / "mae.safetensors"

    def export(tag: str) -> None:
        ex.export_encoder(
            enc, folder, "vit_tiny_patch16_224", args, data_cfg, {**card, "steps": tag}
        )
        ex.export_full(enc, full, {"tag": tag})

    export("first")
    before = {k: v.clone() for k, v in enc.state_dict().items()}
    files = {p.name: p.read_bytes() for p in [*folder.iterdir(), full, full.with_suffix(".json")]}
    with torch.no_grad():
        enc.cls_token.add_(1.0)

    real_save = ex.save_file

    def full_disk(tensors, path, *a, **k):  # part of the weights, then the disk is full
        Path(path).write_bytes(b"partial")
        raise OSError(28, f"No space left on device: {path}")

    monkeypatch.setattr(ex, "save_file", full_disk)
    with pytest.raises(OSError, match="No space left"):
        ex.export_encoder(enc, folder, "vit_tiny_patch16_224", args, data_cfg, card)
    with pytest.raises(OSError, match="No space left"):
        ex.export_full(enc, full, {"tag": "second"})
    after = {p.name: p.read_bytes() for p in [*folder.iterdir(), full, full.with_suffix(".json")]}
    assert after == files
    assert sorted(p.name for p in folder.parent.iterdir()) == [
        "encoder",
        "mae.json",
        "mae.safetensors",
    ]
    loaded = timm.create_model(f"local-dir:{folder}", pretrained=True)
    assert torch.equal(loaded.cls_token, before["cls_token"])

    # killed between the renames: the earlier export is aside, the folder missing
    monkeypatch.setattr(ex, "save_file", real_save)
    folder.rename(folder.with_name(".replaced_encoder"))
    export("second")
    assert sorted(p.name for p in folder.parent.iterdir()) == [
        "encoder",
        "mae.json",
        "mae.safetensors",
    ]
    loaded = timm.create_model(f"local-dir:{folder}", pretrained=True)
    assert torch.equal(loaded.cls_token, before["cls_token"] + 1.0)
    assert "second" in (folder / "README.md").read_text()
    assert json.loads(full.with_suffix(".json").read_text()) == {"tag": "second"}


# ---------------------------------------------------------------------------- 5. bad images
def make_messy_folder(root: Path) -> dict[str, Path]:
    rng = np.random.default_rng(0)
    cls = root / "train" / "things"
    cls.mkdir(parents=True)
    files = {}
    for i in range(6):
        files[f"good{i}"] = cls / f"good{i}.JPEG"
        Image.fromarray(rng.integers(0, 255, (20, 20, 3), dtype=np.uint8)).save(files[f"good{i}"])
    full = cls / "truncated.JPEG"
    Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(full, quality=95)
    full.write_bytes(full.read_bytes()[:600])
    files["truncated"] = full
    files["empty"] = cls / "empty.JPEG"
    files["empty"].write_bytes(b"")
    files["cmyk"] = cls / "cmyk.JPEG"
    Image.fromarray(rng.integers(0, 255, (20, 20, 4), dtype=np.uint8), "CMYK").save(files["cmyk"])
    files["png_named_jpeg"] = cls / "png.JPEG"
    Image.fromarray(rng.integers(0, 255, (20, 20, 3), dtype=np.uint8)).save(
        files["png_named_jpeg"], format="PNG"
    )
    files["gray"] = cls / "gray.JPEG"
    Image.fromarray(rng.integers(0, 255, (20, 20), dtype=np.uint8)).save(files["gray"])
    files["tiny"] = cls / "tiny.JPEG"
    Image.fromarray(rng.integers(0, 255, (1, 2, 3), dtype=np.uint8)).save(files["tiny"])
    return files


def load_all(root: Path, num_workers: int, strict: bool = False):
    raw = build_dataset("imagefolder", str(root), train=True)
    ds = SeededTransformDataset(
        raw, build_transform(True, 16, 3, (0.5,) * 3, (0.5,) * 3), 0, strict
    )
    loader = torch.utils.data.DataLoader(
        ds, batch_size=4, num_workers=num_workers, collate_fn=collate_skip_bad
    )
    imgs, bad = [], []
    for x, _, b in loader:
        imgs.append(x)
        bad += b
    return raw, torch.cat(imgs), bad


def test_bad_images_are_skipped_counted_and_named(tmp_path):
    files = make_messy_folder(tmp_path / "data")
    raw, imgs0, bad0 = load_all(tmp_path / "data", 0)
    _, imgs2, bad2 = load_all(tmp_path / "data", 2)
    assert torch.equal(imgs0, imgs2) and bad0 == bad2  # same result for any worker count
    named = sorted(b.split(":")[0] for b in bad0)
    assert named == sorted([str(files["truncated"]), str(files["empty"])])
    assert imgs0.shape == (len(raw), 3, 16, 16) and torch.isfinite(imgs0).all()
    # readable odd files decode to their true content
    by_path = {Path(p).name: i for i, (p, _) in enumerate(raw.samples)}
    for name in ("cmyk", "png_named_jpeg", "gray", "tiny"):
        img, _ = raw[by_path[files[name].name]]
        assert img.mode == "RGB"
        assert np.array_equal(np.asarray(img), np.asarray(Image.open(files[name]).convert("RGB")))
    unreadable = r"unreadable image .*(truncated|empty)\.JPEG.*strict_data"
    with pytest.raises(BadImageError, match=unreadable):
        load_all(tmp_path / "data", 0, strict=True)


def test_pretraining_over_bad_images_logs_them(tmp_path):
    make_messy_folder(tmp_path / "data")
    args = (
        TINY[:4]
        + TINY[6:]
        + [
            "--dataset",
            "imagefolder",
            "--data_path",
            str(tmp_path / "data"),
            "--input_size",
            "16",
            "--batch_size",
            "4",
            "--epochs",
            "1",
            "--num_workers",
            "0",
            "--log_every",
            "1",
            "--output_dir",
            str(tmp_path / "run"),
        ]
    )
    summary = pretrain.main(parse_config(PretrainConfig, args))
    assert summary["bad_images"] == 2
    events = [json.loads(r) for r in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    files = [f for e in events if e.get("event") == "bad_images" for f in e["files"]]
    assert len(files) == 2 and any("empty.JPEG" in f for f in files)
    # each event carries the step its batch trained: the file's place in epoch 0's order
    # (the permutation of seed 0 + epoch 0, 4 images a step), worked out here independently
    paths = [path for path, _ in build_dataset("imagefolder", str(tmp_path / "data"), True).samples]
    order = torch.randperm(len(paths), generator=torch.Generator().manual_seed(0)).tolist()
    want = {paths[i]: pos // 4 + 1 for pos, i in enumerate(order)}
    tagged = {
        f.split(": ")[0]: e["step"]
        for e in events
        if e.get("event") == "bad_images"
        for f in e["files"]
    }
    assert tagged == {path: want[path] for path in tagged}, (tagged, want)
    with pytest.raises(BadImageError, match=r"unreadable image .*\.JPEG"):
        pretrain.main(parse_config(PretrainConfig, args + ["--strict_data", "--overwrite"]))


def test_bad_images_of_every_process_are_counted(tmp_path):
    """bad_images is the count over all ranks (each rank reads its own share of the files),
    the same as one process counts (before session 8: rank 0's share only)."""
    make_messy_folder(tmp_path / "data")
    args = TINY[:4] + TINY[6:] + ["--dataset", "imagefolder", "--data_path", str(tmp_path / "data")]
    args += ["--input_size", "16", "--batch_size", "2", "--epochs", "2", "--num_workers", "0"]
    one = pretrain.main(parse_config(PretrainConfig, args + ["--output_dir", str(tmp_path / "1")]))
    code = f"import sys; sys.path.insert(0, {ROOT!r})\n" + (
        "import pretrain\nfrom maepl.config import PretrainConfig, parse_config\n"
        "pretrain.main(parse_config(PretrainConfig, sys.argv[1:]))\n"
    )
    (rc0, err0), (rc1, err1) = launch_two(code, args + ["--output_dir", str(tmp_path / "2")], 29563)
    assert rc0 == 0 and rc1 == 0, (err0 + err1)[-3000:]
    two = json.loads((tmp_path / "2" / "summary.json").read_text())
    assert one["bad_images"] == two["bad_images"] == 4  # 2 unreadable files x 2 epochs


SIGTERM_IN_FINISH = """
import os, signal, sys
sys.path.insert(0, {root!r})
import maepl.loop as loop, pretrain
from maepl.config import PretrainConfig, parse_config
real_finish = loop.Run.finish
def finish(self, *a, **k):  # a scheduler's second SIGTERM, as the run ends
    os.kill(os.getpid(), signal.SIGTERM)
    return real_finish(self, *a, **k)
loop.Run.finish = finish
pretrain.main(parse_config(PretrainConfig, sys.argv[1:]))
"""


def test_a_signal_while_the_run_ends_still_saves_and_exports(tmp_path):
    """The stop handlers stay until the run is closed: a SIGTERM during the final save and the
    exports no longer kills the process there (before session 8: rc 143, no final checkpoint,
    no exports)."""
    out = tmp_path / "run"
    args = [*TINY, "--batch_size", "8", "--max_steps", "8", "--save_every_steps", "5"]
    args += ["--num_workers", "0", "--output_dir", str(out)]
    r = subprocess.run(
        [sys.executable, "-c", SIGTERM_IN_FINISH.format(root=ROOT), *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env=dict(os.environ, OMP_NUM_THREADS="1"),
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert resolve_resume("auto", out) == out / "checkpoints" / "step_00000008"
    assert (out / "export" / "encoder" / "model.safetensors").is_file()
    assert json.loads((out / "summary.json").read_text())["step"] == 8


def test_a_resume_with_other_training_settings_says_so(tmp_path, tiny_cfg, capsys):
    """Changing --epochs (or blr, precision, ...) on resume is allowed, as in MAE, but printed
    and recorded in log.jsonl; I/O settings (workers, logging) are not reported."""
    cfg = tiny_cfg(max_steps=2)
    pretrain.main(cfg)
    capsys.readouterr()
    more = dataclasses.replace(cfg, resume="auto", max_steps=4, epochs=3, blr=2e-3, num_workers=1)
    pretrain.main(more)
    out = capsys.readouterr().out
    assert (
        "other training settings than it was trained with: epochs 2 -> 3, blr 0.0015 -> 0.002"
        in out
    )
    events = [json.loads(r) for r in (Path(cfg.output_dir) / "log.jsonl").read_text().splitlines()]
    (ev,) = [e for e in events if e.get("event") == "resumed_with_changed_settings"]
    assert ev["step"] == 2 and ev["changed"] == {"epochs": [2, 3], "blr": [0.0015, 0.002]}


def test_a_resume_in_another_resolved_precision_says_so(tmp_path, tiny_cfg, capsys, monkeypatch):
    """--mixed_precision auto resolves by machine and launcher: the checkpoint records what it
    resolved to, so a resume that trains in another precision is reported, not silent."""
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")  # accelerate launch --mixed_precision
    cfg = tiny_cfg(max_steps=2, mixed_precision="auto")
    pretrain.main(cfg)
    (ckpt,) = (Path(cfg.output_dir) / "checkpoints").glob("step_*")
    assert json.loads((ckpt / "state.json").read_text())["config"]["mixed_precision"] == "bf16"
    capsys.readouterr()
    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION")  # resumed with plain python on a CPU
    pretrain.main(dataclasses.replace(cfg, resume="auto", max_steps=3))
    assert "mixed_precision 'bf16' -> 'no'" in capsys.readouterr().out
    events = [json.loads(r) for r in (Path(cfg.output_dir) / "log.jsonl").read_text().splitlines()]
    (ev,) = [e for e in events if e.get("event") == "resumed_with_changed_settings"]
    assert ev["changed"] == {"mixed_precision": ["bf16", "no"]}


def test_a_resume_drops_log_rows_it_will_replay_or_cannot_read(tmp_path, tiny_cfg):
    """--resume auto with no checkpoint yet (killed before the first save) starts at step 0:
    the killed run's rows go. A row cut short (a kill or a full disk while writing) is
    dropped instead of stopping every later resume."""
    cfg = tiny_cfg(max_steps=4, log_every=1)
    out = Path(cfg.output_dir)
    out.mkdir(parents=True)
    stale = [{"step": s, "loss": 9.0} for s in (1, 2, 3)]
    (out / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in stale))
    pretrain.main(dataclasses.replace(cfg, resume="auto"))
    rows = scalar_rows(out)
    assert [r["step"] for r in rows] == [1, 2, 3, 4] and all(r["loss"] != 9.0 for r in rows)
    with (out / "log.jsonl").open("a") as f:
        f.write('{"step": 5, "time": 17')  # cut short
    pretrain.main(dataclasses.replace(cfg, resume="auto", max_steps=6))
    assert [r["step"] for r in scalar_rows(out)] == [1, 2, 3, 4, 5, 6]


def test_a_resume_drops_what_a_killed_run_wrote_after_its_checkpoint(tmp_path, tiny_cfg):
    """Rows and TensorBoard scalars of steps after the checkpoint resumed from (a run killed
    after step 6, its last checkpoint at step 4) are replaced by the resumed run's own: the log
    and TensorBoard each hold every step once, with the values of the run that continued."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from torch.utils.tensorboard import SummaryWriter

    cfg = tiny_cfg(max_steps=4, log_every=1, save_every_steps=2)
    out = Path(cfg.output_dir)
    pretrain.main(cfg)
    with (out / "log.jsonl").open("a") as f:  # the killed run's steps 5-6
        f.writelines(json.dumps({"step": s, "loss": 9.0}) + "\n" for s in (5, 6))
    with SummaryWriter(log_dir=str(out / "tensorboard")) as w:
        for s in (5, 6):
            w.add_scalar("loss", 9.0, s)
    pretrain.main(dataclasses.replace(cfg, resume="auto", max_steps=7))
    rows = scalar_rows(out)
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6, 7]
    assert all(r["loss"] != 9.0 for r in rows)
    acc = EventAccumulator(str(out / "tensorboard"))
    acc.Reload()
    scalars = acc.Scalars("loss")
    assert [e.step for e in scalars] == [1, 2, 3, 4, 5, 6, 7]
    assert [e.value for e in scalars] == pytest.approx([r["loss"] for r in rows])


# ---------------------------------------------------------------------------- 6. configs, paths
def test_empty_and_unsupported_inputs_fail_before_any_work(tmp_path):
    (tmp_path / "empty" / "train").mkdir(parents=True)
    cfg = parse_config(
        PretrainConfig,
        TINY[:4]
        + [
            "--dataset",
            "imagefolder",
            "--data_path",
            str(tmp_path / "empty"),
            "--output_dir",
            str(tmp_path / "o"),
        ],
    )
    with pytest.raises(ConfigError, match=r"data_path: imagefolder: no images found under .*empty"):
        pretrain.main(cfg)
    assert not (tmp_path / "o").exists()  # nothing written
    with pytest.raises(ConfigError, match="class token"):
        parse_config(PretrainConfig, ["--model", "vit_base_patch16_gap_224", "--dataset", "sample"])


def test_resume_under_another_architecture_is_refused(tiny_cfg, monkeypatch):
    # before any model is built, and leaving the run's config.yaml as it was
    cfg = tiny_cfg(max_steps=2)
    pretrain.main(cfg)
    config_yaml = Path(cfg.output_dir, "config.yaml").read_text()

    def no_model(cfg):
        raise AssertionError("a model was built")

    monkeypatch.setattr(pretrain, "build_mae", no_model)
    with pytest.raises(ConfigError, match="embed_dim"):
        pretrain.main(tiny_cfg(max_steps=4, embed_dim=24, resume="auto"))
    assert Path(cfg.output_dir, "config.yaml").read_text() == config_yaml


def test_a_run_refused_after_its_checks_leaves_the_folder_as_it_was(tiny_cfg):
    """Nothing is written (or, with --overwrite, deleted) in output_dir before every check has
    passed: a batch that gives no full step is found when the loader is planned."""
    cfg = tiny_cfg(max_steps=2)
    pretrain.main(cfg)
    out = Path(cfg.output_dir)
    before = sorted(p.relative_to(out) for p in out.rglob("*"))
    config_yaml = (out / "config.yaml").read_text()
    with pytest.raises(ConfigError, match="batch_size: 10000 images per process give no full"):
        pretrain.main(tiny_cfg(batch_size=20000, overwrite=True))
    assert sorted(p.relative_to(out) for p in out.rglob("*")) == before
    assert (out / "config.yaml").read_text() == config_yaml
    fresh = tiny_cfg(batch_size=20000, output_dir=str(out.parent / "fresh"))
    with pytest.raises(ConfigError, match="no full step"):
        pretrain.main(fresh)
    assert not Path(fresh.output_dir).exists()  # the corrected rerun is not blocked
    (out.parent / "a_file").write_text("x")
    with pytest.raises(ConfigError, match="output_dir: .*a_file is a file, not a folder"):
        pretrain.main(tiny_cfg(output_dir=str(out.parent / "a_file")))


def test_resume_under_another_effective_batch_is_refused(tiny_cfg, capsys):
    """step and batch_in_epoch count micro-batches of one process: under another effective
    batch (batch_size x accum_iter x processes) the schedule would jump and data be skipped or
    seen twice. The error names each changed value and a split that keeps the effective
    batch, before anything in output_dir is changed."""
    cfg = tiny_cfg(max_steps=2)
    pretrain.main(cfg)
    out = Path(cfg.output_dir)
    config_yaml = (out / "config.yaml").read_text()
    state_file = out / "checkpoints" / "step_00000002" / "state.json"
    state = json.loads(state_file.read_text())
    assert state["schedule"] == {"batch_size": 32, "accum_iter": 1, "num_processes": 1}
    with pytest.raises(ConfigError, match=r"batch_size 32 \(now 16\)") as e:
        pretrain.main(tiny_cfg(max_steps=4, batch_size=16, resume="auto"))
    assert "accum_iter 1 (now" not in str(e.value) and "step_00000002" in str(e.value)
    assert "was 32, now 16" in str(e.value)
    assert "--batch_size 16 --accum_iter 2 on 1 process(es)" in str(e.value)
    with pytest.raises(ConfigError, match=r"batch_size 32 \(now 16\), accum_iter 1 \(now 4\)"):
        pretrain.main(tiny_cfg(max_steps=4, batch_size=16, accum_iter=4, resume="auto"))
    state["schedule"]["num_processes"] = 2  # as if written by a 2-process run
    state_file.write_text(json.dumps(state))
    with pytest.raises(ConfigError, match=r"num_processes 2 \(now 1\)"):
        pretrain.main(tiny_cfg(max_steps=4, resume="auto"))
    assert (out / "config.yaml").read_text() == config_yaml  # refused before it was rewritten
    # a checkpoint of older code: no "schedule"; its config still tells the batch size
    del state["schedule"]
    state_file.write_text(json.dumps(state))
    with pytest.raises(ConfigError, match=r"batch_size 32 \(now 16\)"):
        pretrain.main(tiny_cfg(max_steps=4, batch_size=16, resume="auto"))
    del state["num_processes"]  # another split cannot be converted without the process count
    state_file.write_text(json.dumps(state))
    with pytest.raises(ConfigError, match=r"does not record num_processes, so its position"):
        pretrain.main(tiny_cfg(max_steps=4, batch_size=16, accum_iter=2, resume="auto"))
    for key in ("batch_size", "accum_iter"):  # nothing recorded: accepted, with a note
        del state["config"][key]
    state_file.write_text(json.dumps(state))
    capsys.readouterr()
    assert pretrain.main(tiny_cfg(max_steps=4, resume="auto"))["step"] == 4
    assert "does not record batch_size, accum_iter, num_processes" in capsys.readouterr().out


def test_resume_under_another_split_of_the_same_effective_batch_continues_the_run(
    tiny_cfg, tmp_path, capsys, monkeypatch
):
    """32 x 1 accum resumed as 16 x 2 accum (as a job preempted on 8 GPUs resumes on 4): the
    same steps per epoch, lr and images for every step; on a CPU the masks are even drawn in
    the same order, so it ends where the uninterrupted run does, up to the order of float
    sums. A checkpoint saved mid-accumulation resumes under another split from the start of
    its step (its partial gradients belong to the old split)."""
    kw = dict(pos_label="none", log_every=1)
    full = tiny_cfg(max_steps=4, output_dir=str(tmp_path / "full"), **kw)
    pretrain.main(full)
    split = tmp_path / "split"
    pretrain.main(tiny_cfg(max_steps=2, output_dir=str(split), **kw))
    capsys.readouterr()
    resplit = dict(batch_size=16, accum_iter=2, resume="auto", output_dir=str(split))
    summary = pretrain.main(tiny_cfg(max_steps=4, **resplit, **kw))
    assert summary["step"] == 4
    assert "batch_size 32 -> 16, accum_iter 1 -> 2" in capsys.readouterr().out
    rows = [json.loads(r) for r in (split / "log.jsonl").read_text().splitlines()]
    [event] = [r for r in rows if r.get("event") == "resumed_with_changed_settings"]
    assert event["step"] == 2
    assert event["changed"] == {"batch_size": [32, 16], "accum_iter": [1, 2]}
    ckpt = split / "checkpoints" / "step_00000004"
    state = json.loads((ckpt / "state.json").read_text())
    assert state["batch_in_epoch"] == 8  # 4 steps of 2 micro-batches
    assert state["schedule"] == {"batch_size": 16, "accum_iter": 2, "num_processes": 1}
    lr = {r["step"]: r["lr"] for r in scalar_rows(split)}
    assert lr == {r["step"]: r["lr"] for r in scalar_rows(Path(full.output_dir))}
    a = load_file(split / "export" / "mae.safetensors")
    b = load_file(Path(full.output_dir) / "export" / "mae.safetensors")
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)
    # stopped again on step 5's first micro-batch: saved mid-accumulation as step 4
    StopAtMicroStep.k = 1
    monkeypatch.setattr(maepl.loop, "StopFlag", StopAtMicroStep)
    pretrain.main(tiny_cfg(max_steps=6, **resplit, **kw))
    assert json.loads((ckpt / "state.json").read_text())["batch_in_epoch"] == 9
    assert list(ckpt.glob("grads_rank*"))
    monkeypatch.setattr(maepl.loop, "StopFlag", StopFlag)
    capsys.readouterr()
    # back to 32 x 1: step 5 starts again from its first image, the partial gradients unused
    pretrain.main(tiny_cfg(max_steps=6, resume="auto", output_dir=str(split), **kw))
    assert "was saved mid-accumulation" in capsys.readouterr().out
    state = json.loads((split / "checkpoints" / "step_00000006" / "state.json").read_text())
    assert state["step"] == 6 and state["batch_in_epoch"] == 6  # steps 5-6 after 4 whole ones


def test_resume_on_one_process_of_a_two_process_run(tmp_path):
    """A 2-process run (batch 8) resumed by one process with accumulation 2: accepted, its
    RNG streams drawn anew (the per-rank files do not map onto one rank), the schedule kept."""
    out = tmp_path / "run"
    args = [*TINY, "--batch_size", "8", "--num_workers", "0", "--output_dir", str(out)]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    first = subprocess.run(
        [*torchrun("pretrain.py", 29561), *args, "--max_steps", "2"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert first.returncode == 0, first.stderr[-3000:]
    second = subprocess.run(
        [sys.executable, "pretrain.py", *args, "--accum_iter", "2", "--max_steps", "4",
         "--resume", "auto"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert second.returncode == 0, second.stderr[-3000:]
    assert "num_processes 2 -> 1" in second.stdout and "accum_iter 1 -> 2" in second.stdout
    assert (
        "was written by 2 process(es), now 1; masks, dropout and mixup draw anew from seed 0 "
        "and step 2" in second.stdout
    )
    state = json.loads((out / "checkpoints" / "step_00000004" / "state.json").read_text())
    assert state["step"] == 4 and state["batch_in_epoch"] == 8


def test_an_optimizer_that_does_not_fit_the_checkpoint_names_it(tiny_cfg):
    cfg = tiny_cfg(max_steps=2)
    pretrain.main(cfg)
    ckpt = Path(cfg.output_dir) / "checkpoints" / "step_00000002"
    state = json.loads((ckpt / "state.json").read_text())
    state["optimizer"]["param_groups"] = state["optimizer"]["param_groups"][:1]
    (ckpt / "state.json").write_text(json.dumps(state))
    with pytest.raises(ConfigError, match=f"optimizer state in {re.escape(str(ckpt))}"):
        pretrain.main(tiny_cfg(max_steps=4, resume="auto"))


def test_overwrite_refuses_to_delete_the_weights_it_is_asked_to_load(tmp_path):
    """--overwrite deletes export/ and checkpoints/ of output_dir before the weights are
    read: a --finetune source in there is refused, and left as it was."""
    import finetune
    from maepl.config import FinetuneConfig

    out = tmp_path / "ft"
    best = out / "export" / "best"
    best.mkdir(parents=True)
    (best / "model.safetensors").write_bytes(b"weights")
    (out / "config.yaml").write_text("earlier run\n")
    args = ["--model", "vit_tiny_patch16_224", "--dataset", "sample", "--input_size", "28"]
    args += ["--patch_size", "7", "--in_chans", "1", "--embed_dim", "24", "--depth", "1"]
    args += ["--num_heads", "2", "--num_workers", "0", "--output_dir", str(out), "--overwrite"]
    for source in (best, out / "export", best / "model.safetensors"):
        cfg = parse_config(FinetuneConfig, args + ["--finetune", str(source)])
        with pytest.raises(ConfigError, match=f"finetune: {re.escape(str(source))} lies in"):
            finetune.main(cfg)
    assert (best / "model.safetensors").read_bytes() == b"weights"
    assert (out / "config.yaml").read_text() == "earlier run\n"


# ---------------------------------------------------------------------------- 7. untrusted files
class RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_crafted_pickles_are_never_unpickled(tmp_path, tiny_cfg):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pth"
    evil.write_bytes(pickle.dumps({"model": RunsCode(marker)}))
    with pytest.raises(ConfigError, match="resume: .*evil.pth is a file"):
        tiny_cfg(resume=str(evil))  # refused by the config check, before any data
    # a real checkpoint whose weights file is replaced by the pickle: every check before the
    # weights passes (same architecture, complete folder), and safetensors refuses to parse it
    pretrain.main(tiny_cfg(max_steps=1, save_every_steps=1))
    (ckpt,) = sorted((tmp_path / "run" / "checkpoints").glob("step_*"))
    (ckpt / "model.safetensors").write_bytes(evil.read_bytes())
    from safetensors import SafetensorError

    with pytest.raises(SafetensorError, match="header"):  # the weights were reached and refused
        pretrain.main(tiny_cfg(resume=str(ckpt), epochs=1, overwrite=True))
    assert not marker.exists()


# ---------------------------------------------------------------------------- 8. long runs
def test_soak_memory_logs_and_checkpoints_stay_bounded(tmp_path):
    out = tmp_path / "soak"
    cmd = [
        sys.executable,
        "pretrain.py",
        *TINY,
        "--input_size",
        "16",
        "--batch_size",
        "4",
        "--max_steps",
        "2500",
        "--save_every_steps",
        "250",
        "--keep_last",
        "2",
        "--log_every",
        "50",
        "--num_workers",
        "0",
        "--output_dir",
        str(out),
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    samples = []  # (step, rss)
    ps = psutil.Process(proc.pid)
    while proc.poll() is None:
        try:
            rss = ps.memory_info().rss
        except psutil.NoSuchProcess:
            break
        log = out / "log.jsonl"
        step = sum(1 for _ in log.open()) * 50 if log.exists() else 0
        samples.append((step, rss))
        time.sleep(0.1)
    assert proc.wait() == 0
    # a leak grows with the step count: compare the first and last fifth of the run's samples
    # (after warm-up), medians to ignore a transient spike during a checkpoint save
    steady = [r for s, r in samples if s >= 250]
    assert len(steady) >= 10, samples
    fifth = len(steady) // 5
    early = sorted(steady[:fifth])[fifth // 2]
    late = sorted(steady[-fifth:])[fifth // 2]
    trace = [(s, round(r / 2**20)) for s, r in samples[:: max(1, len(samples) // 20)]]
    assert late - early < 40 * 2**20, f"RSS {early / 2**20:.0f} -> {late / 2**20:.0f} MiB: {trace}"
    rows = scalar_rows(out)
    assert [r["step"] for r in rows] == list(range(50, 2550, 50))
    sizes = [len(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert max(sizes) < 2 * min(sizes)  # linear growth: rows of bounded size
    assert [p.name for p in complete_checkpoints(out)] == ["step_00002250", "step_00002500"]
    assert not list((out / "checkpoints").glob(".tmp_*"))


@pytest.mark.parametrize("script", ["finetune", "linprobe"])
def test_exact_resume_of_finetune_and_linprobe(script, monkeypatch, tmp_path):
    import finetune
    import linprobe
    from maepl.config import FinetuneConfig, LinprobeConfig

    mod, cls = (finetune, FinetuneConfig) if script == "finetune" else (linprobe, LinprobeConfig)
    # finetune: mixup/cutmix draw from NumPy's RNG in the main process, drop path (depth 2: the
    # second block's rate is nonzero) from torch's global CPU RNG, which creating a DataLoader
    # iterator must not draw from; accumulation of 2
    args = [
        "--model",
        "vit_tiny_patch16_224",
        "--dataset",
        "sample",
        "--input_size",
        "28",
        "--patch_size",
        "7",
        "--in_chans",
        "1",
        "--embed_dim",
        "24",
        "--depth",
        "2",
        "--num_heads",
        "2",
        "--batch_size",
        "32",
        "--accum_iter",
        "2",
        "--max_steps",
        "6",
        "--num_workers",
        "0",
        "--blr",
        "1e-2",
        "--warmup_epochs",
        "0.01",
    ]
    if script == "finetune":
        args += ["--drop_path", "0.2"]

    def run(out, *extra):
        return mod.main(parse_config(cls, args + ["--output_dir", str(tmp_path / out), *extra]))

    ref = run("ref")
    StopAtMicroStep.k = 7  # mid-accumulation of step 4
    monkeypatch.setattr(maepl.loop, "StopFlag", StopAtMicroStep)
    assert run("cut")["stopped_by_signal"]
    monkeypatch.undo()
    cut = run("cut", "--resume", "auto", "--num_workers", "2")
    final = "checkpoints/step_00000006"
    for f in ("model.safetensors", "optimizer.safetensors"):
        tensors_equal(tmp_path / "ref" / final / f, tmp_path / "cut" / final / f)
    # counters, lr and the optimizer's groups; the accuracy; fine-tuning's export
    states = [json.loads((tmp_path / r / final / "state.json").read_text()) for r in ("ref", "cut")]
    for key in ("step", "epoch", "batch_in_epoch"):
        assert states[0][key] == states[1][key], key
    assert states[0]["optimizer"]["param_groups"] == states[1]["optimizer"]["param_groups"]
    assert (ref["top1"], ref["top5"]) == (cut["top1"], cut["top5"])
    if script == "finetune":
        last = "export/last/model.safetensors"
        tensors_equal(tmp_path / "ref" / last, tmp_path / "cut" / last)
