"""Run by test_bad_input: ``ctrl_c_worker.py PREPARE-ARGS...``: the real ``dataio.prepare``
command (its imports, pool, stage and top level). Each tile says ``tile`` on stdout and then
takes a while (``TILE_SECONDS``); a spawned pool worker says ``worker starting`` while it imports
this file (the import that takes seconds in a real worker: torch) and takes ``START_SECONDS``,
so that a Ctrl-C finds it busy."""

from __future__ import annotations

import os
import sys
import time
from typing import Any

from dataio import prepare

TILE_SECONDS, START_SECONDS = 0.5, 2.0


def _say(what: str) -> None:
    os.write(sys.stdout.fileno(), f"{what}\n".encode())  # (unbuffered: the test waits for it)


_real = prepare.process_tile


def _slow(*args: Any) -> dict[str, Any]:
    _say("tile")
    time.sleep(TILE_SECONDS)
    return _real(*args)


prepare.process_tile = _slow  # (spawned workers import this file too, as __mp_main__)

if __name__ == "__mp_main__":
    _say("worker starting")
    time.sleep(START_SECONDS)

if __name__ == "__main__":
    sys.exit(prepare.main())
