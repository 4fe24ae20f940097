"""The scorer against a slow, obviously-correct reference, hand-made cases, and its CSV readers."""

from __future__ import annotations

import json

import numpy as np
import pytest
import shapely
from proc_helpers import numba_interrupt
from shapely import affinity
from shapely.geometry import Polygon, box

from postproc.csvio import (
    CsvError,
    index_proposal_csv,
    index_truth_csv,
    read_proposal_csv,
    read_truth_csv,
)
from postproc.iou import intersection_areas
from postproc.matching import scored_truth
from postproc.polygonize import polygonize_labels
from postproc.score import ScoreConfig, score, score_image
from postproc.score import main as score_main


def reference_score(truth, proposals, cfg=ScoreConfig()):
    """SpaceNet's loop, written plainly: every proposal against every unmatched truth."""
    truth = [t for t in truth if t.area > cfg.min_truth_area * (1 + 1e-8)]  # (float rounding)
    unmatched = list(range(len(truth)))
    tp = fp = 0
    for p in proposals:
        best, best_j = -1.0, None
        for j in unmatched:  # file order: the first of equal IoUs wins
            union = p.union(truth[j]).area
            iou = p.intersection(truth[j]).area / union if union > 0 else 0.0
            if iou > best:
                best, best_j = iou, j
        ok = best > cfg.iou_threshold if cfg.strict else best >= cfg.iou_threshold
        if best_j is not None and ok:
            tp += 1
            unmatched.remove(best_j)
        else:
            fp += 1
    return tp, fp, len(unmatched)


