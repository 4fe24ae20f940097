"""dataio.atomic: a reader sees the old file or the new one, never a torn one, and a killed
writer's temporary file does not outlive the next write of its path."""

from __future__ import annotations

from pathlib import Path

import pytest

from dataio.atomic import atomic_open, atomic_write_text


def test_an_error_keeps_the_old_file_and_leaves_no_temp(tmp_path: Path) -> None:
    path = tmp_path / "out.csv"
    atomic_write_text(path, "old\n")
    with pytest.raises(RuntimeError), atomic_open(path, "w") as f:
        f.write("half of the new")
        raise RuntimeError("the writer failed")
    assert path.read_text() == "old\n" and sorted(p.name for p in tmp_path.iterdir()) == ["out.csv"]


def test_a_killed_writers_temp_goes_with_the_next_write_of_its_path(tmp_path: Path) -> None:
    # what SIGKILL leaves (no cleanup ran), for this path and for others
    killed = [tmp_path / ".out.csv.k3j_x9a1.tmp", tmp_path / ".out.csv.0qz8w2mm.tmp"]
    others = [tmp_path / ".other.csv.k3j_x9a1.tmp", tmp_path / "out.csv.tmp",
              tmp_path / ".out.csvx.abc.tmp", tmp_path / "notes.txt"]
    for p in killed + others:
        p.write_text("partial")
    (tmp_path / ".out.csv.dir.tmp").mkdir()  # not a file of ours: left alone
    atomic_write_text(tmp_path / "out.csv", "new\n")
    assert (tmp_path / "out.csv").read_text() == "new\n"
    assert not any(p.exists() for p in killed)
    assert all(p.read_text() == "partial" for p in others)
    assert (tmp_path / ".out.csv.dir.tmp").is_dir()
