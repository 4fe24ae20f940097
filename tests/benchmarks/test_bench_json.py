"""Every benchmark's JSON says what a later reader needs to compare two runs: when, from which
commit, every setting (defaults included), the machine and package versions, and a unit for
every figure of its rows (not the figures themselves: speed is measured, not asserted)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest

from benchmarks import loader, prepare, train
from dataio.fixtures import ALIGNED_P2, ALIGNED_P98, aligned_tile, write_dataset

KEYS = {"benchmark", "created", "commit", "settings", "machine", "versions", "units", "rows"}


def check(js: dict[str, Any], flags: list[str]) -> None:
    assert set(js) >= KEYS
    # every flag of the command, given or defaulted, under its argparse name
    assert {f.lstrip("-").replace("-", "_") for f in flags} <= set(js["settings"])
    assert js["versions"]["torch"] and js["versions"]["numpy"] and "cuda" in js["versions"]
    assert js["machine"]["cores"] >= 1 and js["machine"]["memory_bytes"] > 0
    assert "gpu" in js["machine"] and "gpus" in js["machine"]
    assert js["created"][:2] == "20" and (js["commit"] is None or len(js["commit"]) >= 40)
    units = js["units"]
    for row in js["rows"]:
        for key, value in row.items():
            if isinstance(value, float):  # a figure: its unit is named
                assert key in units or (key.endswith("_ms") and "*_ms" in units), key


def test_prepare(tmp_path: Path) -> None:
    out = tmp_path / "prepare.json"
    assert prepare.main(["--tiles", "2", "--workers", "1", "--json", str(out)]) == 0
    check(json.loads(out.read_text()), ["--tiles", "--workers", "--json"])


@pytest.fixture
def data(tmp_path: Path) -> Path:
    tiles = [(f"AOI_9_Test_img{i}", *aligned_tile(40, 48, i)) for i in range(6)]
    return write_dataset(tmp_path / "data", {"train": tiles}, shard_size=3, p2=ALIGNED_P2,
                         p98=ALIGNED_P98)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_loader(tmp_path: Path, data: Path) -> None:
    out = tmp_path / "loader.json"
    assert loader.main(["--data", str(data), "--rounds", "1", "--epochs", "1", "--batch-size",
                        "3", "--crop", "32", "--workers", "1", "--step-ms", "1",
                        "--json", str(out)]) == 0
    js = json.loads(out.read_text())
    check(js, ["--data", "--rounds", "--epochs", "--batch-size", "--crop", "--workers",
               "--step-ms", "--json"])
    assert js["settings"]["data"] == str(data)
    for row in js["step_waits"]:
        assert all(k in js["units"] for k, v in row.items() if isinstance(v, float))


def test_train(tmp_path: Path, data: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The parent's JSON (its torchrun workers are stood in for: each writes its row)."""
    def worker(cmd: list[str], **kw: Any) -> subprocess.CompletedProcess:
        row = {"samples_per_s": 10.0, "step_ms": 800.0, "data_wait_ms": 1.0, "fwd_bwd_ms": 2.0,
               "comm_ms": 0.0, "optimizer_ms": 1.0, "device": "cpu", "precision": "fp32",
               "threads": 1}
        Path(cmd[cmd.index("--out") + 1]).write_text(json.dumps(row))
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(train, "run_to_end", worker)
    out = tmp_path / "train.json"
    assert train.main(["--data", str(data), "--steps", "2", "--warmup", "0", "--nproc", "1",
                       "--json", str(out)]) == 0
    js = json.loads(out.read_text())
    check(js, ["--data", "--config", "--steps", "--warmup", "--nproc", "--json"])
    assert not {"worker", "backend", "amp", "out"} & set(js["settings"])  # the workers' flags


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_postproc(postproc_bench: tuple[dict[str, Any], str]) -> None:
    js, _ = postproc_bench  # (--tiles 2 --repeat 1 --workers 1 --json, run once in conftest)
    check(js, ["--tiles", "--repeat", "--workers", "--json"])
    for stage in js["stages"]:
        assert all(k in js["units"] for k, v in stage.items() if isinstance(v, float))
