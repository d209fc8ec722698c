"""Run tracking on the main process only: JSON-lines log, TensorBoard scalars and images."""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from .checkpoint import write_text_atomic


def _step_of(row: str) -> int | None:
    """A log row's step; None for a row cut short (a kill or a full disk while writing)."""
    try:
        return json.loads(row).get("step", 0) if row.strip() else None
    except ValueError:
        return None


class Tracker:
    """Writes ``log.jsonl`` (one JSON object per log step) and TensorBoard events.

    On non-main processes every method is a no-op, so the loop needs no ``if`` around calls.
    """

    def __init__(
        self,
        output_dir: str | Path,
        enabled: bool,
        tensorboard: bool = True,
        resume_step: int | None = None,
    ):
        self.enabled = enabled
        self.writer = None
        self._log = None
        # the values of the last training row kept from an earlier run (``resume_step``), so
        # that a run resumed at its end still reports its final losses
        self.last_values: dict = {}
        if not enabled:
            return
        out = Path(output_dir)
        out.mkdir(parents=True, exist_ok=True)
        path = out / "log.jsonl"
        if resume_step is not None and path.exists():
            # rows written after the checkpoint we resume from are replayed by this run:
            # keep the log a single, increasing history
            rows = path.read_text().splitlines(keepends=True)
            kept = [r for r in rows if (step := _step_of(r)) is not None and step <= resume_step]
            if len(kept) != len(rows):
                write_text_atomic(path, "".join(kept))
            train_rows = [row for row in map(json.loads, kept) if "loss" in row]
            if train_rows:
                self.last_values = {
                    k: v for k, v in train_rows[-1].items() if k not in ("step", "time")
                }
        self._log = open(path, "a", buffering=1)
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            # purge_step hides events past the checkpoint that an interrupted run had written
            purge = max(resume_step + 1, 0) if resume_step is not None else None
            self.writer = SummaryWriter(log_dir=str(out / "tensorboard"), purge_step=purge)

    def event(self, step: int, kind: str, **fields) -> None:
        """A non-scalar record (bad image, skipped step) in log.jsonl."""
        if self.enabled:
            self._log.write(json.dumps({"step": step, "event": kind, **fields}) + "\n")

    def log(self, step: int, values: dict[str, float]) -> None:
        if not self.enabled:
            return
        row = {"step": step, "time": round(time.time(), 3), **values}
        self._log.write(json.dumps(row) + "\n")
        if self.writer is not None:
            for k, v in values.items():
                if isinstance(v, (int, float)) and k != "epoch":
                    self.writer.add_scalar(k, v, step)

    def image(self, tag: str, grid: torch.Tensor, step: int) -> None:
        """grid: [3, H, W] in [0, 1]."""
        if self.enabled and self.writer is not None:
            self.writer.add_image(tag, grid, step)

    def close(self) -> None:
        if self._log is not None:
            self._log.close()
        if self.writer is not None:
            self.writer.close()


@torch.no_grad()
def reconstruction_grid(
    mae, imgs: torch.Tensor, mean: list[float], std: list[float], seed: int = 0
) -> torch.Tensor:
    """Rows: original, masked input, reconstruction, reconstruction + visible patches.

    imgs: [n, C, H, W] normalised. With norm_pix_loss the prediction is per-patch normalised,
    so it is un-normalised with each target patch's own mean and variance for display.
    Returns a [3, rows*H', n*W'] grid in [0, 1].
    """
    from torchvision.utils import make_grid

    was_training = mae.training
    mae.eval()
    gen = torch.Generator(device=imgs.device).manual_seed(seed)
    noise = mae.make_noise(imgs.shape[0], imgs.device, gen)
    # .forward, not __call__: a model compiled in place (--compile) would otherwise recompile
    # for this batch size in eval mode (a minute for ViT-B, seen at the end of an H100 run)
    out = mae.forward(imgs, **noise)
    pred, mask = out["pred"].float(), out["mask"]
    if mae.norm_pix_loss:
        target = mae.patchify(imgs)
        mu, var = target.mean(-1, keepdim=True), target.var(-1, keepdim=True)
        pred = pred * (var + 1.0e-6) ** 0.5 + mu
    rec = mae.unpatchify(pred)
    m = mae.unpatchify(mask[..., None].expand(-1, -1, pred.shape[-1]))  # 1 = removed
    rows = torch.cat([imgs, imgs * (1 - m), rec, imgs * (1 - m) + rec * m])
    mean_t = torch.tensor(mean, device=imgs.device).view(1, -1, 1, 1)
    std_t = torch.tensor(std, device=imgs.device).view(1, -1, 1, 1)
    rows = (rows * std_t + mean_t).clamp(0, 1)
    if rows.shape[1] == 1:
        rows = rows.expand(-1, 3, -1, -1)
    mae.train(was_training)
    return make_grid(rows.cpu(), nrow=imgs.shape[0], padding=1)
