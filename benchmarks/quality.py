"""Does the positional label help? Pretrain variants at a fixed budget, then probe them.

    python benchmarks/quality.py --budget cpu            # ~30 min on 2 CPU cores
    python benchmarks/quality.py --budget gpu            # reference setup, one GPU
    python benchmarks/quality.py --budget refcpu --data_path DIR  # the reference's CPU run
    python benchmarks/quality.py --budget cpu --sweeps   # + lambda and mask-ratio sweeps
    python benchmarks/quality.py --budget cpu --seeds 3 --variants apl_drop \
        --sweeps --sweep_seeds 3                          # the sweeps over 3 seeds
    python benchmarks/quality.py --budget cpu --seeds 3 \
        --variants mae,apl_pe_kept,apl_drop25,apl_drop50,apl_drop,apl_drop90  # PE drop ratio
    python benchmarks/quality.py --budget gpu --sweeps --parallel 6 --time_limit 3000 \
        --reuse benchmarks/results/quality_gpu.json      # runs only what that file lacks

Each variant is pretrained with pretrain.main for every seed, then its encoder export is read
with the protocol of shared/reference.md (frozen un-augmented features, CLS and mean of patch
tokens; linear probe on standardised features, 100 epochs AdamW; kNN k=20, T=0.07), probed
with linprobe.py's MAE recipe (column lp_cls: LARS, BatchNorm + Linear on the CLS token,
RandomResizedCrop + flip; base lr set so that lr x steps is MAE's, see mae_recipe_blr) and
fine-tuned briefly with finetune.main. Results (mean ± std over seeds) go to
<out>/results.json and <out>/results.md; the sweeps also write PNG plots when matplotlib is
installed (pip install -e .[bench]).

Runs are seed-major (every variant once before any second seed; sweeps last) and each writes
its row to <out>/rows/ when done, so that a run cut short by --time_limit keeps what finished;
--reuse merges the rows of an earlier results.json, so that a study too long for one GPU session
is completed over several. --parallel N runs N pretrainings at once as subprocesses on the same
device (without NVIDIA MPS their kernels time-slice the GPU: see docs/results.md).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch.utils.data import DataLoader

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import finetune  # noqa: E402
import linprobe  # noqa: E402
import pretrain  # noqa: E402
from maepl.checkpoint import write_text_atomic  # noqa: E402  (a study spans sessions)
from maepl.config import (  # noqa: E402
    ConfigError,
    FinetuneConfig,
    LinprobeConfig,
    PretrainConfig,
    resolve_precision,
)
from maepl.data import build_dataset, build_transform  # noqa: E402
from maepl.evaluate import extract_features, feature_probe, knn_accuracy  # noqa: E402
from maepl.loaders import SeededTransformDataset, collate_drop_bad  # noqa: E402

VARIANTS = {  # name -> pretraining overrides
    "mae": dict(pos_label="none"),
    "apl_pe_kept": dict(pos_label="abs", pos_drop_ratio=0.0),  # the trivial control
    "apl_no_pe": dict(pos_label="abs", pos_embed="none"),
    "apl_drop": dict(pos_label="abs", pos_drop_ratio=0.75),
    "apl_drop_smooth": dict(pos_label="abs", pos_drop_ratio=0.75, pos_smoothing=1.0),
    "rpl_drop": dict(pos_label="rel", pos_drop_ratio=0.75),
    # between the trivial control (drop 0) and the default (0.75): how much of the PE to hide
    "apl_drop25": dict(pos_label="abs", pos_drop_ratio=0.25),
    "apl_drop50": dict(pos_label="abs", pos_drop_ratio=0.5),
    "apl_drop90": dict(pos_label="abs", pos_drop_ratio=0.9),
}
# the study issue 5 asks for; the drop-ratio variants are asked for by name (--variants)
DEFAULT_VARIANTS = ["mae", "apl_pe_kept", "apl_no_pe", "apl_drop", "apl_drop_smooth", "rpl_drop"]
# the paper's two studies around the default (apl_drop, seed 0; it is the lambda 0.5 / mask 0.75
# point): accuracy and position loss against lambda, position loss against the mask ratio
SWEEPS = {
    **{f"lambda_{x}": dict(VARIANTS["apl_drop"], pos_weight=x) for x in (0.1, 0.25, 0.75, 1.0)},
    **{f"mask_{x}": dict(VARIANTS["apl_drop"], mask_ratio=x) for x in (0.5, 0.6, 0.7, 0.8, 0.9)},
}
JOBS = {**VARIANTS, **SWEEPS}
SAVE_GRACE_S = 120  # --resume --time_limit: seconds a stopped run gets to save its checkpoint
DEFAULTS = dict(pos_weight=0.5, mask_ratio=0.75)  # PretrainConfig's, for the apl_drop point
# reference setup (configs/fmnist_vit_tiny.yaml): all 60,000 images, 40 epochs
GPU_PRE = dict(
    model="mae_vit_tiny_patch4_28",
    dataset="fashion-mnist",
    epochs=40,
    warmup_epochs=5,
    batch_size=512,
    blr=1.5e-4,
    num_workers=8,
    # the reference figures were measured with random-resized-crop + flip on the GPU
    data_pipeline="gpu",
    compile=True,
)
BUDGETS = {
    "gpu": dict(
        pre=GPU_PRE,
        ft_epochs=5,
        ft_batch=256,
        probe_epochs=100,
        lp=dict(epochs=10, warmup_epochs=1, batch_size=1024),
    ),
    # CPU-sized: the 10,000-image embedded sample, a 96-d x 6 ViT, small batches for steps
    "cpu": dict(
        pre=dict(
            model="mae_vit_micro_patch4_28",
            dataset="sample",
            epochs=10,
            warmup_epochs=1,
            batch_size=128,
            blr=1.5e-3,
            num_workers=2,
        ),
        ft_epochs=1,
        ft_batch=64,
        probe_epochs=50,
        lp=dict(epochs=10, warmup_epochs=1, batch_size=256),
    ),
    # the reference's own CPU-sized run (shared/reference.md: "the same code on 2 CPU cores"):
    # the gpu budget's model, batch and recipe on 10,000 training images for 10 epochs (190
    # steps) in float32, probed on those 10,000 and the full 10,000-image test set (needs
    # --data_path). A direct comparison with the official code that fits a CPU session
    "refcpu": dict(
        pre=dict(
            GPU_PRE, dataset="sample", epochs=10, num_workers=2, compile=False, mixed_precision="no"
        ),
        test_dataset="fashion-mnist",
        ft_epochs=0,
        ft_batch=256,
        probe_epochs=100,
        lp=None,  # the reference has no linprobe.py figure here
    ),
    "smoke": dict(
        pre=dict(
            model="mae_vit_micro_patch4_28",
            dataset="sample",
            epochs=1,
            max_steps=3,
            embed_dim=24,
            depth=1,
            decoder_depth=1,
            batch_size=32,
            num_workers=0,
        ),
        ft_epochs=0,
        ft_batch=64,
        probe_epochs=2,
        # one epoch's schedule (and lr), cut and evaluated at step 20 of 156: the stage's
        # plumbing, without the full epoch that took half of a smoke run's time
        lp=dict(epochs=1, warmup_epochs=0, batch_size=64, max_steps=20),
    ),
}


# linprobe.py's MAE recipe (LARS, BatchNorm + Linear, CLS, RandomResizedCrop + flip) at a small
# budget: LARS moves a weight by about lr * 1e-3 of its norm a step, so with MAE's base lr the
# probe barely leaves its init in a few hundred steps (docs/linprobe.md). The budgets keep MAE's
# lr x steps instead: ImageNet, effective batch 16,384, lr 6.4 (blr 0.1), 90 epochs = 7,037 steps.
MAE_LP_LR_STEPS = 6.4 * (90 * 1_281_167 // 16_384)


def mae_recipe_blr(images: int, lp: dict) -> float:
    """The base lr that gives MAE's ImageNet lr x steps for this probe's step count."""
    steps = lp["epochs"] * (images // lp["batch_size"])
    return MAE_LP_LR_STEPS / steps * 256 / lp["batch_size"]


def own_data_path(dataset: str, data_path: str | None) -> str | None:
    """The data_path a run on ``dataset`` reads: none for the embedded sample (the refcpu
    budget's --data_path is its test set's, which the scripts would refuse beside 'sample')."""
    return None if dataset == "sample" else data_path


def linprobe_mae_recipe(
    folder: Path,
    dataset: str,
    data_path: str | None,
    lp: dict,
    seed: int,
    workers: int,
    lp_dir,
    mixed_precision: str = "auto",
    resume: bool = False,
) -> dict:
    """linprobe.py on the export, CLS token; top-1, the base lr and the precision it used.
    ``resume``: continue the probe's own checkpoint in ``lp_dir`` (saved every epoch)."""
    images = len(build_dataset(dataset, data_path, True))
    blr = mae_recipe_blr(images, lp)
    cfg = LinprobeConfig(
        finetune=str(folder),
        dataset=dataset,
        data_path=own_data_path(dataset, data_path),
        **lp,
        blr=blr,
        seed=seed,
        num_workers=workers,
        save_every=1,
        mixed_precision=mixed_precision,
        output_dir=str(lp_dir),
        overwrite=not resume,
        resume="auto" if resume else "",
    ).validate()
    top1 = finished(linprobe.main(cfg), f"linprobe.py in {lp_dir}")["top1"]
    return dict(lp_cls=top1, lp_blr=round(blr, 3), lp_precision=resolve_precision(mixed_precision))


