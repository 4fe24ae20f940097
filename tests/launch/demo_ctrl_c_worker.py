"""Run by test_demo: ``demo_ctrl_c_worker.py DEMO-ARGS...``: the real ``launch.demo`` command (its
top level, its stage runner) with one stand-in stage, a command of its own that says ``stage
running`` on stdout and, stopped by Ctrl-C, takes a second to clean up (as a stage with torch
loaded takes to exit), then writes OUT/cleaned-up, says so in one line and exits 130."""

from __future__ import annotations

import sys

import launch.demo as demo

STAGE = """
import os, pathlib, sys, time
try:
    os.write(sys.stdout.fileno(), b"stage" + b" running\\n")  # (not the printed command)
    time.sleep(60)
except KeyboardInterrupt:
    time.sleep(1.0)
    (pathlib.Path(sys.argv[1]) / "cleaned-up").touch()
    sys.stderr.write("stage: interrupted\\n")
    sys.exit(130)
"""


class _OneStage(demo.Demo):
    def stages(self) -> list[tuple[str, list[str]]]:
        return [("synth", [sys.executable, "-c", STAGE, str(self.out)])]


demo.Demo = _OneStage

if __name__ == "__main__":
    sys.exit(demo.main(sys.argv[1:]))
