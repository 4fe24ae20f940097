"""PolygonIndex (the scorer's flat-memory reader) against the eager reader, and scoring on it."""

from __future__ import annotations

import json
import os
import signal

import pytest

from postproc import score
from postproc.csvio import (
    CsvError,
    PolygonIndex,
    index_proposal_csv,
    index_truth_csv,
    read_polygon_csv,
    read_proposal_csv,
    read_truth_csv,
)
from postproc.score import ScoreConfig, score_parallel

SQ = "POLYGON (({x} 0, {y} 0, {y} 10, {x} 10, {x} 0))"
TRUTH = ("\ufeffImageId,BuildingId,PolygonWKT_Pix,PolygonWKT_Geo\r\n"  # BOM and CRLF
         f'a,1,"{SQ.format(x=0, y=10)}",x\r\n'
         'b,1,"POLYGON ((20 0 0,30 10 0,30 0 0,20 10 0,20 0 0))",x\r\n'  # a bow tie, z
         "\r\n"  # a blank line
         f'a,2,"{SQ.format(x=20, y=30)}",x\r\n'  # a's rows are not adjacent
         "c,-1,POLYGON EMPTY,POLYGON EMPTY\r\n"
         f'b,2,"{SQ.format(x=40, y=50)}","multi\r\nline"\r\n'  # a quoted line break
         f'b,3,"{SQ.format(x=60, y=70)}",x\r\n')
PROPS = ("ImageId,BuildingId,PolygonWKT_Pix,Confidence\n"
         f'b,1,"{SQ.format(x=41, y=50)}",0.9\n'
         f'a,1,"{SQ.format(x=21, y=30)}",0.8\n'
         "\n"
         f'a,2,"{SQ.format(x=0, y=9)}",0.7\n'
         f'd,1,"{SQ.format(x=0, y=10)}",0.5\n'
         f'a,3,"{SQ.format(x=100, y=110)}",0.6\n')


def write(path, text: str):
    path.write_bytes(text.encode("utf-8"))
    return path


@pytest.mark.parametrize("text, proposals", [(TRUTH, False), (PROPS, True)])
def test_index_gives_what_the_eager_reader_gives(tmp_path, text, proposals):
    p = write(tmp_path / "f.csv", text)
    eager = read_polygon_csv(p, proposals)
    index = PolygonIndex(p, proposals)
    assert list(index) == list(eager.polygons) and len(index) == len(eager.polygons)
    assert index.rows == eager.rows
    for image_id, polys in eager.polygons.items():
        got = index[image_id]
        assert len(got) == len(polys) and all(g.equals(e) for g, e in zip(got, polys,
                                                                           strict=True))
    assert index.repaired == eager.repaired
    assert "zz" not in index and index.get("zz", []) == []


def test_index_errors_name_the_line(tmp_path):
    head = "ImageId,BuildingId,PolygonWKT_Pix,Confidence\n"
    ok = f'a,1,"{SQ.format(x=0, y=10)}",1\n'
    with pytest.raises(CsvError, match=r"p\.csv:3: Confidence"):
        index_proposal_csv(write(tmp_path / "p.csv", head + ok + 'a,2,"POLYGON EMPTY",hi\n'))
    with pytest.raises(CsvError, match=r"p\.csv:3: 5 fields"):
        index_proposal_csv(write(tmp_path / "p.csv", head + ok + "a,2,x,y,1\n"))
    with pytest.raises(CsvError, match="empty file"):
        index_truth_csv(write(tmp_path / "e.csv", ""))
    with pytest.raises(CsvError, match="not found"):
        index_truth_csv(tmp_path / "missing.csv")
    with pytest.raises(CsvError, match="malformed"):  # CR-only line ends: refused, not misread
        index_proposal_csv(write(tmp_path / "cr.csv", (head + ok).replace("\n", "\r")))
    # WKT is parsed when the image is asked for, and the error names the line
    index = index_proposal_csv(write(tmp_path / "w.csv", head + ok + "b,1,\"POLYGON ((0\",1\n"
                                     + ok.replace("a,1", "a,2")))
    assert len(index["a"]) == 2
    with pytest.raises(CsvError, match=r"w\.csv:3: malformed WKT"):
        index["b"]


@pytest.mark.multiproc
@pytest.mark.timeout(120)
@pytest.mark.parametrize("workers", [1, 2])
def test_scoring_indexes_equals_scoring_tables(tmp_path, workers):
    t, p = write(tmp_path / "t.csv", TRUTH), write(tmp_path / "p.csv", PROPS)
    cfg = ScoreConfig(min_truth_area=0)
    tables = score.score(read_truth_csv(t).polygons, read_proposal_csv(p).polygons, cfg)
    ti, pi = index_truth_csv(t), index_proposal_csv(p)
    ids = sorted(set(ti) | set(pi))
    got = score_parallel(ti, pi, cfg, ids, workers)
    assert (got.tp, got.fp, got.fn) == (tables.tp, tables.fp, tables.fn) == (3, 2, 2)
    assert got.per_image == tables.per_image
    assert (got.images_without_proposals, got.images_without_truth) == (1, 1)
    assert got.repaired == 1  # the bow tie, counted in whichever worker parsed it


def test_score_cli_reports_repairs(tmp_path):
    t, p = write(tmp_path / "t.csv", TRUTH), write(tmp_path / "p.csv", PROPS)
    out = tmp_path / "s.json"
    assert score.main(["--truth", str(t), "--proposals", str(p), "--json", str(out),
                       "--workers", "1", "--min-truth-area", "0"]) == 0
    js = json.loads(out.read_text())
    assert (js["tp"], js["fp"], js["fn"], js["repaired_polygons"]) == (3, 2, 2, 1)