def finished(summary: dict, what: str) -> dict:
    """A stage's summary, or exit if a signal stopped it (it saved a checkpoint to resume)."""
    if summary.get("stopped_by_signal"):
        sys.exit(f"{what}: stopped at step {summary['step']}; rerun with --resume")
    return summary


class EvalStages:
    """The evaluation stages of one run (probes, linprobe.py, fine-tune), each kept in
    ``path`` once done: with ``--resume`` a session that ends during an evaluation (an hour on
    a CPU at the gpu budget) loses only the stage under way, and a stage an earlier session
    began continues its own checkpoint. What the stages read is their key: the export (its
    SHA-256) and ``settings`` (device, precision, data, the budget's evaluation recipe); if
    either differs from the record, every stage starts over."""

    def __init__(self, path: Path, weights: Path, settings: dict, resume: bool):
        self.path = path
        key = dict(export_sha256=hashlib.sha256(weights.read_bytes()).hexdigest(), **settings)
        key = json.loads(json.dumps(key))  # as it reads back from the file (tuples -> lists)
        kept = json.loads(path.read_text()) if resume and path.exists() else {}
        if kept.get("key") != key:
            if kept:
                print(f"note: {path}: another export or other settings; evaluating anew")
            kept = dict(key=key, done={}, started=[], seconds={})
        self.state = kept
        self._save()

    def _save(self) -> None:
        write_text_atomic(self.path, json.dumps(self.state, indent=1))

    def run(self, key: str, stage: Callable[[bool], dict]) -> dict:
        """``stage(resume)``'s result, computed unless an earlier session finished it."""
        if key not in self.state["done"]:
            resume = key in self.state["started"]
            if not resume:
                self.state["started"].append(key)
                self._save()
            t0 = time.perf_counter()
            try:
                try:
                    self.state["done"][key] = stage(resume)
                except ConfigError as err:  # its checkpoint cannot be resumed (a moved folder,
                    if not resume:  # say): start this stage over rather than stay stuck
                        raise
                    print(f"note: {key}: cannot resume ({err}); starting the stage over")
                    self.state["done"][key] = stage(False)
            finally:  # a stopped stage's time counts too (not a kill: no handler then)
                spent = self.state["seconds"].get(key, 0.0) + time.perf_counter() - t0
                self.state["seconds"][key] = round(spent, 1)
                self._save()
        return self.state["done"][key]

    @property
    def seconds(self) -> float:
        return round(sum(self.state["seconds"].values()), 1)


