"""Helpers shared by the multi-process tests (trainer, ops): free loopback ports, the
environment of a worker process, torchrun command lines, and killing a process tree."""

from __future__ import annotations

import errno
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from benchmarks.proctree import kill_tree

__all__ = ["NOBODY", "REPO", "as_nobody", "free_port", "interrupt_when", "kill_tree",
           "nobody_scratch", "numba_interrupt", "torchrun_cmd", "worker_env"]

REPO = Path(__file__).resolve().parents[1]


_GIVEN: set[int] = set()


def worker_exit_codes(stderr: str) -> dict[int, int]:
    """Each failed worker's exit code, by rank, from torchrun's summary ("Root Cause" is the
    first failure it saw; the others are listed under "Failures")."""
    found = re.findall(r"rank\s*: (\d+) \(local_rank: \d+\)\s*\n\s*exitcode\s*: (-?\d+)",
                       stderr)
    return {int(rank): int(code) for rank, code in found}


def first_failure(stderr: str) -> int | None:
    """The rank torchrun's summary names as the "Root Cause (first observed failure)"."""
    first = re.search(r"Root Cause.*?\n.*?rank\s*: (\d+)", stderr, re.S)
    return int(first.group(1)) if first else None


def free_port() -> int:
    """A loopback port free now, from below the kernel's ephemeral range.

    NOTE: a port from ``bind(0)`` is closed until the test's server binds it, seconds later, and
    meanwhile gloo's listeners (which also bind 0) and the next ``free_port`` draw from that same
    range: a collision failed the test. Below the range only another explicit choice can take it.
    """
    try:
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):  # not Linux, or /proc/sys hidden
        low = 0
    if low <= 11000:  # no room below the range: the kernel's choice, as before
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return s.getsockname()[1]
    start, step = _port_slice(low)
    while True:
        port = random.randrange(start, start + step)
        if port not in _GIVEN and _unused(port):
            _GIVEN.add(port)
            return port


def _port_slice(low: int) -> tuple[int, int]:
    """(start, size) of the ports under ``low`` (from 10000) this pytest-xdist worker draws.

    NOTE: under ``pytest -n`` each worker draws from a slice of its own: two workers' tests
    could otherwise both find one port free before either bound it. A worker is ``gw<N>``
    (``gw2`` and on replace crashed ones, hence the modulo), or a name given with ``--tx
    ...//id=NAME``: that one draws by its name's hash (int() of it failed every test that
    started a process)."""
    count = max(1, int(os.environ.get("PYTEST_XDIST_WORKER_COUNT") or 1))
    name = os.environ.get("PYTEST_XDIST_WORKER", "gw0")
    digits = re.fullmatch(r"gw(\d+)", name)
    worker = int(digits.group(1)) if digits else zlib.crc32(name.encode())
    step = (low - 10000) // count
    return 10000 + step * (worker % count), step


def _unused(port: int) -> bool:
    """Nothing holds ``port`` on any address (torchrun's store binds them all)."""
    families = [(socket.AF_INET, "0.0.0.0")]
    if socket.has_ipv6:
        families.append((socket.AF_INET6, "::"))
    for family, wildcard in families:
        try:
            with socket.socket(family) as s:
                s.bind((wildcard, port))
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                return False
            # anything else (IPv6 compiled in but off on this host) says nothing about the port
    return True


def worker_env(gpu: bool = False) -> dict[str, str]:
    """One thread per process (2 cores here), the repository importable first, and (unless ``gpu``)
    no GPU: the multi-process tests check gloo and bit-exact CPU runs, on a CUDA machine too.
    (Set here, not only in conftest's autouse fixture: module fixtures start workers before it.)"""
    env = dict(os.environ)
    # (the repository first, then a PYTHONPATH already set: where packages are carried onto a
    # GPU machine beside its own, as benchmarks/RESULTS.md's leases do)
    path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    env.update(OMP_NUM_THREADS="1", NUMBA_NUM_THREADS="1", PYTHONPATH=path)
    if not gpu:
        env["CUDA_VISIBLE_DEVICES"] = ""
    return env


