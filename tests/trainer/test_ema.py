"""``train.ema_decay``: an exponential moving average of the weights, validated and predicted with.

17 training tiles at data.batch_size=4: 5 optimizer steps an epoch (``configs/tiny.toml``).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from stop_at import train_until
from trainer_helpers import REPO, messages, poison_every_other_gradient, run, torchrun_cmd

from postproc.predio import iter_pred_samples, list_pred_shards
from trainer import checkpoint as ckpt
from trainer.config import ConfigError, load_config
from trainer.dist import DistEnv
from trainer.ema import WeightEMA, decay_at
from trainer.predict import main as predict
from trainer.trainer import Trainer, fill_padding

FAST = ["train.val_every=0", "data.num_threads=1"]
# (0.9: the warm-up's (1 + n) / (10 + n) stays below it for the 5-10 steps of these runs, 0.1
# at the first step; the EMA then lags the weights enough for its validation to differ)
EMA = ["train.ema_decay=0.9"]
VALIDATED = ["train.val_every=1", "train.val_f1=false"]


def _trainer(data: Path, run_dir: Path, overrides: list[str]) -> Trainer:
    cfg = load_config(Path("configs/tiny.toml"), FAST + overrides)
    return Trainer(cfg, DistEnv(), data, run_dir, device=torch.device("cpu"))


def _newest(run_dir: Path) -> dict:
    return ckpt.load(ckpt.list_checkpoints(run_dir)[-1])


def _equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _log(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]


@pytest.fixture
def info_log(footprints_log: list[logging.LogRecord], caplog: pytest.LogCaptureFixture
             ) -> Iterator[list[logging.LogRecord]]:
    """The project logger's records, its info lines too (as test_init_from takes them)."""
    with caplog.at_level(logging.INFO, logger="footprints"):
        yield footprints_log


@pytest.mark.parametrize("bad", ["1", "1.5", "-0.1"])
def test_a_decay_outside_0_to_1_is_refused_naming_the_key(bad: str) -> None:
    assert load_config(None).train.ema_decay == 0.0  # off by default
    assert load_config(None, ["train.ema_decay=0.999"]).train.ema_decay == 0.999
    with pytest.raises(ConfigError, match=r"\[train\] ema_decay must be in \[0, 1\)"):
        load_config(None, [f"train.ema_decay={bad}"])


def test_the_average_is_tfs_warmed_up_decay_of_params_and_float_buffers() -> None:
    """A hand-written EMA on a tiny BatchNorm model: parameters and running statistics averaged
    with min(decay, (1 + n) / (10 + n)), num_batches_tracked copied, all in fp32."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(2, 3, 3), torch.nn.BatchNorm2d(3))
    opt = torch.optim.SGD(net.parameters(), lr=0.5)
    ema = WeightEMA(net, 0.95)
    want = {k: v.clone() for k, v in net.state_dict().items()}
    target = torch.randn(4, 3, 4, 4)
    for n in range(40):  # past the warm-up: (1 + 31) / (10 + 31) > 0.95
        opt.zero_grad()
        (net(torch.randn(4, 2, 6, 6)) - target).square().mean().backward()
        opt.step()
        ema.update(net)
        d = min(0.95, (1 + n) / (10 + n))
        assert decay_at(0.95, n) == d
        for k, v in net.state_dict().items():
            want[k] = d * want[k] + (1 - d) * v if v.is_floating_point() else v.clone()
    got = ema.module.state_dict()
    assert ema.updates == 40 and got.keys() == want.keys()
    for k in want:
        assert got[k].dtype == want[k].dtype, k  # fp32 (int64 for num_batches_tracked)
        torch.testing.assert_close(got[k], want[k], rtol=1e-6, atol=1e-7, msg=k)
    assert int(got["1.num_batches_tracked"]) == 40
    # it lags the weights (an average, not a copy of the last step)
    for k in ("0.weight", "1.running_mean", "1.running_var"):
        assert not torch.allclose(got[k], net.state_dict()[k], atol=1e-3), k


def test_the_average_stays_fp32_for_low_precision_weights() -> None:
    """bf16 weights (rounded to 8 bits of mantissa) are averaged into an fp32 EMA: in bf16,
    steps smaller than the weight's rounding would be lost."""
    torch.manual_seed(0)
    net = torch.nn.Linear(3, 2).to(torch.bfloat16)
    ema = WeightEMA(net, 0.99)
    want = {k: v.float() for k, v in net.state_dict().items()}
    for n in range(20):
        with torch.no_grad():
            net.weight.add_(0.01)
        ema.update(net)
        d = decay_at(0.99, n)
        want = {k: d * want[k] + (1 - d) * v.float() for k, v in net.state_dict().items()}
    got = ema.module.state_dict()
    assert all(v.dtype == torch.float32 for v in got.values())
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-6, atol=1e-7, msg=k)


