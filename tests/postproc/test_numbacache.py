"""postproc.numbacache: numba gets a cache directory of this user's alone when it has none of
its own (the account-level test, for real, is in tests/test_unwritable_outputs.py)."""

from __future__ import annotations

import os
import stat
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
