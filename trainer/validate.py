"""Validation on the val split: loss, pixel IoU of each class and the SpaceNet F1, from
all-reduced counts.

Each rank evaluates its own disjoint part of the split (padding excluded via ``Batch.valid``);
the counts are summed over ranks before any ratio is taken (never an average of per-rank ratios):
the pixels' confusion matrix (every class's IoU, and ``val_iou``, the building class's, which
picks ``best.pt`` with ``train.val_f1=false``) and the polygons' tp, fp, fn (the F1).
So is the loss: ``val_loss`` is the loss of all val pixels at once, from its sums (numerators and
denominators, ``SegmentationLoss.sums``), the same for any validation batch size or world size.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

import torch
from shapely.geometry.base import BaseGeometry
from torch import nn

from dataio.classes import BUILDING, CLASS_NAMES, NUM_CLASSES
from dataio.loader import IGNORE_INDEX, build_loader
from dataio.manifest import load_manifest
from models.losses import SegmentationLoss
from postproc.csvio import read_truth_csv
from postproc.polygonize import polygonize_probs
from postproc.score import ScoreConfig, score_image
from trainer.amp import Precision
from trainer.config import Config
from trainer.dist import DistEnv, agreed_loader, all_reduce_sum, on_every
from trainer.predict import per_tile

log = logging.getLogger("footprints")

# the all-reduced vector: the pixels' confusion matrix (true class x predicted class, row-major),
# the polygons' tp, fp, fn, then the loss's sums
_CM = NUM_CLASSES * NUM_CLASSES
_COUNTS = _CM + 3
# the figures the trainer exports as footprints_validation{metric=KEY less its "val_"}
GAUGED = ("val_f1", "val_iou", *(f"val_iou_{name}" for name in CLASS_NAMES), "val_miou")
# the val split's truth polygons per ImageId (postproc.csvio.PolygonTable.polygons)
ValTruth = dict[str, list[BaseGeometry]]


def _ratio(a: float, b: float) -> float:
    return a / b if b > 0 else 0.0


def class_ious(cm: torch.Tensor) -> dict[str, float | None]:
    """Each class's pixel IoU, ``tp / (tp + fp + fn)``, from the confusion matrix ``cm`` (true
    class x predicted class, summed over ranks), their mean ``val_miou``, and ``val_iou``: the
    building class's, as it always was (0 when the split has no building pixel and none is
    predicted; ``best.pt`` and early stopping read it).

    NOTE: a class with neither a pixel nor a prediction has no IoU: ``None`` (JSON null), left
    out of the mean, as mmsegmentation's ``nanmean`` and torchmetrics' macro Jaccard index do,
    instead of a 0 that would pull the mean down for a class the split lacks."""
    tp = cm.diagonal()
    union = cm.sum(0) + cm.sum(1) - tp
    ious = [tp[k].item() / union[k].item() if union[k] > 0 else None for k in range(len(tp))]
    present = [v for v in ious if v is not None]
    return {"val_iou": _ratio(tp[BUILDING].item(), union[BUILDING].item()),
            **{f"val_iou_{name}": v for name, v in zip(CLASS_NAMES, ious, strict=True)},
            "val_miou": sum(present) / len(present) if present else None}


class Validator:
    def __init__(self, cfg: Config, env: DistEnv, data: Path, device: torch.device,
                 precision: Precision, loss_fn: SegmentationLoss,
                 truth: ValTruth | None = None) -> None:
        """``truth``: DATA/val/truth.csv's polygons where the caller read them already
        (trainer.train's checks do); read here if None."""
        self.cfg, self.device, self.precision, self.loss_fn = cfg, device, precision, loss_fn
        manifest = load_manifest(data)
        self.enabled = cfg.train.val_every > 0 and manifest.samples("val") > 0
        if not self.enabled:
            return
        self.loader = agreed_loader("val", data, lambda: build_loader(
            data, "val", dataclasses.replace(cfg.data), env.rank, env.world_size, train=False,
            device=device))
        self.truth: ValTruth = {}
        if cfg.train.val_f1:
            # NOTE: trainer.train's checks read the file before any process group (a bad one
            # fails there, not once torchrun has started the group) and hand the polygons on:
            # reading it again cost each worker ~0.16 s on a val split of SpaceNet-2 Vegas's
            # size (~580 tiles, ~23k polygons)
            self.truth = (truth if truth is not None
                          else read_truth_csv(data / "val" / "truth.csv").polygons)
        self.score_cfg = ScoreConfig()

    @torch.no_grad()
    def run(self, net: nn.Module) -> dict[str, Any]:
        """Evaluate ``net`` (the plain module, no DDP: no collectives inside forward).

        ``val_loss`` is the training objective (same loss and class weights), so the two curves
        compare, over the whole split as one batch; IoU and F1 count only valid (non-padding)
        samples."""
        if not self.enabled:
            return {}
        was_training = net.training
        net.eval()
        # agreed: one rank's failure (a tile the polygonizer refuses) must stop all with it
        c = all_reduce_sum(on_every("validating", lambda: self._counts(net)))
        net.train(was_training)
        out = {"val_loss": self.loss_fn.from_sums(c[_COUNTS:]),
               **class_ious(c[:_CM].view(NUM_CLASSES, NUM_CLASSES))}
        if self.cfg.train.val_f1:
            tp, fp, fn = c[_CM].item(), c[_CM + 1].item(), c[_CM + 2].item()
            p, r = _ratio(tp, tp + fp), _ratio(tp, tp + fn)
            out.update({"val_precision": p, "val_recall": r, "val_f1": _ratio(2 * p * r, p + r),
                        "val_tp": int(tp), "val_fp": int(fp), "val_fn": int(fn)})
        return out

    def _counts(self, net: nn.Module) -> torch.Tensor:
        """This rank's sums: the pixels' confusion matrix, tp, fp, fn (SpaceNet polygons), then
        the loss's sums."""
        c = torch.zeros(_COUNTS + 2 + 2 * self.loss_fn.num_classes, dtype=torch.float64)
        self.loader.set_epoch(0)
        for batch in self.loader:
            with self.precision.autocast():
                logits = per_tile(net, batch)  # each tile at its own size
            logits = logits.float()
            valid_px = batch.mask != IGNORE_INDEX
            # NOTE: a padding slot's and a padded border's mask is ignored, so they add nothing
            c[_COUNTS:] += self.loss_fn.sums(logits, batch.mask)
            pred = logits.argmax(1)
            pairs = batch.mask[valid_px] * NUM_CLASSES + pred[valid_px]
            c[:_CM] += torch.bincount(pairs, minlength=_CM).to("cpu", torch.float64)
            if self.cfg.train.val_f1:
                c[_CM:_COUNTS] += self._f1_counts(logits, batch)
        return c

    def _f1_counts(self, logits: torch.Tensor, batch: Any) -> torch.Tensor:
        probs = torch.softmax(logits, dim=1).permute(0, 2, 3, 1).cpu().numpy()
        counts = torch.zeros(3, dtype=torch.float64)
        for i, key in enumerate(batch.keys):
            if not bool(batch.valid[i]):
                continue
            h, w = batch.meta[i]["height"], batch.meta[i]["width"]
            proposals = [p for p, _ in polygonize_probs(probs[i, :h, :w], self.cfg.postproc)]
            counts += torch.tensor(score_image(self.truth.get(key, []), proposals,
                                               self.score_cfg), dtype=torch.float64)
        return counts