@pytest.mark.parametrize("decay", [0.0, 0.9])
def test_the_raw_weights_train_as_the_plain_loop_and_the_ema_follows_them(
        small_dataset: Path, tmp_path: Path, decay: float) -> None:
    """Off (0, the default): the run is the plain loop bit for bit and its checkpoints have no
    EMA. On: the raw weights still are (the EMA takes no RNG draw and touches no weight), and
    the EMA is the hand-written average of the weights after each of the 5 optimizer steps."""
    common = ["train.amp=off", "train.epochs=1", f"train.ema_decay={decay}"]
    t = _trainer(small_dataset, tmp_path / "run", common)
    t.train()
    ref = _trainer(small_dataset, tmp_path / "ref", common)  # the same seed: the same weights
    ref.net.train()
    ref.train_loader.set_epoch(0)
    by_hand = {k: v.clone() for k, v in ref.net.state_dict().items()}
    for n, batch in enumerate(ref.train_loader):
        ref.optimizer.zero_grad(set_to_none=True)
        ref.loss_fn(ref.net(fill_padding(batch.image, batch.valid.tolist())),
                    batch.mask).backward()
        ref.optimizer.step()
        ref.scheduler.step()
        d = min(decay, (1 + n) / (10 + n))
        for k, v in ref.net.state_dict().items():
            by_hand[k] = d * by_hand[k] + (1 - d) * v if v.is_floating_point() else v.clone()
    ref.train_loader.close()
    assert n == 4
    assert _equal(t.net.state_dict(), ref.net.state_dict())
    saved = _newest(tmp_path / "run")
    assert _equal(saved["model"], ref.net.state_dict())
    if decay == 0:
        assert t.ema is None and "ema" not in saved
        return
    assert saved["ema"]["updates"] == 5
    for k, v in saved["ema"]["model"].items():
        torch.testing.assert_close(v, by_hand[k], rtol=1e-5, atol=1e-6, msg=k)


def test_one_update_per_optimizer_step_none_for_a_skipped_one(small_dataset: Path,
                                                               tmp_path: Path) -> None:
    # grad_accum_steps=2: 5 batches are 3 optimizer steps, so 3 updates
    t = _trainer(small_dataset, tmp_path / "acc", [*EMA, "train.epochs=1",
                                                   "train.grad_accum_steps=2"])
    t.train()
    assert t.global_step == 3 and t.ema is not None and t.ema.updates == 3
    # NaN gradients on steps 1, 3 and 5: skipped, and averaged in neither
    t = _trainer(small_dataset, tmp_path / "nan", [*EMA, "train.epochs=1",
                                                   "train.max_nonfinite_steps=2"])
    poison_every_other_gradient(t.net)
    t.train()
    assert t.global_step == 5 and t.ema is not None and t.ema.updates == 2
    assert all(bool(torch.isfinite(v).all()) for v in t.ema.module.state_dict().values())


def test_a_step_the_grad_scaler_skips_is_not_averaged_in(small_dataset: Path,
                                                        tmp_path: Path) -> None:
    """fp16's GradScaler (on the CPU here, in fp32) skips the optimizer step on inf gradients
    inside ``scaler.step``, which returns None either way: the trainer tells by the unscaled
    gradients' norm, and the EMA must follow the steps the optimizer took, not the calls."""
    t = _trainer(small_dataset, tmp_path / "run", [*EMA, "train.epochs=1", "train.amp=off"])
    t.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
    calls = {"n": 0}

    def overflow(grad: torch.Tensor) -> torch.Tensor:  # steps 2 and 4 overflow
        calls["n"] += 1
        return grad * float("inf") if calls["n"] % 2 == 0 else grad

    t.net.head.weight.register_hook(overflow)
    t.train()
    # the scaler itself skipped twice (each halved its scale), the trainer did not
    assert t.global_step == 5 and t.scaler.get_scale() == 2.0**14 and t.nonfinite_run == 0
    assert t.ema is not None and t.ema.updates == 3
    assert all(bool(torch.isfinite(v).all()) for v in t.ema.module.state_dict().values())


def test_a_resume_restores_the_ema_bit_exactly(small_dataset: Path, tmp_path: Path) -> None:
    common = [*EMA, *VALIDATED, "train.epochs=2", "train.checkpoint_every_steps=2"]
    _trainer(small_dataset, tmp_path / "ref", common).train()
    # stop right after the checkpoint at global step 8: step 3 of the second epoch, after the
    # first validation
    train_until(_trainer(small_dataset, tmp_path / "cut", common), 8)
    _trainer(small_dataset, tmp_path / "cut", common).train()
    ref, cut = _newest(tmp_path / "ref"), _newest(tmp_path / "cut")
    assert _equal(ref["model"], cut["model"])
    assert _equal(ref["ema"]["model"], cut["ema"]["model"])
    assert ref["ema"]["updates"] == cut["ema"]["updates"] == 10
    assert [(r["val_loss"], r["val_iou"]) for r in _log(tmp_path / "ref")] == \
        [(r["val_loss"], r["val_iou"]) for r in _log(tmp_path / "cut")]


