"""Run under torchrun by test_distributed: ``data_worker.py SPLIT/SHARD ARGS...``: rank 1 leaves
out that shard, which the others accept (as a node-local copy of --data that differs would),
then the real ``trainer.train ARGS...`` runs. ``data_worker.py data=OTHER ARGS...``: rank 1
reads the dataset OTHER instead of --data."""

from __future__ import annotations

import os
import sys

from dataio import sharding
from trainer.train import main

DROP = sys.argv.pop(1) if __name__ == "__main__" else ""

if os.environ.get("RANK") == "1" and DROP.startswith("data="):
    sys.argv[sys.argv.index("--data") + 1] = DROP.removeprefix("data=")
elif os.environ.get("RANK") == "1":
    real = sharding.check_shard

    def _missing_one(directory, info):  # type: ignore[no-untyped-def]
        if f"{directory.name}/{info['name']}" == DROP:
            return f"{directory / info['name']}: missing (this node's copy)"
        return real(directory, info)

    sharding.check_shard = _missing_one

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
