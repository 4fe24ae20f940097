"""The validator's figures: pixel IoU and the SpaceNet F1 from real pixels and samples only."""

from __future__ import annotations

from pathlib import Path

import torch
from shapely.geometry import box
from torch import nn

from dataio.classes import BUILDING
from dataio.loader import IGNORE_INDEX, Batch
from postproc.score import ScoreConfig
from trainer.amp import resolve
from trainer.config import load_config
from trainer.validate import Validator


class _OneBatch:
    def __init__(self, batch: Batch) -> None:
        self.batch = batch

    def set_epoch(self, epoch: int) -> None:
        pass

    def __iter__(self):
        return iter([self.batch])


class _Fixed(nn.Module):
    """A net that predicts the given classes, whatever its input."""

    def __init__(self, classes: torch.Tensor) -> None:
        super().__init__()
        self.logits = nn.functional.one_hot(classes, 3).permute(0, 3, 1, 2).float() * 10

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.logits


def test_validation_counts_only_real_pixels_and_samples() -> None:
    # sample 0: a 12x16 tile padded to 16x16; sample 1: a padding slot of the last batch
    mask = torch.full((2, 16, 16), IGNORE_INDEX, dtype=torch.int64)
    mask[0, :12] = 0
    mask[0, 2:8, 2:8] = BUILDING  # 36 px
    pred = torch.zeros(2, 16, 16, dtype=torch.int64)
    pred[0, 2:8, 3:9] = BUILDING  # shifted a column: 30 px right, 6 too many, 6 missed
    pred[0, 12:, :4] = BUILDING  # on the padding rows: not counted
    pred[1] = BUILDING  # the padding slot: not counted
    batch = Batch(image=torch.zeros(2, 3, 16, 16), mask=mask, keys=["a", ""],
                  valid=torch.tensor([True, False]),
                  meta=[{"height": 12, "width": 16}, {}])
    cfg = load_config(Path("configs/tiny.toml"), ["train.val_f1=true"])
    v = Validator.__new__(Validator)
    v.cfg, v.device, v.enabled = cfg, torch.device("cpu"), True
    v.precision, v.loss_fn = resolve("off", v.device), nn.CrossEntropyLoss()
    v.loader, v.score_cfg = _OneBatch(batch), ScoreConfig()
    v.truth = {"a": [box(2, 2, 8, 8)]}
    net = _Fixed(pred)
    got = v.run(net)
    assert abs(got["val_iou"] - 30 / 42) < 1e-9  # tp / (tp + fp + fn)
    assert abs(got["val_loss"] - float(v.loss_fn(net.logits[:1], mask[:1]))) < 1e-6
    # the proposal box(3, 2, 9, 8) meets the truth at IoU 30/42 >= 0.5
    assert (got["val_tp"], got["val_fp"], got["val_fn"]) == (1, 0, 0) and got["val_f1"] == 1.0
