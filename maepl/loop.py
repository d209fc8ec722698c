"""Plumbing shared by pretrain.py, finetune.py and linprobe.py; the steps stay in the scripts.

``Run`` owns the Accelerator, the run directory, counters, checkpoints and resume, the
SIGTERM/SIGINT stop, non-finite step skipping and the log. A script's loop reads:

    for imgs, labels in run.batches(loader, sampler, on_epoch_end):
        with run.accumulate():
            loss = ...                       # the script's forward pass and loss
            run.backward(loss)               # optimizer step on the last micro-batch
        run.end_micro({"loss": loss, ...})   # counters, log line, periodic save, stop check
"""

from __future__ import annotations

import contextlib
import json
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.utils import DistributedType, set_seed
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from .checkpoint import (
    CheckpointError,
    CheckpointWriter,
    load_checkpoint,
    raise_together,
    resolve_resume,
    save_checkpoint,
    set_aside_checkpoints_after,
    wait_for_earlier_writes,
)
from .config import ConfigError, dump_config, resolve_precision
from .guard import NonfiniteSteps, StopFlag
from .loaders import ShardedSampler, train_loader
from .metrics import LogWindow
from .optim import lr_at, set_lr
from .prefetch import Prefetcher
from .profiling import Profiler
from .run_dir import (
    changed_settings,
    check_architecture,
    check_run_dir,
    check_schedule,
    clear_overwritten,
    recorded_config,
)
from .tracking import Tracker

# gradients already whole on every rank after backward (not sharded, not reduced later)
_PLAIN = (DistributedType.NO, DistributedType.MULTI_GPU, DistributedType.MULTI_CPU)


