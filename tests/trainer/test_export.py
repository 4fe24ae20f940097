"""trainer.export: the run's network as ONNX, raw bands in, trainer.predict's probabilities out."""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import signal
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from proc_helpers import interrupt_when

from dataio.loader import build_loader
from dataio.manifest import load_manifest
from dataio.shards import iter_tar_samples
from models import build_model_from_config
from trainer.checkpoint import FORMAT, has_ema, load, load_model, scored
from trainer.config import load_config, load_run_config
from trainer.dist import DistEnv
from trainer.export import main as export
from trainer.trainer import Trainer

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

# NOTE: fp32 on both sides; onnxruntime's kernels sum in another order than torch's (measured:
# up to 1e-6 with BatchNorm, 3e-5 with GroupNorm on random weights)
ATOL = 1e-4
PRESETS = {
    "baseline": [],  # configs/tiny.toml: unet_baseline, BatchNorm
    # the other U-Net, GroupNorm, channels_last weights (the GPU presets' layout), and a weight
    # EMA, which export takes as predict does (the reference below loads it: the raw weights
    # differ)
    "unet-group-nhwc-ema": ['model.name="unet"', 'model.norm="group"',
                            "model.channels_last=true", "train.ema_decay=0.5"],
}


@pytest.fixture(scope="module", params=list(PRESETS))
def exported(request: pytest.FixtureRequest, small_dataset: Path,
             tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(a tiny trained run of the preset, its best.pt exported from the run directory)."""
    root = tmp_path_factory.mktemp(f"export-{request.param}")
    cfg = load_config(Path("configs/tiny.toml"), ["train.epochs=1", "train.val_every=1",
                                                  "data.num_threads=1", *PRESETS[request.param]])
    Trainer(cfg, DistEnv(), small_dataset, root / "run", device=torch.device("cpu")).train()
    out = root / "model.onnx"
    assert export(["--checkpoint", str(root / "run"), "--out", str(out)]) == 0
    return root / "run", out


def _raw_images(data: Path, split: str) -> dict[str, np.ndarray]:
    """Each tile's img.npy as the deployer holds it: the GeoTIFF's values, CHW float32."""
    out = {}
    m = load_manifest(data)
    for info in m.shards(split):
        for key, members in iter_tar_samples(data / split / info["name"]):
            img = np.load(io.BytesIO(members["img.npy"]))
            out[key] = img.transpose(2, 0, 1).astype(np.float32)
    return out


@pytest.mark.slow  # (an export: 10-30 s on 2 cores)
def test_onnxruntime_gives_the_networks_probabilities_at_any_size_and_batch(
        exported: tuple[Path, Path], small_dataset: Path) -> None:
    """The loader's normalised tile through the checkpoint's network (trainer.predict's
    probabilities) against the raw tile through the ONNX graph: whole 128 px tiles in a batch
    of 3, and a 100 x 75 cut (not a multiple of 16: the graph pads and crops) alone."""
    run_dir, out = exported
    cfg = load_run_config(run_dir)
    best = run_dir / "checkpoints" / "best.pt"
    state = load(best)
    net = build_model_from_config(cfg.model, 3, 3)
    load_model(net, scored(state), best, "")
    net.eval()
    norm = state["percentiles"]["p2"], state["percentiles"]["p98"]
    raw = _raw_images(small_dataset, "test")
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    with build_loader(small_dataset, "test", cfg.data, device=torch.device("cpu"),
                      percentiles=norm) as loader:
        batch = next(iter(loader))
    keys = [k for k, v in zip(batch.keys, batch.valid.tolist(), strict=True) if v][:3]
    assert len(keys) == 3
    image = batch.image[[batch.keys.index(k) for k in keys]]
    cases = [(image, np.stack([raw[k] for k in keys])),
             (image[:1, :, 9:109, 20:95], raw[keys[0]][None, :, 9:109, 20:95])]
    for normalised, given in cases:
        with torch.no_grad():
            want = torch.softmax(net(normalised), dim=1).numpy()
        got = session.run(None, {"image": np.ascontiguousarray(given)})[0]
        assert got.shape == want.shape == (len(given), 3, *given.shape[2:])
        assert np.abs(got - want).max() <= ATOL


@pytest.mark.slow  # (an export: 10-30 s on 2 cores)
def test_metadata_round_trips(exported: tuple[Path, Path]) -> None:
    run_dir, out = exported
    best = run_dir / "checkpoints" / "best.pt"
    state = load(best)
    cfg = load_run_config(run_dir)
    model = onnx.load(str(out))
    meta = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]
                                ).get_modelmeta().custom_metadata_map
    assert meta == {p.key: p.value for p in model.metadata_props}
    assert json.loads(meta["classes"]) == ["background", "building", "boundary"]
    assert int(meta["bands"]) == 3
    assert meta["product"] == state["product"] == "RGB-PanSharpen"
    assert meta["band_order"].endswith(": red, green, blue")
    norm = json.loads(meta["normalisation"])
    assert (norm["p2"], norm["p98"]) == (state["percentiles"]["p2"], state["percentiles"]["p98"])
    net = build_model_from_config(cfg.model, 3, 3)
    assert (meta["model"], json.loads(meta["model_widths"])) == (cfg.model.name, list(net.widths))
    assert (meta["model_norm"], meta["model_pad_mode"]) == (cfg.model.norm, cfg.model.pad_mode)
    assert int(meta["size_multiple"]) == net.multiple == 16 and int(meta["min_size"]) == 16
    assert Path(meta["checkpoint"]) == best.resolve()
    assert json.loads(meta["checkpoint_step"]) == state["global_step"]
    assert meta["checkpoint_sha256"] == hashlib.sha256(best.read_bytes()).hexdigest()
    assert meta["checkpoint_weights"] == ("ema" if has_ema(state) else "model")
    assert has_ema(state) == (cfg.train.ema_decay > 0)
    dims = [[d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]
            for v in (model.graph.input[0], model.graph.output[0])]
    assert dims == [["batch", 3, "height", "width"]] * 2


@pytest.fixture(scope="module")
def a_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run directory whose best.pt has what export reads (nothing is exported from it: the
    refusals come first)."""
    run_dir = tmp_path_factory.mktemp("export-bad") / "run"
    (run_dir / "checkpoints").mkdir(parents=True)
    cfg = load_config(Path("configs/tiny.toml"), [])
    torch.save({"format": FORMAT, "model": build_model_from_config(cfg.model, 3, 3).state_dict(),
                "config": cfg.to_json(), "global_step": 1,
                "percentiles": {"p2": [0.0] * 3, "p98": [2047.0] * 3}},
               run_dir / "checkpoints" / "best.pt")
    return run_dir


def _bad(kind: str, run_dir: Path, tmp: Path) -> tuple[list[str], str]:
    """(arguments, the start of the one line) for each kind of bad input."""
    best = run_dir / "checkpoints" / "best.pt"
    out = tmp / "model.onnx"
    if kind == "missing":
        return ["--checkpoint", str(tmp / "nope.pt"), "--out", str(out)], \
            f"--checkpoint={tmp / 'nope.pt'}: no such file or run directory"
    if kind == "run without best":
        (tmp / "empty" / "checkpoints").mkdir(parents=True)
        return ["--checkpoint", str(tmp / "empty"), "--out", str(out)], \
            f"--checkpoint={tmp / 'empty'}: {tmp / 'empty' / 'checkpoints' / 'best.pt'} not found"
    if kind == "foreign":
        torch.save({"weights": torch.zeros(2)}, tmp / "foreign.pt")
        return ["--checkpoint", str(tmp / "foreign.pt"), "--out", str(out)], \
            f"{tmp / 'foreign.pt'}: not a checkpoint of this trainer"
    if kind == "damaged":
        data = best.read_bytes()
        (tmp / "torn.pt").write_bytes(data[:len(data) // 2])
        return ["--checkpoint", str(tmp / "torn.pt"), "--out", str(out)], \
            f"{tmp / 'torn.pt'}: not a readable checkpoint"
    if kind == "no percentiles":
        state = load(best)
        del state["percentiles"]
        torch.save(state, tmp / "old.pt")
        return ["--checkpoint", str(tmp / "old.pt"), "--out", str(out)], \
            f"{tmp / 'old.pt'}: records no training percentiles"
    if kind == "out under a file":
        (tmp / "file").write_text("x")
        return ["--checkpoint", str(run_dir), "--out", str(tmp / "file" / "m.onnx")], \
            f"--out {tmp / 'file' / 'm.onnx'}: {tmp / 'file'} is not a directory"
    if kind == "out is the checkpoint":
        shutil.copy(best, tmp / "copy.pt")
        return ["--checkpoint", str(tmp / "copy.pt"), "--out", str(tmp / "copy.pt")], \
            f"--out {tmp / 'copy.pt'} is the --checkpoint input"
    # (17: torch's exporter converted the graph down and failed, 99: it gave 18)
    opset = {"opset too old": "17", "opset too new": "99"}[kind]
    return ["--checkpoint", str(run_dir), "--out", str(out), "--opset", opset], \
        f"--opset {opset} is not one this export can give: 18 (torch's exporter's lowest) to "


@pytest.mark.parametrize("kind", ["missing", "run without best", "foreign", "damaged",
                                  "no percentiles",
                                  "out under a file", "out is the checkpoint", "opset too old",
                                  "opset too new"])
def test_bad_input_is_one_line_and_exit_2(kind: str, a_run: Path, tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    args, start = _bad(kind, a_run, tmp_path)
    out = Path(args[args.index("--out") + 1])
    before = out.read_bytes() if out.is_file() else None
    assert export(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"trainer.export: error: {start}"), err
    # (nothing written: an input named as --out is left as it was)
    assert (out.read_bytes() if out.is_file() else None) == before
    assert not [p for p in tmp_path.rglob("*") if p.name.endswith(".tmp")]


@pytest.mark.slow  # (an export: 10-30 s on 2 cores)
def test_a_checkpoint_without_percentiles_takes_those_of_data(a_run: Path, small_dataset: Path,
                                                              tmp_path: Path) -> None:
    """(a checkpoint from before the trainer recorded them: as trainer.predict, --data's)"""
    state = load(a_run / "checkpoints" / "best.pt")
    del state["percentiles"]
    torch.save(state, tmp_path / "old.pt")
    out = tmp_path / "old.onnx"
    assert export(["--checkpoint", str(tmp_path / "old.pt"), "--out", str(out), "--data",
                   str(small_dataset)]) == 0
    meta = {p.key: p.value for p in onnx.load(str(out)).metadata_props}
    norm = json.loads(meta["normalisation"])
    assert (norm["p2"], norm["p98"]) == load_manifest(small_dataset).percentiles()


def test_data_given_for_a_checkpoint_with_percentiles_is_named_as_not_read(
        a_run: Path, small_dataset: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    """(--data was silently ignored: a user who meant the graph to take DATA's statistics was
    not told it took the checkpoint's; the graph is not built here, the note comes before)"""
    import trainer.export as export_module

    def to_onnx(*args: object) -> None:
        raise ValueError("stopped before the graph")

    monkeypatch.setattr(export_module, "to_onnx", to_onnx)
    assert export(["--checkpoint", str(a_run), "--out", str(tmp_path / "m.onnx"), "--data",
                   str(small_dataset)]) == 2
    err = capsys.readouterr().err
    assert f"trainer.export: note: --data {small_dataset} is not read: " in err, err


def test_without_the_onnx_packages_it_names_the_extra(a_run: Path, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setitem(sys.modules, "onnxscript", None)  # (import onnxscript: ImportError)
    assert export(["--checkpoint", str(a_run), "--out", str(tmp_path / "m.onnx")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(
        "trainer.export: error: exporting needs the onnx and onnxscript packages"), err
    assert "pip install -e '.[export]'" in err and not (tmp_path / "m.onnx").exists()


@pytest.mark.slow  # (an export: 10-30 s on 2 cores, in a process of its own)
@pytest.mark.timeout(180)
def test_a_sigterm_mid_write_is_one_line_exit_143_and_leaves_no_file(a_run: Path,
                                                                     tmp_path: Path) -> None:
    """A SIGTERM (a kill, Slurm's scancel or time limit) ended the export without a word; now it
    stops as a Ctrl-C does, its temporary file removed."""
    out = tmp_path / "model.onnx"
    worker = str(Path(__file__).with_name("export_stop_worker.py"))  # a slow write
    res = interrupt_when([sys.executable, worker, "--checkpoint", str(a_run), "--out", str(out)],
                         "writing", sig=signal.SIGTERM, timeout=60)
    assert res.returncode == 143, res.stderr[-3000:]
    assert res.stderr.splitlines()[-1] == (f"trainer.export: terminated (SIGTERM); {out} is left "
                                           "as it was"), res.stderr[-3000:]
    assert "Traceback" not in res.stderr, res.stderr[-3000:]
    assert list(tmp_path.iterdir()) == []  # (no model.onnx, no temporary file)
