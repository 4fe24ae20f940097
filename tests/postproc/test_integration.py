"""Ground truth end to end: dataio.prepare masks as one-hot predictions -> polygonize -> score.

A perfect prediction must score F1 >= 0.98 against the split's truth.csv: the boundary band must
neither merge touching buildings nor shrink footprints (growing the seeds back over the band).
"""

from __future__ import annotations

import io
import json
import tarfile
from functools import partial
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from postproc import polygonize, score
from postproc.cli import exit_on_error
from postproc.predio import write_pred_shard
from postproc.synthmask import one_hot


def masks_as_predictions(split_dir: Path, pred_dir: Path) -> int:
    """Write ``pred-NNNNNN.tar`` (named after ``shard-NNNNNN.tar``) with one-hot masks."""
    n = 0
    for shard in sorted(split_dir.glob("shard-*.tar")):
        parts: dict[str, dict[str, bytes]] = {}
        with tarfile.open(shard) as tar:
            for m in tar:
                key, ext = m.name.split(".", 1)
                f = tar.extractfile(m)
                if f is not None and ext in ("mask.png", "meta.json"):
                    parts.setdefault(key, {})[ext] = f.read()
        samples = []
        for key, p in parts.items():
            mask = np.asarray(Image.open(io.BytesIO(p["mask.png"])))
            samples.append((key, one_hot(mask), json.loads(p["meta.json"])))
        n += write_pred_shard(pred_dir / f"pred-{shard.stem.split('-')[1]}.tar", samples)
    return n


@pytest.mark.multiproc  # polygonize with a pool of 2 workers
@pytest.mark.timeout(300)
def test_ground_truth_masks_score_f1_at_least_098(prepared_dataset, tmp_path):
    totals = np.zeros(3, int)
    for split in ("test", "val", "train"):
        pred = tmp_path / "PRED" / split
        assert masks_as_predictions(prepared_dataset / split, pred) > 0
        out, js = tmp_path / f"{split}.csv", tmp_path / f"{split}.json"
        argv = ["--pred", str(pred), "--out", str(out), "--workers", "2",
                "--geojson", str(tmp_path / "geojson")]
        assert exit_on_error(partial(polygonize.main, argv)) == 0
        argv = ["--truth", str(prepared_dataset / split / "truth.csv"), "--proposals", str(out),
                "--json", str(js), "--workers", "1"]
        assert exit_on_error(partial(score.main, argv)) == 0
        r = json.loads(js.read_text())
        assert r["images_without_proposals"] == 0 and r["images_without_truth"] == 0
        if split == "test":
            assert r["f1"] >= 0.98, r
        totals += (r["tp"], r["fp"], r["fn"])
    # all splits pooled: ~500 buildings, including slivers cut by the tile edges
    tp, fp, fn = totals
    f1 = 2 * tp / (2 * tp + fp + fn)
    assert f1 >= 0.97, (tp, fp, fn)
