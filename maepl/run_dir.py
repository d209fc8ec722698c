"""What a run checks of its output folder and of the checkpoint it resumes, before it writes
anything: another run's folder, an ``--overwrite`` that would delete the weights to load, a
resume under other batch units or another architecture, training settings a resume changes."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path

from .config_io import ConfigError

# what --overwrite deletes in output_dir (a run's outputs; config.yaml is rewritten)
OVERWRITTEN = ("checkpoints", "tensorboard", "log.jsonl", "export", "vis")
# settings in whose units a checkpoint counts its position (step, batch_in_epoch)
SCHEDULE_KEYS = ("batch_size", "accum_iter", "num_processes")
# keys a resume may change without changing what is trained (I/O, logging, the launch)
RUN_KEYS = frozenset(
    "config resume overwrite output_dir num_workers pin_mem log_every save_every "
    "save_every_steps keep_last async_save profile_steps profile_start vis_every strict_data "
    "download data_path compile compile_mode max_nonfinite eval max_steps "
    "initial_checkpoint".split()  # a resume loads the checkpoint's weights, not these
)


def recorded_config(cfg) -> dict:
    """``cfg`` as a checkpoint records it: ``mixed_precision`` as resolved (``auto`` depends on
    the machine and the launcher, so a resume elsewhere may train in another precision)."""
    from .config import resolve_precision

    return {**dataclasses.asdict(cfg), "mixed_precision": resolve_precision(cfg.mixed_precision)}


def changed_settings(saved: dict, cfg) -> dict[str, tuple]:
    """Training settings of ``cfg`` that differ from a checkpoint's recorded config ``saved``:
    {key: (recorded, now)}. A resume may change them on purpose (``--epochs`` to extend a
    schedule, as MAE users do); it is told, and ``benchmarks/quality.py`` refuses it."""
    now = recorded_config(cfg)
    unknown = {"mixed_precision"} if saved.get("mixed_precision") == "auto" else set()  # older
    return {
        k: (saved[k], now[k])
        for k in now
        if k in saved
        and k not in RUN_KEYS | unknown
        and k not in SCHEDULE_KEYS
        and saved[k] != now[k]
    }


def check_overwrite_keeps_sources(cfg) -> None:
    """Refuse an ``--overwrite`` that would delete the weights this run is asked to load."""
    if not cfg.overwrite or cfg.resume:  # with --resume nothing is deleted
        return
    out = Path(cfg.output_dir).resolve()
    doomed = [out / name for name in OVERWRITTEN]
    for key in ("finetune", "initial_checkpoint"):
        value = getattr(cfg, key, "") or ""
        if not value or value == "auto" or not Path(value).exists():
            continue
        src = Path(value).resolve()
        for target in doomed:
            if src == target or target in src.parents:
                raise ConfigError(
                    f"{key}: {value} lies in {target}, which --overwrite deletes before the "
                    f"weights are read; copy them out of {out} first, or choose another "
                    "--output_dir"
                )


def check_run_dir(cfg) -> None:
    """What ``Run`` checks of ``output_dir`` before writing in it (nothing with ``--eval``,
    which writes nothing); scripts that read weights before creating the Run call it first."""
    if not getattr(cfg, "eval", False):
        check_output_dir(cfg)
        check_overwrite_keeps_sources(cfg)


def check_output_dir(cfg) -> None:
    """Refuse to start over a different run: its checkpoints and logs would be mixed with ours."""
    out = Path(cfg.output_dir)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"output_dir: {out} is a file, not a folder")
    if (out / "config.yaml").exists() and not cfg.resume and not cfg.overwrite:
        raise ConfigError(
            f"output_dir: {out} already holds a run (config.yaml); pass --resume auto to "
            "continue it, --overwrite to replace it, or choose another --output_dir"
        )


def clear_overwritten(out: Path) -> None:
    """``--overwrite``: delete the earlier run's outputs (the new config.yaml replaces its own)."""
    for stale in OVERWRITTEN:
        p = out / stale
        shutil.rmtree(p) if p.is_dir() else p.unlink(missing_ok=True)


def read_state(ckpt: Path) -> dict:
    """A checkpoint's state.json, or a ConfigError naming it."""
    try:
        return json.loads((ckpt / "state.json").read_text())
    except (OSError, ValueError) as err:
        raise ConfigError(f"resume: {ckpt / 'state.json'} cannot be read ({err})") from None


