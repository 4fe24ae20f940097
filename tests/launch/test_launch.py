"""The launch scripts: usage on bad calls, the torchrun command and environment they hand over,
and make gpu-check refusing without CUDA."""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from proc_helpers import NOBODY, SETPRIV, as_nobody, free_port, nobody_scratch

import launch.gpu_check as gc
from launch.gpu_check import _run as gpu_check_step
from launch.gpu_check import main as gpu_check
from launch.port_check import main as port_check

LAUNCH = Path(__file__).resolve().parents[2] / "launch"


@pytest.mark.parametrize("script", ["launch/single_node.sh", "launch/multi_node.sh",
                                    "launch/slurm.sbatch"])
def test_scripts_print_their_usage_without_arguments(script: str) -> None:
    """(slurm.sbatch said "$1: unbound variable"; the others printed their `set` line too)"""
    res = subprocess.run(["bash", script], capture_output=True, text=True, timeout=30)
    assert res.returncode == 2
    assert "CONFIG DATA RUN" in res.stdout
    assert "set -euo" not in res.stdout and "#SBATCH --" not in res.stdout


def test_multi_node_needs_a_rendezvous_host() -> None:
    env = {"PATH": "/usr/bin:/bin"}
    res = subprocess.run(["bash", "launch/multi_node.sh", "c", "d", "r"], capture_output=True,
                         text=True, timeout=30, env=env)
    # (one line and exit 2, as every other setting the script refuses; it was bash's
    # "launch/multi_node.sh: line 21: MASTER_ADDR: ..." and exit 1)
    assert res.returncode == 2, res.stderr
    assert res.stderr.startswith("error: MASTER_ADDR is not set") and res.stderr.count("\n") == 1


def test_slurm_batch_file_is_valid_bash() -> None:
    assert subprocess.run(["bash", "-n", "launch/slurm.sbatch"], timeout=30).returncode == 0


def _recorder(path: Path) -> Path:
    """An executable that writes its arguments and environment to ``path.with_suffix('.out')``
    instead of running torchrun (or srun)."""
    out = path.with_suffix(".out")
    path.write_text(f'#!/usr/bin/env bash\n{{ printf "%s\\n" "$@"; echo ---; env; }} > {out}\n')
    path.chmod(0o755)
    return out


def _recorded(out: Path) -> tuple[list[str], dict[str, str]]:
    args, _, env = out.read_text().partition("---\n")
    return args.splitlines(), dict(line.split("=", 1) for line in env.splitlines() if "=" in line)


def _python(tmp_path: Path, gpus: int = 0) -> Path:
    """A Python whose torch sees ``gpus`` devices (``-c``) and whose ``trainer.train --check``
    passes, recording its arguments to python.out: the torchrun command is tested, not the
    config (see test_a_bad_config_is_one_line_before_torchrun)."""
    python = tmp_path / "python"
    python.write_text(f'#!/usr/bin/env bash\n[ "$1" = -c ] && {{ echo {gpus}; exit; }}\n'
                      f'printf "%s\\n" "$@" > {tmp_path / "python.out"}\n')
    python.chmod(0o755)
    return python


