"""postproc.render: outlines of each outcome colour where those polygons are, and nowhere else;
training curves; bad input.

Proposals are made from the truth so that every outcome is known: kept truth polygons are true
positives, omitted ones are missed, shrunk ones are false positives (IoU 0.25) whose truth is
missed, and boxes far from any building are false positives.
"""

from __future__ import annotations

import csv
import errno
import io
import json
import math
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import shapely
from PIL import Image
from pp_helpers import STDOUT_ENDS, check_stdout_failure, unbuffered_stdout
from shapely import affinity
from shapely.geometry import box

from dataio.atomic import atomic_open
from dataio.manifest import load_manifest
from dataio.shards import decode_sample, iter_tar_samples
from postproc import render
from postproc.cli import exit_on_error
from postproc.csvio import read_truth_csv
from postproc.score import ScoreConfig, score_image

OUTCOMES = {"tp": render.TP_COLOUR, "fp": render.FP_COLOUR, "missed": render.MISSED_COLOUR}


def run_main(argv: list) -> int:
    return exit_on_error(lambda: render.main([str(a) for a in argv]))


def write_proposals(path: Path, rows: dict[str, list]) -> Path:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["ImageId", "BuildingId", "PolygonWKT_Pix", "Confidence"])
        for key, polys in rows.items():
            for k, p in enumerate(polys, start=1):
                w.writerow([key, k, p.wkt, 1.0])
    return path


def craft(truth: list, size: int, rng: np.random.Generator) -> tuple[list, dict[str, list]]:
    """(proposals in file order, the expected outlines per outcome)."""
    t = [g for g in truth if g.area > ScoreConfig().min_truth_area]
    out: dict[str, list] = {"tp": [], "fp": [], "missed": []}
    props = []
    for i, g in enumerate(t):
        if i % 4 == 0:
            out["missed"].append(g)
        elif i % 4 == 1:
            small = affinity.scale(g, 0.5, 0.5)
            props.append(small)
            out["fp"].append(small)
            out["missed"].append(g)
        else:
            props.append(g)
            out["tp"].append(g)
    everything = shapely.union_all(t).buffer(8)
    while len(out["fp"]) < len(t) // 4 + 6:
        x, y = rng.uniform(120, size - 20, 2)
        b = box(x, y, x + 10, y + 10)
        if not b.intersects(everything):
            props.append(b)
            out["fp"].append(b)
            everything = everything.union(b.buffer(8))
    return props, out


def _lines(geoms: list) -> shapely.Geometry:
    return shapely.union_all([shapely.boundary(g) for g in geoms])


def load_rgb(data: Path, split: str, key: str) -> np.ndarray:
    p2, p98 = load_manifest(data).percentiles()
    for shard in sorted((data / split).glob("shard-*.tar")):
        for k, members in iter_tar_samples(shard):
            if k == key:
                return render.display_rgb(decode_sample(members, k)[0], p2, p98)
    raise AssertionError(key)


@pytest.fixture(scope="module")
def drawn(prepared_dataset, tmp_path_factory):
    root = tmp_path_factory.mktemp("render")
    truth = read_truth_csv(prepared_dataset / "val" / "truth.csv").polygons
    key = render.pick_tiles(truth, 1, ScoreConfig())[0]
    props, expected = craft(truth[key], 650, np.random.default_rng(0))
    csv_path = write_proposals(root / "props.csv", {key: props})
    return root, key, props, expected, csv_path, truth


