"""benchmarks.train's variants: which config each timed process trains with."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from benchmarks.train import overrides
from trainer.config import load_config


def _fake_variant(cmd: list[str], **kw: object) -> subprocess.CompletedProcess:
    """Stands in for each variant's torchrun: the row its worker would write to ``--out``."""
    from benchmarks import train

    row = {"samples_per_s": 10.0, "step_ms": 800.0, "device": "cpu", "precision": "fp32",
           **{f"{p}_ms": 1.0 for p in train.PHASES}, "threads": 1}
    Path(cmd[cmd.index("--out") + 1]).write_text(json.dumps(row))
    return subprocess.CompletedProcess(cmd, 0, "", "")


def test_a_gpu_variant_keeps_the_configs_loader_threads() -> None:
    """One DALI thread per process is the 2-core CPU setting; on a GPU machine it left the mask
    decode exposed as data wait, so there the config's own thread count is timed."""
    config = Path("configs/unet_baseline.toml")
    cpu = load_config(config, overrides("torch", "bf16", cuda=False))
    gpu = load_config(config, overrides("dali", "fp16", cuda=True))
    assert cpu.data.num_threads == 1 and gpu.data.num_threads == 4
    assert (cpu.data.backend, cpu.train.amp) == ("torch", "bf16")
    assert (gpu.data.backend, gpu.train.amp) == ("dali", "fp16")


def test_the_table_says_over_how_many_steps_each_row_was_timed(
        tmp_path: Path, monkeypatch, capsys) -> None:
    """Emulated bf16 is timed over 3 steps whatever --steps says; the table did not show it
    (and RESULTS.md said 20 for every row)."""

    from benchmarks import train
    from dataio.fixtures import ALIGNED_P2, ALIGNED_P98, aligned_tile, write_dataset

    tiles = [(f"AOI_9_Test_img{i}", *aligned_tile(40, 48, i)) for i in range(3)]
    data = write_dataset(tmp_path / "data", {"train": tiles}, p2=ALIGNED_P2, p98=ALIGNED_P98)
    monkeypatch.setattr(train, "run_to_end", _fake_variant)
    monkeypatch.setattr("trainer.amp.cpu_has_native_bf16", lambda: False)
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    assert train.main(["--data", str(data), "--steps", "7", "--nproc", "1"]) == 0
    lines = capsys.readouterr().out.splitlines()
    table = lines[lines.index(next(x for x in lines if x.startswith("variant"))):]
    assert table[0].split()[:3] == ["variant", "precision", "steps"]
    steps = {" ".join(line.split()[:3]): line.split()[4] for line in table[2:]}
    assert steps == {"1x dali amp=off": "7", "1x dali amp=bf16": "3", "1x torch amp=off": "7"}


def test_the_json_says_which_imagery_and_product_with_data_is_refused(
        mul_dataset: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    import json

    import pytest

    from benchmarks import train

    monkeypatch.setattr(train, "run_to_end", _fake_variant)
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    out = tmp_path / "train.json"
    assert train.main(["--data", str(mul_dataset), "--steps", "1", "--nproc", "1",
                       "--json", str(out)]) == 0
    assert json.loads(out.read_text())["imagery"] == {"product": "MUL-PanSharpen", "bands": 8}
    assert "train benchmark: MUL-PanSharpen (8 bands)" in capsys.readouterr().out
    with pytest.raises(SystemExit) as stop:
        train.main(["--data", str(mul_dataset), "--product", "MUL-PanSharpen"])
    assert stop.value.code == 2


# (gloo's text when a peer is killed mid-collective: a plain RuntimeError)
GLOO_RESET = ("[/__w/pytorch/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:537] Read error "
              "[127.0.0.1]:59054: Connection reset by peer. This is typically caused by a remote "
              "worker hanging or bugs in the application. Check the logs of the remote worker "
              "before reporting an error. GLHF!")


def test_a_lost_peer_in_a_timed_process_is_one_line_and_exit_1(tmp_path: Path, monkeypatch,
                                                                capsys) -> None:
    """A variant's process whose peer is killed (its collective fails with gloo's text) said
    gloo's raw text in a traceback; now trainer.train's line for it (dist.describe_failure) and
    exit code 1, a failure to rerun. A bug keeps its traceback."""
    from benchmarks import train
    from benchmarks.common import run

    for var in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "TORCHELASTIC_RUN_ID"):
        monkeypatch.delenv(var, raising=False)

    def lost(*args: object) -> None:
        raise RuntimeError(GLOO_RESET)

    monkeypatch.setattr(train, "_time_steps", lost)
    argv = ["--worker", "--data", str(tmp_path), "--out", str(tmp_path / "row.json")]
    assert run("train", lambda: train.main(argv)) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(
        "python -m benchmarks.train: error: rank 0: a peer rank left the process group "
        "(killed, out of memory, or its node lost) or the collective failed: RuntimeError: "
        "[/__w/pytorch/pytorch/third_party/gloo/"), err
    assert err[0].endswith("else rerun the benchmark (the peer's own log says why it stopped)")

    def bug(*args: object) -> None:
        raise RuntimeError("a bug")

    monkeypatch.setattr(train, "_time_steps", bug)
    with pytest.raises(RuntimeError, match="a bug"):
        run("train", lambda: train.main(argv))
