"""postproc.tune: exact counts per grid point, tuned >= default F1, and polygonize using the result.

Predictions are made without a model: a tile's ground-truth mask, blurred and noised, plus small
false blobs (16-64 px) of building probability, so the default area threshold (20 px) is wrong
and the thresholds matter.
"""

from __future__ import annotations

import errno
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from pp_helpers import STDOUT_ENDS, check_stdout_failure, unbuffered_stdout
from shapely.geometry import box

from dataio.shards import decode_sample, iter_tar_samples
from postproc import polygonize, score, tune
from postproc.cli import exit_on_error
from postproc.csvio import read_truth_csv
from postproc.matching import greedy_match, match_image, true_positives
from postproc.polygonize import PolygonizeConfig, polygonize_probs
from postproc.predio import PredError, write_pred_shard
from postproc.provenance import read_tuned
from postproc.score import ScoreConfig, candidate_ious, score_image


def run_main(main, argv: list) -> int:
    return exit_on_error(lambda: main([str(a) for a in argv]))


def fake_probs(mask: np.ndarray, rng: np.random.Generator, blobs: int = 30) -> np.ndarray:
    """A plausible, imperfect model output for a mask: soft edges, noise, false small blobs."""
    h, w = mask.shape
    p = np.stack([mask == k for k in range(3)], axis=2).astype(np.float32)
    pad = np.pad(p, ((1, 1), (1, 1), (0, 0)), mode="edge")
    p = sum(pad[i:i + h, j:j + w] for i in range(3) for j in range(3)) / 9  # 3x3 box blur
    p += rng.uniform(0, 0.2, p.shape).astype(np.float32)
    for _ in range(blobs):
        s = int(rng.integers(4, 9))
        y, x = int(rng.integers(0, h - s)), int(rng.integers(0, w - s))
        if (mask[max(0, y - 3):y + s + 3, max(0, x - 3):x + s + 3] == 0).all():
            p[y:y + s, x:x + s] = (0.2, 0.8, 0.1)
    p /= p.sum(axis=2, keepdims=True)
    return np.rint(p * 255).astype(np.uint8)


def write_preds(data: Path, split: str, pred: Path, run: Path | None, blobs: int = 30) -> None:
    """``pred/pred-NNNNNN.tar`` of fake probabilities for a split, and a provenance.json."""
    rng = np.random.default_rng(0)
    for i, shard in enumerate(sorted((data / split).glob("shard-*.tar"))):
        samples = []
        for key, members in iter_tar_samples(shard):
            _, mask, meta = decode_sample(members, key)
            samples.append((key, fake_probs(mask, rng, blobs), meta))
        write_pred_shard(pred / f"pred-{i:06d}.tar", samples)
    if run is not None:
        run.mkdir(parents=True, exist_ok=True)
        (pred / "provenance.json").write_text(json.dumps(
            {"run_dir": str(run.resolve()), "checkpoint": str(run / "checkpoints" / "best.pt"),
             "data": str(data.resolve()), "split": split, "tta": False}))


@pytest.fixture(scope="module")
def tuned(prepared_dataset, tmp_path_factory) -> SimpleNamespace:
    root = tmp_path_factory.mktemp("tune")
    pred, run = root / "PRED", root / "RUN"
    write_preds(prepared_dataset, "val", pred, run)
    truth = prepared_dataset / "val" / "truth.csv"
    assert run_main(tune.main, ["--pred", pred, "--truth", truth, "--workers", 2,
                                "--json", root / "copy.json"]) == 0
    return SimpleNamespace(root=root, pred=pred, run=run, truth=truth,
                           doc=json.loads((run / "tune.json").read_text()))


