"""Run under torchrun by test_cli: ``csv_fail_worker.py POLYGONIZE-ARGS...``: rank 0's writes
of the proposal CSV fail (a full disk), then the real ``postproc.polygonize`` runs. ``CSV_FAIL``
says which writes: ``rows`` (the default) or ``header`` (the file's creation)."""

from __future__ import annotations

import errno
import os
import sys

from postproc import polygonize, runner
from postproc.cli import exit_on_error

if os.environ.get("RANK") == "0":
    real = runner.write_rows
    fail_header = os.environ.get("CSV_FAIL", "rows") == "header"

    def _full(f, rows, header=False):  # type: ignore[no-untyped-def]
        if header if fail_header else rows:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(f, rows, header=header)

    runner.write_rows = _full

if __name__ == "__main__":
    sys.exit(exit_on_error(lambda: polygonize.main(sys.argv[1:])))
