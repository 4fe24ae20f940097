"""The validator's figures: pixel IoU and the SpaceNet F1 from real pixels and samples only."""

from __future__ import annotations

from pathlib import Path

import torch
from shapely.geometry import box
from torch import nn

from dataio.classes import BUILDING
from dataio.loader import IGNORE_INDEX, Batch
from models.losses import SegmentationLoss, build_loss
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
    """A net that predicts the given classes (cut to its input's size), whatever its input, and
    notes the shape of each input."""

    def __init__(self, classes: torch.Tensor) -> None:
        super().__init__()
        self.logits = nn.functional.one_hot(classes, 3).permute(0, 3, 1, 2).float() * 10
        self.inputs: list[tuple[int, ...]] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.inputs.append(tuple(x.shape))
        return self.logits[:x.shape[0], :, :x.shape[2], :x.shape[3]]


def _validator(batch: Batch, truth: dict) -> Validator:
    cfg = load_config(Path("configs/tiny.toml"), ["train.val_f1=true"])
    v = Validator.__new__(Validator)
    v.cfg, v.device, v.enabled = cfg, torch.device("cpu"), True
    # weights 1: plain nn.CrossEntropyLoss
    v.precision, v.loss_fn = resolve("off", v.device), SegmentationLoss([1.0, 1.0, 1.0])
    v.loader, v.score_cfg, v.truth = _OneBatch(batch), ScoreConfig(), truth
    return v


def test_validation_counts_only_real_pixels_and_samples() -> None:
    # sample 0: a 12x16 tile padded to 16x16; sample 1: a padding slot of the last batch
    mask = torch.full((2, 16, 16), IGNORE_INDEX, dtype=torch.int64)
    mask[0, :12] = 0
    mask[0, 2:8, 2:8] = BUILDING  # 36 px
    pred = torch.zeros(2, 16, 16, dtype=torch.int64)
    pred[0, 2:8, 3:9] = BUILDING  # shifted a column: 30 px right, 6 too many, 6 missed
    pred[0, 12:, :4] = BUILDING  # on the padding rows: not counted (not even predicted)
    pred[1] = BUILDING  # the padding slot: not counted
    batch = Batch(image=torch.zeros(2, 3, 16, 16), mask=mask, keys=["a", ""],
                  valid=torch.tensor([True, False]),
                  meta=[{"height": 12, "width": 16}, {}])
    v = _validator(batch, {"a": [box(2, 2, 8, 8)]})
    net = _Fixed(pred)
    got = v.run(net)
    assert net.inputs == [(1, 3, 12, 16)]  # the tile alone, at its own size
    assert abs(got["val_iou"] - 30 / 42) < 1e-9  # tp / (tp + fp + fn)
    assert abs(got["val_loss"] - float(v.loss_fn(net.logits[:1], mask[:1]))) < 1e-6
    # the proposal box(3, 2, 9, 8) meets the truth at IoU 30/42 >= 0.5
    assert (got["val_tp"], got["val_fp"], got["val_fn"]) == (1, 0, 0) and got["val_f1"] == 1.0


def test_a_batch_of_one_tile_size_is_one_forward_and_its_padding_slot_is_not_counted() -> None:
    """SpaceNet's tiles are all 650x650: the whole batch, the last one's padding slots with it,
    goes through the network at once; what it predicts for a padding slot is not counted."""
    mask = torch.full((2, 16, 16), IGNORE_INDEX, dtype=torch.int64)
    mask[0] = 0
    mask[0, 2:8, 2:8] = BUILDING  # 36 px
    pred = torch.zeros(2, 16, 16, dtype=torch.int64)
    pred[0, 2:8, 3:9] = BUILDING  # 30 px right, 6 too many, 6 missed
    pred[1] = BUILDING  # the padding slot
    batch = Batch(image=torch.zeros(2, 3, 16, 16), mask=mask, keys=["a", ""],
                  valid=torch.tensor([True, False]), meta=[{"height": 16, "width": 16}, {}])
    net = _Fixed(pred)
    got = _validator(batch, {"a": [box(2, 2, 8, 8)]}).run(net)
    assert net.inputs == [(2, 3, 16, 16)]
    assert abs(got["val_iou"] - 30 / 42) < 1e-9
    assert (got["val_tp"], got["val_fp"], got["val_fn"]) == (1, 0, 0)