def test_tuned_f1_beats_defaults_and_is_saved(tuned):
    doc = tuned.doc
    d, b = doc["default"], doc["best"]
    assert (d["building_threshold"], d["footprint_threshold"], d["grow_radius"],
            d["min_polygon_area"]) == (0.5, 0.5, 3.0, 20.0)
    assert b["f1"] > d["f1"] > 0  # the false blobs cost the default area threshold
    assert b["min_polygon_area"] > 20 and b["fp"] < d["fp"]
    assert all(p["f1"] <= b["f1"] for p in doc["points"])
    assert all(p["footprint_threshold"] <= p["building_threshold"] for p in doc["points"])
    for p in doc["points"]:
        assert p["f1"] == pytest.approx(2 * p["tp"] / (2 * p["tp"] + p["fp"] + p["fn"]))
    assert doc["points"][d["index"]]["f1"] == d["f1"] and doc["tiles"] == 2
    assert (tuned.root / "copy.json").read_text() == (tuned.run / "tune.json").read_text()
    saved = (tuned.run / "postproc.json").read_text()
    assert saved == PolygonizeConfig(**b["settings"]).to_json()  # exactly to_json()
    assert PolygonizeConfig.from_json(tuned.run / "postproc.json") == \
        PolygonizeConfig(**b["settings"])


def _score(truth: Path, csv: Path, out: Path) -> dict:
    assert run_main(score.main, ["--truth", truth, "--proposals", csv, "--json", out,
                                 "--workers", 1]) == 0
    return json.loads(out.read_text())


def test_polygonize_uses_the_tuned_settings(tuned, tmp_path, capsys):
    """What tune chose is what polygonize uses by default, and it scores what tune counted."""
    b = tuned.doc["best"]
    outs = {k: tmp_path / f"{k}.csv" for k in ("auto", "settings", "flags", "plain")}
    common = ["--pred", tuned.pred, "--workers", 1]
    flags = ["--building-threshold", b["building_threshold"], "--footprint-threshold",
             b["footprint_threshold"], "--grow-radius", b["grow_radius"], "--min-polygon-area",
             b["min_polygon_area"]]
    assert run_main(polygonize.main, [*common, "--out", outs["auto"]]) == 0
    assert "tuned settings" in capsys.readouterr().err
    assert run_main(polygonize.main, [*common, "--out", outs["settings"], "--settings",
                                      tuned.run / "postproc.json"]) == 0
    assert run_main(polygonize.main, [*common, "--out", outs["flags"], "--no-tuned",
                                      *flags]) == 0
    assert run_main(polygonize.main, [*common, "--out", outs["plain"], "--no-tuned"]) == 0
    auto = outs["auto"].read_bytes()
    assert auto == outs["settings"].read_bytes() == outs["flags"].read_bytes()
    assert auto != outs["plain"].read_bytes()
    got = _score(tuned.truth, outs["auto"], tmp_path / "auto.json")
    assert (got["tp"], got["fp"], got["fn"]) == (b["tp"], b["fp"], b["fn"])
    d = tuned.doc["default"]
    got = _score(tuned.truth, outs["plain"], tmp_path / "plain.json")
    assert (got["tp"], got["fp"], got["fn"]) == (d["tp"], d["fp"], d["fn"])


def test_flags_override_tuned_settings(tuned, tmp_path):
    args = polygonize.build_parser().parse_args(["--pred", str(tuned.pred), "--out", "x.csv",
                                                 "--grow-radius", "1"])
    cfg = polygonize.config_from_args(args, announce=False)
    best = PolygonizeConfig.from_json(tuned.run / "postproc.json")
    # --settings FILE replaces the run's tuned settings (the run has them: they must not win)
    other = tmp_path / "other.json"
    other.write_text(PolygonizeConfig(grow_radius=2).to_json())
    given = polygonize.build_parser().parse_args(["--pred", str(tuned.pred), "--out", "x.csv",
                                                  "--settings", str(other)])
    assert polygonize.config_from_args(given, announce=False) == PolygonizeConfig(grow_radius=2)
    # the flag wins; the tuned area, which differs from the default, is kept
    assert cfg.grow_radius == 1 and cfg.min_polygon_area == best.min_polygon_area != 20
    args.no_tuned = True
    assert polygonize.config_from_args(args, announce=False) == PolygonizeConfig(grow_radius=1)


