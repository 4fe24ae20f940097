"""benchmarks.train's variants: which config each timed process trains with."""

from __future__ import annotations

from pathlib import Path

from benchmarks.train import overrides
from trainer.config import load_config


def test_a_gpu_variant_keeps_the_configs_loader_threads() -> None:
    """One DALI thread per process is the 2-core CPU setting; on a GPU machine it left the mask
    decode exposed as data wait, so there the config's own thread count is timed."""
    config = Path("configs/unet_baseline.toml")
    cpu = load_config(config, overrides("torch", "bf16", cuda=False))
    gpu = load_config(config, overrides("dali", "fp16", cuda=True))
    assert cpu.data.num_threads == 1 and gpu.data.num_threads == 4
    assert (cpu.data.backend, cpu.train.amp) == ("torch", "bf16")
    assert (gpu.data.backend, gpu.train.amp) == ("dali", "fp16")
