#!/usr/bin/env python
"""Pretraining-step throughput: maepl MAE (with and without positional labels) vs Hugging Face.

One step = fresh masking noise + forward + loss + backward + AdamW step + zero_grad, on a
synthetic batch that already lives on the device (no data loading). All configurations share
the architecture, batch, precision and optimizer settings; each is warmed up, then timed over
several windows (median reported), one config after the other (CUDA default, each freed before
the next) or round-robin (CPU default); see --schedule and benchmarks/README.md.

Configurations (``--only`` takes a comma-separated subset of these names):

    plain    maepl MAE, pos_label none
    apl      maepl MAE + APL, pos_drop_ratio 0.75 (PE dropped on 3/4 of visible tokens)
    apl_all  maepl MAE + APL, pos_drop_ratio 0 (every visible token labelled)
    rpl      maepl MAE + RPL, pos_drop_ratio 0.75
    rpl_all  maepl MAE + RPL, pos_drop_ratio 0 (all ordered pairs of visible tokens)
    apl_fused, rpl_fused, rpl_all_fused  the same with the fused chunked classifier +
             cross-entropy (--pos_ce_chunk; the plain ones use --pos_ce_chunk 0)
    plain_bf16s, apl_bf16s  a lever, not a pretrain.py setting yet: bf16 autocast as the others,
             plus the residual stream cast to bfloat16 (MaskedAutoencoder residual_dtype);
             weights, gradients and the optimizer unchanged
    plain_bf16w, apl_bf16w  a lever, not a pretrain.py setting yet: weights, activations and
             gradients in bfloat16 (no autocast, so no fp32 residual stream or casts), fp32
             master weights in the optimizer (grads copied up, weights copied back each step)
    hf       transformers ViTMAEForPreTraining, same sizes, sdpa attention
    official plain MAE's parameters, computed the way the official MAE model code computes
             them (every patch embedded and given its PE, then the visible ones gathered with
             an index repeated over the channels; the decoder's unshuffle likewise): the
             baseline of issue 6's "1.35x the compiled official model", side by side on
             whatever GPU this runs on (the reference's figures are an H100's)

The last lines printed are ``apl_vs_official=<apl img/s / official img/s>`` and
``ratio_vs_hf=<plain img/s / hf img/s>`` (``nan`` when either of the two was not run).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import timm
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout too

from maepl.checkpoint import write_text_atomic  # noqa: E402
from maepl.models.encoder import build_encoder  # noqa: E402
from maepl.models.mae import MaskedAutoencoder  # noqa: E402
from maepl.optim import build_adamw, param_groups_weight_decay  # noqa: E402

PRESETS: dict[str, dict] = {
    # small enough for a few seconds per configuration on 2 CPU cores
    "cpu": dict(
        encoder="vit_tiny_patch16_224",
        input_size=32,
        patch_size=4,
        in_chans=3,
        embed_dim=192,
        depth=6,
        num_heads=3,
        decoder_embed_dim=128,
        decoder_depth=2,
        decoder_num_heads=4,
        batch_size=64,
        steps=20,
        warmup=3,
    ),
    # ViT-B/16 at 224 px with MAE's decoder (512-d x 8 blocks, 16 heads), batch 256 per GPU
    "vit_base": dict(
        encoder="vit_base_patch16_224",
        input_size=224,
        patch_size=16,
        in_chans=3,
        embed_dim=768,
        depth=12,
        num_heads=12,
        decoder_embed_dim=512,
        decoder_depth=8,
        decoder_num_heads=16,
        batch_size=256,
        steps=30,
        warmup=10,
    ),
}

FUSED_CHUNK = 32768  # rows per chunk of the fused position classifier + cross-entropy
# name -> (pos_label, pos_drop_ratio, pos_ce_chunk); None marks the Hugging Face model
CONFIGS: dict[str, tuple[str, float, int] | None] = {
    "plain": ("none", 0.0, 0),
    "apl": ("abs", 0.75, 0),
    "apl_all": ("abs", 0.0, 0),
    "rpl": ("rel", 0.75, 0),
    "rpl_all": ("rel", 0.0, 0),
    "apl_fused": ("abs", 0.75, FUSED_CHUNK),
    "rpl_fused": ("rel", 0.75, FUSED_CHUNK),
    "rpl_all_fused": ("rel", 0.0, FUSED_CHUNK),
    "plain_bf16s": ("none", 0.0, 0),
    "apl_bf16s": ("abs", 0.75, 0),
    "plain_bf16w": ("none", 0.0, 0),
    "apl_bf16w": ("abs", 0.75, 0),
    "hf": None,
    "official": ("none", 0.0, 0),
}
BF16_WEIGHTS = ("plain_bf16w", "apl_bf16w")  # bf16 model + fp32 master weights
BF16_STREAM = ("plain_bf16s", "apl_bf16s")  # autocast + a bf16 residual stream
DESCRIPTIONS = {
    "plain": "maepl MAE",
    "apl": "maepl MAE + APL (drop 0.75)",
    "apl_all": "maepl MAE + APL (drop 0)",
    "rpl": "maepl MAE + RPL (drop 0.75)",
    "rpl_all": "maepl MAE + RPL (drop 0)",
    "apl_fused": "APL (drop 0.75), fused CE",
    "rpl_fused": "RPL (drop 0.75), fused CE",
    "rpl_all_fused": "RPL (drop 0), fused CE",
    "plain_bf16s": "MAE, bf16 residual stream",
    "apl_bf16s": "APL 0.75, bf16 residual stream",
    "plain_bf16w": "MAE, bf16 weights+fp32 master",
    "apl_bf16w": "APL 0.75, bf16 w+fp32 master",
    "hf": "HF ViTMAEForPreTraining",
    "official": "MAE computed as official code",
}

MASK_RATIO = 0.75
POS_WEIGHT = 0.5  # training loss = mae_loss + 0.5 * pos_loss
LR, WEIGHT_DECAY, BETAS = 1.5e-4, 0.05, (0.9, 0.95)
# process CPU seconds vs wall seconds over all timed windows: on a CPU shared with other
# processes the first falls well below threads x the second
CPU_USE = {"cpu_s": 0.0, "wall_s": 0.0}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    p.add_argument("--batch_size", type=int, default=None, help="default: the preset's")
    p.add_argument("--steps", type=int, default=None, help="timed steps per config")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps per config")
    p.add_argument(
        "--windows",
        type=int,
        default=5,
        help="timed steps are split into this many windows; the median is reported",
    )
    p.add_argument(
        "--precision",
        choices=("bf16", "fp16", "no"),
        default=None,
        help="autocast dtype (default: bf16 on CUDA, no on CPU)",
    )
    p.add_argument("--compile", action="store_true", help="torch.compile every model")
    p.add_argument(
        "--compile_mode",
        default="default",
        choices=("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"),
        help="torch.compile mode with --compile (reduce-overhead = CUDA graphs)",
    )
    p.add_argument(
        "--cpp_wrapper",
        action="store_true",
        help="with --compile: Inductor's C++ wrapper, which launches the compiled graph's\n"
        "kernels from C++ instead of generated Python (less host time a step; longer compiles)",
    )
    p.add_argument(
        "--sdpa",
        default="auto",
        choices=("auto", "cudnn", "flash", "efficient", "math"),
        help="CUDA attention kernel: auto = torch's choice (cuDNN on an H100 with torch\n"
        "2.11); another name turns the other backends off (no effect on the CPU)",
    )
    p.add_argument(
        "--schedule",
        choices=("auto", "sequential", "interleaved"),
        default="auto",
        help="sequential: one config at a time, freed before the next (clean peak\n"
        "memory); interleaved: all resident, timed windows round-robin (robust\n"
        "to a busy or drifting machine). auto: sequential on CUDA, else\n"
        "interleaved",
    )
    p.add_argument(
        "--only", default=",".join(CONFIGS), help=f"comma-separated subset of: {', '.join(CONFIGS)}"
    )
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, metavar="PATH", help="also write results here")
    p.add_argument(
        "--profile",
        type=int,
        default=0,
        metavar="N",
        help="after timing, profile N more steps of each config (torch.profiler) and print\n"
        "its top kernels by device time; the table says where a step's time goes",
    )
    args = p.parse_args(argv)
    if args.cpp_wrapper and not args.compile:
        p.error("--cpp_wrapper: only with --compile (it changes how compiled graphs run)")

    preset = PRESETS[args.preset]
    for key in ("batch_size", "steps", "warmup"):
        if getattr(args, key) is None:
            setattr(args, key, preset[key])
    args.device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.schedule == "auto":
        args.schedule = "sequential" if args.device.type == "cuda" else "interleaved"
    if args.precision is None:
        args.precision = "bf16" if args.device.type == "cuda" else "no"
    args.only = [c.strip() for c in args.only.split(",") if c.strip()]
    unknown = [c for c in args.only if c not in CONFIGS]
    if unknown or not args.only:
        p.error(f"--only: unknown config(s) {unknown}; choose from {', '.join(CONFIGS)}")
    stream = [c for c in args.only if c in BF16_STREAM]
    if stream and args.precision != "bf16":
        p.error(f"--only {','.join(stream)}: a bf16 residual stream needs --precision bf16")
    if args.batch_size < 1 or args.steps < 1 or args.warmup < 0 or args.windows < 1:
        p.error("--batch_size and --steps must be >= 1, --warmup >= 0, --windows >= 1")
    return args


def import_transformers():
    """The transformers module, or a clear message and exit status 2."""
    try:
        import transformers
        from transformers import ViTMAEConfig, ViTMAEForPreTraining  # noqa: F401
    except ImportError as e:
        print(
            f"error: the 'hf' baseline needs Hugging Face transformers ({e}).\n"
            "Install the benchmark extras with:  pip install -e .[bench]\n"
            "(or leave it out with --only plain,apl,apl_all,rpl,rpl_all)",
            file=sys.stderr,
        )
        sys.exit(2)
    return transformers


def count_trainable(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def build_maepl(
    shape: dict,
    pos_label: str,
    pos_drop: float,
    ce_chunk: int,
    imgs: torch.Tensor,
    compile_mode: str | None,
    official: bool = False,
) -> tuple[nn.Module, Callable[[], torch.Tensor]]:
    enc = build_encoder(
        shape["encoder"],
        shape["input_size"],
        shape["patch_size"],
        shape["in_chans"],
        shape["embed_dim"],
        shape["depth"],
        shape["num_heads"],
        "sincos",
    )
    mae = MaskedAutoencoder(
        enc,
        "sincos",
        shape["decoder_embed_dim"],
        shape["decoder_depth"],
        shape["decoder_num_heads"],
        mask_ratio=MASK_RATIO,
        norm_pix_loss=True,
        pos_label=pos_label,
        pos_channels=0.5,
        pos_pairs=0,
        pos_drop_ratio=pos_drop,
        pos_ce_chunk=ce_chunk,
    ).to(imgs.device)
    n, device = imgs.shape[0], imgs.device
    if official:
        ref = OfficialStyle(mae)
        ref_fwd = torch.compile(ref, mode=compile_mode) if compile_mode else ref
        return mae, lambda: ref_fwd(imgs, mae.make_noise(n, device)["noise"])
    fwd = torch.compile(mae, mode=compile_mode) if compile_mode else mae

    def loss_fn() -> torch.Tensor:
        out = fwd(imgs, **mae.make_noise(n, device))  # fresh masks every step, as in training
        return out["mae_loss"] + POS_WEIGHT * out["pos_loss"]

    return mae, loss_fn


class OfficialStyle(nn.Module):
    """Plain MAE's loss on ``mae``'s parameters, computed as the official MAE model code does
    (He et al. 2021; facebookresearch/mae ``models_mae.py``, described here, not copied): the
    patch embedding runs on all L patches and the PE is added to all of them before masking;
    the visible tokens are gathered with an index repeated over the channels (a copy, where
    maepl embeds only the visible patches and expands the index); the decoder's mask tokens
    are repeated, not cast, before the unshuffle. Same parameters, masks and loss as
    ``mae(imgs, noise)`` (tests/test_benchmarks.py checks loss and gradients). Attention is the
    installed timm's Block (fused SDPA in timm >= 0.9); the official code as released pinned
    timm 0.3.2, whose attention is explicit (softmax(q k^T) v), likely slower: so this is the
    official computation on today's blocks, a baseline at least as fast as the release."""

    def __init__(self, mae: MaskedAutoencoder):
        super().__init__()
        if mae.encoder.pos_embed is None or mae.residual_dtype is not None:
            raise ValueError("OfficialStyle: the official model has a PE and an fp32 stream")
        self.mae = mae

    def forward(self, imgs: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        mae, enc = self.mae, self.mae.encoder
        x = enc.patch_embed(imgs)  # [N, L, D]: every patch
        pe = enc.pos_embed
        cls_pe, patch_pe = (pe[:, :1], pe[:, 1:]) if pe.shape[1] == x.shape[1] + 1 else (0, pe)
        x = x + patch_pe
        n, num, d = x.shape
        ids_shuffle = torch.argsort(noise, dim=1)
        ids_restore = torch.argsort(ids_shuffle, dim=1)
        ids_keep = ids_shuffle[:, : mae.len_keep]
        x = torch.gather(x, 1, ids_keep.unsqueeze(-1).repeat(1, 1, d))
        mask = torch.ones(n, num, device=x.device)
        mask[:, : mae.len_keep] = 0
        mask = torch.gather(mask, 1, ids_restore)
        x = torch.cat([(enc.cls_token + cls_pe).expand(n, -1, -1), x], dim=1)
        x = enc.norm(enc.blocks(enc.norm_pre(enc.pos_drop(x))))  # timm's; identities here
        x = mae.decoder_embed(x)
        mask_tokens = mae.mask_token.repeat(n, num + 1 - x.shape[1], 1)
        x_ = torch.cat([x[:, 1:], mask_tokens], dim=1)
        x_ = torch.gather(x_, 1, ids_restore.unsqueeze(-1).repeat(1, 1, x.shape[2]))
        x = torch.cat([x[:, :1], x_], dim=1) + mae.decoder_pos_embed
        pred = mae.decoder_pred(mae.decoder_norm(mae.decoder_blocks(x)))[:, 1:]
        return mae.reconstruction_loss(imgs, pred, mask)


def build_hf(
    shape: dict, imgs: torch.Tensor, compile_mode: str | None
) -> tuple[nn.Module, Callable[[], torch.Tensor], str]:
    from transformers import ViTMAEConfig, ViTMAEForPreTraining

    d, dd = shape["embed_dim"], shape["decoder_embed_dim"]
    kwargs = dict(
        hidden_size=d,
        num_hidden_layers=shape["depth"],
        num_attention_heads=shape["num_heads"],
        intermediate_size=4 * d,
        decoder_hidden_size=dd,
        decoder_num_hidden_layers=shape["decoder_depth"],
        decoder_num_attention_heads=shape["decoder_num_heads"],
        decoder_intermediate_size=4 * dd,
        image_size=shape["input_size"],
        patch_size=shape["patch_size"],
        num_channels=shape["in_chans"],
        mask_ratio=MASK_RATIO,
        norm_pix_loss=True,
        layer_norm_eps=1e-6,  # timm's and MAE's value (HF defaults to 1e-12); speed-neutral
    )
    try:
        model = ViTMAEForPreTraining(ViTMAEConfig(attn_implementation="sdpa", **kwargs))
    except (ValueError, ImportError, TypeError):  # an older transformers without sdpa for ViTMAE
        model = ViTMAEForPreTraining(ViTMAEConfig(**kwargs))
    attn = getattr(model.config, "_attn_implementation", None) or "eager"
    model = model.to(imgs.device)
    fwd = torch.compile(model, mode=compile_mode) if compile_mode else model

    def loss_fn() -> torch.Tensor:
        return fwd(pixel_values=imgs).loss  # HF draws its masking noise itself

    return model, loss_fn, attn


def autocast_ctx(device: torch.device, precision: str):
    if precision == "no":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


class Runner:
    """One configuration, built and ready to step, with its measurements."""

    def __init__(self, name: str, args: argparse.Namespace, shape: dict, imgs: torch.Tensor):
        self.name, self.device = name, imgs.device
        torch.manual_seed(args.seed)
        self.extra: dict = {}
        mode = args.compile_mode if args.compile else None  # None: eager
        if CONFIGS[name] is None:
            self.model, self.loss_fn, attn = build_hf(shape, imgs, mode)
            self.extra["attn_implementation"] = attn
        else:
            pos_label, pos_drop, ce_chunk = CONFIGS[name]
            x = imgs.to(torch.bfloat16) if name in BF16_WEIGHTS else imgs
            self.model, self.loss_fn = build_maepl(
                shape, pos_label, pos_drop, ce_chunk, x, mode, official=name == "official"
            )
            if name in BF16_STREAM:
                self.model.residual_dtype = torch.bfloat16
            head = self.model.pos_head is not None
            self.extra["labelled_tokens"] = self.model.num_labelled if head else 0
        self.model.train()
        groups = param_groups_weight_decay(self.model, WEIGHT_DECAY)
        self.bf16_weights = name in BF16_WEIGHTS
        if self.bf16_weights:
            # the Parameter objects stay (their data becomes bf16); the optimizer steps fp32
            # copies of them, and the step copies gradients up and weights back down
            self.params = [p for g in groups for p in g["params"]]
            self.masters = [p.detach().float() for p in self.params]
            for m in self.masters:
                m.grad = torch.zeros_like(m)
            master_of = {id(p): m for p, m in zip(self.params, self.masters, strict=True)}
            groups = [{**g, "params": [master_of[id(p)] for p in g["params"]]} for g in groups]
            self.model.to(torch.bfloat16)
        self.optimizer = build_adamw(groups, LR, BETAS, device_type=self.device.type)
        self.scaler = torch.amp.GradScaler(self.device.type) if args.precision == "fp16" else None
        self.precision = "no" if self.bf16_weights else args.precision
        self.num_params = count_trainable(self.model)
        self.window_ms: list[float] = []
        self.peak_bytes = 0
        self.warmup_s = 0.0
        self.loss = float("nan")

    def step(self) -> torch.Tensor:
        torch.compiler.cudagraph_mark_step_begin()  # CUDA graphs: the last step's outputs are done
        with autocast_ctx(self.device, self.precision):
            loss = self.loss_fn()
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
        elif self.bf16_weights:
            loss.backward()
            with torch.no_grad():
                torch._foreach_copy_([m.grad for m in self.masters], [p.grad for p in self.params])
                self.optimizer.step()
                torch._foreach_copy_(self.params, self.masters)
        else:
            loss.backward()
            self.optimizer.step()
        # bf16 weights: the model's own gradients go; the masters' buffers are overwritten
        (self.model if self.bf16_weights else self.optimizer).zero_grad(set_to_none=True)
        return loss.detach()

    def resident_bytes(self) -> int:
        """Parameters, buffers and optimizer state: what stays allocated between steps."""
        tensors = list(self.model.parameters()) + list(self.model.buffers())
        for state in self.optimizer.state.values():
            tensors += [t for t in state.values() if torch.is_tensor(t)]
        if self.bf16_weights:
            tensors += self.masters + [m.grad for m in self.masters]
        return sum(t.numel() * t.element_size() for t in tensors if t.device == self.device)

    def run(self, steps: int, timed: bool, shared: bool = False) -> None:
        """``steps`` steps; ``timed`` appends the mean ms/step as one window. ``shared``: other
        models are resident too, so peak memory is measured as this window's growth over what
        was allocated before it plus this model's own resident state."""
        cuda = self.device.type == "cuda"
        sync(self.device)
        if cuda:
            torch.cuda.reset_peak_memory_stats(self.device)
            base = torch.cuda.memory_allocated(self.device)
        start, cpu_start = time.perf_counter(), time.process_time()
        loss = None
        for _ in range(steps):
            loss = self.step()
        sync(self.device)
        elapsed = time.perf_counter() - start
        if timed:
            CPU_USE["cpu_s"] += time.process_time() - cpu_start
            CPU_USE["wall_s"] += elapsed
        if cuda:
            peak = torch.cuda.max_memory_allocated(self.device)
            if shared:
                peak = peak - base + self.resident_bytes()
            self.peak_bytes = max(self.peak_bytes, peak)
        if loss is not None:
            self.loss = float(loss)
        if timed:
            self.window_ms.append(elapsed * 1e3 / steps)
        else:
            self.warmup_s += elapsed

    def profile(self, steps: int, top: int = 18) -> str:
        """Device-time table of ``steps`` steps (after timing, so compilation is done)."""
        from torch.profiler import ProfilerActivity, profile

        acts = [ProfilerActivity.CPU]
        if self.device.type == "cuda":
            acts.append(ProfilerActivity.CUDA)
        sync(self.device)
        with profile(activities=acts) as prof:
            for _ in range(steps):
                self.step()
            sync(self.device)
        key = "self_cuda_time_total" if self.device.type == "cuda" else "self_cpu_time_total"
        table = prof.key_averages().table(sort_by=key, row_limit=top, max_name_column_width=60)
        return f"profile of {self.name}, {steps} steps, sorted by {key}:\n{table}"

    def result(self, batch_size: int) -> dict:
        ms = statistics.median(self.window_ms)
        r = dict(
            name=self.name,
            description=DESCRIPTIONS[self.name],
            params_m=self.num_params / 1e6,
            ms_per_step=ms,
            img_per_s=batch_size * 1e3 / ms,
            window_ms=[round(x, 2) for x in self.window_ms],
            warmup_s=self.warmup_s,
            final_loss=self.loss,
            **self.extra,
        )
        if self.device.type == "cuda":
            r["peak_mem_gib"] = self.peak_bytes / 2**30
        if not math.isfinite(self.loss):
            print(f"warning: {self.name}: non-finite loss {self.loss}", flush=True)
        return r


def window_sizes(steps: int, windows: int) -> list[int]:
    n = min(steps, windows)
    return [steps // n + (i < steps % n) for i in range(n)]


def report_line(r: dict) -> None:
    note = ""
    if r.get("labelled_tokens"):
        note = f", {r['labelled_tokens']} labelled tokens/img"
    if "attn_implementation" in r:
        note = f", attn {r['attn_implementation']}"
    print(
        f"  {r['name']:<8} {r['img_per_s']:9.1f} img/s  windows(ms/step) {r['window_ms']}  "
        f"warmup {r['warmup_s']:.1f}s  loss {r['final_loss']:.4f}{note}",
        flush=True,
    )


def run_sequential(
    args: argparse.Namespace, shape: dict, imgs: torch.Tensor, done=lambda results: None
) -> list[dict]:
    """Each config alone: build, warm up, time its windows, free it, then the next; ``done``
    gets the results so far after each (``--json`` is rewritten, so a run cut short by a time
    limit keeps the configurations it finished)."""
    results = []
    for name in args.only:
        if args.compile:
            torch._dynamo.reset()  # a fresh compile cache per config
        runner = Runner(name, args, shape, imgs)
        runner.run(args.warmup, timed=False)
        for size in window_sizes(args.steps, args.windows):
            runner.run(size, timed=True)
        results.append(runner.result(args.batch_size))
        report_line(results[-1])
        done(results)
        if args.profile:
            print(runner.profile(args.profile), flush=True)
        del runner
        free_memory(imgs.device)
    return results


def run_interleaved(
    args: argparse.Namespace, shape: dict, imgs: torch.Tensor, done=lambda results: None
) -> list[dict]:
    """All configs resident; each warmed up, then one timed window per config per round, the
    order rotating every round, so slow drifts of the machine hit every config alike."""
    runners = []
    for name in args.only:
        runners.append(Runner(name, args, shape, imgs))
        runners[-1].run(args.warmup, timed=False, shared=True)
    for i, size in enumerate(window_sizes(args.steps, args.windows)):
        k = i % len(runners)
        for runner in runners[k:] + runners[:k]:
            runner.run(size, timed=True, shared=True)
    results = [r.result(args.batch_size) for r in runners]
    for r in results:
        report_line(r)
    done(results)
    for runner in runners if args.profile else []:
        print(runner.profile(args.profile), flush=True)
    del runners
    free_memory(imgs.device)
    return results


def print_table(results: list[dict], cuda: bool) -> None:
    plain = next((r for r in results if r["name"] == "plain"), None)
    head = f"{'config':<9} {'description':<29} {'params(M)':>9} {'img/s':>9} {'ms/step':>9}"
    head += f" {'vs plain':>9}"
    if cuda:
        head += f" {'peak GiB':>9}"
    print(head)
    print("-" * len(head))
    for r in results:
        rel = f"{(r['ms_per_step'] / plain['ms_per_step'] - 1) * 100:+.1f}%" if plain else "-"
        line = (
            f"{r['name']:<9} {r['description']:<29} {r['params_m']:>9.2f} "
            f"{r['img_per_s']:>9.1f} {r['ms_per_step']:>9.2f} {rel:>9}"
        )
        if cuda:
            line += f" {r['peak_mem_gib']:>9.2f}"
        print(line)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    transformers = import_transformers() if "hf" in args.only else None
    device = args.device
    shape = PRESETS[args.preset]
    if args.sdpa != "auto" and device.type == "cuda":  # read when a graph is traced: set first
        for name in ("cudnn", "flash", "mem_efficient", "math"):
            on = name.endswith(args.sdpa)  # "efficient" names mem_efficient
            getattr(torch.backends.cuda, f"enable_{name}_sdp")(on)
    if args.cpp_wrapper:  # read when a graph is compiled
        import torch._inductor.config as inductor_config

        inductor_config.cpp_wrapper = True
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        device_name = torch.cuda.get_device_name(device)
    else:
        device_name = f"CPU ({platform.processor() or platform.machine()}), "
        device_name += f"{torch.get_num_threads()} threads"

    print(f"device: {device_name}")
    print(
        f"torch {torch.__version__}, timm {timm.__version__}, transformers "
        f"{transformers.__version__ if transformers else 'not used'}, python "
        f"{platform.python_version()}"
    )
    grid = shape["input_size"] // shape["patch_size"]
    print(
        f"preset {args.preset}: encoder {shape['embed_dim']}-d x {shape['depth']} blocks, "
        f"{shape['num_heads']} heads; decoder {shape['decoder_embed_dim']}-d x "
        f"{shape['decoder_depth']} blocks, {shape['decoder_num_heads']} heads; "
        f"{shape['input_size']} px, patch {shape['patch_size']} ({grid}x{grid} grid), "
        f"mask ratio {MASK_RATIO}"
    )
    print(
        f"batch {args.batch_size}, precision {args.precision}, compile {args.compile} "
        f"({args.compile_mode}{', C++ wrapper' if args.cpp_wrapper else ''}), sdpa {args.sdpa}, "
        f"warmup {args.warmup}, timed steps {args.steps} in {min(args.windows, args.steps)} "
        f"windows (median, {args.schedule}), AdamW betas {BETAS} wd {WEIGHT_DECAY} "
        f"fused={device.type == 'cuda'}, seed {args.seed}"
    )
    sys.stdout.flush()

    torch.manual_seed(args.seed)
    imgs = torch.randn(
        args.batch_size, shape["in_chans"], shape["input_size"], shape["input_size"], device=device
    )
    arch = {k: v for k, v in shape.items() if k not in ("batch_size", "steps", "warmup")}
    meta = dict(
        device=device_name,
        torch=torch.__version__,
        timm=timm.__version__,
        transformers=transformers.__version__ if transformers else None,
        preset=args.preset,
        shape=arch,
        batch_size=args.batch_size,
        precision=args.precision,
        compile=args.compile,
        compile_mode=args.compile_mode,
        cpp_wrapper=args.cpp_wrapper,
        sdpa=args.sdpa,
        warmup=args.warmup,
        steps=args.steps,
        windows=min(args.windows, args.steps),
        schedule=args.schedule,
        seed=args.seed,
    )

    def write_json(
        results: list[dict],
        ratio: float | None = None,
        complete: bool = False,
        vs_official: float | None = None,
    ):
        if args.json:
            out = dict(
                meta=meta,
                results=results,
                ratio_vs_hf=ratio,
                apl_vs_official=vs_official,
                complete=complete,
            )
            write_text_atomic(args.json, json.dumps(out, indent=2))

    t_all = time.perf_counter()
    run = run_sequential if args.schedule == "sequential" else run_interleaved
    results = run(args, shape, imgs, write_json)
    total_s = time.perf_counter() - t_all

    print()
    print_table(results, device.type == "cuda")
    by_name = {r["name"]: r for r in results}
    plain = by_name.get("plain")
    if plain:
        print()
        print("step-time overhead vs plain MAE:")
        for r in results:
            if r["name"] != "plain":
                over = (r["ms_per_step"] / plain["ms_per_step"] - 1) * 100
                print(f"  {r['name']:<8} {over:+7.1f}%  ({r['description']})")
    print(f"\nbenchmark time {total_s:.1f}s")
    if device.type == "cpu":
        share = CPU_USE["cpu_s"] / max(CPU_USE["wall_s"] * torch.get_num_threads(), 1e-9)
        print(f"CPU use during timed steps: {share:.0%} of {torch.get_num_threads()} threads")
        if share < 0.75:
            print(
                "note: the timed steps got well under their threads' CPU time: other processes"
                " compete for the cores, so these timings are unreliable (rerun when idle)"
            )

    apl, official = by_name.get("apl"), by_name.get("official")
    # issue 6's target: APL at >= 1.35x the compiled official model, on the same GPU
    vs_official = apl["img_per_s"] / official["img_per_s"] if apl and official else float("nan")
    print(f"apl_vs_official={vs_official:.3f}")
    hf = by_name.get("hf")
    ratio = plain["img_per_s"] / hf["img_per_s"] if plain and hf else float("nan")
    if args.json:
        ratio_json, vs_official_json = (
            x if math.isfinite(x) else None for x in (ratio, vs_official)
        )
        write_json(results, ratio_json, complete=True, vs_official=vs_official_json)
        print(f"wrote {args.json}")
    print(f"ratio_vs_hf={ratio:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