def random_scene(rng: np.random.Generator, n: int) -> tuple[list, list]:
    """Truth: rotated boxes (some tiny, some with holes); proposals: pixel polygons of the
    rasterised truth, shifted/scaled copies, duplicates, random boxes, shuffled."""
    truth = []
    for _ in range(n):
        cx, cy = rng.uniform(0, 120, 2)
        w, h = rng.uniform(3, 25, 2)
        t = affinity.rotate(box(cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2),
                            rng.uniform(0, 90))
        if rng.random() < 0.15:
            t = t.difference(t.centroid.buffer(min(w, h) / 4, quad_segs=2))
        truth.append(t)
    props: list = []
    for t in truth:
        r = rng.random()
        if r < 0.35:  # a pixel polygon: the numba path
            x0, y0, x1, y1 = (int(v) for v in t.bounds)
            grid = np.zeros((y1 - y0 + 3, x1 - x0 + 3), np.uint8)
            centres = shapely.points(np.stack(np.meshgrid(
                np.arange(grid.shape[1]) + x0 - 1 + 0.5, np.arange(grid.shape[0]) + y0 - 1 + 0.5),
                -1).reshape(-1, 2))
            grid.ravel()[shapely.contains(t, centres)] = 1
            parts = polygonize_labels(grid)
            props += [affinity.translate(g, x0 - 1, y0 - 1) for g in parts]
        elif r < 0.7:
            props.append(affinity.scale(affinity.translate(t, *rng.normal(0, 2, 2)),
                                        *rng.uniform(0.7, 1.3, 2)))
        elif r < 0.8:
            props += [t, t]  # duplicates: the second one is a false positive
    for _ in range(n // 4):
        x, y = rng.uniform(0, 120, 2)
        props.append(box(x, y, x + rng.uniform(2, 20), y + rng.uniform(2, 20)))
    order = rng.permutation(len(props))
    return truth, [props[i] for i in order]


@pytest.mark.parametrize("seed", range(8))
def test_randomised_scenes_match_the_reference(seed):
    rng = np.random.default_rng(seed)
    for cfg in (ScoreConfig(), ScoreConfig(strict=True, min_truth_area=5.0),
                ScoreConfig(iou_threshold=0.3)):
        truth, props = random_scene(rng, int(rng.integers(5, 40)))
        assert score_image(truth, props, cfg) == reference_score(truth, props, cfg)


def test_iou_exactly_one_half():
    t = [box(0, 0, 10, 10)]
    half = [Polygon([(0, 0), (10, 0), (10, 5), (0, 5)])]  # a pixel polygon: the numba path
    assert score_image(t, half) == (1, 0, 0)
    assert score_image(t, half, ScoreConfig(strict=True)) == (0, 1, 1)
    tilted = [affinity.rotate(box(0, 0, 10, 10), 30, origin=(0, 0))]  # the GEOS path
    assert score_image(tilted, [tilted[0].intersection(box(-20, -20, 20, 2.5))]) == \
        reference_score(tilted, [tilted[0].intersection(box(-20, -20, 20, 2.5))])


@pytest.mark.parametrize("x", [0.1, 0.3, 12.7, 101.9, 333.3, 647.1])
def test_an_exact_tie_at_the_threshold_is_not_decided_by_float_rounding(x):
    """What failed: IoU exactly 0.5 in decimal coordinates came out as 0.4999999999 or
    0.5000000001 from the float areas, so 23 of these 24 ties were scored against the rule
    (a miss under >= 0.5, or a match under --strict's > 0.5), and 4 of 12 ties between an
    integer pixel proposal and a decimal truth polygon were missed."""
    every = ScoreConfig(min_truth_area=0)
    strict = ScoreConfig(min_truth_area=0, strict=True)
    for w in (1.1, 2.3, 7.7, 10.1):  # the proposal is the truth's left half
        t, p = box(x, x, x + 2 * w, x + 3.3), box(x, x, x + w, x + 3.3)
        assert score_image([t], [p], every) == (1, 0, 0), w
        assert score_image([t], [p], strict) == (0, 1, 1), w
    a = int(x)
    for d in (0.1, 0.5, 0.7, 1.3):  # a pixel proposal (the numba path): IoU (10-d) / 2(10-d)
        t, p = box(a + d, a, a + 20 - 2 * d, a + 7), box(a, a, a + 10, a + 7)
        assert score_image([t], [p], every) == (1, 0, 0), d
        assert score_image([t], [p], strict) == (0, 1, 1), d


@pytest.mark.parametrize("x", [0.1, 0.3, 12.7, 101.9, 333.3, 647.1])
def test_truth_of_exactly_min_truth_area_is_dropped_wherever_it_lies(x):
    """What failed: a 20 px^2 truth polygon in decimal coordinates has a float area of
    19.999999999999996 or 20.000000000000018 (up to 20.000000000000284) by where it lies, so
    about half of these were kept (a miss without a proposal) against the rule "<= 20 dropped"."""
    cfg = ScoreConfig()  # min_truth_area 20
    for w, h in ((4, 5), (0.8, 25), (1.6, 12.5), (3.2, 6.25)):
        t = box(x, x + 0.2, x + w, x + 0.2 + h)
        assert score_image([t], [], cfg) == (0, 0, 0), (w, t.area)
        assert scored_truth([t], cfg).size == 0, (w, t.area)
        bigger = box(x, x + 0.2, x + w * (1 + 1e-6), x + 0.2 + h)  # 20.00002 px^2: kept
        assert score_image([bigger], [], cfg) == (0, 0, 1), w
        assert scored_truth([bigger], cfg).size == 1, w
    t = box(x, x, x + 2.5, x + 2.5)  # 6.25 px^2 with --min-truth-area 6.25
    assert score_image([t], [], ScoreConfig(min_truth_area=6.25)) == (0, 0, 0)
    assert score_image([t], [], ScoreConfig(min_truth_area=0)) == (0, 0, 1)


@pytest.mark.parametrize("x", [0.1, 0.3, 12.7, 101.9, 333.3, 647.1])
def test_an_exact_tie_between_two_truths_goes_to_the_first_in_file_order(x):
    """What failed: a proposal merging two adjacent buildings (IoU exactly 0.5 with each) took
    the one whose float IoU rounded higher, not the first in file order: 13 of these 30 took
    the second, and the proposal of that building then found it matched (2 tp became 1)."""
    cfg = ScoreConfig(min_truth_area=0)
    low = ScoreConfig(min_truth_area=0, iou_threshold=0.3)  # (both pairs candidates)
    for w in (1.1, 2.3, 7.7, 10.1, 13.3):
        t1, t2 = box(x, x, x + w, x + 3.3), box(x + w, x, x + 2 * w, x + 3.3)
        merged = box(x, x, x + 2 * w, x + 3.3)
        assert score_image([t1, t2], [merged, t2], cfg) == (2, 0, 0), w
        assert score_image([t2, t1], [merged, t1], cfg) == (2, 0, 0), w
        # (a clear difference still decides: the larger IoU, the second truth here)
        shifted = box(x + 0.1, x, x + 2 * w, x + 3.3)
        assert score_image([t1, t2], [shifted, t1], low) == (2, 0, 0), w


def test_iou_ties_do_not_chain_past_the_tolerance():
    """What failed: IoUs of one proposal were tied when each was within IOU_RTOL of the one
    before, so a chain of such steps tied the highest with one 1.7e-8 below it (beyond the
    tolerance), and the lower one, first in file order, was taken: here the proposal took t2
    (IoU 0.59999999) over t0 (0.6), and t2's own proposal then found it matched (2 tp scored 1,
    where the scorer before the tie rule got 2)."""
    p = box(0, 0, 100, 100)
    t0 = box(0, 0, 100, 60)  # IoU 0.6
    t1 = box(0, 0, 60 - 5e-7, 100)  # 0.599999995: tied with t0 and with t2
    t2 = box(0, 40, 100, 100 - 1e-6)  # 0.59999999: tied with t1, 1.7e-8 below t0
    q = box(0, 40, 100, 100)  # t2's own proposal (IoU 0.2 with t0, 0.43 with t1)
    cfg = ScoreConfig(min_truth_area=0)
    assert score_image([t2, t0, t1], [p, q], cfg) == reference_score([t2, t0, t1], [p, q], cfg) \
        == (2, 0, 1)
    # (within the tolerance of the highest, the first in file order still takes it: t1, so
    # t0's own proposal finds t0 free)
    assert score_image([t1, t0, t2], [p, t0], cfg) == (2, 0, 1)


def test_duplicates_empty_tiles_and_small_truth():
    t = [box(0, 0, 10, 10), box(20, 0, 30, 10)]
    assert score_image(t, [t[0], t[0], t[1]]) == (2, 1, 0)
    assert score_image(t, []) == (0, 0, 2)
    assert score_image([], t) == (0, 2, 0)
    assert score_image([], []) == (0, 0, 0)
    tiny = [box(0, 0, 4, 5)]  # area 20 <= 20: dropped from the truth
    assert score_image(tiny, tiny) == (0, 1, 0)
    assert score_image(tiny, tiny, ScoreConfig(min_truth_area=0)) == (1, 0, 0)
    # the best unmatched truth is taken, even if an earlier proposal took the better one
    a, b = box(0, 0, 10, 10), box(6, 0, 16, 10)
    p = box(3, 0, 13, 10)
    assert score_image([a, b], [p, box(0, 0, 10, 10)]) == reference_score([a, b], [p, a])


def test_images_in_only_one_file():
    truth = {"a": [box(0, 0, 10, 10)], "b": [box(0, 0, 10, 10)], "e": []}
    props = {"a": [box(0, 0, 10, 10)], "c": [box(0, 0, 10, 10), box(20, 0, 30, 10)]}
    r = score(truth, props)
    assert (r.tp, r.fp, r.fn) == (1, 2, 1)
    assert r.images_without_proposals == 2 and r.images_without_truth == 1
    assert [d["image_id"] for d in r.per_image] == ["a", "b", "c", "e"]
    assert r.f1 == pytest.approx(2 * (1 / 3) * 0.5 / (1 / 3 + 0.5))
    j = r.to_json()
    assert {"tp", "fp", "fn", "precision", "recall", "f1", "per_image"} <= set(j)
    empty = score({}, {})
    assert (empty.precision, empty.recall, empty.f1) == (0.0, 0.0, 0.0)


def test_numba_areas_match_geos():
    rng = np.random.default_rng(3)
    for _ in range(100):
        grid = (rng.random((14, 14)) < 0.6).astype(np.uint8)
        props = np.array(polygonize_labels(grid), dtype=object)
        if props.size == 0:
            continue
        t = shapely.Polygon(rng.uniform(-2, 16, (7, 2))).convex_hull
        if rng.random() < 0.4:
            t = t.difference(box(5, 5, 8, 8))
        if t.geom_type != "Polygon":
            continue
        truth = np.array([t], dtype=object)
        pi = np.arange(props.size)
        ours = intersection_areas(truth, props, pi, np.zeros_like(pi))
        ref = shapely.area(shapely.intersection(props, t))
        np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-9)


