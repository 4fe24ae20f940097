"""postproc.numbacache: numba gets a cache directory of this user's alone when it has none of
its own (the account-level test, for real, is in tests/test_unwritable_outputs.py), and a
kernel's cache goes stale with the modules it imports (the cache shared between processes:
test_numbacache_race.py)."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from numba.core import config

from postproc import numbacache


@pytest.fixture
def no_cache_of_its_own(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv(numbacache.ENV, "")  # (unset for the code; restored afterwards)
    monkeypatch.setattr(config, "CACHE_DIR", config.CACHE_DIR)
    monkeypatch.setattr(numbacache, "can_write", lambda path: False)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    return tmp_path


def test_without_a_writable_cache_numba_gets_a_private_one(no_cache_of_its_own: Path) -> None:
    numbacache.ensure_cache_dir()
    path = no_cache_of_its_own / f"footprints-numba-{os.getuid()}"
    assert os.environ[numbacache.ENV] == config.CACHE_DIR == str(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o700


def test_a_planted_directory_of_that_name_is_not_used(no_cache_of_its_own: Path) -> None:
    planted = no_cache_of_its_own / f"footprints-numba-{os.getuid()}"
    planted.mkdir()
    planted.chmod(0o777)  # (anyone could have put compiled code there)
    numbacache.ensure_cache_dir()
    used = Path(os.environ[numbacache.ENV])
    assert used != planted and used.parent == no_cache_of_its_own
    assert stat.S_IMODE(used.stat().st_mode) == 0o700


def test_numbas_own_places_and_a_given_dir_are_left_alone(no_cache_of_its_own: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(numbacache, "can_write", lambda path: True)
    numbacache.ensure_cache_dir()
    assert os.environ[numbacache.ENV] == ""
    monkeypatch.setattr(numbacache, "can_write", lambda path: False)
    monkeypatch.setenv(numbacache.ENV, "/somewhere/chosen")
    numbacache.ensure_cache_dir()
    assert os.environ[numbacache.ENV] == "/somewhere/chosen"
    assert not list(no_cache_of_its_own.iterdir())


def test_no_writable_temp_dir_either_leaves_it_to_numba(no_cache_of_its_own: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    def none_usable() -> str:
        raise FileNotFoundError(2, "No usable temporary directory found")

    monkeypatch.setattr(tempfile, "gettempdir", none_usable)
    assert numbacache.private_dir() is None
    numbacache.ensure_cache_dir()  # (importing postproc must not fail here: numba says why)
    assert os.environ[numbacache.ENV] == ""


ROOT = Path(__file__).resolve().parents[2]
CALLEE = "from postproc.numbacache import njit\n\n\n@njit(cache=True)\ndef k():\n    return {}\n"
CALLER = ("from postproc.numbacache import njit\nfrom stalepkg.callee import k\n\n\n"
          "@njit(cache=True)\ndef f():\n    return k()\n")


@pytest.mark.slow
def test_a_kernel_is_compiled_again_when_a_module_it_imports_changes(tmp_path: Path) -> None:
    """(numba stamps a kernel's cache with its own file alone: f, which holds k's code, went on
    returning 1 from the cache after k was changed to return 2)"""
    pkg = tmp_path / "src" / "stalepkg"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "caller.py").write_text(CALLER)
    env = {**os.environ, "NUMBA_CACHE_DIR": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(tmp_path / "src"), str(ROOT)])}

    def f() -> str:
        run = subprocess.run([sys.executable, "-c", "from stalepkg.caller import f; print(f())"],
                             env=env, capture_output=True, text=True, timeout=120)
        assert run.returncode == 0, run.stderr
        return run.stdout.strip()

    (pkg / "callee.py").write_text(CALLEE.format(1))
    assert f() == "1"
    (pkg / "callee.py").write_text(CALLEE.format(2))
    assert f() == "2"


def test_a_kernels_sources_are_the_package_modules_it_imports_transitively() -> None:
    path = ROOT / "postproc" / "tilekernel.py"
    got = {p.name for p in numbacache.kernel_sources(path, "postproc.tilekernel")}
    # (blobs imports grow; grow and trace import label; not the CLI modules nor __init__)
    assert got == {"tilekernel.py", "blobs.py", "grow.py", "label.py", "trace.py",
                   "numbacache.py"}
    assert {p.name for p in numbacache.kernel_sources(ROOT / "postproc" / "iou.py",
                                                      "postproc.iou")} == {"iou.py",
                                                                           "numbacache.py"}


def test_every_kernel_gets_the_stamp_of_its_imports() -> None:
    from postproc import tilekernel

    stamp = tilekernel.polygonize_tile._cache._cache_file._source_stamp
    assert stamp[1] == numbacache.sources_stamp(Path(tilekernel.__file__).resolve(),
                                                "postproc.tilekernel")
