"""Run under torchrun by test_ema: ``ema_worker.py DATA RUN_DIR OUT``: one epoch with a weight
EMA, BatchNorm and a validation; each rank writes its EMA as it was before the validation synced
it (``OUT/before-RANK.pt``) and after (``OUT/after-RANK.pt``), and its raw weights."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from trainer import dist
from trainer.config import load_config
from trainer.trainer import Trainer


def main(data: Path, run_dir: Path, out: Path) -> None:
    env = dist.init(dist.DistEnv.from_env())
    try:
        cfg = load_config(Path("configs/tiny.toml"), [
            "train.epochs=1", "train.val_every=1", "train.val_f1=false", "train.amp=off",
            "train.ema_decay=0.9", "data.num_threads=1"])
        t = Trainer(cfg, env, data, run_dir)
        assert t.ema is not None
        real = t.ema.sync_buffers

        def sync() -> None:
            torch.save({k: v.clone() for k, v in t.ema.module.state_dict().items()},
                       out / f"before-{env.rank}.pt")
            real()

        t.ema.sync_buffers = sync  # type: ignore[method-assign]
        t.train()
        torch.save({"ema": t.ema.module.state_dict(), "raw": t.net.state_dict(),
                    "updates": t.ema.updates}, out / f"after-{env.rank}.pt")
    finally:
        dist.teardown()


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]))