def test_numba_areas_of_a_polygon_with_a_slanted_edge_fall_back_to_geos():
    # axis-aligned edges and one slanted one: no rectangle decomposition, GEOS's area instead
    slanted, square = Polygon([(0, 0), (10, 0), (10, 10), (0, 5)]), box(0, 0, 10, 10)
    one = np.zeros(1, np.int64)
    for t, p in ((slanted, square), (square, slanted)):
        got = intersection_areas(np.array([t], dtype=object), np.array([p], dtype=object), one,
                                 one)
        assert got.tolist() == [75.0]


@pytest.mark.parametrize("bad", [{"iou_threshold": 0.0}, {"iou_threshold": 1.5},
                                 {"min_truth_area": float("inf")}, {"min_truth_area": -1.0}])
def test_score_config_refuses_what_would_score_nonsense(bad):
    # a threshold of 0 counts every disjoint pair in the candidates; inf drops every truth
    with pytest.raises(ValueError, match="--" + next(iter(bad)).replace("_", "-")):
        ScoreConfig(**bad)


def test_partial_results_merge_in_image_order():
    from postproc.score import merge_results

    sq = box(0, 0, 10, 10)
    parts = [score({"a": [sq], "c": [sq]}, {"a": [sq]}), score({"b": [sq]}, {"b": []})]
    r = merge_results(parts)
    assert [d["image_id"] for d in r.per_image] == ["a", "b", "c"]
    assert (r.tp, r.fp, r.fn) == (1, 0, 2)


