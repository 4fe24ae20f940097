"""benchmarks.postproc: every variant and stage runs on the same tiles and lands in the JSON
(not its speed: that is measured, not asserted)."""

from __future__ import annotations

import pytest

from benchmarks import postproc as bench


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_benchmark_rows_stages_and_json(postproc_bench):
    js, printed = postproc_bench  # (--tiles 2 --repeat 1 --workers 1, run once in conftest)
    assert js["benchmark"] == "postproc" and js["tiles"] == 2
    assert js["stages_baseline_ms_per_tile"] > 0
    variants = {(r["variant"], r["cores"]) for r in js["rows"]}
    assert len(variants) == len(js["rows"])  # one worker: no all-cores rows repeating these
    for v in ("polygonize, project", "polygonize, baseline (shapes+shapely)",
              "polygons of instance labels, project", "score, project",
              "score, baseline (plain shapely)", "end to end from shards, project"):
        assert (v, 1) in variants
    for r in js["rows"]:
        assert r["tiles_per_s"] > 0 and r["ms_per_tile"] > 0
        if r["variant"].endswith("project") and not r["variant"].startswith("end"):
            assert r["speedup_vs_baseline"] > 0
    assert [s["stage"] for s in js["stages"]] == [label for label, _ in bench.STAGES]
    assert all(s["ms_per_tile"] > 0 and s["x_goal_budget"] > 0 for s in js["stages"])
    assert "polygonize by stage" in printed


def test_stages_stop_where_they_say():
    # each stage's kind must do the work its label names, on a tile with buildings
    bench._TILES[:] = [bench.one_hot(bench.synth_tile(7, bench.SynthConfig(size=96,
                                                                              buildings=4))[0])]
    try:
        counts = {kind: bench._run((kind, 0, 1)) for _, kind in bench.STAGES}
    finally:
        bench._TILES.clear()
    assert counts["stage_read"] == 255  # one-hot: the brightest byte
    # blob pixels: the seeds alone, then grown back over their boundary band
    assert counts["stage_grow"] > counts["stage_label"] >= 1
    # tracing keeps the blobs over min_polygon_area, the same ones polygonize returns
    assert counts["stage_trace"] == counts["polygonize"] >= 1
