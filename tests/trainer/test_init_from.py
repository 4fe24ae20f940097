"""train.init_from: a fresh run starts from another run's weights (and nothing else of it)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest
import torch
from trainer_helpers import messages

from dataio.manifest import load_manifest
from trainer import checkpoint as ckpt
from trainer.config import load_config
from trainer.dist import DistEnv
from trainer.optim import lr_factor
from trainer.trainer import Trainer

FAST = ["train.val_every=0", "data.num_threads=1"]


def _trainer(data: Path, run: Path, overrides: list[str]) -> Trainer:
    cfg = load_config(Path("configs/tiny.toml"), FAST + overrides)
    return Trainer(cfg, DistEnv(), data, run, device=torch.device("cpu"))


@pytest.fixture(scope="module")
def source(small_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run of one epoch (5 steps) through a warm-up of 4 steps: what is fine-tuned from."""
    run = tmp_path_factory.mktemp("source") / "vegas"
    _trainer(small_dataset, run, ["train.epochs=1", "optim.warmup_steps=4"]).train()
    return run


@pytest.fixture(scope="module")
def other_dataset(small_aoi: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Another dataset (its splits and percentiles differ): a resume would refuse it."""
    from dataio.prepare import PrepareConfig, prepare

    out = tmp_path_factory.mktemp("other") / "DATA"
    prepare(PrepareConfig(raw=[small_aoi], out=out, shard_size=4, seed=1), progress=False)
    return out


def _first_step(t: Trainer) -> dict[str, Any]:
    """Train ``t``, noting what it holds when its first step starts."""
    seen: dict[str, Any] = {}
    real = t.train_step

    def step(batch: Any) -> float | None:
        if not seen:
            seen.update(weights={k: v.clone() for k, v in t.net.state_dict().items()},
                        global_step=t.global_step, epoch=t.epoch, best=t.best_f1,
                        lr=t.optimizer.param_groups[0]["lr"], opt_state=dict(t.optimizer.state))
        return real(batch)

    t.train_step = step  # type: ignore[method-assign]
    t.train()
    return seen


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_fresh_run_starts_from_the_weights_only(
        source: Path, other_dataset: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture,
        footprints_log: list[logging.LogRecord]) -> None:
    src = ckpt.list_checkpoints(source)[-1]
    t = _trainer(other_dataset, tmp_path / "paris",
                 ["train.epochs=1", "optim.warmup_steps=4", f"train.init_from={src}"])
    footprints_log.clear()
    with caplog.at_level(logging.INFO, logger="footprints"):
        seen = _first_step(t)
    assert _same(seen["weights"], ckpt.load(src)["model"])
    # a new run otherwise: step 0, the warm-up's first rate (the source's schedule was past it),
    # no optimizer moments, no best score
    assert (seen["global_step"], seen["epoch"], seen["best"]) == (0, 0, -float("inf"))
    assert seen["lr"] == pytest.approx(2e-3 * lr_factor(0, "constant", 4, 0.01, 5))
    assert seen["opt_state"] == {}
    logged = messages(footprints_log)
    assert f"initialised from {src.resolve()} (step 5 of {source.resolve()})" in logged
    state = ckpt.load(ckpt.list_checkpoints(tmp_path / "paris")[-1])
    assert state["init_from"] == {"path": str(src.resolve()), "global_step": 5}
    assert state["global_step"] == 5  # its own steps, from 0
    # its own dataset's normalisation (another split: other percentiles than the source's)
    p2, p98 = load_manifest(other_dataset).percentiles()
    assert state["percentiles"] == {"p2": p2, "p98": p98}
    assert state["percentiles"] != ckpt.load(src)["percentiles"]


def test_a_run_directory_means_its_best_checkpoint(source: Path, small_dataset: Path,
                                                   tmp_path: Path) -> None:
    t = _trainer(small_dataset, tmp_path / "run", ["train.epochs=1", f"train.init_from={source}"])
    seen = _first_step(t)
    best = source / "checkpoints" / "best.pt"
    assert _same(seen["weights"], ckpt.load(best)["model"])
    assert t.init_source == {"path": str(best.resolve()), "global_step": 5}


def test_a_run_directory_whose_best_pt_was_not_yet_re_pointed_means_its_best(
        source: Path, small_dataset: Path, tmp_path: Path) -> None:
    """A run killed between committing a new best checkpoint and pointing best.pt at it (a
    hard link, or a whole copy where links fail) names the new one as its best (best_step) and
    repairs best.pt when it resumes; a fine-tune from it before that took the older best."""
    import shutil

    run = tmp_path / "vegas"
    shutil.copytree(source, run)
    old = ckpt.list_checkpoints(run)[-1]
    state = ckpt.load(old)
    state["model"] = {k: v + 1 if v.is_floating_point() else v for k, v in state["model"].items()}
    state["global_step"] = state["best_step"] = 6
    new = ckpt.checkpoint_path(run, 6)
    ckpt.save(state, new)  # (killed here: best.pt still the step-5 one)
    assert ckpt.load(run / "checkpoints" / ckpt.BEST)["global_step"] == 5
    t = _trainer(small_dataset, tmp_path / "paris", ["train.epochs=1",
                                                     f"train.init_from={run}"])
    try:
        t.init_weights()
    finally:
        t.train_loader.close()
    assert _same(t.net.state_dict(), state["model"])
    assert t.init_source == {"path": str(new.resolve()), "global_step": 6}
    # a best.pt that is a copy, not a link, of the best is taken as it is
    ckpt.mark_best(new)
    (run / "checkpoints" / ckpt.BEST).unlink()
    shutil.copyfile(new, run / "checkpoints" / ckpt.BEST)
    assert ckpt.source_checkpoint(str(run)) == run / "checkpoints" / ckpt.BEST


def test_a_run_with_a_checkpoint_resumes_and_ignores_init_from(
        source: Path, small_dataset: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture,
        footprints_log: list[logging.LogRecord]) -> None:
    """(a worker that torchrun restarts reruns the command, init_from and all: reloading the
    source would throw its training away)"""
    run, overrides = tmp_path / "run", [f"train.init_from={source}"]
    _trainer(small_dataset, run, ["train.epochs=1", *overrides]).train()
    own = ckpt.list_checkpoints(run)[-1]
    footprints_log.clear()
    with caplog.at_level(logging.INFO, logger="footprints"):
        seen = _first_step(_trainer(small_dataset, run, ["train.epochs=2", *overrides]))
    assert _same(seen["weights"], ckpt.load(own)["model"])
    assert not _same(seen["weights"], ckpt.load(source / "checkpoints" / "best.pt")["model"])
    assert seen["global_step"] == 5 and seen["opt_state"]
    assert f"train.init_from={source} ignored: the run resumes from its own checkpoint" \
        in messages(footprints_log)
    assert "initialised from" not in messages(footprints_log)
    # the record of where its weights came from stays in its later checkpoints
    best = source / "checkpoints" / "best.pt"
    assert ckpt.load(ckpt.list_checkpoints(run)[-1])["init_from"] == {
        "path": str(best.resolve()), "global_step": 5}


def test_another_model_is_refused_before_the_process_group_naming_the_file(
        source: Path, small_dataset: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    import torch.distributed

    from trainer.train import main

    def group(*args: object, **kwargs: object) -> None:
        raise RuntimeError("the process group was started")

    monkeypatch.setattr(torch.distributed, "init_process_group", group)
    run = tmp_path / "run"
    argv = ["--config", "configs/tiny.toml", "--data", str(small_dataset), "--run-dir", str(run),
            "--set", f"train.init_from={source}", "--set", "model.width_divisor=4"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    best = source / "checkpoints" / "best.pt"
    assert err[0].startswith(f"trainer.train: error: train.init_from: {best}: its model does "
                             "not match this config's model.* settings and the 3 bands "
                             "(RGB-PanSharpen) of ")
    assert "the checkpoint was trained with model.width_divisor=8 (here 4)" in err[0]
    assert not run.exists()


def test_check_refuses_a_missing_or_damaged_source_unless_the_run_resumes(
        source: Path, small_dataset: Path, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    from trainer.train import main

    def check(init_from: Path, run: Path) -> tuple[int, list[str]]:
        code = main(["--check", "--config", "configs/tiny.toml", "--data", str(small_dataset),
                     "--run-dir", str(run), "--set", f"train.init_from={init_from}"])
        return code, capsys.readouterr().err.strip().splitlines()

    missing = tmp_path / "vegas" / "step-00000005.pt"
    assert check(missing, tmp_path / "run") == (2, [
        f"trainer.train: error: train.init_from={missing}: no such file or run directory"])
    damaged = tmp_path / "damaged.pt"
    damaged.write_bytes(b"not a checkpoint")
    code, err = check(damaged, tmp_path / "run")
    assert code == 2 and len(err) == 1
    assert err[0].startswith(f"trainer.train: error: train.init_from: {damaged}: not a "
                             "readable checkpoint")
    (tmp_path / "empty_run").mkdir()
    code, err = check(tmp_path / "empty_run", tmp_path / "run")
    assert code == 2 and f"{tmp_path / 'empty_run' / 'checkpoints' / 'best.pt'} not found" \
        in err[0]
    assert check(ckpt.list_checkpoints(source)[-1], tmp_path / "run") == (0, [])
    # a run with a checkpoint of its own resumes and ignores init_from: a source gone since
    # must not stop it
    assert check(missing, source) == (0, [])


def test_the_source_is_mapped_not_read_whole(source: Path, small_dataset: Path, tmp_path: Path,
                                             torch_loads: list[tuple[str, bool]]) -> None:
    """(every rank checks the source before the process group, all of a node's at once, and
    rank 0 loads it again: each read the whole file, the optimizer's moments too, twice the
    model's size with Adam, to use the model's shapes or weights alone. Mapped, only the tensors
    used are read: how much memory that saves is the kind of figure a benchmark measures; this
    asserts the mapping itself, for every read of the source)"""
    from trainer.train import main

    reads = torch_loads
    assert main(["--check", "--config", "configs/tiny.toml", "--data", str(small_dataset),
                 "--run-dir", str(tmp_path / "run"), "--set", f"train.init_from={source}"]) == 0
    checked = list(reads)
    t = _trainer(small_dataset, tmp_path / "run", [f"train.init_from={source}"])
    try:
        t.init_weights()
    finally:
        t.train_loader.close()
    loaded = reads[len(checked):]
    for what, got in (("the check", checked), ("the load", loaded)):
        of_source = [(f, m) for f, m in got if Path(f).is_relative_to(source)]
        assert of_source and all(m for _, m in of_source), (what, got)


@pytest.mark.multiproc
@pytest.mark.slow
@pytest.mark.timeout(240)
def test_every_rank_starts_from_the_weights_rank_0_read(source: Path, small_dataset: Path,
                                                         tmp_path: Path) -> None:
    """(each rank reading the file itself could start the ranks from two checkpoints: a best.pt
    that the source run, still training, re-marks between their reads; here rank 1's
    init_from names another file outright)"""
    import json

    from trainer_helpers import REPO, run, torchrun_cmd

    src = ckpt.list_checkpoints(source)[-1]
    state = ckpt.load(src)
    state["model"] = {k: v + 1 if v.is_floating_point() else v for k, v in state["model"].items()}
    later = tmp_path / "later.pt"
    ckpt.save(state, later)
    out = tmp_path / "out.json"
    res = run(torchrun_cmd(2, [str(REPO / "tests" / "trainer" / "init_from_worker.py"),
                               str(small_dataset), str(tmp_path / "run"), str(src), str(later),
                               str(out)]), timeout=180)
    assert res.returncode == 0, res.stderr[-3000:]
    got = json.loads(out.read_text())
    assert got["same_as_rank_0s_file"] == [True, True]
    assert got["source"] == {"path": str(src.resolve()), "global_step": 5}
