"""A shortened `make demo` end to end: every stage runs, the figures are computed, reruns skip."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import launch.demo as demo_module
from dataio.fixtures import write_dataset
from launch.demo import Demo, run_demo
from launch.report import write_report
from postproc.csvio import read_proposal_csv, read_truth_csv
from postproc.score import score

REPO = Path(__file__).resolve().parents[2]
# NOTE: 12 tiles (8/2/2: two test tiles to render) and one epoch: every stage runs on real
# files; 24 tiles and 2 epochs took a third longer for the same checks (the F1 of so short a
# training is near 0 either way, and it is recomputed here, not asserted high). One process
# under torchrun (the same --standalone command line): a second rank cost each of the three
# torchrun stages its start-up on 2 busy cores, ~20 s of the ~85 s, and what two ranks do is
# checked where it is the point: DDP training in tests/trainer/test_distributed.py, two ranks'
# prediction shards against one process's in test_predict_under_torchrun_matches_one_process.
SHORT = ["--tiles", "12", "--render-tiles", "2", "--nproc", "1", "--set", "train.epochs=1",
         "--set", "train.val_every=1", "--set", "data.crop_size=128"]


@pytest.mark.slow
@pytest.mark.multiproc
@pytest.mark.timeout(600)
def test_short_demo_end_to_end(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                               capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "demo"
    argv = ["--out", str(out), *SHORT]
    cmd = [sys.executable, "-m", "launch.demo", *argv]
    res = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=540)
    assert res.returncode == 0, res.stderr[-4000:]
    report = out / "run" / "report"
    summary = json.loads((report / "summary.json").read_text())
    assert {"precision", "recall", "f1", "seconds"} <= summary.keys()
    assert set(summary["seconds"]) == {"synth", "prepare", "train", "predict_val",
                                       "predict_test", "tune", "polygonize", "score", "render",
                                       "curves"}
    # the printed F1 is the scorer's, recomputed here from the files the demo wrote
    truth = read_truth_csv(out / "data" / "test" / "truth.csv").polygons
    proposals = read_proposal_csv(report / "proposals_test.csv").polygons
    again = score(truth, proposals)
    assert (again.tp, again.fp, again.fn) == (summary["tp"], summary["fp"], summary["fn"])
    assert f"test F1 {summary['f1']:.4f}" in res.stdout
    assert summary["val_f1_tuned_postproc"] >= summary["val_f1_default_postproc"]
    assert json.loads((out / "run" / "postproc.json").read_text()) == summary["postproc"]
    assert len(list((report / "tiles").glob("*.png"))) == 2
    assert (report / "curves.png").stat().st_size > 1000
    assert "curves.png" in (report / "README.md").read_text()
    # a rerun skips what is done and reports the same figures
    # NOTE: through main in this process, from the repository root as the command ran: with
    # every stage skipped, a process of its own added only its start-up (~3 s of imports).
    # The stage commands it compares are the same (sys.executable, the relative config path).
    monkeypatch.chdir(REPO)
    capsys.readouterr()
    assert demo_module.main(argv) == 0
    assert capsys.readouterr().out.count("done before, skipped") == 10
    assert json.loads((report / "summary.json").read_text())["f1"] == summary["f1"]


class _TinyDemo(Demo):
    """The demo's stage logic with two stand-in stages: "synth" writes one file per tile into
    raw/ (replacing what was there, as synth --overwrite does), "train" adds a checkpoint file to
    run/ (as a resumed run keeps its old ones) holding the number of tiles it was trained on, and
    fails after it when its overrides hold "fail" (a run killed after some checkpoints)."""

    def stages(self) -> list[tuple[str, list[str]]]:
        synth = ("import pathlib, shutil, sys; d = pathlib.Path(sys.argv[1]); "
                 "shutil.rmtree(d, ignore_errors=True); d.mkdir(parents=True); "
                 "[(d / f't{i}').touch() for i in range(int(sys.argv[2]))]")
        train = ("import pathlib, sys; d, raw = map(pathlib.Path, sys.argv[1:3]); "
                 "d.mkdir(parents=True, exist_ok=True); "
                 "(d / f'ckpt-{len(list(d.iterdir()))}').write_text(str(len(list(raw.iterdir()))));"
                 " sys.exit('fail' in sys.argv)")
        return [("synth", [sys.executable, "-c", synth, str(self.raw), str(self.tiles)]),
                ("train", [sys.executable, "-c", train, str(self.run), str(self.raw),
                           *self.overrides])]


def test_a_rerun_with_other_inputs_trains_again(tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(demo_module, "write_report", lambda *a: {})
    out = tmp_path / "demo"
    run_demo(_TinyDemo(out, tiles=3))
    assert sorted(p.name for p in (out / "run").iterdir()) == ["ckpt-0"]
    # an interrupted training (recorded as started, not completed) resumes: its checkpoints stay
    state = json.loads((out / "stages.json").read_text())
    del state["train"]["seconds"]
    (out / "stages.json").write_text(json.dumps(state))
    run_demo(_TinyDemo(out, tiles=3))
    assert sorted(p.name for p in (out / "run").iterdir()) == ["ckpt-0", "ckpt-1"]
    # other data: the model is trained again from nothing, not resumed
    run_demo(_TinyDemo(out, tiles=1))
    assert sorted(p.name for p in _TinyDemo(out).raw.iterdir()) == ["t0"]
    assert sorted(p.name for p in (out / "run").iterdir()) == ["ckpt-0"]


def _ckpts(out: Path) -> list[str]:
    return sorted(p.name for p in (out / "run").iterdir())


def test_a_rerun_stopped_while_removing_the_old_run_still_trains_from_nothing(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """(synth had completed with the new data and train's record was dropped: the next run
    resumed the checkpoints trained on the old data)"""
    monkeypatch.setattr(demo_module, "write_report", lambda *a: {})
    out = tmp_path / "demo"
    run_demo(_TinyDemo(out, tiles=3))

    def stopped(path: Path, *args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt  # Ctrl-C while "inputs changed, removing ..."

    with monkeypatch.context() as m:
        m.setattr(demo_module.shutil, "rmtree", stopped)
        with pytest.raises(KeyboardInterrupt):
            run_demo(_TinyDemo(out, tiles=1))
    assert _ckpts(out) == ["ckpt-0"]  # the old run, not yet removed
    run_demo(_TinyDemo(out, tiles=1))
    # removed, then trained from nothing on the new data (not the old run, "done before")
    assert _ckpts(out) == ["ckpt-0"] and (out / "run" / "ckpt-0").read_text() == "1"


def test_a_stage_that_did_not_complete_is_never_done_before(tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """The state was written only when a stage completed: a rerun with other arguments that
    failed (or was killed) left the earlier completion on record, so going back to the earlier
    arguments skipped training over the other run's checkpoints; and a rerun of the failed
    arguments removed the checkpoints it should resume from."""
    monkeypatch.setattr(demo_module, "write_report", lambda *a: {})
    out = tmp_path / "demo"
    run_demo(_TinyDemo(out, tiles=3))
    assert _ckpts(out) == ["ckpt-0"]
    with pytest.raises(RuntimeError, match="stage train failed"):
        run_demo(_TinyDemo(out, tiles=3, overrides=["epochs=9", "fail"]))
    assert _ckpts(out) == ["ckpt-0"]  # other arguments: trained from nothing
    with pytest.raises(RuntimeError, match="stage train failed"):
        run_demo(_TinyDemo(out, tiles=3, overrides=["epochs=9", "fail"]))
    assert _ckpts(out) == ["ckpt-0", "ckpt-1"]  # the same again: resumed
    run_demo(_TinyDemo(out, tiles=3))  # back to the first arguments: trained again
    assert _ckpts(out) == ["ckpt-0"]


def test_the_command_skips_what_is_done_and_fresh_starts_over(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    """Through main: a rerun skips the stages done and still reports each one's seconds (the
    report's table and total); --fresh deletes OUT and runs every stage again."""
    reported: list[dict[str, float]] = []
    monkeypatch.setattr(demo_module, "Demo", _TinyDemo)
    monkeypatch.setattr(demo_module, "write_report",
                        lambda run, data, seconds: reported.append(dict(seconds)) or {})
    out = tmp_path / "demo"
    argv = ["--out", str(out), "--tiles", "5"]
    assert demo_module.main(argv) == 0 and demo_module.main(argv) == 0
    assert capsys.readouterr().out.count("done before, skipped") == 2
    assert set(reported[0]) == {"synth", "train"} and reported[1] == reported[0]
    (out / "stray").touch()
    assert demo_module.main([*argv, "--fresh"]) == 0
    assert "done before" not in capsys.readouterr().out and not (out / "stray").exists()
    assert _ckpts(out) == ["ckpt-0"]


