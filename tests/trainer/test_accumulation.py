"""Gradient accumulation (``train.grad_accum_steps``): N loader batches per optimizer step.

17 training tiles at data.batch_size=4 are 5 batches an epoch: with N = 2, groups of 2, 2 and 1
(the epoch's last group takes what is left), so 3 optimizer steps an epoch.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import pytest
import torch
from stop_at import train_until
from trainer_helpers import messages

from trainer import checkpoint as ckpt
from trainer.config import ConfigError, load_config
from trainer.dist import DistEnv
from trainer.optim import lr_factor
from trainer.trainer import NonFiniteError, Trainer, fill_padding

FAST = ["train.val_every=0", "data.num_threads=1"]
# NOTE: what makes N batches of B train like one batch of N x B: GroupNorm (BatchNorm's
# statistics are per batch), equal class weights (the cross entropy is a mean over pixels
# weighted by their class: with unequal weights two halves of a batch have other denominators
# than the whole), no Dice term (per class over the whole batch, not a mean over samples; the
# tiny preset has none: loss.dice_weight = 0), fp32 (bf16's rounding differs with the batch's
# shape), and SGD without momentum, whose step is the gradient itself (Adam's normalisation
# would blow float noise in near-zero gradients up to whole steps), at a rate low enough that
# 5 steps do not amplify float noise either (after one step the two are 1e-6 of it apart; at
# lr 0.2 five steps took that to 3e-3). The loader's sample order and augmentation draws are
# per sample, whatever the batch size.
SAME_AS_ONE_BATCH = ["train.amp=off", "model.norm=group", "loss.class_weights=[1, 1, 1]",
                     "optim.name=sgd", "optim.momentum=0.0", "optim.lr=0.02", "train.epochs=1"]


def _trainer(data: Path, run: Path, overrides: list[str]) -> Trainer:
    cfg = load_config(Path("configs/tiny.toml"), FAST + overrides)
    return Trainer(cfg, DistEnv(), data, run, device=torch.device("cpu"))


def _weights(run: Path) -> dict[str, torch.Tensor]:
    return ckpt.load(ckpt.list_checkpoints(run)[-1])["model"]


def _log(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]


def test_the_key_is_checked_like_the_others() -> None:
    assert load_config(None, ["train.grad_accum_steps=4"]).train.grad_accum_steps == 4
    assert load_config(None).train.grad_accum_steps == 1
    with pytest.raises(ConfigError, match=r"grad_accum_steps must be >= 1, got 0"):
        load_config(None, ["train.grad_accum_steps=0"])


def test_n_batches_of_b_step_like_one_batch_of_n_times_b(small_dataset: Path,
                                                         tmp_path: Path) -> None:
    # one epoch: batch 4 is 5 steps (4, 4, 4, 4, 1 samples); batch 2 with N = 2 is groups of
    # 2+2, 2+2, 2+2, 2+2 and the last batch of 1 sample alone, divided by 1
    one = _trainer(small_dataset, tmp_path / "one", [*SAME_AS_ONE_BATCH, "data.batch_size=4"])
    acc = _trainer(small_dataset, tmp_path / "acc", [*SAME_AS_ONE_BATCH, "data.batch_size=2",
                                                     "train.grad_accum_steps=2"])
    assert (acc.steps_per_epoch, acc.optimizer_steps_per_epoch) == (9, 5)
    init = {k: v.detach().clone() for k, v in one.net.state_dict().items()}
    one.train()
    acc.train()
    assert one.global_step == acc.global_step == 5
    a, b = one.net.state_dict(), acc.net.state_dict()
    moved = max(float((a[k] - init[k]).abs().max()) for k in a)
    apart = max(float((a[k] - b[k]).abs().max()) for k in a)
    # equal up to float summation order; a sum instead of a mean of the group's gradients, or
    # the last short group divided by N (0.15 of the way), would not be. NOTE: the first two
    # steps agree to 2-4e-6 of the way, but summation noise can flip a near tie of a max-pool or
    # a ReLU, after which the runs part by more: since the exact label band (70afd18) changed
    # this dataset's masks, one flip at the third step leaves them 8e-4 of the way apart after
    # five (was 2e-6). 1e-2 still tells the bugs above from noise by 15x.
    assert moved > 0.02 and apart < 1e-2 * moved, (moved, apart)
    # the logged figures count samples and batch losses, whatever the grouping
    assert one.history[0]["samples"] == acc.history[0]["samples"] == 17


def test_one_batch_per_step_is_the_plain_loop_bit_for_bit(small_dataset: Path,
                                                         tmp_path: Path) -> None:
    """N = 1 (the default) is the step as it was: zero, forward, backward, clip, step, each
    batch, with nothing added (no division, no other order)."""
    common = ["train.amp=off", "train.epochs=1", "optim.schedule=cosine",
              "optim.warmup_steps=2", "optim.grad_clip=0.5"]
    t = _trainer(small_dataset, tmp_path / "run", common)
    t.train()
    ref = _trainer(small_dataset, tmp_path / "ref", common)  # the same seed: the same weights
    ref.net.train()
    ref.train_loader.set_epoch(0)
    for batch in ref.train_loader:
        ref.optimizer.zero_grad(set_to_none=True)
        ref.loss_fn(ref.net(fill_padding(batch.image, batch.valid.tolist())),
                    batch.mask).backward()
        torch.nn.utils.clip_grad_norm_(ref.net.parameters(), 0.5)
        ref.optimizer.step()
        ref.scheduler.step()
    ref.train_loader.close()
    got, want = t.net.state_dict(), ref.net.state_dict()
    assert all(torch.equal(got[k], want[k]) for k in want)
    assert t.global_step == ref.scheduler.last_epoch == 5


def test_fp16_scales_every_backward_of_a_group_and_steps_once(small_dataset: Path,
                                                               tmp_path: Path) -> None:
    """fp16's GradScaler (on the CPU here, in fp32): a scale of 2**16 is exact, so a group
    trained with it equals one without, if every backward was scaled and the sum unscaled and
    clipped once; the scaler's update, once per optimizer step, counts one step."""
    common = [*SAME_AS_ONE_BATCH, "data.batch_size=2", "train.grad_accum_steps=2",
              "optim.grad_clip=0.01"]  # (a clip that bites: the update's norm is lr x 0.01)
    plain = _trainer(small_dataset, tmp_path / "plain", common)
    scaled = _trainer(small_dataset, tmp_path / "scaled", common)
    scaled.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
    before = [p.detach().clone() for p in plain.net.parameters()]
    for t in (plain, scaled):
        t.train_loader.set_epoch(0)
        batches = iter(t.train_loader)
        assert t.train_step(next(batches)) is not None and t._accumulated == 1
        assert t.train_step(next(batches)) is not None and t._accumulated == 0
        t.train_loader.close()
    got, want = list(scaled.net.parameters()), list(plain.net.parameters())
    assert all(torch.equal(g, w) for g, w in zip(got, want, strict=True))
    update = torch.cat([(p.detach() - b).flatten() for p, b in zip(want, before, strict=True)])
    assert float(update.norm()) == pytest.approx(0.02 * 0.01, rel=1e-3)
    assert scaled.scaler.state_dict()["_growth_tracker"] == 1
    assert scaled.scaler.get_scale() == 2.0**16