def write(path, text):
    path.write_text(text)
    return path


def test_truth_csv_with_z_coordinates_empty_tiles_and_invalid_polygons(tmp_path):
    p = write(tmp_path / "truth.csv",
              "ImageId,BuildingId,PolygonWKT_Pix,PolygonWKT_Geo\n"
              'img1,1,"POLYGON ((0 0 0,10 0 0,10 10 0,0 10 0,0 0 0))","POLYGON EMPTY"\n'
              'img1,2,"POLYGON ((20 0,30 10,30 0,20 10,20 0))",x\n'  # a bow tie
              "img2,-1,POLYGON EMPTY,POLYGON EMPTY\n")
    t = read_truth_csv(p)
    assert set(t.polygons) == {"img1", "img2"} and t.polygons["img2"] == []
    assert t.polygons["img1"][0].equals(box(0, 0, 10, 10))
    assert not t.polygons["img1"][0].has_z
    assert t.repaired == 1 and t.polygons["img1"][1].is_valid


@pytest.mark.parametrize("body, match", [
    ("img1,1,\"POLYGON ((0 0, 1 0, 1 1, 0 0))\",0.5\nimg1,2,\"POLYGON ((0 0, 1\",0.5\n",
     ":3: malformed WKT"),
    ("img1,1,POLYGON ((0 0, 1 0, 1 1, 0 0)),0.5\n", ":2: 7 fields where the header has 4"),
    ("img1,1,\"POLYGON ((0 0, 1 0, 1 1, 0 0))\"\n", ":2: expected 4 fields"),
    ("img1,1,\"POINT (1 1)\",0.5\n", ":2: Point is not a footprint"),
    ("img1,x,\"POLYGON ((0 0, 1 0, 1 1, 0 0))\",0.5\n", ":2: BuildingId"),
    ("img1,inf,\"POLYGON ((0 0, 1 0, 1 1, 0 0))\",0.5\n", ":2: BuildingId 'inf'"),
    ("img1,1e999,\"POLYGON ((0 0, 1 0, 1 1, 0 0))\",0.5\n", ":2: BuildingId"),
    ("img1,1,\"POLYGON ((0 0, 1 0, 1 1, 0 0))\",high\n", ":2: Confidence"),
    (",1,\"POLYGON ((0 0, 1 0, 1 1, 0 0))\",0.5\n", ":2: empty ImageId"),
])
def test_malformed_proposal_rows_name_the_line(tmp_path, body, match):
    p = write(tmp_path / "props.csv", "ImageId,BuildingId,PolygonWKT_Pix,Confidence\n" + body)
    with pytest.raises(CsvError, match=match) as e:
        read_proposal_csv(p)
    assert "props.csv" in str(e.value)


