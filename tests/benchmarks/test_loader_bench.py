"""benchmarks.loader's wait table: the DALI loader read ahead and read in DALI's callback."""

from __future__ import annotations

from pathlib import Path

from benchmarks.loader import step_waits
from dataio.fixtures import ALIGNED_P2, ALIGNED_P98, aligned_tile, write_dataset
from dataio.loader import LoaderConfig


def test_step_waits_times_both_ways_of_reading(tmp_path: Path) -> None:
    tiles = [(f"AOI_9_Test_img{i}", *aligned_tile(40, 48, i)) for i in range(7)]
    data = write_dataset(tmp_path, {"train": tiles}, shard_size=3, p2=ALIGNED_P2, p98=ALIGNED_P98)
    cfg = LoaderConfig(batch_size=3, crop_size=32, num_threads=1, read_ahead=3)
    rows = step_waits(data, cfg, step_ms=2.0, rounds=2, epochs=1)
    assert [(r["device"], r["read_ahead"]) for r in rows] == [("cpu", 0), ("cpu", 3)]
    assert all(r["wait_ms_per_batch"] >= r["wait_ms_best"] > 0 and r["step_ms"] == 2.0
               for r in rows)
    assert rows[0]["wait_vs_callback"] == 1.0
    ahead, callback = rows[1]["wait_ms_per_batch"], rows[0]["wait_ms_per_batch"]
    assert rows[1]["wait_vs_callback"] == ahead / callback


def test_rounds_too_short_for_the_cpu_clock_give_no_cpu_figures() -> None:
    """/proc counts CPU time in 10 ms ticks: a short round measured 0 s of CPU, and its
    cpu_ms_per_sample of 0 was then divided by (a ZeroDivisionError after the whole run)."""
    from benchmarks import loader

    variants = [({"name": name, "mode": "decode"}, None) for name in ("dali-cpu", "torch")]
    tick = 1 / loader._TICK
    short = [[(8, 0.02, 0.0)], [(8, 0.04, tick)]]
    rows = loader.cpu_rows(variants, short, mb=1.0)
    assert [r["samples_per_s"] for r in rows] == [400.0, 200.0]
    assert rows[0]["speedup_vs_torch"] == 2.0
    assert all(r["cpu_ms_per_sample"] is None and r["cores_used"] is None
               and r["cpu_ratio_vs_torch"] is None for r in rows)
    long = [[(80, 2.0, 50 * tick)], [(80, 4.0, 100 * tick)]]
    rows = loader.cpu_rows(variants, long, mb=1.0)
    assert rows[0]["cpu_ratio_vs_torch"] == 2.0 and rows[1]["cpu_ratio_vs_torch"] == 1.0


def test_a_small_dataset_gives_a_table_and_json(tmp_path: Path) -> None:
    import json

    from benchmarks import loader

    tiles = [(f"AOI_9_Test_img{i}", *aligned_tile(40, 48, i)) for i in range(6)]
    data = write_dataset(tmp_path / "data", {"train": tiles}, shard_size=3, p2=ALIGNED_P2,
                         p98=ALIGNED_P98)
    out = tmp_path / "loader.json"
    assert loader.main(["--data", str(data), "--rounds", "1", "--epochs", "1", "--batch-size",
                        "3", "--crop", "32", "--workers", "1", "--step-ms", "0",
                        "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert {(r["name"], r["mode"]) for r in rows} == {
        (n, m) for n in ("dali-cpu", "torch", "webdataset") for m in ("decode", "train-aug")}
    for r in rows:
        assert r["samples_per_s"] > 0 and r["speedup_vs_torch"] > 0
        assert r["cpu_ms_per_sample"] is None or r["cpu_ms_per_sample"] > 0


def test_the_json_says_which_imagery_and_8_bands_are_read(mul_dataset: Path,
                                                          tmp_path: Path) -> None:
    """An 8-band MUL-PanSharpen dataset is read by every variant (the webdataset reference
    too), and the JSON says so: its samples are 2.7x an RGB one's bytes."""
    import json

    from benchmarks import loader

    out = tmp_path / "loader.json"
    assert loader.main(["--data", str(mul_dataset), "--rounds", "1", "--epochs", "1",
                        "--batch-size", "3", "--crop", "32", "--workers", "1", "--step-ms", "0",
                        "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["imagery"] == {"product": "MUL-PanSharpen", "bands": 8}
    assert len(result["rows"]) == 6 and all(r["samples_per_s"] > 0 for r in result["rows"])


def test_product_makes_the_synthetic_dataset_and_is_refused_with_data(
        small_dataset: Path, tmp_path: Path, capsys) -> None:
    import pytest

    from benchmarks import loader
    from dataio.manifest import load_manifest

    data = loader.make_dataset(tmp_path, tiles=1, product="MUL-PanSharpen")
    assert (load_manifest(data).product, load_manifest(data).bands) == ("MUL-PanSharpen", 8)
    with pytest.raises(SystemExit) as stop:
        loader.main(["--data", str(small_dataset), "--product", "MUL-PanSharpen"])
    assert stop.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].endswith(
        f"--product makes the synthetic dataset; --data {small_dataset} is prepared already "
        "(its manifest says its product)")