class _LocalMean(nn.Module):
    """Classes by the mean of band 0 over the 7x7 window around each pixel, within the input:
    like any network's, its output near a tile's edge depends on what lies beyond the edge."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from dataio.fixtures import ALIGNED_LEVELS, ALIGNED_P98

        m = nn.functional.avg_pool2d(x[:, :1], 7, stride=1, padding=3, count_include_pad=False)
        levels = torch.tensor(ALIGNED_LEVELS, dtype=x.dtype) / ALIGNED_P98[0]
        return -((m - levels.view(1, 3, 1, 1)) * 20) ** 2


def _mixed_size_val_data(root: Path) -> Path:
    """A val split of three tile sizes (``aligned_tile``), its truth the tiles' own buildings."""
    import numpy as np

    from dataio.fixtures import ALIGNED_P2, ALIGNED_P98, aligned_tile, write_dataset
    from postproc.csvio import proposal_rows, write_rows
    from postproc.polygonize import polygonize_probs

    tiles = [(f"AOI_9_Mix_img{i}", *aligned_tile(h, w, i))
             for i, (h, w) in enumerate([(40, 56), (72, 88), (64, 64), (40, 56), (72, 88)])]
    data = write_dataset(root, {"val": tiles}, p2=ALIGNED_P2, p98=ALIGNED_P98)
    with open(data / "val" / "truth.csv", "w", newline="", encoding="utf-8") as f:
        rows = []
        for key, _, mask in tiles:
            found = polygonize_probs(np.eye(3, dtype=np.float32)[mask])
            rows += proposal_rows(key, [p for p, _ in found], [c for _, c in found])
        write_rows(f, rows, header=True)
    return data


def test_validation_metrics_do_not_depend_on_the_tiles_in_a_batch(tmp_path: Path) -> None:
    """The loader pads a batch of mixed tile sizes to its largest: validated on the padded
    batch, a smaller tile was predicted from the zeros beyond its edge, so val_iou and val_f1
    (which picks best.pt) changed with the validation batch size (and so with the ranks)."""
    from trainer.dist import DistEnv

    data = _mixed_size_val_data(tmp_path / "DATA")
    got = {}
    for bs in (4, 1):
        cfg = load_config(Path("configs/tiny.toml"), [f"data.batch_size={bs}",
                                                      "train.val_f1=true"])
        v = Validator(cfg, DistEnv(), data, torch.device("cpu"), resolve("off", torch.device(
            "cpu")), build_loss(cfg.loss))
        r = v.run(_LocalMean())
        v.loader.close()
        got[bs] = (r["val_iou"], r["val_tp"], r["val_fp"], r["val_fn"])
    assert got[1][0] > 0.5 and got[1][1] > 0, got  # it finds buildings: the figures can differ
    assert got[4] == got[1], got


class _Unsure(_LocalMean):
    """``_LocalMean`` made far less sure, so that every pixel's loss counts."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) / 200


def test_val_loss_is_the_loss_of_the_whole_split_whatever_its_batches(tmp_path: Path) -> None:
    """val_loss was the mean of the batches' losses weighted by their samples: it changed with
    the validation batch size and ranks (the last short batch, tiles of other sizes, each batch's
    own class-weighted mean and Dice). Now it is the loss of all val pixels as one batch."""
    from trainer.dist import DistEnv

    data = _mixed_size_val_data(tmp_path / "DATA")
    got, logits, masks = {}, [], []
    for bs in (4, 2, 1):  # 2: a last batch of one tile and a padding slot
        cfg = load_config(Path("configs/tiny.toml"), [
            f"data.batch_size={bs}", "loss.class_weights=[0.2, 0.5, 0.3]", "loss.dice_weight=0.5"])
        v = Validator(cfg, DistEnv(), data, torch.device("cpu"), resolve("off", torch.device(
            "cpu")), build_loss(cfg.loss))
        got[bs] = v.run(_Unsure())["val_loss"]
        if bs == 1:  # each tile alone: all their pixels, in one row, through the loss at once
            for batch in v.loader:
                h, w = batch.meta[0]["height"], batch.meta[0]["width"]
                logits.append(_Unsure()(batch.image[:, :, :h, :w]).flatten(2))
                masks.append(batch.mask[:, :h, :w].flatten(1))
        v.loader.close()
    assert len(masks) == 5
    whole = float(v.loss_fn(torch.cat(logits, 2).unsqueeze(2), torch.cat(masks, 1).unsqueeze(1)))
    assert whole > 0.1, whole  # a loss that the batching could change
    for bs, loss in got.items():
        assert abs(loss - whole) < 1e-5 * whole, (bs, got, whole)