def test_steps_checkpoints_and_the_schedule_count_optimizer_steps(
        small_dataset: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real, saved = ckpt.save, []

    def recording(state: dict, path: Path) -> float:
        saved.append((state["global_step"], state["epoch"], state["step_in_epoch"], path.name))
        return real(state, path)

    monkeypatch.setattr(ckpt, "save", recording)
    t = _trainer(small_dataset, tmp_path / "run",
                 ["train.epochs=2", "train.checkpoint_every_steps=2", "train.grad_accum_steps=2",
                  "optim.schedule=cosine"])  # (tiny's log_every = 2)
    synced, sync = [], t._sync_metrics

    def recording_sync(bar: object, loss: float | None) -> None:
        if bar is not None:  # (None: the epoch's end)
            synced.append((t.global_step, t.step_in_epoch))
        sync(bar, loss)  # type: ignore[arg-type]

    t._sync_metrics = recording_sync  # type: ignore[method-assign]
    t.train()
    # 3 steps an epoch (batches 2, 4, 5): mid-epoch checkpoints at global steps 2 (after batch
    # 4) and 4 (epoch 2, after batch 2), each at the end of a group; steps 3 and 6 end epochs
    assert saved == [(2, 0, 4, "step-00000002.pt"), (3, 1, 0, "step-00000003.pt"),
                     (4, 1, 2, "step-00000004.pt"), (6, 2, 0, "step-00000006.pt")]
    assert synced == [(2, 4), (4, 2), (6, 5)]  # every log_every = 2 optimizer steps
    assert t.scheduler.last_epoch == 6
    assert int(t.optimizer.state_dict()["state"][0]["step"]) == 6
    # the cosine spans 2 x 3 optimizer steps: half-way after epoch 1, at its floor at the end
    lr, floor = t.cfg.optim.lr, t.cfg.optim.min_lr_ratio
    log = _log(tmp_path / "run")
    assert [r["global_step"] for r in log] == [3, 6]
    assert log[0]["lr"] == pytest.approx(lr * lr_factor(3, "cosine", 0, floor, 6))
    assert log[1]["lr"] == pytest.approx(lr * floor)
    assert [r["samples"] for r in log] == [17, 17]


def test_a_warm_up_as_long_as_the_run_counts_optimizer_steps(
        small_dataset: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture,
        footprints_log: list[logging.LogRecord],
        monkeypatch: pytest.MonkeyPatch) -> None:
    t = _trainer(small_dataset, tmp_path / "run", ["train.epochs=2", "optim.warmup_steps=6",
                                                   "train.grad_accum_steps=2"])
    monkeypatch.setattr(t, "train_epoch", lambda: {})  # the messages are what is tested
    monkeypatch.setattr(t, "end_epoch", lambda summary: None)
    footprints_log.clear()
    with caplog.at_level(logging.INFO, logger="footprints"):
        t.train()
    assert "3 steps/epoch (train.grad_accum_steps=2: 5 batches), amp" in messages(footprints_log)
    assert ("optim.warmup_steps=6 fills the whole run (train.epochs=2 x 3 steps/epoch "
            "(train.grad_accum_steps=2: 5 batches) = 6 steps)") in messages(footprints_log)


def test_a_mid_epoch_resume_lands_on_a_group_boundary_and_is_bit_exact(
        small_dataset: Path, tmp_path: Path) -> None:
    common = ["train.epochs=3", "train.checkpoint_every_steps=2", "train.grad_accum_steps=2"]
    _trainer(small_dataset, tmp_path / "ref", common).train()
    # global step 4 is the first group of epoch 2: its checkpoint is 2 batches into the epoch
    train_until(_trainer(small_dataset, tmp_path / "cut", common), 4)
    resumed = _trainer(small_dataset, tmp_path / "cut", common)
    assert resumed.resume() and (resumed.epoch, resumed.step_in_epoch) == (1, 2)
    assert resumed.scheduler.last_epoch == 4
    resumed = _trainer(small_dataset, tmp_path / "cut", common)
    resumed.train()
    assert resumed.global_step == 9
    ref, got = _weights(tmp_path / "ref"), _weights(tmp_path / "cut")
    assert all(torch.equal(ref[k], got[k]) for k in ref)
    assert [(r["epoch"], r["samples"], r["train_loss"]) for r in _log(tmp_path / "cut")] == \
        [(r["epoch"], r["samples"], r["train_loss"]) for r in _log(tmp_path / "ref")]


def test_a_resume_with_another_grad_accum_steps_keeps_the_schedule(small_dataset: Path,
                                                                    tmp_path: Path) -> None:
    # cut at global step 4 with N = 2 (4 of 3 x 3 planned steps), resumed with N = 3: the
    # epoch's 3 batches left are one group, and the plan is 3 x 2 steps, at step 3 of it
    cosine = ["train.epochs=3", "train.checkpoint_every_steps=2", "optim.schedule=cosine"]
    train_until(_trainer(small_dataset, tmp_path / "run", [*cosine, "train.grad_accum_steps=2"]),
                4)
    t = _trainer(small_dataset, tmp_path / "run", [*cosine, "train.grad_accum_steps=3"])
    assert t.optimizer_steps_per_epoch == 2 and t.resume()
    assert (t.epoch, t.step_in_epoch, t.scheduler.last_epoch) == (1, 2, round(4 * 2 / 3))
    t = _trainer(small_dataset, tmp_path / "run", [*cosine, "train.grad_accum_steps=3"])
    t.train()
    assert t.global_step == 4 + 1 + 2
    assert t.scheduler.last_epoch == 3 + 1 + 2
    log = _log(tmp_path / "run")
    assert [(r["epoch"], r["samples"]) for r in log] == [(1, 17), (2, 17), (3, 17)]
    assert log[-1]["lr"] == pytest.approx(t.cfg.optim.lr * t.cfg.optim.min_lr_ratio)
    assert json.loads((tmp_path / "run" / "config.json").read_text())["train"][
        "grad_accum_steps"] == 3


def test_a_nan_in_one_batch_skips_its_whole_group_once(
        small_dataset: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture,
        footprints_log: list[logging.LogRecord]) -> None:
    t = _trainer(small_dataset, tmp_path / "run", ["train.epochs=1", "train.grad_accum_steps=2",
                                                   "train.max_nonfinite_steps=2"])
    real, calls = t.loss_fn, {"n": 0}

    def poisoned(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        calls["n"] += 1  # the first batch of the first group: its second batch is finite
        return real(logits, mask) * (float("nan") if calls["n"] == 1 else 1.0)

    t.loss_fn = poisoned  # type: ignore[assignment]
    footprints_log.clear()
    with caplog.at_level(logging.WARNING, logger="footprints"):
        summary = t.train()
    assert calls["n"] == 5 and t.global_step == 3
    assert int(t.optimizer.state_dict()["state"][0]["step"]) == 2  # the group took no step
    assert t.scheduler.last_epoch == 2 and t.nonfinite_run == 0
    assert t.metrics.registry.get_sample_value("footprints_skipped_steps_total",
                                               {"reason": "nonfinite_loss"}) == 1
    assert messages(footprints_log).count("skipped on all ranks") == 1
    assert all(bool(torch.isfinite(p).all()) for p in t.net.parameters())
    # the skipped group's 8 samples (and its finite batch's loss) count for nothing
    assert summary["samples"] == 17 - 8 and math.isfinite(summary["train_loss"])
    # every loss NaN: a group counts once toward train.max_nonfinite_steps (2 groups, 4 batches)
    t = _trainer(small_dataset, tmp_path / "run2", ["train.grad_accum_steps=2",
                                                    "train.max_nonfinite_steps=2"])
    real, calls["n"] = t.loss_fn, 0

    def all_nan(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        calls["n"] += 1
        return real(logits, mask) * float("nan")

    t.loss_fn = all_nan  # type: ignore[assignment]
    before = {k: v.detach().clone() for k, v in t.net.named_parameters()}
    with pytest.raises(NonFiniteError, match="2 consecutive steps"):
        t.train()
    assert calls["n"] == 4 and t.global_step == 1 and t.nonfinite_run == 2
    assert all(torch.equal(before[k], v) for k, v in t.net.named_parameters())