def test_a_resume_starts_an_ema_from_the_weights_or_drops_it(
        small_dataset: Path, tmp_path: Path, info_log: list[logging.LogRecord]) -> None:
    run_dir = tmp_path / "run"
    _trainer(small_dataset, run_dir, ["train.epochs=1"]).train()  # no EMA
    t = _trainer(small_dataset, run_dir, [*EMA, "train.epochs=2"])
    assert t.resume() and t.ema is not None
    assert _equal(t.ema.module.state_dict(), t.net.state_dict()) and t.ema.updates == 0
    assert "train.ema_decay=0.9: " in messages(info_log)
    assert "has no weight EMA; it starts from the resumed weights" in messages(info_log)
    _trainer(small_dataset, run_dir, [*EMA, "train.epochs=2"]).train()
    assert _newest(run_dir)["ema"]["updates"] == 5  # the second epoch's steps
    t = _trainer(small_dataset, run_dir, ["train.epochs=3"])
    t.train()
    assert "has a weight EMA and train.ema_decay=0: it is dropped" in messages(info_log)
    assert t.ema is None and "ema" not in _newest(run_dir)


def test_the_log_says_which_weights_each_validation_scored(small_dataset: Path,
                                                            tmp_path: Path) -> None:
    """One log.jsonl across resumes that turn the EMA on and off: each validated epoch's record
    names the weights its figures are of (the EMA's or the trained ones), an epoch without a
    validation none."""
    run_dir = tmp_path / "run"
    _trainer(small_dataset, run_dir, [*VALIDATED, "train.epochs=1"]).train()
    _trainer(small_dataset, run_dir, [*EMA, *VALIDATED, "train.epochs=2"]).train()
    _trainer(small_dataset, run_dir, [*VALIDATED, "train.val_every=2", "train.epochs=4"]).train()
    log = _log(run_dir)
    assert [r["epoch"] for r in log] == [1, 2, 3, 4]
    assert [r.get("val_weights") for r in log] == ["model", "ema", None, "model"]
    assert "val_iou" not in log[2]


def test_the_start_line_names_every_reader_of_the_ema(small_dataset: Path, tmp_path: Path,
                                                       info_log: list[logging.LogRecord]) -> None:
    """The line a run with an EMA starts with lists what takes the EMA instead of the raw
    weights: trainer.export too (it loads a checkpoint as predict does)."""
    _trainer(small_dataset, tmp_path / "run", [*EMA, "train.epochs=1"]).train()
    line = next(m for m in messages(info_log).splitlines() if m.startswith("train.ema_decay=0.9:"))
    for reader in ("validation", "best.pt", "trainer.predict", "trainer.export",
                   "train.init_from"):
        assert reader in line, (reader, line)


