"""What a killed run leaves in its run directory, and the restart that repairs it.

A kill is simulated by a BaseException raised at the exact point (nothing in the trainer catches
it, as nothing runs after a SIGKILL); the restart is a new Trainer on the same run directory, as
``torchrun --max-restarts`` would start.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from trainer import checkpoint as ckpt
from trainer.config import load_config
from trainer.dist import DistEnv
from trainer.trainer import LOG, Trainer

FAST = ["train.val_every=0", "data.num_threads=1"]


class KilledError(BaseException):
    """Stands for the SIGKILL: not an Exception, so no handler on the way out catches it."""


def _trainer(data: Path, run: Path, overrides: list[str],
             val_f1: dict[int, float] | None = None) -> Trainer:
    cfg = load_config(Path("configs/tiny.toml"), FAST + overrides)
    t = Trainer(cfg, DistEnv(), data, run, device=torch.device("cpu"))
    if val_f1 is not None:  # scripted validation scores by epoch: which epoch is best is known
        t.validator.run = lambda _net: {"val_f1": val_f1[t.epoch]}  # type: ignore[method-assign]
    return t


def _kill_at_call(monkeypatch: pytest.MonkeyPatch, name: str, n: int) -> None:
    """Replace ``trainer.checkpoint.<name>`` by one that dies at its ``n``-th call."""
    real, calls = getattr(ckpt, name), {"n": 0}

    def dying(*args: Any) -> Any:
        calls["n"] += 1
        if calls["n"] == n:
            raise KilledError
        return real(*args)

    monkeypatch.setattr(ckpt, name, dying)


def _epochs_logged(run: Path) -> list[int]:
    return [json.loads(line)["epoch"] for line in (run / LOG).read_text().splitlines()]


def _best(run: Path) -> Path:
    return ckpt.checkpoint_dir(run) / ckpt.BEST


def test_a_kill_before_best_is_marked_is_repaired_on_resume(
        small_dataset: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # without validation every epoch's checkpoint is the best; killed after the commit of
    # epoch 2's (the last), before best.pt moved to it
    run = tmp_path / "run"
    _kill_at_call(monkeypatch, "mark_best", 2)
    with pytest.raises(KilledError):
        _trainer(small_dataset, run, ["train.epochs=2"]).train()
    monkeypatch.undo()
    newest = ckpt.list_checkpoints(run)[-1]
    assert newest.name == "step-00000010.pt"
    assert not os.path.samefile(_best(run), newest)  # stale: still epoch 1's
    _trainer(small_dataset, run, ["train.epochs=2"]).train()  # nothing left to train
    assert os.path.samefile(_best(run), newest)


def test_with_validation_a_stale_best_is_repaired_though_no_later_epoch_beats_it(
        small_dataset: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    run, scores = tmp_path / "run", {1: 0.5, 2: 0.9, 3: 0.7}
    common = ["train.epochs=3", "train.val_every=1"]
    _kill_at_call(monkeypatch, "mark_best", 2)  # epoch 2 (0.9) is best; killed before marking
    with pytest.raises(KilledError):
        _trainer(small_dataset, run, common, scores).train()
    monkeypatch.undo()
    assert ckpt.load(_best(run))["global_step"] == 5  # stale: epoch 1's
    t = _trainer(small_dataset, run, common, scores)
    t.train()
    assert t.epoch == 3 and t.best_f1 == 0.9
    # epoch 3 (0.7) is the newest but not the best: best.pt is epoch 2's checkpoint
    assert [p.name for p in ckpt.list_checkpoints(run)] == ["step-00000010.pt",
                                                            "step-00000015.pt"]
    assert os.path.samefile(_best(run), ckpt.checkpoint_path(run, 10))
    assert ckpt.load(ckpt.checkpoint_path(run, 15))["best_step"] == 10


def test_best_stays_on_the_best_epoch_across_restarts(small_dataset: Path,
                                                      tmp_path: Path) -> None:
    """Each checkpoint names the best as of itself, also one written after a restart that did not
    beat it: naming the best that the restart read (epoch 1's, still kept) made the next restart
    re-point best.pt from epoch 2 back to epoch 1."""
    run, scores = tmp_path / "run", {1: 0.5, 2: 0.9, 3: 0.7, 4: 0.6}
    for epochs in (1, 3, 4):  # restarted after epochs 1 and 3; epoch 1's kept until epoch 4
        _trainer(small_dataset, run, [f"train.epochs={epochs}", "train.val_every=1",
                                      "train.keep_last=3"], scores).train()
        assert ckpt.load(_best(run))["epoch"] == min(epochs, 2)
    assert os.path.samefile(_best(run), ckpt.checkpoint_path(run, 10))


def test_a_refused_resume_keeps_the_runs_config(small_dataset: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    _trainer(small_dataset, run, ["train.epochs=1"]).train()
    saved = (run / "config.json").read_text()
    other = _trainer(small_dataset, run, ["train.epochs=2", "model.width_divisor=4"])
    with pytest.raises(ValueError, match=r"its model does not match .*\(the checkpoint was "
                                         r"trained with model.width_divisor=8 \(here 4\); "):
        other.train()
    assert (run / "config.json").read_text() == saved  # predict still builds the run's model
    # an accepted resume writes the config it runs with
    _trainer(small_dataset, run, ["train.epochs=2"]).train()
    assert json.loads((run / "config.json").read_text())["train"]["epochs"] == 2


def test_a_resume_on_a_dataset_prepared_otherwise_is_refused(small_aoi: Path,
                                                             small_dataset: Path,
                                                             tmp_path: Path) -> None:
    """(a dataset prepared again with another --seed was resumed on without a word: its val
    split held tiles the checkpoint had trained on, and best.pt was chosen on them)"""
    from dataio.prepare import PrepareConfig, prepare

    run = tmp_path / "run"
    _trainer(small_dataset, run, ["train.epochs=1"]).train()
    reshuffled = tmp_path / "reshuffled"
    prepare(PrepareConfig(raw=[small_aoi], out=reshuffled, shard_size=4, seed=1), progress=False)
    with pytest.raises(ValueError, match=r"step-\d+\.pt: it was trained on another dataset than "
                                         f"--data {reshuffled} "):
        _trainer(reshuffled, run, ["train.epochs=2"]).train()
    assert _epochs_logged(run) == [1]
    # the same dataset elsewhere (copied to a node's disk) resumes
    shutil.copytree(small_dataset, tmp_path / "copy")
    _trainer(tmp_path / "copy", run, ["train.epochs=2"]).train()
    assert _epochs_logged(run) == [1, 2]


def test_a_resume_on_other_masks_is_refused_naming_them_and_on_other_shards_goes_on(
        small_aoi: Path, small_dataset: Path, tmp_path: Path) -> None:
    """The two fingerprints of a dataset answer two questions (Manifest.fingerprint: the data a
    checkpoint trained on; SampleIndex.fingerprint: the sample list a loader position lies in).
    Masks drawn with another --boundary-width were refused as "the train and val splits
    differ" (they did not: same --seed and --split); the same tiles in other shards resume."""
    from dataio.prepare import PrepareConfig, prepare

    run = tmp_path / "run"
    _trainer(small_dataset, run, ["train.epochs=1"]).train()
    thinner = tmp_path / "thinner"
    prepare(PrepareConfig(raw=[small_aoi], out=thinner, shard_size=4, seed=0,
                          boundary_width=1.0), progress=False)
    with pytest.raises(ValueError, match=r"trained on another dataset than --data "
                                         rf"{thinner} \(.*other masks.*--boundary-width"):
        _trainer(thinner, run, ["train.epochs=2"]).train()
    resharded = tmp_path / "resharded"
    prepare(PrepareConfig(raw=[small_aoi], out=resharded, shard_size=3, seed=0), progress=False)
    _trainer(resharded, run, ["train.epochs=2"]).train()
    assert _epochs_logged(run) == [1, 2]


@pytest.mark.parametrize("torn", [False, True], ids=["whole_line", "torn_line"])
def test_a_kill_before_the_first_checkpoint_leaves_one_line_per_epoch(
        small_dataset: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        torn: bool) -> None:
    run = tmp_path / "run"
    _kill_at_call(monkeypatch, "save", 1)  # epoch 1 is logged, its checkpoint never committed
    with pytest.raises(KilledError):
        _trainer(small_dataset, run, ["train.epochs=1"]).train()
    monkeypatch.undo()
    assert ckpt.list_checkpoints(run) == [] and _epochs_logged(run) == [1]
    if torn:  # what a kill mid-write leaves: part of the line, no newline
        text = (run / LOG).read_text()
        (run / LOG).write_text(text[: len(text) // 2])
    t = _trainer(small_dataset, run, ["train.epochs=1"])
    t.train()
    assert _epochs_logged(run) == [1]  # every line parses, epoch 1 once
    assert [r["epoch"] for r in t.history] == [1]


def test_resume_removes_temp_files_of_killed_checkpoint_writes_only(
        small_dataset: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    _trainer(small_dataset, run, ["train.epochs=1"]).train()
    d = ckpt.checkpoint_dir(run)
    left = [d / ".step-00000010.pt.k3j_x9a1.tmp", d / ".step-00000010.pt.0qz8w2mm.tmp",
            d / ".best.pt.tmp"]
    others = [d / "notes.tmp", d / ".keep", d / "step-00000099.pt.tmp", run / ".other.tmp"]
    for p in left + others:
        p.write_bytes(b"x" * 100)
    (d / ".a_dir.tmp").mkdir()
    before = {p.name: p.read_bytes() for p in ckpt.list_checkpoints(run) + [_best(run)]}
    t = _trainer(small_dataset, run, ["train.epochs=1"])
    assert t.resume()
    assert [p for p in left if p.exists()] == []
    assert all(p.exists() for p in others) and (d / ".a_dir.tmp").is_dir()
    assert {p.name: p.read_bytes() for p in ckpt.list_checkpoints(run) + [_best(run)]} == before


@contextlib.contextmanager
def _lock_held(run: Path) -> Iterator[None]:
    """Inside, another process holds ``run``'s lock as a running trainer would (its text: "pid
    4242 on nodeA")."""
    holder = subprocess.Popen(
        [sys.executable, "-c", "import fcntl, sys, time\n"
         "f = open(sys.argv[1], 'a+'); fcntl.lockf(f, fcntl.LOCK_EX)\n"
         "f.write('pid 4242 on nodeA\\n'); f.flush(); print('locked', flush=True)\n"
         "time.sleep(120)\n", str(run / ".lock")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        yield
    finally:
        holder.kill()
        holder.wait()


def test_check_refuses_a_run_directory_another_trainer_holds(
        small_dataset: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The launch scripts' --check passed a RUN that a running trainer held: rank 0 refused it
    once the group was up, every rank exited 2, and torchrun restarted the group MAX_RESTARTS
    times on it (35 s and exit 1 on the tiny preset, from launch/single_node.sh)."""
    from trainer.train import main

    run = tmp_path / "run"
    run.mkdir()
    argv = ["--check", "--config", "configs/tiny.toml", "--data", str(small_dataset),
            "--run-dir", str(run)]
    with _lock_held(run):
        assert main(argv) == 2
        assert capsys.readouterr().err.strip() == (
            f"trainer.train: error: {run}: another trainer is using this run directory "
            "(pid 4242 on nodeA); wait for it or stop it first")
        # a late node of an elastic job (multi_node.sh NNODES=MIN:MAX) finds its own rank 0
        assert main([*argv, "--elastic"]) == 0
    assert main(argv) == 0  # released: it passes, and took nothing
    _trainer(small_dataset, run, ["train.epochs=1"]).train()


def test_a_second_trainer_on_the_same_run_directory_is_refused(small_dataset: Path,
                                                               tmp_path: Path) -> None:
    """Two trainers in one run directory (a rerun beside a run still going) would interleave
    their checkpoints and log lines."""
    run = tmp_path / "run"
    run.mkdir()
    with _lock_held(run):
        with pytest.raises(ValueError, match=r"another trainer is using this run directory "
                                             r"\(pid 4242 on nodeA\)"):
            _trainer(small_dataset, run, ["train.epochs=1"]).train()
        assert not ckpt.list_checkpoints(run) and not (run / "log.jsonl").exists()
    _trainer(small_dataset, run, ["train.epochs=1"]).train()  # released: it runs
    # a later trainer in this process, after one whose torch DataLoader workers (forked while
    # it held the lock) are still alive: they must not hold the lock (flock's were inherited)
    first = _trainer(small_dataset, run, ["train.epochs=2", "data.backend=torch",
                                          "data.num_threads=2", "train.val_every=1"])
    first.train()
    _trainer(small_dataset, run, ["train.epochs=3"]).train()
    assert [json.loads(line)["epoch"] for line in (run / LOG).read_text().splitlines()] == \
        [1, 2, 3]
    del first


def test_a_file_system_without_locks_trains_unlocked(small_dataset: Path, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """Some NFS mounts refuse locks (ENOLCK): that must not stop training."""
    import errno
    import fcntl

    def no_locks(fd: Any, op: int) -> None:
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "lockf", no_locks)
    run = tmp_path / "run"
    _trainer(small_dataset, run, ["train.epochs=1"]).train()
    assert len(ckpt.list_checkpoints(run)) == 1
