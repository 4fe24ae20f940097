"""An exponential moving average of the weights (``train.ema_decay``), validated instead of them.

As timm's ``ModelEmaV2``/``V3`` and TF's ``ExponentialMovingAverage``: after every optimizer step
``ema = d * ema + (1 - d) * w``, for the parameters and the floating-point buffers (BatchNorm's
running mean and variance: timm's default), while an integer buffer (BatchNorm's
``num_batches_tracked``) is copied. ``d`` is TF's warm-up of the decay,
``min(train.ema_decay, (1 + n) / (10 + n))`` with ``n`` the updates before this one, so that an EMA
started from random (or another run's) weights follows the first steps closely instead of
keeping ~``1 / (1 - decay)`` steps of them (at 0.999 the first 100 steps would leave 90% of
the initialisation in it). The average is kept in fp32, whatever ``train.amp`` computes in.

NOTE: under DDP the parameters are the same on every rank after the all-reduce, so each rank's
average of them is too, without any communication. BatchNorm's running statistics are not: each
rank updates them from its own batch (DDP broadcasts rank 0's before every forward), so each
rank's average of them differs. :meth:`WeightEMA.sync_buffers` gives every rank rank 0's (the
buffers only, a few KB) before the EMA is used: rank 0's is the one its checkpoints hold, so a
resumed run validates exactly as an uninterrupted one (timm's ``distribute_bn`` before
validating the EMA, with DDP's choice of rank 0's buffers).
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from trainer.dist import broadcast_buffers

# TF's ExponentialMovingAverage(num_updates=...): the decay's warm-up
WARMUP_OFFSET = 10


def decay_at(decay: float, updates: int) -> float:
    """The decay of the update after ``updates`` of them: ``min(decay, (1 + n) / (10 + n))``."""
    return min(decay, (1 + updates) / (WARMUP_OFFSET + updates))


class WeightEMA:
    """An fp32 copy of a plain module (no DDP or compile wrapper) that follows its weights."""

    def __init__(self, net: nn.Module, decay: float) -> None:
        self.decay = decay
        self.updates = 0  # optimizer steps averaged in so far
        self.module = copy.deepcopy(net).float().eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, net: nn.Module) -> None:
        """Average ``net``'s current weights in: after each optimizer step that was taken."""
        d = decay_at(self.decay, self.updates)
        ema, new = [], []
        for mine, theirs in zip(self.module.state_dict().values(), net.state_dict().values(),
                                strict=True):
            if mine.is_floating_point():
                ema.append(mine)
                new.append(theirs.detach().float())
            else:
                mine.copy_(theirs)
        if ema:  # (one kernel per op for all tensors: ~100 of them in the wide U-Net)
            torch._foreach_mul_(ema, d)
            torch._foreach_add_(ema, new, alpha=1 - d)
        self.updates += 1

    @torch.no_grad()
    def reset(self, net: nn.Module) -> None:
        """Start again from ``net``'s current weights (a run whose EMA begins now)."""
        for mine, theirs in zip(self.module.state_dict().values(), net.state_dict().values(),
                                strict=True):
            mine.copy_(theirs)
        self.updates = 0

    def sync_buffers(self) -> None:
        """Every rank takes rank 0's floating-point buffers (see the module's NOTE); a no-op
        without a process group. A collective: every rank calls it at the same point."""
        broadcast_buffers(self.module)

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint keeps (``"ema"``): the averaged weights as a plain module's state
        dict (``"model"``, which readers take instead of the raw weights), the updates, and the
        decay (a record: a resume goes on with its own ``train.ema_decay``)."""
        return {"model": self.module.state_dict(), "updates": self.updates,
                "decay": self.decay}