def test_a_zero_flag_overrides_the_settings_file(tmp_path):
    """--grow-radius 0 (growth off) and --min-polygon-area 0 (keep all) are settings, not
    "flag not given": the file's values must not win over them."""
    settings = tmp_path / "postproc.json"
    settings.write_text(PolygonizeConfig(grow_radius=2, min_polygon_area=30,
                                         simplify_tolerance=0.5).to_json())
    args = polygonize.build_parser().parse_args(
        ["--pred", str(tmp_path), "--out", "x.csv", "--settings", str(settings),
         "--grow-radius", "0", "--min-polygon-area", "0", "--simplify", "0", "--no-seedless"])
    cfg = polygonize.config_from_args(args, announce=False)
    assert (cfg.grow_radius, cfg.min_polygon_area, cfg.simplify_tolerance) == (0, 0, 0)
    assert cfg.seedless is False


def test_same_result_with_one_worker_and_run_dir_flag(tuned, tmp_path):
    other = tmp_path / "RUN2"
    other.mkdir()
    assert run_main(tune.main, ["--pred", tuned.pred, "--truth", tuned.truth, "--run-dir", other,
                                "--workers", 1]) == 0
    doc = json.loads((other / "tune.json").read_text())
    assert doc["points"] == tuned.doc["points"] and doc["best"] == tuned.doc["best"]
    assert (other / "postproc.json").read_text() == (tuned.run / "postproc.json").read_text()


def test_a_tune_cut_between_its_two_files_keeps_the_settings_and_is_told(tuned, tmp_path,
                                                                           monkeypatch):
    import dataio.atomic

    run = tmp_path / "RUN"
    run.mkdir()
    for name in ("postproc.json", "tune.json"):
        (run / name).write_bytes((tuned.run / name).read_bytes())
    old_settings = (run / "postproc.json").read_bytes()
    # another grid (its best differs) is killed after its first file into RUN
    real, written = dataio.atomic.atomic_write_text, []

    def write(path, text):
        if Path(path).parent == run and written:
            raise KeyboardInterrupt("killed")
        written.append(Path(path).name)
        real(path, text)

    monkeypatch.setattr(dataio.atomic, "atomic_write_text", write)
    with pytest.raises(KeyboardInterrupt):
        tune.main([str(a) for a in ["--pred", tuned.pred, "--truth", tuned.truth, "--run-dir",
                                    run, "--workers", 1, "--min-polygon-areas", "0"]])
    assert written == ["tune.json"]  # the file that takes effect goes last
    assert (run / "postproc.json").read_bytes() == old_settings
    # the new tune.json beside the earlier settings is not taken for their pair...
    with pytest.raises(ValueError, match="interrupted tune"):
        read_tuned(run)
    settings, doc = read_tuned(tuned.run)  # ...as a complete tune's pair is
    assert settings == doc["best"]["settings"] == json.loads(
        (tuned.run / "postproc.json").read_text())


def test_a_full_disk_while_writing_exits_1_naming_the_file(tuned, tmp_path, monkeypatch,
                                                           capsys):
    """An OSError while tune writes its files (a full disk) is a failure of the run, exit code
    1, in one line naming the file; it was 2, as for bad input. A missing input is still 2."""
    import dataio.atomic

    run = tmp_path / "RUN"
    run.mkdir()
    argv = ["--pred", tuned.pred, "--truth", tuned.truth, "--run-dir", run, "--workers", 1,
            "--min-polygon-areas", "0"]

    def full(path: Path, text: str) -> None:
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    with monkeypatch.context() as m:
        m.setattr(dataio.atomic, "atomic_write_text", full)
        assert run_main(tune.main, argv) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == f"error: [Errno 28] No space left on device: '{run / 'tune.json'}'", err
    argv[3] = tmp_path / "missing.csv"
    assert run_main(tune.main, argv) == 2


