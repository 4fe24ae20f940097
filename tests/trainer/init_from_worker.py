"""Run under torchrun by test_init_from: rank 0's train.init_from names one checkpoint and rank
1's another, as when a source run still training re-marks its best.pt between the ranks' reads.

Writes to OUT (JSON, rank 0): whether every rank ended with the weights of rank 0's file.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from trainer import checkpoint as ckpt
from trainer import dist
from trainer.config import load_config
from trainer.trainer import Trainer


def init(env: dist.DistEnv, data: Path, run_dir: Path, sources: list[str], out: Path) -> None:
    # (channels_last as the GPU presets have it: its weights are not contiguous in the default
    # format, and the broadcast must take them as they are)
    cfg = load_config(Path("configs/tiny.toml"), ["train.val_every=0", "data.num_threads=1",
                                                  "model.channels_last=true",
                                                  f"train.init_from={sources[env.rank]}"])
    t = Trainer(cfg, env, data, run_dir)
    try:
        t.init_weights()
    finally:
        t.train_loader.close()
    want = ckpt.load(Path(sources[0]))["model"]
    mine = t.net.state_dict()
    same = dist.gather_objects(all(torch.equal(mine[k], want[k]) for k in want))
    if env.is_main:
        out.write_text(json.dumps({"same_as_rank_0s_file": same, "source": t.init_source}))


def main(data: Path, run_dir: Path, sources: list[str], out: Path) -> None:
    env = dist.init(dist.DistEnv.from_env())
    try:  # (the Trainer gone before the teardown: see nan_worker.py)
        init(env, data, run_dir, sources, out)
    finally:
        dist.teardown()


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3:5], Path(sys.argv[5]))
