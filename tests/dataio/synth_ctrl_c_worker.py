"""Run by test_synth: ``synth_ctrl_c_worker.py SYNTH-ARGS...``: the real ``dataio.synth`` command
(its imports, pool and top level). Each tile says ``tile N`` (its index) on stdout when it starts
and then takes a while (``TILE_SECONDS``), so that a Ctrl-C finds the workers busy."""

from __future__ import annotations

import os
import sys
import time

from dataio import synth

TILE_SECONDS = 0.5
_real = synth.make_tile


def _slow(cfg: synth.SynthConfig, i: int) -> dict:
    # (unbuffered, one write: the test waits for it, and two workers write)
    os.write(sys.stdout.fileno(), f"tile {i}\n".encode())
    time.sleep(TILE_SECONDS)
    return _real(cfg, i)


synth.make_tile = _slow  # (forked workers find it in this module)

if __name__ == "__main__":
    sys.exit(synth.main())
