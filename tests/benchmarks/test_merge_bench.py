"""benchmarks.merge: its canvas is synthmask's recipe, its building count is the canvas's
4-connected blobs, its count check fails on a layer that is not merged, and a run on the smallest
mosaic lands in the JSON with the counts agreeing (not its speed: measured, not asserted)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import shapely
from pyproj import Transformer
from shapely.geometry import mapping, shape

from benchmarks import merge as bench
from dataio.classes import BOUNDARY, BUILDING
from postproc.synthmask import SynthConfig, synth_footprints


@pytest.mark.parametrize(("size", "cell"), [(650, 64), (1300, 64), (650, 1)])
def test_the_grid_spacing_check_decides_as_the_check_against_every_footprint(size, cell):
    # one cell larger than the canvas: every candidate is checked against every placed one
    # (small cells: many footprints span several, and the 3 px spacing crosses cell edges)
    cfg = SynthConfig(size=size, buildings=round(100 * (size / 650) ** 2))
    want = synth_footprints(np.random.default_rng(5), cfg, cell=10 * size)
    got = synth_footprints(np.random.default_rng(5), cfg, cell=cell)
    assert len(got) == len(want) > 50
    assert all(g.equals_exact(w, 0) for g, w in zip(got, want, strict=True))


def test_buildings_are_the_4_connected_blobs_of_building_pixels():
    mask = np.zeros((8, 8), np.uint8)
    mask[1:3, 1:3] = BUILDING
    mask[3:5, 3:5] = BUILDING  # a corner touch: another building
    mask[1, 5:8] = BUILDING
    mask[2:4, 7] = BUILDING  # an L: one
    mask[6, :] = BOUNDARY  # the band is no building
    found = bench.buildings(mask)
    assert sorted(g.area for g in found) == [4, 4, 5]
    assert [bench._crosses(g.bounds, 4) for g in found] == [False, False, True]


@pytest.fixture(scope="module")
def mosaic(tmp_path_factory: pytest.TempPathFactory) -> dict:
    m = bench.make_mosaic(2, 128, tmp_path_factory.mktemp("mosaic"))
    assert m["crossing"] > 0  # (else nothing here would need merging)
    return m


def _unmerged(gj: Path, out: Path) -> None:
    """Every tile footprint in lon/lat, none merged."""
    tr = Transformer.from_crs(bench.UTM, "EPSG:4326", always_xy=True)
    feats = []
    for p in sorted(gj.glob("*.geojson")):
        for f in json.loads(p.read_text())["features"]:
            g = shapely.transform(shape(f["geometry"]),
                                  lambda xy: np.column_stack(tr.transform(xy[:, 0], xy[:, 1])))
            feats.append({"type": "Feature", "geometry": mapping(g),
                          "properties": f["properties"]})
    out.write_text(json.dumps({"type": "FeatureCollection", "features": feats}))


def test_the_count_check_fails_on_a_layer_that_is_not_merged(mosaic, tmp_path):
    out = tmp_path / "area.geojson"
    _unmerged(mosaic["gj"], out)
    with pytest.raises(RuntimeError, match="buildings in more than one footprint"):
        bench.project_counts(mosaic, out)
    # postproc.merge's layer of the same tiles passes
    run = bench.measured("project", mosaic, out)
    counts = bench.project_counts(mosaic, out)
    assert run["footprints_out"] == counts["canvas_buildings"] - counts["joined"]
    assert counts["merged"] > 0


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_benchmark_rows_counts_and_json(tmp_path):
    out = tmp_path / "merge.json"
    bench.main(["--grids", "2", "--tile-px", "128", "--repeat", "1", "--json", str(out)])
    js = json.loads(out.read_text())
    assert js["benchmark"] == "merge" and js["settings"]["grids"] == [2]
    mine, base = js["rows"]
    assert (mine["variant"], base["variant"]) == (bench.PROJECT, bench.BASELINE)
    assert mine["grid"] == base["grid"] == "2x2" and mine["tiles"] == base["tiles"] == 4
    assert mine["footprints_in"] == base["footprints_in"] == base["held"] > mine["held"] > 0
    # every building of the canvas is one footprint, but for those joined across an edge
    assert mine["footprints_out"] == mine["canvas_buildings"] - mine["joined"]
    assert 0 <= mine["joined_drawn"] <= mine["joined"]
    assert mine["merged"] > 0 and base["footprints_out"] > 0
    for r in js["rows"]:
        assert r["seconds"] > 0 and r["peak_rss_mb"] >= r["rss_start_mb"] > 0
        assert all(k in js["units"] for k, v in r.items() if isinstance(v, float))
    assert mine["speedup_vs_baseline"] > 0
