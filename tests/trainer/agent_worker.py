"""Run under torchrun by test_distributed: ``agent_worker.py OUTDIR``: join the process group
(``trainer.dist.init``), write this worker's pid to OUTDIR/<rank>.pid, then wait."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

from trainer import dist

if __name__ == "__main__":
    env = dist.init(dist.DistEnv.from_env())
    out = Path(sys.argv[1])
    (out / f"{env.rank}.tmp").write_text(str(os.getpid()))
    (out / f"{env.rank}.tmp").rename(out / f"{env.rank}.pid")
    time.sleep(120)  # the test kills the agent long before this ends
