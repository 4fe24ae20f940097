"""The two commands end to end: output formats, workers, bad input, and torchrun."""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import csv
import errno
import json
import multiprocessing as mp
import os
import queue
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import IO

import numpy as np
import pytest
import shapely
from affine import Affine
from pp_helpers import (
    REPO,
    STDOUT_ENDS,
    TRANSFORM_4326,
    check_stdout_failure,
    full_disk_at_commit,
    make_pred_dir,
    tile_meta,
    unbuffered_stdout,
)
from proc_helpers import (
    first_failure,
    interrupt_when,
    kill_tree,
    torchrun_cmd,
    worker_env,
    worker_exit_codes,
)

import postproc.geojson
from benchmarks.proctree import tree_pids
from dataio import atomic
from postproc import polygonize, pushmetrics, render, runner, score, tune
from postproc.cli import exit_on_error
from postproc.pools import close_pool, ignore_sigint
from postproc.predio import write_pred_shard
from postproc.runner import make_pool
from trainer.dist import RankError


def run_main(main, argv: list[str]) -> int:
    return exit_on_error(lambda: main(argv))


def read_rows(path: Path) -> list[list[str]]:
    with open(path, newline="") as f:
        return list(csv.reader(f))


def test_help_exits_zero(capsys):
    for main in (polygonize.main, score.main):
        with pytest.raises(SystemExit) as e:
            main(["--help"])
        assert e.value.code == 0
    assert "--pred" in capsys.readouterr().out


_NO_TORCH = """
import sys
from postproc import polygonize, score, tune
from postproc.cli import exit_on_error

pred, truth, out, run = sys.argv[1:]
for main, argv in (
        (polygonize.main, ["--pred", pred, "--out", out, "--workers", "1"]),
        (score.main, ["--truth", truth, "--proposals", out, "--workers", "1"]),
        (tune.main, ["--pred", pred, "--truth", truth, "--run-dir", run, "--workers", "1",
                     "--building-thresholds", "0.5", "--footprint-thresholds", "0.5",
                     "--grow-radii", "0", "--min-polygon-areas", "0"])):
    assert exit_on_error(lambda: main(argv)) == 0, main
print("torch modules:", sorted(m for m in sys.modules if m.split(".")[0] == "torch")[:3])
"""


@pytest.mark.timeout(180)  # compiles the kernels when the numba cache is cold
def test_one_process_commands_do_not_import_torch(tmp_path):
    """A plain ``python -m postproc.score`` (no torchrun) has no process group and needs no torch:
    trainer.dist, which main imports, imported it at its top (~1.7 s of each command's start)."""
    pred, truth = make_pred_dir(tmp_path, shards=1, per_shard=2, size=64, buildings=3)
    (tmp_path / "run").mkdir()
    r = subprocess.run([sys.executable, "-c", _NO_TORCH, str(pred), str(truth),
                        str(tmp_path / "p.csv"), str(tmp_path / "run")],
                       cwd=REPO, env=worker_env(), capture_output=True, text=True, timeout=170)
    assert r.returncode == 0, r.stderr[-3000:]
    assert (tmp_path / "p.csv").exists() and (tmp_path / "run" / "postproc.json").exists()
    assert r.stdout.splitlines()[-1] == "torch modules: []", r.stdout[-500:]


@pytest.mark.multiproc  # worker pools of 2 processes
@pytest.mark.timeout(180)
def test_polygonize_then_score(pred_dir, tmp_path, capsys):
    pred, truth = pred_dir
    out1, out2 = tmp_path / "p1.csv", tmp_path / "p2.csv"
    gj = tmp_path / "geojson"
    assert run_main(polygonize.main, ["--pred", str(pred), "--out", str(out1), "--workers", "1",
                                      "--geojson", str(gj)]) == 0
    assert run_main(polygonize.main, ["--pred", str(pred), "--out", str(out2),
                                      "--workers", "2"]) == 0
    assert out1.read_bytes() == out2.read_bytes()  # the pool changes nothing
    rows = read_rows(out1)
    assert rows[0] == ["ImageId", "BuildingId", "PolygonWKT_Pix", "Confidence"]
    ids = [r[0] for r in rows[1:]]
    assert len(set(ids)) == 12 and ids == sorted(ids, key=ids.index)  # grouped per tile
    for image_id in set(ids):
        mine = [r for r in rows[1:] if r[0] == image_id]
        confs = [float(r[3]) for r in mine]
        assert confs == sorted(confs, reverse=True)
    for image_id in ("AOI_9_Test_img1", "AOI_9_Test_img101", "AOI_9_Test_img201"):  # empty
        assert [r for r in rows[1:] if r[0] == image_id] == [[image_id, "-1", "POLYGON EMPTY",
                                                              "0"]]
    doc = json.loads((gj / "AOI_9_Test_img0.geojson").read_text())
    assert doc["type"] == "FeatureCollection" and "crs" not in doc  # EPSG:4326: RFC 7946
    g = shapely.geometry.shape(doc["features"][0]["geometry"])
    assert g.is_valid and -115.2 < g.centroid.x < -115.199 and 36.199 < g.centroid.y < 36.2
    assert len(list(gj.glob("*.geojson"))) == 12

    js = tmp_path / "score.json"
    assert run_main(score.main, ["--truth", str(truth), "--proposals", str(out1),
                                 "--json", str(js), "--workers", "2"]) == 0
    result = json.loads(js.read_text())
    assert result["f1"] >= 0.95 and len(result["per_image"]) == 12
    assert "F1" in capsys.readouterr().out


def test_a_shard_that_is_not_whole_chunks_loses_no_tile(tmp_path, capsys):
    """5 tiles per shard are a chunk of 4 and one of 1: the last one must reach the CSV too."""
    pred, _ = make_pred_dir(tmp_path, shards=2, per_shard=5, size=64, buildings=3)
    out = tmp_path / "p.csv"
    assert run_main(polygonize.main, ["--pred", str(pred), "--out", str(out),
                                      "--workers", "1"]) == 0
    ids = {r[0] for r in read_rows(out)[1:]}
    assert ids == {f"AOI_9_Test_img{100 * s + t}" for s in range(2) for t in range(5)}
    assert capsys.readouterr().out.startswith("10 tiles, ")


def _snapshot(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir()) if p.is_file()}


def test_geojson_dir_is_replaced_whole_after_the_csv(pred_dir, tmp_path, capsys):
    pred, _ = pred_dir
    out, gj = tmp_path / "p.csv", tmp_path / "geojson"
    base = ["--out", str(out), "--geojson", str(gj), "--workers", "1", "--no-tuned"]
    # the user's own files in DIR: never removed, whatever the runs publish
    gj.mkdir()
    mine = {"buildings_AOI_9_Test_img0.geojson": b'{"type": "FeatureCollection"}',
            "notes.geojson": b"{}", "notes.txt": b"x"}
    for name, data in mine.items():
        (gj / name).write_bytes(data)
    assert run_main(polygonize.main, ["--pred", str(pred), *base]) == 0
    before, csv_before = _snapshot(gj), out.read_bytes()
    assert len(_tiles(gj)) == 12 and all(before[name] == data for name, data in mine.items())
    # other settings, and the last shard is truncated: the run fails after writing GeoJSON for
    # the tiles of the first shards; neither the CSV nor the directory may change
    bad = tmp_path / "bad"
    bad.mkdir()
    for shard in sorted(pred.glob("pred-*.tar")):
        (bad / shard.name).write_bytes(shard.read_bytes())
    last = sorted(bad.glob("pred-*.tar"))[-1]
    last.write_bytes(last.read_bytes()[:3000])
    assert run_main(polygonize.main, ["--pred", str(bad), *base,
                                      "--min-polygon-area", "1e9"]) == 2
    assert last.name in capsys.readouterr().err
    assert out.read_bytes() == csv_before and _snapshot(gj) == before
    # a run over fewer tiles leaves no GeoJSON of the earlier run's other tiles
    one = tmp_path / "one"
    one.mkdir()
    first = sorted(pred.glob("pred-*.tar"))[0]
    (one / first.name).write_bytes(first.read_bytes())
    assert run_main(polygonize.main, ["--pred", str(one), *base]) == 0
    ids = {r[0] for r in read_rows(out)[1:]}
    assert len(ids) == 4
    assert _tiles(gj) == sorted(f"{k}.geojson" for k in ids)
    assert all(_snapshot(gj)[f"{k}.geojson"] == before[f"{k}.geojson"] for k in ids)
    assert all((gj / name).read_bytes() == data for name, data in mine.items())


def test_rows_go_most_confident_first_and_the_geojson_holds_the_same_buildings(tmp_path):
    """Per tile the CSV runs from the most confident polygon down (the contest's scorer takes
    them in file order), and the tile's GeoJSON features are those rows: BuildingId, confidence
    and outline. (One-hot predictions give every polygon confidence 1, where any order passes.)"""
    prob = np.zeros((64, 64, 3), np.uint8)
    prob[..., 0] = 255
    for (y, x), building in (((4, 4), 140), ((4, 40), 200), ((40, 20), 255)):  # raster order
        prob[y:y + 12, x:x + 12] = (255 - building, building, 0)
    key = "AOI_9_Test_img0"
    write_pred_shard(tmp_path / "pred" / "pred-000000.tar", [(key, prob, tile_meta(key, 64, 3))])
    out, gj = tmp_path / "p.csv", tmp_path / "gj"
    assert run_main(polygonize.main, ["--pred", str(tmp_path / "pred"), "--out", str(out),
                                      "--geojson", str(gj), "--workers", "1", "--no-tuned"]) == 0
    rows = read_rows(out)[1:]
    assert [r[1] for r in rows] == ["1", "2", "3"]
    assert [float(r[3]) for r in rows] == pytest.approx([1, 200 / 255, 140 / 255], abs=1e-5)
    t = Affine(*TRANSFORM_4326)
    feats = json.loads((gj / f"{key}.geojson").read_text())["features"]
    for row, feat in zip(rows, feats, strict=True):
        assert feat["properties"] == {"ImageId": key, "BuildingId": int(row[1]),
                                      "Confidence": pytest.approx(float(row[3]), abs=1e-5)}
        want = shapely.Polygon([t @ xy for xy in shapely.from_wkt(row[2]).exterior.coords])
        got = shapely.geometry.shape(feat["geometry"])
        assert got.symmetric_difference(want).area < 1e-6 * want.area


