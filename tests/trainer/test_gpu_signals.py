"""SIGTERM on the GPU path (CUDA fp16 with a GradScaler, the DALI GPU pipeline), which the CPU
suite's signal tests cannot reach: torchrun forwards Slurm's SIGTERM (scancel, a job's time
limit) to its workers, and sends one to the survivors of a failed worker.

Marked ``gpu``: skipped without CUDA (tests/conftest.py). One rank, so no process group: NCCL
refuses two ranks on one GPU, and the multi-rank versions run on gloo (tests/trainer/
test_trainer.py, test_predict.py).
"""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest
from proc_helpers import interrupt_when
from trainer_helpers import run, torchrun_cmd

from postproc.predio import list_pred_shards
from trainer import checkpoint as ckpt

HERE = Path(__file__).parent
# 17 training tiles at data.batch_size=4 (configs/tiny.toml); a checkpoint after every step
TRAIN = ["--config", "configs/tiny.toml", "--set", "train.val_every=0", "--set",
         "train.checkpoint_every_steps=1", "--set", "train.amp=fp16", "--set",
         "data.num_threads=1"]


@pytest.mark.gpu
@pytest.mark.slow
@pytest.mark.timeout(300)
def test_sigterm_on_the_gpu_keeps_what_was_written_and_the_rerun_finishes(
        small_dataset: Path, tmp_path: Path) -> None:
    """Training (fp16 with its GradScaler) and then predicting (on the GPU), each stopped
    by a real SIGTERM to torchrun: one line each, complete checkpoints / the prediction stage
    kept, and the same command run again resumes and finishes there."""
    run_dir, out = tmp_path / "run", tmp_path / "pred"
    train = [*TRAIN, "--data", str(small_dataset), "--run-dir", str(run_dir)]
    res = interrupt_when(torchrun_cmd(1, [str(HERE / "ctrl_c_worker.py"), *train, "--set",
                                          "train.epochs=100"]),
                         "saved", times=2, sig=signal.SIGTERM, gpu=True)
    lines = res.stderr.replace("\r", "\n").splitlines()
    assert [line for line in lines if "trainer.train:" in line] == [
        f"trainer.train: terminated (SIGTERM); rerun the same command to resume from the newest "
        f"complete checkpoint in {run_dir / 'checkpoints'}"], res.stderr[-3000:]
    assert "Exception ignored" not in res.stderr, res.stderr[-3000:]
    kept = ckpt.list_checkpoints(run_dir)
    assert len(kept) >= 2
    assert all(not p.name.startswith(".") for p in ckpt.checkpoint_dir(run_dir).iterdir())
    assert ckpt.load(kept[-1])["scaler"]  # the fp16 run's GradScaler state went with it

    res = run(torchrun_cmd(1, ["-m", "trainer.train", *train, "--set", "train.epochs=2"]),
              timeout=180, gpu=True)
    assert res.returncode == 0, res.stderr[-3000:]
    log = [json.loads(r) for r in (run_dir / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log] == [1, 2]
    assert {(r["device"], r["dist_backend"], r["amp"]) for r in log} == {("cuda", None, "fp16")}

    predict = ["--run-dir", str(run_dir), "--data", str(small_dataset), "--split", "train",
               "--out", str(out), "--batch-size", "1", "--shard-size", "1"]
    res = interrupt_when(torchrun_cmd(1, [str(HERE / "predict_ctrl_c_worker.py"), *predict]),
                         "predicting", times=2, sig=signal.SIGTERM, gpu=True)
    lines = res.stderr.replace("\r", "\n").splitlines()
    assert [line for line in lines if "trainer.predict:" in line] == [
        f"trainer.predict: terminated (SIGTERM); {out} is left as it was; the shards written so "
        f"far are kept in {out / '.partial'}: rerun the same command to resume (--fresh to start "
        "over)"], res.stderr[-3000:]
    assert list((out / ".partial").glob("pred-*.tar")) and not list(out.glob("pred-*.tar"))
    res = run(torchrun_cmd(1, ["-m", "trainer.predict", *predict]), timeout=180, gpu=True)
    assert res.returncode == 0, res.stderr[-3000:]
    assert f"trainer.predict: resuming the stopped prediction in {out / '.partial'}" in (
        res.stderr + res.stdout), res.stderr[-3000:]
    assert len(list_pred_shards(out)) == 17 and not (out / ".partial").exists()
