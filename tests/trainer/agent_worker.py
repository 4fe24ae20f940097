"""Run under torchrun by test_distributed: ``agent_worker.py OUTDIR``: join the process group
(``trainer.dist.init``), start a child process, write their pids to OUTDIR/<rank>.child and
OUTDIR/<rank>.pid, then wait."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from trainer import dist

if __name__ == "__main__":
    env = dist.init(dist.DistEnv.from_env())
    out = Path(sys.argv[1])
    # a child of the worker, as its worker pools are: it must not outlive the worker either
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    (out / f"{env.rank}.child").write_text(str(child.pid))
    (out / f"{env.rank}.tmp").write_text(str(os.getpid()))
    (out / f"{env.rank}.tmp").rename(out / f"{env.rank}.pid")
    time.sleep(120)  # the test kills the agent long before this ends
