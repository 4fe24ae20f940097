"""Run under torchrun by test_distributed: ``teardown_worker.py OUT TRAIN_ARGS...`` runs
trainer.train's main, then writes the threads this process still has (their OS names) to
OUT/threads-RANK.json: what would run on into the interpreter's exit."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from threads import settled_thread_names

from trainer import train


def main(out: Path, argv: list[str]) -> int:
    rc = train.main(argv)
    (out / f"threads-{os.environ['RANK']}.json").write_text(json.dumps(settled_thread_names()))
    return rc


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1]), sys.argv[2:]))
