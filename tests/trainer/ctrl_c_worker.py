"""Run by test_trainer: ``ctrl_c_worker.py TRAIN-ARGS...``: the real ``trainer.train`` command (its
imports, loader and top level). It says ``stepped`` on stdout after its first training step,
``saved`` after each checkpoint, and ``closing`` and ``closed`` around the close of its train
loader (the read-ahead thread, the DALI pipeline), which takes a while here (``CLOSE_SECONDS``
first), so that a second Ctrl-C finds it busy."""

from __future__ import annotations

import os
import sys
import time
from typing import Any

from dataio.loader import Loader
from trainer import train
from trainer.trainer import Trainer

CLOSE_SECONDS = 1.0
_real_step, _real_save, _real_close = Trainer.train_step, Trainer.save_checkpoint, Loader.close


def _say(what: str) -> None:
    os.write(sys.stdout.fileno(), f"{what}\n".encode())  # (unbuffered: the test waits for it)


def _step(self: Trainer, batch: Any) -> float | None:
    loss = _real_step(self, batch)
    if self.global_step == 0:  # (counted after the step)
        _say("stepped")
    return loss


def _save(self: Trainer, best: bool) -> None:
    _real_save(self, best)
    _say("saved")


def _close(self: Loader) -> None:
    _say("closing")
    time.sleep(CLOSE_SECONDS)
    _real_close(self)
    _say("closed")


Trainer.train_step = _step  # type: ignore[method-assign]
Trainer.save_checkpoint = _save  # type: ignore[method-assign]
Loader.close = _close  # type: ignore[method-assign]

if __name__ == "__main__":
    sys.exit(train.main())