def test_empty_and_headerless_files(tmp_path):
    header_only = write(tmp_path / "h.csv", "ImageId,BuildingId,PolygonWKT_Pix,Confidence\n")
    assert read_proposal_csv(header_only).polygons == {}
    with pytest.raises(CsvError, match="empty file"):
        read_proposal_csv(write(tmp_path / "e.csv", ""))
    with pytest.raises(CsvError, match="header lacks Confidence"):
        read_proposal_csv(write(tmp_path / "t.csv", "ImageId,BuildingId,PolygonWKT_Pix\n"))
    with pytest.raises(CsvError, match="not found"):
        read_truth_csv(tmp_path / "missing.csv")


def test_a_degenerate_proposal_is_a_false_positive(tmp_path):
    """A proposal row whose polygon has no area (it repairs to nothing) matched nothing: it is a
    false positive, as in SpaceNet's scorer. It was dropped, and precision read 1.0."""
    t = write(tmp_path / "t.csv", "ImageId,BuildingId,PolygonWKT_Pix,PolygonWKT_Geo\n"
                                  'img1,1,"POLYGON ((0 0,10 0,10 10,0 10,0 0))",x\n')
    p = write(tmp_path / "p.csv", "ImageId,BuildingId,PolygonWKT_Pix,Confidence\n"
                                  'img1,1,"POLYGON ((50 50,60 50,70 50,50 50))",1\n'
                                  'img1,2,"POLYGON ((0 0,10 0,10 10,0 10,0 0))",1\n')
    r = score(read_truth_csv(t).polygons, read_proposal_csv(p).polygons)
    assert (r.tp, r.fp, r.fn) == (1, 1, 0)
    out = tmp_path / "s.json"
    assert score_main(["--truth", str(t), "--proposals", str(p), "--json", str(out),
                       "--workers", "1"]) == 0
    js = json.loads(out.read_text())
    assert (js["tp"], js["fp"], js["fn"], js["repaired_polygons"]) == (1, 1, 0, 1)


