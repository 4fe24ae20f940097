"""trainer.predict: prediction shards for a split, in one process and under torchrun."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import select
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO

import numpy as np
import pytest
import torch
from proc_helpers import interrupt_when, numba_interrupt
from trainer_helpers import (
    REPO,
    first_failure,
    kill_tree,
    run,
    torchrun_cmd,
    worker_env,
    worker_exit_codes,
)

from dataio.atomic import discard_staging_dir, fresh_staging_dir, missing_dirs
from dataio.loader import build_loader
from dataio.manifest import load_manifest
from dataio.shards import iter_tar_samples
from models import build_model_from_config
from postproc import predio
from postproc.predio import iter_pred_samples, list_pred_shards
from trainer import dist, predresume
from trainer.amp import resolve
from trainer.checkpoint import load, load_model
from trainer.config import load_config, load_run_config
from trainer.dist import DistEnv
from trainer.predict import PROVENANCE, predict_probs
from trainer.predict import main as predict
from trainer.trainer import Trainer


@pytest.fixture(scope="module")
def trained_run(small_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    run_dir = tmp_path_factory.mktemp("pred") / "run"
    cfg = load_config(Path("configs/tiny.toml"), ["train.epochs=2", "train.val_every=2",
                                                  "data.num_threads=1"])
    Trainer(cfg, DistEnv(), small_dataset, run_dir, device=torch.device("cpu")).train()
    return run_dir


def _read(pred: Path) -> dict[str, tuple[np.ndarray, dict]]:
    out: dict[str, tuple[np.ndarray, dict]] = {}
    for shard in list_pred_shards(pred):
        for key, prob, meta in iter_pred_samples(shard):
            assert key not in out, f"{key} predicted twice"
            out[key] = (prob, meta)
    return out


def _split_keys(data: Path, split: str) -> set[str]:
    m = load_manifest(data)
    return {k for info in m.shards(split)
            for k, _ in iter_tar_samples(data / split / info["name"])}


def test_predict_writes_every_tile_of_the_split_once(trained_run: Path, small_dataset: Path,
                                                     tmp_path: Path) -> None:
    assert predict(["--run-dir", str(trained_run), "--data", str(small_dataset), "--split",
                    "test", "--out", str(tmp_path / "pred"), "--shard-size", "2"]) == 0
    got = _read(tmp_path / "pred")
    assert set(got) == _split_keys(small_dataset, "test")
    assert len(list_pred_shards(tmp_path / "pred")) == -(-len(got) // 2)
    prov = json.loads((tmp_path / "pred" / "provenance.json").read_text())
    assert Path(prov["run_dir"]) == trained_run.resolve() and prov["split"] == "test"
    for key, (prob, meta) in got.items():
        assert prob.dtype == np.uint8 and prob.shape == (meta["height"], meta["width"], 3)
        total = prob.astype(int).sum(-1)
        assert np.abs(total - 255).max() <= 2  # three rounded probabilities of a softmax
        assert meta["image_id"] == key and len(meta["transform"]) == 6



def test_the_checkpoint_is_mapped_not_read_whole(trained_run: Path, small_dataset: Path,
                                                 tmp_path: Path,
                                                 torch_loads: list[tuple[str, bool]]) -> None:
    """(every rank loads it; read whole, each took its optimizer state too, twice the model's
    size with Adam, which prediction never uses; the memory that saves is a benchmark's figure,
    the mapping is what is asserted)"""
    assert predict(["--run-dir", str(trained_run), "--data", str(small_dataset), "--split",
                    "test", "--out", str(tmp_path / "pred")]) == 0
    mine = [(f, m) for f, m in torch_loads if Path(f).is_relative_to(trained_run)]
    assert mine and all(m for _, m in mine), torch_loads


def test_prob_png_is_the_checkpoints_softmax_of_each_tile(trained_run: Path, small_dataset: Path,
                                                         tmp_path: Path) -> None:
    """Channels background, building, boundary as round(255 * p), rows and columns as the
    tile's, from best.pt in eval mode (a transposed or batch-statistics prediction differs)."""
    assert predict(["--run-dir", str(trained_run), "--data", str(small_dataset), "--split",
                    "test", "--out", str(tmp_path / "pred")]) == 0
    got = _read(tmp_path / "pred")
    cfg = load_run_config(trained_run)
    net = build_model_from_config(cfg.model, load_manifest(small_dataset).bands, 3)
    best = trained_run / "checkpoints" / "best.pt"
    load_model(net, load(best), best, "")
    net.eval()
    cpu = torch.device("cpu")
    compared = 0
    with build_loader(small_dataset, "test", cfg.data, device=cpu) as loader:
        for batch in loader:
            with torch.no_grad(), resolve(cfg.train.amp, cpu).autocast():
                probs = torch.softmax(net(batch.image).float(), dim=1)
            for i, key in enumerate(batch.keys):
                if bool(batch.valid[i]):
                    h, w = batch.meta[i]["height"], batch.meta[i]["width"]
                    want = np.rint(255 * probs[i, :, :h, :w].permute(1, 2, 0).numpy())
                    assert np.abs(got[key][0].astype(int) - want).max() <= 1, key
                    compared += 1
    assert compared == len(got) > 0


@pytest.mark.multiproc
@pytest.mark.timeout(180)
def test_predict_under_torchrun_matches_one_process(trained_run: Path, small_dataset: Path,
                                                    tmp_path: Path) -> None:
    assert predict(["--run-dir", str(trained_run), "--data", str(small_dataset), "--split",
                    "val", "--out", str(tmp_path / "one")]) == 0
    res = run(torchrun_cmd(2, ["-m", "trainer.predict", "--run-dir", str(trained_run),
                               "--data", str(small_dataset), "--split", "val", "--out",
                               str(tmp_path / "two"), "--shard-size", "1"]), timeout=150)
    assert res.returncode == 0, res.stderr[-3000:]
    one, two = _read(tmp_path / "one"), _read(tmp_path / "two")
    # a shard per tile: rank r writes r, r + 2, ... so the ranks' shards never collide
    names = sorted(p.name for p in list_pred_shards(tmp_path / "two"))
    assert len(one) > 2 and names == [f"pred-{i:06d}.tar" for i in range(len(one))]
    assert one.keys() == two.keys() == _split_keys(small_dataset, "val")
    for key in one:
        assert np.abs(one[key][0].astype(int) - two[key][0].astype(int)).max() <= 1


@pytest.mark.multiproc
@pytest.mark.timeout(200)
@pytest.mark.parametrize(("fail_at", "said"), [
    ("pred", "rank 1 stopped while writing predictions: OSError: [Errno 28] No space left on "
             "device"),
    ("bug", "rank 1 stopped while writing predictions: RuntimeError: simulated: a bug in this "
            "rank's prediction"),
    ("publish", "rank 0 stopped while publishing into {out}: OSError: [Errno 5] Input/output "
                "error: 'simulated'")],
    ids=["full-disk", "bug", "publish"])
def test_a_failure_on_one_rank_stops_every_rank_with_the_reason_and_exit_1(
        trained_run: Path, small_dataset: Path, tmp_path: Path, fail_at: str, said: str) -> None:
    """(rank 0 said only "Connection closed by peer", or was killed saying nothing.) A full
    disk under rank 1's shard, or a bug in its prediction, is a failure of the run: exit 1 on
    every rank, as trainer.train and the postproc commands exit; each rank exited 2 before, as
    for bad input. Rank 0's publish failing (an I/O error) exited 2 there, 0 on rank 1."""
    out = tmp_path / "p"
    res = run(torchrun_cmd(2, [str(REPO / "tests" / "rank_fail_worker.py"), "trainer.predict",
                               "--run-dir", str(trained_run), "--data", str(small_dataset),
                               "--split", "val", "--out", str(out)]),
              timeout=150, env={"FAIL_AT": fail_at,
                                "FAIL_RANK": "0" if fail_at == "publish" else "1"})
    # (nothing published; the stage, with what rank 0 wrote, is kept for a rerun)
    assert res.returncode != 0 and not list(out.glob("pred-*.tar"))
    assert f"trainer.predict: error: {said.format(out=out)}" in res.stderr, res.stderr[-3000:]
    assert "Connection closed" not in res.stderr
    codes, first = worker_exit_codes(res.stderr), first_failure(res.stderr)
    assert first is not None and codes[first] == 1, res.stderr[-3000:]
    # (a rank still tearing down when torchrun saw the first exit gets its SIGTERM: 143, or
    # -15 past main: seen here for rank 0 after rank 1's failure, {0: -15, 1: 1}; the relaying
    # rank's own code is checked in one process, test_another_ranks_failure_exits_...)
    assert set(codes.values()) <= {1, 143, -15}, codes


def _tree(root: Path) -> dict[str, bytes | None]:
    """Every file and directory under ``root`` (hidden ones too), files with their bytes."""
    return {str(p.relative_to(root)): p.read_bytes() if p.is_file() else None
            for p in sorted(root.rglob("*"))}


def _published(root: Path) -> dict[str, bytes | None]:
    """:func:`_tree` of ``root`` but its stage (``.partial``), kept by a stopped run."""
    return {k: v for k, v in _tree(root).items() if k.split(os.sep)[0] != ".partial"}


@pytest.mark.slow  # the real command in a process of its own
@pytest.mark.multiproc
@pytest.mark.timeout(240)
@pytest.mark.parametrize("ranks", [1, 2])
def test_ctrl_c_is_one_line_and_leaves_out_as_it_was(trained_run: Path, small_dataset: Path,
                                                     tmp_path: Path, ranks: int) -> None:
    """Ctrl-C while predicting (a shard already in the stage): a KeyboardInterrupt traceback
    (exit -2) after a progress bar left open, so the traceback began on the bar's line. Now each
    rank says one line of its own, exit 130, and --out is as it was: an earlier prediction
    whole. The stage holding the shards is kept for the rerun to resume, and the line says so
    (it was removed, as a Ctrl-C removed it before resuming: a deliberate change)."""
    # (the train split: tiles enough that every rank is still predicting when it is pressed)
    common = ["--run-dir", str(trained_run), "--data", str(small_dataset), "--split", "train"]
    earlier, new = tmp_path / "earlier", tmp_path / "new"
    assert predict([*common, "--out", str(earlier)]) == 0
    before = _tree(earlier)
    worker = str(Path(__file__).with_name("predict_ctrl_c_worker.py"))
    for out in (earlier, new):
        # (a shard per tile and a tile per batch: the first shard is staged by the second batch)
        args = [*common, "--out", str(out), "--batch-size", "1", "--shard-size", "1"]
        cmd = [sys.executable, worker, *args] if ranks == 1 else torchrun_cmd(2, [worker, *args])
        res = interrupt_when(cmd, "predicting", times=2 * ranks)
        lines = res.stderr.replace("\r", "\n").splitlines()
        said = [line for line in lines if "interrupted" in line]
        assert said == [f"trainer.predict: interrupted; {out} is left as it was; the shards "
                        f"written so far are kept in {out / '.partial'}: rerun the same "
                        "command to resume (--fresh to start over)"] * ranks, res.stderr[-3000:]
        assert "Traceback" not in res.stderr or ranks > 1, res.stderr[-3000:]  # (torchrun's own)
        assert "KeyboardInterrupt" not in res.stderr, res.stderr[-3000:]
        # (torchrun ends with its own code, 1, and its SignalException traceback)
        assert res.returncode == (130 if ranks == 1 else 1), res.stderr[-3000:]
    assert _published(earlier) == before and _published(new) == {}
    assert list((new / ".partial").glob("pred-*.tar"))


