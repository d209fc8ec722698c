"""MAE + positional-label pretraining of a timm Vision Transformer, on Accelerate.

    python pretrain.py --config configs/quickstart.yaml
    accelerate launch --num_processes 8 pretrain.py --config configs/fmnist_vit_tiny.yaml
    torchrun --nproc_per_node 8 pretrain.py --model mae_vit_base_patch16 --data_path /imagenet

Read top to bottom: data, model, resume, the training loop, exports. The loss is assembled in
one line of the loop: L = L_mae + pos_weight * L_pos. Checkpoints, resume, signals, non-finite
steps and logging live in maepl/loop.py.
"""

from __future__ import annotations

import dataclasses
import sys

import torch
from accelerate.utils import set_seed
from torchvision.utils import save_image

from maepl.config import ARCH_KEYS, ConfigError, PretrainConfig, parse_config
from maepl.data import build_transform, load_train_data, readable_images
from maepl.encoded import raw_dataset
from maepl.export import export_encoder, export_full
from maepl.gpu_aug import GpuAugment
from maepl.loaders import BadImageError, SeededTransformDataset
from maepl.loop import Run
from maepl.models.encoder import encoder_model_args
from maepl.models.mae import build_mae
from maepl.optim import build_adamw, param_groups_weight_decay
from maepl.tracking import reconstruction_grid
from maepl.weights import load_mae_weights


def main(cfg: PretrainConfig) -> dict:
    # ------------------------------------------------------------------ data (checked first)
    raw, mean, std = load_train_data(cfg)  # errors name data_path before any process group
    transform = build_transform(True, cfg.input_size, cfg.in_chans, mean, std, (cfg.crop_min, 1.0))
    transform_eval = build_transform(False, cfg.input_size, cfg.in_chans, mean, std)
    gpu_data = cfg.data_pipeline == "gpu"
    if gpu_data:  # workers read raw images; the loop decodes and crops them on the device
        dataset = raw_dataset(raw, strict=cfg.strict_data)
    else:
        dataset = SeededTransformDataset(raw, transform, cfg.seed, strict=cfg.strict_data)

    run = Run(cfg, "pretrain", ARCH_KEYS)
    loader, sampler = run.train_loader(dataset)
    augment = GpuAugment.from_config(cfg, mean, std, run.device, run.rank) if gpu_data else None

    # ------------------------------------------------------------------ model
    set_seed(cfg.seed)  # identical initial weights on every rank
    model = build_mae(cfg)
    if cfg.initial_checkpoint and run.resuming:
        run.accelerator.print("initial_checkpoint: not read (the resumed checkpoint's weights)")
    elif cfg.initial_checkpoint:  # loaded before the run writes anything
        for note in load_mae_weights(model, cfg):
            run.accelerator.print(f"initial_checkpoint: {note}")
    optimizer = build_adamw(
        param_groups_weight_decay(model, cfg.weight_decay), run.lr, device_type=run.device.type
    )
    model, optimizer = run.prepare(model, optimizer, cfg.seed)
    mae = run.unwrapped
    n_params = sum(p.numel() for p in mae.encoder.parameters())
    run.accelerator.print(
        f"encoder {cfg.embed_dim}-d x {cfg.depth} blocks x {cfg.num_heads} heads (timm "
        f"{cfg.encoder}, {n_params:,} params), patch {cfg.patch_size}, grid "
        f"{mae.grid_h}x{mae.grid_w}, "
        f"pos_label={cfg.pos_label} pos_embed={cfg.pos_embed} labelled tokens/img="
        f"{mae.num_labelled if mae.pos_head is not None else 0}\n"
        f"{len(dataset)} images, {run.describe()}"
    )
    if mae.pos_head is not None and cfg.pos_embed != "none" and mae.num_drop == 0:
        run.accelerator.print(
            "note: every labelled token keeps its own position embedding, so the position "
            "task can be solved by reading it back (the trivial variant, a control); "
            "--pos_drop_ratio 0.75 (the default) hides it"
        )
    run.resume()

    def draw() -> None:  # main process only
        imgs = torch.stack([transform_eval(img) for img in readable_images(raw, 8)])
        grid = reconstruction_grid(mae, imgs.to(run.device), mean, std, seed=cfg.seed)
        (run.out / "vis").mkdir(exist_ok=True)
        save_image(grid, run.out / "vis" / f"epoch_{run.epoch:04d}.png")
        run.tracker.image("reconstruction", grid, run.step)

    def visualise() -> None:  # on_main: an error there stops every process, not only it
        if run.epoch % cfg.vis_every == 0 or run.step >= run.stop_step:
            run.on_main(str(run.out / "vis"), draw)

    # ------------------------------------------------------------------ train
    model.train()
    for imgs, _ in run.batches(loader, sampler, on_epoch_end=visualise, augment=augment):
        # DropPos-style smoothing: sigma decays linearly to 0 over the schedule
        sigma = None
        if cfg.pos_smoothing > 0:  # a tensor, so that torch.compile does not recompile;
            # filled on the device: no copy from pageable host memory (a sync) every step
            value = cfg.pos_smoothing * (1 - run.step / run.total_steps)
            sigma = torch.full((), value, device=run.device)
        with run.accumulate():
            noise = mae.make_noise(imgs.shape[0], run.device, run.generator)
            out = model(imgs, **noise, pos_sigma=sigma)
            loss = out["mae_loss"] + cfg.pos_weight * out["pos_loss"]
            run.backward(loss)
        metrics = dict(loss=loss, mae_loss=out["mae_loss"])
        if cfg.pos_label != "none":  # plain MAE logs no position columns (not zeros)
            metrics.update(pos_loss=out["pos_loss"], pos_acc=out["pos_acc"])
        run.end_micro(metrics)

    # ------------------------------------------------------------------ finish, export
    def export() -> None:  # main process only
        enc_dir = export_encoder(
            mae.encoder,
            run.out / "export" / "encoder",
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
                name=f"maepl {cfg.model} encoder",
                description=f"Vision Transformer encoder pretrained with maepl: masked "
                f"autoencoder (mask ratio {cfg.mask_ratio}), positional label {cfg.pos_label}.",
                dataset=cfg.dataset,
                steps=run.step,
            ),
        )
        export_full(mae, run.out / "export" / "mae.safetensors", dataclasses.asdict(cfg))
        print(
            f"done: {run.step} steps. encoder export (timm local-dir): {enc_dir}\n"
            f"  full model: {run.out / 'export' / 'mae.safetensors'}\n"
            f"  reconstructions: {run.out / 'vis'}  logs: {run.out / 'log.jsonl'}, "
            f"tensorboard --logdir {run.out / 'tensorboard'}"
        )

    summary = run.finish()
    if not run.stopped:
        visualise()
        run.on_main(str(run.out / "export"), export)
    run.close()
    return summary


if __name__ == "__main__":
    try:
        main(parse_config(PretrainConfig, description=__doc__))
    except ConfigError as e:
        sys.exit(f"error: {e}")
    except BadImageError as e:  # --strict_data: the file is named, the traceback is noise
        sys.exit(f"error: {e.user_message()}")