def test_an_empty_wkt_with_a_building_id_marks_the_tile_and_scores_nothing(tmp_path):
    """``POLYGON EMPTY`` with a BuildingId other than -1 (0 or 1 as some writers mark an empty
    tile) reads as the -1 row does: the tile is present, with no polygon. As solaris scores it
    (empty geometries have area 0: neither a proposal nor a truth polygon there); SpaceNet's
    evaluateScene.py drops only -1 rows and would call this proposal row a false positive, which
    scores a file's way of marking an empty tile. Unlike a degenerate proposal (above), it holds
    no building."""
    t = write(tmp_path / "t.csv", "ImageId,BuildingId,PolygonWKT_Pix,PolygonWKT_Geo\n"
                                  'img1,1,"POLYGON ((0 0,10 0,10 10,0 10,0 0))",x\n'
                                  "img2,1,POLYGON EMPTY,POLYGON EMPTY\n")
    p = write(tmp_path / "p.csv", "ImageId,BuildingId,PolygonWKT_Pix,Confidence\n"
                                  'img1,1,"POLYGON ((0 0,10 0,10 10,0 10,0 0))",1\n'
                                  "img2,0,POLYGON EMPTY,0\n"
                                  "img2,7,POLYGON EMPTY,0.9\n")
    truth, props = read_truth_csv(t), read_proposal_csv(p)
    assert truth.polygons["img2"] == [] and props.polygons["img2"] == []
    assert props.confidence["img2"] == [] and props.rows == 3
    for index in (index_truth_csv(t), index_proposal_csv(p)):  # the scorer's reader
        assert "img2" in index and index["img2"] == []
    r = score(truth.polygons, props.polygons)
    assert (r.tp, r.fp, r.fn) == (1, 0, 0)
    assert r.images_without_proposals == 0 and r.images_without_truth == 0
    assert [d["image_id"] for d in r.per_image] == ["img1", "img2"]


def test_score_json_holds_the_inputs_settings_and_every_image(tmp_path):
    """--json is what a report or a later comparison reads: the files and settings that gave the
    figures, and one entry per image. The proposal of img1 has IoU 0.6 exactly: a true positive
    at the default threshold, a false positive only with both --iou-threshold 0.6 and --strict."""
    t = write(tmp_path / "t.csv", "ImageId,BuildingId,PolygonWKT_Pix,PolygonWKT_Geo\n"
                                  'img1,1,"POLYGON ((0 0,10 0,10 10,0 10,0 0))",x\n'
                                  'img2,1,"POLYGON ((0 0,10 0,10 10,0 10,0 0))",x\n')
    p = write(tmp_path / "p.csv", "ImageId,BuildingId,PolygonWKT_Pix,Confidence\n"
                                  'img1,1,"POLYGON ((0 0,10 0,10 6,0 6,0 0))",1\n'
                                  'img3,1,"POLYGON ((0 0,10 0,10 10,0 10,0 0))",1\n')
    out = tmp_path / "s.json"
    assert score_main(["--truth", str(t), "--proposals", str(p), "--json", str(out),
                       "--iou-threshold", "0.6", "--strict", "--min-truth-area", "0",
                       "--workers", "1"]) == 0
    js = json.loads(out.read_text())
    assert (js["truth_file"], js["proposal_file"]) == (str(t), str(p))
    assert (js["iou_threshold"], js["strict"], js["min_truth_area"]) == (0.6, True, 0.0)
    assert js["per_image"] == [{"image_id": "img1", "tp": 0, "fp": 1, "fn": 1},
                               {"image_id": "img2", "tp": 0, "fp": 0, "fn": 1},
                               {"image_id": "img3", "tp": 0, "fp": 1, "fn": 0}]
    assert (js["tp"], js["fp"], js["fn"], js["f1"]) == (0, 2, 2, 0.0)
    assert (js["images_without_proposals"], js["images_without_truth"]) == (1, 1)
    assert score_main(["--truth", str(t), "--proposals", str(p), "--json", str(out),
                       "--workers", "1"]) == 0
    assert json.loads(out.read_text())["per_image"][0] == {"image_id": "img1", "tp": 1, "fp": 0,
                                                           "fn": 0}


