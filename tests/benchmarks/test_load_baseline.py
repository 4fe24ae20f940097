"""benchmarks.load_baseline: real outputs (a valid proposal CSV; postproc.score's counts on the
same files), on a few full-size tiles."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from benchmarks import load, load_baseline
from postproc import polygonize, score
from postproc.csvio import PROPOSAL_COLUMNS, read_proposal_csv
from postproc.polygonize import PolygonizeConfig
from postproc.score import ScoreConfig

TILES = 6  # in two shards; tile 0 (and so tile 3) of the pool of 3 has no building


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Prediction shards, truth CSV and the project's proposals of 6 tiles of 650x650."""
    d = tmp_path_factory.mktemp("load-baseline")
    pred, truth, props = d / "pred", d / "truth.csv", d / "proposals.csv"
    load.write_predictions(pred, truth, load.make_pool(3), TILES, shard_tiles=4)
    assert polygonize.main(["--pred", str(pred), "--out", str(props), "--workers", "1",
                            "--no-tuned"]) == 0
    return {"dir": d, "pred": pred, "truth": truth, "props": props}


def project_score(truth: Path, props: Path, out: Path) -> dict:
    assert score.main(["--truth", str(truth), "--proposals", str(props), "--json", str(out),
                       "--workers", "1"]) == 0
    return json.loads(out.read_text())


def baseline_score(truth: Path, props: Path, out: Path) -> dict:
    assert load_baseline.main(["score", "--truth", str(truth), "--proposals", str(props),
                               "--json", str(out)]) == 0
    return json.loads(out.read_text())


def test_defaults_are_the_projects():
    mine = (load_baseline.MIN_POLYGON_AREA, load_baseline.MIN_TRUTH_AREA,
            load_baseline.IOU_THRESHOLD)
    theirs = (PolygonizeConfig().min_polygon_area, ScoreConfig().min_truth_area,
              ScoreConfig().iou_threshold)
    assert mine == theirs


def test_score_equals_postproc_score(small):
    d = small["dir"]
    mine = baseline_score(small["truth"], small["props"], d / "b.json")
    theirs = project_score(small["truth"], small["props"], d / "p.json")
    assert mine["tp"] > 100  # real work, not two empty files agreeing
    for k in ("tp", "fp", "fn", "precision", "recall", "f1", "images", "per_image",
              "images_without_proposals", "images_without_truth"):
        assert mine[k] == theirs[k], k


def test_polygonize_writes_a_valid_proposal_csv(small):
    d = small["dir"]
    out = d / "baseline.csv"
    assert load_baseline.main(["polygonize", "--pred", str(small["pred"]), "--out",
                               str(out)]) == 0
    with open(out, newline="") as f:
        rows = list(csv.reader(f))
    assert tuple(rows[0]) == PROPOSAL_COLUMNS
    ids = [r[0] for r in rows[1:]]
    assert sorted(set(ids), key=ids.index) == load.image_ids(TILES)  # every tile, in order
    assert [r for r in rows[1:] if r[0] == ids[0]] == [[ids[0], "-1", "POLYGON EMPTY", "0"]]
    table = read_proposal_csv(out)  # the project's strict reader: WKT, ids, confidences
    assert table.repaired == 0
    assert all(g.is_valid and g.area >= 20 for ps in table.polygons.values() for g in ps)
    # the sample thresholds the building channel alone, so its outlines miss the boundary band:
    # a plausible F1, lower than the project's, and both scorers agree on it too
    mine = baseline_score(small["truth"], out, d / "bb.json")
    theirs = project_score(small["truth"], out, d / "bp.json")
    assert [mine[k] for k in ("tp", "fp", "fn")] == [theirs[k] for k in ("tp", "fp", "fn")]
    assert 0.4 < mine["f1"] < project_score(small["truth"], small["props"], d / "p.json")["f1"]


def test_the_baseline_commands_carry_no_project_imports(small):
    """Their memory figures are a plain script's: neither torch nor numba may come along."""
    import subprocess
    import sys

    code = ("import sys\n"
            "from benchmarks import load_baseline as b\n"
            f"b.polygonize(__import__('pathlib').Path({str(small['pred'])!r}), "
            f"__import__('pathlib').Path({str(small['dir'] / 'imports.csv')!r}))\n"
            f"b.score(__import__('pathlib').Path({str(small['truth'])!r}), "
            f"__import__('pathlib').Path({str(small['props'])!r}))\n"
            "print(sorted(m for m in ('torch', 'numba') if m in sys.modules))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, timeout=120, cwd=Path(__file__).resolve().parents[2])
    assert out.stdout.strip() == "[]"
    assert (small["dir"] / "imports.csv").stat().st_size > 100
