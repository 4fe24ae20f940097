"""The validator's figures: pixel IoU and the SpaceNet F1 from real pixels and samples only."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from shapely.geometry import box
from torch import nn
from trainer_helpers import REPO, run, torchrun_cmd
from val_nets import LocalMean
from val_worker import OVERRIDES

from dataio.classes import BUILDING
from dataio.loader import IGNORE_INDEX, Batch
from models.losses import SegmentationLoss, build_loss
from postproc.score import ScoreConfig
from trainer.amp import resolve
from trainer.config import load_config
from trainer.dist import DistEnv
from trainer.validate import Validator, class_ious


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


def test_every_class_iou_comes_from_the_confusion_matrix() -> None:
    """val_iou is the building class's alone; each class's IoU and their mean, on a 4x4 tile
    padded to 5x4 (its padded row and the padding slot, ignored in the mask, not counted)."""
    mask = torch.full((2, 5, 4), IGNORE_INDEX, dtype=torch.int64)
    mask[0, :4] = torch.tensor([[0, 0, 1, 1], [0, 2, 1, 1], [0, 2, 2, 1], [0, 0, 0, 0]])
    pred = torch.full((2, 5, 4), 2, dtype=torch.int64)
    pred[0, :4] = torch.tensor([[0, 1, 1, 1], [0, 2, 2, 1], [0, 0, 2, 1], [0, 0, 0, 2]])
    # true x predicted: background [6, 1, 1], building [0, 4, 1], boundary [1, 0, 2]
    # IoU = tp / (row + column - tp): 6 / (8 + 7 - 6), 4 / (5 + 5 - 4), 2 / (3 + 4 - 2)
    batch = Batch(image=torch.zeros(2, 3, 5, 4), mask=mask, keys=["a", ""],
                  valid=torch.tensor([True, False]), meta=[{"height": 4, "width": 4}, {}])
    v = _validator(batch, {})
    v.cfg.train.val_f1 = False
    got = v.run(_Fixed(pred))
    want = {"val_iou_background": 6 / 9, "val_iou_building": 4 / 6, "val_iou_boundary": 2 / 5}
    assert {k: got[k] for k in want} == pytest.approx(want, abs=1e-12)
    assert got["val_iou"] == got["val_iou_building"]
    assert got["val_miou"] == pytest.approx((6 / 9 + 4 / 6 + 2 / 5) / 3, abs=1e-12)
    assert "val_f1" not in got


def test_a_class_with_no_pixel_and_no_prediction_has_no_iou_and_no_place_in_the_mean() -> None:
    # true x predicted, no boundary at all: background [3, 1, 0], building [1, 5, 0]
    cm = torch.tensor([[3, 1, 0], [1, 5, 0], [0, 0, 0]], dtype=torch.float64)
    got = class_ious(cm)
    assert got["val_iou_boundary"] is None
    assert got["val_miou"] == pytest.approx((3 / 5 + 5 / 7) / 2, abs=1e-12)
    assert got["val_iou"] == got["val_iou_building"] == pytest.approx(5 / 7, abs=1e-12)
    # no building pixel, none predicted: val_iou stays the 0 it always was (best.pt's score)
    none = class_ious(torch.tensor([[4, 0, 0], [0, 0, 0], [0, 0, 0]], dtype=torch.float64))
    assert (none["val_iou"], none["val_iou_building"], none["val_miou"]) == (0.0, None, 1.0)


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
    data = _mixed_size_val_data(tmp_path / "DATA")
    got = {}
    for bs in (4, 1):
        cfg = load_config(Path("configs/tiny.toml"), [f"data.batch_size={bs}",
                                                      "train.val_f1=true"])
        v = Validator(cfg, DistEnv(), data, torch.device("cpu"), resolve("off", torch.device(
            "cpu")), build_loss(cfg.loss))
        r = v.run(LocalMean())
        v.loader.close()
        got[bs] = (r["val_iou"], r["val_tp"], r["val_fp"], r["val_fn"])
    assert got[1][0] > 0.5 and got[1][1] > 0, got  # it finds buildings: the figures can differ
    assert got[4] == got[1], got


class _Unsure(LocalMean):
    """``LocalMean`` made far less sure, so that every pixel's loss counts."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) / 200


def test_val_loss_is_the_loss_of_the_whole_split_whatever_its_batches(tmp_path: Path) -> None:
    """val_loss was the mean of the batches' losses weighted by their samples: it changed with
    the validation batch size and ranks (the last short batch, tiles of other sizes, each batch's
    own class-weighted mean and Dice). Now it is the loss of all val pixels as one batch."""
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


@pytest.mark.multiproc
@pytest.mark.slow
@pytest.mark.timeout(240)
def test_two_ranks_score_exactly_what_one_process_scores(tmp_path: Path) -> None:
    """Each class's IoU (and the F1) from the counts of both ranks' parts of the split summed,
    one confusion matrix: equal to one process's, not close to it (an average of each rank's
    ratios, or rank 0's counts alone, is not)."""
    data = _mixed_size_val_data(tmp_path / "DATA")
    out = tmp_path / "two.json"
    res = run(torchrun_cmd(2, [str(REPO / "tests" / "trainer" / "val_worker.py"), str(data),
                               str(out)]), timeout=180)
    assert res.returncode == 0, res.stderr[-3000:]
    two = json.loads(out.read_text())
    cfg = load_config(Path("configs/tiny.toml"), OVERRIDES)
    cpu = torch.device("cpu")
    v = Validator(cfg, DistEnv(), data, cpu, resolve("off", cpu), build_loss(cfg.loss))
    one = v.run(LocalMean())
    v.loader.close()
    exact = ["val_iou", "val_iou_background", "val_iou_building", "val_iou_boundary", "val_miou",
             "val_tp", "val_fp", "val_fn", "val_f1"]
    assert {k: two[k] for k in exact} == {k: one[k] for k in exact}
    # figures a lost or double-counted pixel would move
    assert all(0.3 < one[k] < 1 for k in exact[:5]), one
    # (the loss: the same sums, added in another order)
    assert two["val_loss"] == pytest.approx(one["val_loss"], rel=1e-6)


def test_a_run_parses_the_val_truth_once(small_dataset: Path, tmp_path: Path,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """trainer.train's checks read DATA/val/truth.csv (a bad one must fail before any process
    group), and the Validator then parsed it again in every worker: it takes the checks'
    polygons now, the file's own."""
    from postproc import csvio
    from trainer.train import main
    from trainer.trainer import Trainer

    truth_csv = small_dataset / "val" / "truth.csv"
    parsed: list[Path] = []
    real = csvio.read_polygon_csv

    def counted(path: str | Path, proposals: bool) -> csvio.PolygonTable:
        parsed.append(Path(path))
        return real(path, proposals)

    seen: dict = {}

    def built_only(self: Trainer) -> None:  # (the Validator is made in __init__; no training)
        seen.update(self.validator.truth)

    monkeypatch.setattr(csvio, "read_polygon_csv", counted)
    monkeypatch.setattr(Trainer, "train", built_only)
    assert main(["--config", "configs/tiny.toml", "--data", str(small_dataset),
                 "--run-dir", str(tmp_path / "run")]) == 0
    assert parsed == [truth_csv]
    expected = real(truth_csv, proposals=False).polygons
    assert seen.keys() == expected.keys() and seen
    assert all(len(seen[k]) == len(v) and all(a.equals(b) for a, b in zip(seen[k], v, strict=True))
               for k, v in expected.items())
