"""Losses in one place: class-weighted cross-entropy with an optional soft Dice term mixed in.

``loss = ce_weight * CE_w + dice_weight * (1 - mean_c Dice_c)``

* ``CE_w`` is exactly ``nn.CrossEntropyLoss(weight=w, ignore_index=i)`` (the mean over valid pixels
  weighted by their class's weight), except that a batch with no valid pixel gives 0 instead of
  NaN, so a rank whose batch is all padding does not trip the trainer's non-finite-loss check.
* ``focal_gamma = g > 0`` makes CE the focal loss (Lin et al. 2017, arXiv:1708.02002): each
  valid pixel's term ``-w_t log p_t`` is multiplied by ``(1 - p_t) ** g`` (``p_t``: the softmax
  probability of its true class), so pixels already right weigh less; the class weights stay as
  the paper's alpha (as torchvision's ``sigmoid_focal_loss``). The normaliser stays the summed
  class weight of the valid pixels (the paper's is a count of anchors, not of modulated
  weights), so numerator and denominator still add up over batches and ranks (``sums``);
  ``g = 0`` is the weighted CE above, bit for bit (same code).
* Dice is soft (softmax probabilities), per class over the whole batch (all pixels of all
  images, as one volume), averaged over all classes, background included; it ignores the same
  pixels as CE. We chose Dice over Lovasz-softmax: it is a few lines, needs no per-image sort
  (Lovasz sorts every pixel's error, slow on 650x650 tiles), and it directly counters the class
  imbalance that the boundary class suffers from.
* Everything is computed in float32 with autocast off, so bf16/fp16 logits give a finite loss.
* ``sums`` gives both terms' numerators and denominators (CE's weighted sum and weight; Dice's
  per-class intersection and cardinality), which add up over batches and ranks: ``from_sums``
  of their total is the loss of the whole val split as one batch, whatever its batching.

The original SpaceNet sample weighted background/building/boundary by 0.1/0.8/0.1.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

FREQUENCY_METHODS = ("median", "inverse", "sqrt")


# What dataio.loader pads masks with (its IGNORE_INDEX, torch's default ignore_index): always
# ignored, so that another loss.ignore_index (a class to leave out) still works on padded batches.
PAD_INDEX = -100


@dataclass
class LossConfig:
    """The ``[loss]`` section of a config."""

    ce_weight: float = 1.0
    # Per-class CE weights (background, building, boundary), or "manifest" to derive them from the
    # manifest's class pixel frequencies with class_weights_from_frequencies.
    class_weights: tuple[float, ...] | list[float] | str = (0.1, 0.8, 0.1)
    dice_weight: float = 0.0
    # Added to the numerator and denominator of every class's Dice: a class absent from both the
    # target and the prediction scores 1 instead of 0/0.
    dice_smooth: float = 1.0
    # Target value of pixels that count for nothing (padded samples or borders); torch's default.
    ignore_index: int = -100
    # How "manifest" frequencies become weights (see class_weights_from_frequencies).
    frequency_balancing: str = "median"
    # Focal loss's gamma (Lin et al. 2017; the paper's best is 2): 0 is plain weighted CE.
    focal_gamma: float = 0.0

    def __post_init__(self) -> None:
        if isinstance(self.class_weights, str):
            if self.class_weights != "manifest":
                raise ValueError(
                    f"loss.class_weights={self.class_weights!r}: give a list of numbers or "
                    "'manifest'"
                )
        else:
            self.class_weights = tuple(float(w) for w in self.class_weights)
            weights = self.class_weights
            if len(weights) < 2 or any(not math.isfinite(w) or w < 0 for w in weights):
                raise ValueError(
                    f"loss.class_weights={list(weights)} must be >= 2 finite, non-negative numbers"
                )
            if sum(weights) <= 0:
                raise ValueError(f"loss.class_weights={list(weights)} are all 0")
        for name in ("ce_weight", "dice_weight", "dice_smooth", "focal_gamma"):
            value = getattr(self, name)
            if not isinstance(value, int | float) or not math.isfinite(value) or value < 0:
                raise ValueError(f"loss.{name}={value!r} must be a finite number >= 0")
        if self.ce_weight == 0 and self.dice_weight == 0:
            raise ValueError("loss.ce_weight and loss.dice_weight are both 0: nothing to train")
        if self.dice_weight > 0 and self.dice_smooth <= 0:
            raise ValueError("loss.dice_smooth must be > 0 when loss.dice_weight > 0")
        if self.focal_gamma > 0 and self.ce_weight == 0:
            raise ValueError(
                f"loss.focal_gamma={self.focal_gamma} modulates the CE term, but loss.ce_weight "
                "is 0: set loss.ce_weight > 0 or loss.focal_gamma = 0"
            )
        if isinstance(self.ignore_index, bool) or not isinstance(self.ignore_index, int):
            raise TypeError(f"loss.ignore_index must be an int, got {self.ignore_index!r}")
        if self.frequency_balancing not in FREQUENCY_METHODS:
            raise ValueError(
                f"loss.frequency_balancing={self.frequency_balancing!r} is not one of "
                f"{FREQUENCY_METHODS}"
            )


def class_weights_from_frequencies(
    freqs: Sequence[float], method: str = "median"
) -> list[float]:
    """Class weights from class pixel frequencies, normalised to sum to 1.

    ``median`` (the default) is median-frequency balancing (Eigen & Fergus 2015, as in SegNet):
    ``w_c = median(f) / f_c``. Up to the constant ``median(f)`` that is inverse frequency, so once
    normalised ``inverse`` (``w_c = 1 / f_c``, kept for configs that name it) gives the same
    weights: with SpaceNet's ~0.8/0.15/0.05 the boundary weighs 16x the background. ``sqrt`` is
    ``w_c = 1 / sqrt(f_c)``, the milder choice (4x there) when the full ratio makes the loss
    noisy. Normalising does not change weighted CE (its mean divides by the weights' sum) and
    only makes logged weights comparable with the original 0.1/0.8/0.1. A class with frequency
    0 never appears as a target, so its weight is 0.
    """
    if method not in FREQUENCY_METHODS:
        raise ValueError(f"method={method!r} is not one of {FREQUENCY_METHODS}")
    f = [float(x) for x in freqs]
    if len(f) < 2 or any(not math.isfinite(x) or x < 0 for x in f) or sum(f) <= 0:
        raise ValueError(
            f"class frequencies {f} must be >= 2 finite, non-negative numbers with a positive sum "
            "(check class_frequencies in the manifest)"
        )
    total = sum(f)
    f = [x / total for x in f]
    present = [x for x in f if x > 0]
    if method == "sqrt":
        raw = [x**-0.5 if x > 0 else 0.0 for x in f]
    else:
        top = statistics.median(present) if method == "median" else 1.0
        raw = [top / x if x > 0 else 0.0 for x in f]
    return [w / sum(raw) for w in raw]


class SegmentationLoss(nn.Module):
    """``ce_weight * weighted CE + dice_weight * (1 - soft Dice)``; see the module docstring."""

    def __init__(
        self,
        class_weights: Sequence[float],
        ce_weight: float = 1.0,
        dice_weight: float = 0.0,
        dice_smooth: float = 1.0,
        ignore_index: int = -100,
        focal_gamma: float = 0.0,
    ) -> None:
        super().__init__()
        if not math.isfinite(focal_gamma) or focal_gamma < 0:
            raise ValueError(f"loss.focal_gamma={focal_gamma!r} must be a finite number >= 0")
        # NOTE: a buffer so that loss.to(device) moves it; not persistent, so it stays out of
        # checkpoints (it is rebuilt from the config).
        weights = torch.tensor([float(w) for w in class_weights], dtype=torch.float32)
        self.register_buffer("class_weights", weights, persistent=False)
        self.ce_weight = float(ce_weight)
        self.dice_weight = float(dice_weight)
        self.dice_smooth = float(dice_smooth)
        self.ignore_index = int(ignore_index)
        self.focal_gamma = float(focal_gamma)

    @property
    def num_classes(self) -> int:
        return int(self.class_weights.numel())

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Logits (N, C, H, W) of any float dtype, target (N, H, W) int64 -> float32 scalar."""
        self._check(logits, target)
        with torch.autocast(device_type=logits.device.type, enabled=False):
            return self._combine(*self._terms(logits, target))

    @torch.no_grad()
    def sums(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """The loss's sums over these pixels as a float64 CPU vector: the CE numerator and
        denominator, then Dice's intersection and cardinality per class. Summed over batches
        (and ranks), ``from_sums`` gives the loss of all their pixels as one batch.

        NOTE: the forward's value is a ratio (CE: a weighted mean; Dice: per class over the whole
        batch), so a mean of batch losses weighted by samples depends on how the pixels were cut
        into batches (validation's batch size and ranks, tile sizes, class mix); sums do not."""
        self._check(logits, target)
        with torch.autocast(device_type=logits.device.type, enabled=False):
            ce_num, ce_den, inter, card = self._terms(logits, target)
        return torch.cat([ce_num.view(1), ce_den.view(1), inter, card]).double().cpu()

    def from_sums(self, sums: torch.Tensor) -> float:
        """The loss from ``sums`` (added up over any number of batches)."""
        c = self.num_classes
        if sums.shape != (2 + 2 * c,):
            raise ValueError(f"sums {tuple(sums.shape)} must be ({2 + 2 * c},) for {c} classes")
        return float(self._combine(sums[0], sums[1], sums[2:2 + c], sums[2 + c:]))

    def _check(self, logits: torch.Tensor, target: torch.Tensor) -> None:
        if logits.dim() != 4 or target.shape != (logits.shape[0], *logits.shape[2:]):
            raise ValueError(
                f"logits {tuple(logits.shape)} and target {tuple(target.shape)} must be "
                "(N, C, H, W) and (N, H, W)"
            )
        if logits.shape[1] != self.num_classes:
            raise ValueError(
                f"the model gives {logits.shape[1]} classes but loss.class_weights has "
                f"{self.num_classes}"
            )

    def _terms(
        self, logits: torch.Tensor, target: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """float32 sums (with a graph): CE numerator, CE denominator, and per class Dice
        intersection and cardinality; a term whose weight is 0 gives zeros."""
        logits = logits.float()
        target = target.long()
        if self.ignore_index != PAD_INDEX:
            # the loader pads masks with torch's default: ignored too, whatever is configured
            target = target.masked_fill(target == PAD_INDEX, self.ignore_index)
        valid = target != self.ignore_index
        zero = logits.new_zeros(())
        ce_num, ce_den = zero, zero
        inter = card = logits.new_zeros(self.num_classes)
        if self.ce_weight > 0:
            weights = self.class_weights.to(logits.device)
            if self.focal_gamma > 0:
                per_pixel = self._focal(logits, target, valid, weights)
            else:
                per_pixel = F.cross_entropy(
                    logits, target, weight=weights, ignore_index=self.ignore_index,
                    reduction="none"
                )
            # torch's "mean" divides by the summed weight of the valid pixels (focal too: see
            # the module docstring)
            ce_num = per_pixel.sum()
            ce_den = (weights[torch.where(valid, target, 0)] * valid).sum()
        if self.dice_weight > 0:
            mask = valid.unsqueeze(1).to(logits.dtype)
            probs = logits.softmax(dim=1) * mask
            one_hot = torch.zeros_like(probs).scatter_(
                1, torch.where(valid, target, 0).unsqueeze(1), 1
            )
            one_hot = one_hot * mask
            dims = (0, 2, 3)
            inter = (probs * one_hot).sum(dims)
            card = probs.sum(dims) + one_hot.sum(dims)
        return ce_num, ce_den, inter, card

    def _focal(
        self, logits: torch.Tensor, target: torch.Tensor, valid: torch.Tensor,
        weights: torch.Tensor
    ) -> torch.Tensor:
        """Per pixel ``w_t (1 - p_t) ** gamma * -log p_t`` (float32 logits), 0 where ignored."""
        safe = torch.where(valid, target, 0).unsqueeze(1)
        log_pt = logits.log_softmax(dim=1).gather(1, safe).squeeze(1)
        # NOTE: 1 - p_t as -expm1(log p_t): accurate near p_t = 1, where 1 - exp() cancels to 0.
        # Clamped to the smallest normal float: (1 - p_t) ** gamma has an infinite derivative
        # at 0 for gamma < 1, and inf * (-log p_t = 0) would be a NaN gradient at p_t = 1.
        one_minus = (-torch.expm1(log_pt)).clamp_min(torch.finfo(torch.float32).tiny)
        per_pixel = weights[safe.squeeze(1)] * one_minus.pow(self.focal_gamma) * -log_pt
        # the ignored pixels were scored as class 0 above: they count for nothing (nor their grads)
        return torch.where(valid, per_pixel, 0.0)

    def _combine(
        self, ce_num: torch.Tensor, ce_den: torch.Tensor, inter: torch.Tensor, card: torch.Tensor
    ) -> torch.Tensor:
        loss = ce_num.new_zeros(())
        if self.ce_weight > 0:
            # an empty batch gives 0, not NaN (with a graph, so DDP still sees every parameter
            # used)
            ce = ce_num / ce_den.clamp_min(torch.finfo(torch.float32).tiny)
            loss = loss + self.ce_weight * ce
        if self.dice_weight > 0:
            dice = (2 * inter + self.dice_smooth) / (card + self.dice_smooth)
            loss = loss + self.dice_weight * (1 - dice.mean())
        return loss


def build_loss(cfg: LossConfig, class_frequencies: Sequence[float] | None = None) -> nn.Module:
    """The loss module for ``cfg``; ``class_frequencies`` (the manifest's) when weights say so."""
    if cfg.class_weights == "manifest":
        if class_frequencies is None:
            raise ValueError(
                "loss.class_weights='manifest' needs the manifest's class_frequencies; pass them "
                "to build_loss or set loss.class_weights to a list such as [0.1, 0.8, 0.1]"
            )
        weights = class_weights_from_frequencies(class_frequencies, cfg.frequency_balancing)
    else:
        weights = list(cfg.class_weights)
    return SegmentationLoss(
        weights,
        ce_weight=cfg.ce_weight,
        dice_weight=cfg.dice_weight,
        dice_smooth=cfg.dice_smooth,
        ignore_index=cfg.ignore_index,
        focal_gamma=cfg.focal_gamma,
    )