@pytest.mark.slow  # the real command in a process of its own
@pytest.mark.multiproc
@pytest.mark.timeout(240)
@pytest.mark.parametrize("ranks", [1, 2])
def test_sigterm_is_one_line_and_keeps_the_stage_as_ctrl_c_does(
        trained_run: Path, small_dataset: Path, tmp_path: Path, ranks: int) -> None:
    """A real SIGTERM while predicting (a shard already in the stage): to the process, or to
    torchrun, which forwards it to its workers (as it sends it to the survivors of a failed
    worker; Slurm signals at a job's end or scancel). The process vanished without a line (exit
    -15). Now each rank says one line, as after a Ctrl-C, and ends with exit code 143 (128 +
    SIGTERM); --out is untouched and the stage with its shards kept for the rerun."""
    out = tmp_path / "new"
    args = ["--run-dir", str(trained_run), "--data", str(small_dataset), "--split", "train",
            "--out", str(out), "--batch-size", "1", "--shard-size", "1"]
    worker = str(Path(__file__).with_name("predict_ctrl_c_worker.py"))
    cmd = [sys.executable, worker, *args] if ranks == 1 else torchrun_cmd(2, [worker, *args])
    res = interrupt_when(cmd, "predicting", times=2 * ranks, sig=signal.SIGTERM)
    lines = res.stderr.replace("\r", "\n").splitlines()
    assert [line for line in lines if "trainer.predict:" in line] == [
        f"trainer.predict: terminated (SIGTERM); {out} is left as it was; the shards written so "
        f"far are kept in {out / '.partial'}: rerun the same command to resume (--fresh to start "
        "over)"] * ranks, res.stderr[-3000:]
    assert "KeyboardInterrupt" not in res.stderr and "Terminated" not in res.stderr, (
        res.stderr[-3000:])
    if ranks == 1:
        assert res.returncode == 143 and "Traceback" not in res.stderr, res.stderr[-3000:]
    else:  # (torchrun ends with its own code, 1, and SignalException traceback: the only one)
        assert res.returncode == 1 and res.stderr.count("Traceback") == 1, res.stderr[-3000:]
        assert "SignalException" in res.stderr, res.stderr[-3000:]
    assert _published(out) == {}
    assert list((out / ".partial").glob("pred-*.tar"))


def test_a_failed_write_leaves_out_as_it_was_and_keeps_the_shards_for_a_rerun(
        trained_run: Path, small_dataset: Path, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """A shard write that fails (a full disk) with a shard already in the stage: --out is as it
    was (an earlier prediction whole), and the stage, with the shard written, is kept for the
    rerun to resume, as the error line says, naming the shard the disk filled under. (The stage
    was removed, and a new --out with it, before a rerun could resume: the old test asserted
    that, changed deliberately.) Exit code 1, a failure of the run to rerun: it was 2, as for
    bad input (a changed expectation, deliberate too)."""
    common = ["--run-dir", str(trained_run), "--data", str(small_dataset), "--split", "val",
              "--batch-size", "1", "--shard-size", "1"]
    earlier, new = tmp_path / "earlier", tmp_path / "new"
    assert predict([*common, "--out", str(earlier)]) == 0
    before = _tree(earlier)
    real, written = predio.write_pred_shard, []

    def full_at_the_second_shard(path: Path, samples: list, **kwargs: bool) -> int:
        if written:
            def filling() -> Iterator[tuple]:  # (the disk fills while the shard is written)
                yield from samples
                raise OSError(errno.ENOSPC, "No space left on device")  # (as write() names none)
            return real(path, filling(), **kwargs)
        written.append(path)
        return real(path, samples, **kwargs)

    monkeypatch.setattr(predio, "write_pred_shard", full_at_the_second_shard)
    for out in (earlier, new):
        written.clear()
        assert predict([*common, "--out", str(out)]) == 1
        assert capsys.readouterr().err.splitlines()[-1] == (
            "trainer.predict: error: [Errno 28] No space left on device: "
            f"'{out / '.partial' / 'pred-000001.tar'}'; the shards written so "
            f"far are kept in {out / '.partial'}: rerun the same command to resume (--fresh to "
            "start over)")
        assert len(written) == 1  # (a shard was in the stage)
        assert [p.name for p in (out / ".partial").glob("pred-*.tar")] == [written[0].name]
    assert _published(earlier) == before and _published(new) == {}


def test_a_shard_written_after_rank_0_removed_the_stage_makes_no_directory(
        trained_run: Path, small_dataset: Path, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Under torchrun, a stopped run's rank 0 removes --out's stage (and a --out it made) without
    waiting for the other ranks, one of which may not be stopped yet (its Ctrl-C later, or none:
    another node's terminal) and write a shard: that write made PRED/.partial and PRED again, left
    behind holding the shard. This process plays that rank 1 of 2 (rank 0's stage and discard
    done here); now its write fails and leaves nothing."""
    new = tmp_path / "new"
    made = missing_dirs(new)
    fresh_staging_dir(new)  # rank 0's, before any rank writes
    monkeypatch.setattr(dist.DistEnv, "from_env", classmethod(
        lambda cls: cls(rank=1, world_size=2, local_rank=1, local_world_size=2)))
    monkeypatch.setattr(dist, "init", lambda env: env)  # (no process group: collectives local)
    real, tried = predio.write_pred_shard, []

    def late(path: Path, samples: list, **kwargs: bool) -> int:
        discard_staging_dir(new, made)  # rank 0, stopped, has just removed the stage
        tried.append(path)
        with contextlib.suppress(OSError):  # (this rank's last shard: written, or refused)
            real(path, samples, **kwargs)
        raise KeyboardInterrupt  # (then this rank's own Ctrl-C)

    monkeypatch.setattr(predio, "write_pred_shard", late)
    handler = signal.getsignal(signal.SIGINT)
    try:
        rc = predict(["--run-dir", str(trained_run), "--data", str(small_dataset), "--split",
                      "val", "--out", str(new), "--shard-size", "1"])
    finally:
        signal.signal(signal.SIGINT, handler)  # (pytest's own Ctrl-C)
    assert rc == 130 and [p.name for p in tried] == ["pred-000001.tar"]
    assert not new.exists(), _tree(new)


def _stop_publish(monkeypatch: pytest.MonkeyPatch,
                  stop: Callable[[str], BaseException | None]) -> None:
    """Make predict's publish raise ``stop(dst)`` at the first of its moves (``os.replace`` to
    ``dst``) for which it is not None; ``os.replace`` elsewhere stays the real one."""
    real_replace, real_publish = os.replace, predio.publish_pred_dir

    def replace(src: str, dst: str) -> None:
        e = stop(dst)
        if e is not None:
            raise e
        real_replace(src, dst)

    def publish(staging: Path, out: Path) -> None:
        monkeypatch.setattr(os, "replace", replace)
        try:
            real_publish(staging, out)
        finally:
            monkeypatch.setattr(os, "replace", real_replace)

    monkeypatch.setattr(predio, "publish_pred_dir", publish)


def test_ctrl_c_while_publishing_says_out_is_marked(trained_run: Path, small_dataset: Path,
                                                   tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    """Pressed during the moves into --out, 'left as it was' would be untrue: --out is marked
    (readers refuse it) and the line says so and how to repair it."""
    pred = tmp_path / "pred"
    args = ["--run-dir", str(trained_run), "--data", str(small_dataset), "--split", "test",
            "--out", str(pred)]
    assert predict(args) == 0
    capsys.readouterr()
    # (at the first move of a shard)
    _stop_publish(monkeypatch, lambda dst: KeyboardInterrupt()
                  if Path(dst).name.startswith("pred-") else None)
    handler = signal.getsignal(signal.SIGINT)
    try:
        rc = predict([*args, "--shard-size", "1"])
    except KeyboardInterrupt:  # (not to pytest, which takes it for the user's)
        pytest.fail("the Ctrl-C came out of trainer.predict as a KeyboardInterrupt")
    finally:
        signal.signal(signal.SIGINT, handler)  # (pytest's own Ctrl-C)
    assert rc == 130
    monkeypatch.undo()
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"trainer.predict: interrupted; {pred} is marked as being replaced (.publishing): rerun "
        "the same command")
    with pytest.raises(predio.PredError, match="interrupted.*rerun trainer.predict"):
        list_pred_shards(pred)
    assert not (pred / ".partial").exists()
    assert predict(args) == 0 and _read(pred)  # the rerun clears the mark


def test_a_ctrl_c_that_numba_reported_as_a_system_error_is_one_line_and_leaves_out_as_it_was(
        trained_run: Path, small_dataset: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    """A press while numba boxed the arrays of the PNG read-back's kernel (pngfast.unfilter, in
    every shard write) came out as a SystemError with the KeyboardInterrupt in its chain: taken
    for the share's failure, it passed predict's Ctrl-C clean-up (the stage was left in --out)
    and its one line, and sigint_once turned it into a KeyboardInterrupt traceback."""
    from postproc import pngfast

    common = ["--run-dir", str(trained_run), "--data", str(small_dataset), "--split", "val",
              "--batch-size", "1", "--shard-size", "1"]
    earlier, new = tmp_path / "earlier", tmp_path / "new"
    assert predict([*common, "--out", str(earlier)]) == 0
    before = _tree(earlier)
    real, calls = pngfast.unfilter, []

    def pressed_in_the_second_shard(*args: object) -> tuple:
        calls.append(1)
        if len(calls) > 1:  # (the first shard is in the stage)
            numba_interrupt()
        return real(*args)

    monkeypatch.setattr(pngfast, "unfilter", pressed_in_the_second_shard)
    handler = signal.getsignal(signal.SIGINT)
    for out in (earlier, new):
        calls.clear()
        capsys.readouterr()
        try:
            rc = predict([*common, "--out", str(out)])
        except KeyboardInterrupt:  # (not to pytest, which takes it for the user's)
            pytest.fail("the Ctrl-C came out of trainer.predict as a KeyboardInterrupt")
        finally:
            signal.signal(signal.SIGINT, handler)  # (pytest's own Ctrl-C)
        assert rc == 130 and len(calls) == 2
        # (the stage, with the first shard, kept for the rerun: it was removed before resuming)
        assert capsys.readouterr().err.splitlines()[-1] == (
            f"trainer.predict: interrupted; {out} is left as it was; the shards written so far "
            f"are kept in {out / '.partial'}: rerun the same command to resume (--fresh to "
            "start over)")
    assert _published(earlier) == before and _published(new) == {}


def test_a_rerun_replaces_the_earlier_prediction(trained_run: Path, small_dataset: Path,
                                                 tmp_path: Path) -> None:
    args = ["--run-dir", str(trained_run), "--data", str(small_dataset), "--split", "test",
            "--out", str(tmp_path / "pred")]
    assert predict([*args, "--shard-size", "1"]) == 0  # one shard per tile
    first = _read(tmp_path / "pred")
    assert len(list_pred_shards(tmp_path / "pred")) == len(first) > 1
    assert predict([*args, "--shard-size", "100"]) == 0
    # one shard, and none of the earlier run's left to count its tiles twice
    assert [p.name for p in list_pred_shards(tmp_path / "pred")] == ["pred-000000.tar"]
    assert _read(tmp_path / "pred").keys() == first.keys()
    assert sorted(p.name for p in (tmp_path / "pred").iterdir()) == [
        "pred-000000.tar", "provenance.json"]  # no staging left behind


def test_a_gpu_runs_config_predicts_on_a_cpu(trained_run: Path, small_dataset: Path,
                                                   tmp_path: Path) -> None:
    """(fp16 is CUDA only: predict refused such a run on a CPU machine)"""
    import torch._dynamo

    assert "tensorrt" not in torch._dynamo.list_backends(exclude_tags=())
    import shutil

    # NOTE: both runs channels_last: on a CPU its convolutions round otherwise than contiguous
    # ones (up to 3/255 apart under bf16 on an AVX-512 Xeon without AMX; equal on one with AMX),
    # and the question here is the precision and backend a GPU's config maps to
    run_dir, auto_dir = tmp_path / "run", tmp_path / "run_auto"
    for d in (run_dir, auto_dir):
        shutil.copytree(trained_run, d)
    cfg = json.loads((run_dir / "config.json").read_text())
    assert cfg["train"]["amp"] == "auto"
    cfg["model"]["channels_last"] = True
    (auto_dir / "config.json").write_text(json.dumps(cfg))
    cfg["train"]["amp"] = "fp16"  # as the run saved it on a GPU machine
    cfg["dist"]["backend"] = "nccl"
    # (a backend of a plugin that machine had: config.json was refused as "not a torch.compile
    # backend", though predict never compiles)
    cfg["model"].update(compile=True, compile_backend="tensorrt")
    (run_dir / "config.json").write_text(json.dumps(cfg))
    args = ["--data", str(small_dataset), "--split", "test"]
    assert predict(["--run-dir", str(run_dir), *args, "--out", str(tmp_path / "p16")]) == 0
    assert predict(["--run-dir", str(auto_dir), *args, "--out", str(tmp_path / "p")]) == 0
    mine, auto = _read(tmp_path / "p16"), _read(tmp_path / "p")
    assert mine.keys() == auto.keys() and len(mine) > 0
    assert all(np.array_equal(mine[k][0], auto[k][0]) for k in mine)  # as "auto" predicts


def test_a_killed_publish_is_refused_until_a_rerun(trained_run: Path, small_dataset: Path,
                                                   tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    pred = tmp_path / "pred"
    args = ["--run-dir", str(trained_run), "--data", str(small_dataset), "--split", "test",
            "--out", str(pred)]
    assert predict([*args, "--shard-size", "100"]) == 0
    tiles = _read(pred).keys()
    # the next prediction (a shard per tile) dies after two renames of its publish
    calls: list[str] = []
    _stop_publish(monkeypatch, lambda dst: calls.append(dst) or (
        OSError("killed") if len(calls) > 2 else None))
    assert predict([*args, "--shard-size", "1"]) == 1  # (publishing: a failure of the run)
    monkeypatch.undo()
    with pytest.raises(predio.PredError, match="interrupted.*rerun trainer.predict"):
        list_pred_shards(pred)
    assert predict([*args, "--shard-size", "100"]) == 0  # the rerun clears the mark and the mix
    assert sorted(p.name for p in pred.iterdir()) == ["pred-000000.tar", "provenance.json"]
    assert _read(pred).keys() == tiles


@pytest.mark.parametrize("bad", [["--shard-size", "0"], ["--batch-size", "-1"]])
def test_bad_sizes_are_refused(bad: list[str], tmp_path: Path,
                               capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        predict(["--run-dir", str(tmp_path), "--data", str(tmp_path), "--out",
                 str(tmp_path / "p"), *bad])
    last = capsys.readouterr().err.strip().splitlines()[-1]  # not the usage, which names all
    assert e.value.code == 2 and last.startswith(f"python -m trainer.predict: error: {bad[0]} "
                                                 "must be >= 1")


def test_predict_loads_a_group_norm_run(small_dataset: Path, tmp_path: Path) -> None:
    # predict must build the model the run trained (GroupNorm has no running stats: a BatchNorm
    # model refused this checkpoint's state dict)
    cfg = load_config(Path("configs/tiny.toml"), ["train.epochs=1", "train.val_every=1",
                                                  "data.num_threads=1", 'model.norm="group"'])
    run_dir = tmp_path / "run"
    Trainer(cfg, DistEnv(), small_dataset, run_dir, device=torch.device("cpu")).train()
    assert predict(["--run-dir", str(run_dir), "--data", str(small_dataset), "--split", "test",
                    "--out", str(tmp_path / "pred")]) == 0
    assert set(_read(tmp_path / "pred")) == _split_keys(small_dataset, "test")


def test_tta_of_a_flip_equivariant_net_is_its_plain_prediction() -> None:
    # a 1x1 convolution commutes with flips: TTA that forgot to flip back would differ
    torch.manual_seed(0)
    net = torch.nn.Conv2d(3, 3, kernel_size=1)
    x = torch.rand(2, 3, 8, 12)
    with torch.no_grad():
        plain, tta = predict_probs(net, x, False), predict_probs(net, x, True)
    torch.testing.assert_close(tta, plain, rtol=0, atol=1e-6)
    torch.testing.assert_close(plain.sum(1), torch.ones(2, 8, 12))


def test_flip_tta_and_a_missing_checkpoint(trained_run: Path, small_dataset: Path,
                                           tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    args = ["--run-dir", str(trained_run), "--data", str(small_dataset), "--split", "test"]
    assert predict([*args, "--out", str(tmp_path / "plain")]) == 0
    assert predict([*args, "--out", str(tmp_path / "tta"), "--tta"]) == 0
    plain, tta = _read(tmp_path / "plain"), _read(tmp_path / "tta")
    assert plain.keys() == tta.keys()
    assert any(not np.array_equal(plain[k][0], tta[k][0]) for k in plain)
    assert predict([*args, "--out", str(tmp_path / "x"), "--checkpoint",
                    str(tmp_path / "nope.pt")]) == 2
    assert "nope.pt not found" in capsys.readouterr().err


def test_a_checkpoint_where_a_directory_goes_and_back_is_named(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """--run-dir RUN/checkpoints/best.pt said '.../best.pt/checkpoints/best.pt not found (train
    first ...)', and --checkpoint RUN/checkpoints said 'not found' of a directory that exists."""
    ckpts = tmp_path / "run" / "checkpoints"
    ckpts.mkdir(parents=True)
    (ckpts / "best.pt").write_bytes(b"")
    common = ["--data", str(tmp_path), "--out", str(tmp_path / "p")]
    assert predict(["--run-dir", str(ckpts / "best.pt"), *common]) == 2
    assert predict(["--run-dir", str(tmp_path / "run"), "--checkpoint", str(ckpts), *common]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        f"trainer.predict: error: --run-dir {ckpts / 'best.pt'} is a file; give the run "
        "directory (and a checkpoint of it with --checkpoint)",
        f"trainer.predict: error: --checkpoint {ckpts} is a directory; give a checkpoint file, "
        f"e.g. {ckpts / 'best.pt'}"]