def test_outlines_of_each_outcome_where_the_polygons_are(prepared_dataset, drawn, capsys):
    root, key, props, expected, csv_path, truth = drawn
    assert run_main(["--data", prepared_dataset, "--split", "val", "--proposals", csv_path,
                     "--out", root / "tiles", "--tiles", 1]) == 0
    assert [p.name for p in (root / "tiles").iterdir()] == [f"{key}.png"]  # the busiest tile
    tp, fp, fn = len(expected["tp"]), len(expected["fp"]), len(expected["missed"])
    assert (tp, fp, fn) == score_image(truth[key], props) and min(tp, fp, fn) > 3
    assert f"TP {tp}  FP {fp}  missed {fn}" in capsys.readouterr().out
    with Image.open(root / "tiles" / f"{key}.png") as im:
        assert im.format == "PNG" and im.mode == "RGB" and im.size == (650, 650)
        png = np.asarray(im)
    base = load_rgb(prepared_dataset, "val", key)
    h, w = base.shape[:2]
    x0, y0, x1, y1 = render.legend_box(w, h)
    legend = np.zeros((h, w), bool)
    legend[y0:y1 + 3, x0:x1 + 3] = True
    lines = {k: _lines(v) for k, v in expected.items()}
    for name, colour in OUTCOMES.items():
        is_c = (png == colour).all(axis=2) & (png != base).any(axis=2) & ~legend
        # nowhere far: every pixel drawn in this colour lies on an outline of this outcome
        ys, xs = np.nonzero(is_c)
        d = shapely.distance(shapely.points(xs + 0.5, ys + 0.5), lines[name])
        assert xs.size > 100 and d.max() <= 2.5, (name, xs.size, d.max())
        # on the outlines: sample them every 2 px, away from the legend, the tile edge and the
        # other outcomes' outlines (drawn over each other where they come close)
        others = shapely.union_all([v for k, v in lines.items() if k != name])
        line = lines[name]
        pts = shapely.line_interpolate_point(line, np.arange(0, line.length, 2.0))
        hits = total = 0
        for p in pts:
            x, y = int(math.floor(p.x)), int(math.floor(p.y))
            if not (3 <= x < w - 3 and 3 <= y < h - 3) or legend[y, x] or \
                    shapely.distance(p, others) < 4:
                continue
            total += 1
            hits += bool(is_c[y - 1:y + 2, x - 1:x + 2].any())
        assert total > 50 and hits / total >= 0.98, (name, hits, total)


def test_image_ids_and_tiles_without_proposals(prepared_dataset, drawn, tmp_path):
    _, key, _, _, csv_path, truth = drawn
    other = next(k for k in truth if k != key)
    assert run_main(["--data", prepared_dataset, "--split", "val", "--proposals", csv_path,
                     "--out", tmp_path, "--image-ids", other]) == 0
    with Image.open(tmp_path / f"{other}.png") as im:
        png = np.asarray(im)
    base = load_rgb(prepared_dataset, "val", other)
    changed = (png != base).any(axis=2)
    x0, y0, x1, y1 = render.legend_box(*png.shape[1::-1])
    changed[y0:y1, x0:x1] = False
    # no proposals for this tile: only missed truth is drawn
    assert (png[changed] == render.MISSED_COLOUR).all(axis=1).mean() > 0.9
    assert not (png[changed] == render.TP_COLOUR).all(axis=1).any()


def test_a_rerun_leaves_only_its_own_tiles(prepared_dataset, drawn, tmp_path):
    _, _, _, _, csv_path, truth = drawn
    out = tmp_path / "tiles"
    base = ["--data", prepared_dataset, "--split", "val", "--proposals", csv_path, "--out", out]
    assert run_main([*base, "--tiles", "2"]) == 0
    first = sorted(p.name for p in out.glob("*.png"))
    assert len(first) == 2
    # PNGs this command did not write stay, whatever their names
    Image.new("RGB", (4, 4)).save(out / "curves.png")
    (out / "notes.txt").write_text("mine")
    assert run_main([*base, "--tiles", "1"]) == 0
    top = render.pick_tiles(truth, 1, ScoreConfig())[0] + ".png"
    assert top in first
    assert sorted(p.name for p in out.iterdir()) == sorted([top, "curves.png", "notes.txt"])


