"""Run under torchrun by test_distributed: ``cut_worker.py DATA RUN_DIR STEP``: every rank stops
right after the checkpoint at global step STEP (as the whole job would, killed), then a new
Trainer on the same run directory resumes from it and finishes (as the rerun job would)."""

from __future__ import annotations

import sys
from pathlib import Path

from trainer import dist
from trainer.config import load_config
from trainer.trainer import Trainer


class CutError(Exception):
    pass


def main(data: Path, run_dir: Path, step: int) -> None:
    env = dist.init(dist.DistEnv.from_env())
    try:
        cfg = load_config(Path("configs/tiny.toml"), [
            "train.val_every=0", "train.epochs=2", "train.checkpoint_every_steps=2",
            "data.num_threads=1"])
        cut = Trainer(cfg, env, data, run_dir)
        real = cut.save_checkpoint

        def save_then_stop(best: bool) -> None:
            real(best)
            if cut.global_step == step:
                raise CutError

        cut.save_checkpoint = save_then_stop  # type: ignore[method-assign]
        try:
            cut.train()
        except CutError:
            pass
        else:
            raise AssertionError(f"no checkpoint at step {step}")
        Trainer(cfg, env, data, run_dir).train()
    finally:
        dist.teardown()


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3]))