@pytest.mark.parametrize("fresh", [[], ["--fresh"]])
def test_an_out_that_is_no_demos_directory_is_left_alone(
        fresh: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    """(--out . where the README's commands ran: synth --overwrite replaced the user's
    raw/AOI_2_Vegas_Train, prepare --overwrite their data/, and --fresh deleted it all)"""
    monkeypatch.setattr(demo_module, "Demo", _TinyDemo)
    out = tmp_path / "work"
    mine = out / "raw" / "AOI_2_Vegas_Train" / "mine.tif"
    mine.parent.mkdir(parents=True)
    mine.write_text("the user's")
    with pytest.raises(SystemExit) as e:
        demo_module.main(["--out", str(out), "--tiles", "5", *fresh])
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert e.value.code == 2 and f"--out {out} holds files but no stages.json" in last
    assert mine.read_text() == "the user's" and sorted(p.name for p in out.iterdir()) == ["raw"]
    with pytest.raises(ValueError, match="no demo's directory"):
        run_demo(_TinyDemo(out, tiles=3), fresh=bool(fresh))
    assert mine.read_text() == "the user's"


def test_a_failed_stage_is_one_line_and_exit_1(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    class Failing(_TinyDemo):
        def stages(self) -> list[tuple[str, list[str]]]:
            return [("synth", [sys.executable, "-c", "import sys; sys.exit(3)"])]

    monkeypatch.setattr(demo_module, "Demo", Failing)
    assert demo_module.main(["--out", str(tmp_path / "demo"), "--tiles", "5"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("launch.demo: error: stage synth failed (exit 3): ") and "\n" not in err

@pytest.mark.parametrize("text, problem", [("[]", "not a demo state"),
                                           ('{"synth": 1}', "not a demo state"),
                                           ('{"synth": {"cmd"', "unreadable demo state")])
def test_a_damaged_state_file_is_named(tmp_path: Path, text: str, problem: str) -> None:
    out = tmp_path / "demo"
    out.mkdir()
    (out / "stages.json").write_text(text)
    with pytest.raises(ValueError, match=f"^{out / 'stages.json'}: {problem}"):
        run_demo(_TinyDemo(out, tiles=3))


@pytest.mark.parametrize(("bad", "named"), [
    (["--nproc", "0"], "--nproc"), (["--tiles", "0"], "--tiles"), (["--set", "foo"], "--set"),
    (["--render-tiles", "0"], "--render-tiles must be >= 1"),
    (["--set", "train.bogus=1"], "--set"),
    # these ran synth and prepare first, and failed in train (or, a split empty, in predict)
    (["--tiles", "4"], "--tiles 4 leaves a split empty"),
    (["--set", "model.width_divisor=3"], "width_divisor=3"),
    (["--set", "loss.class_weights=[0.5,0.5]"], "class_weights has 2 weights")])
def test_bad_arguments_stop_the_demo_before_any_stage(bad: list[str], named: str, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        demo_module.main(["--out", str(tmp_path / "demo"), *bad])
    # the error line itself (argparse's usage line above it names every flag)
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert e.value.code == 2 and last.startswith("python -m launch.demo: error:") and named in last
    assert not (tmp_path / "demo").exists()


@pytest.mark.parametrize(("gpus", "requested", "want"), [
    (0, None, 2), (0, 3, 3), (4, None, 2), (1, None, 1), (4, 3, 3),
    (1, 2, r"2 processes on this node but 1 .*start at most 1 \(--nproc 1\)")])
def test_training_takes_at_most_one_process_per_gpu(monkeypatch: pytest.MonkeyPatch, gpus: int,
                                            requested: int | None, want: int | str) -> None:
    """(on a one-GPU machine the demo's 2 processes shared it: NCCL "Duplicate GPU")"""
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: gpus > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)
    if isinstance(want, str):
        with pytest.raises(ValueError, match=want):
            demo_module.training_procs(requested)
    else:
        assert demo_module.training_procs(requested) == want


def test_the_report_reads_a_log_that_a_crash_left(tmp_path: Path) -> None:
    from launch.report import _epochs

    log = tmp_path / "log.jsonl"
    # a repeated epoch (a restart) and a torn last line (killed mid-write, no newline)
    log.write_text('{"epoch": 1, "train_loss": 1.0}\n{"epoch": 1, "train_loss": 0.9}\n'
                   '{"epoch": 2, "train_loss": 0.5}\n{"epoch": 3, "train_lo')
    assert [(e["epoch"], e["train_loss"]) for e in _epochs(tmp_path)] == [(1, 0.9), (2, 0.5)]
    log.write_text('{"epoch": 1, "train_loss": 1.0}\n{"epoch": \n{"epoch": 2}\n')
    with pytest.raises(ValueError, match=r"log\.jsonl:2: not an epoch record"):
        _epochs(tmp_path)
    log.unlink()
    with pytest.raises(ValueError, match=r"log\.jsonl is missing"):
        _epochs(tmp_path)


def test_the_report_refuses_settings_that_are_not_the_tuned_ones(tmp_path: Path) -> None:
    """A tune killed between its two files leaves tune.json of a new grid beside the earlier
    postproc.json: its F1 must not be reported for the settings in force."""
    from launch.report import build_summary

    (tmp_path / "report").mkdir()
    (tmp_path / "report" / "score_test.json").write_text(json.dumps(
        {"precision": 0.9, "recall": 0.9, "f1": 0.9, "tp": 9, "fp": 1, "fn": 1}))
    settings = {"building_threshold": 0.6}
    (tmp_path / "tune.json").write_text(json.dumps({"default": {"f1": 0.7},
                                                    "best": {"f1": 0.8, "settings": settings}}))
    (tmp_path / "postproc.json").write_text(json.dumps({"building_threshold": 0.5}))
    with pytest.raises(ValueError, match=r"postproc\.json is not the best\.settings"):
        build_summary(tmp_path, tmp_path / "data", {})


@pytest.mark.parametrize("text, problem", [
    ('{"f1": 0.5,', ": unreadable"), ('{"f1": 0.5}', ": not postproc.score's JSON"),
    ('{"precision": 1, "recall": 1, "f1": 1, "tp": 1, "fp": 0}', ": not postproc.score's JSON"),
    (None, " is missing: the stage that writes it did not run")])
def test_a_damaged_score_file_is_named(tmp_path: Path, text: str | None, problem: str) -> None:
    from launch.report import build_summary

    (tmp_path / "report").mkdir()
    if text is not None:
        (tmp_path / "report" / "score_test.json").write_text(text)
    with pytest.raises(ValueError, match=f"score_test.json{problem}"):
        build_summary(tmp_path, tmp_path / "data", {})


def test_the_stages_hand_each_other_the_right_files(tmp_path: Path) -> None:
    """Tuning reads the val predictions and val truth, the printed F1 is the test split's, and
    training gets the overrides as --set pairs (only the ~2-minute end-to-end run saw this)."""
    demo = Demo(tmp_path / "demo", tiles=24, seed=3, nproc=3, render_tiles=2,
                overrides=["train.epochs=2", "data.crop_size=64"])
    stages = dict(demo.stages())

    def arg(stage: str, flag: str) -> str:
        cmd = stages[stage]
        return cmd[cmd.index(flag) + 1]

    # the AOI of --tiles and --seed, replaced on a rerun with others (synth and prepare refuse
    # an existing AOI or dataset without --overwrite), is the one prepared and trained on
    assert (arg("synth", "--tiles"), arg("synth", "--seed"), arg("prepare", "--seed")) == \
        ("24", "3", "3")
    assert "--overwrite" in stages["synth"] and "--overwrite" in stages["prepare"]
    assert arg("prepare", "--raw") == arg("synth", "--out")
    assert arg("train", "--data") == arg("predict_val", "--data") == arg("prepare", "--out")
    assert arg("predict_test", "--run-dir") == arg("tune", "--run-dir") == str(demo.run)
    # where the report (launch.report) reads the score and the README embeds the pictures
    assert arg("score", "--json") == str(demo.run / "report" / "score_test.json")
    assert arg("curves", "--out") == str(demo.run / "report" / "curves.png")
    assert (arg("render", "--out"), arg("render", "--tiles")) == \
        (str(demo.run / "report" / "tiles"), "2")
    assert arg("predict_val", "--split") == "val" and arg("predict_test", "--split") == "test"
    assert arg("tune", "--pred") == arg("predict_val", "--out")
    assert arg("tune", "--truth") == str(demo.data / "val" / "truth.csv")
    assert arg("polygonize", "--pred") == arg("predict_test", "--out")
    assert arg("score", "--proposals") == arg("polygonize", "--out")
    assert arg("score", "--truth") == str(demo.data / "test" / "truth.csv")
    assert arg("render", "--pred") == arg("predict_test", "--out")
    train = stages["train"]
    assert "--nproc_per_node=3" in train
    assert train[train.index("--run-dir") + 2:] == ["--set", "train.epochs=2",
                                                      "--set", "data.crop_size=64"]


def test_product_mul_makes_and_prepares_8_band_imagery(tmp_path: Path) -> None:
    """--product MUL-PanSharpen: synth writes MUL-PanSharpen/ and prepare reads it; the default's
    commands carry neither flag, so a demo directory's completed stages stay done."""
    stages = dict(Demo(tmp_path / "demo", product="MUL-PanSharpen").stages())
    assert "--mul" in stages["synth"]
    prepare = stages["prepare"]
    assert prepare[prepare.index("--product") + 1] == "MUL-PanSharpen"
    default = dict(Demo(tmp_path / "demo").stages())
    assert "--mul" not in default["synth"] and "--product" not in default["prepare"]
    assert {k: v for k, v in stages.items() if k not in ("synth", "prepare")} == \
        {k: v for k, v in default.items() if k not in ("synth", "prepare")}


def test_too_few_tiles_names_the_least_that_works(tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    """70:15:15 of 4 tiles is 3:1:0; 5 tiles give 3:1:1, so 5 is what the message must say."""
    with pytest.raises(SystemExit):
        demo_module.main(["--out", str(tmp_path / "demo"), "--tiles", "4"])
    assert capsys.readouterr().err.strip().endswith("give at least 5")


def _finished_run(tmp_path: Path) -> tuple[Path, Path]:
    """The files the stages leave for the report: 5/2/1 tiles (train in 2 shards), three epochs
    with validation in the first two only, a tuning and a score."""
    tile = (np.zeros((8, 8, 3), np.uint16), np.zeros((8, 8), np.uint8))
    data = write_dataset(tmp_path / "data", {
        split: [(f"{split}{i}", *tile) for i in range(n)]
        for split, n in (("train", 5), ("val", 2), ("test", 1))}, shard_size=4)
    run = tmp_path / "run"
    (run / "report").mkdir(parents=True)
    (run / "report" / "score_test.json").write_text(json.dumps(
        {"precision": 0.75, "recall": 0.6, "f1": 2 / 3, "tp": 3, "fp": 1, "fn": 2,
         "per_image": []}))
    settings = {"building_threshold": 0.6}
    (run / "tune.json").write_text(json.dumps({"default": {"f1": 0.5},
                                               "best": {"f1": 0.7, "settings": settings}}))
    (run / "postproc.json").write_text(json.dumps(settings))
    (run / "log.jsonl").write_text(
        '{"epoch": 1, "train_loss": 0.9, "val_f1": 0.1, "val_iou": 0.2}\n'
        '{"epoch": 2, "train_loss": 0.5, "val_f1": 0.3, "val_iou": 0.4}\n'
        '{"epoch": 3, "train_loss": 0.4}\n')
    return run, data


def test_the_report_holds_the_figures_of_the_runs_files(tmp_path: Path,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    run, data = _finished_run(tmp_path)
    (run / "report" / "tiles").mkdir()
    for name in ("AOI_1_img2", "AOI_1_img1"):  # what the render stage drew
        (run / "report" / "tiles" / f"{name}.png").write_bytes(b"")
    seconds = {"synth": 1.25, "train": 10.0, "score": 0.5}
    summary = write_report(run, data, seconds)
    assert summary == json.loads((run / "report" / "summary.json").read_text())
    assert summary["tiles"] == {"train": 5, "val": 2, "test": 1}
    assert (summary["precision"], summary["recall"], summary["tp"], summary["fp"],
            summary["fn"]) == (0.75, 0.6, 3, 1, 2)
    assert (summary["val_f1_default_postproc"], summary["val_f1_tuned_postproc"]) == (0.5, 0.7)
    assert summary["postproc"] == {"building_threshold": 0.6}
    # the last epoch's loss, and the IoU of the last epoch that validated
    assert (summary["epochs"], summary["final_train_loss"], summary["final_val_iou"]) == \
        (3, 0.4, 0.4)
    assert summary["seconds"] == seconds and summary["total_seconds"] == 11.8
    readme = (run / "report" / "README.md").read_text()
    assert "Test split (1 tiles): **F1 0.6667**" in readme and "| **total** | **11.8** |" in readme
    assert ("F1 0.5000 with the default settings, 0.7000 with "
            '`{"building_threshold": 0.6}`') in readme
    assert "| synth | 1.2 |\n| train | 10.0 |\n| score | 0.5 |\n" in readme
    assert "![training curves](curves.png)" in readme
    assert "![AOI_1_img1](tiles/AOI_1_img1.png)\n![AOI_1_img2](tiles/AOI_1_img2.png)" in readme
    printed = capsys.readouterr().out
    assert "test F1 0.6667  precision 0.7500  recall 0.6000" in printed
    rows = [line.split() for line in printed.splitlines()]
    assert ["train", "10.0"] in rows and ["total", "11.8"] in rows  # the stage table
    assert f"report: {run / 'report'}/README.md" in printed


def test_the_report_records_the_imagery_and_its_composite(tmp_path: Path) -> None:
    """The tile pictures' bands are said: an RGB dataset (its manifest from before --product
    reads as RGB-PanSharpen) as bands 1, 2, 3; an 8-band MUL-PanSharpen one as 5, 3, 2."""
    run, data = _finished_run(tmp_path)
    summary = write_report(run, data, {"train": 1.0})
    assert summary["imagery"] == {"product": "RGB-PanSharpen", "bands": 3,
                                  "rgb_composite": [1, 2, 3]}
    manifest = json.loads((data / "manifest.json").read_text())
    manifest.update(product="MUL-PanSharpen", bands=8,
                    band_stats={"p2": [100.0] * 8, "p98": [1100.0] * 8})
    (data / "manifest.json").write_text(json.dumps(manifest))
    summary = write_report(run, data, {"train": 1.0})
    assert summary["imagery"] == {"product": "MUL-PanSharpen", "bands": 8,
                                  "rgb_composite": [5, 3, 2]}
    assert "MUL-PanSharpen bands 5, 3, 2 as red, green, blue. Green: true positive" in \
        (run / "report" / "README.md").read_text()


@pytest.mark.slow  # the real command in a process of its own
@pytest.mark.timeout(120)
def test_ctrl_c_waits_for_the_stage_and_is_one_line(tmp_path: Path) -> None:
    """Ctrl-C (SIGINT to the whole process group, as a terminal sends it) while a stage runs: the
    stage, which got it too, stops by itself. The demo gave it 0.25 s (subprocess.run) and then
    SIGKILL, which cut its clean-up short (and killed torchrun before it stopped its workers),
    and it ended in a KeyboardInterrupt traceback, killed by SIGINT. Now it waits for the stage,
    then says one line and exits 130."""
    from proc_helpers import interrupt_when

    out = tmp_path / "demo"
    worker = Path(__file__).with_name("demo_ctrl_c_worker.py")  # one stand-in stage
    res = interrupt_when([sys.executable, str(worker), "--out", str(out), "--tiles", "24"],
                         "stage running", timeout=60)
    assert res.returncode == 130, res.stderr[-3000:]
    assert (out / "cleaned-up").exists()  # the stage's clean-up ran to its end
    assert res.stderr.strip().splitlines() == [
        "stage: interrupted",
        f"launch.demo: interrupted; rerun the same command to go on (the stages done in "
        f"{out / 'stages.json'} are skipped)"]


def test_the_final_val_iou_of_a_run_validated_without_f1(tmp_path: Path) -> None:
    """With train.val_f1=false the log holds val_iou but no val_f1: the report's final_val_iou
    is that val_iou (it was null, as if the run had never validated)."""
    from launch.report import build_summary

    run, data = _finished_run(tmp_path)
    (run / "log.jsonl").write_text(
        '{"epoch": 1, "train_loss": 0.9, "val_loss": 0.8, "val_iou": 0.2}\n'
        '{"epoch": 2, "train_loss": 0.5, "val_loss": 0.6, "val_iou": 0.35, "val_miou": null,'
        ' "val_weights": "model"}\n'
        '{"epoch": 3, "train_loss": 0.4}\n')
    assert build_summary(run, data, {})["final_val_iou"] == 0.35


def test_a_stage_whose_results_are_gone_runs_again(tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    """stages.json alone was trusted: a rerun after the run directory (or the report in it) was
    removed skipped every stage, and the report then failed on a file "the stage that writes it
    did not run". Synth's raw AOI, read by nothing after prepare, is made again only with it."""
    monkeypatch.setattr(demo_module, "write_report", lambda *a: {})
    out = tmp_path / "demo"
    run_demo(_TinyDemo(out, tiles=3))
    shutil.rmtree(out / "run")
    capsys.readouterr()
    run_demo(_TinyDemo(out, tiles=3))
    printed = capsys.readouterr().out
    assert "== synth: done before, skipped" in printed
    assert f"== train: done before, but {out / 'run'} is gone: running it again" in printed
    assert _ckpts(out) == ["ckpt-0"]
    # the raw AOI alone gone: nothing needs it, nothing runs
    shutil.rmtree(_TinyDemo(out).raw)
    run_demo(_TinyDemo(out, tiles=3))
    assert capsys.readouterr().out.count("done before, skipped") == 2
    assert not _TinyDemo(out).raw.exists()
    # both gone: synth runs again for the training that runs again
    shutil.rmtree(out / "run")
    run_demo(_TinyDemo(out, tiles=3))
    assert len(list(_TinyDemo(out).raw.iterdir())) == 3 and _ckpts(out) == ["ckpt-0"]


def test_every_stage_names_its_results(tmp_path: Path) -> None:
    """The report's inputs are among them: a rerun after ``rm -r OUT/run/report`` redoes the
    stages that write the report's files instead of failing on a missing score_test.json."""
    demo = Demo(tmp_path / "demo")
    stages = demo.stages()
    assert all(demo.results(name) for name, _ in stages)
    for name, cmd in stages:  # each is an output of its command, or inside one
        outs = [Path(v) for f, v in zip(cmd[:-1], cmd[1:], strict=True)
                if f in ("--out", "--run-dir", "--json")]
        for p in demo.results(name):
            assert any(p == o or o in p.parents for o in outs), (name, p)
    state = {name: {"cmd": cmd, "seconds": 1.0} for name, cmd in stages}
    made = [p for name, _ in stages for p in demo.results(name)]
    for p in made:  # (a directory stands for a file here: only their presence is looked at)
        p.mkdir(parents=True, exist_ok=True)
    assert demo_module.first_to_run(demo, stages, state) == len(stages)  # all done: skipped
    shutil.rmtree(demo.report)
    names = [n for n, _ in stages]
    assert names[demo_module.first_to_run(demo, stages, state)] == "polygonize"
