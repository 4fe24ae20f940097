"""Run by test_cli: ``ctrl_c_worker.py SCORE-ARGS...``: the real ``postproc.score`` command (its
imports, pool and top level), with one image per chunk and chunks that take a while, so that a
Ctrl-C finds the pool busy. Each worker says ``worker PID running`` on stdout when it starts its
first chunk: its initializer, which sets Ctrl-C aside, has run by then."""

from __future__ import annotations

import os
import sys
import time

from postproc import score
from postproc.cli import exit_on_error

CHUNK_SECONDS = 0.5
_real_chunk = score._score_chunk
_announced = False


def _slow_chunk(ids: list[str]) -> score.ScoreResult:
    global _announced
    if not _announced:  # (per worker: each is a forked copy)
        _announced = True
        # one write of a whole line: the two workers' prints came out interleaved
        os.write(sys.stdout.fileno(), f"worker {os.getpid()} running\n".encode())
    time.sleep(CHUNK_SECONDS)
    return _real_chunk(ids)


score._score_chunk = _slow_chunk  # forked workers find it in this __main__
score.CHUNK_IMAGES = 1

if __name__ == "__main__":
    sys.exit(exit_on_error(lambda: score.main(sys.argv[1:])))