def test_score_workers_below_one_are_refused(tmp_path):
    t = write(tmp_path / "t.csv", "ImageId,BuildingId,PolygonWKT_Pix,PolygonWKT_Geo\n")
    with pytest.raises(ValueError, match="--workers 0 must be at least 1"):
        score_main(["--truth", str(t), "--proposals", str(t), "--workers", "0"])


def test_score_refuses_proposals_of_another_split(tmp_path):
    """Proposals sharing no ImageId with the truth (val proposals against test truth) scored
    F1 0 with exit 0, as if the model were useless; postproc.tune refuses the same mistake."""
    t = write(tmp_path / "t.csv", "ImageId,BuildingId,PolygonWKT_Pix,PolygonWKT_Geo\n"
                                  'img1,1,"POLYGON ((0 0,10 0,10 10,0 10,0 0))",x\n')
    p = write(tmp_path / "p.csv", "ImageId,BuildingId,PolygonWKT_Pix,Confidence\n"
                                  'img9,1,"POLYGON ((0 0,10 0,10 10,0 10,0 0))",1\n')
    with pytest.raises(ValueError, match="no ImageId in common"):
        score_main(["--truth", str(t), "--proposals", str(p), "--workers", "1"])
    empty = write(tmp_path / "e.csv", "ImageId,BuildingId,PolygonWKT_Pix,Confidence\n")
    assert score_main(["--truth", str(t), "--proposals", str(empty), "--workers", "1"]) == 0



def test_a_ctrl_c_that_numba_reported_as_a_system_error_is_one_line_not_a_rank_failure(
        tmp_path, monkeypatch, capsys):
    """A press while numba boxed the areas of the IoU kernel (in this process with --workers 1)
    came out as a SystemError with the KeyboardInterrupt in its chain, which main took for its
    images' failure: it went on into dist.init to agree on it, where under torchrun it waited
    for the interrupted peers (they never come) until the timeout, and then left as a
    SystemError traceback (``raise error from None`` dropped the KeyboardInterrupt from its
    chain). Here dist.init fails as that timeout does."""
    import signal

    from postproc import iou
    from postproc.cli import exit_on_error
    from trainer import dist

    t = write(tmp_path / "t.csv", "ImageId,BuildingId,PolygonWKT_Pix,PolygonWKT_Geo\n"
                                  'img1,1,"POLYGON ((0 0,10 0,10 10,0 10,0 0))",x\n')
    p = write(tmp_path / "p.csv", "ImageId,BuildingId,PolygonWKT_Pix,Confidence\n"
                                  'img1,1,"POLYGON ((0 0,10 0,10 10,0 10,0 0))",1\n')
    calls, joined = [], []

    def pressed(*args):
        calls.append(1)
        numba_interrupt()

    def init_the_peers_never_join(env=None, *args, **kwargs):
        joined.append(1)
        raise RuntimeError("Timed out waiting for the other ranks")

    monkeypatch.setattr(iou, "pair_intersection_areas", pressed)
    monkeypatch.setattr(dist, "init", init_the_peers_never_join)
    handler = signal.getsignal(signal.SIGINT)
    try:
        rc = exit_on_error(lambda: score_main(["--truth", str(t), "--proposals", str(p),
                                               "--workers", "1"]))
    finally:
        signal.signal(signal.SIGINT, handler)  # (pytest's own Ctrl-C)
    assert rc == 130 and calls == [1] and joined == []
    assert capsys.readouterr().err.splitlines()[-1] == "interrupted"