@pytest.mark.parametrize("reader", [read_polygon_csv, PolygonIndex])
@pytest.mark.parametrize("bad_line", [3, 302])
def test_a_byte_that_is_not_utf8_is_named_by_its_line(tmp_path, reader, bad_line):
    """(the eager reader decodes in 8 KB chunks: it named line 175 for 302, and "1: malformed
    header" for a bad byte early in a small file)"""
    rows = [f'a,{k},"{SQ.format(x=k, y=k + 1)}",0.5\n' for k in range(1, 400)]
    data = [r.encode() for r in ["ImageId,BuildingId,PolygonWKT_Pix,Confidence\n", *rows]]
    data[bad_line - 1] = data[bad_line - 1].replace(b"0.5", b"0.\xff5")
    p = tmp_path / "p.csv"
    p.write_bytes(b"".join(data))
    with pytest.raises(CsvError, match=rf"p\.csv:{bad_line}: not UTF-8 text"):
        reader(p, True)


def test_rows_that_are_not_polygons_of_a_tile(tmp_path):
    head = "ImageId,BuildingId,PolygonWKT_Pix,Confidence\n"
    p = write(tmp_path / "p.csv", head + f'a,1,"{SQ.format(x=0, y=10)}",0.9\n'
              "   \n"  # a line of blanks is a blank line, not a row
              f'a,-2,"{SQ.format(x=20, y=30)}",0.8\n')  # only -1 marks an empty tile
    for got in (read_proposal_csv(p).polygons, index_proposal_csv(p)):
        assert len(got["a"]) == 2
    bad = write(tmp_path / "n.csv", head + f'a,1,"{SQ.format(x=0, y=10)}",0.9\n'
                'a,2,"POLYGON ((0 0, nan 0, 1 1, 0 0))",0.8\n'
                'a,3,"POLYGON ((0 0, 1 0, inf 1, 0 0))",0.7\n')
    with pytest.raises(CsvError, match=r"n\.csv:3: non-finite"):  # the first such line
        read_proposal_csv(bad)


def test_proposal_rows_number_buildings_from_one():
    from shapely.geometry import box

    from postproc.csvio import proposal_rows

    rows = proposal_rows("t", [box(0, 0, 2, 2), box(5, 5, 7, 7)], [0.9, 0.4])
    assert [r[:2] for r in rows] == [["t", "1"], ["t", "2"]] and rows[1][3] == "0.4"
    assert proposal_rows("t", [], []) == [["t", "-1", "POLYGON EMPTY", "0"]]


def _rings_as_the_spacenet2_scorer_reads_them(wkt: str) -> list[list[tuple[float, float]]]:
    """The ring parsing of SpaceNet-2's scorer (BuildingVisualizer.java, Polygon(String) and
    Ring(String), in SpaceNetChallenge/BuildingDetectors_Round2): rings split on "),(" only."""
    body = wkt[wkt.index("(("):wkt.index("))") + 2]
    body = body.replace("),(", "x").replace(")", "").replace("(", "")
    return [[(float(p.strip().split(" ")[0]), float(p.strip().split(" ")[1]))
             for p in ring.split(",")] for ring in body.split("x")]


def test_proposal_rings_are_spelled_as_spacenet_csvs_so_its_scorer_reads_holes():
    """A footprint around a courtyard: its hole was written after "), (" (GEOS's spelling), which
    the SpaceNet-2 scorer reads as one ring (the outline and the hole glued together), so it
    scored our TP as a FP and a FN; rings are now joined by "),(" as in SpaceNet's CSVs."""
    import shapely
    from shapely.geometry import Polygon

    from postproc.csvio import proposal_rows

    yard = Polygon([(45, 5), (45, 45), (5, 45), (5, 5)], [[(10, 10), (10, 40), (40, 40), (40, 10)]])
    (row,) = proposal_rows("t", [yard], [0.9])
    rings = _rings_as_the_spacenet2_scorer_reads_them(row[2])
    assert [len(r) for r in rings] == [5, 5]
    assert Polygon(rings[0], rings[1:]).equals(yard)
    assert shapely.from_wkt(row[2]).equals(yard)  # still plain WKT for GEOS, OGR, solaris


_SCORE_CHUNK = score._score_chunk


def _chunk_under_ctrl_c(ids: list[str]) -> score.ScoreResult:
    os.kill(os.getpid(), signal.SIGINT)  # the terminal's Ctrl-C reaches the worker too
    return _SCORE_CHUNK(ids)


@pytest.mark.multiproc
@pytest.mark.timeout(120)
def test_score_workers_leave_ctrl_c_to_the_parent(tmp_path, monkeypatch):
    """A worker that took the SIGINT died with a traceback (or hung the command's exit after
    'interrupted'); the parent, which stops the pool, is the one to handle it."""
    t, p = write(tmp_path / "t.csv", TRUTH), write(tmp_path / "p.csv", PROPS)
    monkeypatch.setattr(score, "CHUNK_IMAGES", 1)
    monkeypatch.setattr(score, "_score_chunk", _chunk_under_ctrl_c)  # forked: the workers see it
    ti, pi = index_truth_csv(t), index_proposal_csv(p)
    try:
        got = score_parallel(ti, pi, ScoreConfig(min_truth_area=0), sorted(set(ti) | set(pi)), 2)
    except KeyboardInterrupt:
        pytest.fail("a score worker took the Ctrl-C")
    assert (got.tp, got.fp, got.fn) == (3, 2, 2)