def evaluate_export(
    folder: Path,
    dataset: str,
    data_path: str | None,
    probe_epochs: int,
    device: str,
    test_dataset: str | None = None,
) -> dict[str, float]:
    """Reference protocol on ``dataset``'s training images and ``test_dataset``'s test images
    (default: the same dataset's)."""
    import timm

    model = timm.create_model(f"local-dir:{folder}", pretrained=True)
    cfg = model.pretrained_cfg
    tf = build_transform(
        False, cfg["input_size"][-1], cfg["input_size"][0], cfg["mean"], cfg["std"]
    )
    feats = []
    for train in (True, False):
        name = dataset if train else test_dataset or dataset
        ds = SeededTransformDataset(build_dataset(name, data_path, train), tf, 0)
        loader = DataLoader(ds, batch_size=512, num_workers=2, collate_fn=collate_drop_bad)
        f, y = extract_features(
            model, ((x, y) for x, y, _ in loader), device, autocast=device == "cuda"
        )
        feats.append((f, y))
    (tr, ytr), (te, yte) = feats
    out = {}
    for pool in ("cls", "avg"):
        out[f"probe_{pool}"] = feature_probe(
            tr[pool], ytr, te[pool], yte, epochs=probe_epochs, device=device
        )
        out[f"knn_{pool}"] = knn_accuracy(tr[pool], ytr, te[pool], yte)
    return out


