"""A torchrun worker for the two-node restart test (argument: an output directory).

Node A's first worker dies once the group is up. Node B's first worker is busy without
collectives meanwhile (as in a long validation, or a rank stuck in an NCCL collective), so
B's agent restarts it for the returning member without counting a restart: A's new worker is
attempt 1 and B's is attempt 0, and ``trainer.dist.init`` must still form one group.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import torch.distributed as dist

from trainer import dist as tdist


def main(out: Path) -> None:
    node, attempt = os.environ["NODE"], int(os.environ["TORCHELASTIC_RESTART_COUNT"])
    tdist.init(None, "gloo", timeout_s=30)
    if attempt == 0 and node == "A":
        time.sleep(1)
        os._exit(1)
    busy = out / "B-was-busy"
    if node == "B" and not busy.exists():  # B's first worker only (its next is attempt 0 too)
        busy.touch()
        time.sleep(120)  # its agent stops it when A's agent asks for a new round
    dist.barrier()
    (out / f"{node}-{attempt}.ok").write_text(str(dist.get_world_size()))
    tdist.teardown()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
