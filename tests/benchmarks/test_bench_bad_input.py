"""The benchmarks on bad input: one line naming the flag or file, before any timing, as the
project's own commands do (they gave tracebacks, a ZeroDivisionError, a failure after the whole
run for a --json that is a directory, and an exit 0 with 0 tiles for a missing --pred)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from benchmarks import (
    chips,
    common,
    load,
    load_baseline,
    loader,
    merge,
    postproc,
    prepare,
    train,
)
from benchmarks.common import run


@pytest.mark.parametrize(("module", "argv", "named"), [
    (loader, ["--rounds", "0"], "--rounds: must be >= 1, got 0"),
    (postproc, ["--tiles", "0"], "--tiles: must be >= 1, got 0"),
    (postproc, ["--workers", "two"], "--workers: 'two' is not a whole number"),
    (prepare, ["--tiles", "0"], "--tiles: must be >= 1, got 0"),
    (load, ["--tiles", "0", "--prepare-tiles", "0"], "--tiles and --prepare-tiles are both 0"),
    # an empty item was dropped without a word (here the rest would have been 'both 0')
    (load, ["--tiles", "0,", "--prepare-tiles", "0"], "--tiles: '0,' has an empty item"),
    (load, ["--tiles", "0", "--prepare-tiles", "0,,0"], "--prepare-tiles: '0,,0' has an empty"),
    (load, ["--tiles", "0", "--prepare-tiles", "0", "--baseline-tiles", " ,0"],
     "--baseline-tiles: ' ,0' has an empty item"),
    (train, ["--config", "configs/nope.toml", "--steps", "1"], "configs/nope.toml: file not found"),
    (postproc, ["--tiles", "1", "--json", "."], "--json . is a directory"),
    (merge, ["--grids", "1,4"], "--grids: '1,4': each size >= 2 tiles a side"),  # (no edges)
    (merge, ["--grids", "4", "--tile-px", "32"], "--tile-px 32: at least 64"),
    (chips, ["--margins", "0,300"], "--margins: at most the --chip-size (256)"),
    (chips, ["--scene-px", "300"], "--scene-px 300 gives one chip of --chip-size 256"),
])
def test_bad_arguments_are_refused_before_any_work(module, argv: list[str], named: str,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        module.main(argv)
    assert e.value.code == 2 and named in capsys.readouterr().err


@pytest.mark.parametrize(("module", "argv", "named"), [
    # a negative warm-up never started the clock: rates over the time since boot, silently
    (train, ["--warmup", "-1"], "--warmup: must be >= 0, got -1"),
    # a row labelled 0 workers (prepare's 0 is serial, DALI's at least one thread)
    (prepare, ["--workers", "0"], "--workers: must be >= 1, got 0"),
    (loader, ["--workers", "0"], "--workers: must be >= 1, got 0"),
    (loader, ["--crop", "-5"], "--crop: must be >= 0, got -5"),  # (named data.crop_size)
    (loader, ["--step-ms", "-1"], "--step-ms: must be finite and >= 0, got -1"),  # (skipped)
])
def test_out_of_range_settings_are_refused_before_any_work(
        module, argv: list[str], named: str, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    def started(*_a, **_k):
        raise AssertionError("the benchmark started its work")

    for mod, name in ((train, "_dataset"), (prepare, "write_aoi"), (loader, "make_dataset")):
        monkeypatch.setattr(mod, name, started)
    with pytest.raises(SystemExit) as e:
        module.main(argv)
    assert e.value.code == 2 and named in capsys.readouterr().err


def _refused(module, data: Path, monkeypatch: pytest.MonkeyPatch,
             capsys: pytest.CaptureFixture[str]) -> tuple[list[str], int | str | None]:
    """``module``'s main on ``data``, which must stop before any work: stderr's lines and the
    exit code."""
    def started(*_a, **_k):
        raise AssertionError("the benchmark started its work")

    monkeypatch.setattr(train, "run_to_end", started)
    monkeypatch.setattr(loader, "_variants", started)
    with pytest.raises(SystemExit) as e:
        module.main(["--data", str(data), "--steps" if module is train else "--rounds", "1"])
    return capsys.readouterr().err.strip().splitlines(), e.value.code


@pytest.mark.parametrize("module", [loader, train])
@pytest.mark.parametrize("kind", ["missing", "a file", "not a dataset"])
def test_a_data_dir_that_is_no_dataset_is_one_line_naming_data(
        module, kind: str, tmp_path: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """benchmarks.train checked --data only in its torchrun workers: their error, then
    torchrun's traceback and failure report, and exit 1 (not 2)."""
    data = {"missing": tmp_path / "nope", "a file": tmp_path / "file",
            "not a dataset": tmp_path}[kind]
    (tmp_path / "file").write_text("x")
    err, code = _refused(module, data, monkeypatch, capsys)
    assert code == 2 and f"error: --data {data}: " in err[-1]
    named = "no such directory" if kind == "missing" else "manifest.json"
    assert named in err[-1] and "Traceback" not in "\n".join(err)


