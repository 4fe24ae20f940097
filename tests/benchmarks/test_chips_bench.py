"""benchmarks.chips: its rows land in the JSON, the whole scene agrees with itself, and the
agreement it measures can fail: a net whose receptive field lies within the margin matches the
whole scene at the chip edges with that margin, and not without one (not the figures of a
trained U-Net: those are measured, not asserted)."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from benchmarks import chips as bench
from benchmarks.common import run
from dataio.chips import Chip
from models import registry
from trainer.checkpoint import FORMAT
from trainer.config import load_config

NET = "bench_chips_conv2"  # two 3x3 convolutions: a pixel sees 2 px around it


def _conv2(in_channels: int, num_classes: int, width_divisor: int = 1, pad_mode: str = "zeros",
           norm: str = "batch") -> nn.Module:
    """(the options a registered model takes; a plain net of two zero-padded convolutions)"""
    return nn.Sequential(nn.Conv2d(in_channels, 8, 3, padding=1), nn.ReLU(),
                         nn.Conv2d(8, num_classes, 3, padding=1))


def _run_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A run directory of the conv net, untrained (seeded), as trainer.predict reads one: its
    config.json and checkpoints/best.pt with the training percentiles.

    NOTE: the net is registered for the calling test alone. Registered at import, it was in the
    registry when tests/models collected theirs, which run every registered model: 25 of them
    failed on a net that is no U-Net."""
    monkeypatch.setitem(registry._REGISTRY, NET, _conv2)
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints").mkdir(parents=True)
    cfg = load_config(Path("configs/tiny.toml"), [f"model.name={NET}", "data.num_threads=1"])
    (run_dir / "config.json").write_text(cfg.to_json())
    torch.manual_seed(0)
    net = _conv2(3, 3)
    with torch.no_grad():  # (strong weights: zero padding at a chip edge then shows)
        for p in net.parameters():
            p.mul_(3)
    torch.save({"format": FORMAT, "model": net.state_dict(), "config": cfg.to_json(),
                "percentiles": {"p2": [100.0] * 3, "p98": [1500.0] * 3}},
               run_dir / "checkpoints" / "best.pt")
    return run_dir


def test_edge_distance_counts_from_the_edges_between_chips_only():
    chips = [Chip(0, 0, 4, 4), Chip(0, 4, 4, 6), Chip(4, 0, 3, 4), Chip(4, 4, 3, 6)]
    d = bench.edge_distance(7, 10, chips)
    assert d[3].tolist() == d[4].tolist() == [0] * 10  # the rows either side of the cut at 4
    assert d[0].tolist() == [3, 2, 1, 0, 0, 1, 2, 3, 3, 3]  # (row 0: 3 px above the cut)
    assert d[6, 9] == 2 and d[0, 0] == 3  # the scene's own border is no chip edge
    assert (bench.edge_distance(5, 5, [Chip(0, 0, 5, 5)]) > 1000).all()


@pytest.mark.timeout(120)
def test_rows_json_and_the_margin_matches_the_whole_scene(tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch):
    monkeypatch.chdir(Path(__file__).resolve().parents[2])
    out = tmp_path / "chips.json"
    run_dir = _run_dir(tmp_path, monkeypatch)
    bench.main(["--run-dir", str(run_dir), "--scene-px", "192", "--chip-size", "64",
                "--margins", "0,16", "--repeat", "1", "--json", str(out)])
    js = json.loads(out.read_text())
    assert js["benchmark"] == "chips" and js["chip_px"] == 64
    whole, m0, m16 = js["rows"]
    assert [r["variant"] for r in js["rows"]] == [bench.WHOLE, bench.chip_variant(64, 0),
                                                  bench.chip_variant(64, 16)]
    assert (whole["samples"], m0["samples"], m16["samples"]) == (1, 9, 9)
    # 3 x 3 chips of 64 px: with 16 px of margin, the inner ones' samples are 96 px
    assert whole["px_ratio"] == m0["px_ratio"] == 1.0
    assert m16["px_predicted"] == (64 + 16 + 64 + 32 + 64 + 16) ** 2
    for r in js["rows"]:
        assert r["predict_s"] > 0 and r["truth"] == whole["truth"]
        assert sum(r[f"px_{bench.bin_name(*b)}"] for b in bench.BINS) == 192 * 192
        assert all(k in js["units"] for k, v in r.items() if isinstance(v, float))
    # the reference agrees with itself everywhere
    bins = [bench.bin_name(*b) for b in bench.BINS[:3]]  # (no pixel is >= 64 px from an edge)
    assert all(whole[f"dp_{b}"] == whole[f"flip_{b}"] == 0 for b in bins)
    assert whole["f1_whole"] == 1.0 and whole["footprints"] > 0
    # a receptive field of 2 px: with 16 px of margin a chip edge is predicted as in the whole
    # scene (up to float rounding of the 8-bit shards); without, the zeros beyond it show there,
    # and 8 px or more from an edge both match
    assert m16["dp_0_8"] < 1e-3 and m16["flip_0_8"] < 1e-3
    assert m0["dp_0_8"] > 20 * max(m16["dp_0_8"], 1e-4)
    assert m0["dp_8_32"] < 1e-3 and m0["flip_8_32"] < 1e-3
    assert m16["f1_whole"] >= m0["f1_whole"]
    assert js["bins_px"] == [[0, 8], [8, 32], [32, 64], [64, None]]
    assert math.isclose(m16["px_ratio"], m16["px_predicted"] / 192 ** 2)


@pytest.mark.parametrize("kind", ["missing", "no checkpoint"])
def test_a_run_dir_without_its_checkpoint_is_one_line(kind: str, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str],
                                                     monkeypatch: pytest.MonkeyPatch):
    def started(*_a, **_k):
        raise AssertionError("the benchmark started its work")

    monkeypatch.setattr(bench, "bench", started)
    run_dir = tmp_path / "run"
    if kind == "no checkpoint":
        (run_dir / "checkpoints").mkdir(parents=True)
    assert run("chips", lambda: bench.main(["--run-dir", str(run_dir)])) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("python -m benchmarks.chips: error: --run-dir ")
    assert str(run_dir) in err[0] and "best.pt" in err[0]


def test_ctrl_c_that_a_command_caught_is_the_benchmarks_one_line(
        capsys: pytest.CaptureFixture[str]):
    """trainer.predict (run in this process) catches Ctrl-C itself and returns 130: the
    benchmark took that for a failure, a RuntimeError traceback and exit 1."""
    def interrupted(argv: list[str]) -> int:
        print("trainer.predict: interrupted", file=sys.stderr)  # (its line, kept with the rest)
        return 130

    assert run("chips", lambda: bench._quiet(interrupted, [], "trainer.predict")) == 130
    assert capsys.readouterr().err == "python -m benchmarks.chips: interrupted\n"
