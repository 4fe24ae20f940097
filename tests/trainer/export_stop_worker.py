"""Run by test_export: ``export_stop_worker.py EXPORT-ARGS...``: the real ``trainer.export``
command (its imports, export and top level) whose ONNX write says ``writing`` on stdout with half
the file in its temporary file, then takes a while, so that a signal finds it mid-write."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

from dataio.atomic import atomic_open
from trainer import export

WRITE_SECONDS = 60.0


def _slow_write(path: Path, data: bytes) -> None:
    with atomic_open(path, "wb") as f:
        f.write(data[:len(data) // 2])
        f.flush()
        os.write(sys.stdout.fileno(), b"writing\n")  # (unbuffered: the test waits for it)
        time.sleep(WRITE_SECONDS)
        f.write(data[len(data) // 2:])


export.atomic_write_bytes = _slow_write  # type: ignore[assignment]

if __name__ == "__main__":
    sys.exit(export.main())