@pytest.fixture(scope="module")
def ema_run(small_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> Trainer:
    """Two validated epochs with an EMA: best.pt holds raw weights and an EMA that differ."""
    t = _trainer(small_dataset, tmp_path_factory.mktemp("ema") / "run",
                 [*EMA, *VALIDATED, "train.epochs=2"])
    t.train()
    return t


def test_validation_and_best_pt_score_the_ema(ema_run: Trainer) -> None:
    t = ema_run
    assert t.ema is not None
    logged = _log(t.run_dir)[-1]
    on_ema, on_raw = t.validator.run(t.ema.module), t.validator.run(t.net)
    assert (logged["val_loss"], logged["val_iou"]) == (on_ema["val_loss"], on_ema["val_iou"])
    assert [r["val_weights"] for r in _log(t.run_dir)] == ["ema", "ema"]
    assert on_raw["val_loss"] != on_ema["val_loss"]
    best = ckpt.load(t.run_dir / "checkpoints" / "best.pt")
    assert not _equal(best["model"], best["ema"]["model"])
    assert _equal(ckpt.scored(best)["model"], best["ema"]["model"])


def test_init_from_takes_the_ema(ema_run: Trainer, small_dataset: Path, tmp_path: Path,
                                 info_log: list[logging.LogRecord]) -> None:
    t = _trainer(small_dataset, tmp_path / "tuned", [f"train.init_from={ema_run.run_dir}"])
    t.init_weights()
    best = ckpt.load(ema_run.run_dir / "checkpoints" / "best.pt")
    assert _equal(t.net.state_dict(), best["ema"]["model"])
    assert t.init_source is not None and t.init_source["ema"] is True
    assert ", its weight EMA)" in messages(info_log)


def _probs(run_dir: Path, data: Path, out: Path, checkpoint: Path) -> dict[str, np.ndarray]:
    assert predict(["--run-dir", str(run_dir), "--data", str(data), "--split", "test",
                    "--out", str(out), "--checkpoint", str(checkpoint)]) == 0
    return {key: prob for shard in list_pred_shards(out)
            for key, prob, _ in iter_pred_samples(shard)}


def test_predict_takes_the_ema_and_says_so(ema_run: Trainer, small_dataset: Path,
                                           tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    """best.pt's raw weights and its EMA differ: the prediction is the EMA's, as that of a
    checkpoint without an EMA (an older run's, which still loads) holding those weights."""
    best = ema_run.run_dir / "checkpoints" / "best.pt"
    state = ckpt.load(best)
    for name, weights in (("as_ema", state["ema"]["model"]), ("as_raw", state["model"])):
        torch.save({**{k: v for k, v in state.items() if k != "ema"}, "model": weights},
                   tmp_path / f"{name}.pt")
    capsys.readouterr()
    got = _probs(ema_run.run_dir, small_dataset, tmp_path / "best", best)
    assert capsys.readouterr().err.count("predicting with the weight EMA of") == 1
    want = _probs(ema_run.run_dir, small_dataset, tmp_path / "ema", tmp_path / "as_ema.pt")
    assert "weight EMA" not in capsys.readouterr().err
    raw = _probs(ema_run.run_dir, small_dataset, tmp_path / "raw", tmp_path / "as_raw.pt")
    assert got.keys() == want.keys() == raw.keys() and got
    assert all(np.array_equal(got[k], want[k]) for k in want)
    assert any(not np.array_equal(got[k], raw[k]) for k in raw)


@pytest.mark.multiproc
@pytest.mark.slow
@pytest.mark.timeout(240)
def test_two_ranks_hold_the_same_ema(small_dataset: Path, tmp_path: Path) -> None:
    """The averaged parameters are the same on both ranks with no communication of their own;
    BatchNorm's averaged running statistics are each rank's until validation gives every rank
    rank 0's, which its checkpoint holds; the raw net's too."""
    out = tmp_path / "out"
    out.mkdir()
    res = run(torchrun_cmd(2, [str(REPO / "tests" / "trainer" / "ema_worker.py"),
                               str(small_dataset), str(tmp_path / "run"), str(out)]),
              timeout=200)
    assert res.returncode == 0, res.stderr[-3000:]
    before = [torch.load(out / f"before-{r}.pt") for r in (0, 1)]
    after = [torch.load(out / f"after-{r}.pt") for r in (0, 1)]
    stats = [n for n in before[0] if ".running_" in n]
    params = [n for n in before[0] if n not in stats and not n.endswith("num_batches_tracked")]
    assert params and stats and after[0]["updates"] == after[1]["updates"] == 3
    assert all(torch.equal(before[0][n], before[1][n]) for n in params)
    # (each rank's own batches: what the validation's sync is for)
    assert any(not torch.equal(before[0][n], before[1][n]) for n in stats)
    assert _equal(after[0]["ema"], after[1]["ema"])
    assert _equal(after[0]["ema"], before[0])  # rank 0's own, unchanged by the sync
    assert _equal(_newest(tmp_path / "run")["ema"]["model"], after[0]["ema"])
    assert not _equal(after[0]["ema"], after[0]["raw"])
    # the raw net validated with rank 0's statistics too (each rank's own before): the ones its
    # checkpoint holds, so a resumed run validates as an uninterrupted one
    assert _equal(after[0]["raw"], after[1]["raw"])
    assert _equal(_newest(tmp_path / "run")["model"], after[0]["raw"])


@pytest.mark.parametrize(("ema", "said"), [
    ("weights", r"'ema' is not a weight EMA's state"),
    ({"model": {"w": torch.zeros(1)}}, r"'ema' is not a weight EMA's state"),
    ({"model": [torch.zeros(1)], "updates": 3}, r"'ema' 'model' is a list, not a state dict"),
])
def test_a_damaged_ema_is_refused_naming_the_file(tmp_path: Path, ema: object,
                                                  said: str) -> None:
    """(else predict, init_from and a resume took its weights with a TypeError or KeyError
    traceback that named no file)"""
    path = tmp_path / "step-00000001.pt"
    torch.save({"format": ckpt.FORMAT, "model": {"w": torch.zeros(1)}, "ema": ema}, path)
    with pytest.raises(ValueError, match=rf"{path}: not a checkpoint of this trainer \({said}"):
        ckpt.load(path)