def test_an_io_error_removing_an_earlier_tile_is_a_failure_of_the_run(
        prepared_dataset, drawn, tmp_path, monkeypatch, capsys):
    """Removing an earlier render's tile is part of the output step, after --out was checked:
    an EIO there is the disk's, exit 1 in one line naming the tile, as for a tile's write (it
    was 2, as for bad input)."""
    _, _, _, _, csv_path, _ = drawn
    out = tmp_path / "tiles"
    base = ["--data", prepared_dataset, "--split", "val", "--proposals", csv_path, "--out", out]
    assert run_main([*base, "--tiles", "2"]) == 0
    real = Path.unlink

    def eio(self: Path, missing_ok: bool = False) -> None:
        if self.parent == out:  # (an earlier tile in --out; not a temporary file in the stage)
            raise OSError(errno.EIO, "Input/output error", str(self))
        real(self, missing_ok)

    monkeypatch.setattr(Path, "unlink", eio)
    capsys.readouterr()
    assert run_main([*base, "--tiles", "1"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(f"error: [Errno 5] Input/output error: '{out}/"), err


def test_a_closed_stdout_still_removes_the_earlier_tiles(prepared_dataset, drawn, tmp_path,
                                                         monkeypatch, capsys):
    """``render ... | head -0`` where stdout is unbuffered (python -u): the report's print, which
    came before the removal of an earlier render's tiles, met the closed pipe, and the run
    ended quietly with exit 1 with --out holding the new tile beside an earlier one it was to
    remove. The report now comes after the output step: --out whole, then the quiet exit 1."""
    _, _, _, _, csv_path, _ = drawn
    out = tmp_path / "tiles"
    base = ["--data", prepared_dataset, "--split", "val", "--proposals", csv_path, "--out", out]
    assert run_main([*base, "--tiles", "2"]) == 0
    assert len(list(out.glob("*.png"))) == 2
    read, write = os.pipe()
    os.close(read)
    closed = io.TextIOWrapper(io.FileIO(write, "w"), write_through=True)  # (python -u's)
    monkeypatch.setattr(sys, "stdout", closed)
    capsys.readouterr()
    assert run_main([*base, "--tiles", "1"]) == 1
    monkeypatch.undo()
    closed.close()  # (a descriptor on /dev/null now: end_quietly's)
    assert len(list(out.glob("*.png"))) == 1, sorted(p.name for p in out.iterdir())
    assert "error" not in capsys.readouterr().err


@pytest.mark.parametrize("where", STDOUT_ENDS)
def test_a_full_or_closed_unbuffered_stdout_exits_1(prepared_dataset, drawn, tmp_path, capsys,
                                                    where):
    """``python -u -m postproc.render ... > /dev/full``: the report's print (of the tiles, and
    of --curves) raised a bare OSError, exit 2 ("fix the input"), where polygonize and score
    exit 1 (a failure of the run); a closed stdout (``| head -0``) ends quietly with 1. The
    pictures are written before."""
    _, key, _, _, csv_path, _ = drawn
    out = tmp_path / "tiles"
    with unbuffered_stdout(where):
        code = run_main(["--data", prepared_dataset, "--split", "val", "--proposals", csv_path,
                         "--out", out, "--image-ids", key])
    check_stdout_failure(where, code, capsys.readouterr().err)
    assert [p.name for p in out.iterdir()] == [f"{key}.png"]
    log, curves = tmp_path / "log.jsonl", tmp_path / "curves.png"
    log.write_text("".join(json.dumps({"epoch": e, "train_loss": 1.0 / e, "lr": 1e-3}) + "\n"
                           for e in (1, 2)))
    with unbuffered_stdout(where):
        code = run_main(["--curves", log, "--out", curves])
    check_stdout_failure(where, code, capsys.readouterr().err)
    assert curves.exists()


def test_a_directory_under_a_tile_name_in_out_is_refused_naming_it(prepared_dataset, drawn,
                                                                     tmp_path, capsys):
    """A directory the user made in --out under a tile's name (<ImageId>.png): the tile's move
    onto it failed after the drawing, exit 1, as for a full disk ("rerun once there is
    room"). The user must move it: one line naming it, exit 2, before any work; --out as it
    was. A link to a directory is a name like a file's: replaced, as before."""
    _, key, _, _, csv_path, _ = drawn
    out = tmp_path / "tiles"
    (out / f"{key}.png").mkdir(parents=True)
    (out / f"{key}.png" / "mine.txt").write_text("mine")
    base = ["--data", prepared_dataset, "--split", "val", "--proposals", csv_path, "--out", out,
            "--image-ids", key]
    capsys.readouterr()
    assert run_main(base) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: --out {out}: {out / key}.png is a directory, where tile {key}'s "
                   "picture goes; move it away or give another --out"], err
    assert sorted(p.name for p in out.iterdir()) == [f"{key}.png"]
    assert (out / f"{key}.png" / "mine.txt").read_text() == "mine"

    (out / f"{key}.png").rename(tmp_path / "elsewhere")
    (out / f"{key}.png").symlink_to(tmp_path / "elsewhere")
    assert run_main(base) == 0
    assert (out / f"{key}.png").is_file() and not (out / f"{key}.png").is_symlink()


@pytest.mark.parametrize("stop", ["ctrl_c", "error"])
def test_a_stopped_render_leaves_no_new_out(prepared_dataset, drawn, tmp_path, monkeypatch,
                                            capsys, stop):
    """Stopped at the first tile (a Ctrl-C while it was drawn, a full disk as it was written),
    a new --out stayed, empty: render made it before it drew anything. trainer.predict leaves
    no --out it made so. The full disk exits 1, a failure of the run, in one line naming the
    tile (it was 2, as for bad input)."""
    _, _, _, _, csv_path, _ = drawn

    def pressed(*args: object) -> None:
        raise KeyboardInterrupt

    def full(path: Path, data: bytes) -> None:
        with atomic_open(path, "wb"):
            raise OSError(errno.ENOSPC, "No space left on device")

    if stop == "ctrl_c":
        monkeypatch.setattr(render, "draw_tile", pressed)
    else:
        monkeypatch.setattr(render, "atomic_write_bytes", full)
    out = tmp_path / "tiles"
    assert run_main(["--data", prepared_dataset, "--split", "val", "--proposals", csv_path,
                     "--out", out]) == (130 if stop == "ctrl_c" else 1)
    assert not out.exists()
    if stop != "ctrl_c":
        err = capsys.readouterr().err.strip().splitlines()
        assert err[-1].startswith("error: [Errno 28] No space left on device: "
                                  f"'{out / '.partial'}/"), err


@pytest.mark.parametrize("stop", ["ctrl_c", "error"])
def test_a_render_stopped_part_way_leaves_the_earlier_tiles_as_they_were(
        prepared_dataset, drawn, tmp_path, monkeypatch, stop):
    """Each tile went into --out as it was drawn, and an earlier render's tiles that this one
    would remove went only at its end: stopped at its second tile (a Ctrl-C, a full disk),
    a render over another's tiles left the two mixed (its first tile new beside the earlier
    one). Now --out is as it was, and no stage is left in it."""
    _, _, _, _, csv_path, truth = drawn
    out = tmp_path / "tiles"
    base = ["--data", prepared_dataset, "--split", "val", "--out", out]
    ids = render.pick_tiles(truth, 2, ScoreConfig())
    assert run_main([*base, "--proposals", csv_path, "--image-ids", ids[1]]) == 0
    earlier = {p.name: p.read_bytes() for p in out.iterdir()}
    real, drawn_tiles = render.draw_tile, []

    def stopped_at_the_second(*args: object) -> object:
        if drawn_tiles:
            if stop == "ctrl_c":
                raise KeyboardInterrupt
            raise OSError(errno.ENOSPC, "No space left on device")
        drawn_tiles.append(1)
        return real(*args)

    monkeypatch.setattr(render, "draw_tile", stopped_at_the_second)
    assert run_main([*base, "--proposals", csv_path, "--image-ids", ids[0], ids[1]]) == (
        130 if stop == "ctrl_c" else 1)  # (a full disk: a failure of the run; it was 2)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == earlier


def test_data_and_split_from_provenance(prepared_dataset, drawn, tmp_path):
    _, key, _, _, csv_path, _ = drawn
    pred = tmp_path / "PRED"
    pred.mkdir()
    (pred / "provenance.json").write_text(json.dumps({"data": str(prepared_dataset),
                                                      "split": "val"}))
    assert run_main(["--pred", pred, "--proposals", csv_path, "--out", tmp_path / "o",
                     "--image-ids", key]) == 0
    assert (tmp_path / "o" / f"{key}.png").is_file()
    # --data and --split given beside --pred win over its provenance
    (pred / "provenance.json").write_text(json.dumps({"data": str(tmp_path / "elsewhere"),
                                                      "split": "test"}))
    assert run_main(["--pred", pred, "--data", prepared_dataset, "--split", "val",
                     "--proposals", csv_path, "--out", tmp_path / "o2", "--image-ids", key]) == 0
    assert (tmp_path / "o2" / f"{key}.png").is_file()


def test_curves_png(tmp_path, capsys):
    log = tmp_path / "log.jsonl"
    rows = []
    for e in range(1, 13):
        r = {"epoch": e, "train_loss": 1.0 / e, "lr": 1e-3}
        if e % 2 == 0:
            r.update(val_loss=1.2 / e, val_iou=1 - 0.7 / e, val_f1=1 - 1.0 / e,
                     val_precision=0.9, val_recall=0.8)
        rows.append(json.dumps(r))
    rows.insert(3, json.dumps({"epoch": 4, "train_loss": float("nan")}))  # a resumed epoch 4
    log.write_text("\n".join(rows) + "\n")
    out = tmp_path / "report" / "curves.png"
    assert run_main(["--curves", log, "--out", out]) == 0
    assert "12 epochs" in capsys.readouterr().out
    with Image.open(out) as im:
        assert im.format == "PNG" and im.size == (1000, 400)
        rgb = np.asarray(im.convert("RGB")).astype(int)
    assert len(np.unique(rgb.reshape(-1, 3), axis=0)) > 50
    # matplotlib's first two line colours, in both panels (losses left, val metrics right)
    for colour in ((31, 119, 180), (255, 127, 14)):
        near = (np.abs(rgb - colour).sum(axis=2) < 30)
        assert near[:, :500].sum() > 100 and near[:, 500:].sum() > 100, colour


def test_an_empty_proposal_csv_draws_every_building_missed(prepared_dataset, drawn, tmp_path,
                                                          capsys):
    """No proposals at all is a legitimate result (as in postproc.score), not another split."""
    _, key, _, _, _, truth = drawn
    empty = write_proposals(tmp_path / "empty.csv", {})
    assert run_main(["--data", prepared_dataset, "--split", "val", "--proposals", empty,
                     "--out", tmp_path / "o", "--image-ids", key]) == 0
    fn = score_image(truth[key], [])[2]
    assert fn > 0 and f"TP 0  FP 0  missed {fn}" in capsys.readouterr().out


@pytest.mark.parametrize("case", ["unknown_id", "no_proposals_file", "no_data", "curves_out",
                                  "bad_log", "no_log", "no_manifest", "other_split"])
def test_bad_input_is_one_line(prepared_dataset, drawn, tmp_path, capsys, case):
    csv_path = drawn[4]
    argv = ["--data", prepared_dataset, "--split", "val", "--proposals", csv_path, "--out",
            tmp_path / "o"]
    if case == "unknown_id":
        argv += ["--image-ids", "AOI_2_Vegas_img99999"]
        want = "--image-ids AOI_2_Vegas_img99999: not in"
    elif case == "no_proposals_file":
        argv[5] = tmp_path / "nope.csv"
        want = "nope.csv: file not found"
    elif case == "no_data":
        argv = argv[2:]
        want = "pass --data"
    elif case == "curves_out":
        argv = ["--curves", tmp_path / "log.jsonl", "--out", tmp_path / "o"]
        want = "--out"
    elif case == "bad_log":
        (tmp_path / "log.jsonl").write_text('{"epoch": 1, "train_loss": 1}\n{"epoch": \n')
        argv = ["--curves", tmp_path / "log.jsonl", "--out", tmp_path / "c.png"]
        want = "log.jsonl:2: not an epoch record"
    elif case == "no_log":
        argv = ["--curves", tmp_path / "log.jsonl", "--out", tmp_path / "c.png"]
        want = "training log not found"
    elif case == "other_split":  # the test split's proposals drawn on val: all missed before
        test_ids = read_truth_csv(prepared_dataset / "test" / "truth.csv").polygons
        argv[5] = write_proposals(tmp_path / "test.csv", {k: [box(0, 0, 30, 30)]
                                                          for k in test_ids})
        want = (f"--proposals {argv[5]}: no ImageId in common with the val truth "
                f"{prepared_dataset / 'val' / 'truth.csv'}")
    else:
        argv[1] = tmp_path
        want = "manifest.json: not found"
    assert run_main(argv) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("error:") and want in last, last
    assert not (tmp_path / "o").exists() and not (tmp_path / "c.png").exists()


def _damaged_copy(small_dataset: Path, root: Path, how: str) -> tuple[Path, Path, list[str]]:
    """A copy of the dataset whose train shard-000001.tar (4 samples) is damaged at its third
    sample: cut inside the image bytes, cut at the member header, the header overwritten, or
    its first header block zeroed (the one case only the manifest's sample count reveals).
    Returns (DATA, the shard, its keys in file order)."""
    data = root / "DATA"
    shutil.copytree(small_dataset, data)
    shard = data / "train" / "shard-000001.tar"
    lines = shard.with_suffix(".idx").read_text().splitlines()[1:]
    keys = [line.split()[3].partition(".")[0] for line in lines]
    img_at = int(lines[2].split()[1])  # (the third sample's img.npy: its first member)
    if how == "truncated":
        with open(shard, "r+b") as f:
            f.truncate(img_at + 1000)
    elif how == "cut_at_header":  # (tarfile reads a shard cut so as ending there, unsaid)
        with open(shard, "r+b") as f:
            f.truncate(img_at - 512)
    elif how == "zeroed_header":  # (tarfile takes a zero block for the archive's end, unsaid)
        with open(shard, "r+b") as f:
            f.seek(img_at - 1536)  # (the member's first header: a pax one, its data, then ustar)
            f.write(bytes(512))
    else:
        with open(shard, "r+b") as f:
            # (the header's checksum field, made not octal: tarfile refuses the header)
            f.seek(img_at - 512 + 148)
            f.write(b"XXXXXX")
    return data, shard, keys


@pytest.mark.parametrize("how", ["truncated", "cut_at_header", "bad_header", "zeroed_header"])
def test_a_damaged_shard_skips_the_tiles_it_cannot_read(small_dataset, tmp_path, capsys, how):
    """A truncated or damaged data shard stopped the render at its first unreadable tile, with
    every tile undrawn. Now the tiles before the damage are drawn, the ones after it skipped;
    the shard is named once with the reason, the skipped tiles counted, and the exit code is 0."""
    data, shard, keys = _damaged_copy(small_dataset, tmp_path, how)
    other = next(line.split(",")[0] for line in
                 (data / "train" / "truth.csv").read_text().splitlines()[1:]
                 if line.split(",")[0] not in keys)
    props = write_proposals(tmp_path / "props.csv", {})
    out = tmp_path / "tiles"
    assert run_main(["--data", data, "--split", "train", "--proposals", props, "--out", out,
                     "--image-ids", *keys, other]) == 0
    std = capsys.readouterr()
    assert sorted(p.name for p in out.iterdir()) == sorted(f"{k}.png" for k in
                                                           [*keys[:2], other])
    warned = [line for line in std.err.splitlines() if str(shard) in line]
    why = {"truncated": "(truncated or changed)", "cut_at_header": "(truncated or changed)",
           "bad_header": "unreadable tar",
           "zeroed_header": "2 samples read, manifest says 4 (a damaged member header)"}[how]
    assert len(warned) == 1 and warned[0].startswith("warning: damaged shard:"), std.err
    assert why in warned[0], warned
    assert (f"2 of the 5 tiles were left out, not readable from 1 damaged shard: "
            f"{keys[2]}, {keys[3]}") in std.out


def test_a_damaged_shard_with_no_readable_wanted_tile_is_an_error(small_dataset, tmp_path,
                                                                   capsys):
    data, shard, keys = _damaged_copy(small_dataset, tmp_path, "truncated")
    props = write_proposals(tmp_path / "props.csv", {})
    out = tmp_path / "tiles"
    assert run_main(["--data", data, "--split", "train", "--proposals", props, "--out", out,
                     "--image-ids", *keys[2:]]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == (f"error: no tile of split 'train' of {data} could be read: the 2 wanted "
                       "are not in the readable part of 1 damaged shard (see the warnings above)")
    assert str(shard) in err[-2] and not out.exists()


def test_help_exits_zero(capsys):
    with pytest.raises(SystemExit) as e:
        render.main(["--help"])
    assert e.value.code == 0 and "--curves" in capsys.readouterr().out


def test_a_mul_dataset_is_drawn_as_its_red_green_blue_bands(mul_dataset, tmp_path, capsys):
    """MUL-PanSharpen tiles are drawn from bands 5, 3, 2, said in a line and in each PNG (before:
    bands 1-3, coastal, blue and green: a bluish picture unlike the scene)."""
    csv_path = write_proposals(tmp_path / "props.csv", {})  # (every building drawn missed)
    assert run_main(["--data", mul_dataset, "--split", "train", "--proposals", csv_path,
                     "--out", tmp_path / "tiles", "--tiles", 2]) == 0
    shown = "MUL-PanSharpen bands 5, 3, 2 as red, green, blue"
    assert capsys.readouterr().out.splitlines()[0] == f"tiles show {shown}"
    p2, p98 = load_manifest(mul_dataset).percentiles()
    tiles = sorted((tmp_path / "tiles").glob("*.png"))
    assert len(tiles) == 2
    for tile in tiles:
        with Image.open(tile) as im:
            assert im.info[render.COMPOSITE_KEY] == shown
            png = np.asarray(im.convert("RGB"))
        shards = sorted((mul_dataset / "train").glob("shard-*.tar"))
        img = next(decode_sample(m, k)[0] for s in shards for k, m in iter_tar_samples(s)
                   if k == tile.stem)
        free = np.ones(png.shape[:2], bool)  # (the legend box aside)
        x0, y0, x1, y1 = render.legend_box(png.shape[1], png.shape[0])
        free[y0:y1, x0:x1] = False
        same = (png == render.display_rgb(img, p2, p98, (5, 3, 2))).all(-1)[free].mean()
        first3 = (png == render.display_rgb(img, p2, p98)).all(-1)[free].mean()
        assert img.shape[2] == 8 and same > 0.8 and first3 < 0.1  # (outlines aside)


def test_pick_tiles_counts_truth_as_the_scorer_does_at_min_truth_area() -> None:
    """A truth polygon of exactly min_truth_area (20 px^2) in decimal coordinates, whose float
    area rounds a hair above 20, is dropped by the scorer; the tiles drawn rank by the same
    count, not by two buildings the score never saw."""
    exact = [box(x, x + 0.2, x + 0.8, x + 0.2 + 25) for x in (0.4, 0.9)]  # 0.8 x 25 px each
    assert all(g.area > 20 for g in exact)  # (the rounding this is about)
    truth = {"img_a": exact, "img_b": [box(0, 0, 6, 6)]}
    assert render.pick_tiles(truth, 1, ScoreConfig()) == ["img_b"]
