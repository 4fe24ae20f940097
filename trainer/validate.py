"""Validation on the val split: loss, building IoU and the SpaceNet F1, from all-reduced counts.

Each rank evaluates its own disjoint part of the split (padding excluded via ``Batch.valid``);
the counts are summed over ranks before any ratio is taken (never an average of per-rank ratios).
So is the loss: ``val_loss`` is the loss of all val pixels at once, from its sums (numerators and
denominators, ``SegmentationLoss.sums``), the same for any validation batch size or world size.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dataio.classes import BUILDING
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

# the pixel and polygon counts that come before the loss's sums in the all-reduced vector
_COUNTS = 6


def _ratio(a: float, b: float) -> float:
    return a / b if b > 0 else 0.0


class Validator:
    def __init__(self, cfg: Config, env: DistEnv, data: Path, device: torch.device,
                 precision: Precision, loss_fn: SegmentationLoss) -> None:
        self.cfg, self.device, self.precision, self.loss_fn = cfg, device, precision, loss_fn
        manifest = load_manifest(data)
        self.enabled = cfg.train.val_every > 0 and manifest.samples("val") > 0
        if not self.enabled:
            return
        self.loader = agreed_loader("val", data, lambda: build_loader(
            data, "val", dataclasses.replace(cfg.data), env.rank, env.world_size, train=False,
            device=device))
        self.truth = {}
        if cfg.train.val_f1:
            self.truth = read_truth_csv(data / "val" / "truth.csv").polygons
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
               "val_iou": _ratio(c[0].item(), (c[0] + c[1] + c[2]).item())}
        if self.cfg.train.val_f1:
            tp, fp, fn = c[3].item(), c[4].item(), c[5].item()
            p, r = _ratio(tp, tp + fp), _ratio(tp, tp + fn)
            out.update({"val_precision": p, "val_recall": r, "val_f1": _ratio(2 * p * r, p + r),
                        "val_tp": int(tp), "val_fp": int(fp), "val_fn": int(fn)})
        return out

    def _counts(self, net: nn.Module) -> torch.Tensor:
        """This rank's sums: tp, fp, fn (pixels, building class), tp, fp, fn (SpaceNet
        polygons), then the loss's sums."""
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
            is_b, want_b = (pred == BUILDING) & valid_px, (batch.mask == BUILDING) & valid_px
            c[0] += float((is_b & want_b).sum())
            c[1] += float((is_b & ~want_b).sum())
            c[2] += float((~is_b & want_b).sum())
            if self.cfg.train.val_f1:
                c[3:6] += self._f1_counts(logits, batch)
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
