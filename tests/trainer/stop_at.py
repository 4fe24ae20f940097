"""Stopping a Trainer right after a given checkpoint, as a job killed there would stop (for the
in-process resume tests and for cut_worker.py under torchrun; imports nothing from the tests)."""

from __future__ import annotations

from trainer.trainer import Trainer


class StopRunError(Exception):
    pass


def train_until(t: Trainer, global_step: int) -> None:
    """Train ``t`` and stop it right after its checkpoint at ``global_step``; fail if it wrote
    none there."""
    real_save = t.save_checkpoint

    def save_then_stop(best: bool) -> None:
        real_save(best)
        if t.global_step == global_step:
            raise StopRunError

    t.save_checkpoint = save_then_stop  # type: ignore[method-assign]
    try:
        t.train()
    except StopRunError:
        return
    raise AssertionError(f"no checkpoint at global step {global_step}")