class Run:
    """One training run: call order is ``Run(cfg, desc, arch_keys)``, ``plan()``, ``prepare()``,
    ``resume()``, then the loop, then ``finish()``. Nothing is written in ``output_dir`` before
    ``resume()`` (or a summary): a run refused by any check leaves the folder as it was."""

    def __init__(self, cfg, desc: str, arch_keys: tuple[str, ...]):
        # --eval reads weights and writes nothing in output_dir: not its config.yaml, log,
        # TensorBoard events or checkpoints (evaluating a run's checkpoint leaves the run as it was)
        self.read_only = bool(getattr(cfg, "eval", False))
        wait_for_earlier_writes()  # of a run in this process that raised during a write
        check_run_dir(cfg)  # on every rank, before rank 0 writes config.yaml (barrier below)
        self.cfg, self.desc = cfg, desc
        self.precision = resolve_precision(cfg.mixed_precision)
        # Accelerate keeps one precision per process; a second run in the same process (a
        # linear probe after pretraining, as benchmarks/quality.py does) may use another. The
        # process-group state (PartialState) is kept.
        if AcceleratorState._shared_state.get("_mixed_precision", self.precision) != self.precision:
            AcceleratorState._reset_state()
        # cpu=True without CUDA: Accelerate only detects a torchrun/gloo launch on CPU when told
        self.accelerator = Accelerator(
            mixed_precision=self.precision,
            gradient_accumulation_steps=cfg.accum_iter,
            cpu=not torch.cuda.is_available(),
        )
        acc = self.accelerator
        self.device, self.rank, self.world = acc.device, acc.process_index, acc.num_processes
        self.main = acc.is_main_process
        self.out = Path(cfg.output_dir)
        self._resume_from = resolve_resume(cfg.resume, self.out)
        if self.read_only and cfg.resume and self._resume_from is None:
            raise ConfigError(
                f"resume: --eval --resume {cfg.resume} found no complete checkpoint under "
                f"{self.out}; nothing trained to evaluate"
            )
        self.changed: dict[str, tuple] = {}  # training settings a resume changes (note, event)
        self._resplit: dict | None = None  # the saved schedule, resumed under another split
        if self._resume_from is not None:  # refused here, before any model is built
            saved = check_architecture(self._resume_from, cfg, arch_keys)
            self.changed = changed_settings(saved, cfg)
            if "finetune" in arch_keys and saved.get("finetune") != cfg.finetune:
                acc.print(  # accepted by check_architecture: moved, or another path to it
                    f"note: resume: the encoder was read from {saved.get('finetune')} "
                    f"(now {cfg.finetune or 'not given'}); the checkpoint's copy is resumed"
                )
            if not self.read_only:
                missing, self._resplit = check_schedule(self._resume_from, self._schedule())
                if self._resplit:  # the same effective batch split another way: told, logged
                    now = self._schedule()
                    self.changed.update(
                        (k, (v, now[k])) for k, v in self._resplit.items() if v != now[k]
                    )
                if missing:
                    acc.print(
                        f"note: resume: {self._resume_from} does not record "
                        f"{', '.join(missing)}; not checked"
                    )
        # every rank has checked output_dir before rank 0 changes it (claim_output_dir): a
        # late rank would otherwise find our config.yaml (or a half-deleted run) and refuse
        acc.wait_for_everyone()
        self._claimed = self.read_only  # --eval never writes there
        self.step = self.epoch = self.batch_in_epoch = 0
        self.bad_images = 0
        self.nonfinite = NonfiniteSteps(cfg.max_nonfinite)
        # bad_images counts all ranks: the count a checkpoint recorded + each rank's since
        self._bad_base = self._bad_new = 0
        self.stopped, self.last_log = False, {}
        self.saved_at = (-1, -1, -1)  # place() of the last checkpoint saved or resumed from
        self.generator: torch.Generator | None = None
        self.extra_state: dict = {}  # script counters to checkpoint (e.g. best accuracy)
        self.tracker: Tracker | None = None
        # on every rank (only the main one writes in it): save_checkpoint syncs ranks alike
        self.writer = CheckpointWriter() if cfg.async_save else None

    # ------------------------------------------------------------------ data, schedule
    def train_loader(self, dataset) -> tuple[DataLoader, ShardedSampler]:
        """This rank's shuffled shard, resumable mid-epoch (:func:`~maepl.loaders.train_loader`);
        plans the schedule from its length."""
        pin = self.cfg.pin_mem and self.device.type == "cuda"
        loader, sampler = train_loader(dataset, self.cfg, self.world, self.rank, pin)
        self.plan(len(sampler))
        return loader, sampler

    def plan(self, samples_per_rank: int) -> None:
        """Steps per epoch from this rank's share of the data; lr from MAE's scaling rule."""
        cfg = self.cfg
        self.micro_per_epoch = (
            (samples_per_rank // cfg.batch_size) // cfg.accum_iter * cfg.accum_iter
        )
        self.steps_per_epoch = self.micro_per_epoch // cfg.accum_iter
        if self.steps_per_epoch == 0 and not self.read_only:  # --eval trains no step
            raise ConfigError(
                f"batch_size: {samples_per_rank} images per process give no full step of "
                f"{cfg.batch_size} x accum_iter {cfg.accum_iter}"
            )
        self.total_steps = cfg.epochs * self.steps_per_epoch
        self.warmup_steps = round(cfg.warmup_epochs * self.steps_per_epoch)
        self.eff_batch = cfg.batch_size * cfg.accum_iter * self.world
        self.lr = cfg.lr if cfg.lr is not None else cfg.blr * self.eff_batch / 256
        self.stop_step = min(self.total_steps, cfg.max_steps) if cfg.max_steps else self.total_steps

    def describe(self) -> str:
        cfg = self.cfg
        if self.read_only:
            where = f"precision {self.precision}, device {self.device}"
            return f"{self.world} process(es), evaluation only, {where}"
        base_lr = self.lr * 256 / self.eff_batch  # --blr, or what a given --lr amounts to
        return (
            f"{self.world} process(es), effective batch {self.eff_batch} = {cfg.batch_size} x "
            f"{cfg.accum_iter} accum x {self.world}; base lr {base_lr:.2e}, actual lr "
            f"{self.lr:.2e}; {self.steps_per_epoch} steps/epoch, {self.total_steps} total, "
            f"precision {self.precision}, device {self.device}"
        )

    # ------------------------------------------------------------------ model, resume
    def prepare(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, seed: int):
        """Wrap for the launch (DDP, autocast); a per-rank generator for the script's noise."""
        if self.cfg.compile:
            model.compile(mode=self.cfg.compile_mode)  # in place: no "_orig_mod." in keys
        self.model, self.optimizer = self.accelerator.prepare(model, optimizer)
        # A fused AdamW skips a non-finite step on the device (its found_inf input), so the loop
        # needs no host sync per step; other optimizers (foreach on CPU) are skipped from Python.
        inner = getattr(self.optimizer, "optimizer", self.optimizer)
        fused = all(g.get("fused") for g in inner.param_groups)
        scaler = self.accelerator.scaler is not None  # fp16 on CUDA: the GradScaler's own skip
        self.nonfinite.device_skip = fused and not scaler
        self.nonfinite.scaler_skips = scaler
        self.generator = torch.Generator(device=self.device).manual_seed(
            seed * 1000 + self.rank + 1
        )
        return self.model, self.optimizer

    def _schedule(self) -> dict[str, int]:
        return dict(
            batch_size=self.cfg.batch_size, accum_iter=self.cfg.accum_iter, num_processes=self.world
        )

    def place(self) -> tuple[int, int, int]:
        """Where the run is: (step, epoch, batch_in_epoch)."""
        return self.step, self.epoch, self.batch_in_epoch

    @property
    def resuming(self) -> bool:
        """``resume()`` will load a checkpoint (weights loaded before it would be replaced)."""
        return self._resume_from is not None

    @property
    def last_saved(self) -> int:
        """The step of the last checkpoint saved or resumed from (-1: none yet)."""
        return self.saved_at[0]

    @property
    def unwrapped(self) -> torch.nn.Module:
        return self.accelerator.unwrap_model(self.model)

    def claim_output_dir(self) -> None:
        """Collective, once: ``--overwrite`` clears the earlier run's outputs and this run's
        config.yaml is written. Called when every check has passed and the weights are loaded
        (``resume()``), so that a refused run neither changes nor deletes what is there."""
        if self._claimed:
            return

        def claim() -> None:
            if self.cfg.overwrite and not self.cfg.resume:
                clear_overwritten(self.out)
            self.out.mkdir(parents=True, exist_ok=True)
            dump_config(self.cfg, self.out / "config.yaml")

        # on_main: none goes on before it is done, and a failure there (the path is a file, a
        # full disk) stops every process instead of leaving them waiting
        self.on_main(str(self.out), claim)
        self._claimed = True

    def resume(self) -> None:
        """Continue from ``cfg.resume`` (auto: the newest complete checkpoint, if any), then
        claim the output folder and start the log."""
        cfg = self.cfg
        ckpt = self._resume_from
        if ckpt is not None:
            if self.changed:
                what = ", ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in self.changed.items())
                self.accelerator.print(
                    f"note: resuming {ckpt} with other training settings than it was trained "
                    f"with: {what}"
                )
            meta = load_checkpoint(
                ckpt,
                self.accelerator,
                self.model,
                self.optimizer,
                self.generator,
                partial_grads=not self._resplit,
            )
            for key in ("step", "epoch", "batch_in_epoch", "bad_images"):
                setattr(self, key, meta[key])
            if self._resplit:  # the epoch's whole steps done, in this run's micro-batches
                saved_accum = self._resplit["accum_iter"]
                if self.batch_in_epoch % saved_accum:
                    self.accelerator.print(
                        f"note: resume: {ckpt} was saved mid-accumulation; its partial "
                        f"gradients belong to the saved split, so step {self.step + 1} "
                        "starts again from its first image"
                    )
                self.batch_in_epoch = self.batch_in_epoch // saved_accum * cfg.accum_iter
            if not meta["rng_restored"] and not self.read_only:
                self._reseed(meta.get("num_processes"))
            self.nonfinite.total, self.nonfinite.run = (
                meta["nonfinite_total"],
                meta["nonfinite_run"],
            )
            self._bad_base = self.bad_images
            self.extra_state = meta.get("extra", {})
            self.saved_at = self.place()
            self.accelerator.print(f"resumed from {ckpt} at step {self.step} (epoch {self.epoch})")
        self.claim_output_dir()
        if ckpt is not None and self.main and not self.read_only:
            # resumed from an older checkpoint: the later ones belong to the branch left
            aside = set_aside_checkpoints_after(self.out, self.step)
            if aside is not None:
                print(
                    f"note: checkpoints after step {self.step} belong to the run this one "
                    f"branches from; moved to {aside} (not pruned, not resumed by auto)",
                    flush=True,
                )
        self.tracker = Tracker(
            self.out,
            enabled=self.main and not self.read_only,
            # --resume with no checkpoint found starts at step 0: a killed run's rows go
            resume_step=self.step if ckpt is not None else (-1 if self.cfg.resume else None),
        )
        if self.changed:  # the log keeps the record (config.yaml holds this launch's values)
            self.tracker.event(self.step, "resumed_with_changed_settings", changed=self.changed)
        # until this run logs: the last values logged before the checkpoint (a run resumed at
        # its last step reports its final losses, not none)
        self.last_log = dict(self.tracker.last_values)
        self.stop = StopFlag()
        self.bar = tqdm(
            total=self.stop_step,
            initial=self.step,
            disable=not self.main or self.read_only,
            desc=self.desc,
            dynamic_ncols=True,
        )
        self.window = LogWindow(self.device, getattr(cfg, "data_pipeline", "cpu") == "gpu")
        self.profiler = Profiler(self) if self.cfg.profile_steps else None  # --profile_steps

    def _reseed(self, saved_world: int | None) -> None:
        """The checkpoint has no RNG streams for this rank (written by another number of
        processes, whose per-rank streams do not map onto these, or the rank's file is gone):
        each rank draws new ones from (seed, step, rank), not the streams of step 0 again."""
        seeds = np.random.SeedSequence([self.cfg.seed, self.step, self.rank]).generate_state(2)
        set_seed(int(seeds[0]))  # Python's, NumPy's and torch's (CUDA's too)
        if self.generator is not None:
            self.generator.manual_seed(int(seeds[1]))
        why = (
            f"was written by {saved_world} process(es), now {self.world}"
            if saved_world != self.world
            else "lacks this rank's random state"
        )
        self.accelerator.print(
            f"note: resume: the checkpoint {why}; masks, dropout and mixup draw anew from "
            f"seed {self.cfg.seed} and step {self.step}"
        )

    def _count_bad(self, new_on_all_ranks: float | None = None) -> None:
        """``bad_images`` over all ranks (collective unless the sum is given)."""
        if new_on_all_ranks is None:
            mine = torch.tensor([float(self._bad_new)], device=self.device)
            new_on_all_ranks = self.accelerator.reduce(mine, "sum").item()
        self.bad_images = self._bad_base + int(new_on_all_ranks)

    def save(self, with_grads: bool = False) -> None:
        self._settle()  # the counters below must be current
        self._count_bad()
        state = dict(
            step=self.step,
            epoch=self.epoch,
            batch_in_epoch=self.batch_in_epoch,
            nonfinite_total=self.nonfinite.total,
            nonfinite_run=self.nonfinite.run,
            bad_images=self.bad_images,
            extra=self.extra_state,
            config=recorded_config(self.cfg),
            schedule=self._schedule(),
        )
        save_checkpoint(
            self.accelerator,
            self.out,
            self.step,
            self.model,
            self.optimizer,
            state,
            self.generator,
            self.cfg.keep_last,
            with_grads=with_grads,
            writer=self.writer,
        )
        self.saved_at = self.place()

    # ------------------------------------------------------------------ the loop
    def batches(
        self,
        loader,
        sampler,
        on_epoch_end: Callable[[], None] | None = None,
        augment: Callable | None = None,
    ) -> Iterator:
        """Micro-batches until the schedule, ``max_steps`` or a signal ends the run.

        ``augment(imgs, epoch, index)`` -> (images on the device, unreadable files) turns raw
        batches into training inputs on the device (``--data_pipeline gpu``). It runs ahead of
        the loop in a thread (:class:`~maepl.prefetch.Prefetcher`), which gives micro-batch k
        of the epoch the index k: the script must take each batch it is given (one
        ``end_micro`` each), as pretrain.py does.
        """
        try:
            yield from self._batches(loader, sampler, on_epoch_end, augment)
        except BaseException:
            self.stop.restore()
            raise
        finally:
            # persistent workers live on the loader: stop them now, also when the loop raised
            # (left to interpreter exit, their shutdown can stall)
            loader._iterator = None
            self.bar.close()
            # the handlers stay until close(): a SIGTERM during the final save or the exports
            # (a scheduler signalling the group twice, say) only sets the flag
            self.stop.settle()

    def _batches(self, loader, sampler, on_epoch_end, augment) -> Iterator:
        cfg = self.cfg
        while self.step < self.stop_step and self.epoch < cfg.epochs and not self.stopped:
            sampler.set_epoch(self.epoch, start=self.batch_in_epoch * cfg.batch_size)
            self.accelerator.step = self.batch_in_epoch  # Accelerate's micro-step counter
            epoch_batches = contextlib.nullcontext(loader)
            if augment is not None:  # augmented ahead in a thread, seeded by the batch's place
                left = self.micro_per_epoch - self.batch_in_epoch
                epoch_batches = Prefetcher(
                    loader, augment, self.epoch, self.batch_in_epoch, left, self.device
                )
            with epoch_batches as batches:
                self.window.prefetcher = batches if augment is not None else None
                it = iter(batches)
                while True:
                    t0 = time.perf_counter()  # the loop's wait for its next batch (data_ms)
                    with torch.profiler.record_function("maepl.wait_for_batch"):
                        item = next(it, None)
                    self.window.data_s += time.perf_counter() - t0
                    if item is None:
                        break
                    imgs, labels, bad = item
                    if self.batch_in_epoch >= self.micro_per_epoch or self.step >= self.stop_step:
                        break
                    if bad:  # unreadable files, replaced in the batch by a readable one
                        self._bad_new += len(bad)
                        msg = f"[rank {self.rank}] skipped unreadable images: {bad}"
                        print(msg, file=sys.stderr)
                        # the step this micro-batch belongs to (dropped on a resume before it)
                        self.tracker.event(self.step + 1, "bad_images", files=bad)
                    if cfg.compile:  # CUDA graphs (reduce-overhead): a new step begins, whose
                        # replay may reuse the last one's output memory (end_micro has copied
                        # the metrics; accum_iter > 1 is refused with CUDA graphs: .grad)
                        torch.compiler.cudagraph_mark_step_begin()
                    # non_blocking: a blocking copy would make the host wait for the GPU every
                    # step (cudaStreamSynchronize), so it could not queue the next step ahead
                    yield (
                        imgs.to(self.device, non_blocking=True),
                        labels.to(self.device, non_blocking=True),
                    )
                    if self.stopped:
                        break
            self.window.end_epoch()
            if not self.stopped and self.batch_in_epoch >= self.micro_per_epoch:
                self.epoch, self.batch_in_epoch = self.epoch + 1, 0
                if on_epoch_end is not None:
                    on_epoch_end()
                if self.epoch % cfg.save_every == 0 and self.last_saved != self.step:
                    self.save()

    def accumulate(self):
        return self.accelerator.accumulate(self.model)

    @property
    def sync(self) -> bool:
        """True on the micro-batch that ends an optimizer step."""
        return self.accelerator.sync_gradients

    def backward(self, loss: torch.Tensor) -> None:
        """Backward; on the last micro-batch: lr, clipping, the step unless the gradient norm
        is not finite (:class:`~maepl.guard.NonfiniteSteps`)."""
        self.accelerator.backward(loss)
        if self.sync:
            cfg = self.cfg
            set_lr(
                self.optimizer,
                lr_at(self.step, self.lr, cfg.min_lr, self.warmup_steps, self.total_steps),
            )
            params = [p for g in self.optimizer.param_groups for p in g["params"]]
            norm = self._grad_norm(params, cfg.clip_grad)
            self.nonfinite.step(self.optimizer, norm, self.step + 1)
        else:
            self.optimizer.step()  # Accelerate skips it until the last micro-batch
        self.optimizer.zero_grad(set_to_none=True)

    def _grad_norm(self, params: list[torch.Tensor], clip: float | None) -> torch.Tensor:
        """The global gradient norm (after unscaling fp16), clipped to ``clip`` when set.

        Unclipped under DDP or one process, only the norm is computed:
        ``clip_grad_norm_(inf)`` would also multiply every gradient by 1, one more pass over
        them each step. DDP has already averaged the gradients, so the local norm is global.
        """
        acc = self.accelerator
        total_norm = getattr(torch.nn.utils, "get_total_norm", None)  # torch >= 2.6
        if clip is not None or total_norm is None or acc.distributed_type not in _PLAIN:
            return acc.clip_grad_norm_(params, clip or float("inf"))
        acc.unscale_gradients()
        return total_norm([p.grad for p in params if p.grad is not None])

    def _settle(self) -> None:
        """Read the pending non-finite verdicts (one host sync): count, log, stop if too many."""

        def report(step: int) -> None:
            self.tracker.event(step, "nonfinite_grad_norm", skipped=self.precision != "fp16")

        try:
            self.nonfinite.settle(report, self.last_saved)
        except FloatingPointError:
            # the error names the last checkpoint: --async_save finishes writing it first (a
            # failed write raises CheckpointError instead, from this error)
            if self.writer is not None:
                self.writer.wait()
            raise

    def end_micro(self, metrics: dict[str, torch.Tensor]) -> None:
        """Book-keeping after one micro-batch; ``metrics`` are scalar tensors to average."""
        cfg = self.cfg
        self.batch_in_epoch += 1
        self.window.add(metrics)
        if self.sync:
            self.step += 1
            self.bar.update(1)
            if self.profiler is not None:
                self.profiler.step()
            if self.nonfinite.due:
                self._settle()
            if self.step % cfg.log_every == 0 or self.step == self.stop_step:
                self._write_log()
            if cfg.save_every_steps and self.step % cfg.save_every_steps == 0:
                self.save()
        if self.stop.agreed():  # a signal on any rank: save here, mid-accumulation included
            # unless this very place was just saved (save_every_steps): saving the same step
            # again would only replace a complete checkpoint while the kill may be near
            if self.saved_at != self.place():
                self.save(with_grads=not self.sync)
            self.stopped = True

    def _write_log(self) -> None:
        if self.writer is not None:  # a checkpoint written in the background failed: stop now
            self._writer_done(self.writer.poll)
        self._settle()
        # one host sync per log line: averages over finite micro-batches of all ranks
        row, timings, bad_new = self.window.reduce(
            self.accelerator, self._bad_new, self.cfg.batch_size * self.world, self.cfg.accum_iter
        )
        self._count_bad(bad_new)
        group = self.optimizer.param_groups[0]
        row.update(
            epoch=round(self.epoch + self.batch_in_epoch / self.micro_per_epoch, 4),
            lr=group["lr"] / group.get("lr_scale", 1.0),
            **timings,
            nonfinite_steps=self.nonfinite.total,
            bad_images=self.bad_images,
        )
        self.last_log = row
        self.log(row)
        if "loss" in row:
            self.bar.set_postfix(loss=f"{row['loss']:.4f}")
        self.window.reset()

    # ------------------------------------------------------------------ the end
    def finish(self, summary: dict | None = None) -> dict:
        """Final checkpoint, the rank-consistency check, summary.json; returns the summary."""
        if self.profiler is not None:
            self.profiler.close()
        if self.last_saved != self.step:
            self.save()
        self.wait_for_checkpoint()
        out = {
            **self.last_log,
            **(summary or {}),
            "step": self.step,
            "epoch": self.epoch,
            "stopped_by_signal": self.stopped,
        }
        if self.stopped:
            self.accelerator.print(
                f"stopped by signal at step {self.step}; resume with --resume auto"
            )
        else:
            # every rank must hold the same weights; a divergence means a broken collective
            digest = torch.stack([p.detach().double().sum() for p in self.unwrapped.parameters()])
            out["ranks_in_sync"] = bool((self.accelerator.gather(digest[None]) == digest).all())
            if not out["ranks_in_sync"]:
                self.accelerator.print("warning: model weights differ between processes")
        self.write_summary(out)
        return out

    def write_summary(self, summary: dict) -> None:
        """Collective: ``<output_dir>/summary.json`` (main process); scripts call it again once
        they have evaluated, so that the file holds the final accuracy too."""
        if self.read_only:  # --eval (linprobe.py --knn --eval too) writes nothing there
            return
        path = self.out / "summary.json"
        self.claim_output_dir()  # linprobe.py --knn writes only this
        self.on_main(str(path), lambda: path.write_text(json.dumps(summary, indent=1)))

    def log(self, values: dict) -> None:
        """Collective: a row of ``log.jsonl`` and TensorBoard at the current step."""
        self.on_main(str(self.out / "log.jsonl"), lambda: self.tracker.log(self.step, values))

    def on_main(self, what: str, write: Callable[[], object]) -> None:
        """Collective: ``write()`` (a file the main process writes: a log line, an image, an
        export) runs on the main process. If it raises there, every process raises (the others
        a :class:`PeerError` naming ``what``) instead of waiting in the next collective."""
        error = None
        if self.main:
            try:
                write()
            except Exception as err:  # re-raised on this rank by raise_together
                error = err
        raise_together(self.accelerator, error, what)

    def wait_for_checkpoint(self) -> None:
        """Collective: returns once the last checkpoint is complete on disk (``--async_save``
        writes it in a thread); raises if writing it failed."""
        if self.writer is not None:
            self._writer_done(self.writer.wait)
        self.accelerator.wait_for_everyone()

    def _writer_done(self, check: Callable[[], None]) -> None:
        """``check`` (the writer's poll or wait) raises on the main process only: every rank
        raises with it, none is left waiting in the next collective."""
        error = None
        try:
            check()
        except CheckpointError as err:
            error = err
        raise_together(self.accelerator, error, "a checkpoint written in the background")

    def close(self) -> None:
        if self.writer is not None:
            self._writer_done(self.writer.wait)
        if getattr(self, "stop", None) is not None:
            self.stop.restore()
        if self.tracker is not None:
            self.tracker.close()
        self.accelerator.wait_for_everyone()
        self.accelerator.end_training()