def test_an_out_that_is_a_file_or_under_one_is_named_before_the_work(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """(it was "[Errno 20] Not a directory: 'p.csv/.partial'", naming no flag, after loading
    the checkpoint and the dataset)"""
    ckpts = tmp_path / "run" / "checkpoints"
    ckpts.mkdir(parents=True)
    (ckpts / "best.pt").write_bytes(b"")  # (never read: the --out check comes first)
    shard = tmp_path / "pred-000000.tar"
    shard.write_bytes(b"x")
    for out in (shard, shard / "sub"):
        assert predict(["--run-dir", str(tmp_path / "run"), "--data", str(tmp_path), "--out",
                        str(out)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err == [f"trainer.predict: error: --out {out}: {shard} is not a directory"]
    assert shard.read_bytes() == b"x"


def test_a_directory_under_a_shard_name_is_refused_before_predicting(
        trained_run: Path, small_dataset: Path, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    """A directory at ``--out``'s ``pred-000001.tar``, a name the run's shards take: it failed
    only at the publish, after the whole prediction ("Is a directory"), exit 1 as for a full
    disk, and left --out marked as being replaced. Now one line naming it, exit 2, before any
    prediction (no stage made), --out as it was; a directory under a name no shard of this run
    takes stays, as the publish leaves it."""
    out = tmp_path / "pred"
    (out / "pred-000001.tar").mkdir(parents=True)
    args = ["--run-dir", str(trained_run), "--data", str(small_dataset), "--split", "val",
            "--shard-size", "1", "--out", str(out)]
    _refuses_the_directory(args, out, "pred-000001.tar", "a prediction shard", capsys)
    (out / "pred-000001.tar").rename(out / "pred-000099.tar")
    assert predict(args) == 0
    assert (out / "pred-000099.tar").is_dir() and len(list_pred_shards(out)) > 2


def _refuses_the_directory(args: list[str], out: Path, name: str, what: str,
                           capsys: pytest.CaptureFixture[str]) -> None:
    """predict ``args`` exits 2 with one line naming the directory ``out/name`` (``what`` goes
    there), and leaves ``out`` holding it alone."""
    assert predict(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == (f"trainer.predict: error: --out {out}: {out / name} is a directory, "
                       f"where {what} goes; move it away or give another --out"), err
    assert [p.name for p in out.iterdir()] == [name]


def test_a_directory_at_outs_publish_mark_is_refused_before_predicting(
        trained_run: Path, small_dataset: Path, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    """A directory at ``--out/.publishing``, where the publish writes its mark: found only at
    the publish, after the whole prediction ("Is a directory"), exit 1 as for a full disk (the
    shard names were checked up front, the mark was not; polygonize checks its own)."""
    out = tmp_path / "pred"
    (out / ".publishing").mkdir(parents=True)
    args = ["--run-dir", str(trained_run), "--data", str(small_dataset), "--split", "val",
            "--out", str(out)]
    _refuses_the_directory(args, out, ".publishing", "the publish's mark", capsys)


@pytest.mark.multiproc
@pytest.mark.timeout(200)
def test_torchrun_a_directory_under_rank_1s_shard_name_stops_every_rank_with_exit_2(
        trained_run: Path, small_dataset: Path, tmp_path: Path) -> None:
    """Each rank checks its own shards' names, agreed: rank 1's refusal (its first shard is
    pred-000001.tar) stops rank 0 too, both with exit 2, before any prediction."""
    out = tmp_path / "pred"
    (out / "pred-000001.tar").mkdir(parents=True)
    res = run(torchrun_cmd(2, ["-m", "trainer.predict", "--run-dir", str(trained_run),
                               "--data", str(small_dataset), "--split", "val", "--out",
                               str(out)]), timeout=150)
    said = (f"{out / 'pred-000001.tar'} is a directory, where a prediction shard goes; move it "
            "away or give another --out")
    assert res.stderr.count(said) == 2, res.stderr[-3000:]  # (rank 1's, and rank 0 relaying it)
    codes = worker_exit_codes(res.stderr)
    assert codes[first_failure(res.stderr)] == 2 and set(codes.values()) <= {2, 143, -15}, (
        codes, res.stderr[-3000:])
    assert [p.name for p in out.iterdir()] == ["pred-000001.tar"]


def test_tta_averages_the_four_flips_each_flipped_back() -> None:
    # a 3x3 convolution does not commute with flips: each flip's prediction differs
    torch.manual_seed(0)
    net = torch.nn.Conv2d(3, 3, kernel_size=3, padding=1)
    x = torch.rand(2, 3, 8, 12)
    with torch.no_grad():
        want = sum(torch.flip(torch.softmax(net(torch.flip(x, dims)), dim=1), dims)
                   for dims in ((), (3,), (2,), (2, 3))) / 4
        torch.testing.assert_close(predict_probs(net, x, True), want, rtol=0, atol=1e-6)


def test_the_default_checkpoint_is_best_pt_not_the_newest(trained_run: Path, small_dataset: Path,
                                                          tmp_path: Path) -> None:
    import shutil

    run_dir = tmp_path / "run"
    shutil.copytree(trained_run, run_dir)
    ckpts = run_dir / "checkpoints"
    steps = sorted(ckpts.glob("step-*.pt"))
    assert len(steps) >= 2
    shutil.copyfile(steps[0], ckpts / "best.pt")  # the best: an earlier step than the newest
    # (as the run records it: each checkpoint names the best as of itself, best_step; a best.pt
    # that is not the one the newest names is one a kill left before re-pointing it)
    from trainer import checkpoint as ckpt

    newest = ckpt.load(steps[-1])
    newest["best_step"] = ckpt.load(steps[0])["global_step"]
    ckpt.save(newest, steps[-1])
    args = ["--run-dir", str(run_dir), "--data", str(small_dataset), "--split", "test"]
    got = {}
    for name, extra in (("default", []), ("best", ["--checkpoint", str(steps[0])]),
                        ("newest", ["--checkpoint", str(steps[-1])])):
        assert predict([*args, "--out", str(tmp_path / name), *extra]) == 0
        got[name] = _read(tmp_path / name)
    assert got["default"].keys() == got["newest"].keys() and len(got["default"]) > 0
    assert all(np.array_equal(got["default"][k][0], got["best"][k][0]) for k in got["best"])
    assert any(not np.array_equal(got["default"][k][0], got["newest"][k][0])
               for k in got["newest"])


def test_provenance_names_absolute_paths_the_checkpoint_and_tta(
        trained_run: Path, small_dataset: Path, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Relative arguments: postproc.render and postproc.polygonize read these paths later, from
    another working directory."""
    monkeypatch.chdir(tmp_path)
    assert predict(["--run-dir", os.path.relpath(trained_run), "--data",
                    os.path.relpath(small_dataset), "--split", "test", "--out", "pred",
                    "--tta"]) == 0
    assert json.loads((tmp_path / "pred" / "provenance.json").read_text()) == {
        "run_dir": str(trained_run.resolve()),
        "checkpoint": str((trained_run / "checkpoints" / "best.pt").resolve()),
        "data": str(small_dataset.resolve()), "split": "test", "tta": True}


def test_tiles_of_several_sizes_are_predicted_whole(trained_run: Path, tmp_path: Path) -> None:
    """A batch mixing tile sizes is padded to the largest; each tile's prediction is its own
    size again (the padding cut off), not the batch's."""
    from dataio.fixtures import aligned_tile, write_dataset

    tiles = [(f"AOI_9_Mix_img{i}", *aligned_tile(h, w, i))
             for i, (h, w) in enumerate([(40, 56), (72, 88), (64, 64)])]
    data = write_dataset(tmp_path / "DATA", {"test": tiles})
    assert predict(["--run-dir", str(trained_run), "--data", str(data), "--split", "test",
                    "--out", str(tmp_path / "pred"), "--batch-size", "3"]) == 0
    got = _read(tmp_path / "pred")
    assert {k: v[0].shape for k, v in got.items()} == {
        key: (*image.shape[:2], 3) for key, image, _ in tiles}


def test_data_of_another_band_count_is_named_with_the_checkpoint(
        trained_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """(the error said "does not match RUN/config.json (Error(s) in loading state_dict for
    UNet:)", blaming the config for the data's fourth band)"""
    from dataio.fixtures import aligned_tile, write_dataset

    tiles = []
    for i in range(2):
        image, mask = aligned_tile(32, 32, i)
        tiles.append((f"AOI_9_Four_img{i}", np.concatenate([image, image[..., :1]], 2), mask))
    data = write_dataset(tmp_path / "DATA", {"test": tiles})
    assert predict(["--run-dir", str(trained_run), "--data", str(data), "--split", "test",
                    "--out", str(tmp_path / "pred")]) == 2
    best = trained_run / "checkpoints" / "best.pt"
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"trainer.predict: error: {best}: its model does not match {trained_run}/config.json "
        f"(model.*) and the 4 bands (RGB-PanSharpen) of {data}/manifest.json (it has 3 input "
        "bands (here 4); 1 "
        "tensor(s) of another shape: stem.0.weight 4x3x3x3 (here 4x4x3x3))")
    assert not (tmp_path / "pred").exists()


def test_tiles_the_loader_skips_are_counted_and_none_read_is_an_error(
        trained_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A tile that does not fit the dataset (here 4 bands where its manifest says 3) is skipped
    by the loader with a warning: predict said "wrote predictions for 2 tiles" as if that were
    the split, and where no tile could be read it wrote none, exited 0 and so replaced the
    earlier prediction in --out with nothing."""
    from dataio.fixtures import aligned_tile, write_dataset

    def four_bands(i: int) -> tuple[str, np.ndarray, np.ndarray]:
        image, mask = aligned_tile(32, 32, i)
        return f"AOI_9_Bad_img{i}", np.dstack([image, image[..., :1]]), mask

    some = write_dataset(tmp_path / "SOME", {"test": [
        four_bands(0), *[(f"AOI_9_Bad_img{i}", *aligned_tile(32, 32, i)) for i in (1, 2)]]})
    pred = tmp_path / "pred"
    args = ["--run-dir", str(trained_run), "--split", "test", "--out", str(pred)]
    assert predict([*args, "--data", str(some)]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1] == (
        f"wrote predictions for 2 tiles of test to {pred}; 1 of its 3 tiles were left out "
        "(img_invalid: 1; see the warnings above)")
    assert set(_read(pred)) == {"AOI_9_Bad_img1", "AOI_9_Bad_img2"}
    shards = {p.name: p.read_bytes() for p in pred.iterdir() if p.is_file()}

    none = write_dataset(tmp_path / "NONE", {"test": [four_bands(i) for i in range(3)]})
    manifest = json.loads((none / "manifest.json").read_text())
    manifest["bands"] = 3  # (the manifest of a dataset prepared from 3-band rasters)
    manifest["band_stats"] = {k: v[:3] for k, v in manifest["band_stats"].items()}
    (none / "manifest.json").write_text(json.dumps(manifest))
    assert predict([*args, "--data", str(none)]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"trainer.predict: error: no tile of split 'test' of {none} could be read "
        f"(img_invalid: 3; see the warnings above); {pred} is left as it was")
    assert {p.name: p.read_bytes() for p in pred.iterdir()} == shards  # no staging left either


def test_a_run_not_yet_validated_names_its_newest_checkpoint(
        trained_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Stopped after epoch 1 of a val_every=2 run: step checkpoints and no best.pt, for which
    predict said "best.pt not found (train first, or pass --checkpoint)"."""
    import shutil

    run_dir = tmp_path / "run"
    shutil.copytree(trained_run, run_dir)
    ckpts = run_dir / "checkpoints"
    steps = sorted(ckpts.glob("step-*.pt"))
    for p in [ckpts / "best.pt", *steps[1:]]:  # (epoch 2's validation never happened)
        p.unlink()
    args = ["--data", str(tmp_path), "--out", str(tmp_path / "p")]
    assert predict(["--run-dir", str(run_dir), *args]) == 2
    assert predict(["--run-dir", str(tmp_path / "empty"), *args]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"trainer.predict: error: {ckpts / 'best.pt'} not found (no checkpoint of the run is "
        f"marked best yet: it has not validated; pass --checkpoint {steps[0]}, its newest, to "
        "predict with that one)",
        f"trainer.predict: error: {tmp_path / 'empty' / 'checkpoints' / 'best.pt'} not found "
        "(train first, or pass --checkpoint)"]


@pytest.mark.multiproc
@pytest.mark.timeout(200)
@pytest.mark.parametrize(("fail_at", "said"), [
    ("ckpt", "rank 1 stopped while loading {best}: ValueError: {best}: simulated: not a "
             "readable checkpoint"),
    ("weights", "rank 1 loaded other weights from {best} than rank 0 (the file changed while "
                "the ranks read it: is the run still training?)")], ids=["unreadable", "other"])
def test_every_rank_predicts_with_the_same_checkpoint_or_none_does(
        trained_run: Path, small_dataset: Path, tmp_path: Path, fail_at: str, said: str) -> None:
    """Each rank reads the checkpoint itself. One that could not stopped alone (rank 0 then died
    on "Connection closed by peer"); one that read other weights (a best.pt re-marked by a run
    still training) gave a prediction from two checkpoints, exit 0."""
    out = tmp_path / "p"
    res = run(torchrun_cmd(2, [str(REPO / "tests" / "rank_fail_worker.py"), "trainer.predict",
                               "--run-dir", str(trained_run), "--data", str(small_dataset),
                               "--split", "val", "--out", str(out)]),
              timeout=150, env={"FAIL_AT": fail_at})
    best = trained_run / "checkpoints" / "best.pt"
    assert res.returncode != 0 and not out.exists()
    assert f"trainer.predict: error: {said.format(best=best)}" in res.stderr, res.stderr[-3000:]
    assert "Connection closed" not in res.stderr


@pytest.mark.parametrize("tta", [False, True], ids=["plain", "tta"])
def test_a_tiles_prediction_does_not_depend_on_the_tiles_in_its_batch(
        trained_run: Path, tmp_path: Path, tta: bool) -> None:
    """Padded to the batch's largest tile, a smaller tile was predicted from zeros beyond its
    edge: here most of its pixels changed by up to 195/255 between --batch-size 3 and 1 (and so
    with the number of ranks)."""
    from dataio.fixtures import aligned_tile, write_dataset

    tiles = [(f"AOI_9_Mix_img{i}", *aligned_tile(h, w, i))
             for i, (h, w) in enumerate([(40, 56), (72, 88), (64, 64), (40, 56)])]
    data = write_dataset(tmp_path / "DATA", {"test": tiles})
    got = []
    for bs in ("4", "1"):
        out = tmp_path / f"pred{bs}"
        assert predict(["--run-dir", str(trained_run), "--data", str(data), "--split", "test",
                        "--out", str(out), "--batch-size", bs, *(["--tta"] if tta else [])]) == 0
        got.append(_read(out))
    assert got[0].keys() == got[1].keys() == {key for key, _, _ in tiles}
    for key in got[0]:
        assert np.abs(got[0][key][0].astype(int) - got[1][key][0].astype(int)).max() <= 1, key


def test_slots_without_a_tile_are_not_predicted() -> None:
    """The loader fills a rank's last batch with zero images up to the batch size: a split of
    one large scene at batch size 8 was predicted 8 times over (benchmarks.chips)."""
    from dataio.loader import Batch
    from trainer.predict import _batches, per_tile

    class Net(torch.nn.Module):  # (NCHW in, the first band as three classes' logits out)
        def __init__(self) -> None:
            super().__init__()
            self.seen: list[int] = []

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            self.seen.append(x.shape[0])
            return x[:, :1].expand(-1, 3, -1, -1) * torch.tensor([0.0, 2.0, 1.0]).view(1, 3, 1, 1)

    image, mask = torch.rand(4, 3, 8, 8), torch.zeros(4, 8, 8, dtype=torch.long)

    def batch(valid: list[bool]) -> Batch:
        return Batch(image, mask, [f"t{i}" if v else "" for i, v in enumerate(valid)],
                     torch.tensor(valid), [{"height": 8, "width": 8} if v else {} for v in valid])

    net = Net()
    got = list(_batches([batch([True, False, True, False]), batch([False] * 4)], net,
                        resolve("off", torch.device("cpu")), False, type("Bar", (), {
                            "update": lambda self: None})()))
    assert net.seen == [2, 1]  # the two tiles, not the padding; all padding: one slot
    assert [key for key, _, _ in got] == ["t0", "t2"]
    for (_, prob, _), i in zip(got, (0, 2), strict=True):
        want = torch.softmax(net(image[i:i + 1]), 1)[0].permute(1, 2, 0).numpy()
        np.testing.assert_allclose(prob, want, rtol=1e-6)
    # validation's call keeps the batch whole (one shape for a compiled model)
    net.seen.clear()
    assert per_tile(net, batch([True, False, True, False])).shape == (4, 3, 8, 8)
    assert net.seen == [4]


def test_a_bf16_run_predicts_in_fp32_on_a_cpu_without_native_bf16(
        trained_run: Path, small_dataset: Path, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """(train.amp=bf16 from a GPU run was kept on a CPU that emulates bf16: 5-6.5x slower than
    the fp32 that "auto" gives there, see trainer.amp)"""
    import shutil

    from trainer import amp

    monkeypatch.setattr(amp, "cpu_has_native_bf16", lambda: False)
    got = {}
    for mode in ("bf16", "off"):
        run_dir = tmp_path / mode
        shutil.copytree(trained_run, run_dir)
        cfg = json.loads((run_dir / "config.json").read_text())
        cfg["train"]["amp"] = mode
        (run_dir / "config.json").write_text(json.dumps(cfg))
        assert predict(["--run-dir", str(run_dir), "--data", str(small_dataset), "--split",
                        "test", "--out", str(tmp_path / f"p{mode}")]) == 0
        got[mode] = _read(tmp_path / f"p{mode}")
    assert got["bf16"].keys() == got["off"].keys() and len(got["off"]) > 0
    assert all(np.array_equal(got["bf16"][k][0], got["off"][k][0]) for k in got["off"])


@pytest.fixture(scope="module")
def rescaled_dataset(small_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of ``small_dataset`` whose manifest has other percentiles, as another AOI prepared
    on its own has: the same tiles, normalised otherwise by its own statistics."""
    import shutil

    data = tmp_path_factory.mktemp("rescaled") / "data"
    shutil.copytree(small_dataset, data)
    manifest = json.loads((data / "manifest.json").read_text())
    stats = manifest["band_stats"]
    stats["p2"] = [0.5 * v for v in stats["p2"]]
    stats["p98"] = [1.5 * v for v in stats["p98"]]
    (data / "manifest.json").write_text(json.dumps(manifest))
    return data


def _probs(run_dir: Path, data: Path, out: Path, *extra: str) -> dict[str, np.ndarray]:
    assert predict(["--run-dir", str(run_dir), "--data", str(data), "--split", "test",
                    "--out", str(out), *extra]) == 0
    return {key: prob for key, (prob, _) in _read(out).items()}


def test_predict_normalises_with_the_runs_training_percentiles(
        trained_run: Path, small_dataset: Path, rescaled_dataset: Path, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    """Another dataset's manifest percentiles do not change the prediction: the model sees its
    inputs scaled as in training (the loader took --data's, and the probabilities changed)."""
    want = _probs(trained_run, small_dataset, tmp_path / "same")
    got = _probs(trained_run, rescaled_dataset, tmp_path / "other")
    assert set(got) == set(want) and want
    for key, prob in want.items():
        assert np.array_equal(got[key], prob), key
    assert "training percentiles" not in capsys.readouterr().err


def test_an_older_checkpoint_normalises_with_the_datas_percentiles(
        trained_run: Path, small_dataset: Path, rescaled_dataset: Path, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    """A checkpoint without "percentiles" (saved before the trainer recorded them) still
    predicts, with --data's manifest, and says so once."""
    state = load(trained_run / "checkpoints" / "best.pt")
    assert state.pop("percentiles") is not None
    old = tmp_path / "old.pt"
    torch.save(state, old)
    want = _probs(trained_run, small_dataset, tmp_path / "new")
    capsys.readouterr()
    same = _probs(trained_run, small_dataset, tmp_path / "old", "--checkpoint", str(old))
    assert capsys.readouterr().err.count("does not record its training percentiles") == 1
    assert all(np.array_equal(same[k], p) for k, p in want.items()) and set(same) == set(want)
    other = _probs(trained_run, rescaled_dataset, tmp_path / "old2", "--checkpoint", str(old))
    assert any(not np.array_equal(other[k], p) for k, p in want.items())  # --data's scaling


def test_footprints_for_new_imagery_without_labels(
        trained_run: Path, images_only_dataset: Path, unlabelled_aoi: Path, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    """README's three commands for an AOI with no labels (SpaceNet's AOI_2_Vegas_Test_public):
    prepare --images-only -> predict -> polygonize give every tile's proposals, and GeoJSON in
    the tile's own CRS. (prepare refused --images-only before, and such an AOI gave no tile.)"""
    import csv

    import rasterio
    import shapely
    from shapely import affinity
    from shapely.geometry import shape

    from postproc.polygonize import main as polygonize

    ids = sorted(t.name[len("RGB-PanSharpen_"):-4]
                 for t in (unlabelled_aoi / "RGB-PanSharpen").glob("*.tif"))
    pred = tmp_path / "pred"
    assert predict(["--run-dir", str(trained_run), "--data", str(images_only_dataset),
                    "--split", "test", "--out", str(pred)]) == 0
    said = capsys.readouterr().out.lower()
    assert f"wrote predictions for {len(ids)} tiles" in said
    assert not any(w in said for w in ("f1", "iou", "precision", "recall"))  # nothing to score
    assert sorted(_read(pred)) == ids
    # (thresholds low enough that the briefly trained net proposes buildings in every tile)
    assert polygonize(["--pred", str(pred), "--out", str(tmp_path / "proposals.csv"),
                       "--geojson", str(tmp_path / "geo"), "--no-tuned", "--workers", "1",
                       "--building-threshold", "0.2", "--footprint-threshold", "0.2"]) == 0
    with open(tmp_path / "proposals.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert sorted({r["ImageId"] for r in rows}) == ids
    checked = 0
    for iid in ids:
        with rasterio.open(unlabelled_aoi / "RGB-PanSharpen" / f"RGB-PanSharpen_{iid}.tif") as ds:
            transform, bounds = ds.transform, shapely.box(*ds.bounds)
        doc = json.loads((tmp_path / "geo" / f"{iid}.geojson").read_text())
        assert doc["crs"]["properties"]["name"] == "urn:ogc:def:crs:EPSG::32611"  # the tile's
        pix = {int(r["BuildingId"]): shapely.from_wkt(r["PolygonWKT_Pix"])
               for r in rows if r["ImageId"] == iid and r["BuildingId"] != "-1"}
        assert len(doc["features"]) == len(pix)
        for feat in doc["features"]:
            geo = shape(feat["geometry"])
            # UTM metres inside the tile, and the CSV's pixel polygon carried by its transform
            assert bounds.buffer(1e-6).contains(geo)
            want = affinity.affine_transform(
                pix[feat["properties"]["BuildingId"]],
                [transform.a, transform.b, transform.d, transform.e, transform.c, transform.f])
            assert geo.symmetric_difference(want).area <= 1e-6 * max(want.area, 1.0)
            checked += 1
    assert checked > 0


def test_a_chip_with_a_margin_is_written_at_its_cores_size_with_its_meta(
        trained_run: Path, tmp_path: Path) -> None:
    """prepare --chip-size 64 --chip-margin 16 -> predict (TTA, chips of mixed sizes in a
    batch): each chip's prediction is the chip's size, with the meta.json the chip has without
    a margin (its transform, height, width; no core), which postproc reads."""
    import rasterio
    from affine import Affine

    from dataio.prepare import main as prepare

    tif = tmp_path / "raw" / "RGB-PanSharpen" / "RGB-PanSharpen_AOI_9_Scene_img1.tif"
    tif.parent.mkdir(parents=True)
    pixels = np.random.default_rng(3).integers(100, 2000, (3, 150, 170)).astype(np.uint16)
    scene = Affine(0.3, 0, 500123.45, 0, -0.3, 4012345.6)
    with rasterio.open(tif, "w", driver="GTiff", width=170, height=150, count=3,
                       dtype="uint16", crs="EPSG:32611", transform=scene) as ds:
        ds.write(pixels)
    data = tmp_path / "data"
    assert prepare(["--raw", str(tmp_path / "raw"), "--out", str(data), "--images-only",
                    "--chip-size", "64", "--chip-margin", "16", "--workers", "0", "--quiet"]) == 0
    assert predict(["--run-dir", str(trained_run), "--data", str(data), "--out",
                    str(tmp_path / "pred"), "--tta", "--batch-size", "4"]) == 0
    got = _read(tmp_path / "pred")
    # 150 x 170 px at 64: rows of 64 and 86 px, columns of 64, 64 and 42 px
    chips = {f"AOI_9_Scene_img1_r{r}_c{c}": (r, c, h, w) for r, h in ((0, 64), (64, 86))
             for c, w in ((0, 64), (64, 64), (128, 42))}
    assert got.keys() == chips.keys()
    for key, (prob, meta) in got.items():
        r0, c0, h, w = chips[key]
        assert prob.shape == (h, w, 3)
        np.testing.assert_allclose(meta.pop("transform"),
                                   list(scene @ Affine.translation(c0, r0))[:6], rtol=1e-12,
                                   atol=1e-12)
        assert meta == {"image_id": key, "crs": "EPSG:32611", "height": h, "width": w,
                        "bands": 3, "building_count": None, "source_offset": [r0, c0],
                        "source": tif.name}, key


def test_a_core_that_is_not_inside_its_sample_is_refused() -> None:
    from trainer.predict import to_core

    prob = np.zeros((10, 12, 3))
    meta = {"image_id": "A_r0_c0", "transform": [1, 0, 0, 0, -1, 0], "height": 10, "width": 12}
    assert to_core(prob, meta) == (prob, meta)  # no core: as it is
    cut, core_meta = to_core(prob, {**meta, "core": [2, 3, 8, 9]})
    assert cut.shape == (8, 9, 3) and core_meta == {**meta, "transform": [1, 0, 3, 0, -1, -2],
                                                    "height": 8, "width": 9}
    for bad in ([2, 3, 9, 9], [-1, 0, 5, 5], [0, 0, 0, 5], [0, 0, 5], [0, 0, 5.0, 5], "0 0 5 5"):
        with pytest.raises(ValueError, match=r"^A_r0_c0: meta.json core .* inside its 10 x 12 "
                                             "px sample; rerun dataio.prepare"):
            to_core(prob, {**meta, "core": bad})


# ---- a rerun resumes a stopped prediction ------------------------------------------------


def _stop_at_shard(monkeypatch: pytest.MonkeyPatch, n: int) -> list[Path]:
    """Make predict's ``n``-th shard write fail (a full disk), its first ``n - 1`` written;
    returns the shards written."""
    real, written = predio.write_pred_shard, []

    def write(path: Path, samples: list, **kwargs: bool) -> int:
        if len(written) >= n - 1:
            raise OSError(errno.ENOSPC, "No space left on device")
        written.append(path)
        return real(path, samples, **kwargs)

    monkeypatch.setattr(predio, "write_pred_shard", write)
    return written


def _count_tiles(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The tiles of each call of the network (``predict_probs``) from now on."""
    import trainer.predict as module

    real, seen = module.predict_probs, []

    def counting(net: torch.nn.Module, image: torch.Tensor, tta: bool) -> torch.Tensor:
        seen.append(image.shape[0])
        return real(net, image, tta)

    monkeypatch.setattr(module, "predict_probs", counting)
    return seen


def _lines(err: str) -> list[str]:
    """stderr's lines, a progress bar's updates each a line of its own"""
    return err.replace("\r", "\n").splitlines()


# (the train split: shards enough for a stop part-way; two tiles a batch)
def _resume_args(run: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return ["--run-dir", str(run), "--data", str(data), "--split", "train", "--batch-size", "2",
            "--out", str(out), *extra]


@pytest.mark.parametrize(("shard", "stop_after"), [(4, 2), (3, 1)], ids=["aligned", "mid-batch"])
def test_a_rerun_resumes_a_stopped_prediction_byte_for_byte(
        trained_run: Path, small_dataset: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str], shard: int, stop_after: int) -> None:
    """A prediction stopped after its first shards (a full disk; a kill, a time limit) lost
    them: the stage was removed, and the rerun predicted every tile again. Now the rerun keeps
    them and predicts only the tiles after them (and, where they end inside a batch, that
    batch's first tiles again: a tile's prediction is its batch's), and its output is an
    uninterrupted run's byte for byte, shard names too."""
    def args(out: Path) -> list[str]:
        return _resume_args(trained_run, small_dataset, out, "--shard-size", str(shard))

    assert predict(args(tmp_path / "whole")) == 0
    want = _tree(tmp_path / "whole")
    out = tmp_path / "pred"
    written = _stop_at_shard(monkeypatch, stop_after + 1)
    assert predict(args(out)) == 1 and len(written) == stop_after
    assert _published(out) == {}  # nothing published
    monkeypatch.undo()
    capsys.readouterr()
    seen = _count_tiles(monkeypatch)
    assert predict(args(out)) == 0
    assert _tree(out) == want
    tiles, kept = len(_read(out)), stop_after * shard
    assert tiles > kept + 2 and sum(seen) == tiles - kept + kept % 2
    said, err = capsys.readouterr()
    assert (f"trainer.predict: resuming the stopped prediction in {out / '.partial'} (--fresh "
            "to start over)") in _lines(err)
    assert said.splitlines()[-1].startswith(f"wrote predictions for {tiles} tiles of train to "
                                            f"{out} ({kept} of them in the stopped run's shards")


def _wait_for(proc: subprocess.Popen[bytes], said: bytes | list[bytes], timeout: float,
              err: IO[bytes]) -> bytes:
    """Wait until ``proc`` has said ``said`` (each of a list) on its stdout (a pipe), at most
    ``timeout`` seconds: fail if it ends or stays silent that long (``err``: its stderr, for the
    message). Returns what it said."""
    deadline, got, fd = time.monotonic() + timeout, b"", proc.stdout.fileno()  # type: ignore
    while not all(s in got for s in ([said] if isinstance(said, bytes) else said)):
        ready, _, _ = select.select([fd], [], [], max(0.0, deadline - time.monotonic()))
        chunk = os.read(fd, 4096) if ready else None
        if not chunk:
            err.seek(0)
            why = "ended" if chunk == b"" else f"said nothing for {timeout} s"
            raise AssertionError(f"{proc.args} {why} before {said!r}: {got[-1000:]!r}\n"
                                 f"{err.read()[-3000:].decode(errors='replace')}")
        got += chunk
    return got


@pytest.mark.slow  # the real command in processes of its own
@pytest.mark.multiproc
@pytest.mark.timeout(300)
def test_a_rerun_resumes_a_prediction_killed_mid_shard(trained_run: Path, small_dataset: Path,
                                                       tmp_path: Path) -> None:
    """A SIGKILL (an OOM kill, a lost node, a Slurm kill after its grace period) runs no Python
    clean-up: the stage is left as the kill found it, a complete shard and the next one's
    temporary tar half written. The real command, rerun, keeps the complete shard (the same
    file, not written again), removes the temporary one and writes the rest: its output is an
    uninterrupted run's byte for byte, and its line says it resumed. (The other resume tests
    stop a run in-process, where its except and finally clauses run.)"""
    shard = 4

    def args(out: Path) -> list[str]:
        return _resume_args(trained_run, small_dataset, out, "--shard-size", str(shard))

    assert predict(args(tmp_path / "whole")) == 0
    want = _tree(tmp_path / "whole")
    out = tmp_path / "pred"
    stage = out / ".partial"
    worker = str(Path(__file__).with_name("predict_kill_worker.py"))
    with tempfile.TemporaryFile() as err:
        proc = subprocess.Popen([sys.executable, worker, *args(out)], cwd=REPO,
                                env=worker_env(), stdout=subprocess.PIPE, stderr=err,
                                start_new_session=True)
        try:
            _wait_for(proc, b"blocked", 180, err)
            os.killpg(proc.pid, signal.SIGKILL)  # (its whole process group)
            assert proc.wait(timeout=30) == -signal.SIGKILL
        finally:
            if proc.poll() is None:
                kill_tree(proc.pid)
                proc.wait(timeout=30)
            proc.stdout.close()  # type: ignore[union-attr]
    # the kill point: the first shard whole, the second's temporary tar part-written
    temps = list(stage.glob(".pred-000001.tar.*.tmp"))
    assert len(temps) == 1 and temps[0].stat().st_size > 0, sorted(stage.iterdir())
    assert sorted(p.name for p in stage.iterdir() if p not in temps) == [
        ".resume.json", "pred-000000.tar", "provenance.json"]
    assert len(predio.shard_keys(stage / "pred-000000.tar")) == shard
    kept = (stage / "pred-000000.tar").stat()
    assert _published(out) == {}

    res = run([sys.executable, "-m", "trainer.predict", *args(out)], timeout=180)
    assert res.returncode == 0, res.stderr[-3000:]
    assert not list(out.rglob("*.tmp")) and not stage.exists()
    assert _tree(out) == want
    now = (out / "pred-000000.tar").stat()  # (published by a rename: the kept file itself)
    assert (now.st_ino, now.st_mtime_ns) == (kept.st_ino, kept.st_mtime_ns)
    assert (f"trainer.predict: resuming the stopped prediction in {stage} (--fresh to start "
            "over)") in _lines(res.stderr), res.stderr[-3000:]
    assert res.stdout.splitlines()[-1].startswith(
        f"wrote predictions for {len(_read(out))} tiles of train to {out} ({shard} of them in "
        "the stopped run's shards, kept)"), res.stdout


# ---- under torchrun: one rank (or torchrun itself) killed, and the rerun -------------------

# (the train split's 17 tiles: 9 and 8 a rank, three shards each; a rank's first ends inside a
# batch of two, so its resume predicts that batch again)
RANKS_SHARD = "3"
PRED_KILL_WORKER = str(Path(__file__).with_name("predict_kill_worker.py"))
PRED_RECORD_WORKER = str(Path(__file__).with_name("predict_record_worker.py"))


def _ranks_args(run_dir: Path, data: Path, out: Path) -> list[str]:
    return _resume_args(run_dir, data, out, "--shard-size", RANKS_SHARD)


def _recorded_torchrun(nproc: int, args: list[str], record: Path
                       ) -> tuple[subprocess.CompletedProcess[str], dict[int, list[str]]]:
    """The real command under torchrun, and each rank's writes (``predict_record_worker``)."""
    record.mkdir()
    res = run(torchrun_cmd(nproc, [PRED_RECORD_WORKER, *args]), timeout=120,
              env={"PRED_RECORD": str(record)})
    return res, {int(p.stem.removeprefix("rank-")): p.read_text().splitlines()
                 for p in sorted(record.glob("rank-*.txt"))}


@pytest.fixture(scope="module")
def two_rank_prediction(trained_run: Path, small_dataset: Path,
                        tmp_path_factory: pytest.TempPathFactory
                        ) -> tuple[Path, dict[int, list[str]]]:
    """An uninterrupted 2-rank prediction of the train split (what a killed one's rerun must
    publish), and each of its ranks' writes."""
    root = tmp_path_factory.mktemp("two_ranks")
    res, writes = _recorded_torchrun(2, _ranks_args(trained_run, small_dataset, root / "pred"),
                                     root / "record")
    assert res.returncode == 0, res.stderr[-3000:]
    return root / "pred", writes


def _gone(pid: int) -> bool:
    """``pid`` has ended (a zombie that its new parent has not reaped yet has too)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return True
    return stat.rsplit(")", 1)[1].split()[0] in ("Z", "X")


def _kill_under_torchrun(args: list[str], block: list[int], kill: str, max_restarts: int = 0
                         ) -> subprocess.CompletedProcess[str]:
    """Run the command on 2 ranks under torchrun (``predict_kill_worker``): the ranks ``block``
    stop part-way through their second shard, the others predict their whole share and wait for
    them; then SIGKILL ``kill``, ``"rank N"`` or ``"torchrun"`` (its agent alone). Fails unless
    torchrun (after its restarts, if any) and the killed attempt's workers are gone within a
    minute; returns torchrun's exit code, stdout and stderr."""
    pids: dict[int, int] = {}
    cmd = torchrun_cmd(2, [PRED_KILL_WORKER, *args], max_restarts=max_restarts)
    with tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(cmd, cwd=REPO,
                                env={**worker_env(), "BLOCK_RANKS": ",".join(map(str, block))},
                                stdout=subprocess.PIPE, stderr=err, start_new_session=True)
        try:
            said = _wait_for(proc, [f"{'blocked' if r in block else 'waiting'} rank {r} pid "
                                    .encode() for r in range(2)], 120, err)
            pids = {int(r): int(p) for r, p in re.findall(rb"rank (\d) pid (\d+)", said)}
            os.kill(proc.pid if kill == "torchrun" else pids[int(kill.split()[1])],
                    signal.SIGKILL)
            said += proc.communicate(timeout=60)[0]  # (torchrun stops the other rank)
            deadline = time.monotonic() + 30  # (workers watch for their agent every second)
            while not all(_gone(p) for p in pids.values()):
                assert time.monotonic() < deadline, f"workers {pids} outlived torchrun"
                time.sleep(0.1)
            pids = {}
        finally:
            if proc.poll() is None:
                kill_tree(proc.pid)
                proc.wait(timeout=30)
            for pid in pids.values():  # (orphans: torchrun's tree no longer holds them)
                if not _gone(pid):
                    os.kill(pid, signal.SIGKILL)
            proc.stdout.close()  # type: ignore[union-attr]
        err.seek(0)
        return subprocess.CompletedProcess(cmd, proc.returncode, said.decode(),
                                           err.read().decode(errors="replace"))


def _rank_shards(names: object, rank: int) -> list[str]:
    """The shard names of ``rank`` of 2 among ``names``."""
    return sorted(n for n in names if n.startswith("pred-") and int(n[5:11]) % 2 == rank)


@pytest.mark.slow  # the real command in processes of its own
@pytest.mark.multiproc
@pytest.mark.timeout(240)
@pytest.mark.parametrize(("block", "kill"), [([1], "rank 1"), ([0, 1], "torchrun")],
                         ids=["rank", "torchrun"])
def test_a_2_rank_prediction_killed_resumes_under_torchrun(
        trained_run: Path, small_dataset: Path, tmp_path: Path,
        two_rank_prediction: tuple[Path, dict[int, list[str]]], block: list[int],
        kill: str) -> None:
    """One rank SIGKILLed mid-shard (torchrun then stops the other, which had finished its
    share) or torchrun itself (its workers then stop themselves): no Python clean-up ran on the
    killed process. The same command rerun keeps each rank's complete shards (the files
    themselves), predicts the rest, and publishes the uninterrupted 2-rank run's output byte for
    byte: every tile of the split once, no staging file left. Only rank 0 prepares the stage
    (its key, the provenance) and publishes; each rank writes only its own shards."""
    whole, whole_writes = two_rank_prediction
    out = tmp_path / "pred"
    stage = out / ".partial"
    args = _ranks_args(trained_run, small_dataset, out)
    assert _kill_under_torchrun(args, block, kill).returncode != 0
    # the kill point: a blocked rank's first shard whole and its second's temporary tar, a
    # waiting rank's whole share; nothing published
    names = sorted(p.name for p in stage.iterdir())
    want_shards = sorted(p.name for p in whole.glob("pred-*.tar"))
    assert [n for n in names if n.endswith(".tmp")] == [
        n for r in block for n in names if n.startswith(f".pred-{2 + r:06d}.tar.")], names
    assert [n for n in names if n.startswith("pred-")] == sorted(
        n for r in range(2) for n in (_rank_shards(want_shards, r)[:1] if r in block
                                      else _rank_shards(want_shards, r))), names
    assert _published(out) == {}
    kept = {n: (stage / n).stat() for n in names if n.startswith("pred-")}

    res, writes = _recorded_torchrun(2, args, tmp_path / "record")
    assert res.returncode == 0, res.stderr[-3000:]
    assert _tree(out) == _tree(whole) and not stage.exists()
    assert _read(out).keys() == _split_keys(small_dataset, "train")  # (none twice: _read)
    for name, before in kept.items():  # (published by a rename: the kept file itself)
        now = (out / name).stat()
        assert (now.st_ino, now.st_mtime_ns) == (before.st_ino, before.st_mtime_ns), name
    assert _lines(res.stderr).count(
        f"trainer.predict: resuming the stopped prediction in {stage} (--fresh to start "
        "over)") == 1, res.stderr[-3000:]
    # each rank writes its own shards (the resumed run only those not kept), rank 0 alone the
    # stage's key and provenance and the publish
    # (resumed: the stage's key kept, not written again)
    for run_writes, kept_names, main in (
            (whole_writes, set(), [f"write {predresume.RESUME_KEY}", f"write {PROVENANCE}",
                                   "publish pred"]),
            (writes, set(kept), [f"write {PROVENANCE}", "publish pred"])):
        assert sorted(run_writes) == [0, 1]
        for rank, lines in run_writes.items():
            assert sorted(w.split()[1] for w in lines if w.startswith("shard ")) == [
                n for n in _rank_shards(want_shards, rank) if n not in kept_names]
            assert [w for w in lines if not w.startswith("shard ")] == ([] if rank else main)


@pytest.mark.slow  # the real command in processes of its own
@pytest.mark.multiproc
@pytest.mark.timeout(240)
def test_a_killed_2_rank_prediction_rerun_on_1_rank_starts_over_saying_why(
        trained_run: Path, small_dataset: Path, tmp_path: Path,
        two_rank_prediction: tuple[Path, dict[int, list[str]]]) -> None:
    """A stage of 2 ranks holds other shards than 1 rank writes (rank r's are r, r + 2, ...;
    the tiles of each differ), so a rerun with --nproc_per_node=1 after rank 0 was SIGKILLed
    (the rank that made the stage) does not resume it: it discards it in one line naming the
    number of ranks and predicts every tile, in 1 rank's shards, with no file of the 2-rank
    stage left; each tile's prediction is the uninterrupted 2-rank run's."""
    whole, _ = two_rank_prediction
    out = tmp_path / "pred"
    stage = out / ".partial"
    args = _ranks_args(trained_run, small_dataset, out)
    assert _kill_under_torchrun(args, [0], "rank 0").returncode != 0
    assert predresume.resumable(out) and _published(out) == {}
    res = run(torchrun_cmd(1, ["-m", "trainer.predict", *args]), timeout=120)
    assert res.returncode == 0, res.stderr[-3000:]
    tiles, want = _read(out), _read(whole)
    assert sorted(_tree(out)) == sorted([PROVENANCE, *(f"pred-{k:06d}.tar" for k in range(
        -(-len(want) // int(RANKS_SHARD))))])
    assert (out / PROVENANCE).read_bytes() == (whole / PROVENANCE).read_bytes()
    assert tiles.keys() == want.keys() == _split_keys(small_dataset, "train")
    for key, (prob, meta) in tiles.items():
        assert np.array_equal(prob, want[key][0]) and meta == want[key][1], key
    assert (f"trainer.predict: discarding {stage} (made by another prediction: the number of "
            "ranks changed); starting over") in _lines(res.stderr), res.stderr[-3000:]
    assert "resuming" not in res.stderr and "of them in the stopped run's shards" not in res.stdout


@pytest.mark.slow  # the real command in processes of its own
@pytest.mark.multiproc
@pytest.mark.timeout(240)
def test_a_rank_killed_under_max_restarts_is_resumed_by_the_restarted_group(
        trained_run: Path, small_dataset: Path, tmp_path: Path,
        two_rank_prediction: tuple[Path, dict[int, list[str]]]) -> None:
    """With torchrun --max-restarts, a SIGKILLed rank restarts the group with the same command:
    the restarted ranks resume the killed attempt's stage (its complete shards kept, not
    predicted again) and publish the uninterrupted run's output; torchrun ends with 0."""
    whole, _ = two_rank_prediction
    out = tmp_path / "pred"
    res = _kill_under_torchrun(_ranks_args(trained_run, small_dataset, out), [1], "rank 1",
                               max_restarts=1)
    assert res.returncode == 0, res.stderr[-3000:]
    assert _tree(out) == _tree(whole)
    # (rank 0's whole share and rank 1's first shard)
    kept = int(RANKS_SHARD) + sum(len(predio.shard_keys(whole / n)) for n in _rank_shards(
        [p.name for p in whole.glob("pred-*.tar")], 0))
    assert res.stdout.splitlines()[-1] == (
        f"wrote predictions for {len(_read(whole))} tiles of train to {out} ({kept} of them in "
        "the stopped run's shards, kept)"), res.stdout
    assert (f"trainer.predict: resuming the stopped prediction in {out / '.partial'} (--fresh "
            "to start over)") in _lines(res.stderr), res.stderr[-3000:]


def _edited_code(root: Path) -> Path:
    """A copy of the code predict's key hashes (``predresume.CODE``) under ``root``, with one
    comment added to the model: another version of the code."""
    from trainer import predresume

    for path in predresume.code_files():
        copy = root / path.relative_to(predresume.CODE_ROOT)
        copy.parent.mkdir(parents=True, exist_ok=True)
        copy.write_bytes(path.read_bytes())
    with open(root / "models" / "unet.py", "a", encoding="utf-8") as f:
        f.write("# another version\n")
    return root


@pytest.mark.parametrize(("other", "changed"), [
    (["--tta"], "--tta"), (["--shard-size", "3"], "--shard-size"),
    (["--checkpoint", "STEP"], "the checkpoint's weights"),
    (["CODE"], "the code (models/, the loader, trainer.predict, the PNG writer; or the "
               "footprints, torch or DALI version)")],
    ids=["tta", "shard-size", "checkpoint", "code"])
def test_a_stage_of_another_prediction_is_discarded(
        trained_run: Path, small_dataset: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str], other: list[str], changed: str) -> None:
    """A stage that another checkpoint, --tta, --shard-size or other code (a model or loader
    edited, another torch) made (other values, or other tiles in each shard) is not resumed:
    it is discarded in one line saying why, and the output is this prediction's."""
    from trainer import predresume

    step = sorted((trained_run / "checkpoints").glob("step-*.pt"))[0]
    other = [str(step) if a == "STEP" else a for a in other]
    common = ["--shard-size", "2"]
    assert predict(_resume_args(trained_run, small_dataset, tmp_path / "whole", *common)) == 0
    want = _tree(tmp_path / "whole")
    out = tmp_path / "pred"
    _stop_at_shard(monkeypatch, 2)
    if other == ["CODE"]:  # (the stopped run's code: the key hashes this copy's files)
        monkeypatch.setattr(predresume, "CODE_ROOT", _edited_code(tmp_path / "code"))
        other = []
    assert predict(_resume_args(trained_run, small_dataset, out, *common, *other)) == 1
    monkeypatch.undo()
    capsys.readouterr()
    seen = _count_tiles(monkeypatch)
    assert predict(_resume_args(trained_run, small_dataset, out, *common)) == 0
    assert _tree(out) == want and sum(seen) == len(_read(out))
    assert (f"trainer.predict: discarding {out / '.partial'} (made by another prediction: "
            f"{changed} changed); starting over") in _lines(capsys.readouterr().err)


def test_the_code_fingerprint_covers_each_file_and_nothing_else(tmp_path: Path) -> None:
    """The same files give the same key wherever the checkout is (no git needed); a change in
    any of them, or a file more, another key. Each pattern of ``CODE`` names files that exist
    (a module renamed away would leave the key blind to it)."""
    from trainer import predresume

    for pattern in predresume.CODE:
        assert list(predresume.CODE_ROOT.glob(pattern)), f"{pattern} matches no file"
    copy = _edited_code(tmp_path / "a")
    unet = copy / "models" / "unet.py"
    unet.write_bytes((predresume.CODE_ROOT / "models" / "unet.py").read_bytes())
    (copy / "trainer" / "train.py").write_text("# not predict's code\n", encoding="utf-8")
    key = predresume.code_sha256()
    assert predresume.code_sha256(copy) == key  # (trainer/train.py is not in CODE)
    for path in predresume.code_files(copy):
        data = path.read_bytes()
        path.write_bytes(data + b"\n")
        assert predresume.code_sha256(copy) != key, path
        path.write_bytes(data)
    (copy / "models" / "new.py").write_text("", encoding="utf-8")
    assert predresume.code_sha256(copy) != key


# The project modules trainer.predict imports (at any depth, lazily too) that are not in the
# resume key's code fingerprint (predresume.CODE), and why their code does not decide a
# prediction's values. A module predict starts to import must be put in CODE or here.
NOT_VALUES = {
    "dataio/__init__.py": "package",
    "postproc/__init__.py": "package", "trainer/__init__.py": "package",
    "dataio/atomic.py": "writes files", "dataio/imageid.py": "names", "dataio/classes.py":
    "class ids: another count is another model, which the weights' check refuses",
    "dataio/manifest.py": "the manifest's sha256 is in the key", "dataio/shards.py":
    "decodes the masks, which predict does not use", "dataio/spacenet.py": "product names",
    "trainer/checkpoint.py": "which weights load: their sha256 is in the key",
    "trainer/config.py": "settings: the model's must match the weights, the rest are in the key",
    "trainer/dist.py": "process group", "trainer/predresume.py": "the key itself",
    **{f"postproc/{m}.py": "polygonize, CLI and metrics plumbing, not prob.png" for m in (
        "blobs", "cli", "csvio", "geojson", "grow", "label", "numbacache", "polygonize", "pools",
        "provenance", "pushmetrics", "runner", "tilekernel", "trace")},
}


def _project_imports(module: str) -> set[Path]:
    """The files of the project modules ``module`` imports, at any depth, lazily too (every
    import statement in its source, function bodies included)."""
    import ast

    def file_of(name: str) -> Path | None:
        p = REPO.joinpath(*name.split("."))
        return next((f for f in (p.with_suffix(".py"), p / "__init__.py") if f.is_file()), None)

    packages = {"dataio", "models", "trainer", "postproc"}
    seen: dict[str, Path] = {}
    todo = [module]
    while todo:
        name = todo.pop()
        path = file_of(name)
        if name in seen or path is None:
            continue
        seen[name] = path
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                     [node.module, *(f"{node.module}.{a.name}" for a in node.names)]
                     if isinstance(node, ast.ImportFrom) and node.module and not node.level
                     else [])
            for n in names:
                parts = n.split(".")
                if parts[0] in packages:  # (a package's __init__ runs too)
                    todo += [".".join(parts[:i]) for i in range(1, len(parts) + 1)]
    return set(seen.values())


def test_every_module_predict_imports_is_in_the_code_fingerprint_or_named_harmless() -> None:
    """The fingerprint is a list of files: a module that predict starts to import (a new
    normaliser, a new decoder) must be added to it, or here with the reason it cannot change
    a prediction; this test fails until one of the two is done."""
    from trainer import predresume

    imported = _project_imports("trainer.predict")
    hashed = set(predresume.code_files())
    named = {REPO / f for f in NOT_VALUES}
    assert REPO / "models" / "unet.py" in imported and REPO / "dataio" / "augment.py" in imported
    unknown = sorted(str(p.relative_to(REPO)) for p in imported - hashed - named)
    assert not unknown, f"predict imports these, not in predresume.CODE nor NOT_VALUES: {unknown}"
    stale = sorted(str(p.relative_to(REPO)) for p in named - imported)
    assert not stale, f"NOT_VALUES names files predict no longer imports: {stale}"
    assert not named & hashed, "a file both hashed and named harmless"


def test_fresh_starts_over_and_a_damaged_shard_is_written_again(
        trained_run: Path, small_dataset: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    """A truncated shard in the stage (and a killed write's temporary file) is not kept: the
    rerun writes it again, and publishes neither. --fresh discards a stage it could resume."""
    common = ["--shard-size", "2"]
    assert predict(_resume_args(trained_run, small_dataset, tmp_path / "whole", *common)) == 0
    want = _tree(tmp_path / "whole")
    out = tmp_path / "pred"
    for fresh in (False, True):
        _stop_at_shard(monkeypatch, 3)
        assert predict(_resume_args(trained_run, small_dataset, out, *common)) == 1
        monkeypatch.undo()
        stage = out / ".partial"
        second = stage / "pred-000001.tar"
        data = second.read_bytes()
        second.write_bytes(data[:len(data) // 2])  # (cut inside a member)
        (stage / ".pred-000002.tar.abcd1234.tmp").write_bytes(b"killed")
        capsys.readouterr()
        seen = _count_tiles(monkeypatch)
        assert predict(_resume_args(trained_run, small_dataset, out, *common,
                                    *(["--fresh"] if fresh else []))) == 0
        monkeypatch.undo()
        assert _tree(out) == want
        # the first shard's two tiles kept (not with --fresh); the truncated second's redone
        assert sum(seen) == len(_read(out)) - (0 if fresh else 2)
        if fresh:
            assert (f"trainer.predict: discarding {stage} (--fresh); starting over"
                    in _lines(capsys.readouterr().err))


def test_each_rank_resumes_after_its_own_complete_shards(small_dataset: Path,
                                                         tmp_path: Path) -> None:
    """Two ranks stopped at different shards (rank 0 after its second, rank 1 after its first,
    its second cut short): each keeps its own complete shards, removes its others (and no
    other rank's), and its loader, started where the scan says, reads the rest of its share:
    the kept tiles and the rest are the share of an uninterrupted run, once each."""
    from dataio.loader import LoaderConfig
    from trainer import predresume

    cfg = LoaderConfig(batch_size=2, num_threads=1)
    shard, world = 3, 2
    stage = tmp_path / ".partial"
    stage.mkdir()

    def share(loader: object) -> list[str]:
        return [k for b in loader for k, v in zip(b.keys, b.valid.tolist(), strict=True) if v]

    shares, loaders = [], []
    for rank in range(world):
        loader = build_loader(small_dataset, "train", cfg, rank, world)
        loaders.append(loader)
        shares.append(share(loader))
        chunks = [shares[rank][i:i + shard] for i in range(0, len(shares[rank]), shard)]
        assert len(chunks) >= 3
        for k, chunk in enumerate(chunks[:3]):
            predio.write_pred_shard(stage / predresume.shard_name(k, rank, world), [
                (key, np.zeros((2, 2, 3), np.uint8), {"height": 2, "width": 2})
                for key in chunk])
    # rank 1's second: cut in tarfile's padding after the end-of-archive marker (it reads whole,
    # but it is not the file an uninterrupted run writes)
    second = stage / predresume.shard_name(1, 1, world)
    data = second.read_bytes()
    end = -(-len(data.rstrip(b"\0")) // 512) * 512 + 1024
    assert end < len(data)
    second.write_bytes(data[:end])
    assert predio.shard_keys(second) == shares[1][shard:2 * shard]
    (stage / predresume.shard_name(2, 0, world)).unlink()  # rank 0's third: not written
    keys = [r.key for r in loaders[0].index.samples]
    for rank, kept_shards in ((0, 2), (1, 1)):
        at = predresume.scan_share(stage, keys, rank, world, cfg.batch_size, shard)
        assert (at.shards, at.tiles, at.skipped) == (kept_shards, kept_shards * shard, 0)
        predresume.clear_share(stage, rank, world, at.shards)
        loader = loaders[rank]
        loader.load_state_dict(predresume.loader_state(loader, at.step))
        rest = [k for k in share(loader) if k not in at.drop]
        assert shares[rank][:at.tiles] + rest == shares[rank]
        with loader:
            pass
    assert sorted(p.name for p in stage.iterdir()) == [
        predresume.shard_name(k, r, world) for k, r in ((0, 0), (0, 1), (1, 0))]
    # a share written whole: nothing of it is read again (its last batch, part full, neither)
    r = next(r for r in range(world) if len(shares[r]) % cfg.batch_size)
    done = tmp_path / "done"
    done.mkdir()
    chunks = [shares[r][i:i + shard] for i in range(0, len(shares[r]), shard)]
    for k, chunk in enumerate(chunks):
        predio.write_pred_shard(done / predresume.shard_name(k, r, world), [
            (key, np.zeros((2, 2, 3), np.uint8), {"height": 2, "width": 2}) for key in chunk])
    at = predresume.scan_share(done, keys, r, world, cfg.batch_size, shard)
    assert (at.shards, at.tiles, at.drop, at.skipped) == (len(chunks), len(shares[r]), set(), 0)
    loader = build_loader(small_dataset, "train", cfg, r, world)
    loader.load_state_dict(predresume.loader_state(loader, at.step))
    with loader:
        assert share(loader) == []


def test_a_resumed_run_counts_the_tiles_the_stopped_run_skipped(
        trained_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    """A tile the stopped run's loader skipped (4 bands where the manifest says 3), before its
    last kept shard, is not read again: the rerun counts it as left out all the same, not as a
    tile of a shard left out."""
    from dataio.fixtures import aligned_tile, write_dataset

    image, mask = aligned_tile(32, 32, 0)
    tiles = [("AOI_9_Bad_img0", np.dstack([image, image[..., :1]]), mask),
             *[(f"AOI_9_Bad_img{i}", *aligned_tile(32, 32, i)) for i in range(1, 6)]]
    data = write_dataset(tmp_path / "DATA", {"test": tiles})
    args = ["--run-dir", str(trained_run), "--data", str(data), "--split", "test",
            "--batch-size", "2", "--shard-size", "2"]
    assert predict([*args, "--out", str(tmp_path / "whole")]) == 0
    out = tmp_path / "pred"
    _stop_at_shard(monkeypatch, 2)
    assert predict([*args, "--out", str(out)]) == 1
    monkeypatch.undo()
    capsys.readouterr()
    assert predict([*args, "--out", str(out)]) == 0
    assert _tree(out) == _tree(tmp_path / "whole")
    assert capsys.readouterr().out.strip().splitlines()[-1] == (
        f"wrote predictions for 5 tiles of test to {out} (2 of them in the stopped run's shards, "
        "kept); 1 of its 6 tiles were left out (skipped by the stopped run: 1; see the warnings "
        "above)")


def test_a_peer_lost_at_the_agreement_is_one_line_exit_1_and_a_rerun_resumes(
        trained_run: Path, small_dataset: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    """The other rank killed while this one wrote its share: the agreement after it (a gather)
    raised the backend's own text (NCCL's, several lines; gloo's) with exit code 2, as for bad
    input. Now dist.describe_failure's line and exit 1, the shards kept, and a rerun resumes."""
    out = tmp_path / "pred"
    real, calls = dist.gather_objects, []

    # (loading, agreed_loader, --out's shard names, the shares)
    def lost_at_the_fourth(obj: object) -> list[object]:
        calls.append(obj)
        if len(calls) == 4:
            raise torch.distributed.DistBackendError(
                "NCCL error in: ProcessGroupNCCL.cpp:2057, remote process exited or there was "
                "a network error, NCCL version 2.21.5\nncclRemoteError: A call failed\nLast "
                "error:\nsocketProgress: Connection closed by remote peer")
        return real(obj)

    monkeypatch.setattr(dist, "gather_objects", lost_at_the_fourth)
    args = _resume_args(trained_run, small_dataset, out, "--shard-size", "4")
    assert predict(args) == 1 and len(calls) == 4
    err = _lines(capsys.readouterr().err)
    assert err[-1].startswith("trainer.predict: error: rank 0: a peer rank left the process "
                              "group (killed, out of memory, or its node lost) or the collective "
                              "failed: DistBackendError: NCCL error in: "), err
    assert err[-1].endswith(f"the shards written so far are kept in {out / '.partial'}: rerun "
                            "the same command to resume (--fresh to start over)"), err[-1]
    assert not [line for line in err if "ncclRemoteError" in line or "Last error" in line]
    monkeypatch.undo()
    assert predict(args) == 0
    said, err2 = capsys.readouterr()
    assert (f"trainer.predict: resuming the stopped prediction in {out / '.partial'} (--fresh "
            "to start over)") in _lines(err2)
    assert "in the stopped run's shards, kept" in said, said


@pytest.mark.parametrize(("failure", "at", "code"), [
    (RuntimeError("simulated: a bug in rank 1's prediction"), 4, 1),
    (OSError(errno.ENOSPC, "No space left on device"), 4, 1),
    (TypeError("simulated: a bug with a traceback on rank 1"), 4, 1),
    (ValueError("simulated: a tile rank 1 refuses"), 4, 2),
    (OSError(errno.EACCES, "Permission denied", "best.pt"), 1, 2),
], ids=["runtime-bug", "full-disk", "type-bug", "refusal", "unreadable-input"])
def test_another_ranks_failure_exits_with_that_ranks_code(
        trained_run: Path, small_dataset: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str], failure: Exception, at: int, code: int) -> None:
    """An agreement relays rank 1's failure (a RankError with its kinds): this rank exits as
    rank 1 does, 1 for a failure of the run (a bug, a full disk while writing the shares), 2
    for bad input (a refusal; an OSError while loading the checkpoint, before the stage). It
    exited 2 for all. (Under torchrun its SIGTERM mostly ends this rank before torchrun's
    summary shows its code: the torchrun test sees the failing rank's.)"""
    out = tmp_path / "pred"
    real, calls = dist.gather_objects, []

    # (calls: loading, the loader, --out's shard names, the shares)
    def rank_1_failed(obj: object) -> list[object]:
        calls.append(obj)
        got = real(obj)
        return [*got, dist._said(failure)] if len(calls) == at else got

    monkeypatch.setattr(dist, "gather_objects", rank_1_failed)
    args = _resume_args(trained_run, small_dataset, out, "--shard-size", "4")
    assert predict(args) == code and len(calls) == at
    what = "writing predictions" if at == 4 else f"loading {trained_run}/checkpoints/best.pt"
    err = _lines(capsys.readouterr().err)
    assert err[-1].startswith(f"trainer.predict: error: rank 1 stopped while {what}: "
                              f"{type(failure).__name__}: {failure}"), err[-1]


def test_the_default_checkpoint_is_the_runs_best_when_best_pt_was_not_yet_re_pointed(
        trained_run: Path, small_dataset: Path, tmp_path: Path) -> None:
    """A run killed between committing a new best checkpoint (its ``best_step``) and pointing
    best.pt at it: predict took the older best.pt, where train.init_from and trainer.export take
    the run's best (``checkpoint.source_checkpoint``)."""
    import shutil

    from trainer import checkpoint as ckpt

    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    old = ckpt.list_checkpoints(run)[-1]
    state = ckpt.load(old)
    state["model"] = {k: v + 0.5 if v.is_floating_point() else v
                      for k, v in state["model"].items()}
    step = state["global_step"] + 1
    state["global_step"] = state["best_step"] = step
    new = ckpt.checkpoint_path(run, step)
    ckpt.save(state, new)  # (killed here: best.pt still the older one)
    assert ckpt.load(run / "checkpoints" / ckpt.BEST)["global_step"] < step
    args = ["--run-dir", str(run), "--data", str(small_dataset), "--split", "test"]
    assert predict([*args, "--out", str(tmp_path / "default")]) == 0
    prov = json.loads((tmp_path / "default" / PROVENANCE).read_text())
    assert Path(prov["checkpoint"]) == new.resolve()
    assert predict([*args, "--out", str(tmp_path / "named"), "--checkpoint", str(new)]) == 0
    default, named = _read(tmp_path / "default"), _read(tmp_path / "named")
    assert default.keys() == named.keys()
    assert all(np.array_equal(default[k][0], named[k][0]) for k in default)