def _full_disk_at_the_csv_commit(monkeypatch):
    """polygonize's CSV fails at its commit (its last flush), as on a full disk."""
    full_disk_at_commit(monkeypatch, runner)


def test_a_csv_that_fails_to_commit_publishes_no_geojson(pred_dir, tmp_path, monkeypatch):
    """--geojson DIR is published only once the CSV is committed: when the CSV's last flush
    fails (a full disk), DIR keeps the earlier run's tiles, which match the CSV still there.
    Exit code 1, a failure of the run (it was 2, as for bad input: changed deliberately)."""
    pred, _ = pred_dir
    out, gj = tmp_path / "p.csv", tmp_path / "gj"
    argv = ["--pred", str(pred), "--out", str(out), "--geojson", str(gj), "--workers", "1",
            "--no-tuned"]
    assert run_main(polygonize.main, argv) == 0
    before, csv_before = _snapshot(gj), out.read_bytes()
    _full_disk_at_the_csv_commit(monkeypatch)
    assert run_main(polygonize.main, [*argv, "--min-polygon-area", "1e9"]) == 1
    assert out.read_bytes() == csv_before
    # NOTE: no .publishing mark either: it claimed a publish cut short, which never began
    assert _snapshot(gj) == before and ".publishing" not in before
    assert sorted(p.name for p in gj.iterdir()) == sorted(before)


def test_a_failed_csv_commit_leaves_a_new_geojson_dir_absent(pred_dir, tmp_path, monkeypatch):
    """A --geojson DIR that the run made goes again when the CSV's commit fails: the publish
    mark written before the commit held it there (DIR with only .publishing)."""
    pred, _ = pred_dir
    out, gj = tmp_path / "p.csv", tmp_path / "new" / "gj"
    _full_disk_at_the_csv_commit(monkeypatch)
    assert run_main(polygonize.main, ["--pred", str(pred), "--out", str(out), "--geojson",
                                      str(gj), "--workers", "1", "--no-tuned"]) == 1
    assert not (tmp_path / "new").exists() and not out.exists()


def test_a_failed_csv_commit_keeps_a_mark_that_still_tells_the_truth(pred_dir, tmp_path,
                                                                      monkeypatch):
    """The mark stays where it is still true after a failed commit: an earlier run's (its
    publish was cut short: DIR may mix two runs), and one whose CSV was replaced all the same
    (the rename done, the directory's sync failed: the new CSV beside the old tiles)."""
    pred, _ = pred_dir
    out, gj = tmp_path / "p.csv", tmp_path / "gj"
    argv = ["--pred", str(pred), "--out", str(out), "--geojson", str(gj), "--workers", "1",
            "--no-tuned"]
    assert run_main(polygonize.main, argv) == 0
    csv_before = out.read_bytes()
    (gj / ".publishing").write_text("an earlier run's\n")
    with monkeypatch.context() as m:
        _full_disk_at_the_csv_commit(m)
        assert run_main(polygonize.main, [*argv, "--min-polygon-area", "1e9"]) == 1
    assert out.read_bytes() == csv_before and (gj / ".publishing").exists()

    (gj / ".publishing").unlink()
    real = atomic.fsync_dir

    def eio_after_the_csv_rename(path: object, placed: object = None) -> None:
        if Path(path) == tmp_path:  # (the CSV's directory, after its rename)
            raise OSError(errno.EIO, "Input/output error")
        real(path, placed)

    monkeypatch.setattr(atomic, "fsync_dir", eio_after_the_csv_rename)
    assert run_main(polygonize.main, [*argv, "--min-polygon-area", "1e9"]) == 1
    assert out.read_bytes() != csv_before and (gj / ".publishing").exists()


def test_a_mark_whose_own_sync_fails_goes_before_the_csv_commit(pred_dir, tmp_path,
                                                                monkeypatch):
    """The publish mark's own write failing after its rename (EIO at DIR's sync), before the
    CSV's commit began: the CSV is not committed, and the mark, "a publish cut short", went
    unremoved (begin_publish was outside the clean-up), with a DIR the run made kept for it;
    merge then refused DIR. Now DIR goes as for a failed CSV commit."""
    pred, _ = pred_dir
    out, gj = tmp_path / "p.csv", tmp_path / "new" / "gj"
    real = atomic.fsync_dir

    def eio_at_dirs_sync(path: object, placed: object = None) -> None:
        if Path(path) == gj:  # (only the mark's: the tiles are synced in DIR/.partial)
            raise OSError(errno.EIO, "Input/output error")
        real(path, placed)

    monkeypatch.setattr(atomic, "fsync_dir", eio_at_dirs_sync)
    assert run_main(polygonize.main, ["--pred", str(pred), "--out", str(out), "--geojson",
                                      str(gj), "--workers", "1", "--no-tuned"]) == 1
    assert not out.exists() and not (tmp_path / "new").exists()


def test_an_out_link_that_cannot_be_followed_is_replaced_with_geojson_too(pred_dir, tmp_path):
    """--out a link that stat cannot follow (its target under a file: ENOTDIR) is replaced by
    the CSV, as a plain file's name is: with --geojson too. The failed-commit check looked
    at the link's target (os.stat) and exited 1 after the work, "Not a directory", where the
    run without --geojson wrote the CSV (a rename replaces the link, not its target)."""
    pred, _ = pred_dir
    (tmp_path / "a_file").write_text("mine\n")
    out, gj = tmp_path / "p.csv", tmp_path / "gj"
    for geojson in ([], ["--geojson", str(gj)]):
        out.unlink(missing_ok=True)
        out.symlink_to(tmp_path / "a_file" / "p.csv")
        assert run_main(polygonize.main, ["--pred", str(pred), "--out", str(out), *geojson,
                                          "--workers", "1", "--no-tuned"]) == 0, geojson
        assert out.is_file() and not out.is_symlink() and read_rows(out)[0][0] == "ImageId"
    assert (tmp_path / "a_file").read_text() == "mine\n" and (gj / ".polygonize-tiles").exists()
    assert not (gj / ".publishing").exists()