def torchrun_cmd(nproc: int, module_args: list[str], max_restarts: int = 0,
                 extra: list[str] | None = None) -> list[str]:
    """A one-node torchrun on a free loopback port."""
    return [sys.executable, "-m", "torch.distributed.run", "--nnodes=1",
            f"--nproc_per_node={nproc}", "--master_addr=127.0.0.1",
            f"--master_port={free_port()}", f"--max-restarts={max_restarts}",
            *(extra or []), *module_args]



def interrupt_when(cmd: list[str], said: str, times: int = 1, timeout: float = 120,
                   sig: int = signal.SIGINT, gpu: bool = False) -> subprocess.CompletedProcess[str]:
    """Run ``cmd`` in a process group of its own and press Ctrl-C (SIGINT to the whole group, as
    a terminal sends it; or ``sig``) once it has written a line holding ``said`` ``times`` times
    on stdout (on the GPU if ``gpu``, see :func:`worker_env`).
    All its stdout and stderr come back; a command that outlives ``timeout`` seconds (or ends
    before it said so) is killed and fails the test."""
    with tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(cmd, cwd=REPO, env=worker_env(gpu), stdout=subprocess.PIPE,
                                stderr=err, text=True, start_new_session=True)
        before: list[str] = []
        try:
            while sum(said in line for line in before) < times:
                before.append(proc.stdout.readline())  # type: ignore[union-attr]
                if not before[-1]:
                    err.seek(0)
                    raise AssertionError(f"{cmd} ended before saying {said!r} {times} times: "
                                         f"{err.read()[-3000:]}")
            os.killpg(proc.pid, sig)
            out, _ = proc.communicate(timeout=timeout)
        finally:
            if proc.poll() is None:
                kill_tree(proc.pid)
                proc.wait(timeout=30)
        err.seek(0)
        return subprocess.CompletedProcess(cmd, proc.returncode, "".join(before) + out,
                                           err.read())


def numba_interrupt(cause: BaseException | None = None) -> None:
    """Raise what numba raises for a Ctrl-C pressed while it boxes a kernel's returned arrays:
    a SystemError with the press (``cause``, a KeyboardInterrupt by default) in its chain."""
    try:
        raise cause if cause is not None else KeyboardInterrupt()
    except BaseException as e:
        raise SystemError("<function _numba_unpickle> returned a result with an exception "
                          "set") from e


# ---- running a command as another account: nobody --------------------------------------------

NOBODY = 65534
SETPRIV = shutil.which("setpriv")


def as_nobody(args: list[str], home: Path, **env_vars: str) -> subprocess.CompletedProcess:
    """This Python with ``args``, run as nobody (setpriv) in the checkout; ``home``: its HOME and
    TMPDIR, a directory nobody may write (see :func:`nobody_scratch`)."""
    cmd = [SETPRIV, f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", sys.executable,
           *args]
    # (HOME: numba's cache for a checkout nobody cannot write goes under it)
    env = {**os.environ, "HOME": str(home), "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1",
           "TMPDIR": str(home), **env_vars}
    env.pop("NUMBA_CACHE_DIR", None)
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)


@contextmanager
def nobody_scratch() -> Iterator[Path]:
    """A directory that nobody can reach (0755, in /tmp), outside pytest's basetemp (a 0700
    directory of root's, which nobody cannot enter), holding ``home/`` (nobody's) and ``ro/``
    (root's, 0755: nobody cannot write it);
    removed after. Skips the test unless it runs as root with setpriv and nobody can run this
    Python on this checkout (a venv under a 0700 home cannot be)."""
    if os.geteuid() != 0 or SETPRIV is None:
        pytest.skip("needs root and setpriv to run a command as nobody")
    base = Path(tempfile.mkdtemp(prefix="footprints-nobody-", dir="/tmp"))
    try:
        base.chmod(0o755)
        home = base / "home"
        home.mkdir()
        os.chown(home, NOBODY, NOBODY)
        (base / "ro").mkdir(mode=0o755)
        probe = as_nobody(["-c", "import dataio.atomic"], home)
        if probe.returncode != 0:
            # (e.g. a checkout in a 0700 directory: `mktemp -d`)
            closed = [str(d) for d in (REPO, *REPO.parents) if not d.stat().st_mode & 0o001]
            pytest.skip(f"nobody cannot run {sys.executable} on {REPO} (directories it cannot "
                        f"enter: {closed or 'none'}): {probe.stderr.strip().splitlines()[-1:]}")
        yield base
    finally:
        shutil.rmtree(base, ignore_errors=True)
