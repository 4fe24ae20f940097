"""The Trainer in one process: it learns, resumes bit-exactly, survives a crash mid-checkpoint."""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from proc_helpers import REPO, interrupt_when, kill_tree, torchrun_cmd, worker_env
from stop_at import train_until
from trainer_helpers import poison_every_other_gradient

from dataio.loader import IGNORE_INDEX
from trainer import checkpoint as ckpt
from trainer.config import load_config
from trainer.dist import DistEnv
from trainer.optim import lr_factor
from trainer.trainer import NonFiniteError, Trainer

FAST = ["train.val_every=0", "data.num_threads=1"]


def _trainer(data: Path, run: Path, overrides: list[str]) -> Trainer:
    cfg = load_config(Path("configs/tiny.toml"), FAST + overrides)
    return Trainer(cfg, DistEnv(), data, run, device=torch.device("cpu"))


def _weights(run: Path) -> dict[str, torch.Tensor]:
    return ckpt.load(ckpt.list_checkpoints(run)[-1])["model"]


def test_training_lowers_the_loss_and_logs_every_epoch(small_dataset: Path,
                                                       tmp_path: Path) -> None:
    t = _trainer(small_dataset, tmp_path / "run", ["train.epochs=6", "train.val_every=3"])
    t.train()
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log] == [1, 2, 3, 4, 5, 6]
    assert log[-1]["train_loss"] < 0.8 * log[0]["train_loss"]
    assert "val_f1" in log[2] and "val_iou" in log[5] and "val_f1" not in log[3]
    # each class's pixel IoU and their mean beside val_iou, the building class's
    ious = [log[2][f"val_iou_{c}"] for c in ("background", "building", "boundary")]
    assert log[2]["val_iou"] == ious[1] and log[2]["val_miou"] == pytest.approx(sum(ious) / 3)
    assert "val_miou" in log[5] and "val_miou" not in log[3]
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved["train"]["epochs"] == 6
    assert (tmp_path / "run" / "checkpoints" / "best.pt").exists()


def test_the_precision_that_ran_is_recorded_beside_config_json_s_auto(small_dataset: Path,
                                                                      tmp_path: Path) -> None:
    """config.json keeps train.amp = "auto" as written (a GPU run's must load on a CPU for
    predict); what it resolved to was only in the console log, gone after the run."""
    from trainer.amp import resolve
    from trainer.config import load_run_config

    run = tmp_path / "run"
    _trainer(small_dataset, run, ["train.epochs=1"]).train()
    ran = {"amp": resolve("auto", torch.device("cpu")).name, "device": "cpu",
           "dist_backend": None}  # (one process: no group; gloo under torchrun, see
    # test_a_mid_epoch_resume_logs_the_whole_epoch_of_every_rank)
    record = json.loads((run / "log.jsonl").read_text().splitlines()[0])
    assert {k: record[k] for k in ran} == ran
    assert ckpt.load(ckpt.list_checkpoints(run)[-1])["runtime"] == ran
    assert load_run_config(run).train.amp == "auto"


def test_resume_mid_epoch_is_bit_exact(small_dataset: Path, tmp_path: Path) -> None:
    common = ["train.epochs=3", "train.checkpoint_every_steps=2"]
    _trainer(small_dataset, tmp_path / "ref", common).train()
    # stop right after the checkpoint at global step 8: step 3 of the second 5-step epoch
    train_until(_trainer(small_dataset, tmp_path / "cut", common), 8)
    resumed = _trainer(small_dataset, tmp_path / "cut", common)
    assert resumed.resume() and (resumed.epoch, resumed.step_in_epoch) == (1, 3)
    resumed = _trainer(small_dataset, tmp_path / "cut", common)
    resumed.train()
    ref, got = _weights(tmp_path / "ref"), _weights(tmp_path / "cut")
    assert all(torch.equal(ref[k], got[k]) for k in ref)
    # the cut epoch's log line covers the whole epoch, not only the steps after the restart
    ref_log, cut_log = (
        [json.loads(line) for line in (tmp_path / run / "log.jsonl").read_text().splitlines()]
        for run in ("ref", "cut"))
    assert [(r["epoch"], r["samples"], r["train_loss"]) for r in cut_log] == \
        [(r["epoch"], r["samples"], r["train_loss"]) for r in ref_log]


def test_resume_with_another_batch_size_and_more_epochs_keeps_the_schedule(
        small_dataset: Path, tmp_path: Path) -> None:
    # 17 training tiles: 5 steps an epoch at batch 4, 9 at batch 2 (as a resize to more ranks
    # or fewer would change it). Stop at step 2 of epoch 2, resume at batch 2 with 3 epochs.
    cosine = ["optim.schedule=\"cosine\"", "train.checkpoint_every_steps=1"]
    train_until(_trainer(small_dataset, tmp_path / "run", [*cosine, "train.epochs=2"]), 7)
    t = _trainer(small_dataset, tmp_path / "run",
                 [*cosine, "train.epochs=3", "data.batch_size=2"])
    assert t.steps_per_epoch == 9 and t.resume()
    # 8 of 17 samples done; the other 9 take 5 steps of 2, so this epoch is at step 4 of 9
    assert (t.epoch, t.step_in_epoch) == (1, 4)
    # 7 of 10 planned steps (70%) -> 13 of 27: the schedule is neither cut short nor restarted
    assert t.scheduler.last_epoch == 13
    t = _trainer(small_dataset, tmp_path / "run",
                 [*cosine, "train.epochs=3", "data.batch_size=2"])
    t.train()
    assert t.global_step == 7 + 5 + 9
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    lr, floor = t.cfg.optim.lr, t.cfg.optim.min_lr_ratio
    assert [r["epoch"] for r in log] == [1, 2, 3]
    # after epoch 2, 18 of 27 steps: on the cosine, above its floor (the saved 10-step plan
    # had reached the floor by then)
    assert log[1]["lr"] == pytest.approx(lr * lr_factor(18, "cosine", 0, floor, 27))
    assert log[1]["lr"] > 2 * lr * floor
    assert log[2]["lr"] == pytest.approx(lr * floor)


