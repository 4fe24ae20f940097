"""Run under torchrun by test_distributed: ``cut_worker.py DATA RUN_DIR STEP``: every rank stops
right after the checkpoint at global step STEP (as the whole job would, killed), then a new
Trainer on the same run directory resumes from it and finishes (as the rerun job would)."""

from __future__ import annotations

import sys
from pathlib import Path

from stop_at import train_until

from trainer import dist
from trainer.config import load_config
from trainer.trainer import Trainer


def main(data: Path, run_dir: Path, step: int) -> None:
    env = dist.init(dist.DistEnv.from_env())
    try:
        cfg = load_config(Path("configs/tiny.toml"), [
            "train.val_every=0", "train.epochs=2", "train.checkpoint_every_steps=2",
            "data.num_threads=1"])
        train_until(Trainer(cfg, env, data, run_dir), step)
        Trainer(cfg, env, data, run_dir).train()
    finally:
        dist.teardown()


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3]))