def run_one(name: str, overrides: dict, seed: int, args: argparse.Namespace, out: Path) -> dict:
    budget, data_path = BUDGETS[args.budget], args.data_path
    device = "cuda" if torch.cuda.is_available() else "cpu"
    pre = dict(budget["pre"])
    if args.workers is not None:
        pre["num_workers"] = args.workers
    if args.compile_mode is not None:  # a budget without compile gets it with this mode
        pre.update(compile=True, compile_mode=args.compile_mode)
    if args.mixed_precision is not None:
        pre["mixed_precision"] = args.mixed_precision
    if args.epochs is not None:  # a longer or shorter schedule; warm-up unchanged, as MAE's
        pre["epochs"] = args.epochs
    run_dir = out / f"{name}_s{seed}"
    cfg = PretrainConfig(
        **{
            **pre,
            **overrides,
            "seed": seed,
            "data_path": own_data_path(pre["dataset"], data_path),
            "output_dir": str(run_dir),
            "vis_every": 1000,
            "log_every": 10,
            # --resume: continue this run's own checkpoint, saved every epoch
            "overwrite": not args.resume,
            "resume": "auto" if args.resume else "",
        }
    ).validate()
    if args.resume:  # a study's run continues only under the settings it was started with
        from maepl.checkpoint import resolve_resume
        from maepl.run_dir import changed_settings

        ckpt = resolve_resume("auto", run_dir)
        if ckpt is not None:
            saved = json.loads((ckpt / "state.json").read_text()).get("config", {})
            if changed := changed_settings(saved, cfg):
                sys.exit(
                    f"{name} seed {seed}: {ckpt} was trained with other settings ("
                    + ", ".join(f"{k}: {a!r}, now {b!r}" for k, (a, b) in changed.items())
                    + "); rerun with the same flags, or without --resume to start over"
                )
    t0 = time.perf_counter()
    summary = pretrain.main(cfg)
    t1 = time.perf_counter()
    # pretraining seconds over all the sessions of a resumed run
    spent = run_dir / "pretrain_seconds.txt"
    earlier = float(spent.read_text()) if args.resume and spent.exists() else 0.0
    write_text_atomic(spent, str(earlier + t1 - t0))
    if summary["stopped_by_signal"]:
        sys.exit(f"{name} seed {seed}: stopped at step {summary['step']}; rerun with --resume")
    row = dict(
        variant=name,
        seed=seed,
        pretrain_s=round(earlier + t1 - t0, 1),
        pos_loss=summary.get("pos_loss") if cfg.pos_label != "none" else None,
        pos_acc=summary.get("pos_acc") if cfg.pos_label != "none" else None,
        mae_loss=summary.get("mae_loss"),
        # where it ran: rows of several sessions (--reuse) may come from different machines
        device=torch.cuda.get_device_name() if device == "cuda" else f"cpu x{os.cpu_count()}",
        precision=resolve_precision(cfg.mixed_precision),
        # what --resume checks before taking a finished row (since session 19)
        budget=args.budget,
        epochs=cfg.epochs,
        cpu_model=cpu_model(),
        torch=torch.__version__,
        **overrides,
    )
    export = run_dir / "export" / "encoder"
    eval_settings = dict(
        device=device,
        precision=resolve_precision(pre.get("mixed_precision", "auto")),
        data_path=data_path,
        **{
            k: budget.get(k)
            for k in ("probe_epochs", "lp", "ft_epochs", "ft_batch", "test_dataset")
        },
    )
    stages = EvalStages(
        run_dir / "eval_stages.json", export / "model.safetensors", eval_settings, args.resume
    )
    probes = stages.run(
        "probes",
        lambda _: evaluate_export(
            export,
            cfg.dataset,
            data_path,
            budget["probe_epochs"],
            device,
            budget.get("test_dataset"),
        ),
    )
    row.update(probes)
    if name in VARIANTS and budget["lp"]:  # the sweeps read probe and position loss only
        lp = stages.run(
            "linprobe",
            lambda resume: linprobe_mae_recipe(
                export,
                cfg.dataset,
                data_path,
                budget["lp"],
                seed,
                pre["num_workers"],
                run_dir / "lp",
                pre.get("mixed_precision", "auto"),
                resume,
            ),
        )
        row.update(lp)
    if budget["ft_epochs"] and name in VARIANTS:

        def fine_tune(resume: bool) -> dict:  # resume: continue its own checkpoint
            ft = FinetuneConfig(
                finetune=str(export),
                dataset=cfg.dataset,
                data_path=cfg.data_path,
                epochs=budget["ft_epochs"],
                warmup_epochs=0.2,
                blr=5e-3,
                mixup=0.0,
                cutmix=0.0,
                aa=None,
                # timm's default jitter, which aa=None left on until session 8: the rows of
                # every session keep one protocol
                color_jitter=0.4,
                reprob=0.0,
                seed=seed,
                batch_size=budget["ft_batch"],
                num_workers=pre["num_workers"],
                mixed_precision=pre.get("mixed_precision", "auto"),
                output_dir=str(run_dir / "ft"),
                overwrite=not resume,
                resume="auto" if resume else "",
            ).validate()
            top1 = finished(finetune.main(ft), f"finetune.py in {ft.output_dir}")["top1"]
            return dict(finetune_top1=top1)

        row.update(stages.run("finetune", fine_tune))
    row["eval_s"] = stages.seconds  # over all the sessions of a resumed evaluation
    print(json.dumps(row), flush=True)
    return row


def num(x: float, sign: str = "", digits: int = 2) -> str:
    """``digits`` decimals; a small non-zero value (a collapsed position loss, 0.0002) keeps two
    significant digits instead of printing as 0.00."""
    shown = x == 0 or abs(x) >= 0.5 * 10**-digits
    return f"{x:{sign}.{digits}f}" if shown else f"{x:{sign}.1e}"


def mean_sd(vals: list[float], sign: str = "", digits: int = 2) -> str:
    """``mean ± sd`` over seeds, the sample standard deviation (n - 1: with two seeds it is
    |a - b| / sqrt 2); one seed has no spread to show, so the mean alone."""
    if len(vals) == 1:
        return num(vals[0], sign, digits)
    return f"{num(statistics.mean(vals), sign, digits)} ± {num(statistics.stdev(vals), '', digits)}"


def aggregate(rows: list[dict], keys: list[str]) -> dict[str, dict[str, str]]:
    table = {}
    for name in dict.fromkeys(r["variant"] for r in rows):
        mine = [r for r in rows if r["variant"] == name]
        table[name] = {"seeds": str(len(mine))}
        for k in keys:
            vals = [r[k] for r in mine if r.get(k) is not None]
            if k.startswith("pos_") and mine[0].get("pos_label") == "none":
                vals = []  # no position head (rows of older code stored 0.0 here)
            if vals:  # a column some rows lack (older code's) says over how many it is
                n = f" (n={len(vals)})" if len(vals) != len(mine) else ""
                table[name][k] = mean_sd(vals) + n
    return table


def pair_key(row: dict) -> tuple:
    """What a variant's row and plain MAE's must share to be paired: the seed, the device and
    the precision (a pair across them would measure the machine or the arithmetic)."""
    return row["seed"], row.get("device"), row.get("precision")


def unpaired(rows: list[dict]) -> list[str]:
    """Variant rows with no plain-MAE row to pair with (left out of the gains)."""
    mae = {pair_key(r) for r in rows if r["variant"] == "mae"}
    return [
        f"{r['variant']}_s{r['seed']} ({r.get('device') or 'unknown device'}, "
        f"{r.get('precision') or 'unknown precision'})"
        for r in rows
        if r["variant"] != "mae" and pair_key(r) not in mae
    ]