def test_crash_while_writing_a_checkpoint_resumes_from_the_previous(
        small_dataset: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    common = ["train.epochs=2"]
    _trainer(small_dataset, tmp_path / "ref", common).train()
    real = torch.save
    calls = {"n": 0}

    def dying_save(obj: object, f: object) -> None:
        calls["n"] += 1
        if calls["n"] == 2:  # the end-of-epoch-2 checkpoint: half written, then the crash
            f.write(b"PK\x03\x04 torn")  # type: ignore[attr-defined]
            raise KeyboardInterrupt
        real(obj, f)

    monkeypatch.setattr(torch, "save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        _trainer(small_dataset, tmp_path / "run", common).train()
    monkeypatch.setattr(torch, "save", real)
    names = [p.name for p in ckpt.list_checkpoints(tmp_path / "run")]
    assert names == ["step-00000005.pt"]  # the previous one, complete and loadable
    assert ckpt.load_latest(tmp_path / "run") is not None
    t = _trainer(small_dataset, tmp_path / "run", common)
    t.train()
    ref, got = _weights(tmp_path / "ref"), _weights(tmp_path / "run")
    assert all(torch.equal(ref[k], got[k]) for k in ref)


def test_too_many_nonfinite_steps_stop_the_run(small_dataset: Path, tmp_path: Path) -> None:
    t = _trainer(small_dataset, tmp_path / "run", ["train.max_nonfinite_steps=3"])
    real = t.loss_fn
    t.loss_fn = lambda logits, mask: real(logits, mask) * float("nan")  # type: ignore[assignment]
    before = {k: v.detach().clone() for k, v in t.net.named_parameters()}
    with pytest.raises(NonFiniteError, match="3 consecutive steps"):
        t.train()
    assert t.global_step == 2 and t.nonfinite_run == 3  # the third skip stopped the run
    assert all(torch.equal(before[k], v) for k, v in t.net.named_parameters())
    assert ckpt.list_checkpoints(tmp_path / "run") == []


def test_a_trainer_refused_after_its_train_loader_closes_it(
        small_dataset: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The val split refused while the Trainer is built (its agreed loader, after the train
    loader's): the train loader's DALI pipeline was left open, and its threads aborted the
    process at exit (-6, seen under torchrun in place of the refusal's exit code 2)."""
    from dataio.loader import Loader
    from dataio.sharding import DataError
    from trainer import trainer as trainer_mod

    closed: list[Loader] = []
    real_close = Loader.close
    monkeypatch.setattr(Loader, "close", lambda self: (closed.append(self), real_close(self)))

    def refused(*args: object, **kwargs: object) -> None:
        raise DataError("val: no usable sample")

    monkeypatch.setattr(trainer_mod, "Validator", refused)
    with pytest.raises(DataError, match="no usable sample"):
        _trainer(small_dataset, tmp_path / "run", [])
    assert len(closed) == 1


def test_bf16_autocast_trains_on_cpu(small_dataset: Path, tmp_path: Path) -> None:
    t = _trainer(small_dataset, tmp_path / "run", ["train.amp=bf16", "train.epochs=1"])
    assert t.precision.name == "bf16"
    dtypes: set[torch.dtype] = set()
    t.net.head.register_forward_hook(lambda _m, _i, out: dtypes.add(out.dtype))
    before = {k: v.detach().clone() for k, v in t.net.named_parameters()}
    summary = t.train()
    assert torch.isfinite(torch.tensor(summary["train_loss"]))
    assert torch.bfloat16 in dtypes  # the forward really ran under bf16 autocast
    assert any(not torch.equal(before[k], v) for k, v in t.net.named_parameters())


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["dali", "torch"])
def test_fp16_on_cuda_resumes_mid_epoch_with_its_grad_scaler(small_dataset: Path, tmp_path: Path,
                                                            backend: str) -> None:
    """The GPU path of a killed run: fp16 with a GradScaler, batches on the GPU (DALI's GPU
    pipeline or the torch backend). Stopped right after its mid-epoch checkpoint, the run
    resumes from the checkpoint's scaler state and loader position, and finishes."""
    overrides = FAST + ["train.epochs=3", "train.checkpoint_every_steps=2", "train.amp=fp16",
                        f"data.backend={backend}"]

    def make() -> Trainer:
        cfg = load_config(Path("configs/tiny.toml"), overrides)
        return Trainer(cfg, DistEnv(), small_dataset, tmp_path / "run",
                       device=torch.device("cuda", 0))

    cut = make()
    assert cut.precision.name == "fp16" and cut.scaler is not None
    train_until(cut, 8)
    saved = ckpt.load(ckpt.list_checkpoints(tmp_path / "run")[-1])["scaler"]
    # after 8 steps the scaler has counted good steps or backed off: not a fresh one's state,
    # so a resume that dropped it would show
    assert saved == cut.scaler.state_dict() != torch.amp.GradScaler("cuda").state_dict()
    resumed = make()
    assert resumed.resume() and (resumed.epoch, resumed.step_in_epoch) == (1, 3)
    assert resumed.scaler.state_dict() == saved
    make().train()
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log] == [1, 2, 3]
    assert len({r["samples"] for r in log}) == 1  # the cut epoch counted whole, once
    assert all(math.isfinite(r["train_loss"]) for r in log)
    assert all(torch.isfinite(v).all() for v in _weights(tmp_path / "run").values())


def test_resuming_with_another_model_names_the_checkpoint(small_dataset: Path,
                                                         tmp_path: Path) -> None:
    _trainer(small_dataset, tmp_path / "run", ["train.epochs=1"]).train()
    other = _trainer(small_dataset, tmp_path / "run", ["train.epochs=2", "model.width_divisor=4"])
    with pytest.raises(ValueError, match=r"step-\d+\.pt: its model does not match"):
        other.resume()


def test_resuming_with_another_optimizer_is_refused_naming_both(small_dataset: Path,
                                                               tmp_path: Path) -> None:
    """Adam's saved state loaded into SGD without a word and the first step died with
    KeyError: 'momentum' (and adamw resumed as plain adam), after config.json said sgd."""
    _trainer(small_dataset, tmp_path / "run", ["train.epochs=1"]).train()
    other = _trainer(small_dataset, tmp_path / "run", ["train.epochs=2", "optim.name=sgd"])
    with pytest.raises(ValueError, match=r"step-\d+\.pt: it was trained with optim\.name='adam'"
                                         r", this config has 'sgd'"):
        other.train()
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved["optim"]["name"] == "adam"  # the run's config stays what its checkpoints are


def test_resuming_with_another_lr_trains_at_it(small_dataset: Path, tmp_path: Path) -> None:
    """The saved optimizer groups kept the old run's lr and weight decay: resumed with
    optim.lr=1e-4, the run trained on at 2e-3 while config.json said 1e-4."""
    _trainer(small_dataset, tmp_path / "run", ["train.epochs=1"]).train()
    t = _trainer(small_dataset, tmp_path / "run",
                 ["train.epochs=2", "optim.lr=1e-4", "optim.weight_decay=0.01"])
    t.train()
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert log[0]["lr"] == pytest.approx(2e-3) and log[1]["lr"] == pytest.approx(1e-4)
    assert t.optimizer.param_groups[0]["weight_decay"] == 0.01


def test_rerunning_a_finished_run_says_there_is_nothing_to_do(
        small_dataset: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A rerun of a finished command (or one that forgot --set train.epochs=N to train on) said
    'resumed ...', 'training ...' and exited 0 without a word that no step was taken."""
    # (a trainer test run before this one may have set the logger up: INFO level, no
    # propagation to the root, where caplog listens)
    monkeypatch.setattr(logging.getLogger("footprints"), "propagate", True)
    _trainer(small_dataset, tmp_path / "run", ["train.epochs=1"]).train()
    caplog.clear()  # the first run's lines
    with caplog.at_level(logging.INFO, logger="footprints"):
        _trainer(small_dataset, tmp_path / "run", ["train.epochs=1"]).train()
    assert "already trained 1 epochs (train.epochs=1); nothing to do (raise train.epochs to " \
        "train on)" in caplog.text
    assert "training unet_baseline" not in caplog.text


def test_a_warm_up_as_long_as_the_run_is_named(small_dataset: Path, tmp_path: Path,
                                              caplog: pytest.LogCaptureFixture,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """A GPU preset's 500 warm-up steps on a short run trained at a fraction of optim.lr, the
    cosine never began, and nothing said so."""
    monkeypatch.setattr(logging.getLogger("footprints"), "propagate", True)  # (as above)
    t = _trainer(small_dataset, tmp_path / "run", ["train.epochs=1", "optim.warmup_steps=500",
                                                   "optim.schedule=cosine"])
    monkeypatch.setattr(t, "train_epoch", lambda: {})  # the message is what is tested
    monkeypatch.setattr(t, "end_epoch", lambda summary: None)
    with caplog.at_level(logging.WARNING, logger="footprints"):
        t.train()
    assert (f"optim.warmup_steps=500 fills the whole run (train.epochs=1 x {t.steps_per_epoch} "
            "steps/epoch") in caplog.text
    assert "the cosine decay never starts; lower optim.warmup_steps" in caplog.text
    caplog.clear()
    t = _trainer(small_dataset, tmp_path / "run2", ["train.epochs=1", "optim.warmup_steps=2"])
    monkeypatch.setattr(t, "train_epoch", lambda: {})
    monkeypatch.setattr(t, "end_epoch", lambda summary: None)
    with caplog.at_level(logging.WARNING, logger="footprints"):
        t.train()
    assert "warmup_steps" not in caplog.text


def test_without_a_val_split_the_newest_checkpoint_is_best(tmp_path: Path) -> None:
    """prepare allows --split 85,0,15; validation is then off, so predict's default best.pt
    must still exist (it did only with val_every=0, and predict said "train first")."""
    from dataio.prepare import PrepareConfig, prepare
    from dataio.synth import SynthConfig, write_aoi

    write_aoi(SynthConfig(out=tmp_path / "raw", tiles=6, seed=3, size=64))
    data = tmp_path / "DATA"
    prepare(PrepareConfig(raw=[tmp_path / "raw"], out=data, split=(85, 0, 15), shard_size=4),
            progress=False)
    cfg = load_config(Path("configs/tiny.toml"), ["data.num_threads=1", "train.epochs=1",
                                                  "train.val_every=1", "data.crop_size=64"])
    Trainer(cfg, DistEnv(), data, tmp_path / "run", device=torch.device("cpu")).train()
    best = ckpt.load(tmp_path / "run" / "checkpoints" / "best.pt")
    newest = ckpt.load(ckpt.list_checkpoints(tmp_path / "run")[-1])
    assert best["global_step"] == newest["global_step"] > 0


@pytest.mark.parametrize(("env", "named"), [({"WORLD_SIZE": "two"}, "WORLD_SIZE='two'"),
                                            ({"RANK": "3", "WORLD_SIZE": "2"}, "RANK=3")])
def test_bad_torchrun_variables_are_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                             capsys: pytest.CaptureFixture[str],
                                             env: dict[str, str], named: str) -> None:
    """(a traceback from train and predict; tune and the postprocessors said it in one line)"""
    from trainer.predict import main as predict
    from trainer.train import main as train

    for k, v in env.items():
        monkeypatch.setenv(k, v)
    assert train(["--config", "configs/tiny.toml", "--data", str(tmp_path),
                  "--run-dir", str(tmp_path / "run")]) == 2
    assert predict(["--run-dir", str(tmp_path), "--data", str(tmp_path),
                    "--out", str(tmp_path / "p")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and all(named in line for line in err)
    assert err[0].startswith("trainer.train: error:")
    assert err[1].startswith("trainer.predict: error:")


def test_ctrl_c_is_one_line_that_says_how_to_resume(small_dataset: Path, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    """Ctrl-C ended training in a 40-line KeyboardInterrupt traceback (often deep in torch.save,
    as if the checkpoint were lost); the postproc commands already said 'interrupted', 130."""
    from trainer.train import main

    def interrupted(self: Trainer) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(Trainer, "train", interrupted)
    run, handler = tmp_path / "run", signal.getsignal(signal.SIGINT)
    try:
        assert main(["--config", "configs/tiny.toml", "--data", str(small_dataset),
                     "--run-dir", str(run)]) == 130
        # a further Ctrl-C while the interpreter exits (up to a second with torch loaded) would
        # add a traceback after the line, or end the process by SIGINT instead of with 130
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, handler)
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"trainer.train: interrupted; rerun the same command to resume from the "
                   f"newest complete checkpoint in {run / 'checkpoints'}"]


def test_sigterm_stops_training_as_ctrl_c_does_with_exit_code_143(
        small_dataset: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    """A real SIGTERM at the third step (torchrun's to the survivors of a failed worker, Slurm's
    at the job's end): the process vanished without a line. Now it takes Ctrl-C's path: the
    complete checkpoints kept, one line saying how to resume, exit code 143 (128 + SIGTERM), and
    both signals set aside for the rest of the exit."""
    from trainer.train import main

    real_step = Trainer.train_step

    def terminated_at_step_2(self: Trainer, batch: object) -> float | None:
        if self.global_step == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return real_step(self, batch)  # type: ignore[arg-type]

    monkeypatch.setattr(Trainer, "train_step", terminated_at_step_2)
    run = tmp_path / "run"
    found = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        assert main(["--config", "configs/tiny.toml", "--data", str(small_dataset),
                     "--run-dir", str(run), "--set", "train.val_every=0",
                     "--set", "train.checkpoint_every_steps=1"]) == 143
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_IGN
    finally:
        for s, handler in found.items():
            signal.signal(s, handler)
    lines = capsys.readouterr().err.replace("\r", "\n").splitlines()
    assert [line for line in lines if "trainer.train:" in line] == [
        f"trainer.train: terminated (SIGTERM); rerun the same command to resume from the newest "
        f"complete checkpoint in {run / 'checkpoints'}"]
    kept = ckpt.list_checkpoints(run)
    assert [p.name for p in kept] == ["step-00000001.pt", "step-00000002.pt"]
    assert [p.name for p in ckpt.checkpoint_dir(run).iterdir() if p.name.startswith(".")] == []


@pytest.mark.slow  # the real command under torchrun
@pytest.mark.multiproc
@pytest.mark.timeout(120)
def test_sigterm_to_torchrun_stops_every_rank_with_its_line(small_dataset: Path,
                                                             tmp_path: Path) -> None:
    """torchrun forwards a SIGTERM (Slurm's scancel, a time limit) to its workers, as it sends
    one to the survivors of a failed worker: each rank said nothing and vanished. Now each says
    how to resume, and the checkpoint directory holds complete checkpoints only."""
    run = tmp_path / "run"
    worker = str(Path(__file__).with_name("ctrl_c_worker.py"))  # says 'stepped'
    res = interrupt_when(torchrun_cmd(2, [
        worker, "--config", "configs/tiny.toml", "--data", str(small_dataset), "--run-dir",
        str(run), "--set", "train.epochs=100", "--set", "train.val_every=0", "--set",
        "train.checkpoint_every_steps=1"]), "stepped", times=2, sig=signal.SIGTERM)
    lines = res.stderr.replace("\r", "\n").splitlines()
    assert [line for line in lines if "trainer.train:" in line] == [
        f"trainer.train: terminated (SIGTERM); rerun the same command to resume from the newest "
        f"complete checkpoint in {run / 'checkpoints'}"] * 2, res.stderr[-3000:]
    # (torchrun's own SignalException traceback, exit code 1: the only traceback)
    assert res.returncode == 1 and res.stderr.count("Traceback") == 1, res.stderr[-3000:]
    assert "Exception ignored" not in res.stderr, res.stderr[-3000:]
    if ckpt.checkpoint_dir(run).is_dir():
        assert all(not p.name.startswith(".") for p in ckpt.checkpoint_dir(run).iterdir())
        for path in ckpt.list_checkpoints(run):
            ckpt.load(path)


def test_ctrl_c_clears_the_progress_bar_before_its_line(small_dataset: Path, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    """The epoch's progress bar stayed open on the terminal's line, and the line that says how to
    resume was printed onto its end ('epoch 1/2:  40%|...| 2/5 [...]trainer.train: inter...')."""
    from trainer.train import main

    real_step = Trainer.train_step

    def interrupted_at_step_2(self: Trainer, batch: object) -> float | None:
        if self.global_step == 2:
            raise KeyboardInterrupt
        return real_step(self, batch)  # type: ignore[arg-type]

    monkeypatch.setattr(Trainer, "train_step", interrupted_at_step_2)
    run, handler = tmp_path / "run", signal.getsignal(signal.SIGINT)
    try:
        assert main(["--config", "configs/tiny.toml", "--data", str(small_dataset),
                     "--run-dir", str(run), "--set", "train.val_every=0"]) == 130
    finally:
        signal.signal(signal.SIGINT, handler)
    lines = capsys.readouterr().err.replace("\r", "\n").splitlines()
    assert [line for line in lines if "interrupted" in line] == [
        f"trainer.train: interrupted; rerun the same command to resume from the newest complete "
        f"checkpoint in {run / 'checkpoints'}"]


@pytest.mark.slow  # the real command in a process of its own
@pytest.mark.timeout(120)
def test_a_second_ctrl_c_does_not_cut_the_clean_up_short(small_dataset: Path,
                                                         tmp_path: Path) -> None:
    """Ctrl-C pressed twice, the second while the first unwinds (here while the train loader
    closes its read-ahead thread and DALI pipeline): it cut that clean-up short, and elsewhere in
    it printed an 'Exception ignored in Pipeline.__del__' traceback, ended the process by SIGINT
    (exit -2), or, in a checkpoint write, aborted it ('terminate called', exit -6)."""
    run = tmp_path / "run"
    worker = Path(__file__).with_name("ctrl_c_worker.py")  # says when to press
    with open(tmp_path / "stderr", "w") as err:
        # start_new_session: a process group of its own, which the test signals as a terminal would
        proc = subprocess.Popen([sys.executable, str(worker), "--config", "configs/tiny.toml",
                                 "--data", str(small_dataset), "--run-dir", str(run),
                                 "--set", "train.epochs=100", "--set", "train.val_every=0"],
                                cwd=REPO, env=worker_env(), stdout=subprocess.PIPE, stderr=err,
                                text=True, start_new_session=True)
    said: list[str] = []
    try:
        for before in ("stepped", "closing"):  # the first press while it trains, then the second
            while before not in said:
                line = proc.stdout.readline()
                assert line, f"the command ended before saying {before!r}: {said}"
                said.append(line.strip())
            os.killpg(proc.pid, signal.SIGINT)
        rc = proc.wait(timeout=60)
        said += proc.stdout.read().split()
    finally:
        if proc.poll() is None:
            kill_tree(proc.pid)
            proc.wait(timeout=30)
    text = (tmp_path / "stderr").read_text()
    assert (rc, said[-1]) == (130, "closed"), (said, text[-3000:])
    assert "Traceback" not in text and "Exception ignored" not in text, text[-3000:]
    assert text.count("trainer.train: interrupted;") == 1


def test_train_refuses_a_run_dir_it_cannot_create(small_dataset: Path, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    from trainer.train import main

    blocker = tmp_path / "a_file"
    blocker.write_text("")
    argv = ["--config", "configs/tiny.toml", "--data", str(small_dataset), "--run-dir",
            str(blocker / "run")]
    assert main(argv) == 2
    assert f"--run-dir {blocker / 'run'}" in capsys.readouterr().err
    assert main([*argv[:-1], str(blocker)]) == 2  # the run directory itself is a file
    assert f"{blocker} is not a directory" in capsys.readouterr().err


def test_check_makes_the_checks_before_the_process_group_and_stops(
        small_dataset: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    """(what the launch scripts run once before torchrun; torchrun's variables are not set
    there, so a stray RANK in the launcher's shell is not read)"""
    import torch.distributed

    from trainer.train import main

    def group(*args: object, **kwargs: object) -> None:
        raise RuntimeError("the process group was started")

    monkeypatch.setattr(torch.distributed, "init_process_group", group)
    monkeypatch.setenv("RANK", "3")
    argv = ["--check", "--config", "configs/tiny.toml", "--data", str(small_dataset),
            "--run-dir", str(tmp_path / "run")]
    assert main(argv) == 0
    assert main([*argv, "--set", "train.no_such_key=1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("trainer.train: error:")
    assert "train.no_such_key" in err[0]
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(("text", "problem"), [('{"format_version": 1', "not valid UTF-8 JSON"),
                                               ("{}", "format_version None")])
def test_check_refuses_a_damaged_manifest(tmp_path: Path, text: str, problem: str,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    """(--check only looked for manifest.json: the launch scripts went on to torchrun, whose
    workers each failed on it, restarted MAX_RESTARTS times)"""
    from trainer.train import main

    data = tmp_path / "DATA"
    data.mkdir()
    (data / "manifest.json").write_text(text)
    assert main(["--check", "--config", "configs/tiny.toml", "--data", str(data),
                 "--run-dir", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(
        f"trainer.train: error: --data {data}: {data / 'manifest.json'}: {problem}")


@pytest.mark.parametrize("made", ["nothing", "directory", "file"])
def test_check_says_whether_data_is_missing_or_holds_no_manifest(
        tmp_path: Path, made: str, capsys: pytest.CaptureFixture[str]) -> None:
    """(a typo in --data read as "no manifest.json", which sent the user to run prepare; a
    file, ``--data DATA/manifest.json`` say, was then "no such directory")"""
    from trainer.train import main

    data = tmp_path / "DATA"
    if made == "directory":
        data.mkdir()
    elif made == "file":
        data.write_text("{}")
    assert main(["--check", "--config", "configs/tiny.toml", "--data", str(data),
                 "--run-dir", str(tmp_path / "run")]) == 2
    what = {"nothing": "no such directory", "directory": "no manifest.json",
            "file": "not a directory"}[made]
    assert capsys.readouterr().err.strip().splitlines() == [
        f"trainer.train: error: --data {data}: {what} (run dataio.prepare first)"]


def test_check_names_a_manifest_it_cannot_read(
        small_dataset: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    """(--check reads the manifest since a83ace1: an unreadable one, e.g. no read permission,
    was a PermissionError traceback out of load_manifest, and --check's exit 1, not 2)"""
    from trainer.train import main

    manifest = small_dataset / "manifest.json"
    read_text = Path.read_text

    def denied(self: Path, *a: object, **kw: object) -> str:
        if self == manifest:
            raise PermissionError(13, "Permission denied", str(self))
        return read_text(self, *a, **kw)

    monkeypatch.setattr(Path, "read_text", denied)
    assert main(["--check", "--config", "configs/tiny.toml", "--data", str(small_dataset),
                 "--run-dir", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"trainer.train: error: --data {small_dataset}: {manifest}: cannot read "
                   f"([Errno 13] Permission denied: '{manifest}')"]


def test_check_reads_the_val_truth_that_validation_f1_will_read(
        small_dataset: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """(--check did not read DATA/val/truth.csv: a corrupt one failed only at the first
    validation, in every worker, and torchrun restarted them on it)"""
    import shutil

    from trainer.train import main

    data = tmp_path / "DATA"
    shutil.copytree(small_dataset, data)
    truth = data / "val" / "truth.csv"
    truth.write_text("ImageId,BuildingId\nAOI_2_Vegas_img1,1\n")
    argv = ["--check", "--config", "configs/tiny.toml", "--data", str(data),
            "--run-dir", str(tmp_path / "run")]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(
        f"trainer.train: error: --data {data}: {truth}:1: header lacks PolygonWKT_Pix")
    # validation F1 off (or no validation): the truth is not read, so not checked
    assert main([*argv, "--set", "train.val_f1=false"]) == 0
    assert main([*argv, "--set", "train.val_every=0"]) == 0


@pytest.mark.parametrize("torchrun", [True, False])
def test_more_processes_than_gpus_is_refused_before_nccl(small_dataset: Path, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch,
                                                         capsys: pytest.CaptureFixture[str],
                                                         torchrun: bool) -> None:
    """(two torchrun workers on one GPU: NCCL's "Duplicate GPU detected", after the rendezvous;
    another launcher may give each process a GPU of its own, all seen as cuda:0)"""
    import torch.distributed

    from trainer import dist
    from trainer.train import main

    for k, v in {"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0",
                 "LOCAL_WORLD_SIZE": "2"}.items():
        monkeypatch.setenv(k, v)
    if torchrun:
        monkeypatch.setenv("TORCHELASTIC_RUN_ID", "test")
        monkeypatch.setattr(dist, "watch_agent", lambda env: None)  # no agent to watch
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: None)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.distributed, "is_nccl_available", lambda: True)

    def group(*args: object, **kwargs: object) -> None:
        raise RuntimeError("the process group was started")

    monkeypatch.setattr(torch.distributed, "init_process_group", group)
    # (refused: bad settings, exit 2 as from --check; the group's failure: 1)
    assert main(["--config", "configs/tiny.toml", "--data", str(small_dataset), "--run-dir",
                 str(tmp_path / "run")]) == (2 if torchrun else 1)
    err = capsys.readouterr().err
    refused = "2 processes on this node but 1 CUDA device(s) visible" in err
    assert refused == torchrun and ("--nproc_per_node" in err) == torchrun
    assert ("the process group was started" in err) != torchrun


def test_check_names_a_val_split_the_manifest_lacks(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """(--check reads the val split's sample count for the truth check: a dataset without a val
    split, which the manifest's schema allows, was a KeyError traceback, not one line)"""
    from dataio.fixtures import aligned_tile, write_dataset
    from trainer.train import main

    data = write_dataset(tmp_path / "DATA", {"train": [
        (f"AOI_2_Vegas_img{i}", *aligned_tile(32, 32, i)) for i in range(2)]})
    assert main(["--check", "--config", "configs/tiny.toml", "--data", str(data),
                 "--run-dir", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"trainer.train: error: {data / 'manifest.json'}: no split 'val' (has train)"]


@pytest.mark.parametrize(("gpus", "nproc", "override", "refused"), [
    (4, 8, None, True), (4, 4, None, False), (0, 8, None, False),
    (4, 8, "dist.backend=gloo", False)])
def test_check_refuses_more_processes_than_gpus_as_the_workers_would(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
        gpus: int, nproc: int, override: str | None, refused: bool, small_dataset: Path) -> None:
    """``--check --nproc`` (the launch scripts' NPROC) makes dist.init's refusal once, by the same
    rule: under NCCL only (gloo, on the CPU or chosen, may share). Only the workers refused, and
    torchrun restarted the group on it MAX_RESTARTS times."""
    import torch.distributed

    from trainer.train import main

    monkeypatch.setattr(torch.cuda, "is_available", lambda: gpus > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)
    monkeypatch.setattr(torch.distributed, "is_nccl_available", lambda: True)
    rc = main(["--check", "--nproc", str(nproc), "--config", "configs/tiny.toml", "--data",
               str(small_dataset), "--run-dir", str(tmp_path / "run"),
               *(["--set", override] if override else [])])
    err = capsys.readouterr().err.splitlines()
    if refused:
        assert rc == 2 and err == [
            f"trainer.train: error: {nproc} processes on this node but {gpus} CUDA device(s) "
            f"visible: NCCL needs one GPU per process; start at most {gpus} (NPROC={gpus}), or "
            "hide the GPUs (CUDA_VISIBLE_DEVICES=) to run on the CPU with gloo"]
    else:
        assert rc == 0 and err == []
    assert not (tmp_path / "run").exists()


def test_nproc_goes_with_check(capsys: pytest.CaptureFixture[str]) -> None:
    """(a worker under torchrun checks its LOCAL_WORLD_SIZE; --nproc there would be ignored)"""
    from trainer.train import main

    with pytest.raises(SystemExit) as e:
        main(["--nproc", "2", "--config", "c", "--data", "d", "--run-dir", "r"])
    assert e.value.code == 2 and "--nproc goes with --check" in capsys.readouterr().err


def test_a_compile_backend_this_machine_lacks_is_refused_before_anything_starts(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from trainer.train import main

    assert main(["--config", "configs/tiny.toml", "--data", str(tmp_path), "--run-dir",
                 str(tmp_path / "run"), "--set", "model.compile=true", "--set",
                 "model.compile_backend=indcutor"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(
        "trainer.train: error: model.compile_backend='indcutor' is not a torch.compile backend")
    assert not (tmp_path / "run").exists()

@pytest.mark.parametrize(("override", "named"), [
    ("train.amp=fp16", "train.amp=fp16 needs CUDA"),
    ("dist.backend=nccl", "dist.backend=nccl needs CUDA")])
def test_what_needs_a_gpu_is_refused_on_a_cpu_before_the_process_group(
        small_dataset: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str], override: str, named: str) -> None:
    """fp16 stopped every rank in the Trainer, after the process group and the model; nccl was
    refused as '2 processes on this node but 0 CUDA device(s) visible ... start at most 0'."""
    import torch.distributed

    from trainer import dist
    from trainer.train import main

    for k, v in {"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "2",
                 "TORCHELASTIC_RUN_ID": "test"}.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setattr(dist, "watch_agent", lambda env: None)  # no agent to watch
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)

    def group(*args: object, **kwargs: object) -> None:
        raise RuntimeError("the process group was started")

    monkeypatch.setattr(torch.distributed, "init_process_group", group)
    assert main(["--config", "configs/tiny.toml", "--data", str(small_dataset), "--run-dir",
                 str(tmp_path / "run"), "--set", override]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"trainer.train: error: {named}")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("rank", [0, 1])
def test_a_setting_that_has_no_effect_is_warned_about_once_on_rank_0(
        small_dataset: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        footprints_log: list[logging.LogRecord], rank: int) -> None:
    """optim.momentum with Adam (or min_lr_ratio with a constant schedule, ...) was silently
    ignored; tiny.toml's own keys and the dataclass defaults stay quiet."""
    import torch.distributed

    from trainer import dist
    from trainer.train import main

    for k, v in {"WORLD_SIZE": "2", "RANK": str(rank), "LOCAL_RANK": str(rank),
                 "LOCAL_WORLD_SIZE": "2"}.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(dist, "setup_logging", lambda env: None)  # (once per process)

    def group(*args: object, **kwargs: object) -> None:
        raise RuntimeError("the process group was started")

    monkeypatch.setattr(torch.distributed, "init_process_group", group)
    # (the process group fails first: no training)
    assert main(["--config", "configs/tiny.toml", "--data", str(small_dataset),
                 "--run-dir", str(tmp_path / "run"), "--set", "optim.momentum=0.5"]) == 1
    warned = [r.getMessage() for r in footprints_log if r.levelno == logging.WARNING]
    assert warned == (['optim.momentum = 0.5 has no effect: optim.name = "adam" takes none '
                       "(SGD only)"] if rank == 0 else [])


def test_validation_runs_every_val_every_epochs_and_after_the_last(small_dataset: Path,
                                                                    tmp_path: Path) -> None:
    t = _trainer(small_dataset, tmp_path / "run", ["train.epochs=3", "train.val_every=2"])
    validated: list[int] = []
    t.validator.run = lambda _net: validated.append(t.epoch) or {"val_f1": 0.5}  # type: ignore
    t.train()
    assert validated == [2, 3]  # the last epoch too, though 3 is no multiple of 2


def test_without_f1_the_best_checkpoint_is_the_first_with_the_highest_iou(
        small_dataset: Path, tmp_path: Path) -> None:
    run, iou = tmp_path / "run", {1: 0.4, 2: 0.6, 3: 0.6}
    t = _trainer(small_dataset, run, ["train.epochs=3", "train.val_every=1",
                                      "train.val_f1=false"])
    t.validator.run = lambda _net: {"val_iou": iou[t.epoch]}  # type: ignore[method-assign]
    t.train()
    # epoch 2's (step 10): a tie in epoch 3 does not move best.pt to a checkpoint no better
    assert ckpt.load(run / "checkpoints" / ckpt.BEST)["global_step"] == 10
    assert t.best_f1 == 0.6


def test_the_logged_train_loss_is_the_mean_of_the_epochs_step_losses(small_dataset: Path,
                                                                     tmp_path: Path) -> None:
    t = _trainer(small_dataset, tmp_path / "run", ["train.epochs=2"])
    real, losses = t.train_step, {0: [], 1: []}

    def step(batch: object) -> float | None:
        losses[t.epoch].append(real(batch))  # type: ignore[arg-type]
        return losses[t.epoch][-1]

    t.train_step = step  # type: ignore[method-assign]
    t.train()
    for summary, epoch in zip(t.history, losses.values(), strict=True):
        assert len(epoch) == 5 and summary["samples"] == 17  # this epoch's only
        assert summary["train_loss"] == pytest.approx(sum(epoch) / len(epoch))


class _PaddedTail:
    """The loader, with a batch of padding only after each epoch's batches: what a rank gets at
    an epoch's end when the job has more ranks than samples left."""

    def __init__(self, loader: object) -> None:
        self.loader = loader

    def __getattr__(self, name: str) -> object:
        return getattr(self.loader, name)

    def __iter__(self):  # type: ignore[no-untyped-def]
        last = None
        for last in self.loader:  # type: ignore[attr-defined]
            yield last
        yield dataclasses.replace(last, keys=[""] * len(last.keys), meta=[{}] * len(last.keys),
                                  valid=torch.zeros_like(last.valid),
                                  mask=torch.full_like(last.mask, IGNORE_INDEX))


def test_a_batch_of_padding_only_leaves_the_logged_train_loss_alone(small_dataset: Path,
                                                                    tmp_path: Path) -> None:
    t = _trainer(small_dataset, tmp_path / "run", ["train.epochs=1"])
    t.train_loader = _PaddedTail(t.train_loader)  # type: ignore[assignment]
    real, losses, valid = t.train_step, [], []

    def step(batch: object) -> float | None:
        losses.append(real(batch))  # type: ignore[arg-type]
        valid.append(int(batch.valid.sum()))  # type: ignore[attr-defined]
        return losses[-1]

    t.train_step = step  # type: ignore[method-assign]
    t.train()
    assert valid[-1] == 0 and losses[-1] == 0.0 and len(losses) == 6  # the padded step ran
    assert t.history[0]["samples"] == 17
    assert t.history[0]["train_loss"] == pytest.approx(sum(losses[:-1]) / 5)


@pytest.mark.parametrize("scaled", [False, True])
def test_grad_clip_bounds_the_update(small_dataset: Path, tmp_path: Path, scaled: bool) -> None:
    # plain SGD (no momentum, decay or warm-up): the update is lr x the clipped gradient, so its
    # norm is lr x grad_clip
    t = _trainer(small_dataset, tmp_path / "run", ['optim.name="sgd"', "optim.momentum=0.0",
                                                   "optim.weight_decay=0.0",
                                                   "optim.warmup_steps=0", "optim.grad_clip=0.01"])
    if scaled:
        # fp16's GradScaler (on the CPU here): the clip must see the unscaled gradients, or the
        # update shrinks by the scale
        t.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
    t.train_loader.set_epoch(0)
    batch = next(iter(t.train_loader))
    t.train_loader.close()
    before = [p.detach().clone() for p in t.net.parameters()]
    assert t.train_step(batch) is not None
    update = torch.cat([(p.detach() - b).flatten() for p, b in zip(t.net.parameters(), before,
                                                                   strict=True)])
    assert float(update.norm()) == pytest.approx(t.cfg.optim.lr * 0.01, rel=1e-3)


def test_nonfinite_gradients_skip_the_step_and_a_good_step_resets_the_count(
        small_dataset: Path, tmp_path: Path) -> None:
    # a finite loss whose gradients are NaN on every other step: never 2 in a row, so the run
    # goes on, and the poisoned steps change no weight
    t = _trainer(small_dataset, tmp_path / "run", ["train.epochs=1",
                                                   "train.max_nonfinite_steps=2"])
    poison_every_other_gradient(t.net)
    t.train()
    assert t.global_step == 5 and t.nonfinite_run == 1  # the last step only
    assert all(bool(torch.isfinite(p).all()) for p in t.net.parameters())
    skipped = t.metrics.registry.get_sample_value("footprints_skipped_steps_total",
                                                  {"reason": "nonfinite_grad"})
    assert skipped == 3  # steps 1, 3 and 5
    # NaN gradients on every step: the second in a row stops the run, no weight changed
    t = _trainer(small_dataset, tmp_path / "run2", ["train.max_nonfinite_steps=2"])
    t.net.head.weight.register_hook(lambda grad: grad * float("nan"))
    before = {k: v.detach().clone() for k, v in t.net.named_parameters()}
    with pytest.raises(NonFiniteError, match=r"2 consecutive.*last: nonfinite_grad"):
        t.train()
    assert all(torch.equal(before[k], v) for k, v in t.net.named_parameters())


def test_each_epoch_reads_the_split_once_in_an_order_of_its_own(small_dataset: Path,
                                                                tmp_path: Path) -> None:
    t = _trainer(small_dataset, tmp_path / "run", ["train.epochs=2"])
    real, order = t.train_step, {0: [], 1: []}

    def step(batch: object) -> float | None:
        order[t.epoch] += [k for k in batch.keys if k]  # type: ignore[attr-defined]
        return real(batch)  # type: ignore[arg-type]

    t.train_step = step  # type: ignore[method-assign]
    t.train()
    assert len(order[0]) == 17 and sorted(order[0]) == sorted(order[1])
    assert order[0] != order[1]  # reshuffled: not the first epoch's batches again


def test_an_f1_of_zero_ranks_the_epoch_by_f1_not_by_iou(small_dataset: Path,
                                                         tmp_path: Path) -> None:
    """An F1 of 0 (no building found yet, as early in training) is a score, not a missing one:
    read as missing, the epoch was ranked by its IoU, and a later epoch with a better F1 but a
    lower IoU never became best.pt."""
    run, scores = tmp_path / "run", {1: {"val_f1": 0.0, "val_iou": 0.5},
                                     2: {"val_f1": 0.2, "val_iou": 0.4}}
    t = _trainer(small_dataset, run, ["train.epochs=2", "train.val_every=1"])
    t.validator.run = lambda _net: dict(scores[t.epoch])  # type: ignore[method-assign]
    t.train()
    assert ckpt.load(run / "checkpoints" / ckpt.BEST)["global_step"] == 10  # epoch 2's
    assert t.best_f1 == 0.2


def test_checkpoints_every_n_steps_and_once_at_each_epochs_end(
        small_dataset: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real, saved = ckpt.save, []

    def recording(state: dict, path: Path) -> float:
        saved.append((state["global_step"], state["epoch"], state["step_in_epoch"]))
        return real(state, path)

    monkeypatch.setattr(ckpt, "save", recording)
    _trainer(small_dataset, tmp_path / "run",
             ["train.epochs=2", "train.checkpoint_every_steps=2"]).train()
    # 5 steps an epoch: mid-epoch at global steps 2, 4, 6 and 8. Step 10 ends epoch 2 and is
    # written once, as that epoch's end (not first also as 'epoch 1, step 5 of 5')
    assert saved == [(2, 0, 2), (4, 0, 4), (5, 1, 0), (6, 1, 1), (8, 1, 3), (10, 2, 0)]


def test_a_cut_epoch_logs_its_seconds_before_the_cut_once(small_dataset: Path,
                                                          tmp_path: Path) -> None:
    """The epoch's seconds (and so its samples_per_s) cover the time before a mid-epoch resume,
    and the next epoch's do not count that time again."""
    common, pause = ["train.epochs=3", "train.checkpoint_every_steps=2"], 2.0
    cut = _trainer(small_dataset, tmp_path / "run", common)
    real = cut.train_step

    def slow(batch: object) -> float | None:
        if cut.global_step == 6:  # the second step of epoch 2, which is cut after step 8
            time.sleep(pause)
        return real(batch)  # type: ignore[arg-type]

    cut.train_step = slow  # type: ignore[method-assign]
    train_until(cut, 8)
    _trainer(small_dataset, tmp_path / "run", common).train()
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log] == [1, 2, 3]
    assert log[1]["seconds"] >= pause
    assert log[2]["seconds"] < pause  # (5 steps of a tiny net: a fraction of a second)


def test_a_run_whose_steps_draw_random_numbers_resumes_bit_exactly(small_dataset: Path,
                                                                   tmp_path: Path) -> None:
    """A step that draws from torch's global generator (dropout, a random op) continues the
    checkpoint's stream after a resume, not the one a fresh process starts."""
    def noisy(t: Trainer) -> Trainer:
        real = t.loss_fn
        t.loss_fn = lambda logits, mask: real(logits, mask) * (1 + torch.rand(()))  # type: ignore
        return t

    noisy(_trainer(small_dataset, tmp_path / "ref", ["train.epochs=2"])).train()
    train_until(noisy(_trainer(small_dataset, tmp_path / "cut", ["train.epochs=2"])), 5)
    noisy(_trainer(small_dataset, tmp_path / "cut", ["train.epochs=2"])).train()
    ref, got = _weights(tmp_path / "ref"), _weights(tmp_path / "cut")
    assert all(torch.equal(ref[k], got[k]) for k in ref)


def test_a_checkpoint_without_the_training_state_is_refused_naming_what_it_lacks(
        small_dataset: Path, tmp_path: Path) -> None:
    """(a weights-only checkpoint, all that predict needs, among the run's checkpoints)"""
    run = tmp_path / "run"
    t = _trainer(small_dataset, run, ["train.epochs=1"])
    ckpt.save({"format": ckpt.FORMAT, "model": t.net.state_dict()}, ckpt.checkpoint_path(run, 5))
    with pytest.raises(ValueError, match=r"step-00000005\.pt: cannot resume from it, it lacks "
                                         r"optimizer, scheduler, epoch, step_in_epoch, "
                                         r"global_step, best_score, loader, rng$"):
        t.resume()


def test_a_compiled_run_resumes_mid_epoch_and_saves_plain_weights(small_dataset: Path,
                                                                  tmp_path: Path) -> None:
    """The GPU presets compile the model. Its checkpoints must hold the plain module's keys (so
    predict's uncompiled net and a run with compile off load them), and a compiled run cut after
    a mid-epoch checkpoint must end where one left alone ends. aot_eager stands in for inductor,
    whose cold compile takes minutes on a CPU; validation runs the plain module in between."""
    common = ["train.epochs=2", "train.checkpoint_every_steps=2", "train.val_every=1",
              "model.compile=true", "model.compile_backend=aot_eager"]
    torch._dynamo.reset()
    _trainer(small_dataset, tmp_path / "ref", common).train()
    train_until(_trainer(small_dataset, tmp_path / "cut", common), 4)
    _trainer(small_dataset, tmp_path / "cut", common).train()
    ref, got = _weights(tmp_path / "ref"), _weights(tmp_path / "cut")
    assert set(ref) == set(got) == set(
        _trainer(small_dataset, tmp_path / "plain", ["model.compile=false"]).net.state_dict())
    assert all(torch.equal(ref[k], got[k]) for k in ref)


@pytest.mark.parametrize("split", ["train", "val"])
def test_a_split_whose_shards_are_all_unusable_is_refused_by_the_check(
        small_dataset: Path, tmp_path: Path, split: str,
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """Every shard of a split truncated: the launch scripts' --check passed it, so torchrun
    restarted the group MAX_RESTARTS times on it. Now one line, exit 2, before torchrun. (In
    the workers the loaders refuse it, agreed across ranks: test_distributed.py's
    test_ranks_that_read_different_shards_stop_with_the_reason.)"""
    import shutil

    import torch.distributed

    from trainer.train import main

    def group(*args: object, **kwargs: object) -> None:
        raise RuntimeError("the process group was started")

    monkeypatch.setattr(torch.distributed, "init_process_group", group)
    data = Path(shutil.copytree(small_dataset, tmp_path / "data"))
    for tar in (data / split).glob("shard-*.tar"):
        tar.write_bytes(tar.read_bytes()[:1024])
    argv = ["--config", "configs/tiny.toml", "--data", str(data), "--run-dir",
            str(tmp_path / "run")]
    assert main(["--check", *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(
        f"trainer.train: error: --data {data}: {data / split}: no usable sample in split "
        f"'{split}'; "), err
    assert f" shards left out: {data / split / 'shard-000000.tar'}: 1024 bytes on disk" in err[0]
    assert not (tmp_path / "run").exists()
    if split == "val":  # (a run that does not validate does not read it)
        assert main(["--check", *argv, "--set", "train.val_every=0"]) == 0


@pytest.mark.parametrize("check", [True, False], ids=["check", "run"])
def test_a_dataset_without_labels_is_refused_before_any_work(
        images_only_dataset: Path, tmp_path: Path, check: bool, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    """A dataset of prepare --images-only has masks of "no label" only: training on it would run
    its epochs on a loss of ignored pixels. Refused in one line with exit 2 by --check (the
    launch scripts' check before torchrun) and by every worker, before any process group."""
    import torch.distributed

    from trainer.train import main

    def group(*args: object, **kwargs: object) -> None:
        raise RuntimeError("the process group was started")

    monkeypatch.setattr(torch.distributed, "init_process_group", group)
    argv = ["--config", "configs/tiny.toml", "--data", str(images_only_dataset), "--run-dir",
            str(tmp_path / "run")]
    assert main(["--check", *argv] if check else argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(
        f"trainer.train: error: --data {images_only_dataset}: no labels (prepared with "
        "--images-only)"), err
    assert not (tmp_path / "run").exists()
