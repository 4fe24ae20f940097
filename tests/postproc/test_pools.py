"""postproc.pools: a Ctrl-C while a pool's workers start is raised once they are started."""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import multiprocessing as mp
import multiprocessing.process
import os
import signal
import threading
from collections.abc import Callable, Iterator

import pytest

from postproc.pools import close_pool, ignore_sigint, sigint_once, starting_workers


@contextlib.contextmanager
def _ctrl_c_taken_by_another_thread() -> Iterator[Callable[[], None]]:
    """Yield ``press()``: a Ctrl-C to the whole process, back once a thread has taken it.

    A thread started before :func:`starting_workers` has Ctrl-C unblocked (tqdm's monitor is
    one, started by any bar): the kernel gives it the signal, and Python runs the handler in the
    main thread at its next step. Its C handler writes to the wakeup fd: the wait, no timing."""
    r, w = os.pipe()
    os.set_blocking(w, False)
    stop = threading.Event()
    other = threading.Thread(target=stop.wait)
    other.start()
    old_fd = signal.set_wakeup_fd(w)
    before = signal.getsignal(signal.SIGINT)

    def press() -> None:
        os.kill(os.getpid(), signal.SIGINT)
        os.read(r, 1)

    try:
        yield press
    finally:
        signal.set_wakeup_fd(old_fd)
        signal.signal(signal.SIGINT, before)  # (pytest's own Ctrl-C)
        stop.set()
        other.join()
        os.close(r)
        os.close(w)


def _step() -> None:
    """A Python call: where the main thread runs a pending signal handler."""


def test_a_ctrl_c_while_workers_start_is_held_until_they_are_started() -> None:
    """Blocking Ctrl-C in the main thread did not hold it: another thread took it and the
    KeyboardInterrupt came inside the block, in the middle of the pool's start."""
    reached = False
    with _ctrl_c_taken_by_another_thread() as press:
        with pytest.raises(KeyboardInterrupt), sigint_once(), starting_workers():
            press()
            _step()
            reached = True  # (the old block raised before here)
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN  # (sigint_once's first press)
    assert reached


def _press_as_a_worker_starts(monkeypatch: pytest.MonkeyPatch,
                              press: Callable[[], None]) -> None:
    real_start = multiprocessing.process.BaseProcess.start

    def start(self: multiprocessing.process.BaseProcess) -> None:
        real_start(self)
        press()  # (the pool has not recorded this worker yet)

    monkeypatch.setattr(multiprocessing.process.BaseProcess, "start", start)


def _left_children() -> list[multiprocessing.process.BaseProcess]:
    left = mp.active_children()
    for p in left:  # (the old code's: else pytest's exit joins them)
        p.kill()
        p.join()
    return left


@pytest.mark.timeout(120)
def test_a_ctrl_c_as_a_worker_starts_leaves_no_worker_behind(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A Ctrl-C between a worker's start and the pool's note of it (or before the pool's
    manager thread started) left that worker waiting for work that no shutdown sends: the
    command said 'interrupted' and then hung at exit, joining it (seen in benchmarks.prepare's
    synth under load)."""
    with _ctrl_c_taken_by_another_thread() as press:
        _press_as_a_worker_starts(monkeypatch, press)
        pool = cf.ProcessPoolExecutor(1, mp_context=mp.get_context("fork"),
                                      initializer=ignore_sigint)
        try:
            with pytest.raises(KeyboardInterrupt), sigint_once():
                try:
                    with starting_workers():
                        pool.submit(_step)
                finally:
                    close_pool(pool)
        finally:
            left = _left_children()
    assert left == []


@pytest.mark.timeout(120)
def test_a_ctrl_c_while_make_pool_forks_leaves_no_worker_behind(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """postproc.runner.make_pool forked its workers outside starting_workers, and a Ctrl-C
    there lost the pool to its caller: nobody closed it, and the exit joined its workers."""
    from postproc import runner

    runner.warmup()  # (its numba compile before the Ctrl-C, not inside it)
    with _ctrl_c_taken_by_another_thread() as press:
        _press_as_a_worker_starts(monkeypatch, press)
        try:
            with pytest.raises(KeyboardInterrupt), sigint_once():
                runner.make_pool(2)
        finally:
            left = _left_children()
    assert left == []


@pytest.mark.timeout(120)
def test_a_ctrl_c_while_score_forks_leaves_no_worker_behind(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """score_parallel's pool.map forked the workers outside starting_workers: a Ctrl-C before
    the pool's manager thread started left close_pool nothing to stop, and the exit joined the
    forked workers."""
    from postproc.score import CHUNK_IMAGES, ScoreConfig, score_parallel

    ids = [f"img{i}" for i in range(2 * CHUNK_IMAGES)]  # (two chunks: the pool is used)
    with _ctrl_c_taken_by_another_thread() as press:
        _press_as_a_worker_starts(monkeypatch, press)
        try:
            with pytest.raises(KeyboardInterrupt), sigint_once():
                score_parallel({}, {}, ScoreConfig(), ids, workers=2)
        finally:
            left = _left_children()
    assert left == []
