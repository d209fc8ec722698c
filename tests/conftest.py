import os
import sys

import pytest
import torch

# two cores: keep intra-op threads from oversubscribing when tests run subprocesses
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def tiny_cfg(tmp_path):
    """A resolved PretrainConfig for a very small model on the embedded sample."""
    from maepl.config import PretrainConfig

    def make(**kw):
        base = dict(
            model="mae_vit_micro_patch4_28",
            dataset="sample",
            embed_dim=48,
            depth=2,
            num_heads=3,
            decoder_embed_dim=32,
            decoder_depth=1,
            decoder_num_heads=2,
            batch_size=32,
            epochs=2,
            warmup_epochs=0.2,
            blr=1.5e-3,
            num_workers=0,
            log_every=5,
            vis_every=1,
            output_dir=str(tmp_path / "run"),
        )
        base.update(kw)
        return PretrainConfig(**base).validate()

    return make


def torchrun(script: str, port: int) -> list[str]:
    """The start of a 2-process ``torch.distributed.run`` command line for ``script``."""
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
            "--master_port", str(port), script]  # fmt: skip
