"""postproc.curves.read_log: a crash's torn last line is skipped; any other bad line is named."""

from __future__ import annotations

from pathlib import Path

import pytest

from postproc.curves import read_log

E1, E2 = '{"epoch": 1, "train_loss": 1.0}', '{"epoch": 2, "train_loss": 0.5}'


def test_a_torn_last_line_is_skipped(tmp_path: Path) -> None:
    log = tmp_path / "log.jsonl"
    log.write_text(f'{E1}\n{E2}\n{{"epoch": 3, "train_lo')  # killed mid-write: no newline
    assert [r["epoch"] for r in read_log(log)] == [1, 2]
    log.write_text('{"epoch": 1, "tra')  # only a torn line: nothing logged yet
    with pytest.raises(ValueError, match="no epochs logged"):
        read_log(log)


@pytest.mark.parametrize("text, line", [
    (f'{E1}\n{{"epoch": \n{E2}\n', 2),  # a bad line in the middle
    (f'{E1}\n{{"epoch": \n{E2}\n{{"epoch": 3, "tr', 2),  # ... even with a torn tail
    (f'{E1}\n{{"epoch": \n', 2),  # a complete (newline-ended) bad last line is no tear
    (f'{E1}\n{{"loss": 1}}\n', 2),  # parses, but no epoch
    (f'{E1}\n{{"epoch": Infinity}}\n', 2),  # (an OverflowError escaped)
    (f'{E1}\n{{"epoch": true}}\n', 2),  # (it replaced epoch 1's record)
    (f'{E1}\n{{"epoch": 2.7}}\n', 2),  # (read as epoch 2)
    (f'{E1}\n[1, 2]\n', 2),  # JSON, not a record
])
def test_a_bad_line_names_file_and_line(tmp_path: Path, text: str, line: int) -> None:
    log = tmp_path / "log.jsonl"
    log.write_text(text)
    with pytest.raises(ValueError, match=rf"log\.jsonl:{line}: not an epoch record"):
        read_log(log)


def test_a_repeated_epoch_keeps_its_last_record(tmp_path: Path) -> None:
    log = tmp_path / "log.jsonl"
    log.write_text(f'{E1}\n{{"epoch": 1, "train_loss": 0.9}}\n{E2}\n')
    assert [(r["epoch"], r["train_loss"]) for r in read_log(log)] == [(1, 0.9), (2, 0.5)]


def test_repair_skips_every_bad_line() -> None:
    """The trainer cleans its own log at start: bad lines anywhere go, whole epochs stay."""
    from postproc.curves import parse_log

    text = f'{E1}\n{{"epoch": Infinity}}\n{{"epoch": true}}\nnot json\n{E2}\n{{"epoch": 3, "tr'
    assert [r["epoch"] for r in parse_log(text, "log.jsonl", repair=True)] == [1, 2]