def paired_gains(rows: list[dict], keys: list[str]) -> dict[str, dict[str, str]]:
    """Each variant minus plain MAE of the same seed (same data order and augmentations; the
    initial weights and masks differ, since the variants' heads draw from the same RNG first),
    the same device and the same precision (``pair_key``: rows merged with --reuse may come
    from a CPU and a GPU: a pair across them would measure the machine): mean ± sd of the
    per-seed differences, and how many seeds gained. Rows' CPU models (``cpu_model``, since
    session 19) are not part of the key: older rows lack them."""
    mae = {pair_key(r): r for r in rows if r["variant"] == "mae"}
    table = {}
    for name in dict.fromkeys(r["variant"] for r in rows if r["variant"] != "mae"):
        pairs = [(r, mae[pair_key(r)]) for r in rows if r["variant"] == name and pair_key(r) in mae]
        if not pairs:
            continue
        table[name] = {"seeds": str(len(pairs))}
        for k in keys:
            d = [r[k] - m[k] for r, m in pairs if r.get(k) is not None and m.get(k) is not None]
            if d:
                up = sum(x > 0 for x in d)
                table[name][k] = f"{mean_sd(d, '+')} ({up}/{len(d)} up)"
    return table


def job_list(args: argparse.Namespace) -> list[tuple[str, int]]:
    """Seed-major, so that a run cut short still has every variant once; sweeps last (and
    seed-major among themselves)."""
    jobs = [(v, s) for s in range(args.seeds) for v in args.variants]
    if args.sweeps:  # each sweep seed's centre point (lambda 0.5, mask 0.75) is apl_drop's row
        jobs += [("apl_drop", s) for s in range(args.sweep_seeds) if ("apl_drop", s) not in jobs]
        jobs += [(name, s) for s in range(args.sweep_seeds) for name in SWEEPS]
    return jobs