def test_score_refuses_a_truth_csv_with_no_images(tmp_path):
    """(the truth.csv of a split prepare left empty scored F1 0 with exit 0, against any
    proposals: a figure for nothing; postproc.tune refuses it)"""
    t = write(tmp_path / "t.csv", "ImageId,BuildingId,PolygonWKT_Pix,PolygonWKT_Geo\n")
    for body in ("", 'img9,1,"POLYGON ((0 0,10 0,10 10,0 10,0 0))",1\n'):
        p = write(tmp_path / "p.csv", "ImageId,BuildingId,PolygonWKT_Pix,Confidence\n" + body)
        with pytest.raises(ValueError, match=f"--truth {t}: no images in the truth CSV"):
            score_main(["--truth", str(t), "--proposals", str(p), "--workers", "1"])


SQUARE = '"POLYGON ((0 0,10 0,10 10,0 10,0 0))"'
OTHER = '"POLYGON ((50 50,60 50,60 60,50 60,50 50))"'


def test_several_aois_get_their_own_f1_and_the_contests_mean(tmp_path, capsys):
    """The SpaceNet-2 leaderboard averaged the cities' F1s; one F1 pooled over all images weighs
    a city by its buildings, so a user comparing with it needs each AOI's figures and their mean.
    Vegas: 3 truth, 3 found (F1 1); Khartoum: 1 truth, 1 found of 3 proposals (F1 0.5). Pooled:
    TP 4, FP 2, FN 0 (F1 0.8); the contest's mean is 0.75."""
    truth = ["ImageId,BuildingId,PolygonWKT_Pix,PolygonWKT_Geo"]
    props = ["ImageId,BuildingId,PolygonWKT_Pix,Confidence"]
    for image_id in ("AOI_2_Vegas_img1", "AOI_2_Vegas_img2", "AOI_2_Vegas_img3"):
        truth.append(f"{image_id},1,{SQUARE},x")
        props.append(f"{image_id},1,{SQUARE},1")
    truth.append(f"AOI_5_Khartoum_img7,1,{SQUARE},x")
    props += [f"AOI_5_Khartoum_img7,1,{SQUARE},1", f"AOI_5_Khartoum_img7,2,{OTHER},1",
              f"AOI_5_Khartoum_img8,1,{OTHER},1"]
    t = write(tmp_path / "t.csv", "\n".join(truth) + "\n")
    p = write(tmp_path / "p.csv", "\n".join(props) + "\n")
    out = tmp_path / "s.json"
    assert score_main(["--truth", str(t), "--proposals", str(p), "--json", str(out),
                       "--workers", "1"]) == 0
    js = json.loads(out.read_text())
    assert (js["tp"], js["fp"], js["fn"], js["f1"]) == (4, 2, 0, pytest.approx(0.8))
    assert {k: (a["tp"], a["fp"], a["fn"], a["images"]) for k, a in js["per_aoi"].items()} == {
        "AOI_2_Vegas": (3, 0, 0, 3), "AOI_5_Khartoum": (1, 2, 0, 2)}
    assert js["per_aoi"]["AOI_5_Khartoum"]["f1"] == pytest.approx(0.5)
    assert js["aoi_mean_f1"] == pytest.approx(0.75)
    lines = capsys.readouterr().out.splitlines()
    assert lines[-3:] == ["  AOI_2_Vegas: F1 1.0000  TP 3  FP 0  FN 0  (3 images)",
                          "  AOI_5_Khartoum: F1 0.5000  TP 1  FP 2  FN 0  (2 images)",
                          "mean of the AOIs' F1s 0.7500 (how the SpaceNet-2 contest combined its "
                          "cities)"]


@pytest.mark.parametrize("image_id", [
    "img1", "Atlanta_nadir7_catid_1030010003D22F00_732701_3730989", "AOI_x_Vegas_img1",
    "AOI_2_Vegas"])
def test_imageids_not_named_after_an_aoi_get_no_aoi_figures(image_id):
    r = score({image_id: [shapely.box(0, 0, 10, 10)]}, {image_id: [shapely.box(0, 0, 10, 10)]})
    assert r.per_aoi() == {} and r.to_json()["aoi_mean_f1"] is None
    assert r.to_json()["f1"] == 1.0
