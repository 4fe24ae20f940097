"""Run in a process of its own by test_init_from: how much memory train.init_from's two reads
of the source checkpoint take (trainer.train's pre-group check, on every rank, and the
Trainer's load, on rank 0), as the rise of the peak resident set over each.

    init_from_memory_worker.py DATA RUN SOURCE

Prints one JSON line: {"check_exit", "check_mib", "load_mib", "loaded"}.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from trainer import checkpoint as ckpt
from trainer.config import load_config
from trainer.dist import DistEnv
from trainer.train import main
from trainer.trainer import Trainer

MIB = 1024 * 1024


def _rss(field: str) -> int:
    with open("/proc/self/status", encoding="ascii") as f:
        line = next(line for line in f if line.startswith(field + ":"))
    return int(line.split()[1]) * 1024


def peak_rise(fn: Callable[[], Any]) -> tuple[Any, float]:
    """``fn()`` and how far the peak resident set rose above the resident set before it (MiB).

    NOTE: the peak is reset first (Linux's clear_refs "5"), so that an earlier peak (imports,
    the Trainer's construction) does not hide this one."""
    with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
        f.write("5")
    before = _rss("VmRSS")
    result = fn()
    return result, (_rss("VmHWM") - before) / MIB


def measure(data: Path, run_dir: Path, source: Path) -> dict[str, Any]:
    argv = ["--check", "--config", "configs/tiny.toml", "--data", str(data),
            "--run-dir", str(run_dir), "--set", "train.val_every=0"]
    main(argv)  # (once without init_from: the imports and the checks' own memory)
    check_exit, check_mib = peak_rise(lambda: main([*argv, "--set",
                                                    f"train.init_from={source}"]))
    cfg = load_config(Path("configs/tiny.toml"), ["train.val_every=0", "data.num_threads=1",
                                                  f"train.init_from={source}"])
    t = Trainer(cfg, DistEnv(), data, run_dir, device=torch.device("cpu"))
    try:
        _, load_mib = peak_rise(t.init_weights)
    finally:
        t.train_loader.close()
    want = ckpt.load(source)["model"]
    got = t.net.state_dict()
    return {"check_exit": check_exit, "check_mib": check_mib, "load_mib": load_mib,
            "loaded": all(torch.equal(got[k], want[k]) for k in want)}


if __name__ == "__main__":
    print(json.dumps(measure(Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]))))