def _truncated_train(small_dataset: Path, tmp_path: Path, shards: int) -> Path:
    """A copy of the dataset with its first ``shards`` training shards cut in half."""
    data = Path(shutil.copytree(small_dataset, tmp_path / "data"))
    for tar in sorted((data / "train").glob("shard-*.tar"))[:shards]:
        tar.write_bytes(tar.read_bytes()[: tar.stat().st_size // 2])
    return data


def test_the_webdataset_reference_reads_the_shards_the_loaders_read(
        small_dataset: Path, tmp_path: Path) -> None:
    """A truncated shard, which the project's loaders leave out with a warning, stopped
    benchmarks.loader with a tarfile traceback from the reference's DataLoader worker."""
    from dataio.loader import LoaderConfig
    from dataio.manifest import load_manifest
    from dataio.sharding import SampleIndex

    data = _truncated_train(small_dataset, tmp_path, 1)
    index = SampleIndex.build(load_manifest(data), "train")
    assert 0 < len(index) < load_manifest(data).samples("train")
    ref = loader.WebdatasetReference(data, index, False, LoaderConfig(batch_size=4,
                                                                      num_threads=0))
    assert sum(len(images) for images, _ in ref) == len(index)


@pytest.mark.parametrize("module", [loader, train])
@pytest.mark.parametrize("kind", ["every shard truncated", "images only"])
def test_a_data_dir_without_a_usable_training_sample_is_one_line(
        module, kind: str, small_dataset: Path, images_only_dataset: Path, tmp_path: Path,
        capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """benchmarks.loader stopped with the loader's DataError as a traceback; benchmarks.train's
    torchrun workers said it, then came torchrun's traceback and failure report (exit 1)."""
    data = (_truncated_train(small_dataset, tmp_path, 100) if kind == "every shard truncated"
            else images_only_dataset)  # (every tile in test: no training split)
    err, code = _refused(module, data, monkeypatch, capsys)
    assert code == 2 and err[-1].startswith(
        f"python -m benchmarks.{module.__name__.rpartition('.')[2]}: error: --data {data}: ")
    assert ("no usable sample in split 'train'" if kind == "every shard truncated"
            else "split 'train' of") in err[-1]
    assert not [line for line in err if "Traceback" in line or "Warning" in line]


def test_a_loader_data_error_is_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    """(benchmarks.common.run took ValueError and OSError alone: the loader's DataError, input
    it cannot use, was a traceback)"""
    from dataio.sharding import DataError

    def main() -> int:
        raise DataError("/d/train/shard-000000.tar: img1: undecodable img.npy")

    assert run("loader", main) == 2
    assert capsys.readouterr().err == ("python -m benchmarks.loader: error: /d/train/"
                                       "shard-000000.tar: img1: undecodable img.npy\n")


def _corrupt_pred(tmp_path: Path) -> Path:
    (tmp_path / "pred").mkdir()
    (tmp_path / "pred" / "pred-000000.tar").write_bytes(b"not a tar" * 100)
    return tmp_path / "pred"


@pytest.mark.parametrize(("name", "main", "argv", "named"), [
    ("load_baseline", load_baseline.main,
     lambda d: ["polygonize", "--pred", str(d / "nope"), "--out", str(d / "p.csv")],
     "no pred-*.tar shards"),
    ("load_baseline", load_baseline.main,
     lambda d: ["polygonize", "--pred", str(_corrupt_pred(d)), "--out", str(d / "p.csv")],
     "pred-000000.tar: not a readable tar"),
    ("load_baseline", load_baseline.main,  # one shard given for its directory ("not found")
     lambda d: ["polygonize", "--pred", str(_corrupt_pred(d) / "pred-000000.tar"), "--out",
                str(d / "p.csv")],
     "pred-000000.tar is a file; give the directory of prediction shards (pred-*.tar)"),
    ("load_baseline", load_baseline.main,
     lambda d: ["score", "--truth", str(d / "nope.csv"), "--proposals", str(d / "p.csv")],
     "nope.csv: file not found"),
])
def test_bad_inputs_are_one_line(name: str, main, argv, named: str, tmp_path: Path,
                                 capsys: pytest.CaptureFixture[str]) -> None:
    args = argv(tmp_path)
    assert run(name, lambda: main(args)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"python -m benchmarks.{name}: error: ")
    assert named in err[0]
    assert not (tmp_path / "p.csv").exists()


def test_a_benchmark_that_fails_exits_non_zero() -> None:
    """(benchmarks.train returns 1 when a torchrun variant fails: make gpu-check reads the exit)"""
    assert run("train", lambda: 1) == 1
    assert run("train", lambda: {"rows": []}) == 0  # those that return their JSON object


def test_best_time_is_the_fastest_run(monkeypatch: pytest.MonkeyPatch) -> None:
    ticks = iter([0.0, 0.3, 1.0, 1.1, 2.0, 2.2])  # runs of 0.3, 0.1 and 0.2 s
    monkeypatch.setattr(common.time, "perf_counter", lambda: next(ticks))
    assert common.best_time(lambda: None, repeat=3) == pytest.approx(0.1)


def test_ctrl_c_stops_a_benchmark_started_with_ctrl_c_ignored(
        capsys: pytest.CaptureFixture[str]) -> None:
    """A shell starts a background command without job control (``cmd &`` in a script) with
    Ctrl-C ignored, and Python installs no KeyboardInterrupt then: a benchmark ignored Ctrl-C and
    ran on (the Ctrl-C test in a suite run started so waited 120 s, with nothing on stderr). The
    project's commands install their handler themselves; so does ``run``. A further Ctrl-C,
    while it exits, is ignored."""
    import signal

    def main() -> int:
        signal.raise_signal(signal.SIGINT)  # (a handler, if any, raises in here)
        return 0

    before = signal.signal(signal.SIGINT, signal.SIG_IGN)  # as inherited from such a shell
    try:
        assert run("prepare", main) == 130
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, before)  # (pytest's own Ctrl-C)
    assert capsys.readouterr().err == "python -m benchmarks.prepare: interrupted\n"


def _interrupt_once_it_has_workers(args: list[str], processes: int,
                                   settle: float = 0.0) -> tuple[int, str]:
    """Run ``python -m benchmarks.ARGS`` in a session of its own; once it has ``processes``
    processes (itself and its workers), wait ``settle`` s, send Ctrl-C to its whole process
    group as a terminal does; its exit code and stderr."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from benchmarks.proctree import tree_pids

    proc = subprocess.Popen([sys.executable, "-m", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True,
                            cwd=Path(__file__).resolve().parents[2])
    try:
        deadline = time.monotonic() + 120
        while len(tree_pids(proc.pid)) < processes and proc.poll() is None:
            assert time.monotonic() < deadline, "the benchmark started no workers"
            time.sleep(0.1)
        time.sleep(settle)
        os.killpg(proc.pid, signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    return proc.returncode, err


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_ctrl_c_is_one_line_and_leaves_no_json(tmp_path: Path) -> None:
    """Ctrl-C (SIGINT to the whole process group, as a terminal sends it) while the benchmark
    works: one line and exit code 130, as the project's commands, not a traceback; and no JSON,
    whole or partial, nor its temporary file. (Started with Ctrl-C ignored, as a shell starts a
    background command without job control: test_ctrl_c_stops_a_benchmark_started_with_...)"""
    out = tmp_path / "out" / "prepare.json"
    rc, err = _interrupt_once_it_has_workers(  # (its pool: in main())
        ["benchmarks.prepare", "--tiles", "400", "--workers", "2", "--json", str(out)], 2, 1.0)
    assert rc == 130, err[-2000:]
    assert err.strip().splitlines()[-1] == "python -m benchmarks.prepare: interrupted", err
    assert "Traceback" not in err
    assert not out.parent.exists() or list(out.parent.iterdir()) == []


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_ctrl_c_in_the_postproc_benchmark_is_one_line(tmp_path: Path) -> None:
    """Its pool's workers took the terminal's Ctrl-C too: each idle one (3 workers, 2 chunks
    at a time: one at least) died of it with a KeyboardInterrupt traceback before the
    benchmark's line."""
    out = tmp_path / "out" / "postproc.json"
    rc, err = _interrupt_once_it_has_workers(  # (the pool's 3 workers)
        ["benchmarks.postproc", "--tiles", "2", "--repeat", "1", "--workers", "3",
         "--json", str(out)], 4)
    assert rc == 130, err[-2000:]
    assert err.strip().splitlines() == ["python -m benchmarks.postproc: interrupted"], err
    assert not out.parent.exists()


@pytest.mark.parametrize("module", [loader, postproc, prepare, load, train, chips])
def test_help_says_what_each_row_measures_and_every_flag(
        module, capsys: pytest.CaptureFixture[str]) -> None:
    """--help showed the docstring's first sentence only (not the variants, the baseline, how
    rows are timed) and nothing at all for a third of the flags (--steps, --warmup, --nproc,
    --rounds, --crop, prepare's --tiles, ...), not even their defaults."""
    with pytest.raises(SystemExit) as e:
        module.main(["--help"])
    out = capsys.readouterr().out
    assert e.value.code == 0
    body = module.__doc__.partition("\n\n")[2]
    assert " ".join(body.split()) in " ".join(out.split())
    parser_flags = [line.split()[0] for line in out.splitlines() if line.startswith("  --")]
    for flag in parser_flags:  # a flag line that has its help beside it or below it
        lines = out.splitlines()
        i = next(k for k, line in enumerate(lines) if line.startswith(f"  {flag}"))
        beside = lines[i].split(maxsplit=2)[2:] if len(lines[i].split()) > 2 else []
        below = lines[i + 1].startswith(" " * 8) if i + 1 < len(lines) else False
        assert beside or below, flag
