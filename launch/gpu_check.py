"""``make gpu-check``: every GPU test and the loader, training and postprocessing benchmarks on
the GPU(s) of this machine, writing JSON into OUT. Without CUDA it says so and exits non-zero.

    python -m launch.gpu_check [--out gpu-check]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.proctree import kill_tree
from dataio.atomic import atomic_write_text

SUMMARY = "summary.json"


def _run(name: str, cmd: list[str], timeout: float) -> dict:
    """Run one step; past ``timeout`` kill its whole tree (returncode 124), so a stuck torchrun
    worker cannot hold the GPU while the next step is timed."""
    print(f"== {name}: {' '.join(cmd)}", flush=True)
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd)
    try:
        rc = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_tree(proc.pid)
        proc.wait()
        rc = 124
    except BaseException:  # Ctrl-C: take the step's workers down too
        kill_tree(proc.pid)
        proc.wait()
        raise
    return {"name": name, "returncode": rc, "seconds": round(time.perf_counter() - t0, 1)}


def _steps(out: Path, nproc: int) -> list[tuple[str, list[str], float, Path]]:
    """(name, command, budget in seconds, the file it writes) of every step."""
    py = sys.executable
    # NOTE: budgets (540 s in all) keep the whole check inside one 10-minute device call, with
    # the start-up to spare; the summary is rewritten after each step in case it is cut anyway.
    # On an H200 (RESULTS, fourth lease) the tests took 142 s (69 of them the SIGTERM test's
    # four torchruns), the loader 94, postproc 42; train compiles each of its four variants
    # (~20 s each) and took 161 s on 8 bands.
    return [
        ("gpu tests", [py, "-m", "pytest", "-m", "gpu", "-q", "--junitxml",
                       str(out / "gpu-tests.xml")], 180, out / "gpu-tests.xml"),
        ("loader", [py, "-m", "benchmarks.loader", "--json", str(out / "loader.json")], 110,
         out / "loader.json"),
        ("train", [py, "-m", "benchmarks.train", "--config", "configs/unet_baseline.toml",
                   "--steps", "20", "--nproc", str(nproc), "--json", str(out / "train.json")],
         190, out / "train.json"),
        ("postproc", [py, "-m", "benchmarks.postproc", "--json", str(out / "postproc.json")],
         60, out / "postproc.json"),
    ]


def clear_outputs(out: Path, steps: list[tuple[str, list[str], float, Path]]) -> None:
    """Remove an earlier check's results from ``out`` (only this tool's own file names), so a
    step that fails or times out this time leaves no stale result beside the new summary."""
    for path in (out / SUMMARY, *(step[3] for step in steps)):
        path.unlink(missing_ok=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m launch.gpu_check", description=__doc__)
    p.add_argument("--out", type=Path, default=Path("gpu-check"))
    args = p.parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        print("gpu-check: no CUDA device on this machine (torch.cuda.is_available() is False); "
              "run it where a GPU and a CUDA build of torch are installed", file=sys.stderr)
        return 1
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    steps = _steps(out, len(gpus))
    clear_outputs(out, steps)
    results: list[dict] = []
    summary = {"gpus": gpus, "cuda": torch.version.cuda, "torch": torch.__version__,
               "steps": results, "ok": False, "done": False,
               "env": {k: os.environ[k] for k in ("CUDA_VISIBLE_DEVICES",) if k in os.environ}}
    atomic_write_text(out / SUMMARY, json.dumps(summary, indent=2) + "\n")  # cut in step 1
    for name, cmd, timeout, _ in steps:
        results.append(_run(name, cmd, timeout))
        summary["done"] = len(results) == len(steps)
        summary["ok"] = summary["done"] and all(r["returncode"] == 0 for r in results)
        atomic_write_text(out / SUMMARY, json.dumps(summary, indent=2) + "\n")
    for r in results:
        print(f"{r['name']:<10} {'ok' if r['returncode'] == 0 else 'FAILED':<7} {r['seconds']}s")
    return 0 if summary["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