def test_a_directory_under_a_tiles_geojson_name_is_refused_naming_it(pred_dir, tmp_path,
                                                                       capsys):
    """A directory the user made in --geojson DIR under a tile's name (<ImageId>.geojson): the
    publish's move onto it failed after the CSV's commit, exit 1, as for a full disk ("rerun
    once there is room"), leaving the new CSV beside a half-published DIR. The user must move
    it: one line naming it, exit 2, before the CSV's commit; --out and DIR as they were."""
    pred, _ = pred_dir
    out, gj = tmp_path / "p.csv", tmp_path / "gj"
    key = "AOI_9_Test_img101"  # (the second shard's)
    (gj / f"{key}.geojson").mkdir(parents=True)
    argv = ["--pred", str(pred), "--out", str(out), "--geojson", str(gj), "--workers", "1",
            "--no-tuned"]
    capsys.readouterr()
    assert run_main(polygonize.main, argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == (f"error: --geojson {gj}: {gj / key}.geojson is a directory, where tile "
                       f"{key}'s GeoJSON goes; move it away or give another --geojson"), err
    assert not out.exists() and [p.name for p in gj.iterdir()] == [f"{key}.geojson"]
    # (with the pool: the refusal comes back from a worker as any shard's error does)
    assert run_main(polygonize.main, [*argv[:-3], "--workers", "2", "--no-tuned"]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == err[-1]
    (gj / f"{key}.geojson").rmdir()
    assert run_main(polygonize.main, argv) == 0
    assert (gj / f"{key}.geojson").is_file()


def test_a_full_disk_while_writing_exits_1_and_a_missing_input_2(pred_dir, tmp_path,
                                                                  monkeypatch, capsys):
    """An OSError while polygonize writes its CSV rows or a tile's GeoJSON, or score its --json
    (a full disk, EIO), is a failure of the run: one line naming the file and exit code 1, to
    rerun once there is room; they exited 2, "bad input", as an unusable path does. A missing
    input is still 2."""
    pred, truth = pred_dir
    out, gj, js = tmp_path / "p.csv", tmp_path / "gj", tmp_path / "s.json"
    argv = ["--pred", str(pred), "--out", str(out), "--workers", "1", "--no-tuned"]
    real_rows = runner.write_rows

    def full_at_the_rows(f: IO[str], rows: list, header: bool = False) -> None:
        if rows:
            raise OSError(errno.ENOSPC, "No space left on device")  # (as write() names none)
        real_rows(f, rows, header=header)

    with monkeypatch.context() as m:
        m.setattr(runner, "write_rows", full_at_the_rows)
        assert run_main(polygonize.main, argv) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == f"error: [Errno 28] No space left on device: '{out}'", err
    assert not out.exists()

    def eio(*args: object, **kwargs: object) -> None:
        raise OSError(errno.EIO, "Input/output error")

    with monkeypatch.context() as m:
        m.setattr(postproc.geojson, "atomic_write_text", eio)
        assert run_main(polygonize.main, [*argv, "--geojson", str(gj)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and f"cannot write {gj / '.partial'}" in err[-1], err
    assert "[Errno 5] Input/output error" in err[-1] and not out.exists() and not gj.exists()

    assert run_main(polygonize.main, argv) == 0
    with monkeypatch.context() as m:
        full_disk_at_commit(m, atomic)
        assert run_main(score.main, ["--truth", str(truth), "--proposals", str(out),
                                     "--json", str(js), "--workers", "1"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == f"error: [Errno 28] No space left on device: '{js}'", err
    assert not js.exists()

    missing = tmp_path / "missing"
    assert run_main(polygonize.main, ["--pred", str(missing), "--out", str(out)]) == 2
    assert run_main(score.main, ["--truth", str(missing), "--proposals", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and all(str(missing) in line for line in err), err


def test_an_unreadable_shard_is_bad_input_naming_it_not_the_outputs_failure(
        pred_dir, tmp_path, monkeypatch, capsys):
    """polygonize reads its shards inside writing() (its CSV is open meanwhile), so an OSError
    of the reader's own is taken for the output's: an EIO reading a shard's tail (the complete-
    tar check, before the walk) exited 1 in one line that named no file. The reader's error
    names the shard, exit 2, as an EIO later in the walk did."""
    import postproc.predio

    pred, _ = pred_dir
    out = tmp_path / "p.csv"
    bad = sorted(pred.glob("pred-*.tar"))[1]

    def eio_open(path: Path, mode: str = "r", *args: object, **kwargs: object) -> IO:
        f = open(path, mode, *args, **kwargs)  # noqa: SIM115 - the reader closes it
        if Path(path) == bad:
            def eio(*a: object) -> bytes:
                raise OSError(errno.EIO, "Input/output error")

            f.read = eio  # type: ignore[method-assign]
        return f

    monkeypatch.setattr(postproc.predio, "open", eio_open, raising=False)
    assert run_main(polygonize.main, ["--pred", str(pred), "--out", str(out), "--workers", "1",
                                      "--no-tuned"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == f"error: {bad}: cannot read shard (Input/output error)", err
    assert not out.exists()


def _tree(root: Path) -> dict[str, bytes | None]:
    """Every file and directory under ``root`` (hidden ones too), files with their bytes."""
    return {str(p.relative_to(root)): p.read_bytes() if p.is_file() else None
            for p in sorted(root.rglob("*"))}


@pytest.mark.slow  # the real command in a process of its own
@pytest.mark.timeout(180)
@pytest.mark.parametrize("stop", ["ctrl_c", "error"])
def test_a_stopped_run_leaves_its_outputs_as_they_were(pred_dir, tmp_path, monkeypatch, stop):
    """Stopped with tiles already in DIR/.partial (a Ctrl-C, or a write that fails), the run
    left the stage in DIR, and a DIR made for it, holding only that; and a directory made for
    --out (its CSV is open all run) stayed, empty. Now, as trainer.predict leaves --out: an
    earlier run's output whole, and no stage (nor a directory made for nothing). Also for
    --out NEW/p.csv --geojson NEW/sub/DIR: NEW held the stage when the CSV's clean-up came, and
    only DIR went with it, so NEW (and NEW/sub) stayed, empty."""
    pred, _ = pred_dir
    earlier = (tmp_path / "p.csv", tmp_path / "earlier")
    new = (tmp_path / "new-csv" / "p.csv", tmp_path / "new")
    shared = (tmp_path / "both" / "p.csv", tmp_path / "both" / "sub" / "gj")
    argv = ["--pred", str(pred), "--workers", "1", "--no-tuned"]
    assert run_main(polygonize.main, [*argv, "--out", str(earlier[0]),
                                      "--geojson", str(earlier[1])]) == 0
    before = earlier[0].read_bytes(), _tree(earlier[1])
    real, written = runner.write_tile_geojson, []

    def full_at_the_second_tile(out, key, *args):
        if written:
            raise OSError(errno.ENOSPC, "No space left on device")
        written.append(real(out, key, *args))

    monkeypatch.setattr(runner, "write_tile_geojson", full_at_the_second_tile)
    worker = str(Path(__file__).with_name("polygonize_ctrl_c_worker.py"))  # slow chunks
    for csv_out, gj in (earlier, new, shared):
        written.clear()
        args = [*argv, "--out", str(csv_out), "--geojson", str(gj), "--min-polygon-area", "1e9"]
        if stop == "ctrl_c":  # (at the second chunk: the first one's tiles are in the stage)
            res = interrupt_when([sys.executable, worker, *args], "chunk", times=2)
            assert res.returncode == 130 and "interrupted" in res.stderr, res.stderr[-3000:]
        else:  # (exit 1, a full disk while writing: it was 2, as for bad input)
            assert run_main(polygonize.main, args) == 1
            assert len(written) == 1  # (one tile was in the stage)
    assert (earlier[0].read_bytes(), _tree(earlier[1])) == before
    assert not new[0].parent.exists() and not new[1].exists()
    assert not shared[0].parent.exists()


@pytest.mark.multiproc  # the command and its pool of 2 workers, in a process group of their own
@pytest.mark.timeout(180)
def test_a_sigterm_stops_polygonize_and_its_pool_in_one_line_and_exit_143(pred_dir, tmp_path):
    """A SIGTERM to the command's processes (Slurm's scancel or time limit) killed it without a
    word, its stage and the --out made for it left behind. Now the pool's workers die of it
    (they restore its default action) and the command stops as at a Ctrl-C: its one line, exit
    143, and none of its outputs."""
    csv_out, gj = tmp_path / "new" / "p.csv", tmp_path / "gj"
    worker = str(Path(__file__).with_name("polygonize_ctrl_c_worker.py"))  # slow chunks
    res = interrupt_when([sys.executable, worker, "--pred", str(pred_dir[0]), "--workers", "2",
                          "--no-tuned", "--out", str(csv_out), "--geojson", str(gj)], "chunk",
                         times=2, sig=signal.SIGTERM)
    assert res.returncode == 143, res.stderr[-3000:]
    assert res.stderr.splitlines()[-1] == "terminated (SIGTERM)", res.stderr[-3000:]
    assert "Traceback" not in res.stderr and "interrupted" not in res.stderr, res.stderr[-3000:]
    assert list(tmp_path.iterdir()) == []  # (no CSV, no stage, nor the directories made for them)


def test_geojson_into_the_prediction_directory_is_refused(pred_dir, tmp_path, monkeypatch,
                                                         capsys):
    """--geojson PRED: the GeoJSON publish marks its directory (.publishing), so a run cut short
    there (here the CSV's commit fails on a full disk; a kill did the same) left PRED refused
    by every later command with 'rerun trainer.predict', though its shards were whole, and a
    rerun of polygonize could not clear it."""
    pred = shutil.copytree(pred_dir[0], tmp_path / "pred")
    out = tmp_path / "p.csv"
    argv = ["--pred", str(pred), "--out", str(out), "--workers", "1", "--no-tuned"]
    _full_disk_at_the_csv_commit(monkeypatch)
    assert run_main(polygonize.main, [*argv, "--geojson", str(tmp_path / "x" / ".." / "pred")]
                    ) == 2
    monkeypatch.undo()
    err = capsys.readouterr().err.strip().splitlines()
    assert sorted(p.name for p in pred.iterdir()) == sorted(p.name for p in pred_dir[0].iterdir())
    assert run_main(polygonize.main, argv) == 0  # the prediction is still whole and readable
    assert len(err) == 1 and "--geojson" in err[0] and "is the --pred directory" in err[0]


def _tiles(gj: Path) -> list[str]:
    """The tiles polygonize published into ``gj`` (not the user's files, not hidden ones)."""
    return sorted(p.name for p in gj.iterdir()
                  if p.name.startswith("AOI_9_Test_") and p.suffix == ".geojson")


@pytest.mark.parametrize("case", ["missing_dir", "truncated", "bad_settings", "null_transform",
                                  "zero_transform", "huge_tile", "no_crs"])
def test_polygonize_bad_input_is_one_line(tmp_path, capsys, case):
    pred, _ = make_pred_dir(tmp_path, shards=2, per_shard=2, size=64, buildings=3)
    out = tmp_path / "p.csv"
    argv = ["--pred", str(pred), "--out", str(out), "--workers", "1"]
    if case == "missing_dir":
        argv[1] = str(tmp_path / "nope")
        want = "not found"
    elif case == "truncated":
        shard = pred / "pred-000001.tar"
        shard.write_bytes(shard.read_bytes()[:1500])
        want = "pred-000001.tar"
    elif case == "null_transform":  # (it was a TypeError traceback from len(None))
        prob = np.zeros((64, 64, 3), np.float32)
        prob[..., 0] = 1
        write_pred_shard(pred / "pred-000001.tar",
                         [("img1", prob, {**tile_meta("img1", 64, 0), "transform": None})])
        argv += ["--geojson", str(tmp_path / "gj")]
        want = "pred-000001.tar: img1: meta.json transform None is not six finite numbers"
    elif case == "zero_transform":  # (it wrote GeoJSON of footprints all at (0, 0), exit 0)
        prob = np.zeros((64, 64, 3), np.float32)
        prob[8:24, 8:24] = (0, 1, 0)
        prob[..., 0] = 1 - prob[..., 1]
        write_pred_shard(pred / "pred-000001.tar",
                         [("img1", prob, {**tile_meta("img1", 64, 0), "transform": [0] * 6})])
        argv += ["--geojson", str(tmp_path / "gj")]
        want = "pred-000001.tar: img1: meta.json transform [0, 0, 0, 0, 0, 0] is degenerate"
    elif case == "no_crs":  # (it wrote lon/lat GeoJSON of UTM metres, exit 0)
        prob = np.zeros((64, 64, 3), np.float32)
        prob[8:24, 8:24] = (0, 1, 0)
        prob[..., 0] = 1 - prob[..., 1]
        meta = {**tile_meta("img1", 64, 1), "transform": [0.3, 0, 5e5, 0, -0.3, 4e6]}
        del meta["crs"]
        write_pred_shard(pred / "pred-000001.tar", [("img1", prob, meta)])
        assert run_main(polygonize.main, argv) == 0  # (the CSV needs no CRS)
        out.unlink()
        argv += ["--geojson", str(tmp_path / "gj")]
        want = "pred-000001.tar: img1: meta.json has no crs (needed for --geojson"
    elif case == "huge_tile":  # (the message named neither the shard nor the tile)
        prob = np.zeros((1, 33000, 3), np.float32)
        prob[..., 0] = 1
        meta = {**tile_meta("img1", 1, 0), "width": 33000}
        write_pred_shard(pred / "pred-000001.tar", [("img1", prob, meta)])
        want = "pred-000001.tar: img1: tile of 1x33000 px is outside"
    else:
        (tmp_path / "s.json").write_text('{"grow": 1}')
        argv += ["--settings", str(tmp_path / "s.json")]
        want = "unknown polygonize setting"
    assert run_main(polygonize.main, argv) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]  # after the progress bar
    assert last.startswith("error:") and want in last
    assert not out.exists() and not list(tmp_path.glob(".p.csv.*"))


@pytest.mark.parametrize("command", ["polygonize", "tune", "render"])
def test_a_shard_given_as_pred_is_named_a_file(tmp_path, capsys, command):
    """--pred takes the directory of the shards; one shard given for it was 'prediction
    directory not found' (render: 'not a directory'), as if the prediction were missing."""
    pred, truth = make_pred_dir(tmp_path, shards=1, per_shard=2, size=64, buildings=3)
    shard = pred / "pred-000000.tar"
    main, rest = {"polygonize": (polygonize.main, ["--out", tmp_path / "p.csv", "--workers", 1]),
                  "tune": (tune.main, ["--truth", truth, "--workers", 1]),
                  "render": (render.main, ["--proposals", tmp_path / "p.csv",
                                           "--out", tmp_path / "tiles"])}[command]
    assert run_main(main, [str(a) for a in ["--pred", shard, *rest]]) == 2
    assert capsys.readouterr().err.splitlines() == [
        f"error: --pred {shard} is a file; give the directory of prediction shards (pred-*.tar), "
        f"e.g. {pred}"]


@pytest.mark.parametrize("command, flags, said", [
    ("polygonize", ["--min-polygon-area", "-5"],
     "error: min_polygon_area (polygonize --min-polygon-area) -5.0 must be a finite number "
     ">= 0"),
    ("polygonize", ["--simplify", "nan"],
     "error: simplify_tolerance (polygonize --simplify) nan must be a finite number >= 0"),
    ("polygonize", ["--building-threshold", "0.3", "--footprint-threshold", "0.4"],
     "error: footprint_threshold (polygonize --footprint-threshold) must not exceed "
     "building_threshold (polygonize --building-threshold) (0.4 > 0.3): a seed must also be "
     "growable"),
    ("score", ["--iou-threshold", "0"], "error: --iou-threshold 0.0 must be in (0, 1]"),
    ("score", ["--min-truth-area", "inf"],
     "error: --min-truth-area inf must be a finite number >= 0")])
def test_a_bad_setting_is_named_by_its_flag(pred_dir, tmp_path, capsys, command, flags, said):
    """(they were named as fields of a class the user never sees: "ScoreConfig.iou_threshold",
    "PolygonizeConfig.min_polygon_area")"""
    truth = tmp_path / "truth.csv"
    truth.write_text("ImageId,BuildingId,PolygonWKT_Pix,PolygonWKT_Geo\n"
                     'a,1,"POLYGON ((0 0, 9 0, 9 9, 0 0))",x\n')
    if command == "polygonize":
        main, argv = polygonize.main, ["--pred", str(pred_dir[0]), "--no-tuned"]
    else:
        main, argv = score.main, ["--truth", str(truth)]
    argv += ["--out" if command == "polygonize" else "--proposals", str(tmp_path / "p.csv")]
    assert run_main(main, argv + flags) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == said


def test_score_bad_csv_names_file_and_line(tmp_path, capsys):
    truth = tmp_path / "truth.csv"
    truth.write_text("ImageId,BuildingId,PolygonWKT_Pix,PolygonWKT_Geo\n"
                     'a,1,"POLYGON ((0 0, 9 0, 9 9, 0 0))",x\n')
    props = tmp_path / "props.csv"
    props.write_text("ImageId,BuildingId,PolygonWKT_Pix,Confidence\n"
                     'a,1,"POLYGON ((0 0, 9 0, 9 9, 0 0))",1\na,2,"POLYGON ((0 0",1\n')
    assert run_main(score.main, ["--truth", str(truth), "--proposals", str(props)]) == 2
    assert "props.csv:3: malformed WKT" in capsys.readouterr().err
    props.write_text("")
    assert run_main(score.main, ["--truth", str(truth), "--proposals", str(props)]) == 2
    assert "empty file" in capsys.readouterr().err


@pytest.mark.parametrize("side", ["truth", "proposals"])
def test_score_non_finite_wkt_names_file_and_line(tmp_path, capsys, side):
    """WKT reads nan and inf: GEOS raised on such a proposal, and such a truth polygon was left
    out of the scoring without a word (its area is NaN)."""
    square = 'a,1,"POLYGON ((0 0, 9 0, 9 9, 0 0))",x\n'
    nan = 'a,2,"POLYGON ((0 0, nan 0, 9 9, 0 0))",x\n'
    truth, props = tmp_path / "truth.csv", tmp_path / "proposals.csv"
    truth.write_text("ImageId,BuildingId,PolygonWKT_Pix,PolygonWKT_Geo\n" + square
                     + (nan if side == "truth" else ""))
    props.write_text("ImageId,BuildingId,PolygonWKT_Pix,Confidence\n"
                     + (square + (nan if side == "proposals" else "")).replace(",x", ",1"))
    assert run_main(score.main, ["--truth", str(truth), "--proposals", str(props)]) == 2
    assert f"{side}.csv:3: non-finite coordinate" in capsys.readouterr().err


def _torchrun(args: list[str], timeout: float, module: str = "postproc.polygonize"
              ) -> subprocess.CompletedProcess:
    return subprocess.run(torchrun_cmd(2, ["-m", module, *args]), cwd=REPO, env=worker_env(),
                          capture_output=True, text=True, timeout=timeout)


@pytest.mark.multiproc
@pytest.mark.timeout(240)
def test_torchrun_splits_shards_and_matches_one_process(tmp_path):
    pred, truth = make_pred_dir(tmp_path, shards=5, per_shard=3, size=96, buildings=6)
    one, two = tmp_path / "one.csv", tmp_path / "two.csv"
    assert run_main(polygonize.main, ["--pred", str(pred), "--out", str(one),
                                      "--workers", "1"]) == 0
    r = _torchrun(["--pred", str(pred), "--out", str(two), "--workers", "1",
                   "--geojson", str(tmp_path / "gj")], timeout=200)
    assert r.returncode == 0, r.stderr[-3000:]
    assert two.read_bytes() == one.read_bytes()
    assert len(list((tmp_path / "gj").glob("*.geojson"))) == 15  # both ranks wrote theirs

    # the scorer: ranks split the images, rank 0 sums the counts
    js1, js2 = tmp_path / "s1.json", tmp_path / "s2.json"
    assert run_main(score.main, ["--truth", str(truth), "--proposals", str(one),
                                 "--json", str(js1), "--workers", "1"]) == 0
    r = _torchrun(["--truth", str(truth), "--proposals", str(one), "--json", str(js2),
                   "--workers", "1"], timeout=200, module="postproc.score")
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads(js1.read_text()) == json.loads(js2.read_text())

    (pred / "pred-000003.tar").write_bytes(b"\0" * 100)  # rank 1's second shard
    bad = tmp_path / "bad.csv"
    r = _torchrun(["--pred", str(pred), "--out", str(bad), "--workers", "1"], timeout=200)
    assert r.returncode != 0
    assert "pred-000003.tar" in r.stderr and not bad.exists()


@pytest.mark.multiproc
@pytest.mark.timeout(240)
def test_torchrun_duplicate_image_id_stops_every_rank_with_the_reason(tmp_path):
    pred, _ = make_pred_dir(tmp_path, shards=3, per_shard=2, size=64, buildings=3)
    shutil.copy(pred / "pred-000000.tar", pred / "pred-000003.tar")  # rank 1's, in round 2
    out = tmp_path / "p.csv"
    r = _torchrun(["--pred", str(pred), "--out", str(out), "--workers", "1"], timeout=200)
    assert r.returncode != 0 and not out.exists()
    reason = "pred-000003.tar: ImageId 'AOI_9_Test_img0' also appears in an earlier shard"
    assert r.stderr.count(reason) == 2, r.stderr[-3000:]  # each rank says why
    assert "RuntimeError" not in r.stderr  # (rank 1 died on gloo's reset connection)


@pytest.mark.multiproc
@pytest.mark.timeout(240)
@pytest.mark.parametrize("fail, doing", [("rows", "writing"), ("header", "creating")])
def test_torchrun_a_failed_csv_write_stops_every_rank_with_the_reason(tmp_path, fail, doing):
    pred, _ = make_pred_dir(tmp_path, shards=2, per_shard=2, size=64, buildings=3)
    out = tmp_path / "p.csv"
    worker = str(Path(__file__).with_name("csv_fail_worker.py"))
    r = subprocess.run(torchrun_cmd(2, [worker, "--pred", str(pred), "--out", str(out),
                                        "--workers", "1"]),
                       cwd=REPO, env={**worker_env(), "CSV_FAIL": fail}, capture_output=True,
                       text=True, timeout=200)
    assert r.returncode != 0 and not out.exists()
    # (a WriteError: an OSError while the outputs are written, exit code 1 on every rank)
    assert f"error: rank 0 stopped while {doing} {out}: WriteError: [Errno 28] No space left" \
        in r.stderr, r.stderr[-3000:]
    assert "error: [Errno 28] No space left on device" in r.stderr  # rank 0's own line
    assert "RuntimeError" not in r.stderr and "Connection closed" not in r.stderr
    _every_rank_exits_1(r.stderr)


def _rank_fail(args: list[str], env: dict[str, str], module: str = "postproc.polygonize",
               timeout: float = 200) -> subprocess.CompletedProcess:
    """2-rank torchrun of ``module`` through tests/rank_fail_worker.py (``env``: its FAIL_*)."""
    worker = str(REPO / "tests" / "rank_fail_worker.py")
    return subprocess.run(torchrun_cmd(2, [worker, module, *args]), cwd=REPO,
                          env={**worker_env(), **env}, capture_output=True, text=True,
                          timeout=timeout)


def _every_rank_exits_1(stderr: str) -> None:
    """torchrun's summary lists both ranks as failed, the first to end with exit code 1.

    (Either may end first: rank 1 once rank 0's failure reached it, rank 0 after its clean-up.
    The later one may be SIGTERMed by torchrun as it tears down: 143, or -15 past main; as in
    trainer.predict's test. An exit 0, the old failure of the relaying rank, is no entry.)"""
    codes, first = worker_exit_codes(stderr), first_failure(stderr)
    assert set(codes) == {0, 1}, (codes, stderr[-3000:])
    assert first is not None and codes[first] == 1, (codes, first)
    assert set(codes.values()) <= {1, 143, -15}, codes


@pytest.mark.multiproc
@pytest.mark.timeout(240)
@pytest.mark.parametrize("at", ["csv", "geojson"])
def test_torchrun_rank_0s_failed_commit_or_publish_stops_every_rank_with_exit_1(tmp_path, at):
    """Rank 0 commits the CSV and publishes --geojson alone, after the last agreed round: an EIO
    there exited 1 on rank 0 and 0 on rank 1, a run that looked half done, and the error named
    no file. Now every rank exits 1, rank 0 naming the file, rank 1 relaying it; nothing is
    published (the CSV's commit: no CSV and no DIR; the publish: no tile in DIR, its mark
    left)."""
    pred, _ = make_pred_dir(tmp_path, shards=2, per_shard=2, size=64, buildings=3)
    out, gj = tmp_path / "p.csv", tmp_path / "gj"
    failing = out if at == "csv" else gj / runner.GEOJSON_LEDGER
    r = _rank_fail(["--pred", str(pred), "--out", str(out), "--geojson", str(gj),
                    "--workers", "1"],
                   {"FAIL_AT": "fsync", "FAIL_RANK": "0", "FAIL_FILE": failing.name})
    own = f"error: [Errno 5] Input/output error: '{failing}'"
    doing = f"committing {out}" if at == "csv" else f"publishing into {gj}"
    assert own in r.stderr, r.stderr[-3000:]
    assert f"error: rank 0 stopped while {doing}: WriteError: [Errno 5] Input/output error: " \
        f"'{failing}'" in r.stderr, r.stderr[-3000:]
    _every_rank_exits_1(r.stderr)
    assert not list(gj.glob("*.geojson")) and not (gj / ".partial").exists()
    assert out.exists() == (at == "geojson")  # (the publish comes after the CSV's commit)
    # (the publish's mark stays, for the next run to clear; a failed CSV commit removes the
    # mark it made, and so the gj it made for nothing)
    assert (gj / ".publishing").exists() if at == "geojson" else not gj.exists()
    assert "RuntimeError" not in r.stderr and "Connection closed" not in r.stderr


@pytest.mark.multiproc
@pytest.mark.timeout(240)
def test_torchrun_score_rank_0s_failed_json_stops_every_rank_with_exit_1(tmp_path):
    """Rank 0 wrote --json after the process group was gone: an EIO there exited 1 on rank 0
    and 0 on rank 1. Now agreed, as polygonize's commit."""
    truth, props, js = tmp_path / "truth.csv", tmp_path / "props.csv", tmp_path / "s.json"
    truth.write_text("ImageId,BuildingId,PolygonWKT_Pix,PolygonWKT_Geo\n"
                     'a,1,"POLYGON ((0 0, 9 0, 9 9, 0 0))",x\nb,-1,POLYGON EMPTY,x\n')
    props.write_text("ImageId,BuildingId,PolygonWKT_Pix,Confidence\n"
                     'a,1,"POLYGON ((0 0, 9 0, 9 9, 0 0))",1\n')
    r = _rank_fail(["--truth", str(truth), "--proposals", str(props), "--json", str(js),
                    "--workers", "1"],
                   {"FAIL_AT": "fsync", "FAIL_RANK": "0", "FAIL_FILE": js.name},
                   module="postproc.score")
    assert f"error: [Errno 5] Input/output error: '{js}'" in r.stderr, r.stderr[-3000:]
    assert f"error: rank 0 stopped while writing {js}: WriteError: [Errno 5] Input/output " \
        f"error: '{js}'" in r.stderr, r.stderr[-3000:]
    _every_rank_exits_1(r.stderr)
    assert not js.exists() and "F1 1.0000" in r.stdout  # (the figures, printed before)
    assert "RuntimeError" not in r.stderr and "Connection closed" not in r.stderr


@pytest.mark.multiproc
@pytest.mark.timeout(240)
def test_torchrun_score_a_bad_row_in_one_ranks_images_stops_every_rank_with_it(tmp_path):
    """(rank 1 stopped alone; rank 0 was killed by torchrun, saying nothing)"""
    truth, props = tmp_path / "truth.csv", tmp_path / "props.csv"
    truth.write_text("ImageId,BuildingId,PolygonWKT_Pix,PolygonWKT_Geo\n"
                     'a,1,"POLYGON ((0 0, 9 0, 9 9, 0 0))",x\nb,-1,POLYGON EMPTY,x\n')
    props.write_text("ImageId,BuildingId,PolygonWKT_Pix,Confidence\n"
                     'a,1,"POLYGON ((0 0, 9 0, 9 9, 0 0))",1\nb,1,"POLYGON ((0 0",1\n')
    r = _torchrun(["--truth", str(truth), "--proposals", str(props), "--workers", "1"],
                  timeout=200, module="postproc.score")  # image b is rank 1's
    assert r.returncode != 0
    assert "rank 1 stopped while scoring: CsvError: " in r.stderr, r.stderr[-3000:]
    assert r.stderr.count("props.csv:3: malformed WKT") == 2  # each rank says why
    assert "RuntimeError" not in r.stderr and "Connection closed" not in r.stderr


@pytest.mark.multiproc
@pytest.mark.timeout(240)
def test_torchrun_a_failed_geojson_write_on_one_rank_stops_every_rank_with_it(tmp_path):
    """(rank 1's OSError was not a shard error: rank 0 died on gloo's reset connection) A full
    disk, not bad input: every rank exits 1 (the class travels with the shard's result), where
    the write's PredError exited 2."""
    pred, _ = make_pred_dir(tmp_path, shards=2, per_shard=2, size=64, buildings=3)
    out, gj = tmp_path / "p.csv", tmp_path / "gj"
    worker = str(REPO / "tests" / "rank_fail_worker.py")
    r = subprocess.run(torchrun_cmd(2, [worker, "postproc.polygonize", "--pred", str(pred),
                                        "--out", str(out), "--geojson", str(gj),
                                        "--workers", "1"]),
                       cwd=REPO, env={**worker_env(), "FAIL_AT": "geojson"}, capture_output=True,
                       text=True, timeout=200)
    assert r.returncode != 0 and not out.exists() and not list(gj.glob("*.geojson"))
    reason = "pred-000001.tar: AOI_9_Test_img100: cannot write"
    assert r.stderr.count(reason) == 2, r.stderr[-3000:]  # each rank says why
    assert "RuntimeError" not in r.stderr and "Connection closed" not in r.stderr
    _every_rank_exits_1(r.stderr)


@pytest.mark.multiproc
@pytest.mark.timeout(240)
def test_torchrun_a_directory_under_one_ranks_tile_name_stops_every_rank_with_exit_2(tmp_path):
    """A directory under a GeoJSON name of rank 1's tile: the refusal travels with that shard's
    result, so every rank stops with it, exit 2, before rank 0 commits the CSV."""
    pred, _ = make_pred_dir(tmp_path, shards=2, per_shard=2, size=64, buildings=3)
    out, gj = tmp_path / "p.csv", tmp_path / "gj"
    (gj / "AOI_9_Test_img100.geojson").mkdir(parents=True)  # (pred-000001.tar's: rank 1's)
    r = _torchrun(["--pred", str(pred), "--out", str(out), "--geojson", str(gj),
                   "--workers", "1"], timeout=200)
    reason = f"{gj / 'AOI_9_Test_img100'}.geojson is a directory"
    assert r.stderr.count(reason) == 2, r.stderr[-3000:]  # each rank says why
    codes = worker_exit_codes(r.stderr)
    assert set(codes) == {0, 1} and set(codes.values()) <= {2, 143, -15}, codes
    assert codes[first_failure(r.stderr)] == 2, r.stderr[-3000:]
    assert not out.exists() and [p.name for p in gj.iterdir()] == ["AOI_9_Test_img100.geojson"]


def _to_a_closed_pipe(args: list[str], unbuffered: bool) -> subprocess.CompletedProcess:
    """``python -m args... | head -0``: stdout a pipe whose reader has gone."""
    env = worker_env()
    env.pop("PYTHONUNBUFFERED", None)
    if unbuffered:
        env["PYTHONUNBUFFERED"] = "1"
    read, write = os.pipe()
    os.close(read)
    try:
        return subprocess.run([sys.executable, "-m", *args], cwd=REPO, env=env, stdout=write,
                              stderr=subprocess.PIPE, text=True, timeout=200)
    finally:
        os.close(write)


@pytest.mark.multiproc
@pytest.mark.timeout(240)
@pytest.mark.parametrize("unbuffered", [False, True])
def test_a_closed_stdout_ends_quietly_with_exit_1(pred_dir, tmp_path, unbuffered):
    """``postproc.score ... | head -0``: a print whose reader has gone said "error: [Errno 32]
    Broken pipe", exit 2 ("fix the input"), where stdout is unbuffered, and "Exception ignored
    ... BrokenPipeError", exit 120, where it is flushed only at exit. Now as Python's docs
    recommend: nothing said, exit 1. Polygonize's and merge's last line the same; their
    outputs are written before it (score's --json after its figures: with an unbuffered stdout,
    not at all)."""
    pred, truth = pred_dir
    out, gj, area, js = (tmp_path / n for n in ("p.csv", "gj", "area.geojson", "s.json"))
    commands = [["postproc.polygonize", "--pred", pred, "--out", out, "--geojson", gj,
                 "--workers", "1", "--no-tuned"],
                ["postproc.score", "--truth", truth, "--proposals", out, "--json", js,
                 "--workers", "1"],
                ["postproc.merge", "--pred", pred, "--geojson", gj, "--out", area]]
    for args in commands:
        r = _to_a_closed_pipe([str(a) for a in args], unbuffered)
        lines = [line for line in r.stderr.splitlines() if "it/s]" not in line
                 and "/s]" not in line and line.strip()]
        assert r.returncode == 1, (args[0], r.returncode, r.stderr[-2000:])
        assert not any("Broken pipe" in line or "Traceback" in line or "Exception" in line
                       for line in lines), (args[0], lines)
    assert out.exists() and area.exists() and js.exists() == (not unbuffered)


_SCORE_ON_A_FULL_DISK = """
import errno, sys
from dataio import atomic
from postproc import score
from postproc.cli import exit_on_error

def full(path, *args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device", str(path))

atomic.atomic_write_text = full  # (score's --json, imported at its write)
sys.exit(exit_on_error(lambda: score.main(sys.argv[1:])))
"""


@pytest.mark.multiproc
@pytest.mark.timeout(240)
def test_a_closed_stdout_keeps_the_exit_code_of_a_failure(pred_dir, tmp_path):
    """``postproc.score --json J | head -0`` on a full disk: its figures, buffered, were
    flushed at the interpreter's exit into the closed pipe, "Exception ignored ...
    BrokenPipeError" and exit 120, where the --json's failure said 1 (only a command that
    succeeded flushed its stdout itself). Now the failure's line and code, 1, nothing else."""
    pred, truth = pred_dir
    out, js = tmp_path / "p.csv", tmp_path / "s.json"
    assert run_main(polygonize.main, ["--pred", str(pred), "--out", str(out), "--workers", "1",
                                      "--no-tuned"]) == 0
    env = worker_env()
    env.pop("PYTHONUNBUFFERED", None)  # (buffered: the figures are still held at the failure)
    read, write = os.pipe()
    os.close(read)
    try:
        r = subprocess.run([sys.executable, "-c", _SCORE_ON_A_FULL_DISK, "--truth", str(truth),
                            "--proposals", str(out), "--json", str(js), "--workers", "1"],
                           cwd=REPO, env=env, stdout=write, stderr=subprocess.PIPE, text=True,
                           timeout=200)
    finally:
        os.close(write)
    lines = [line for line in r.stderr.splitlines() if line.strip() and "/s]" not in line]
    assert r.returncode == 1, (r.returncode, r.stderr[-2000:])
    assert lines == [f"error: [Errno 28] No space left on device: '{js}'"], lines
    assert not js.exists()


@pytest.mark.multiproc
@pytest.mark.timeout(240)
@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
@pytest.mark.parametrize("unbuffered", [False, True])
def test_a_full_disk_under_stdout_is_a_failure_of_the_run(pred_dir, tmp_path, unbuffered):
    """``postproc.score ... > report.txt`` on a full disk (/dev/full: every write ENOSPC): the
    report's write failed outside writing(), an OSError, "error: [Errno 28] No space left on
    device" with exit 2, "fix the input", where a full disk is 1 (a rerun once there is room);
    buffered, the flush that exit_on_error does at the end did the same. Polygonize's too."""
    pred, truth = pred_dir
    out = tmp_path / "p.csv"
    env = worker_env()
    env.pop("PYTHONUNBUFFERED", None)
    if unbuffered:
        env["PYTHONUNBUFFERED"] = "1"
    for args in (["postproc.polygonize", "--pred", str(pred), "--out", str(out), "--no-tuned"],
                 ["postproc.score", "--truth", str(truth), "--proposals", str(out)]):
        with open("/dev/full", "w") as full:
            r = subprocess.run([sys.executable, "-m", *args, "--workers", "1"], cwd=REPO,
                               env=env, stdout=full, stderr=subprocess.PIPE, text=True,
                               timeout=200)
        lines = [line for line in r.stderr.splitlines() if line.strip() and "/s]" not in line]
        assert (r.returncode, lines[-1:]) == (1, ["error: [Errno 28] No space left on device"]), (
            args[0], r.returncode, r.stderr[-2000:])
        assert out.exists()  # (polygonize's outputs are whole before its report)


@pytest.mark.multiproc
@pytest.mark.timeout(240)
@pytest.mark.parametrize("module", ["postproc.score", "postproc.polygonize"])
def test_torchrun_a_closed_stdout_stops_every_rank_with_exit_1(pred_dir, tmp_path, module):
    """Rank 0 prints the last line (at once: torchrun starts its workers with python -u). In
    score, while it reports in on_main: its closed stdout, relayed, exited 2 on every rank, as
    an OSError, "fix the input"; in polygonize, after the process group: exit 2 on rank 0 alone.
    Now every rank exits 1, rank 1 saying why, rank 0 nothing."""
    pred, truth = pred_dir
    out = tmp_path / "p.csv"
    assert run_main(polygonize.main, ["--pred", str(pred), "--out", str(out), "--workers", "1",
                                      "--no-tuned"]) == 0
    args = (["--truth", str(truth), "--proposals", str(out)] if module == "postproc.score" else
            ["--pred", str(pred), "--out", str(tmp_path / "q.csv"), "--no-tuned"])
    env = worker_env()
    env.pop("PYTHONUNBUFFERED", None)
    read, write = os.pipe()
    os.close(read)
    try:
        r = subprocess.run(torchrun_cmd(2, ["-m", module, *args, "--workers", "1"]),
                           cwd=REPO, env=env, stdout=write, stderr=subprocess.PIPE, text=True,
                           timeout=200)
    finally:
        os.close(write)
    codes = worker_exit_codes(r.stderr)
    assert set(codes) == {0, 1} and set(codes.values()) <= {1, 143, -15}, (codes, r.stderr[-3000:])
    assert codes[first_failure(r.stderr)] == 1, r.stderr[-3000:]
    assert r.stderr.count("Broken pipe") == 1 and "rank 0 stopped while reporting" in r.stderr
    # (torchrun's own ChildFailedError traceback follows any failure; none from a worker)
    assert "postproc/" not in r.stderr and "Exception ignored" not in r.stderr, r.stderr[-3000:]


@pytest.mark.multiproc
@pytest.mark.timeout(240)
def test_torchrun_a_closed_buffered_stdout_stops_every_rank_with_exit_1(pred_dir, tmp_path):
    """As above, with the workers' stdout buffered (``torchrun --no-python python -m ...``: no
    -u): rank 0's last lines waited in the buffer past the agreed report, and its flush at the
    end, after the process group, exited 1 on rank 0 alone, rank 1 0. The report flushes them
    itself, inside the agreement."""
    pred, truth = pred_dir
    out = tmp_path / "p.csv"
    assert run_main(polygonize.main, ["--pred", str(pred), "--out", str(out), "--workers", "1",
                                      "--no-tuned"]) == 0
    env = worker_env()
    env.pop("PYTHONUNBUFFERED", None)
    for module, args in (("postproc.score", ["--truth", str(truth), "--proposals", str(out)]),
                         ("postproc.polygonize", ["--pred", str(pred), "--out",
                                                  str(tmp_path / "q.csv"), "--no-tuned"])):
        read, write = os.pipe()
        os.close(read)
        try:
            r = subprocess.run(torchrun_cmd(2, [sys.executable, "-m", module, *args,
                                                "--workers", "1"], extra=["--no-python"]),
                               cwd=REPO, env=env, stdout=write, stderr=subprocess.PIPE,
                               text=True, timeout=200)
        finally:
            os.close(write)
        codes = worker_exit_codes(r.stderr)
        assert set(codes) == {0, 1} and set(codes.values()) <= {1, 143, -15}, (
            module, codes, r.stderr[-3000:])
        assert "rank 0 stopped while reporting" in r.stderr, (module, r.stderr[-3000:])


@pytest.mark.parametrize("mark", [".publishing", ".polygonize-tiles"])
def test_a_directory_under_a_geojson_mark_is_refused_before_the_work(pred_dir, tmp_path, capsys,
                                                                      mark):
    """A directory at ``--geojson DIR``'s publish mark or tile list (the files polygonize
    writes there) failed only after the work, at the CSV's commit or the publish ("Is a
    directory"), exit 1, as for a full disk. It is the user's to move: one line naming it, exit
    2, before any work; --out not written, DIR as it was."""
    pred, _ = pred_dir
    out, gj = tmp_path / "p.csv", tmp_path / "gj"
    (gj / mark).mkdir(parents=True)
    assert run_main(polygonize.main, ["--pred", str(pred), "--out", str(out), "--geojson",
                                      str(gj), "--workers", "1", "--no-tuned"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(f"error: --geojson {gj}: {gj / mark} is a directory, where "), err
    assert not out.exists() and [p.name for p in gj.iterdir()] == [mark]


def test_outputs_under_a_file_are_refused_before_the_work(pred_dir, tmp_path, capsys):
    pred, truth = pred_dir
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    assert run_main(polygonize.main, ["--pred", str(pred), "--out", str(blocker / "p.csv"),
                                      "--workers", "1"]) == 2
    assert f"--out {blocker / 'p.csv'}: {blocker} is not a directory" in capsys.readouterr().err
    good = tmp_path / "p.csv"
    assert run_main(polygonize.main, ["--pred", str(pred), "--out", str(good), "--workers", "1",
                                      "--geojson", str(blocker / "gj")]) == 2
    assert "--geojson" in capsys.readouterr().err and not good.exists()
    assert run_main(polygonize.main, ["--pred", str(pred), "--out", str(good),
                                      "--workers", "1"]) == 0
    assert run_main(score.main, ["--truth", str(truth), "--proposals", str(good),
                                 "--json", str(blocker / "s.json")]) == 2
    assert "--json" in capsys.readouterr().err


def test_an_output_name_too_long_for_its_temporary_name_is_refused_before_the_work(
        pred_dir, tmp_path, capsys):
    """A name within 255 bytes but not its temporary name's (14 bytes longer) failed at the
    write, after the work, exit 1 as a full disk does (writing()); it is the user's name, to
    change: exit 2 before the work, naming the flag."""
    pred, truth = pred_dir
    name = "a" * (atomic.NAME_MAX - atomic.TMP_NAME_EXTRA - len(".csv") + 1) + ".csv"
    out = tmp_path / name
    assert run_main(polygonize.main, ["--pred", str(pred), "--out", str(out), "--workers", "1",
                                      "--no-tuned"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: --out {out}: the name {name} has 242 bytes; at most 241 can be "
                   "written (its temporary name is 14 bytes longer, and a file name has at most "
                   "255)"], err
    good = tmp_path / "p.csv"
    assert run_main(polygonize.main, ["--pred", str(pred), "--out", str(good), "--workers", "1",
                                      "--no-tuned"]) == 0
    capsys.readouterr()
    js = tmp_path / name.replace(".csv", ".jsn")
    assert run_main(score.main, ["--truth", str(truth), "--proposals", str(good),
                                 "--json", str(js), "--workers", "1"]) == 2
    said = capsys.readouterr()
    assert said.out == "" and said.err.startswith(f"error: --json {js}: the name "), said
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.csv"]


def test_an_output_that_is_an_input_is_refused_and_the_input_kept(pred_dir, tmp_path, capsys):
    """(the rename at the end replaced the input: score --json on its --truth CSV, tune --json
    on its --truth, polygonize --out on a prediction shard or its provenance)"""
    pred, truth = tmp_path / "pred", tmp_path / "truth.csv"
    shutil.copytree(pred_dir[0], pred)
    shutil.copy(pred_dir[1], truth)
    (pred / "provenance.json").write_text('{"split": "test"}\n')
    props = tmp_path / "p.csv"
    assert run_main(polygonize.main, ["--pred", str(pred), "--out", str(props), "--no-tuned",
                                      "--workers", "1"]) == 0
    kept = {p: p.read_bytes() for p in (truth, props, *pred.iterdir())}
    for main, argv, flag, victim in (
            (score.main, ["--truth", str(truth), "--proposals", str(props), "--json"], "--json",
             truth),
            (score.main, ["--truth", str(truth), "--proposals", str(props), "--json"], "--json",
             tmp_path / "." / "p.csv"),  # (another spelling of the same file)
            (tune.main, ["--pred", str(pred), "--truth", str(truth), "--run-dir", str(tmp_path),
                         "--workers", "1", "--grow-radii", "3", "--building-thresholds", "0.5",
                         "--footprint-thresholds", "0.5", "--min-polygon-areas", "20",
                         "--json"], "--json", truth),
            (polygonize.main, ["--pred", str(pred), "--workers", "1", "--no-tuned", "--out"],
             "--out", pred / "pred-000001.tar"),
            (polygonize.main, ["--pred", str(pred), "--workers", "1", "--no-tuned", "--out"],
             "--out", pred / "provenance.json")):
        assert run_main(main, [*argv, str(victim)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err[-1].startswith(f"error: {flag} {victim} is the ") and "input" in err[-1], err
        assert {p: p.read_bytes() for p in kept} == kept


@pytest.mark.timeout(180)  # compiles the kernels when the numba cache is cold
def test_the_polygonize_pool_forks_its_workers_when_made():
    """``make_pool`` runs before the process group starts gloo's threads, so its workers must be
    forked then, not at the first submit (which comes after ``dist.init``)."""
    before = set(tree_pids(os.getpid()))
    pool = make_pool(2)
    try:
        assert len(set(tree_pids(os.getpid())) - before) == 2
    finally:
        pool.shutdown(wait=True)


@pytest.mark.timeout(180)  # compiles the kernels when the numba cache is cold
def test_ctrl_c_leaves_the_polygonize_pool_to_the_parent() -> None:
    """Ctrl-C in a terminal sends SIGINT to the workers too. They must leave the stopping to the
    parent (its finally shuts the pool down): a worker that took it printed a traceback, and a
    Ctrl-C mid-run sometimes left the command hanging after 'interrupted'."""
    pool = make_pool(2)
    assert pool is not None
    try:
        # NOTE: the signal goes to workers that have run their initializer: one still starting
        # up has not yet set it aside (the parent, which the terminal signals too, stops then)
        pids: set[int] = set()
        while len(pids) < 2:
            pids |= {f.result(timeout=30) for f in [pool.submit(_pid_after, 0.2) for _ in "ab"]}
        for pid in pids:
            os.kill(pid, signal.SIGINT)
        time.sleep(0.5)
        assert pool.submit(int, "7").result(timeout=30) == 7  # the workers are still there
    finally:
        pool.shutdown(wait=True)


def _pid_after(seconds: float) -> int:
    time.sleep(seconds)
    return os.getpid()


def test_a_second_ctrl_c_does_not_cut_short_the_wait_for_the_workers() -> None:
    """Workers ignore Ctrl-C, so the parent's wait for them must not be cut short by another:
    that left them waiting for work and the command hanging at exit, joining them."""
    pool = cf.ProcessPoolExecutor(1, mp_context=mp.get_context("fork"), initializer=ignore_sigint)
    fut = pool.submit(time.sleep, 1.0)
    fut2 = pool.submit(time.sleep, 1.0)  # queued: dropped
    timer = threading.Timer(0.3, os.kill, (os.getpid(), signal.SIGINT))
    timer.start()
    try:
        close_pool(pool)
    except KeyboardInterrupt:
        pytest.fail("the second Ctrl-C cut the pool's shutdown short")
    finally:
        timer.join()
    assert fut.done() and (fut2.cancelled() or fut2.done())


def test_a_sigterm_does_not_cut_short_the_wait_for_the_workers_either() -> None:
    """Inside stop_signals a SIGTERM raises as a Ctrl-C does; one that came while an error's
    clean-up waited for the workers cut that wait short. It is set aside there too, and the
    command's handler is back afterwards."""
    from postproc.pools import stop_signals

    pool = cf.ProcessPoolExecutor(1, mp_context=mp.get_context("fork"), initializer=ignore_sigint)
    fut = pool.submit(time.sleep, 1.0)
    fut2 = pool.submit(time.sleep, 1.0)  # queued: dropped
    timer = threading.Timer(0.3, os.kill, (os.getpid(), signal.SIGTERM))
    with stop_signals():
        handler = signal.getsignal(signal.SIGTERM)
        timer.start()
        try:
            close_pool(pool)
        except KeyboardInterrupt:
            pytest.fail("the SIGTERM cut the pool's shutdown short")
        finally:
            timer.join()
        assert signal.getsignal(signal.SIGTERM) is handler
    assert fut.done() and (fut2.cancelled() or fut2.done())


Line = tuple[str, str | None]  # ("out" | "err", a line; None when that stream has ended)


def _lines_of(proc: subprocess.Popen) -> queue.Queue[Line]:
    """Every line ``proc`` writes, as it writes it, read by two daemon threads."""
    lines: queue.Queue[Line] = queue.Queue()

    def read(name: str, stream: IO[str]) -> None:
        for line in stream:
            lines.put((name, line.rstrip("\n")))
        lines.put((name, None))

    for name, stream in (("out", proc.stdout), ("err", proc.stderr)):
        threading.Thread(target=read, args=(name, stream), daemon=True).start()
    return lines


def _next_line(lines: queue.Queue[Line], seen: list[Line], timeout: float) -> Line:
    try:
        line = lines.get(timeout=timeout)
    except queue.Empty:
        pytest.fail(f"nothing more from the command in {timeout} s; it said {seen[-20:]}")
    seen.append(line)
    return line


@pytest.mark.multiproc  # the command and its pool of 2 workers, in a process group of their own
@pytest.mark.timeout(120)
@pytest.mark.parametrize("second", ["while_the_pool_stops", "after_interrupted"])
def test_a_second_ctrl_c_still_ends_in_one_line_and_exit_130(tmp_path: Path, second: str) -> None:
    """Ctrl-C pressed twice: the second, while the command stopped its pool and exited, sometimes
    killed it by SIGINT (exit -2) or printed an 'Exception ignored' KeyboardInterrupt traceback
    after 'interrupted'. (After that line the interpreter's teardown, up to a second with torch
    imported, runs threading's shutdown and atexit callbacks, then resets the Ctrl-C handler to
    the default one.) The second Ctrl-C while the pool stops was already set aside by close_pool
    (that case guards it); the one after 'interrupted' is the one that failed."""
    square = '"POLYGON ((0 0, 10 0, 10 10, 0 10, 0 0))"'
    truth, props = tmp_path / "t.csv", tmp_path / "p.csv"
    truth.write_text("ImageId,BuildingId,PolygonWKT_Pix,PolygonWKT_Geo\n"
                     + "".join(f"img{i},1,{square},x\n" for i in range(40)))
    props.write_text("ImageId,BuildingId,PolygonWKT_Pix,Confidence\n"
                     + "".join(f"img{i},1,{square},1\n" for i in range(40)))
    worker = Path(__file__).with_name("ctrl_c_worker.py")  # postproc.score with slow chunks
    # start_new_session: a process group of its own, which the test signals as a terminal would
    proc = subprocess.Popen([sys.executable, str(worker), "--truth", str(truth), "--proposals",
                             str(props), "--workers", "2"], cwd=REPO, env=worker_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    seen: list[Line] = []
    try:
        lines = _lines_of(proc)
        # NOTE: signalled only once both workers run a chunk: their initializer has set Ctrl-C
        # aside by then (one still starting up would die of it, another failure than this one)
        running: set[str] = set()
        while len(running) < 2:
            name, line = _next_line(lines, seen, 60)
            if name == "out" and line is not None and line.startswith("worker "):
                running.add(line)
        os.killpg(proc.pid, signal.SIGINT)
        if second == "after_interrupted":  # in the interpreter's teardown
            while _next_line(lines, seen, 30) != ("err", "interrupted"):
                pass
        # (while_the_pool_stops: at once, while the chunks in flight finish)
        with contextlib.suppress(ProcessLookupError):  # (it may be gone already)
            os.killpg(proc.pid, signal.SIGINT)
        rc = proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            kill_tree(proc.pid)
            proc.wait(timeout=30)
    ended = {name for name, line in seen if line is None}
    while len(ended) < 2:  # the rest of what it said
        name, line = _next_line(lines, seen, 30)
        if line is None:
            ended.add(name)
    said = [line for name, line in seen if name == "err" and line and not line.startswith("score:")]
    assert (rc, said) == (130, ["interrupted"]), seen[-20:]


def test_score_keeps_its_own_reason_when_the_group_start_fails(tmp_path, monkeypatch, capsys):
    """A rank whose share failed waits in dist.init for the others' shares; if that start-up
    times out, its own reason (not the store's timeout) is what it says."""
    from trainer import dist

    def late(env, *a, **kw):  # type: ignore[no-untyped-def]
        raise RuntimeError("wait timeout after 600000ms")

    monkeypatch.setattr(dist, "init", late)
    truth, props = tmp_path / "truth.csv", tmp_path / "props.csv"
    truth.write_text("ImageId,BuildingId,PolygonWKT_Pix,PolygonWKT_Geo\n"
                     'a,1,"POLYGON ((0 0, 9 0, 9 9, 0 0))",x\n')
    props.write_text("ImageId,BuildingId,PolygonWKT_Pix,Confidence\n"
                     'a,1,"POLYGON ((0 0",1\n')
    assert run_main(score.main, ["--truth", str(truth), "--proposals", str(props),
                                 "--workers", "1"]) == 2
    err = capsys.readouterr().err
    assert "props.csv:2: malformed WKT" in err and "wait timeout" not in err


def _raise(e: BaseException) -> int:
    raise e


def test_exit_codes_of_interrupts_and_unexpected_errors(capsys: pytest.CaptureFixture[str]) -> None:
    """Ctrl-C is exit 130 (what a shell reports for SIGINT) with one word; another rank's failure
    is one line and 2; any other RuntimeError is a bug and keeps its traceback."""
    before = signal.getsignal(signal.SIGINT)
    try:
        assert exit_on_error(lambda: _raise(KeyboardInterrupt())) == 130
        # a further Ctrl-C, while the process exits with that code, is ignored
        assert signal.getsignal(signal.SIGINT) == signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, before)  # (pytest's own Ctrl-C)
    assert capsys.readouterr().err == "interrupted\n"
    assert exit_on_error(lambda: _raise(RankError("rank 1 failed: disk full"))) == 2
    assert capsys.readouterr().err == "error: rank 1 failed: disk full\n"
    with pytest.raises(RuntimeError, match="a bug"):
        exit_on_error(lambda: _raise(RuntimeError("a bug")))


@pytest.mark.parametrize(("failure", "code"), [
    (BrokenProcessPool("A process in the process pool was terminated abruptly"), 1),
    (OSError(errno.ENOSPC, "No space left on device"), 2),  # (a path that cannot be used)
    # (an OSError while the outputs are written, dataio.atomic.writing: a full disk)
    (atomic.WriteError(errno.ENOSPC, "No space left on device", "p.csv"), 1),
    (ValueError("shard-000001.tar: not a prediction shard"), 2),
])
def test_the_other_ranks_exit_as_the_failing_one(failure: Exception, code: int,
                                                 monkeypatch: pytest.MonkeyPatch,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    """Under torchrun, a rank whose pool worker died exits 1 (the BrokenExecutor clause), but
    the others, told by the agreement (a RankError), exited 2 as for bad input: torchrun's
    summary said one or the other by which rank ended first. Now each relayed failure exits
    as it does on its own rank; the agreement's own path, as in polygonize and score."""
    from trainer import dist

    alone = exit_on_error(lambda: _raise(failure))  # (the failing rank's own code)
    monkeypatch.setattr(dist, "gather_objects", lambda mine: [mine, dist._said(failure)])
    assert (alone, exit_on_error(lambda: dist.agree_on("scoring", None) or 0)) == (code, code)
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"error: rank 1 stopped while scoring: {type(failure).__name__}: {failure}")


def test_the_other_ranks_of_a_failing_ranks_bug_exit_1_as_it_does(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A bug keeps its traceback on its rank (the interpreter's exit code 1); the other ranks
    say its line and exit 1 too, not 2 as for bad input."""
    from trainer import dist

    bug = KeyError("tile")
    with pytest.raises(KeyError):
        exit_on_error(lambda: _raise(bug))
    monkeypatch.setattr(dist, "gather_objects", lambda mine: [mine, dist._said(bug)])
    assert exit_on_error(lambda: dist.agree_on("scoring", None) or 0) == 1


def test_a_lost_peer_is_one_line_and_exit_code_1(capsys: pytest.CaptureFixture[str],
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """Under torchrun (polygonize, score), a peer killed mid-run raised gloo's or NCCL's text
    with a traceback: now trainer.dist.describe_failure's line, exit 1 as for a dead worker."""
    import torch.distributed

    monkeypatch.setenv("RANK", "1")
    lost = torch.distributed.DistBackendError("NCCL error in: x.cpp:77, remote process exited "
                                              "or there was a network error\nLast error: ...")
    assert exit_on_error(lambda: _raise(lost)) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: rank 1: a peer rank left the process group") and \
        err.count("\n") == 1, err
    assert "remote process exited" in err and "Last error" not in err


@pytest.mark.parametrize("layout", ["same", "under", "tile_name"])
def test_a_csv_and_geojson_dir_that_collide_are_refused_before_the_work(
        pred_dir, tmp_path, capsys, layout):
    """(--geojson same as --out, or under it: the CSV's commit failed after the work, "Is a
    directory", and left that directory with a .publishing mark; --out DIR/<ImageId>.geojson:
    the tile's GeoJSON replaced the CSV, which the command said it wrote)"""
    gj = tmp_path / "gj"
    out, geojson = {"same": (gj, gj), "under": (gj, gj / "tiles"),
                    "tile_name": (gj / "AOI_9_Test_img1.geojson", gj)}[layout]
    assert run_main(polygonize.main, ["--pred", str(pred_dir[0]), "--out", str(out),
                                      "--geojson", str(geojson), "--no-tuned",
                                      "--workers", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: --") and "--geojson" in err[-1] and "--out" in err[-1]
    assert not gj.exists()


def _dies(*_args: object) -> None:
    """A pool task whose process dies, as one the OOM killer took (pickled by name)."""
    os._exit(9)


@pytest.mark.timeout(180)  # compiles the kernels when the numba cache is cold
def test_a_worker_that_dies_is_one_line_and_exit_1(pred_dir, tmp_path, monkeypatch, capsys):
    """(a pool worker killed, e.g. by the OOM killer: a BrokenProcessPool traceback)"""
    monkeypatch.setattr(runner, "_tiles_to_rows", _dies)
    out = tmp_path / "p.csv"
    assert run_main(polygonize.main, ["--pred", str(pred_dir[0]), "--out", str(out),
                                      "--no-tuned", "--workers", "2"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: a worker process died (killed")
    assert not any("Traceback" in line for line in err)
    assert not out.exists()


def test_a_second_ctrl_c_cannot_cut_the_first_ones_clean_up_short() -> None:
    """The first Ctrl-C unwinds through the pool's shutdown (close_pool), which sets Ctrl-C aside
    only once it runs. A second press landing in between cut that short: the pool was never shut
    down, and at exit the interpreter ran every queued chunk first (the 'while the pool stops'
    case above hung past 60 s on a loaded machine). From the first press on, Ctrl-C is ignored."""
    before = signal.getsignal(signal.SIGINT)
    cleaned: list[bool] = []

    def main() -> int:
        try:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(5)  # (the KeyboardInterrupt comes first)
        finally:  # a second press while the first one's clean-up runs
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)
            cleaned.append(True)
        return 0

    try:
        assert exit_on_error(main) == 130
    finally:
        signal.signal(signal.SIGINT, before)  # (pytest's own Ctrl-C)
    assert cleaned == [True]


def test_a_command_that_ends_leaves_ctrl_c_as_it_found_it() -> None:
    before = signal.getsignal(signal.SIGINT)
    assert exit_on_error(lambda: 0) == 0
    assert exit_on_error(lambda: _raise(ValueError("bad input"))) == 2
    assert signal.getsignal(signal.SIGINT) is before



class _Writes:
    """A stderr that records each write call."""

    def __init__(self) -> None:
        self.writes: list[str] = []

    def write(self, text: str) -> int:
        self.writes.append(text)
        return len(text)

    def flush(self) -> None:
        pass


def _raises(e: BaseException) -> Callable[..., int]:
    def main(*args: object) -> int:
        raise e

    return main


@pytest.mark.parametrize("case", ["postproc-ctrl-c", "postproc-error", "train-ctrl-c",
                                  "train-error", "predict-ctrl-c", "predict-error"])
def test_a_ranks_last_line_is_one_write(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                        case: str) -> None:
    """Under torchrun every rank's stderr is one pipe: print's two writes (text, newline) from two
    ranks ran both ranks' 'interrupted' lines into one ('... is left as it wastrainer.predict:
    interrupted; ...'). Each line is one write now, which a pipe does not split."""
    from trainer import predict, train

    err = _Writes()
    monkeypatch.setattr(sys, "stderr", err)
    monkeypatch.setattr(signal, "signal", lambda *a: signal.SIG_DFL)  # (the test's own Ctrl-C)
    missing = str(tmp_path / "missing")
    if case == "postproc-ctrl-c":
        code = exit_on_error(_raises(KeyboardInterrupt()))
    elif case == "postproc-error":
        code = exit_on_error(_raises(ValueError("bad")))
    elif case == "train-ctrl-c":
        monkeypatch.setattr(train, "_train", _raises(KeyboardInterrupt()))
        code = train.main(["--config", missing, "--data", missing, "--run-dir", missing])
    elif case == "train-error":  # (no such config)
        code = train.main(["--config", missing, "--data", missing, "--run-dir", missing])
    elif case == "predict-ctrl-c":
        monkeypatch.setattr(predict, "_predict", _raises(KeyboardInterrupt()))
        code = predict.main(["--run-dir", missing, "--data", missing, "--out", missing])
    else:  # (no checkpoint)
        code = predict.main(["--run-dir", missing, "--data", missing, "--out", missing])
    assert code == (130 if case.endswith("ctrl-c") else 2)
    assert len(err.writes) == 1 and err.writes[0].count("\n") == 1, err.writes
    assert err.writes[0].endswith("\n")


def test_an_out_link_that_loops_is_refused_naming_it(pred_dir, tmp_path, capsys):
    """--out LOOP (a link to itself) with --geojson: checking the two apart followed its links,
    and Python's RuntimeError ("Symlink loop") left as a traceback with exit 1. Now one line
    naming the flag and the link, exit 2, before any work."""
    loop = tmp_path / "loop.csv"
    loop.symlink_to(loop.name)
    argv = ["--pred", str(pred_dir[0]), "--out", str(loop), "--geojson", str(tmp_path / "gj"),
            "--workers", "1", "--no-tuned"]
    assert run_main(polygonize.main, argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"--out {loop}: its symbolic links cannot be followed" in err[0], err
    assert loop.is_symlink() and not (tmp_path / "gj").exists()


@pytest.mark.parametrize("where", STDOUT_ENDS)
def test_a_full_or_closed_stdout_pushes_polygonize_but_not_score(pred_dir, tmp_path, capsys,
                                                                  monkeypatch, where):
    """Polygonize's CSV is complete before its report line: a closed stdout (| head -0, exit 1
    quietly) or a full one skipped its push, which came after the report. Score's figures are
    its output (and its --json is written after them): not delivered, no success pushed."""
    pushed = []
    monkeypatch.setattr(pushmetrics, "push_to_gateway",
                        lambda _url, job, registry, **_kw: pushed.append((job, registry)))
    pred, truth = pred_dir
    out = tmp_path / "p.csv"
    gateway = ("--pushgateway", "http://127.0.0.1:9091")
    with unbuffered_stdout(where):
        code = run_main(polygonize.main, ["--pred", str(pred), "--out", str(out), "--workers",
                                          "1", "--no-tuned", *gateway])
    check_stdout_failure(where, code, capsys.readouterr().err)
    rows = [r for r in out.read_text().splitlines()[1:] if "POLYGON EMPTY" not in r]
    [(job, registry)] = pushed
    assert job == "footprints_polygonize"
    assert registry.get_sample_value("footprints_postproc_polygons_total") == len(rows)
    with unbuffered_stdout(where):
        code = run_main(score.main, ["--truth", str(truth), "--proposals", str(out),
                                     "--workers", "1", *gateway])
    check_stdout_failure(where, code, capsys.readouterr().err)
    assert len(pushed) == 1