def test_multi_node_hands_torchrun_c10d_and_a_fresh_store_per_round(tmp_path: Path) -> None:
    out = _recorder(tmp_path / "torchrun")
    env = {"PATH": os.environ["PATH"], "MASTER_ADDR": "head", "NNODES": "2:4", "NPROC": "3",
           "TORCHRUN": str(tmp_path / "torchrun"), "PYTHON": str(_python(tmp_path))}
    # started from another directory: the paths are the caller's (see the single-node test)
    res = subprocess.run(["bash", str(LAUNCH / "multi_node.sh"), "cfg.toml", "/data/DATA", "RUN",
                          "--set", "train.epochs=3"], capture_output=True, text=True, timeout=30,
                         env=env, cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    args, got = _recorded(out)
    assert {"--nnodes=2:4", "--nproc_per_node=3", "--rdzv-backend=c10d",
            "--rdzv-endpoint=head:29400"} <= set(args)
    assert args[-10:] == ["-m", "trainer.train", "--config", f"{tmp_path}/cfg.toml", "--data",
                          "/data/DATA", "--run-dir", f"{tmp_path}/RUN", "--set", "train.epochs=3"]
    # every node gives each rendezvous round a fresh store: no agreed restart count needed
    assert got["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"] == "1"


def _multi_node_check(tmp_path: Path, nnodes: str) -> list[str]:
    """The arguments of the one ``trainer.train --check`` that multi_node.sh runs with
    ``NNODES=nnodes`` (python and torchrun recorded, not run)."""
    _recorder(tmp_path / "torchrun")
    python = tmp_path / "python"
    python.write_text(f'#!/usr/bin/env bash\n[ "$1" = -c ] && {{ echo 0; exit; }}\n'
                      f'echo "$*" >> {tmp_path / "python.log"}\n')
    python.chmod(0o755)
    env = {"PATH": os.environ["PATH"], "TORCHRUN": str(tmp_path / "torchrun"), "NPROC": "2",
           "PYTHON": str(python), "MASTER_ADDR": "head", "NNODES": nnodes}
    res = subprocess.run(["bash", str(LAUNCH / "multi_node.sh"), "cfg.toml", "DATA", "RUN"],
                         capture_output=True, text=True, timeout=30, env=env, cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    check = [line.split() for line in (tmp_path / "python.log").read_text().splitlines()
             if "--check" in line.split()]
    assert len(check) == 1, check
    return check[0]


@pytest.mark.parametrize(("nnodes", "elastic"), [("2", False), ("2:4", True)])
def test_multi_node_checks_the_run_lock_unless_a_node_may_join_late(
        tmp_path: Path, nnodes: str, elastic: bool) -> None:
    """--check refuses a RUN whose lock a trainer holds; a late node of an elastic job finds the
    lock held by that job's own rank 0, so its --check must not be refused for it."""
    assert ("--elastic" in _multi_node_check(tmp_path, nnodes)) == elastic


@pytest.mark.parametrize(("nnodes", "several"), [("1", False), ("2", True), ("1:3", True)])
def test_multi_node_tells_the_check_when_rank_0_may_start_on_another_node(
        tmp_path: Path, nnodes: str, several: bool) -> None:
    """Every node gets the same --set metrics.address (one node's cluster address): the other
    nodes' --check must leave it to that node (--multi-node), where rank 0 serves it."""
    assert ("--multi-node" in _multi_node_check(tmp_path, nnodes)) == several


@pytest.mark.parametrize("script", ["launch/single_node.sh", "launch/multi_node.sh"])
@pytest.mark.parametrize(("gpus", "nproc"), [(3, 3), (0, 2)])
def test_a_node_starts_one_process_per_gpu_torch_sees(tmp_path: Path, script: str, gpus: int,
                                                      nproc: int) -> None:
    """(`nvidia-smi -L` counted MIG lines and ignored CUDA_VISIBLE_DEVICES)"""
    out = _recorder(tmp_path / "torchrun")
    env = {"PATH": os.environ["PATH"], "TORCHRUN": str(tmp_path / "torchrun"),
           "PYTHON": str(_python(tmp_path, gpus)), "MASTER_ADDR": "head"}
    res = subprocess.run(["bash", script, "cfg.toml", "DATA", "RUN"],
                         capture_output=True, text=True, timeout=30, env=env)
    assert res.returncode == 0, res.stderr
    args, got = _recorded(out)
    assert f"--nproc_per_node={nproc}" in args
    assert got["OMP_NUM_THREADS"] == "1"  # one thread per process unless the user sets it


def _checking_python(path: Path) -> Path:
    """This Python at ``path``, its ``trainer.train --check`` passing: the port check is real."""
    path.write_text(f'#!/usr/bin/env bash\n[ "$2" = trainer.train ] && exit 0\n'
                    f'PYTHONPATH={LAUNCH.parent} exec {sys.executable} "$@"\n')
    path.chmod(0o755)
    return path


def _slurm_job(tmp_path: Path, extra: dict[str, str] | None = None,
               argv: list[str] | None = None, on_this_host: bool = False,
               **slurm: str | None) -> tuple[list[str], dict[str, str]]:
    """The command and environment of slurm.sbatch as Slurm would run it on a two-node
    allocation: ``srun`` recorded to srun.out, not run; ``scontrol`` gives the node list and
    appends each call to scontrol.log. Arguments as for :func:`_slurm`."""
    _recorder(tmp_path / "srun")
    head = "127.0.0.1" if on_this_host else "gpu07"
    (tmp_path / "scontrol").write_text(
        f'#!/usr/bin/env bash\necho "$*" >> {tmp_path / "scontrol.log"}\n'
        f"[ \"$1\" = show ] && printf '{head}\\ngpu08\\n'\n"
        f'[ "$1" = requeue ] && exit "${{FAKE_REQUEUE_STATUS:-0}}"\nexit 0\n')
    (tmp_path / "scontrol").chmod(0o755)
    (tmp_path / ".venv" / "bin").mkdir(parents=True, exist_ok=True)  # its --check passes
    (tmp_path / ".venv" / "bin" / "torchrun").touch(mode=0o755)  # (srun, recorded, runs none)
    python = tmp_path / ".venv" / "bin" / "python"
    if on_this_host:
        _checking_python(python)
    else:
        _python(tmp_path).rename(python)
    env = {"SLURM_JOB_NODELIST": "gpu[07-08]", "SLURM_NNODES": "2", "SLURM_GPUS_ON_NODE": "4",
           "SLURM_CPUS_PER_TASK": "32", "SLURM_JOB_ID": "4242",
           "SLURM_SUBMIT_DIR": str(tmp_path)}
    env.update({f"SLURM_{k.upper()}": v for k, v in slurm.items()})
    env = {k: v for k, v in env.items() if v is not None}
    env["PATH"] = f"{tmp_path}:{os.environ['PATH']}"
    env.update(extra or {})
    return ["bash", str(LAUNCH / "slurm.sbatch"), *(argv or ["cfg.toml", "DATA", "RUN"])], env


def _slurm(tmp_path: Path, extra: dict[str, str] | None = None, argv: list[str] | None = None,
           on_this_host: bool = False, **slurm: str | None) -> subprocess.CompletedProcess[str]:
    """Run slurm.sbatch as Slurm would on a two-node allocation (``srun`` recorded, not run);
    ``slurm`` overrides SLURM_* variables, None leaves one unset; ``extra`` adds variables;
    ``argv`` replaces CONFIG DATA RUN; ``on_this_host`` makes the first node 127.0.0.1 and
    checks its rendezvous port for real."""
    cmd, env = _slurm_job(tmp_path, extra, argv, on_this_host, **slurm)
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60, env=env)


def test_slurm_runs_one_torchrun_per_node_against_the_first_node(tmp_path: Path) -> None:
    res = _slurm(tmp_path)
    assert res.returncode == 0, res.stderr
    args, got = _recorded(tmp_path / "srun.out")
    assert {"--nnodes=2", "--nproc_per_node=4", "--rdzv-backend=c10d",
            "--rdzv-endpoint=gpu07:19242", "--rdzv-id=4242"} <= set(args)
    assert got["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"] == "1" and got["OMP_NUM_THREADS"] == "8"
    # srun takes no --cpus-per-task from sbatch since Slurm 22.05: without it torchrun and its 4
    # workers (8 threads each) were bound to one core
    # one task a node whatever the job's task count (SLURM_NTASKS, which srun takes as its own)
    assert args[:args.index(".venv/bin/torchrun")] == [
        "--kill-on-bad-exit=0", "--ntasks=2", "--ntasks-per-node=1", "--cpus-per-task=32"]


@pytest.mark.parametrize(("nnodes", "several"), [("1", False), ("2", True)])
def test_slurm_tells_the_check_when_rank_0_may_start_on_another_node(
        tmp_path: Path, nnodes: str, several: bool) -> None:
    """--check runs on the batch host alone, and rank 0 may start on another node (torchrun
    ranks the nodes by host name, not by the node list): a metrics.address that is that node's
    must not stop the job there (--multi-node, as multi_node.sh)."""
    cmd, env = _slurm_job(tmp_path, nnodes=nnodes)
    python = tmp_path / ".venv" / "bin" / "python"
    python.write_text(f'#!/usr/bin/env bash\n[ "$1" = -c ] && {{ echo 0; exit; }}\n'
                      f'echo "$*" >> {tmp_path / "python.log"}\n')
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=60, env=env)
    assert res.returncode == 0, res.stderr
    check = [line.split() for line in (tmp_path / "python.log").read_text().splitlines()
             if "--check" in line.split()]
    assert len(check) == 1 and ("--multi-node" in check[0]) == several, check


def test_slurm_starts_one_torchrun_a_node_in_a_job_of_a_task_a_gpu(tmp_path: Path) -> None:
    """#SBATCH --ntasks-per-node=4 (a task a GPU, as Lightning and srun-launched scripts want
    it): srun took the job's 8 tasks and started 4 torchruns, each of 4 workers, on a node. With
    --cpus-per-task=8 the node's one torchrun then got one task's 8 CPUs, not the node's 32."""
    res = _slurm(tmp_path, ntasks="8", ntasks_per_node="4", cpus_per_task="8")
    assert res.returncode == 0, res.stderr
    args, got = _recorded(tmp_path / "srun.out")
    assert {"--ntasks=2", "--ntasks-per-node=1", "--nproc_per_node=4",
            "--cpus-per-task=32"} <= set(args)
    assert got["OMP_NUM_THREADS"] == "8"  # (32 CPUs for 4 workers)


