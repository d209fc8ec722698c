"""MAE + positional-label pretraining of a timm Vision Transformer, on Accelerate.

    python pretrain.py --config configs/quickstart.yaml
    accelerate launch --num_processes 8 pretrain.py --config configs/fmnist_vit_tiny.yaml
    torchrun --nproc_per_node 8 pretrain.py --model mae_vit_base_patch16 --data_path /imagenet

Read top to bottom: setup, data, model, resume, the training loop, exports. The loss is
assembled in one line of the loop: L = L_mae + pos_weight * L_pos.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import sys
import time
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from torch.utils.data import DataLoader
from torchvision.utils import save_image
from tqdm.auto import tqdm

from maepl.checkpoint import (
    export_encoder,
    export_full,
    load_checkpoint,
    resolve_resume,
    save_checkpoint,
)
from maepl.config import ARCH_KEYS, ConfigError, PretrainConfig, dump_config, parse_config
from maepl.data import (
    SeededTransformDataset,
    ShardedSampler,
    build_dataset,
    build_transform,
    collate_skip_bad,
    default_mean_std,
)
from maepl.guard import StopFlag, ignore_stop_signals
from maepl.models.mae import build_mae, encoder_model_args
from maepl.optim import build_adamw, lr_at, param_groups_weight_decay, set_lr
from maepl.tracking import Tracker, reconstruction_grid


def check_output_dir(cfg: PretrainConfig) -> None:
    """Refuse to start over a different run: its checkpoints and logs would be mixed with ours."""
    out = Path(cfg.output_dir)
    if (out / "config.yaml").exists() and not cfg.resume and not cfg.overwrite:
        raise ConfigError(
            f"output_dir: {out} already holds a run (config.yaml); pass --resume auto to "
            "continue it, --overwrite to replace it, or choose another --output_dir"
        )


def readable_images(raw, n: int) -> list:
    """The first ``n`` images of ``raw`` that decode (for the reconstruction grid)."""
    out = []
    for i in range(min(len(raw), 10 * n)):
        try:
            out.append(raw[i][0])
        except Exception:  # unreadable files are counted by the training loop, not here
            continue
        if len(out) == n:
            break
    return out


def main(cfg: PretrainConfig) -> dict:
    # ------------------------------------------------------------------ checks, data
    # everything that can fail on user input happens before any process group exists
    check_output_dir(cfg)
    try:
        raw = build_dataset(cfg.dataset, cfg.data_path, train=True, download=cfg.download)
    except (FileNotFoundError, ValueError) as e:
        raise ConfigError(f"data_path: {e}") from None
    if len(raw) == 0:
        raise ConfigError(f"data_path: dataset {cfg.dataset} at {cfg.data_path} is empty")
    mean, std = default_mean_std(cfg.dataset, cfg.in_chans)
    mean, std = list(cfg.mean or mean), list(cfg.std or std)
    if len(mean) == 1:
        mean, std = mean * cfg.in_chans, std * cfg.in_chans
    transform = build_transform(True, cfg.input_size, cfg.in_chans, mean, std, (cfg.crop_min, 1.0))
    transform_eval = build_transform(False, cfg.input_size, cfg.in_chans, mean, std)
    dataset = SeededTransformDataset(raw, transform, cfg.seed, strict=cfg.strict_data)

    # ------------------------------------------------------------------ setup
    precision = cfg.mixed_precision
    if precision == "auto":
        bf16_ok = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
        precision = "bf16" if bf16_ok else "no"
    # cpu=True without CUDA: Accelerate only detects a torchrun/gloo launch on CPU when told
    accelerator = Accelerator(
        mixed_precision=precision,
        gradient_accumulation_steps=cfg.accum_iter,
        cpu=not torch.cuda.is_available(),
    )
    device, rank, world = accelerator.device, accelerator.process_index, accelerator.num_processes
    main_proc = accelerator.is_main_process
    out = Path(cfg.output_dir)
    if main_proc:
        if cfg.overwrite and not cfg.resume:
            for stale in ("checkpoints", "tensorboard", "log.jsonl", "export", "vis"):
                p = out / stale
                shutil.rmtree(p) if p.is_dir() else p.unlink(missing_ok=True)
        out.mkdir(parents=True, exist_ok=True)
        dump_config(cfg, out / "config.yaml")

    sampler = ShardedSampler(len(dataset), world, rank, cfg.seed, with_epoch=True)
    loader = DataLoader(
        dataset,
        batch_size=cfg.batch_size,
        sampler=sampler,
        num_workers=cfg.num_workers,
        pin_memory=cfg.pin_mem and device.type == "cuda",
        drop_last=True,
        collate_fn=collate_skip_bad,
        worker_init_fn=ignore_stop_signals,
        persistent_workers=cfg.num_workers > 0,  # epochs travel with the indices
    )
    # an optimizer step consumes accum_iter micro-batches; a trailing partial one is dropped
    steps_per_epoch = (len(sampler) // cfg.batch_size) // cfg.accum_iter
    micro_per_epoch = steps_per_epoch * cfg.accum_iter
    if steps_per_epoch == 0:
        raise ConfigError(
            f"batch_size: {len(dataset)} images over {world} processes give no full step of "
            f"{cfg.batch_size} x accum_iter {cfg.accum_iter}"
        )
    total_steps = cfg.epochs * steps_per_epoch
    warmup_steps = round(cfg.warmup_epochs * steps_per_epoch)
    eff_batch = cfg.batch_size * cfg.accum_iter * world
    lr = cfg.lr if cfg.lr is not None else cfg.blr * eff_batch / 256

    # ------------------------------------------------------------------ model
    set_seed(cfg.seed)  # identical initial weights on every rank
    model = build_mae(cfg)
    groups = param_groups_weight_decay(model, cfg.weight_decay)
    optimizer = build_adamw(groups, lr, device_type=device.type)
    if cfg.compile:
        model.compile()  # in place: state_dict keys stay free of "_orig_mod."
    model, optimizer = accelerator.prepare(model, optimizer)
    mae = accelerator.unwrap_model(model)
    # masks, PE drops and pair choices differ per rank, and their stream is part of the state
    gen = torch.Generator(device=device).manual_seed(cfg.seed * 1000 + rank + 1)
    n_params = sum(p.numel() for p in mae.encoder.parameters())
    accelerator.print(
        f"encoder {cfg.encoder} ({n_params / 1e6:.1f} M params), grid {mae.grid_h}x{mae.grid_w}, "
        f"pos_label={cfg.pos_label} pos_embed={cfg.pos_embed} labelled tokens/img="
        f"{mae.num_labelled if mae.pos_head is not None else 0}\n"
        f"{len(dataset)} images, {world} process(es), effective batch {eff_batch} = "
        f"{cfg.batch_size} x {cfg.accum_iter} accum x {world}; base lr {cfg.blr:.2e}, "
        f"actual lr {lr:.2e}; {steps_per_epoch} steps/epoch, {total_steps} total, "
        f"precision {precision}, device {device}"
    )

    # ------------------------------------------------------------------ resume
    step, epoch, batch_in_epoch = 0, 0, 0
    nonfinite_total, nonfinite_run, bad_total = 0, 0, 0
    ckpt = resolve_resume(cfg.resume, out)
    if ckpt is not None:
        saved = json.loads((ckpt / "state.json").read_text())["config"]
        changed = [k for k in ARCH_KEYS if saved.get(k) != getattr(cfg, k)]
        if changed:
            raise ConfigError(
                f"resume: {ckpt} was trained with other values of {', '.join(changed)} "
                f"({', '.join(f'{k}={saved.get(k)!r}' for k in changed)})"
            )
        meta = load_checkpoint(ckpt, accelerator, model, optimizer, gen)
        step, epoch, batch_in_epoch = meta["step"], meta["epoch"], meta["batch_in_epoch"]
        nonfinite_total, nonfinite_run = meta["nonfinite_total"], meta["nonfinite_run"]
        bad_total = meta["bad_images"]
        accelerator.print(f"resumed from {ckpt} at step {step} (epoch {epoch})")
    elif cfg.resume and cfg.resume != "auto":
        raise ConfigError(f"resume: no checkpoint at {cfg.resume}")
    stop_step = min(total_steps, cfg.max_steps) if cfg.max_steps else total_steps
    last_saved = step if ckpt is not None else -1

    def save(with_grads: bool = False) -> None:
        nonlocal last_saved
        state = dict(
            step=step,
            epoch=epoch,
            batch_in_epoch=batch_in_epoch,
            nonfinite_total=nonfinite_total,
            nonfinite_run=nonfinite_run,
            bad_images=bad_total,
            config=dataclasses.asdict(cfg),
        )
        save_checkpoint(
            accelerator,
            out,
            step,
            model,
            optimizer,
            state,
            gen,
            cfg.keep_last,
            with_grads=with_grads,
        )
        last_saved = step

    def visualise() -> None:
        if main_proc:
            imgs = torch.stack([transform_eval(img) for img in readable_images(raw, 8)])
            grid = reconstruction_grid(mae, imgs.to(device), mean, std, seed=cfg.seed)
            (out / "vis").mkdir(exist_ok=True)
            save_image(grid, out / "vis" / f"epoch_{epoch:04d}.png")
            tracker.image("reconstruction", grid, step)

    tracker = Tracker(out, enabled=main_proc, resume_step=step if ckpt is not None else None)
    stop = StopFlag(device)
    bar = tqdm(
        total=stop_step, initial=step, disable=not main_proc, desc="pretrain", dynamic_ncols=True
    )

    # ------------------------------------------------------------------ train
    model.train()
    sums = torch.zeros(5, device=device)  # loss, mae_loss, pos_loss, pos_acc, finite count
    n_micro, t_log, last, stopped = 0, time.perf_counter(), {}, False
    while step < stop_step and epoch < cfg.epochs and not stopped:
        sampler.set_epoch(epoch, start=batch_in_epoch * cfg.batch_size)
        accelerator.step = batch_in_epoch  # Accelerate's micro-step counter decides the sync
        for imgs, _, bad in loader:
            if batch_in_epoch >= micro_per_epoch or step >= stop_step:
                break
            if bad:  # unreadable files, replaced in the batch by a readable one
                bad_total += len(bad)
                print(f"[rank {rank}] skipped unreadable images: {bad}", file=sys.stderr)
                tracker.event(step, "bad_images", files=bad)
            imgs = imgs.to(device, non_blocking=True)
            # DropPos-style smoothing: sigma decays linearly to 0 over the schedule
            sigma = cfg.pos_smoothing * (1 - step / total_steps)
            with accelerator.accumulate(model):
                noise = mae.make_noise(imgs.shape[0], device, gen)
                outputs = model(imgs, **noise, pos_sigma=sigma)
                loss = outputs["mae_loss"] + cfg.pos_weight * outputs["pos_loss"]
                accelerator.backward(loss)
                finite = True
                if accelerator.sync_gradients:
                    set_lr(optimizer, lr_at(step, lr, cfg.min_lr, warmup_steps, total_steps))
                    # the norm of the all-reduced gradients is the same on every rank, so all
                    # ranks skip together; one host sync per optimizer step (MAE syncs too)
                    norm = accelerator.clip_grad_norm_(
                        model.parameters(), cfg.clip_grad or float("inf")
                    )
                    finite = bool(torch.isfinite(norm))
                if finite or precision == "fp16":  # fp16: the scaler skips and backs off itself
                    optimizer.step()  # Accelerate skips it until the last micro-step
                optimizer.zero_grad(set_to_none=True)
            batch_in_epoch += 1
            values = torch.stack(
                [
                    loss.detach(),
                    outputs["mae_loss"].detach(),
                    outputs["pos_loss"].detach(),
                    outputs["pos_acc"].detach(),
                ]
            )
            ok = torch.isfinite(values).all()
            sums += torch.cat([torch.where(ok, values.float(), 0.0), ok.float()[None]])
            n_micro += 1
            if accelerator.sync_gradients:
                step += 1
                bar.update(1)
                nonfinite_run = 0 if finite else nonfinite_run + 1
                nonfinite_total += 0 if finite else 1
                if not finite:
                    tracker.event(step, "nonfinite_grad_norm", skipped=precision != "fp16")
                    if nonfinite_run >= cfg.max_nonfinite:
                        raise FloatingPointError(
                            f"step {step}: {nonfinite_run} consecutive steps with a non-finite "
                            f"gradient norm (max_nonfinite={cfg.max_nonfinite}); the last "
                            f"checkpoint (step {last_saved}) holds finite weights"
                        )
                if step % cfg.log_every == 0 or step == stop_step:
                    # one host sync per log line, averaged over finite micro-steps and ranks
                    tot = accelerator.reduce(sums, "sum").tolist()
                    avg = [v / max(tot[4], 1.0) for v in tot[:4]]
                    dt = time.perf_counter() - t_log
                    group = optimizer.param_groups[0]
                    last = dict(
                        epoch=round(epoch + batch_in_epoch / micro_per_epoch, 4),
                        loss=avg[0],
                        mae_loss=avg[1],
                        pos_loss=avg[2],
                        pos_acc=avg[3],
                        lr=group["lr"] / group.get("lr_scale", 1.0),
                        img_per_s=n_micro * cfg.batch_size * world / dt,
                        nonfinite_steps=nonfinite_total,
                        bad_images=bad_total,
                    )
                    tracker.log(step, last)
                    bar.set_postfix(loss=f"{avg[0]:.4f}", pos_acc=f"{avg[3]:.3f}")
                    sums.zero_()
                    n_micro, t_log = 0, time.perf_counter()
                if cfg.save_every_steps and step % cfg.save_every_steps == 0:
                    save()
            if stop.agreed():  # a signal on any rank: save here, mid-accumulation included
                save(with_grads=not accelerator.sync_gradients)
                stopped = True
                break
        if not stopped and batch_in_epoch >= micro_per_epoch:
            epoch, batch_in_epoch = epoch + 1, 0
            if epoch % cfg.vis_every == 0:
                visualise()
            if epoch % cfg.save_every == 0 and last_saved != step:
                save()
    bar.close()
    stop.restore()

    # ------------------------------------------------------------------ finish
    if last_saved != step:
        save()
    summary = {**last, "step": step, "epoch": epoch, "stopped_by_signal": stopped}
    if stopped:
        accelerator.print(f"stopped by signal at step {step}; resume with --resume auto")
    else:
        visualise()
        # every rank must hold the same weights; a divergence means a broken collective
        digest = torch.stack([p.detach().double().sum() for p in mae.parameters()])
        summary["ranks_in_sync"] = bool((accelerator.gather(digest[None]) == digest).all())
        if not summary["ranks_in_sync"]:
            accelerator.print("warning: model weights differ between processes")
    if main_proc and not stopped:
        enc_dir = export_encoder(
            mae.encoder,
            out / "export" / "encoder",
            cfg.encoder,
            encoder_model_args(mae.encoder, cfg.pos_embed),
            data_cfg=dict(
                input_size=[cfg.in_chans, cfg.input_size, cfg.input_size],
                mean=mean,
                std=std,
                interpolation="bicubic",
                crop_pct=1.0,
            ),
            card=dict(
                name=f"maepl {cfg.model}",
                dataset=cfg.dataset,
                steps=step,
                mask_ratio=cfg.mask_ratio,
                pos=f" + positional label {cfg.pos_label}" if cfg.pos_label != "none" else "",
            ),
        )
        export_full(mae, out / "export" / "mae.safetensors", dataclasses.asdict(cfg))
        print(
            f"done: {step} steps. encoder export (timm local-dir): {enc_dir}\n"
            f"  full model: {out / 'export' / 'mae.safetensors'}\n"
            f"  reconstructions: {out / 'vis'}  logs: {out / 'log.jsonl'}, "
            f"tensorboard --logdir {out / 'tensorboard'}"
        )
    if main_proc:
        (out / "summary.json").write_text(json.dumps(summary, indent=1))
    tracker.close()
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return summary


if __name__ == "__main__":
    try:
        config = parse_config(PretrainConfig, description=__doc__)
        main(config)
    except ConfigError as e:
        sys.exit(f"error: {e}")