def check_schedule(ckpt: Path, now: dict[str, int]) -> tuple[list[str], dict | None]:
    """A checkpoint counts its place (step, batch_in_epoch) in micro-batches of one rank.

    A resume may split the same effective batch (batch_size x accum_iter x processes) another
    way, e.g. a job preempted on 8 GPUs resumed on 4 with twice the accumulation: the steps
    per epoch, the learning rate and the images of every step are those of the saved
    schedule (each step reads the next effective-batch block of the epoch's permutation,
    however it is split). A checkpoint saved mid-accumulation resumes from the start of its
    step (its partial gradients belong to the old split; the weights and optimizer have not
    taken the step yet). Another effective batch is refused, naming the values: the schedule
    and data order would not continue.

    Returns the keys the checkpoint does not record (not checked) and, for a resume under
    another split, the saved schedule (else None).
    """
    meta = read_state(ckpt)
    saved = meta.get("schedule")
    if saved is None:  # written before maepl recorded it: from its config, if there
        conf = meta.get("config", {})
        saved = dict(
            batch_size=conf.get("batch_size"),
            accum_iter=conf.get("accum_iter"),
            num_processes=meta.get("num_processes"),
        )
    missing = [k for k in SCHEDULE_KEYS if saved.get(k) is None]
    changed = [k for k in SCHEDULE_KEYS if saved.get(k) is not None and saved[k] != now[k]]
    if not changed:
        return missing, None
    what = ", ".join(f"{k} {saved[k]} (now {now[k]})" for k in changed)
    if missing:
        raise ConfigError(
            f"resume: {ckpt} was written under other settings: {what}, and does not record "
            f"{', '.join(missing)}, so its position cannot be converted; resume with the saved "
            "values, or start a new run (another --output_dir, or --overwrite)"
        )
    eff_saved = saved["batch_size"] * saved["accum_iter"] * saved["num_processes"]
    eff_now = now["batch_size"] * now["accum_iter"] * now["num_processes"]
    if eff_saved != eff_now:
        per_proc, left = divmod(eff_saved, now["num_processes"])
        if left:
            hint = (
                f"{eff_saved} images a step cannot be split over {now['num_processes']} processes"
            )
        else:  # the largest batch up to the one asked for that divides a process's share
            b = max(d for d in range(1, min(per_proc, now["batch_size"]) + 1) if per_proc % d == 0)
            hint = (
                f"keep it with --batch_size {b} --accum_iter {per_proc // b} on "
                f"{now['num_processes']} process(es)"
            )
        raise ConfigError(
            f"resume: {ckpt} was written under other settings: {what}; the effective batch "
            f"(batch_size x accum_iter x processes) was {eff_saved}, now {eff_now}, so the "
            f"schedule and data order would not continue ({hint}). Resume with the same "
            "effective batch, or start a new run (another --output_dir, or --overwrite)"
        )
    return missing, saved


def same_weights(saved: str | None, now: str | None) -> bool:
    """Whether a resumed probe's recorded ``--finetune`` and the command's name the same
    encoder: the same string, or the same file or folder (relative or absolute). A recorded
    path that no longer exists (the export moved) cannot be compared: the checkpoint holds the
    frozen encoder it was trained on, and that is what the resume loads."""
    if saved == now:
        return True
    if not saved:  # the probe was trained on a random encoder
        return False
    if not Path(saved).exists():
        return True
    return bool(now) and Path(now).exists() and os.path.samefile(saved, now)


def check_architecture(ckpt: Path, cfg, arch_keys: tuple[str, ...]) -> dict:
    """Refuse to resume ``ckpt`` under other values of ``arch_keys``; returns its config."""
    saved = read_state(ckpt).get("config", {})
    changed = [
        k
        for k in arch_keys
        if saved.get(k) != getattr(cfg, k)
        and not (k == "finetune" and same_weights(saved.get(k), cfg.finetune))
    ]
    if changed:
        raise ConfigError(
            f"resume: {ckpt} was trained with other values of {', '.join(changed)} ("
            + ", ".join(f"{k}={saved.get(k)!r}, now {getattr(cfg, k)!r}" for k in changed)
            + ")"
        )
    return saved