@pytest.mark.parametrize("var", ["job_id", "job_nodelist", "nnodes"])
def test_slurm_outside_a_job_names_what_is_missing(tmp_path: Path, var: str) -> None:
    """(``bash launch/slurm.sbatch ...``: bash's "SLURM_JOB_NODELIST: unbound variable", exit 1)"""
    res = _slurm(tmp_path, **{var: None})
    assert res.returncode == 2 and not (tmp_path / "srun.out").exists()
    assert res.stderr.startswith(f"error: SLURM_{var.upper()} is not set: this file runs as a "
                                 "Slurm batch job")
    assert res.stderr.count("\n") == 1


def test_slurm_submitted_from_outside_the_checkout_says_so(tmp_path: Path) -> None:
    """sbatch runs a spooled copy: the checkout is the submit directory, and from another one
    the job died of ".venv/bin/python: No such file or directory", exit 127."""
    elsewhere = tmp_path / "home"
    elsewhere.mkdir()
    res = _slurm(tmp_path, submit_dir=str(elsewhere))
    assert res.returncode == 2 and not (tmp_path / "srun.out").exists()
    assert res.stderr.splitlines() == [
        f"error: no .venv/bin/python and .venv/bin/torchrun in {elsewhere} (SLURM_SUBMIT_DIR): "
        "submit the job from the repository root, after make setup"]


def test_slurm_gives_each_worker_at_least_one_thread(tmp_path: Path) -> None:
    """2 CPUs for 4 GPUs made OMP_NUM_THREADS=0, which OpenMP does not take as one thread."""
    res = _slurm(tmp_path, cpus_per_task="2")
    assert res.returncode == 0, res.stderr
    assert _recorded(tmp_path / "srun.out")[1]["OMP_NUM_THREADS"] == "1"


@pytest.mark.parametrize(("var", "value", "flag"), [
    ("gpus_on_node", "0", "--gpus-per-node"), ("gpus_on_node", None, "--gpus-per-node"),
    ("cpus_per_task", None, "--cpus-per-task")])
def test_slurm_without_gpus_or_cpus_names_the_setting(tmp_path: Path, var: str,
                                                      value: str | None, flag: str) -> None:
    """0 GPUs died in bash's "division by 0"; no GPUs asked for (the variable unset) started 4
    workers anyway, and no CPUs asked for gave srun no --cpus-per-task (one core for all)."""
    res = _slurm(tmp_path, **{var: value})
    assert res.returncode == 2 and not (tmp_path / "srun.out").exists()
    assert f"SLURM_{var.upper()}={value or ''}:" in res.stderr and flag in res.stderr


