"""Shared fixtures: tiny real-format data made by code (no committed blobs), and marker handling."""

from __future__ import annotations

import logging
import os
import signal
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

# Multi-process tests on 2 cores: one thread per process or they fight over the cores.
os.environ.setdefault("OMP_NUM_THREADS", "1")


def _cuda_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if _cuda_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs CUDA (no GPU on this machine)")
    for item in items:
        if item.get_closest_marker("gpu"):  # (keywords also hold ids and directory names)
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def _cpu_unless_marked_gpu(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests not marked ``gpu`` are the CPU tests (gloo, DALI on the CPU, bit-exact resumes) on
    a CUDA machine too: the code under test and the processes they start see no GPU, as in CI.
    (Otherwise the loader's default device, NCCL and cuDNN would change what they check.)"""
    if request.node.get_closest_marker("gpu"):
        return
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # for the processes a test starts
    if _cuda_available():  # this process may have seen the GPU already
        import torch

        monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


@pytest.fixture(autouse=True)
def _sigint_handler_restored() -> Iterator[None]:
    """Each test starts with the Ctrl-C and SIGTERM handlers the session had.

    NOTE: a command's ``main`` run in process that took a Ctrl-C leaves Ctrl-C set aside (its
    process would exit next); the tests after it in the same process saw SIG_IGN. The suite
    passed only in the order of one process: under ``pytest -n`` (files spread over workers) a
    test that checks the handler put back failed after an in-process render Ctrl-C test.
    SIGTERM is set aside with it (postproc.pools.stop_signals), and an ignored SIGTERM is
    inherited by every process a later test starts: a command given SIGTERM there ran on to its
    end (prepare's SIGTERM test, after test_cli's Ctrl-C tests in the same worker). Put back
    before the test as well as after it: a module fixture between two tests can change them
    (test_pools' check that a handler is put back found SIG_IGN under ``-n 2``)."""
    _put_back(_SESSION_HANDLERS)  # (a module fixture's in-process command may have set them)
    yield
    _put_back(_SESSION_HANDLERS)


# the handlers this process had when the suite began (conftest is imported before any test)
_SESSION_HANDLERS = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}


def _put_back(handlers: dict[int, Any]) -> None:
    for sig, handler in handlers.items():
        if handler is not None:  # (None: a handler installed from C, which cannot be put back)
            signal.signal(sig, handler)


@pytest.fixture(scope="session", autouse=True)
def _temp_files_under_basetemp(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """TMPDIR (for the processes the tests start) and ``tempfile.tempdir`` (for this one) point
    into pytest's basetemp for the session.

    NOTE: torchrun's agents (``torchelastic_*``, left behind by an agent that is killed),
    multiprocessing (``pymp-*``) and DALI's autograph (``__autograph_generated_file*.py``, never
    removed) made ~100 entries in /tmp per run; under the basetemp they go when pytest prunes
    its old basetemps. Session-scoped and autouse, so it is set before any module fixture starts
    a worker.
    """
    tmp = tmp_path_factory.mktemp("tmp")
    env, before = os.environ.get("TMPDIR"), tempfile.tempdir
    os.environ["TMPDIR"] = tempfile.tempdir = str(tmp)
    try:
        yield tmp
    finally:
        tempfile.tempdir = before
        if env is None:
            os.environ.pop("TMPDIR", None)
        else:
            os.environ["TMPDIR"] = env


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture
def torch_loads(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, bool]]:
    """Every ``torch.load`` during the test, as (the file, whether it was mapped: ``mmap``):
    for the readers that must map a checkpoint rather than read it whole."""
    import torch

    reads: list[tuple[str, bool]] = []
    real = torch.load

    def spy(f: Any, *args: Any, **kwargs: Any) -> Any:
        reads.append((str(f), bool(kwargs.get("mmap"))))
        return real(f, *args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    return reads


@pytest.fixture
def footprints_log() -> Iterator[list[logging.LogRecord]]:
    """Every record that reaches the project's ``footprints`` logger (its children's too) during
    the test, once each: for a test that counts lines.

    NOTE: not caplog: the trainer's ``setup_logging`` (run in-process by earlier tests) makes the
    logger non-propagating, and pytest 9 then hangs caplog's handler on it as well as on the root;
    a test that turned propagation back on to reach caplog got every record twice.
    """
    logger, handler = logging.getLogger("footprints"), _Records()
    logger.addHandler(handler)
    try:
        yield handler.records
    finally:
        logger.removeHandler(handler)


# ---- tiny real-format datasets, made once per test session --------------------------------------

AOI_TILES = 10  # 650x650 SpaceNet-2 tiles: 7/2/1 after the 70:15:15 split


@pytest.fixture(scope="session")
def synthetic_aoi(tmp_path_factory: pytest.TempPathFactory):
    """A SpaceNet-2 layout AOI of full-size tiles (``dataio.synth``)."""
    from dataio.synth import SynthConfig, write_aoi

    raw = tmp_path_factory.mktemp("raw") / "AOI_2_Vegas_Train"
    write_aoi(SynthConfig(out=raw, tiles=AOI_TILES, seed=7))
    return raw


@pytest.fixture(scope="session")
def prepared_dataset(synthetic_aoi, tmp_path_factory: pytest.TempPathFactory):
    """``dataio.prepare`` output for :func:`synthetic_aoi` (shards of 3 samples)."""
    from dataio.prepare import PrepareConfig, prepare

    out = tmp_path_factory.mktemp("data") / "DATA"
    prepare(PrepareConfig(raw=[synthetic_aoi], out=out, shard_size=3, seed=0), progress=False)
    return out


@pytest.fixture(scope="session")
def small_aoi(tmp_path_factory: pytest.TempPathFactory):
    """A SpaceNet-2 layout AOI of 24 small (128 px) tiles: what :func:`small_dataset` is
    prepared from, and quick input for tests of prepare itself."""
    from dataio.synth import SynthConfig, write_aoi

    raw = tmp_path_factory.mktemp("small") / "raw"
    write_aoi(SynthConfig(out=raw, tiles=24, seed=3, size=128))
    return raw


@pytest.fixture(scope="session")
def small_dataset(small_aoi, tmp_path_factory: pytest.TempPathFactory):
    """A quick dataset of the 24 small (128 px) tiles of :func:`small_aoi`, for loader and
    trainer tests."""
    from dataio.prepare import PrepareConfig, prepare

    out = small_aoi.parent / "DATA"
    prepare(PrepareConfig(raw=[small_aoi], out=out, shard_size=4, seed=0), progress=False)
    return out


@pytest.fixture(scope="session")
def unlabelled_aoi(tmp_path_factory: pytest.TempPathFactory):
    """New imagery without labels, as SpaceNet's ``AOI_2_Vegas_Test_public``: 6 small (128 px)
    tiles in ``RGB-PanSharpen/`` (UTM zone 11N, so a CRS of its own), no ``geojson/`` and no
    ``summaryData/``."""
    import shutil

    from dataio.synth import SynthConfig, write_aoi

    raw = tmp_path_factory.mktemp("unlabelled") / "AOI_2_Vegas_Test_public"
    write_aoi(SynthConfig(out=raw, tiles=6, seed=11, size=128, crs="EPSG:32611"))
    shutil.rmtree(raw / "geojson")
    shutil.rmtree(raw / "summaryData")
    return raw


@pytest.fixture(scope="session")
def images_only_dataset(unlabelled_aoi):
    """``python -m dataio.prepare --raw AOI --out DATA --images-only`` of :func:`unlabelled_aoi`
    (shards of 4: two shards)."""
    from dataio.prepare import main

    out = unlabelled_aoi.parent / "DATA"
    assert main(["--raw", str(unlabelled_aoi), "--out", str(out), "--images-only",
                 "--shard-size", "4", "--workers", "0", "--quiet"]) == 0
    return out


@pytest.fixture(scope="session")
def mul_aoi(tmp_path_factory: pytest.TempPathFactory):
    """8 small (96 px) tiles with ``MUL-PanSharpen/`` beside ``RGB-PanSharpen/``
    (``dataio.synth --mul``)."""
    from dataio.synth import SynthConfig, write_aoi

    raw = tmp_path_factory.mktemp("mul") / "raw"
    write_aoi(SynthConfig(out=raw, tiles=8, seed=5, size=96, mul=True))
    return raw


@pytest.fixture(scope="session")
def mul_dataset(mul_aoi):
    """``dataio.prepare --product MUL-PanSharpen`` of :func:`mul_aoi` (6/1/1 tiles, 8 bands)."""
    from dataio.prepare import PrepareConfig, prepare

    out = mul_aoi.parent / "DATA"
    prepare(PrepareConfig(raw=[mul_aoi], out=out, shard_size=4, seed=0,
                          product="MUL-PanSharpen"), progress=False)
    return out
