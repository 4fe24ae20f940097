"""Run under torchrun by test_distributed: rank 1's first training step fails on its own (a
CUDA out-of-memory error, say: no collective agrees on it) in the first attempt only, then the
real trainer.train runs; a restart (torchrun --max-restarts) trains to the end."""

from __future__ import annotations

import os
import sys

from trainer.train import main
from trainer.trainer import Trainer

if os.environ.get("RANK") == "1" and os.environ.get("TORCHELASTIC_RESTART_COUNT") == "0":
    def _out_of_memory(self, batch):  # type: ignore[no-untyped-def]
        raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")

    Trainer.train_step = _out_of_memory

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
