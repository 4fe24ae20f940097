"""benchmarks.load: its inputs, its process-tree memory sampler, and its rows (not its speed)."""

from __future__ import annotations

import json
import sys

import pytest

from benchmarks import load
from postproc.csvio import read_truth_csv
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
    out = tmp_path / "load.json"
    load.main(["--tiles", "30", "--prepare-tiles", "6", "--pool", "3", "--synth-pool", "3",
               "--workers", "1", "--json", str(out), "--keep", str(tmp_path / "work")])
    js = json.loads(out.read_text())
    assert js["benchmark"] == "load" and "cores" in js["machine"]
    assert [(r["stage"], r["tiles"]) for r in js["rows"]] == [
        ("polygonize", 30), ("score", 30), ("synth (pool)", 3), ("prepare", 6)]
    for r in js["rows"]:
        for k in ("seconds", "tiles_per_s", "cpu_ms_per_tile", "peak_tree_rss_mb",
                  "peak_single_rss_mb", "peak_tree_pss_mb"):
            assert r[k] > 0 and k in js["units"]
    score = json.loads((tmp_path / "work" / "post-30" / "score.json").read_text())
    assert score["images"] == 30 and score["f1"] > 0.9
