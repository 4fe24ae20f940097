"""Training and prediction on MUL-PanSharpen (8-band) datasets, and runs of one product refusing
a dataset of the other."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from dataio.manifest import load_manifest
from postproc.predio import iter_pred_samples, list_pred_shards
from trainer.checkpoint import load
from trainer.config import load_config
from trainer.dist import DistEnv
from trainer.predict import main as predict
from trainer.trainer import Trainer

MUL = "MUL-PanSharpen"


def _train(data: Path, run_dir: Path) -> Path:
    """configs/tiny.toml for one epoch (two steps of the 6 training tiles), validated once."""
    cfg = load_config(Path("configs/tiny.toml"), ["train.epochs=1", "train.val_every=1",
                                                  "data.num_threads=1"])
    Trainer(cfg, DistEnv(), data, run_dir, device=torch.device("cpu")).train()
    return run_dir


@pytest.fixture(scope="module")
def rgb_dataset(mul_aoi: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The RGB-PanSharpen product of the same AOI (the default)."""
    from dataio.prepare import PrepareConfig, prepare

    out = tmp_path_factory.mktemp("rgb") / "DATA"
    prepare(PrepareConfig(raw=[mul_aoi], out=out, shard_size=4, seed=0), progress=False)
    return out


@pytest.fixture(scope="module")
def mul_run(mul_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _train(mul_dataset, tmp_path_factory.mktemp("mulrun") / "run")


@pytest.fixture(scope="module")
def rgb_run(rgb_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _train(rgb_dataset, tmp_path_factory.mktemp("rgbrun") / "run")


def test_a_mul_run_trains_on_8_bands_and_predicts(mul_run: Path, mul_dataset: Path,
                                                  tmp_path: Path) -> None:
    state = load(mul_run / "checkpoints" / "best.pt")
    assert state["product"] == MUL and state["model"]["stem.0.weight"].shape[1] == 8
    assert len(state["percentiles"]["p2"]) == 8
    assert predict(["--run-dir", str(mul_run), "--data", str(mul_dataset), "--split", "test",
                    "--out", str(tmp_path / "pred")]) == 0
    got = [(k, p, m) for s in list_pred_shards(tmp_path / "pred") for k, p, m in
           iter_pred_samples(s)]
    assert len(got) == load_manifest(mul_dataset).samples("test") == 1
    key, prob, meta = got[0]
    assert prob.dtype == np.uint8 and prob.shape == (96, 96, 3) and meta["bands"] == 8


@pytest.mark.parametrize("run_of, data_of", [("rgb", "mul"), ("mul", "rgb")])
def test_a_run_refuses_a_dataset_of_the_other_product(
        run_of: str, data_of: str, request: pytest.FixtureRequest, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    """(before: "its model does not match RUN/config.json (model.*) and the 8 bands of
    DATA/manifest.json (it has 3 input bands (here 8); ...", naming neither product)"""
    run = request.getfixturevalue(f"{run_of}_run")
    data = request.getfixturevalue(f"{data_of}_dataset")
    assert predict(["--run-dir", str(run), "--data", str(data), "--split", "test",
                    "--out", str(tmp_path / "pred")]) == 2
    trained, held = ((3, "RGB-PanSharpen"), (8, MUL))[::1 if run_of == "rgb" else -1]
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"trainer.predict: error: {run}/checkpoints/best.pt was trained on {trained[0]}-band "
        f"{trained[1]} imagery, but {data}/manifest.json holds {held[0]}-band {held[1]}: "
        f"predict a dataset prepared with dataio.prepare --product {trained[1]}, or with a run "
        f"trained on {held[1]}")
    assert not (tmp_path / "pred").exists()


def test_resuming_on_a_dataset_of_the_other_product_is_refused_naming_both(
        rgb_run: Path, mul_dataset: Path, tmp_path: Path) -> None:
    """(MUL and RGB of one AOI have the same splits, so the dataset check let it by; the
    weights' check then said "its model does not match this config's model.* settings ... (it
    has 3 input bands (here 8)", blaming the config)"""
    import shutil

    run = tmp_path / "run"
    shutil.copytree(rgb_run, run)
    cfg = load_config(Path("configs/tiny.toml"), ["train.epochs=2", "data.num_threads=1"])
    last = sorted((run / "checkpoints").glob("*.pt"))
    with pytest.raises(ValueError) as e:
        Trainer(cfg, DistEnv(), mul_dataset, run, device=torch.device("cpu")).train()
    assert str(e.value).endswith(
        f": it was trained on 3-band RGB-PanSharpen imagery, but {mul_dataset}/manifest.json "
        "holds 8-band MUL-PanSharpen; resume on the dataset it trained on, or start a new "
        "--run-dir")
    assert sorted((run / "checkpoints").glob("*.pt")) == last


@pytest.mark.parametrize("data_of, sets, said", [
    ("mul", [], "it was trained on 3-band RGB-PanSharpen imagery, but {data}/manifest.json holds "
                "8-band MUL-PanSharpen; resume on the dataset it trained on, or start a new "
                "--run-dir"),
    ("rgb", ["model.norm=group"], "its model does not match this config's model.* settings; "
                                  "resume with the run's config or start a new --run-dir (the "
                                  "checkpoint was trained with model.norm='batch' (here "
                                  "'group');"),
    ("rgb", ["optim.name=sgd"], "it was trained with optim.name='adam', this config has 'sgd'; "
                                "resume with the run's optimizer or start a new --run-dir"),
    ("rgb", [], None)])
def test_check_refuses_what_the_resume_would_before_torchrun(
        rgb_run: Path, data_of: str, sets: list[str], said: str | None,
        request: pytest.FixtureRequest, capsys: pytest.CaptureFixture[str]) -> None:
    """The launch scripts' --check passed a resume that the workers then refused (another
    product, model or optimizer): every rank exited 2, torchrun restarted the group
    MAX_RESTARTS times, printing the error each time, and exited 1 with its traceback."""
    from trainer.train import main

    data = request.getfixturevalue(f"{data_of}_dataset")
    argv = ["--check", "--config", "configs/tiny.toml", "--data", str(data), "--run-dir",
            str(rgb_run), *[a for s in sets for a in ("--set", s)]]
    assert main(argv) == (0 if said is None else 2)
    err = capsys.readouterr().err.strip().splitlines()
    if said is None:
        assert err == []
    else:
        newest = sorted((rgb_run / "checkpoints").glob("step-*.pt"))[-1]
        assert err[-1].startswith(f"trainer.train: error: {newest}: "
                                  f"{said.format(data=data)}"), err


def test_init_from_a_run_of_the_other_product_is_refused_naming_both(
        rgb_run: Path, mul_dataset: Path, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    """(before: "its model does not match this config's model.* settings and the 8 bands
    (MUL-PanSharpen) of DATA/manifest.json (...) (it has 3 input bands (here 8))": the config
    blamed first, the run's own imagery not named)"""
    from trainer.train import main

    run = tmp_path / "run"
    assert main(["--check", "--config", "configs/tiny.toml", "--data", str(mul_dataset),
                 "--run-dir", str(run), "--set", f"train.init_from={rgb_run}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    best = rgb_run / "checkpoints" / "best.pt"
    said = (f"train.init_from: {best} was trained on 3-band RGB-PanSharpen imagery, but "
            f"{mul_dataset}/manifest.json holds 8-band MUL-PanSharpen: fine-tune from a run "
            "trained on MUL-PanSharpen, or train this one without train.init_from")
    assert err == [f"trainer.train: error: {said}"]
    assert not run.exists()
    # the Trainer's own load (a Trainer built without trainer.train's check) says the same
    cfg = load_config(Path("configs/tiny.toml"), [f"train.init_from={rgb_run}",
                                                  "data.num_threads=1"])
    with pytest.raises(ValueError) as e:
        Trainer(cfg, DistEnv(), mul_dataset, run, device=torch.device("cpu")).train()
    assert str(e.value) == said
