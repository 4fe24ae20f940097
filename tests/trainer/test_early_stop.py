"""train.early_stop_patience: stop when validation has not improved; a resume stays stopped.

train.early_stop_start_epoch: the first epochs' validations do not count."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from trainer_helpers import messages

from trainer import checkpoint as ckpt
from trainer.config import ConfigError, load_config
from trainer.dist import DistEnv
from trainer.trainer import LOG, Trainer

# scripted validation scores by epoch: epoch 2 is the best until epoch 6
F1 = {1: 0.5, 2: 0.9, 3: 0.7, 4: 0.9, 5: 0.8, 6: 0.95}


def _trainer(data: Path, run: Path, overrides: list[str],
             scores: dict[int, float] = F1) -> Trainer:
    cfg = load_config(Path("configs/tiny.toml"), ["data.num_threads=1", "train.val_every=1",
                                                  "train.epochs=6", *overrides])
    t = Trainer(cfg, DistEnv(), data, run, device=torch.device("cpu"))
    t.validator.run = lambda _net: {"val_f1": scores[t.epoch]}  # type: ignore[method-assign]
    return t


def _epochs_logged(run: Path) -> list[int]:
    return [json.loads(line)["epoch"] for line in (run / LOG).read_text().splitlines()]


def test_patience_stops_the_run_and_a_resume_stays_stopped(
        small_dataset: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture,
        footprints_log: list[logging.LogRecord]) -> None:
    run = tmp_path / "run"
    footprints_log.clear()
    with caplog.at_level(logging.INFO, logger="footprints"):
        _trainer(small_dataset, run, ["train.early_stop_patience=3"]).train()
    # epochs 3, 4 (a tie is no improvement) and 5 did not beat epoch 2's 0.9
    assert _epochs_logged(run) == [1, 2, 3, 4, 5]
    stopped = ckpt.load(ckpt.list_checkpoints(run)[-1])
    assert (stopped["epoch"], stopped["validations_since_best"]) == (5, 3)
    assert ckpt.load(run / "checkpoints" / ckpt.BEST)["epoch"] == 2
    said = [r.getMessage() for r in footprints_log if "early" in r.getMessage()]
    assert said == ["stopping early after epoch 5 (val_f1 has not beaten its best, 0.9000 at "
                    "step 10 (best.pt), for 3 validations: train.early_stop_patience=3; raise "
                    "it, or set it to 0, to train on)"]
    # the same command again (a torchrun restart, a rerun) does not train on
    footprints_log.clear()
    with caplog.at_level(logging.INFO, logger="footprints"):
        t = _trainer(small_dataset, run, ["train.early_stop_patience=3"])
        t.train()
    assert t.epoch == 5 and _epochs_logged(run) == [1, 2, 3, 4, 5]
    assert "the run stopped early after epoch 5; nothing to do (val_f1 has not beaten" \
        in messages(footprints_log)
    assert "training unet_baseline" not in messages(footprints_log)
    # a higher patience trains on: epoch 6 beats the best
    _trainer(small_dataset, run, ["train.early_stop_patience=4"]).train()
    assert _epochs_logged(run) == [1, 2, 3, 4, 5, 6]


def test_patience_zero_trains_every_epoch_and_a_stopped_run_trains_on_with_it(
        small_dataset: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    _trainer(small_dataset, run, ["train.epochs=4", "train.early_stop_patience=1"]).train()
    assert _epochs_logged(run) == [1, 2, 3]  # epoch 3 did not beat epoch 2
    _trainer(small_dataset, run, ["train.epochs=4"]).train()  # patience 0: off
    assert _epochs_logged(run) == [1, 2, 3, 4]


# a warm-up: F1 sits at 0 for three epochs, then rises, then falls back
WARM_UP = {1: 0.0, 2: 0.0, 3: 0.0, 4: 0.4, 5: 0.3, 6: 0.3, 7: 0.2, 8: 0.9}


def test_validations_of_the_start_epochs_do_not_count(small_dataset: Path,
                                                       tmp_path: Path) -> None:
    # without it, epochs 2 and 3 (ties with epoch 1's 0) spend a patience of 2
    _trainer(small_dataset, tmp_path / "off", ["train.early_stop_patience=2"], WARM_UP).train()
    assert _epochs_logged(tmp_path / "off") == [1, 2, 3]
    # with it, counting starts at epoch 4 (its best): epochs 5 and 6 spend the patience
    run = tmp_path / "run"
    _trainer(small_dataset, run, ["train.early_stop_patience=2",
                                  "train.early_stop_start_epoch=3"], WARM_UP).train()
    assert _epochs_logged(run) == [1, 2, 3, 4, 5, 6]
    assert ckpt.load(run / "checkpoints" / ckpt.BEST)["epoch"] == 4


def test_the_start_epochs_still_choose_best_pt(small_dataset: Path, tmp_path: Path) -> None:
    """(best.pt is about the best weights: epoch 2's 0.7 stays the best the count is against)"""
    run = tmp_path / "run"
    scores = {1: 0.0, 2: 0.7, 3: 0.1, 4: 0.5, 5: 0.6, 6: 0.8}
    _trainer(small_dataset, run, ["train.early_stop_patience=2",
                                  "train.early_stop_start_epoch=3"], scores).train()
    assert _epochs_logged(run) == [1, 2, 3, 4, 5]  # epoch 3 did not count, 4 and 5 did
    assert ckpt.load(run / "checkpoints" / ckpt.BEST)["epoch"] == 2


def test_the_count_after_the_start_epoch_survives_a_resume(small_dataset: Path,
                                                            tmp_path: Path) -> None:
    run = tmp_path / "run"
    keys = ["train.early_stop_patience=3", "train.early_stop_start_epoch=3"]
    _trainer(small_dataset, run, ["train.epochs=5", *keys], WARM_UP).train()
    assert ckpt.load(ckpt.list_checkpoints(run)[-1])["validations_since_best"] == 1  # epoch 5
    # epochs 6 and 7 spend the patience; a count restarted at 0 would have gone on to epoch 8
    _trainer(small_dataset, run, ["train.epochs=8", *keys], WARM_UP).train()
    assert _epochs_logged(run) == [1, 2, 3, 4, 5, 6, 7]


@pytest.mark.parametrize(("overrides", "problem"), [
    (["train.early_stop_patience=2", "train.val_every=0"],
     "early_stop_patience = 2 counts validations and val_every = 0 never validates; set "
     "train.val_every >= 1 or train.early_stop_patience = 0"),
    (["train.early_stop_patience=-1"], "early_stop_patience must be >= 0 (0 = off), got -1"),
    (["train.early_stop_start_epoch=-1"],
     "early_stop_start_epoch must be >= 0 (0 = every validation counts), got -1"),
    (["train.epochs=4", "train.early_stop_patience=2", "train.early_stop_start_epoch=4"],
     "early_stop_start_epoch = 4 counts no validation of a run of epochs = 4, so "
     "early_stop_patience = 2 never stops it; set train.early_stop_start_epoch < train.epochs "
     "or train.early_stop_patience = 0"),
])
def test_a_patience_that_cannot_count_is_refused_naming_the_keys(overrides: list[str],
                                                                 problem: str) -> None:
    with pytest.raises(ConfigError, match=r"\[train\] " + problem.replace("(", r"\(")
                       .replace(")", r"\)")):
        load_config(Path("configs/tiny.toml"), overrides)


def test_a_patience_on_an_empty_val_split_is_refused_before_training(
        small_aoi: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """(the split never validates, as with val_every = 0: the patience never counted, and the
    run trained all its epochs without a word)"""
    from dataio.prepare import PrepareConfig, prepare
    from trainer.train import main

    data = tmp_path / "DATA"
    prepare(PrepareConfig(raw=[small_aoi], out=data, shard_size=8, split=(4.0, 0.0, 1.0)),
            progress=False)
    argv = ["--check", "--config", "configs/tiny.toml", "--data", str(data), "--run-dir",
            str(tmp_path / "run"), "--set", "train.val_every=1"]
    assert main(argv) == 0  # (a run without the patience: best.pt is the newest epoch's)
    capsys.readouterr()
    assert main([*argv, "--set", "train.early_stop_patience=2"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"trainer.train: error: --data {data}: its val split is empty, so nothing is "
        "validated, and train.early_stop_patience = 2 counts validations; set "
        "train.early_stop_patience = 0, or prepare the dataset with a val split "
        "(dataio.prepare --split)"]
