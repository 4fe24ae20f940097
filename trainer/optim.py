"""Optimizer and learning-rate schedule from an :class:`trainer.config.OptimConfig`."""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch

from trainer.config import OptimConfig


def build_optimizer(params: Iterable[torch.nn.Parameter],
                    cfg: OptimConfig) -> torch.optim.Optimizer:
    if cfg.name == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.name == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)


def apply_hyperparameters(optimizer: torch.optim.Optimizer, cfg: OptimConfig) -> None:
    """Set this config's lr (as ``initial_lr``, which the schedule scales), weight decay and SGD
    momentum on every group: a loaded optimizer state brings the saved run's, and a resume with
    another ``optim.lr`` trained on at the old one while ``config.json`` named the new."""
    for group in optimizer.param_groups:
        group["initial_lr"] = group["lr"] = cfg.lr
        group["weight_decay"] = cfg.weight_decay
        if cfg.name == "sgd":
            group["momentum"] = cfg.momentum


def lr_factor(step: int, schedule: str, warmup_steps: int, min_lr_ratio: float,
              total_steps: int) -> float:
    """Multiplier of the base lr after ``step`` optimizer steps: linear warm-up, then constant or
    cosine decay to ``min_lr_ratio``."""
    if warmup_steps and step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    span = max(1, total_steps - warmup_steps)
    t = min(1.0, (step - warmup_steps) / span)
    return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t))


class _Factor:
    """The schedule as a callable object holding only plain numbers: LambdaLR saves its
    ``__dict__`` in the scheduler state, which must load with ``weights_only=True``."""

    def __init__(self, cfg: OptimConfig, total_steps: int) -> None:
        self.schedule, self.warmup_steps = cfg.schedule, cfg.warmup_steps
        self.min_lr_ratio, self.total_steps = cfg.min_lr_ratio, total_steps

    def __call__(self, step: int) -> float:
        return lr_factor(step, self.schedule, self.warmup_steps, self.min_lr_ratio,
                         self.total_steps)


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: OptimConfig, total_steps: int,
                    start_step: int = 0) -> torch.optim.lr_scheduler.LambdaLR:
    """The schedule over ``total_steps`` optimizer steps, positioned after ``start_step`` of them.

    A resumed run builds it anew (after loading the optimizer, whose groups keep ``initial_lr``)
    instead of loading the saved scheduler, whose step count would keep the old run's length.
    """
    return torch.optim.lr_scheduler.LambdaLR(optimizer, _Factor(cfg, total_steps),
                                             last_epoch=start_step - 1)
