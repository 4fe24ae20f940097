"""benchmarks.load: its inputs, its process-tree memory sampler, and its rows, project and
baseline (not their speed)."""

from __future__ import annotations

import argparse
import json
import sys

import pytest

from benchmarks import load
from postproc.csvio import read_proposal_csv, read_truth_csv
from postproc.predio import iter_raw_samples, list_pred_shards


def test_tree_sampler_sees_a_grandchild_allocate(tmp_path):
    # a child that starts a child that fills 200 MB: only a tree sampler sees it in the child
    grandchild = "b = b'x' * (200 << 20); import time; time.sleep(1.0)"
    child = f"import subprocess, sys; subprocess.run([sys.executable, '-c', {grandchild!r}])"
    m = load.run_measured([sys.executable, "-c", child], tmp_path / "log")
    assert m["peak_tree_rss_mb"] > 150 and m["peak_single_rss_mb"] > 150
    assert m["peak_tree_pss_mb"] > 150 and m["processes"] >= 2 and m["memory_samples"] > 5
    assert m["peak_tree_rss_mb"] >= m["peak_single_rss_mb"]


def test_tree_sampler_reports_a_failing_command(tmp_path):
    with pytest.raises(RuntimeError, match="exited with 3"):
        load.run_measured([sys.executable, "-c", "import sys; sys.exit(3)"], tmp_path / "log")


def test_predictions_and_truth_for_30_tiles(tmp_path):
    pool = load.make_pool(3)
    assert pool[0].truth == [] and all(t.truth for t in pool[1:])  # one empty tile
    pred, truth = tmp_path / "pred", tmp_path / "truth.csv"
    load.write_predictions(pred, truth, pool, 30, shard_tiles=12)
    shards = list_pred_shards(pred)
    assert [s.name for s in shards] == ["pred-000000.tar", "pred-000001.tar", "pred-000002.tar"]
    keys = [k for s in shards for k, _, _ in iter_raw_samples(s)]
    assert keys == load.image_ids(30) and len(set(keys)) == 30
    table = read_truth_csv(truth)
    assert list(table.polygons) == keys
    assert [len(table.polygons[k]) for k in keys[:3]] == [len(t.truth) for t in pool]


def test_linked_aoi_has_the_spacenet_layout(tmp_path):
    pool_raw = tmp_path / "pool"
    for sub, name in ((load.IMAGE_DIR, "RGB-PanSharpen_AOI_2_Vegas_img1.tif"),
                      (str(load.LABEL_DIR), "buildings_AOI_2_Vegas_img1.geojson")):
        (pool_raw / sub).mkdir(parents=True)
        (pool_raw / sub / name).write_text(name)
    load.link_aoi(pool_raw, tmp_path / "raw", 3)
    tif = tmp_path / "raw" / load.IMAGE_DIR / "RGB-PanSharpen_AOI_2_Vegas_img3.tif"
    label = tmp_path / "raw" / load.LABEL_DIR / "buildings_AOI_2_Vegas_img3.geojson"
    assert tif.read_text().endswith("img1.tif") and label.read_text().endswith("img1.geojson")


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_benchmark_rows_and_json(tmp_path):
    # NOTE: 5 tiles from a pool of 3: each distinct tile more than once under its own ImageId,
    # as at the real sizes; 30 added ~5 s of polygonizing and scoring for the same checks.
    out = tmp_path / "load.json"
    load.main(["--tiles", "5", "--prepare-tiles", "6", "--pool", "3", "--synth-pool", "3",
               "--workers", "1", "--json", str(out), "--keep", str(tmp_path / "work")])
    js = json.loads(out.read_text())
    assert js["benchmark"] == "load" and "cores" in js["machine"]
    # the baselines run by default at the --tiles sizes up to 1,000, next to the project
    assert js["baseline_tiles"] == [5]
    assert [(r["stage"], r["side"], r["tiles"]) for r in js["rows"]] == [
        ("polygonize", "project", 5), ("polygonize, baseline", "baseline", 5),
        ("score", "project", 5), ("score, baseline", "baseline", 5),
        ("synth (pool)", "project", 3), ("prepare", "project", 6)]
    for r in js["rows"]:
        for k in ("seconds", "tiles_per_s", "cpu_ms_per_tile", "peak_tree_rss_mb",
                  "peak_single_rss_mb", "peak_tree_pss_mb"):
            assert r[k] > 0 and k in js["units"]
        if r["side"] == "baseline":
            assert r["processes"] == 1 and r["pss_x_project"] > 0
    work = tmp_path / "work" / "post-5"
    score = json.loads((work / "score.json").read_text())
    assert score["images"] == 5 and score["f1"] > 0.9
    baseline = json.loads((work / "score-baseline.json").read_text())
    assert [baseline[k] for k in ("tp", "fp", "fn")] == [score[k] for k in ("tp", "fp", "fn")]
    assert read_proposal_csv(work / "proposals-baseline.csv").rows >= 5


