"""Run by test_predict: ``predict_ctrl_c_worker.py PREDICT-ARGS...``: the real ``trainer.predict``
command (its imports, loader, stage and top level), whose network says ``predicting`` on stdout
before each batch and then takes a while (``BATCH_SECONDS``), so that a Ctrl-C finds it busy."""

from __future__ import annotations

import os
import sys
import time

import torch
from torch import nn

from trainer import predict

BATCH_SECONDS = 0.5
_real = predict.predict_probs


def _slow(net: nn.Module, image: torch.Tensor, tta: bool) -> torch.Tensor:
    os.write(sys.stdout.fileno(), b"predicting\n")  # (unbuffered: the test waits for it)
    time.sleep(BATCH_SECONDS)
    return _real(net, image, tta)


predict.predict_probs = _slow

if __name__ == "__main__":
    sys.exit(predict.main())
