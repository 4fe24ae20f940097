"""Run under torchrun by test_validate: ``val_worker.py DATA OUT``: the validator on DATA's
val split with ``LocalMean`` (each rank its own part of the split); rank 0 writes the figures
to OUT (JSON)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from val_nets import LocalMean

from models.losses import build_loss
from trainer import dist
from trainer.amp import resolve
from trainer.config import load_config
from trainer.validate import Validator

# (batch 2: rank 0 gets a last batch of one tile and a padding slot)
OVERRIDES = ["data.batch_size=2", "train.val_f1=true", "data.num_threads=1"]


def main(data: Path, out: Path) -> None:
    env = dist.init(dist.DistEnv.from_env())
    try:
        cfg = load_config(Path("configs/tiny.toml"), OVERRIDES)
        cpu = torch.device("cpu")
        v = Validator(cfg, env, data, cpu, resolve("off", cpu), build_loss(cfg.loss))
        got = v.run(LocalMean())
        v.loader.close()
        if env.is_main:
            out.write_text(json.dumps(got))
    finally:
        dist.teardown()


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
