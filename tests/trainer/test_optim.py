"""The learning-rate schedule the optimizer steps with: linear warm-up, then cosine to the floor."""

from __future__ import annotations

import math

import pytest
import torch

from trainer.config import OptimConfig
from trainer.optim import build_scheduler


def _applied_lrs(cfg: OptimConfig, total: int, start: int = 0, steps: int | None = None
                 ) -> list[float]:
    """The lr each optimizer step uses, from step ``start`` on."""
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=cfg.lr)
    if start:  # as the resumed optimizer's state has it
        opt.param_groups[0]["initial_lr"] = cfg.lr
    sched = build_scheduler(opt, cfg, total, start_step=start)
    lrs = []
    for _ in range(total - start if steps is None else steps):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return lrs


def test_warm_up_rises_linearly_from_the_first_step_then_cosine_decays_to_the_floor() -> None:
    cfg = OptimConfig(lr=1.0, schedule="cosine", warmup_steps=4, min_lr_ratio=0.1)
    lrs = _applied_lrs(cfg, total=10)
    # the first step already learns (1/4, not 0); the peak is reached at step 4, not 5
    assert lrs[:5] == pytest.approx([0.25, 0.5, 0.75, 1.0, 1.0])
    # then a half cosine over the 6 remaining steps, starting at its top
    want = [0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * k / 6)) for k in range(6)]
    assert lrs[4:] == pytest.approx(want)
    assert all(a > b for a, b in zip(lrs[4:], lrs[5:], strict=False))


def test_a_constant_schedule_stays_at_lr_after_warm_up() -> None:
    cfg = OptimConfig(lr=0.5, schedule="constant", warmup_steps=2)
    assert _applied_lrs(cfg, total=6) == pytest.approx([0.25, 0.5, 0.5, 0.5, 0.5, 0.5])


def test_a_schedule_built_at_a_step_continues_where_the_full_one_is() -> None:
    cfg = OptimConfig(lr=1.0, schedule="cosine", warmup_steps=3, min_lr_ratio=0.0)
    full = _applied_lrs(cfg, total=12)
    for start in (1, 3, 7):  # inside the warm-up, at its end, on the cosine
        assert _applied_lrs(cfg, total=12, start=start) == pytest.approx(full[start:])