@pytest.mark.parametrize("where", STDOUT_ENDS)
def test_a_full_or_closed_unbuffered_stdout_exits_1(tuned, tmp_path, capsys, where):
    """``python -u -m postproc.tune ... > /dev/full``: the table's print raised a bare OSError,
    exit 2 ("fix the input"), where polygonize and score exit 1 (a failure of the run); a
    closed stdout (``| head -0``) ends quietly with 1. The run's files are written before."""
    run = tmp_path / "RUN"
    run.mkdir()
    with unbuffered_stdout(where):
        code = run_main(tune.main, ["--pred", tuned.pred, "--truth", tuned.truth, "--run-dir",
                                    run, "--workers", 1, "--min-polygon-areas", "0"])
    check_stdout_failure(where, code, capsys.readouterr().err)
    assert (run / "postproc.json").exists()


def test_a_tune_json_that_cannot_be_written_is_refused_before_the_grid(tuned, tmp_path,
                                                                         monkeypatch, capsys):
    """RUN/tune.json is written first, but only RUN/postproc.json was checked up front: a
    tune.json that is a directory failed at its write, after the whole grid, exit 1 as a full
    disk does. It is a path to fix: exit 2 before the grid, naming it."""
    run = tmp_path / "RUN"
    (run / "tune.json").mkdir(parents=True)

    def no_grid(*args: object, **kwargs: object) -> None:
        raise AssertionError("the grid ran")

    monkeypatch.setattr(tune, "evaluate", no_grid)
    argv = ["--pred", tuned.pred, "--truth", tuned.truth, "--run-dir", run, "--workers", 1]
    assert run_main(tune.main, argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: --run-dir {run / 'tune.json'} is a directory; give a file name"], err
    assert sorted(p.name for p in run.iterdir()) == ["tune.json"]


def test_counts_equal_polygonize_then_score(prepared_dataset):
    """Every grid point's counts equal polygonizing with its settings and scoring the result."""
    shard = sorted((prepared_dataset / "val").glob("shard-*.tar"))[0]
    key, members = next(iter_tar_samples(shard))
    _, mask, _ = decode_sample(members, key)
    prob = fake_probs(mask, np.random.default_rng(1))
    truth = read_truth_csv(prepared_dataset / "val" / "truth.csv").polygons[key]
    grid = tune.TuneGrid((0.4, 0.6), (0.3, 0.5), (0.0, 3.0), (0, 30, 64, 100))
    counts = tune.tile_counts(prob, truth, grid).reshape(-1, 3)
    points = grid.points()
    # the defaults join each axis: 5 (building, footprint) pairs (0.4 > 0.5 is not one) x 2 radii
    # x 5 areas
    assert len(points) == counts.shape[0] == 5 * 2 * 5
    for cfg, c in zip(points, counts, strict=True):
        props = [p for p, _ in polygonize_probs(prob, cfg)]
        assert tuple(c) == score_image(truth, props), cfg


def test_matching_agrees_with_the_scorer_on_overlaps():
    truth = [box(0, 0, 10, 10), box(10, 0, 20, 10), box(40, 40, 50, 50)]
    # duplicates and a proposal straddling two truths: the greedy order decides
    props = [box(0, 0, 10, 10), box(0, 0, 10, 10), box(2, 0, 12, 10), box(10, 0, 20, 10),
             box(100, 100, 110, 110), box(40, 40, 50, 51)]
    t, match, matched = match_image(truth, props)
    tp = int((match >= 0).sum())
    assert (tp, len(props) - tp, int((~matched).sum())) == score_image(truth, props)
    pi, ti, _ = candidate_ious(t, np.array(props, dtype=object), ScoreConfig())
    keep = np.array([[True] * 6, [False, True, True, True, True, True],
                     [True, False, False, False, False, True], [False] * 6])
    got = true_positives(pi, ti, keep, t.size)
    for row, n in zip(keep, got, strict=True):
        kept = [p for p, k in zip(props, row, strict=True) if k]
        assert n == score_image(truth, kept)[0]
        assert n == (greedy_match(pi, ti, len(props), t.size, row) >= 0).sum()


def test_matching_keeps_the_scorers_truth_and_one_truth_per_proposal():
    tiny = box(0, 0, 4, 5)  # area 20 <= min_truth_area: the scorer drops it, so must tune
    t, match, matched = match_image([tiny], [tiny])
    assert t.size == 0 and match.tolist() == [-1] and matched.size == 0
    a = box(0, 0, 10, 10)  # two identical truths, two identical proposals: one each
    t, match, matched = match_image([a, a], [a, a])
    assert match.tolist() == [0, 1] and matched.all()


def test_truth_images_without_a_prediction_count_as_missed(tmp_path):
    """As in the scorer: a val image the predictions lack still has buildings to find, so its
    truth adds false negatives at every grid point (else tuning on part of a split looks
    better than it is)."""
    prob = np.zeros((32, 32, 3), np.uint8)
    prob[..., 0] = 255
    prob[4:14, 4:14] = (0, 255, 0)
    shard = tmp_path / "pred-000000.tar"
    write_pred_shard(shard, [("a", prob, {})])
    grid = tune.TuneGrid((0.5,), (0.5,), (3.0,), (0, 20))
    truth = {"a": [box(4, 4, 14, 14)]}
    ev = tune.evaluate([shard], truth, grid, None)
    assert ev.counts.tolist() == [[1, 0, 0], [1, 0, 0]] and ev.missing == []
    ev = tune.evaluate([shard], {**truth, "b": [box(0, 0, 10, 10), box(20, 20, 30, 30)]},
                       grid, None)
    assert ev.counts.tolist() == [[1, 0, 2], [1, 0, 2]] and ev.missing == ["b"]


def test_an_image_id_in_two_shards_is_refused(tmp_path):
    """As polygonize refuses it: counted twice, the tile's truth and proposals would weigh
    double in every grid point's F1 and so in the choice."""
    prob = np.zeros((32, 32, 3), np.uint8)
    prob[..., 0] = 255
    prob[4:14, 4:14] = (0, 255, 0)
    shards = [tmp_path / f"pred-00000{i}.tar" for i in range(2)]
    for shard in shards:
        write_pred_shard(shard, [("a", prob, {})])
    grid = tune.TuneGrid((0.5,), (0.5,), (3.0,), (20,))
    with pytest.raises(PredError, match="pred-000001.tar: ImageId 'a' appears twice"):
        tune.evaluate(shards, {"a": [box(4, 4, 14, 14)]}, grid, None)


def test_ties_go_to_the_defaults_then_to_fewer_changes():
    grid = tune.TuneGrid((0.4, 0.5), (0.4, 0.5), (3.0,), (10, 20, 40))
    points = grid.points()
    same = np.tile([10, 2, 3], (len(points), 1))  # F1 20/25 everywhere
    assert points[tune.choose(points, same)] == PolygonizeConfig()
    better = same.copy()
    for i, p in enumerate(points):
        if p.min_polygon_area == 40:  # equal F1 at several points that change the area
            better[i] = (20, 2, 3)  # F1 40/45
    best = points[tune.choose(points, better)]
    assert (best.building_threshold, best.footprint_threshold, best.min_polygon_area) == \
        (0.5, 0.5, 40)
    # a split without buildings, where the large areas leave no proposal: F1 is 0 (not 0/0)
    # at every point, so the defaults
    assert points[tune.choose(points, np.zeros((len(points), 3), np.int64))] == PolygonizeConfig()


def test_ties_go_to_fewer_settings_changed_then_smaller_changes_then_grid_order():
    grid = tune.TuneGrid((0.4, 0.5, 0.6), (0.4, 0.5), (3.0,), (0, 20, 40, 80))
    points = grid.points()

    def best_of(*winners: tuple[float, float, float]) -> tuple[float, float, float]:
        counts = np.tile([10, 2, 3], (len(points), 1))
        for i, p in enumerate(points):
            if (p.building_threshold, p.footprint_threshold, p.min_polygon_area) in winners:
                counts[i] = (20, 2, 3)  # equal F1 at the winners only
        b = points[tune.choose(points, counts)]
        return b.building_threshold, b.footprint_threshold, b.min_polygon_area

    # one setting moved three steps changes fewer settings than two moved one step each
    assert best_of((0.4, 0.4, 20), (0.5, 0.5, 80)) == (0.5, 0.5, 80)
    # one step each, one setting each: the first in grid order, whichever is listed first
    assert best_of((0.6, 0.5, 20), (0.5, 0.4, 20)) == (0.5, 0.4, 20)
    assert best_of((0.5, 0.5, 40), (0.5, 0.5, 0)) == (0.5, 0.5, 0)


def test_equal_changes_tie_by_grid_order_not_by_float_noise():
    """Building 0.7 and footprint 0.3 are both two steps from the defaults (0.5); in floats 0.7's
    came out 1.9999999999999996 steps, so it won every such tie, whatever the grid order."""
    points = tune.TuneGrid((0.5, 0.7), (0.3, 0.5), (3.0,), (20,)).points()
    counts = np.tile([10, 2, 3], (len(points), 1))
    two_steps = [i for i, p in enumerate(points) if (p.building_threshold, p.footprint_threshold)
                 in ((0.7, 0.5), (0.5, 0.3))]
    counts[two_steps] = (20, 2, 3)
    best = points[tune.choose(points, counts)]
    assert two_steps[0] < two_steps[1] and points[two_steps[0]] == best
    assert (best.building_threshold, best.footprint_threshold) == (0.5, 0.3)


@pytest.mark.parametrize("case", ["no_truth", "empty_pred", "no_run_dir", "bad_grid",
                                  "other_split", "gone_run_dir", "torchrun", "bad_env",
                                  "json_under_a_file", "empty_run_dir"])
def test_bad_input_is_one_line(tuned, tmp_path, capsys, monkeypatch, case):
    pred, truth, run = tuned.pred, tuned.truth, tmp_path / "RUN"
    extra: list = []
    if case == "no_truth":
        truth, want = tmp_path / "nope.csv", "nope.csv: file not found"
    elif case == "empty_pred":
        pred, want = tmp_path / "empty", "no pred-*.tar"
        pred.mkdir()
    elif case == "no_run_dir":
        pred, want = tmp_path / "PRED", "pass --run-dir"
        pred.mkdir()
        (pred / "pred-000000.tar").write_bytes((tuned.pred / "pred-000000.tar").read_bytes())
    elif case == "bad_grid":
        extra, want = ["--building-thresholds", "0.5,1.5"], "--building-thresholds: 1.5"
    elif case == "other_split":
        truth, want = tmp_path / "t.csv", "no ImageId in common"
        truth.write_text("ImageId,BuildingId,PolygonWKT_Pix,PolygonWKT_Geo\n"
                         "other,-1,POLYGON EMPTY,POLYGON EMPTY\n")
    elif case == "torchrun":  # every rank would run the whole grid and write the same files
        monkeypatch.setenv("WORLD_SIZE", "2")
        want = "runs on one machine (WORLD_SIZE=2)"
    elif case == "bad_env":  # read as torchrun's variables are everywhere else
        monkeypatch.setenv("WORLD_SIZE", "two")
        want = "WORLD_SIZE='two' is not an integer"
    elif case == "json_under_a_file":  # refused before the grid runs and the run's files change
        (tmp_path / "a_file").write_text("")
        extra, want = ["--json", tmp_path / "a_file" / "t.json"], "is not a directory"
    elif case == "empty_run_dir":  # not the current directory
        pred, want = tmp_path / "PRED", "run_dir '' is not a path"
        pred.mkdir()
        (pred / "provenance.json").write_text(json.dumps({"run_dir": ""}))
        (pred / "pred-000000.tar").write_bytes((tuned.pred / "pred-000000.tar").read_bytes())
        monkeypatch.chdir(tmp_path)
    else:
        pred, want = tmp_path / "PRED", "is not a directory"
        pred.mkdir()
        (pred / "provenance.json").write_text(json.dumps({"run_dir": str(tmp_path / "gone")}))
        (pred / "pred-000000.tar").write_bytes((tuned.pred / "pred-000000.tar").read_bytes())
    argv = ["--pred", pred, "--truth", truth, "--workers", 1, *extra]
    if case in ("other_split", "bad_grid", "json_under_a_file"):
        argv += ["--run-dir", run]
        run.mkdir()
    # the cases that find their run through provenance would write into the tuned run
    tuned_settings = (tuned.run / "postproc.json").read_bytes()
    assert run_main(tune.main, argv) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("error:") and want in last, last
    assert not (run / "postproc.json").exists() and not (tmp_path / "postproc.json").exists()
    assert (tuned.run / "postproc.json").read_bytes() == tuned_settings
    assert not (tmp_path / "gone").exists()


@pytest.mark.parametrize("axis", tune.AXES)
@pytest.mark.parametrize("text", ["0.5,,0.6", "0.5,", ",0.5", "0.5, ,0.6"])
def test_an_empty_item_in_a_grid_flag_is_refused_naming_the_flag(axis, text, tmp_path, capsys):
    """'--building-thresholds 0.5,,0.6' was tuned as 0.5,0.6 without a word."""
    flag = "--" + axis.replace("_", "-")
    with pytest.raises(SystemExit) as e:
        tune.main(["--pred", str(tmp_path), "--truth", str(tmp_path / "t.csv"), flag, text])
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert e.value.code == 2 and f"{flag}: {flag} '{text}' has an empty item" in last, last


@pytest.mark.parametrize("axis, value", [("footprint_thresholds", 1.5), ("grow_radii", 60.0),
                                         ("min_polygon_areas", -1.0),
                                         ("building_thresholds", float("nan"))])
def test_a_grid_value_out_of_range_names_its_flag(axis, value):
    """Every axis is checked (a footprint threshold of 1.5 exceeds every building threshold and
    was dropped from the grid without a word)."""
    with pytest.raises(ValueError, match=f"--{axis.replace('_', '-')}: {value} is outside"):
        tune.TuneGrid(**{axis: (value,)})


def test_tuning_on_the_test_split_is_warned(tuned, tmp_path, capsys):
    """Settings tuned on the split they are then scored on make an optimistic F1."""
    pred, run = tmp_path / "PRED", tmp_path / "RUN"
    pred.mkdir()
    run.mkdir()
    (pred / "pred-000000.tar").write_bytes((tuned.pred / "pred-000000.tar").read_bytes())
    (pred / "provenance.json").write_text(json.dumps({"run_dir": str(run), "split": "test"}))
    assert run_main(tune.main, ["--pred", pred, "--truth", tuned.truth, "--workers", 1,
                                "--building-thresholds", "0.5", "--footprint-thresholds", "0.5",
                                "--min-polygon-areas", "20"]) == 0
    assert "warning: tuning on the 'test' split" in capsys.readouterr().err
    assert (run / "postproc.json").is_file()


def test_help_exits_zero(capsys):
    with pytest.raises(SystemExit) as e:
        tune.main(["--help"])
    assert e.value.code == 0 and "--min-polygon-areas" in capsys.readouterr().out


def test_polygonize_provenance_cases(tuned, tmp_path, capsys):
    from postproc.provenance import PROVENANCE
    from trainer.predict import PROVENANCE as WRITTEN

    assert PROVENANCE == WRITTEN
    pred = tmp_path / "PRED"
    pred.mkdir()
    (pred / "pred-000000.tar").write_bytes((tuned.pred / "pred-000000.tar").read_bytes())
    run = tmp_path / "RUN"
    run.mkdir()
    (pred / PROVENANCE).write_text(json.dumps({"run_dir": str(run)}))
    out = tmp_path / "p.csv"
    argv = ["--pred", pred, "--out", out, "--workers", 1]
    assert run_main(polygonize.main, argv) == 0  # a run without postproc.json: the defaults
    assert "default settings" in capsys.readouterr().err
    for text, want in (("{not json", "provenance.json: unreadable provenance"),
                       ('["run_dir"]', "provenance.json: provenance must be a JSON object")):
        (pred / PROVENANCE).write_text(text)
        assert run_main(polygonize.main, argv) == 2
        last = capsys.readouterr().err.strip().splitlines()[-1]
        assert last.startswith("error:") and want in last, last


def test_a_run_dir_from_provenance_that_cannot_be_written_says_where_it_came_from(
        pred_dir, tmp_path, capsys, monkeypatch):
    """No --run-dir given: the message was "--run-dir RUN/postproc.json: RUN is not writable",
    a flag the user never gave, naming a file in it; it says it is provenance's, and the flag."""
    import os

    src, truth = pred_dir
    pred, run = tmp_path / "PRED", tmp_path / "RUN"
    pred.mkdir()
    run.mkdir()
    (pred / "pred-000000.tar").write_bytes((src / "pred-000000.tar").read_bytes())
    (pred / "provenance.json").write_text(json.dumps({"run_dir": str(run)}))
    real = os.access
    monkeypatch.setattr(os, "access", lambda p, mode, **kw: False if Path(p) == run and
                        mode & os.W_OK else real(p, mode, **kw))
    assert run_main(tune.main, ["--pred", pred, "--truth", truth, "--workers", 1]) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last == (f"error: --run-dir (default: the run_dir in {pred / 'provenance.json'}) "
                    f"{run}: {run} is not writable"), last
    assert list(run.iterdir()) == []


def test_a_truth_without_buildings_is_told_and_keeps_the_defaults(tmp_path, capsys):
    """Every F1 is 0 there (the tie goes to the defaults): the table alone said "F1 0.0000", as
    for a model that finds nothing."""
    prob = np.zeros((32, 32, 3), np.uint8)
    prob[..., 0] = 255
    prob[4:14, 4:14] = (0, 150, 105)  # a false building
    pred, run = tmp_path / "PRED", tmp_path / "RUN"
    pred.mkdir()
    run.mkdir()
    write_pred_shard(pred / "pred-000000.tar", [("a", prob, {})])
    truth = tmp_path / "truth.csv"
    truth.write_text("ImageId,BuildingId,PolygonWKT_Pix,PolygonWKT_Geo\n"
                     "a,-1,POLYGON EMPTY,POLYGON EMPTY\n")
    assert run_main(tune.main, ["--pred", pred, "--truth", truth, "--run-dir", run,
                                "--workers", 1]) == 0
    err = capsys.readouterr().err
    assert f"warning: --truth {truth} has no building (over 20 px)" in err
    assert PolygonizeConfig.from_json(run / "postproc.json") == PolygonizeConfig()
    # with a building the warning is not given
    truth.write_text("ImageId,BuildingId,PolygonWKT_Pix,PolygonWKT_Geo\n"
                     "a,1,\"POLYGON ((4 4, 14 4, 14 14, 4 14, 4 4))\",\"POLYGON EMPTY\"\n")
    assert run_main(tune.main, ["--pred", pred, "--truth", truth, "--run-dir", run,
                                "--workers", 1]) == 0
    assert "no building" not in capsys.readouterr().err