def cpu_model() -> str:
    """The CPU's model name (rows of two machines with as many cores read the same device)."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def check_finished(rows: dict[tuple[str, int], dict], out: Path, budget: str, epochs: int):
    """--resume takes a finished row only from a run of the same budget and schedule length
    (rows of older code record neither: taken, with a note)."""
    unrecorded = []
    for (name, seed), row in rows.items():
        if "budget" not in row:
            unrecorded.append(f"{name}_s{seed}")
            continue
        if (row["budget"], row["epochs"]) != (budget, epochs):
            sys.exit(
                f"error: --resume: {row_path(out, name, seed)} is a row of budget "
                f"{row['budget']!r} at {row['epochs']} epochs, not {budget!r} at {epochs}; "
                "use another --out, or delete the row to run it again"
            )
    if unrecorded:
        print(f"note: rows of older code, budget and epochs not recorded: {', '.join(unrecorded)}")


def row_path(out: Path, name: str, seed: int) -> Path:
    return out / "rows" / f"{name}_s{seed}.json"


def run_jobs(args: argparse.Namespace, jobs: list[tuple[str, int]], out: Path) -> list[str]:
    """Run jobs (in this process, or as subprocesses: ``--parallel`` of them sharing the device,
    and always under ``--time_limit`` so that a run can be killed at the deadline), each writing
    its row to <out>/rows/ when done. Returns the jobs that did not finish."""
    deadline = time.monotonic() + args.time_limit if args.time_limit else float("inf")
    pending, running, failed = list(jobs), {}, []
    while pending or running:
        while pending and len(running) < args.parallel and time.monotonic() < deadline:
            name, seed = pending.pop(0)
            if args.parallel == 1 and not args.time_limit:  # a limit needs killable runs
                row = run_one(name, JOBS[name], seed, args, out)
                write_text_atomic(row_path(out, name, seed), json.dumps(row))
                continue
            cmd = [sys.executable, __file__, "--budget", args.budget, "--job", f"{name}:{seed}"]
            cmd += ["--out", str(out)]
            if args.data_path:
                cmd += ["--data_path", args.data_path]
            if args.workers is not None:
                cmd += ["--workers", str(args.workers)]
            if args.compile_mode is not None:
                cmd += ["--compile_mode", args.compile_mode]
            if args.mixed_precision is not None:
                cmd += ["--mixed_precision", args.mixed_precision]
            if args.epochs is not None:
                cmd += ["--epochs", str(args.epochs)]
            if args.resume:
                cmd += ["--resume"]
            # appended: a resumed job's log keeps the attempts before it
            log = open(out / "logs" / f"{name}_s{seed}.log", "a")
            log.write(f"=== {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(cmd)}\n")
            log.flush()
            # share the cores: N runs with all cores' worth of threads each oversubscribe them
            threads = str(max(1, (os.cpu_count() or 1) // args.parallel))
            env = {**os.environ, "OMP_NUM_THREADS": threads}
            proc = subprocess.Popen(
                cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
            )
            running[(name, seed)] = (proc, log)
            print(f"started {name} seed {seed} (pid {proc.pid})", flush=True)
        if not running and (not pending or time.monotonic() >= deadline):
            break
        time.sleep(0.5)
        for job, (proc, log) in list(running.items()):
            late = time.monotonic() >= deadline
            if proc.poll() is None and not late:
                continue
            if proc.poll() is None and args.resume:  # out of time: let it save a checkpoint
                proc.send_signal(signal.SIGTERM)  # the run alone: its workers must live on
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=SAVE_GRACE_S)
            if proc.poll() is None:  # out of time: without --resume the unfinished run is lost
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            log.close()
            del running[job]
            if proc.returncode != 0 or not row_path(out, *job).exists():
                failed.append(f"{job[0]}_s{job[1]}")
                tail = (out / "logs" / f"{job[0]}_s{job[1]}.log").read_text()[-1500:]
                why = "killed at --time_limit" if late else f"exit {proc.returncode}"
                print(f"job {job[0]} seed {job[1]}: {why}\n{tail}", flush=True)
            else:
                print(row_path(out, *job).read_text(), flush=True)
    return failed + [f"{n}_s{s}" for n, s in pending]


def fill_linprobe(args: argparse.Namespace, jobs: list, done: dict, out: Path) -> None:
    """Rows without linprobe.py's column (rows of older code, via --reuse or --resume) get it
    from the exports their runs kept: <dir>/<variant>_s<seed>/export/encoder, for the dirs of
    --fill_lp and then --out. Each filled row is saved to <out>/rows/ as it is done."""
    budget = BUDGETS[args.budget]
    workers = args.workers if args.workers is not None else budget["pre"]["num_workers"]
    dirs = [*args.fill_lp, out]
    for name, seed in jobs:
        row = done.get((name, seed))
        if row is None or name not in VARIANTS or "lp_cls" in row or not budget["lp"]:
            continue
        saved = row_path(out, name, seed)
        if saved.exists() and "lp_cls" in (earlier := json.loads(saved.read_text())):
            keys = ("lp_cls", "lp_blr", "lp_precision")
            row.update({k: earlier[k] for k in keys if k in earlier})
            continue
        exports = [d / f"{name}_s{seed}" / "export" / "encoder" for d in dirs]
        export = next((e for e in exports if (e / "model.safetensors").exists()), None)
        if export is None:
            print(f"--fill_lp: no export of {name} seed {seed} in {', '.join(map(str, dirs))}")
            continue
        lp_dir = out / "lp_fill" / f"{name}_s{seed}"
        dataset = budget["pre"]["dataset"]
        row.update(
            linprobe_mae_recipe(
                export,
                dataset,
                args.data_path,
                budget["lp"],
                seed,
                workers,
                lp_dir,
                args.mixed_precision or budget["pre"].get("mixed_precision", "auto"),
            )
        )
        write_text_atomic(saved, json.dumps(row))
        print(f"--fill_lp: {name} seed {seed} lp_cls {row['lp_cls']:.2f} ({export})", flush=True)


def load_reused(path: str | None, budget: str, epochs: int) -> dict[tuple[str, int], dict]:
    """Rows of an earlier results.json (another session's, say) at the same budget and
    schedule length (files from before --epochs existed ran the budget's)."""
    if not path:
        return {}
    if not Path(path).is_file():
        sys.exit(f"error: --reuse {path}: no such file (a finished study's results.json)")
    data = json.loads(Path(path).read_text())
    if data.get("budget") != budget:
        sys.exit(f"error: --reuse {path}: budget {data.get('budget')!r}, not {budget!r}")
    theirs = data.get("epochs", BUDGETS[budget]["pre"]["epochs"])
    if theirs != epochs:
        sys.exit(f"error: --reuse {path}: {theirs} pretraining epochs, not {epochs}")
    return {(r["variant"], r["seed"]): r for r in data["rows"] + data.get("sweeps", [])}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--budget", choices=sorted(BUDGETS), default="cpu")
    p.add_argument("--seeds", type=int, default=2)
    p.add_argument(
        "--variants",
        default=",".join(DEFAULT_VARIANTS),
        help=f"comma-separated, from {', '.join(VARIANTS)}\n"
        f"(default: {', '.join(DEFAULT_VARIANTS)})",
    )
    p.add_argument("--sweeps", action="store_true", help="lambda and mask-ratio sweeps (apl_drop)")
    p.add_argument(
        "--sweep_seeds",
        type=int,
        default=1,
        help="seeds of each sweep point (default 1: seed 0); tables and plots show mean ± sd.\n"
        "The centre point of seed s is apl_drop's row of seed s (run if not there)",
    )
    p.add_argument("--data_path", default=None)
    p.add_argument("--out", default=None)
    p.add_argument(
        "--parallel",
        type=int,
        default=1,
        help="runs at once, as subprocesses on one device. Measured on one H100 without MPS\n"
        "(gpu budget, 4 at once): 3.5-4 steps/s each, far slower than one run alone\n"
        "is expected to be; see docs/results.md",
    )
    p.add_argument("--workers", type=int, default=None, help="data workers per run")
    p.add_argument(
        "--epochs",
        type=int,
        default=None,
        help="pretraining epochs instead of the budget's (warm-up unchanged, as in MAE's\n"
        "recipe); evaluation unchanged. For the gain against schedule length",
    )
    p.add_argument(
        "--compile_mode",
        default=None,
        choices=("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"),
        help="compile the pretrainings in this torch.compile mode (reduce-overhead = CUDA graphs)",
    )
    p.add_argument(
        "--mixed_precision",
        default=None,
        choices=("auto", "no", "bf16", "fp16"),
        help="precision of the pretraining, linprobe.py and fine-tuning stages (default auto:\n"
        "accelerate launch's bf16 or fp16 if given, else bf16 on GPUs, none on CPU)",
    )
    p.add_argument(
        "--time_limit",
        type=float,
        default=None,
        help="seconds: start no run after this, kill runs still going (results keep what\n"
        "finished; the rest is listed as not run)",
    )
    p.add_argument(
        "--reuse",
        default=None,
        metavar="RESULTS_JSON",
        help="take the rows of an earlier results.json (same budget); run only the rest",
    )
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue each run's own checkpoint under --out (saved every epoch) instead of\n"
        "starting over: a run longer than a session (the gpu budget on a CPU, say) is\n"
        "stopped with SIGTERM (it saves) and finished later; evaluation stages done are kept\n"
        "(<run>/eval_stages.json) and linprobe.py / the fine-tune continue theirs",
    )
    p.add_argument(
        "--fill_lp",
        default=None,
        metavar="DIR[,DIR]",
        help="rows lacking linprobe.py's MAE-recipe column (rows of older code) get it from\n"
        "the exports kept under these earlier --out folders (and --out)",
    )
    p.add_argument(
        "--report_only",
        action="store_true",
        help="run nothing: write results.json / results.md from the --reuse rows and (with\n"
        "--resume) the runs finished under --out, listing the rest as not run (to merge a\n"
        "run finished with --job into a study without starting the study's other runs)",
    )
    p.add_argument("--job", default=None, help=argparse.SUPPRESS)  # NAME:SEED, one subprocess
    args = p.parse_args(argv)
    args.variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in args.variants if v not in VARIANTS]
    if unknown:
        p.error(f"--variants: unknown {unknown}; choose from {', '.join(VARIANTS)}")
    if args.parallel < 1:
        p.error("--parallel must be >= 1")
    if args.sweep_seeds < 1 or (args.sweep_seeds != 1 and not args.sweeps):
        p.error("--sweep_seeds must be >= 1, and goes with --sweeps")
    if args.epochs is not None and args.epochs < 1:
        p.error("--epochs must be >= 1")
    args.fill_lp = [Path(d) for d in (args.fill_lp or "").split(",") if d]
    if args.report_only and (args.fill_lp or args.job):
        p.error("--report_only runs nothing: it takes neither --fill_lp nor --job")
    missing = [str(d) for d in args.fill_lp if not d.is_dir()]
    if missing:
        p.error(f"--fill_lp: no such folder: {', '.join(missing)}")
    test = BUDGETS[args.budget].get("test_dataset")
    if test:  # before any pretraining: the probes test on another dataset's test split
        try:
            build_dataset(test, args.data_path, train=False)
        except FileNotFoundError as e:
            p.error(f"--data_path: the {args.budget} budget tests on {test}: {e}")
    out = Path(args.out or ROOT / "output" / f"quality_{args.budget}")
    (out / "rows").mkdir(parents=True, exist_ok=True)
    (out / "logs").mkdir(exist_ok=True)
    if args.job:
        name, seed = args.job.rsplit(":", 1)
        row = run_one(name, JOBS[name], int(seed), args, out)
        write_text_atomic(row_path(out, name, int(seed)), json.dumps(row))
        return

    epochs = args.epochs or BUDGETS[args.budget]["pre"]["epochs"]
    reused = load_reused(args.reuse, args.budget, epochs)
    jobs = job_list(args)
    todo = [j for j in jobs if j not in reused]
    if reused:
        print(f"reusing {len(jobs) - len(todo)} rows from {args.reuse}; {len(todo)} to run")
    finished = []  # --resume: runs that finished in an earlier session under --out are done
    if args.resume:
        finished = [j for j in todo if row_path(out, *j).exists()]
        todo = [j for j in todo if j not in finished]
        if finished:
            print(f"resume: {len(finished)} runs already finished under {out}; {len(todo)} to run")
            check_finished(
                {j: json.loads(row_path(out, *j).read_text()) for j in finished},
                out,
                args.budget,
                epochs,
            )
    t0 = time.perf_counter()
    if args.report_only:
        not_run = [f"{name}_s{seed}" for name, seed in todo]  # as run_jobs names them
    else:
        not_run = run_jobs(args, todo, out)
    done = dict(reused)
    # rows of jobs this call ran to the end (a failed or killed job's older row, kept on disk
    # since a refused rerun must not lose it, is not reported as this run's)
    ran = [j for j in todo if f"{j[0]}_s{j[1]}" not in not_run]
    for name, seed in ran + finished:
        if row_path(out, name, seed).exists():
            done[(name, seed)] = json.loads(row_path(out, name, seed).read_text())
    if args.fill_lp:
        fill_linprobe(args, jobs, done, out)
    rows = [done[j] for j in jobs if j in done and j[0] in VARIANTS]
    sweeps = [done[j] for j in jobs if j in done and j[0] in SWEEPS]
    keys = [
        "probe_cls",
        "probe_avg",
        "knn_cls",
        "knn_avg",
        "lp_cls",
        "finetune_top1",
        "pos_loss",
        "pos_acc",
        "pretrain_s",
    ]
    table = aggregate(rows, keys)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    device_name = torch.cuda.get_device_name() if device == "cuda" else platform.processor()
    meta = dict(
        budget=args.budget,
        epochs=epochs,
        device=device,
        device_name=device_name or platform.machine(),
        torch=torch.__version__,
        wall_s=round(time.perf_counter() - t0, 1),
        parallel=args.parallel,
        not_run=not_run,
    )
    write_text_atomic(
        out / "results.json", json.dumps(dict(**meta, rows=rows, sweeps=sweeps), indent=1)
    )
    cols = ["seeds", *keys]
    lines = ["| variant | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    lines += [
        f"| {n} | " + " | ".join(v.get(k, "–") for k in cols) + " |" for n, v in table.items()
    ]
    gains = paired_gains(rows, keys[:6])
    devices = sorted({r.get("device") or "unknown" for r in rows})
    if len(devices) > 1:  # the means above pool them; the gains below never pair across them
        lines += [
            "",
            f"rows from {len(devices)} devices ({', '.join(devices)}; each row's is in "
            "results.json): gains pair rows of the same seed and device only",
        ]
    if gains:
        cols = ["seeds", *keys[:6]]
        lines += ["", "Gain over plain MAE, paired by seed, device and precision:", ""]
        lines += ["| variant | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
        lines += [
            f"| {n} | " + " | ".join(v.get(k, "–") for k in cols) + " |" for n, v in gains.items()
        ]
    if lonely := unpaired(rows):
        lines.append(
            f"\nno plain-MAE row to pair with (left out of the gains): {', '.join(lonely)}"
        )
    if not_run:
        lines.append(f"\nnot run (time limit or failure): {', '.join(not_run)}")
    points = []
    if sweeps:  # with each seed's centre point, apl_drop's row of that seed
        seeds = sorted({r["seed"] for r in sweeps})
        points = sweeps + [done[("apl_drop", s)] for s in seeds if ("apl_drop", s) in done]
        lines += ["", *sweep_table(points)]
    write_text_atomic(out / "results.md", "\n".join(lines) + "\n")
    print("\n".join(lines))
    if points:
        plot_sweeps(points, out)


SWEEP_KEYS = ["probe_cls", "probe_avg", "knn_cls", "knn_avg", "pos_loss", "pos_acc"]


def sweep_series(points: list[dict], key: str) -> dict[float, list[dict]]:
    """The rows of one sweep (``key``: pos_weight or mask_ratio) by its value, ascending. The
    centre point (apl_drop's rows, which do not record the defaults) belongs to both."""
    by_value: dict[float, list[dict]] = {}
    for r in points:
        if key in r or r["variant"] == "apl_drop":
            by_value.setdefault(r.get(key, DEFAULTS[key]), []).append(r)
    return dict(sorted(by_value.items()))


def sweep_table(points: list[dict]) -> list[str]:
    """results.md's sweep table: each point's mean ± sd over its seeds."""
    lines = ["Sweeps around the default (apl_drop), mean ± sd over seeds:", ""]
    lines += ["| point | seeds | " + " | ".join(SWEEP_KEYS) + " |"]
    lines += ["|---" * (len(SWEEP_KEYS) + 2) + "|"]
    for key, label in (("pos_weight", "λ"), ("mask_ratio", "mask")):
        for x, rows in sweep_series(points, key).items():
            vals = [[r[k] for r in rows if r.get(k) is not None] for k in SWEEP_KEYS]
            # three decimals for the position loss and accuracy: the λ trend is 0.05 wide
            cells = [
                mean_sd(v, digits=3 if k.startswith("pos_") else 2) if v else "–"
                for k, v in zip(SWEEP_KEYS, vals, strict=True)
            ]
            lines.append(f"| {label} {x} | {len(rows)} | " + " | ".join(cells) + " |")
    return lines


def plot_sweeps(points: list[dict], out: Path) -> None:
    """The paper's two studies: accuracy and final position loss against λ, position loss
    against the mask ratio; each point the mean over its seeds, the bar its sd."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: sweep plots skipped (pip install -e .[bench])")
        return

    def curve(ax, series: dict[float, list[dict]], key: str, style: str, **kw) -> None:
        vals = [[r[key] for r in rows] for rows in series.values()]
        sd = [statistics.stdev(v) if len(v) > 1 else 0.0 for v in vals]
        means = [statistics.mean(v) for v in vals]
        ax.errorbar(list(series), means, yerr=sd, fmt=style, capsize=3, **kw)

    lam = sweep_series(points, "pos_weight")
    seeds = max(len(rows) for rows in lam.values())
    fig, ax = plt.subplots(1, 2, figsize=(9, 3.5))
    for key, style in (("probe_cls", "o-"), ("probe_avg", "o--"), ("knn_cls", "s-")):
        curve(ax[0], lam, key, style, label=key.replace("_", " "))
    ax[0].set_xlabel("λ (pos_weight)"), ax[0].set_ylabel("top-1 %"), ax[0].legend()
    curve(ax[1], lam, "pos_loss", "o-")
    ax[1].set_xlabel("λ (pos_weight)"), ax[1].set_ylabel("final position loss")
    if seeds > 1:
        fig.suptitle(f"mean ± sd over {seeds} seeds", fontsize=9)
    fig.tight_layout()
    fig.savefig(out / "lambda_sweep.png", dpi=120)
    fig, ax = plt.subplots(figsize=(4.5, 3.5))
    curve(ax, sweep_series(points, "mask_ratio"), "pos_loss", "o-")
    ax.set_xlabel("mask ratio"), ax.set_ylabel("final position loss")
    if seeds > 1:
        ax.set_title(f"mean ± sd over {seeds} seeds", fontsize=9)
    fig.tight_layout()
    fig.savefig(out / "mask_sweep.png", dpi=120)
    print(f"plots: {out / 'lambda_sweep.png'}, {out / 'mask_sweep.png'}")


if __name__ == "__main__":
    main()
