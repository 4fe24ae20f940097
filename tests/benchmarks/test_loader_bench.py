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
