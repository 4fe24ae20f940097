"""Run under torchrun by test_distributed: rank 0's checkpoint write fails (a full disk) at the
end of the first epoch, then the real trainer.train runs."""

from __future__ import annotations

import errno
import os
import sys

from trainer import checkpoint
from trainer.train import main

if os.environ.get("RANK") == "0":
    def _full(state, path):  # type: ignore[no-untyped-def]
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    checkpoint.save = _full

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
