"""Run by test_cli: ``polygonize_ctrl_c_worker.py POLYGONIZE-ARGS...``: the real
``postproc.polygonize`` command (its imports, stage and top level) whose chunks of tiles (in this
process with ``--workers 1``; in the pool's forked workers, which inherit the patch, with more)
each say ``chunk`` on stdout and then take a while, so that a Ctrl-C (or a SIGTERM) finds it
writing GeoJSON into its stage."""

from __future__ import annotations

import os
import sys
import time

from postproc import polygonize, runner
from postproc.cli import exit_on_error

CHUNK_SECONDS = 0.5
_real = runner._tiles_to_rows


def _slow(*args: object) -> tuple[list[list[str]], int]:
    os.write(sys.stdout.fileno(), b"chunk\n")  # (unbuffered: the test waits for it)
    time.sleep(CHUNK_SECONDS)
    return _real(*args)


runner._tiles_to_rows = _slow

if __name__ == "__main__":
    sys.exit(exit_on_error(lambda: polygonize.main(sys.argv[1:])))
