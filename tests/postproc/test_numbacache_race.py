"""numba's cache written by two processes at once (pytest-xdist workers or torchrun ranks on a
fresh checkout): ``postproc.numbacache.njit`` makes the saves take turns, so the index and the
data files stay in step and no process loads one signature's code for another, and a load waits
for a save under way, so that no process loads an older source's code under the new index."""

from __future__ import annotations

import ast
import errno
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from postproc import numbacache

ROOT = Path(__file__).resolve().parents[2]
WORKER = Path(__file__).with_name("cache_race_worker.py")
PACKAGES = ("dataio", "models", "trainer", "postproc", "launch", "benchmarks", "tests")
KERNEL = '''from postproc.numbacache import njit


@njit(cache=True)
def twice(x):
    return x * 2
'''


@pytest.mark.slow
@pytest.mark.multiproc
def test_two_processes_adding_signatures_at_once_keep_the_cache_consistent(tmp_path: Path
                                                                           ) -> None:
    src, cache, sync = tmp_path / "src", tmp_path / "cache", tmp_path / "sync"
    for d in (src, cache, sync):
        d.mkdir()
    (src / "race_kernel.py").write_text(KERNEL)
    env = {**os.environ, "NUMBA_CACHE_DIR": str(cache), "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(src), str(ROOT)])}

    def start(*args: str) -> subprocess.Popen[str]:
        return subprocess.Popen([sys.executable, str(WORKER), *args], env=env, cwd=ROOT,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    writers = [start("A", str(sync)), start("B", str(sync))]
    outs = [w.communicate(timeout=120) for w in writers]
    assert [w.returncode for w in writers] == [0, 0], outs
    assert [o.strip() for o, _ in outs] == ["6", "3.0"]  # (each ran its own compile)
    assert (sync / "B_read").exists()  # (the barriers ran: numba still saves through them)
    check = subprocess.run([sys.executable, str(WORKER), "check", str(cache)], env=env,
                           cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert check.returncode == 0, check.stderr
    got = json.loads(check.stdout)
    # NOTE: without the lock both took data number 1: the index kept B's float64 entry, the file
    # A's int64 code, and twice(1.5) ran as twice(1) = 2
    assert got == {"int": "6", "float": "3.0", "crossed": []}


@pytest.mark.slow
@pytest.mark.multiproc
def test_a_load_during_a_save_does_not_run_the_older_code(tmp_path: Path) -> None:
    """After an edit, a save replaces the stale index and reuses its data numbers: between the
    index and the data, a process that loaded the kernel got the older code's data file under
    the new index (``x * 2`` ran for the edited ``x * 3``)."""
    src, cache, sync = tmp_path / "src", tmp_path / "cache", tmp_path / "sync"
    for d in (src, cache, sync):
        d.mkdir()
    env = {**os.environ, "NUMBA_CACHE_DIR": str(cache), "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(src), str(ROOT)])}

    def start(*args: str) -> subprocess.Popen[str]:
        return subprocess.Popen([sys.executable, str(WORKER), *args], env=env, cwd=ROOT,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    (src / "race_kernel.py").write_text(KERNEL)
    old = start("plain", str(sync))
    assert old.communicate(timeout=120)[0].strip() == "6"
    (src / "race_kernel.py").write_text(KERNEL.replace("x * 2", "x * 3"))
    procs = [start("W", str(sync)), start("R", str(sync))]
    outs = [p.communicate(timeout=180) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    assert (sync / "W_index").exists()  # (the writer saved through its hook)
    assert [o.strip() for o, _ in outs] == ["9", "9"], outs


def test_serializing_is_idempotent_and_patches_numbas_save_and_load() -> None:
    from numba.core import caching

    numbacache.serialize_cache_writes()
    cls = caching.IndexDataCacheFile
    save, load = cls.save, cls.load
    numbacache.serialize_cache_writes()
    assert (cls.save, cls.load) == (save, load)  # (one lock, not one inside another)
    assert getattr(save, "footprints_locked", False) and getattr(load, "footprints_locked",
                                                                 False)


def test_a_file_system_without_locks_still_saves(tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """(NFS without lockd: flock fails with ENOLCK; the kernel must still compile and save)"""
    import fcntl

    def no_locks(fd: int, op: int) -> None:
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    saved: list[tuple[str, str]] = []
    save = numbacache._locked(lambda self, key, data: saved.append((key, data)))
    save(SimpleNamespace(_cache_path=str(tmp_path)), "key", "data")
    assert saved == [("key", "data")]


def _numba_njit_users(path: Path) -> list[str]:
    """Names under which ``path`` takes ``njit``/``jit`` from numba itself."""
    names = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module == "numba":
            names += [a.name for a in node.names if a.name in ("njit", "jit")]
        elif (isinstance(node, ast.Attribute) and node.attr in ("njit", "jit")
              and isinstance(node.value, ast.Name) and node.value.id in ("numba", "nb")):
            names.append(f"{node.value.id}.{node.attr}")
    return names


def test_every_cached_kernel_is_compiled_through_numbacache() -> None:
    # NOTE: a kernel from numba's own njit would be saved without the lock
    files = [p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")
             if "cache=True" in p.read_text() and p.name != "numbacache.py"]
    assert len(files) >= 7  # (the postproc kernels and the test reference)
    direct = {str(p.relative_to(ROOT)): n for p in files if (n := _numba_njit_users(p))}
    assert not direct, f"cache=True kernels compiled with numba's own njit: {direct}"
