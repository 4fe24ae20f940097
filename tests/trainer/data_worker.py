"""Run under torchrun by test_distributed: rank 1 leaves out a shard the others accept (as a
node-local copy of --data that differs would), then trains with the real trainer.train."""

from __future__ import annotations

import os
import sys

from dataio import sharding
from trainer.train import main

if os.environ.get("RANK") == "1":
    real = sharding.check_shard

    def _missing_one(directory, info):  # type: ignore[no-untyped-def]
        if info["name"] == "shard-000001.tar":
            return f"{directory / info['name']}: missing (this node's copy)"
        return real(directory, info)

    sharding.check_shard = _missing_one

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
