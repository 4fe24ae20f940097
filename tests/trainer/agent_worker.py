"""Run under torchrun by test_distributed: ``agent_worker.py OUTDIR [init|score]``: start a child
process, write their pids to OUTDIR/<rank>.child and OUTDIR/<rank>.pid, then wait, as a worker
busy for minutes would.

``init`` (the default) waits after joining the process group (``trainer.dist.init``). ``score``
runs the real ``postproc.score`` on OUTDIR/s.csv, which scores its share before it joins the
group: the wait stands in for that scoring.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from trainer import dist


def report_and_wait(*_: Any, **__: Any) -> None:
    out, rank = Path(sys.argv[1]), os.environ["RANK"]
    # a child of the worker, as its worker pools are: it must not outlive the worker either
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    (out / f"{rank}.child").write_text(str(child.pid))
    (out / f"{rank}.tmp").write_text(str(os.getpid()))
    (out / f"{rank}.tmp").rename(out / f"{rank}.pid")
    time.sleep(120)  # the test kills the agent long before this ends


if __name__ == "__main__":
    mode = sys.argv[2] if len(sys.argv) > 2 else "init"
    if mode == "init":
        dist.init(dist.DistEnv.from_env())
        report_and_wait()
    else:
        from postproc import score

        score.score_parallel = report_and_wait
        csv = str(Path(sys.argv[1]) / "s.csv")
        score.main(["--truth", csv, "--proposals", csv, "--workers", "1"])
