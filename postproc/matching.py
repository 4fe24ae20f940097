"""The SpaceNet matching of one image, as outcomes per polygon (for tuning and pictures).

``postproc.score.score_image`` counts; this module says *which* proposal matched *which* truth
polygon, with the same rule (proposals in order, each taking the best unmatched truth polygon with
IoU >= 0.5), and evaluates many subsets of one proposal list at once (``postproc.tune`` drops
small polygons at several area thresholds without polygonizing again).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import shapely
from shapely.geometry.base import BaseGeometry

from postproc.score import ScoreConfig, candidate_ious


def as_array(polys: Sequence[BaseGeometry]) -> np.ndarray:
    arr = np.empty(len(polys), dtype=object)
    arr[:] = list(polys)
    return arr


def scored_truth(truth: Sequence[BaseGeometry], cfg: ScoreConfig) -> np.ndarray:
    """The truth polygons the scorer keeps (``ScoreConfig.keeps_truth``), in file order."""
    t = as_array(truth)
    return t[cfg.keeps_truth(shapely.area(t))] if t.size else t


def greedy_match(pi: np.ndarray, ti: np.ndarray, n_props: int, n_truth: int,
                 keep: np.ndarray | None = None) -> np.ndarray:
    """Index of the truth polygon each proposal matched, -1 for none (a false positive).

    ``pi, ti``: candidate pairs from ``candidate_ious`` (sorted by proposal, best first).
    ``keep``: bool per proposal; dropped proposals take nothing (as if absent from the file).
    """
    out = np.full(n_props, -1, np.int64)
    matched = np.zeros(n_truth, bool)
    starts = np.searchsorted(pi, np.arange(n_props + 1))
    for k in np.flatnonzero(starts[1:] > starts[:-1]):
        if keep is not None and not keep[k]:
            continue
        for j in ti[starts[k]:starts[k + 1]]:
            if not matched[j]:
                matched[j] = True
                out[k] = j
                break
    return out


def true_positives(pi: np.ndarray, ti: np.ndarray, keep: np.ndarray, n_truth: int
                   ) -> np.ndarray:
    """TP count for each row of ``keep`` (subsets x proposals, bool) under the greedy rule."""
    if pi.size == 0:
        return np.zeros(keep.shape[0], np.int64)
    if np.unique(pi).size == pi.size and np.unique(ti).size == ti.size:
        # NOTE: the usual case (non-overlapping footprints): every pair is its own match, so
        # no proposal can take another's truth and the order cannot matter.
        return keep[:, pi].sum(axis=1).astype(np.int64)
    return np.array([(greedy_match(pi, ti, keep.shape[1], n_truth, row) >= 0).sum()
                     for row in keep], np.int64)


def match_image(truth: Sequence[BaseGeometry], proposals: Sequence[BaseGeometry],
                cfg: ScoreConfig | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(scored truth polygons, truth index matched per proposal or -1, matched flag per truth).

    Counts agree with ``score_image``: TP = matches, FP = proposals at -1, FN = unmatched truth.
    """
    cfg = cfg or ScoreConfig()
    t = scored_truth(truth, cfg)
    p = as_array(proposals)
    pi, ti, _ = candidate_ious(t, p, cfg)
    match = greedy_match(pi, ti, p.size, t.size)
    matched = np.zeros(t.size, bool)
    matched[match[match >= 0]] = True
    return t, match, matched