def test_single_node_hands_torchrun_the_whole_command(tmp_path: Path) -> None:
    """Started from another directory, relative paths are the caller's: the script runs torchrun
    from the repository root, where "RUN" became a run directory inside the checkout and "DATA"
    the checkout's data/ (the caller's was not read)."""
    out = _recorder(tmp_path / "torchrun")
    env = {"PATH": os.environ["PATH"], "TORCHRUN": str(tmp_path / "torchrun"), "NPROC": "2",
           "PYTHON": str(_python(tmp_path))}
    res = subprocess.run(["bash", str(LAUNCH / "single_node.sh"), "cfg.toml", "/data/DATA",
                          "runs/my run", "--set", "train.epochs=3"], capture_output=True,
                         text=True, timeout=30, env=env, cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    args, got = _recorded(out)
    assert args == ["--standalone", "--nproc_per_node=2", "--max-restarts=3", "-m",
                    "trainer.train", "--config", f"{tmp_path}/cfg.toml", "--data", "/data/DATA",
                    "--run-dir", f"{tmp_path}/runs/my run", "--set", "train.epochs=3"]
    assert got["OMP_NUM_THREADS"] == "1"  # not every core per process
    # the workers' checks made once before, on the same command, with the processes per node
    assert (tmp_path / "python.out").read_text().splitlines() == [
        "-m", "trainer.train", "--check", "--nproc", "2", *args[args.index("trainer.train") + 1:]]


@pytest.mark.parametrize("script", ["single_node.sh", "multi_node.sh"])
def test_a_relative_init_from_is_the_callers_too(tmp_path: Path, script: str) -> None:
    """train.init_from is a path as RUN is: run from the repository root, "runs/vegas" named the
    checkout's (a missing source, or another run of that name), not the caller's."""
    out = _recorder(tmp_path / "torchrun")
    env = {"PATH": os.environ["PATH"], "TORCHRUN": str(tmp_path / "torchrun"), "NPROC": "2",
           "PYTHON": str(_python(tmp_path)), "MASTER_ADDR": "head"}
    given = ["--set", "train.init_from=runs/vegas", "--set=train.init_from='my run/best.pt'",
             "--set", 'train.init_from="b.pt"', "--set", "train.init_from=/abs/run",
             "--set", "train.init_from=~/run", "--set", "train.init_from=", "--set",
             "train.epochs=3"]
    res = subprocess.run(["bash", str(LAUNCH / script), "cfg.toml", "DATA", "RUN", *given],
                         capture_output=True, text=True, timeout=30, env=env, cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    want = ["--set", f"train.init_from={tmp_path}/runs/vegas",
            f"--set=train.init_from={tmp_path}/my run/best.pt", "--set",
            f"train.init_from={tmp_path}/b.pt", *given[5:]]
    args = _recorded(out)[0]
    assert args[-len(want):] == want
    if script == "single_node.sh":  # (multi_node's last Python is its port check)
        # --check, before torchrun, checks the same source
        assert (tmp_path / "python.out").read_text().splitlines()[-len(want):] == want


@pytest.mark.parametrize("word", ["cpu", "gpu", "auto"])
def test_torchruns_own_nproc_words_pass_through_unchecked(tmp_path: Path, word: str) -> None:
    """NPROC=cpu|gpu|auto is torchrun's to count: --check gets no --nproc (an empty array, which
    the scripts expand so that bash before 4.4 does not call it unbound under set -u)."""
    out = _recorder(tmp_path / "torchrun")
    env = {"PATH": os.environ["PATH"], "TORCHRUN": str(tmp_path / "torchrun"), "NPROC": word,
           "PYTHON": str(_python(tmp_path, gpus=2))}
    res = subprocess.run(["bash", str(LAUNCH / "single_node.sh"), "cfg.toml", "DATA", "RUN"],
                         capture_output=True, text=True, timeout=30, env=env, cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert f"--nproc_per_node={word}" in _recorded(out)[0]
    assert (tmp_path / "python.out").read_text().splitlines()[:4] == [
        "-m", "trainer.train", "--check", "--config"]


@pytest.mark.parametrize("script", ["single_node.sh", "multi_node.sh"])
def test_nproc_gpu_where_torch_sees_none_is_one_line_before_torchrun(tmp_path: Path,
                                                                     script: str) -> None:
    """(torchrun's own "ValueError: Cuda is not available." traceback, exit 1)"""
    out = _recorder(tmp_path / "torchrun")
    python = _python(tmp_path, gpus=0)
    env = {"PATH": os.environ["PATH"], "TORCHRUN": str(tmp_path / "torchrun"), "NPROC": "gpu",
           "PYTHON": str(python), "MASTER_ADDR": "head"}
    res = subprocess.run(["bash", str(LAUNCH / script), "cfg.toml", "DATA", "RUN"],
                         capture_output=True, text=True, timeout=30, env=env, cwd=tmp_path)
    assert res.returncode == 2 and not out.exists()
    assert res.stderr.splitlines() == [
        f"error: NPROC=gpu: {python}'s torch sees no CUDA device here: give a number of "
        "processes (gloo on the CPU), or run on a GPU node"]


def _sees_gpus(tmp_path: Path, gpus: int) -> dict[str, str]:
    """The environment in which the real Python's torch sees ``gpus`` CUDA devices and NCCL (a
    sitecustomize on PYTHONPATH), for the launch scripts' real ``trainer.train --check``."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(
        "import torch\nimport torch.distributed\n"
        f"torch.cuda.is_available = lambda: True\ntorch.cuda.device_count = lambda: {gpus}\n"
        "torch.distributed.is_nccl_available = lambda: True\n")
    return {"PYTHONPATH": str(site)}


@pytest.mark.parametrize(("script", "nproc"), [("single_node.sh", 8), ("multi_node.sh", 8),
                                               ("single_node.sh", 4)])
def test_more_processes_than_gpus_is_one_line_before_torchrun(tmp_path: Path, script: str,
                                                               nproc: int,
                                                               small_dataset: Path) -> None:
    """NPROC=8 on a 4-GPU node passed the --check, and every worker refused in dist.init:
    torchrun restarted the group 3 times, printing the error each time, then its
    ChildFailedError traceback and exit 1."""
    data = small_dataset  # (--check reads its manifest)
    started = _recorder(tmp_path / "torchrun")
    env = {"PATH": os.environ["PATH"], "TORCHRUN": str(tmp_path / "torchrun"),
           "NPROC": str(nproc), "MASTER_ADDR": "head", **_sees_gpus(tmp_path, 4)}
    res = subprocess.run(["bash", f"launch/{script}", "configs/tiny.toml", str(data),
                          str(tmp_path / "RUN")], capture_output=True, text=True, timeout=60,
                         env=env)
    if nproc <= 4:  # the fake works: as many as the GPUs start
        assert res.returncode == 0, res.stderr
        assert f"--nproc_per_node={nproc}" in _recorded(started)[0]
        return
    assert res.returncode == 2 and not started.exists()
    assert res.stderr.splitlines() == [
        "trainer.train: error: 8 processes on this node but 4 CUDA device(s) visible: NCCL needs "
        "one GPU per process; start at most 4 (NPROC=4), or hide the GPUs "
        "(CUDA_VISIBLE_DEVICES=) to run on the CPU with gloo"]


def test_multi_node_runs_of_one_job_share_a_rendezvous_id(tmp_path: Path) -> None:
    """(without --rdzv-id torchrun takes "none": two jobs on one host and port would join
    each other's rendezvous)"""
    out = _recorder(tmp_path / "torchrun")
    env = {"PATH": os.environ["PATH"], "MASTER_ADDR": "head", "NPROC": "1",
           "TORCHRUN": str(tmp_path / "torchrun"), "PYTHON": str(_python(tmp_path))}
    for extra, want in (({}, {"--nnodes=2", "--rdzv-id=footprints", "--max-restarts=3",
                              "--rdzv-endpoint=head:29400"}),
                        ({"RDZV_ID": "job7", "MASTER_PORT": "29500", "MAX_RESTARTS": "0"},
                         {"--rdzv-id=job7", "--rdzv-endpoint=head:29500", "--max-restarts=0"})):
        res = subprocess.run(["bash", "launch/multi_node.sh", "c", "d", "r"], capture_output=True,
                             text=True, timeout=30, env={**env, **extra})
        assert res.returncode == 0, res.stderr
        assert want <= set(_recorded(out)[0])


# NOTE: the port check's wait for an answer, for the tests whose listener never gives one (they
# waited out the default 3 s each); a real store answers at once and keeps the default.
NO_ANSWER_WAIT = {"PORT_CHECK_TIMEOUT_S": "0.5"}


def _multi_node_at(tmp_path: Path, port: int, extra: dict[str, str] | None = None,
                   prefix: tuple[str, ...] = ()) -> subprocess.CompletedProcess[str]:
    """multi_node.sh with its rendezvous at 127.0.0.1:``port`` and the real port check (its
    config check passes; torchrun is recorded to torchrun.out, not run); ``extra`` adds
    variables; ``prefix`` comes before its command (setpriv, say)."""
    _recorder(tmp_path / "torchrun")
    env = {"PATH": os.environ["PATH"], "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
           "NNODES": "1", "NPROC": "1", "OMP_NUM_THREADS": "1",
           "TORCHRUN": str(tmp_path / "torchrun"),
           "PYTHON": str(_checking_python(tmp_path / "python")), **(extra or {})}
    return subprocess.run([*prefix, "bash", "launch/multi_node.sh", "c", "d", "r"],
                          capture_output=True, text=True, timeout=60, env=env)


@pytest.mark.parametrize("closes", [False, True])
def test_multi_node_names_a_port_held_by_something_else(tmp_path: Path, closes: bool) -> None:
    """torchrun's agent, finding MASTER_PORT taken, joined it as a rendezvous store client:
    behind a plain listening socket its handshake waited for ever, saying nothing; a listener
    that closed each connection failed it after a minute of C++ tracebacks."""
    stop = threading.Event()

    def close_each(server: socket.socket) -> None:
        server.settimeout(0.1)
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                server.accept()[0].close()

    with socket.create_server(("127.0.0.1", 0)) as server:
        port = server.getsockname()[1]
        closer = threading.Thread(target=close_each, args=(server,), daemon=True)
        if closes:
            closer.start()
        try:
            res = _multi_node_at(tmp_path, port, NO_ANSWER_WAIT)
        finally:
            stop.set()
            if closes:
                closer.join()
    assert res.returncode == 2 and not (tmp_path / "torchrun.out").exists()
    assert res.stderr.startswith(f"error: MASTER_ADDR:MASTER_PORT=127.0.0.1:{port}: the port "
                                 "is held by something that is not a torch rendezvous store")
    assert res.stderr.count("\n") == 1, res.stderr  # one line: no C++ warnings


@pytest.mark.parametrize("store", [True, False])
def test_multi_node_goes_on_to_torchrun_at_a_store_or_a_free_port(tmp_path: Path,
                                                                  store: bool) -> None:
    """Several agents of one job on one host (the two-node tests): the later ones find the port
    held, by the first one's store, and go on to torchrun; so does the first, finding it free."""
    held = torch.distributed.TCPStore("127.0.0.1", 0, is_master=True,
                                      timeout=datetime.timedelta(seconds=30)) if store else None
    port = held.port if held else free_port()
    res = _multi_node_at(tmp_path, port)
    assert res.returncode == 0, res.stderr
    assert f"--rdzv-endpoint=127.0.0.1:{port}" in _recorded(tmp_path / "torchrun.out")[0]


def test_slurm_names_a_rendezvous_port_held_by_something_else(tmp_path: Path) -> None:
    """(the batch step runs on the first node, which hosts the store: checked there)"""
    with socket.create_server(("127.0.0.1", 0)) as server:
        port = server.getsockname()[1]
        res = _slurm(tmp_path, extra={"MASTER_PORT": str(port), **NO_ANSWER_WAIT},
                     on_this_host=True)
    assert res.returncode == 2 and not (tmp_path / "srun.out").exists()
    assert res.stderr.startswith(f"error: MASTER_ADDR:MASTER_PORT=127.0.0.1:{port}: the port "
                                 "is held by something that is not a torch rendezvous store")


def _privileged_port() -> int:
    """The highest privileged port (1023 by default); skips where there is none (Docker sets
    ``ip_unprivileged_port_start`` to 0)."""
    import launch.port_check as pc

    try:
        start = int(Path(pc.UNPRIVILEGED).read_text())
    except (OSError, ValueError):
        start = 1024
    if start < 2:
        pytest.skip(f"no privileged port here ({pc.UNPRIVILEGED} is {start})")
    return start - 1


def _without_bind_permission(port: int) -> tuple[str, ...]:
    """A command prefix that runs without the right to bind ``port`` as a non-root user does:
    root drops CAP_NET_BIND_SERVICE (setpriv; files stay readable, unlike as nobody), another
    user has none. Skips where the process could still bind it."""
    prefix: tuple[str, ...] = ()
    if os.geteuid() == 0:
        if SETPRIV is None:
            pytest.skip("needs setpriv to run root without CAP_NET_BIND_SERVICE")
        prefix = (SETPRIV, "--bounding-set=-net_bind_service", "--inh-caps=-net_bind_service")
    probe = subprocess.run([*prefix, sys.executable, "-c", "import socket\ntry:\n"
                            f"    socket.socket().bind(('', {port}))\nexcept PermissionError:\n"
                            "    raise SystemExit(3)\nexcept OSError:\n    pass"],
                           capture_output=True, text=True, timeout=30)
    if probe.returncode != 3:
        pytest.skip(f"this process may bind port {port} (or setpriv failed): "
                    f"{probe.stderr.strip()[-200:]}")
    return prefix


def _refused_privileged(res: subprocess.CompletedProcess[str], port: int, uid: int) -> None:
    assert res.returncode == 2, res.stderr
    assert res.stderr.splitlines() == [
        f"error: MASTER_PORT={port}: a port below {port + 1} is privileged and this user (uid "
        f"{uid}) may not bind it: torchrun's rendezvous store could not start there; choose "
        f"one from {port + 1} to 65535 (e.g. 29400)"], res.stderr


@pytest.mark.parametrize("launcher", ["port_check", "multi_node.sh", "slurm.sbatch"])
def test_a_privileged_master_port_is_refused_without_the_right_to_bind_it(
        tmp_path: Path, launcher: str) -> None:
    """A MASTER_PORT below 1024 passed the check for a non-root user (nothing listens there);
    the rendezvous host's agent then could not start its store on it. Run as root without
    CAP_NET_BIND_SERVICE, which a non-root user lacks (see the nobody test below)."""
    port = _privileged_port()
    prefix = _without_bind_permission(port)
    if launcher == "port_check":
        res = subprocess.run([*prefix, sys.executable, "-m", "launch.port_check", "127.0.0.1",
                              str(port)], capture_output=True, text=True, timeout=60,
                             cwd=LAUNCH.parent, env={**os.environ, **NO_ANSWER_WAIT})
    elif launcher == "multi_node.sh":
        res = _multi_node_at(tmp_path, port, NO_ANSWER_WAIT, prefix)
        assert not (tmp_path / "torchrun.out").exists()
    else:
        cmd, env = _slurm_job(tmp_path, {"MASTER_PORT": str(port), **NO_ANSWER_WAIT},
                              on_this_host=True)
        res = subprocess.run([*prefix, *cmd], capture_output=True, text=True, timeout=60,
                             env=env)
        assert not (tmp_path / "srun.out").exists()
    _refused_privileged(res, port, os.geteuid())


def test_a_privileged_master_port_is_refused_for_nobody() -> None:
    """The same as nobody, a non-root account, for real (skipped where nobody cannot run this
    Python, as the other nobody tests are)."""
    port = _privileged_port()
    with nobody_scratch() as base:
        res = as_nobody(["-m", "launch.port_check", "127.0.0.1", str(port)], base / "home",
                        **NO_ANSWER_WAIT)
    _refused_privileged(res, port, NOBODY)


@pytest.mark.parametrize("host", ["no-such-host.invalid", "127.0.0.1:29400"])
def test_multi_node_names_a_rendezvous_host_that_does_not_resolve(tmp_path: Path,
                                                                  host: str) -> None:
    """torchrun took it for a host not up yet: two minutes of C++ warnings, then an 88-line
    RendezvousConnectionError traceback, exit 1. (.invalid never resolves: RFC 2606; the second
    has the port in it.)"""
    res = _multi_node_at(tmp_path, free_port(), {"MASTER_ADDR": host})
    assert res.returncode == 2 and not (tmp_path / "torchrun.out").exists()
    assert res.stderr.startswith(f"error: MASTER_ADDR={host}: the host does not resolve")
    assert res.stderr.count("\n") == 1, res.stderr


def test_a_name_server_that_says_try_again_is_asked_again(monkeypatch: pytest.MonkeyPatch
                                                          ) -> None:
    import launch.port_check as pc

    answers = [socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution")] * 2
    real = socket.getaddrinfo

    def flaky(*args: object, **kwargs: object) -> object:
        if answers:
            raise answers.pop()
        return real(*args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", flaky)
    monkeypatch.setattr(pc.time, "sleep", lambda s: None)
    assert pc.unresolvable("127.0.0.1") is None and not answers
    answers[:] = [socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution")] * 3
    assert "does not resolve (Temporary failure" in pc.unresolvable("127.0.0.1", timeout=0)


@pytest.mark.parametrize("value", ["0", "-1", "soon", "inf", "nan"])
def test_a_bad_port_check_wait_is_named(value: str, monkeypatch: pytest.MonkeyPatch,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("PORT_CHECK_TIMEOUT_S", value)
    with pytest.raises(SystemExit) as e:
        port_check(["127.0.0.1", "1"])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert e.value.code == 2 and f"PORT_CHECK_TIMEOUT_S={value!r}" in err


def test_gpu_check_fits_one_device_call_and_trains_on_every_gpu(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[str, list[str], float]] = []

    def step(name: str, cmd: list[str], timeout: float) -> dict:
        calls.append((name, cmd, timeout))
        return {"name": name, "returncode": 0, "seconds": 0.0}

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i: f"fake GPU {i}")
    monkeypatch.setattr(gc, "_run", step)
    assert gc.main(["--out", str(tmp_path)]) == 0
    assert [name for name, _, _ in calls] == ["gpu tests", "loader", "train", "postproc"]
    # the budgets the NOTE promises: the whole check inside one 10-minute call, with start-up
    assert sum(timeout for _, _, timeout in calls) <= 540
    train = calls[2][1]
    assert train[train.index("--nproc") + 1] == "2"
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["ok"] and summary["done"] and summary["gpus"] == ["fake GPU 0", "fake GPU 1"]


def test_gpu_check_says_so_without_cuda(tmp_path, capsys: pytest.CaptureFixture[str]) -> None:
    assert gpu_check(["--out", str(tmp_path / "g")]) == 1
    assert "no CUDA device" in capsys.readouterr().err
    assert not (tmp_path / "g").exists()


def test_gpu_check_leaves_no_earlier_result_beside_its_summary(tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch
                                                                ) -> None:
    out = tmp_path / "g"
    out.mkdir()
    old = ("gpu-tests.xml", "loader.json", "train.json", "postproc.json", "summary.json")
    for name in old:
        (out / name).write_text("an earlier check's\n")
    (out / "notes.txt").write_text("mine\n")

    def step(name: str, cmd: list[str], timeout: float) -> dict:
        if name == "gpu tests":  # only the first step writes its result; the others fail
            Path(cmd[cmd.index("--junitxml") + 1]).write_text("<testsuites/>\n")
        return {"name": name, "returncode": 0 if name == "gpu tests" else 1, "seconds": 0.0}

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i: "fake GPU")
    monkeypatch.setattr(gc, "_run", step)
    assert gc.main(["--out", str(out)]) == 1
    assert sorted(p.name for p in out.iterdir()) == ["gpu-tests.xml", "notes.txt",
                                                     "summary.json"]
    assert (out / "gpu-tests.xml").read_text() == "<testsuites/>\n"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["gpus"] == ["fake GPU"] and not summary["ok"]


@pytest.mark.parametrize(("cut", "done"), [("train", ["gpu tests", "loader"]),
                                           ("gpu tests", [])])
def test_gpu_check_cut_mid_way_keeps_the_summary_of_the_steps_done(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, cut: str, done: list[str]) -> None:
    """(the summary was written only at the end: a device call's time limit left none)"""
    def step(name: str, cmd: list[str], timeout: float) -> dict:
        if name == cut:
            raise KeyboardInterrupt  # what the real step re-raises after killing its tree
        return {"name": name, "returncode": 0, "seconds": 1.0}

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i: "fake GPU")
    monkeypatch.setattr(gc, "_run", step)
    with pytest.raises(KeyboardInterrupt):
        gc.main(["--out", str(tmp_path)])
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert [s["name"] for s in summary["steps"]] == done
    assert not summary["done"] and not summary["ok"] and summary["gpus"] == ["fake GPU"]


def test_gpu_check_kills_a_step_that_overruns_with_its_children(tmp_path: Path) -> None:
    # a step like torchrun: its worker is a grandchild in a session of its own
    pidfile = tmp_path / "worker.pid"
    worker = "import os, time; os.setsid(); time.sleep(60)"
    step = ("import subprocess, sys, time; "
            f"p = subprocess.Popen([sys.executable, '-c', {worker!r}]); "
            f"open({str(pidfile)!r}, 'w').write(str(p.pid)); p.wait()")
    got = gpu_check_step("stuck", [sys.executable, "-c", step], timeout=3)
    assert got["returncode"] == 124 and got["seconds"] < 30
    pid = int(pidfile.read_text())
    for _ in range(50):  # killed: gone, or a zombie until init reaps it
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except FileNotFoundError:
            break
        if state == "Z":
            break
        time.sleep(0.1)
    else:
        raise AssertionError(f"the step's worker {pid} is still running")


def test_make_setup_with_a_torch_index_runs_after_a_cpu_setup(tmp_path: Path) -> None:
    venv = tmp_path / "venv"

    def dry(*extra: str) -> str:
        return subprocess.run(["make", "-n", "setup", f"VENV={venv}", *extra], capture_output=True,
                              text=True, timeout=30, check=True).stdout

    stamp = next(line.split()[1] for line in dry().splitlines() if line.startswith("touch "))
    venv.mkdir()
    Path(stamp).touch()  # a finished CPU setup
    assert "pip install" not in dry()
    cuda = dry("TORCH_INDEX=https://download.pytorch.org/whl/cu126")
    lines = cuda.splitlines()
    uninstall = next(i for i, line in enumerate(lines)
                     if "pip uninstall --quiet --yes torch" in line)
    install = next(i for i, line in enumerate(lines)
                   if "install --quiet torch==2.13.0 --index-url https://download" in line)
    assert uninstall < install  # pip would keep 2.13.0+cpu as satisfying torch==2.13.0


@pytest.mark.parametrize(("script", "var", "value"), [
    ("single_node.sh", "NPROC", "0"), ("single_node.sh", "NPROC", "four"),
    ("single_node.sh", "MAX_RESTARTS", "-1"), ("multi_node.sh", "NPROC", "-2"),
    ("multi_node.sh", "NNODES", "two"), ("multi_node.sh", "NNODES", "3:2"),
    ("multi_node.sh", "NNODES", "0"), ("multi_node.sh", "MASTER_PORT", "70000"),
    ("multi_node.sh", "MASTER_PORT", "abc")])
def test_a_launch_variable_that_is_no_number_is_named(tmp_path: Path, script: str, var: str,
                                                      value: str) -> None:
    """(torchrun stopped with a traceback: NPROC=0 or MAX_RESTARTS=-1 ended in an
    AssertionError, bare for NPROC, NNODES=two in "invalid literal for int() with base 10")"""
    out = _recorder(tmp_path / "torchrun")
    env = {"PATH": os.environ["PATH"], "TORCHRUN": str(tmp_path / "torchrun"),
           "MASTER_ADDR": "head", "NPROC": "1", var: value}
    res = subprocess.run(["bash", f"launch/{script}", "cfg.toml", "DATA", "RUN"],
                         capture_output=True, text=True, timeout=30, env=env)
    assert res.returncode == 2 and not out.exists()
    assert res.stderr.startswith(f"error: {var}={value}: give ") and res.stderr.count("\n") == 1


def test_torchrun_words_for_the_process_count_pass(tmp_path: Path) -> None:
    out = _recorder(tmp_path / "torchrun")
    env = {"PATH": os.environ["PATH"], "TORCHRUN": str(tmp_path / "torchrun"), "NPROC": "gpu",
           "PYTHON": str(_python(tmp_path, gpus=1))}  # (none: an error, see above)
    res = subprocess.run(["bash", "launch/single_node.sh", "cfg.toml", "DATA", "RUN"],
                         capture_output=True, text=True, timeout=30, env=env)
    assert res.returncode == 0, res.stderr
    assert "--nproc_per_node=gpu" in _recorded(out)[0]


def _endpoint(tmp_path: Path) -> str:
    return next(a for a in _recorded(tmp_path / "srun.out")[0] if a.startswith("--rdzv-endpoint="))


def test_slurm_jobs_sharing_a_first_node_rendezvous_apart(tmp_path: Path) -> None:
    """With one fixed port (29400), a job whose first node was also a running job's could not
    bind it, used that job's c10d store instead, and died when that job ended."""
    endpoints = []
    for job in ("1234567", "1234568", "42"):
        res = _slurm(tmp_path, job_id=job)
        assert res.returncode == 0, res.stderr
        endpoints.append(_endpoint(tmp_path))
    # 15000 + the job id's last 4 digits
    assert endpoints == ["--rdzv-endpoint=gpu07:19567", "--rdzv-endpoint=gpu07:19568",
                         "--rdzv-endpoint=gpu07:15042"]


@pytest.mark.parametrize("port", ["70000", "0", "29400x", "-1"])
def test_slurm_names_a_master_port_that_is_no_port(tmp_path: Path, port: str) -> None:
    """(multi_node.sh checked MASTER_PORT; slurm.sbatch handed 70000 to torchrun)"""
    res = _slurm(tmp_path, extra={"MASTER_PORT": port}, on_this_host=True)
    assert res.returncode == 2 and not (tmp_path / "srun.out").exists()
    assert res.stderr.splitlines() == [f"error: MASTER_PORT={port}: give a whole number from 1 "
                                       "to 65535"]


def test_slurm_takes_a_master_port_given(tmp_path: Path) -> None:
    res = _slurm(tmp_path, extra={"MASTER_PORT": "29999"})
    assert res.returncode == 0, res.stderr
    assert _endpoint(tmp_path) == "--rdzv-endpoint=gpu07:29999"


def test_slurm_asks_for_a_requeue_signal_and_keeps_its_log() -> None:
    """(a job at its 24 h limit was killed, to be noticed and resubmitted by hand; a requeued
    job's %x-%j.out is truncated unless opened for appending)"""
    lines = (LAUNCH / "slurm.sbatch").read_text().splitlines()
    directives = {line.split()[1] for line in lines if line.startswith("#SBATCH ")}
    assert {"--requeue", "--open-mode=append"} <= directives
    signal_at = [d for d in directives if d.startswith("--signal=B:USR1@")]
    assert len(signal_at) == 1 and int(signal_at[0].rsplit("@", 1)[1]) >= 60  # (Slurm's step)


def _training_slurm_job(tmp_path: Path, extra: dict[str, str] | None = None
                        ) -> subprocess.Popen[bytes]:
    """slurm.sbatch started with an ``srun`` that trains until it is signalled (its pid in
    srun.pid once the batch shell has started it); the script's stdout and stderr go to the
    files out and err."""
    cmd, env = _slurm_job(tmp_path, extra)
    (tmp_path / "srun").write_text(f"#!/usr/bin/env bash\necho $$ > {tmp_path / 'srun.tmp'}\n"
                                   f"mv {tmp_path / 'srun.tmp'} {tmp_path / 'srun.pid'}\n"
                                   "exec sleep 600\n")
    with (tmp_path / "out").open("w") as out, (tmp_path / "err").open("w") as err:
        return subprocess.Popen(cmd, stdout=out, stderr=err, env=env, start_new_session=True)


def _until(ready: Callable[[], bool], proc: subprocess.Popen[bytes], tmp_path: Path) -> None:
    """Wait (at most 30 s) until ``ready()``; fail at once if the script ends first."""
    deadline = time.monotonic() + 30
    while not ready():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise AssertionError(f"exit {proc.poll()}: {(tmp_path / 'err').read_text()}")
        time.sleep(0.05)


def _ended(proc: subprocess.Popen[bytes]) -> None:
    """Wait (at most 30 s) for ``proc`` to end; kill its session if it has not."""
    try:
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def _requeues(tmp_path: Path) -> list[str]:
    return [c for c in (tmp_path / "scontrol.log").read_text().splitlines()
            if c.startswith("requeue")]


def test_slurm_near_its_time_limit_requeues_the_job_and_ends(tmp_path: Path) -> None:
    """(the batch shell ran srun in the foreground: the USR1 that Slurm sends before the time
    limit (#SBATCH --signal=B:USR1@...) killed it, and nothing requeued the job)"""
    proc = _training_slurm_job(tmp_path)
    try:
        _until((tmp_path / "srun.pid").exists, proc, tmp_path)
        os.kill(proc.pid, signal.SIGUSR1)  # (B: to the batch shell alone)
    finally:
        _ended(proc)
    assert _requeues(tmp_path) == ["requeue 4242"], (tmp_path / "err").read_text()
    out = (tmp_path / "out").read_text().splitlines()
    assert len(out) == 1 and out[0].startswith("slurm.sbatch: job 4242 is near its time limit")
    assert "requeueing it" in out[0] and (tmp_path / "err").read_text() == ""
    # training stopped (srun TERMed, which it passes on to torchrun), not left running until
    # Slurm's kill: the script ends with srun's status
    assert proc.returncode == 128 + signal.SIGTERM
    with pytest.raises(ProcessLookupError):
        os.kill(int((tmp_path / "srun.pid").read_text()), 0)


def test_slurm_requeued_during_its_checks_starts_no_training(tmp_path: Path) -> None:
    """(the trap was set just before srun: a USR1 during the config check killed the batch
    shell, bash's default for USR1, and the job with it, not requeued)"""
    cmd, env = _slurm_job(tmp_path)
    checking, go = tmp_path / "checking", tmp_path / "go"
    python = tmp_path / ".venv" / "bin" / "python"  # a --check that waits for the test
    python.write_text(f"#!/usr/bin/env bash\ntouch {checking}\n"
                      f"while [ ! -e {go} ]; do sleep 0.05; done\n")
    with (tmp_path / "out").open("w") as out, (tmp_path / "err").open("w") as err:
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, env=env, start_new_session=True)
    try:
        _until(checking.exists, proc, tmp_path)
        os.kill(proc.pid, signal.SIGUSR1)
        time.sleep(0.2)  # (bash takes the signal at once and runs the trap after the check)
        go.touch()
    finally:
        _ended(proc)
    assert proc.returncode == 0, (tmp_path / "err").read_text()
    assert _requeues(tmp_path) == ["requeue 4242"]
    assert not (tmp_path / "srun.out").exists()  # no training started, to be stopped at once


@pytest.mark.parametrize(("extra", "said"), [
    ({"REQUEUE": "0"}, "out"), ({"FAKE_REQUEUE_STATUS": "1"}, "err")])
def test_slurm_not_requeued_trains_on_until_slurm_ends_it(tmp_path: Path, extra: dict[str, str],
                                                          said: str) -> None:
    """REQUEUE=0, or a requeue Slurm refuses: one line, and the job trains on until the time
    limit ends srun (TERMed here, as Slurm does), with srun's status (the USR1 killed the batch
    shell, and with it the job, minutes before its time)."""
    proc = _training_slurm_job(tmp_path, extra)
    try:
        _until((tmp_path / "srun.pid").exists, proc, tmp_path)
        os.kill(proc.pid, signal.SIGUSR1)
        _until(lambda: (tmp_path / said).read_text().endswith("\n"), proc, tmp_path)
        assert proc.poll() is None  # training on
        os.kill(int((tmp_path / "srun.pid").read_text()), signal.SIGTERM)  # the time limit
    finally:
        _ended(proc)
    assert proc.returncode == 128 + signal.SIGTERM, (tmp_path / "err").read_text()
    assert _requeues(tmp_path) == (["requeue 4242"] if "FAKE_REQUEUE_STATUS" in extra else [])
    line = (tmp_path / said).read_text().splitlines()
    if "REQUEUE" in extra:
        assert line == [
            "slurm.sbatch: job 4242 is near its time limit (USR1); REQUEUE=0: not requeued, it "
            "trains until Slurm ends it; rerun the same sbatch command to resume from the "
            "newest complete checkpoint in RUN"]
    else:  # (the fake scontrol says nothing of its refusal; the real one does)
        assert len(line) == 1 and line[0].startswith(
            "slurm.sbatch: warning: scontrol requeue 4242 failed; training goes on")


@pytest.mark.parametrize(("status", "restarts"), [(3, "2"), (0, None)])
def test_slurm_exits_with_sruns_status_and_names_its_restart(tmp_path: Path, status: int,
                                                             restarts: str | None) -> None:
    """srun in the background still gives the script its status; a requeued job (Slurm sets
    SLURM_RESTART_COUNT) says so, under the same job id (same rendezvous id and port)."""
    cmd, env = _slurm_job(tmp_path, restart_count=restarts)
    (tmp_path / "srun").write_text(f"#!/usr/bin/env bash\nexit {status}\n")
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=60, env=env)
    assert res.returncode == status, res.stderr
    assert _requeues(tmp_path) == []
    if restarts:
        assert res.stdout.splitlines() == [
            "slurm.sbatch: job 4242 requeued 2 time(s): resuming from the newest complete "
            "checkpoint in RUN"]
    else:
        assert res.stdout == ""


@pytest.mark.parametrize("posix", [False, True])
def test_slurm_exits_with_the_status_of_an_srun_that_ends_while_waited_for(
        tmp_path: Path, posix: bool) -> None:
    """srun ending during the script's wait (every training that runs to its end): the script
    exits with its status. (The script waited a second time for the reaped srun: bash in POSIX
    mode, e.g. with POSIXLY_CORRECT in the submitting shell's environment, which sbatch passes
    on, keeps no status for it then: exit 127, a job finished or failed reported as 127.)"""
    cmd, env = _slurm_job(tmp_path, {"POSIXLY_CORRECT": "1"} if posix else None)
    (tmp_path / "srun").write_text(f"#!/usr/bin/env bash\ntouch {tmp_path / 'srun.started'}\n"
                                   "sleep 1\nexit 3\n")
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=60, env=env)
    assert (tmp_path / "srun.started").exists()
    assert res.returncode == 3, res.stderr
    assert res.stderr == ""


@pytest.mark.parametrize("value", ["yes", "2", " 1"])
def test_slurm_names_a_bad_requeue_setting(tmp_path: Path, value: str) -> None:
    res = _slurm(tmp_path, extra={"REQUEUE": value})
    assert res.returncode == 2 and not (tmp_path / "srun.out").exists()
    assert res.stderr.startswith(f"error: REQUEUE={value}: give 1 ") and \
        res.stderr.count("\n") == 1


@pytest.mark.parametrize("script", ["single_node.sh", "multi_node.sh", "slurm.sbatch"])
def test_a_bad_config_is_one_line_before_torchrun(tmp_path: Path, script: str) -> None:
    """An error no restart mends (here DATA without a manifest) made each worker exit 2 before
    its process group, and torchrun restarted the group 3 times: the line 4 times, then
    torchrun's ChildFailedError traceback and exit 1."""
    data, run = tmp_path / "DATA", tmp_path / "RUN"
    data.mkdir()
    argv = ["configs/tiny.toml", str(data), str(run), "--set", "train.epochs=1"]
    if script == "slurm.sbatch":  # submitted from the checkout: its .venv runs the check
        res = _slurm(tmp_path, argv=argv, submit_dir=str(LAUNCH.parent))
        started = tmp_path / "srun.out"
    else:
        started = _recorder(tmp_path / "torchrun")
        env = {"PATH": os.environ["PATH"], "TORCHRUN": str(tmp_path / "torchrun"), "NPROC": "1",
               "MASTER_ADDR": "head"}
        res = subprocess.run(["bash", f"launch/{script}", *argv], capture_output=True,
                             text=True, timeout=60, env=env)
    assert res.returncode == 2 and not started.exists()
    assert res.stderr.splitlines() == [
        f"trainer.train: error: --data {data}: no manifest.json (run dataio.prepare first)"]
    assert not run.exists()


@pytest.mark.parametrize(("extra", "want"), [({}, "--max-restarts=3"),
                                             ({"MAX_RESTARTS": "0"}, "--max-restarts=0"),
                                             ({"MAX_RESTARTS": "12"}, "--max-restarts=12")])
def test_slurm_takes_max_restarts(tmp_path: Path, extra: dict[str, str], want: str) -> None:
    """(slurm.sbatch gave torchrun --max-restarts=3 whatever MAX_RESTARTS said, where
    single_node.sh and multi_node.sh take it)"""
    res = _slurm(tmp_path, extra=extra)
    assert res.returncode == 0, res.stderr
    args = _recorded(tmp_path / "srun.out")[0]
    assert [a for a in args if a.startswith("--max-restarts")] == [want]


@pytest.mark.parametrize("value", ["-1", "three", "3x"])
def test_slurm_names_a_max_restarts_that_is_no_number(tmp_path: Path, value: str) -> None:
    """As the other launchers: one line naming it, exit 2, before the checks and srun (torchrun
    ended a bad --max-restarts in a traceback, on every node)."""
    res = _slurm(tmp_path, extra={"MAX_RESTARTS": value})
    assert res.returncode == 2 and not (tmp_path / "srun.out").exists()
    assert res.stderr.splitlines() == [f"error: MAX_RESTARTS={value}: give a whole number from 0"]