def test_sizes_and_baseline_sizes():
    assert load._sizes("1000, 3000") == [1000, 3000]
    assert load._sizes("") == load._sizes("0") == []  # --prepare-tiles 0: no prepare rows
    with pytest.raises(argparse.ArgumentTypeError):
        load._sizes("-5")
    assert load.baseline_sizes([30, 1000, 10000], None) == [30, 1000]
    assert load.baseline_sizes([1000, 3000], [3000, 1000]) == [1000, 3000]
    assert load.baseline_sizes([1000], []) == []
    with pytest.raises(ValueError, match="--baseline-tiles 500 not among --tiles 1000"):
        load.baseline_sizes([1000], [500])


def test_baseline_not_among_tiles_is_refused_before_any_work(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        load.main(["--tiles", "1000", "--baseline-tiles", "3000", "--prepare-tiles", "0",
                   "--keep", str(tmp_path / "work")])
    assert e.value.code == 2 and "--baseline-tiles 3000" in capsys.readouterr().err
    assert not (tmp_path / "work").exists()


def test_growth_and_ratio_per_side():
    def row(stage, n, pss):
        m = {"seconds": 1.0, "cpu_seconds": 1.0, "peak_tree_rss_mb": pss,
             "peak_tree_pss_mb": pss}
        return load._row(stage, n, m)

    rows = [row("score", 1000, 400.0), row("score, baseline", 1000, 500.0),
            row("score", 3000, 404.0), row("score, baseline", 3000, 1100.0)]
    load.add_growth(rows)
    load.add_vs_project(rows)
    assert [r["side"] for r in rows] == ["project", "baseline"] * 2
    assert rows[2]["pss_mb_per_1000_tiles"] == pytest.approx(2.0)  # each side against itself
    assert rows[3]["pss_mb_per_1000_tiles"] == pytest.approx(300.0)
    assert rows[3]["rss_x_smallest"] == pytest.approx(2.2)
    assert rows[1]["pss_x_project"] == pytest.approx(1.25)
    assert "pss_x_project" not in rows[0]


@pytest.mark.parametrize("flag", ["--tiles", "--prepare-tiles"])
def test_a_size_given_twice_is_refused_before_any_work(flag, tmp_path, capsys, monkeypatch):
    """It ran twice and then divided the growth between the two by 0 tiles: a traceback after
    the whole run, and neither table nor JSON."""
    def started(*_a, **_k):
        raise AssertionError("the benchmark started its work")

    monkeypatch.setattr(load, "make_pool", started)
    monkeypatch.setattr(load, "run_measured", started)
    argv = {"--tiles": ["--tiles", "30,1000,30", "--prepare-tiles", "0"],
            "--prepare-tiles": ["--tiles", "0", "--prepare-tiles", "6,6"]}[flag]
    with pytest.raises(SystemExit) as e:
        load.main([*argv, "--keep", str(tmp_path / "work"), "--json", str(tmp_path / "j")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and f"argument {flag}: " in err and "given twice" in err
    assert not (tmp_path / "work").exists()


def test_a_keep_directory_that_is_not_empty_is_refused_before_any_work(tmp_path, capsys,
                                                                      monkeypatch):
    """(a second run with the same --keep timed what came first, then failed with a
    RuntimeError traceback: dataio.synth refused to write over the first run's AOI)"""
    def started(*_a, **_k):
        raise AssertionError("the benchmark started its work")

    monkeypatch.setattr(load, "make_pool", started)
    monkeypatch.setattr(load, "run_measured", started)
    work = tmp_path / "work"
    (work / "synth-pool").mkdir(parents=True)
    with pytest.raises(SystemExit) as e:
        load.main(["--tiles", "0", "--prepare-tiles", "2", "--keep", str(work)])
    assert e.value.code == 2 and f"--keep {work} is not empty" in capsys.readouterr().err
