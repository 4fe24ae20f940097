"""postproc.pools: a Ctrl-C while a pool's workers start is raised once they are started."""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import multiprocessing as mp
import multiprocessing.process
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator

import pytest
from proc_helpers import numba_interrupt

from postproc.pools import (
    close_pool,
    ignore_sigint,
    run_to_end,
    sigint_once,
    starting_workers,
)


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


def _left_by_a_ctrl_c_as_workers_start(monkeypatch: pytest.MonkeyPatch,
                                      start: Callable[[], object]
                                      ) -> list[multiprocessing.process.BaseProcess]:
    """Run ``start`` (it starts a pool's workers) under :func:`sigint_once`, with a Ctrl-C as
    each worker starts; it must end in KeyboardInterrupt. The worker processes left alive."""
    with _ctrl_c_taken_by_another_thread() as press:
        _press_as_a_worker_starts(monkeypatch, press)
        try:
            with pytest.raises(KeyboardInterrupt), sigint_once():
                start()
        finally:
            left = _left_children()
    return left


@pytest.mark.timeout(120)
def test_a_ctrl_c_as_a_worker_starts_leaves_no_worker_behind(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A Ctrl-C between a worker's start and the pool's note of it (or before the pool's
    manager thread started) left that worker waiting for work that no shutdown sends: the
    command said 'interrupted' and then hung at exit, joining it (seen in benchmarks.prepare's
    synth under load)."""
    def start() -> None:
        pool = cf.ProcessPoolExecutor(1, mp_context=mp.get_context("fork"),
                                      initializer=ignore_sigint)
        try:
            with starting_workers():
                pool.submit(_step)
        finally:
            close_pool(pool)

    assert _left_by_a_ctrl_c_as_workers_start(monkeypatch, start) == []


@pytest.mark.timeout(120)
def test_a_ctrl_c_while_make_pool_forks_leaves_no_worker_behind(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """postproc.runner.make_pool forked its workers outside starting_workers, and a Ctrl-C
    there lost the pool to its caller: nobody closed it, and the exit joined its workers."""
    from postproc import runner

    runner.warmup()  # (its numba compile before the Ctrl-C, not inside it)
    assert _left_by_a_ctrl_c_as_workers_start(monkeypatch, lambda: runner.make_pool(2)) == []


@pytest.mark.timeout(120)
def test_a_ctrl_c_while_score_forks_leaves_no_worker_behind(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """score_parallel's pool.map forked the workers outside starting_workers: a Ctrl-C before
    the pool's manager thread started left close_pool nothing to stop, and the exit joined the
    forked workers."""
    from postproc.score import CHUNK_IMAGES, ScoreConfig, score_parallel

    ids = [f"img{i}" for i in range(2 * CHUNK_IMAGES)]  # (two chunks: the pool is used)
    assert _left_by_a_ctrl_c_as_workers_start(
        monkeypatch, lambda: score_parallel({}, {}, ScoreConfig(), ids, workers=2)) == []


@contextlib.contextmanager
def _sigint_handler_from_c(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[object]]:
    """Make SIGINT's handler look installed from C (by a program embedding Python), for which
    ``signal.getsignal`` and ``signal.signal`` give None. Yield the handlers set for SIGINT
    meanwhile (``signal.signal`` with None raises TypeError, as the real one does)."""
    real_signal, real_getsignal = signal.signal, signal.getsignal
    before, current, installed = real_getsignal(signal.SIGINT), [None], []

    def fake_signal(signum: int, handler: object) -> object:
        if signum != signal.SIGINT:
            return real_signal(signum, handler)
        real_signal(signum, handler)
        installed.append(handler)
        old, current[0] = current[0], handler
        return old

    monkeypatch.setattr(signal, "signal", fake_signal)
    monkeypatch.setattr(signal, "getsignal", lambda signum: current[0]
                        if signum == signal.SIGINT else real_getsignal(signum))
    try:
        yield installed
    finally:
        monkeypatch.undo()
        signal.signal(signal.SIGINT, before)  # (pytest's own Ctrl-C)


def _sigint_blocked() -> bool:
    return signal.SIGINT in signal.pthread_sigmask(signal.SIG_BLOCK, [])


@pytest.mark.timeout(60)
def test_a_sigint_handler_from_c_is_left_as_it_was(monkeypatch: pytest.MonkeyPatch) -> None:
    """With a handler installed from C, the block replaced it and then restored it with
    signal.signal(SIGINT, None): TypeError once the workers had started. Now it is left in
    place (Python cannot put it back), and the workers still start with Ctrl-C blocked."""
    pool = cf.ProcessPoolExecutor(1, mp_context=mp.get_context("fork"))
    try:
        with _sigint_handler_from_c(monkeypatch) as installed:
            with starting_workers():
                future = pool.submit(_sigint_blocked)  # (forks the worker)
            assert installed == [] and signal.getsignal(signal.SIGINT) is None
            assert future.result(timeout=30) and not _sigint_blocked()
    finally:
        close_pool(pool)


@pytest.mark.timeout(60)
def test_sigint_once_and_close_pool_leave_a_handler_from_c_as_it_was(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The same TypeError on their way out: each set its own handler and put back None. Now a
    handler from C stays in place, and the pool is still shut down."""
    pool = cf.ProcessPoolExecutor(1, mp_context=mp.get_context("fork"))
    try:
        with _sigint_handler_from_c(monkeypatch) as installed:
            with sigint_once():
                assert pool.submit(_step).result(timeout=30) is None
            close_pool(pool)
            assert installed == [] and signal.getsignal(signal.SIGINT) is None
        assert mp.active_children() == []
    finally:
        close_pool(pool)


_CLEANS_UP = """
import os, pathlib, signal, sys, time
signal.signal(signal.SIGINT, signal.SIG_IGN)  # (as a command that has taken its one Ctrl-C)
os.kill(os.getppid(), signal.SIGINT)  # the terminal's Ctrl-C, as the parent gets it
time.sleep(1.0)  # the child's own clean-up: a torch process takes about that to exit
pathlib.Path(sys.argv[1]).touch()
print("cleaned up")
"""


@pytest.mark.timeout(60)
def test_run_to_end_lets_the_child_finish_its_clean_up_after_a_ctrl_c(tmp_path) -> None:
    """launch.demo's stages and benchmarks.train's torchrun ran under subprocess.run, which on
    Ctrl-C gave the child 0.25 s and then SIGKILL: its clean-up cut short (a stage directory
    left behind; torchrun killed before it stopped its workers). The Ctrl-C still goes on."""
    done = tmp_path / "cleaned-up"
    before = signal.getsignal(signal.SIGINT)
    try:
        with pytest.raises(KeyboardInterrupt), sigint_once():
            run_to_end([sys.executable, "-c", _CLEANS_UP, str(done)], capture_output=True,
                       text=True)
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN  # (further presses: aside)
    finally:
        signal.signal(signal.SIGINT, before)  # (pytest's own Ctrl-C)
    assert done.exists(), "the child was killed before its clean-up ended"


def test_a_ctrl_c_that_numba_reported_as_a_system_error_is_a_keyboard_interrupt() -> None:
    """A press while numba boxed a kernel's returned arrays came out as "SystemError: ...
    returned a result with an exception set" (the KeyboardInterrupt only in its chain), which
    the commands' one-line Ctrl-C handling missed: a traceback, exit 1 (seen in the postproc
    benchmark's Ctrl-C test). Another SystemError stays what it is."""
    from postproc.pools import sigint_once

    # NOTE: Python's own handler set here, not assumed: a suite started in the background by a
    # script (``make test &``, no job control) begins with Ctrl-C ignored, and Python installs
    # none then (the session's handler, which conftest puts back, is SIG_IGN)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    with pytest.raises(KeyboardInterrupt) as got, sigint_once():
        numba_interrupt(KeyboardInterrupt())
    assert isinstance(got.value.__cause__, SystemError)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # (the one it found)
    with pytest.raises(SystemError), sigint_once():
        numba_interrupt(ValueError("not a press"))


def _sigterm_state() -> tuple[bool, bool]:
    """(a worker's SIGTERM action is the default one, SIGTERM is blocked in it)"""
    return (signal.getsignal(signal.SIGTERM) == signal.SIG_DFL,
            signal.SIGTERM in signal.pthread_sigmask(signal.SIG_BLOCK, []))


@pytest.mark.timeout(60)
def test_a_sigterm_while_workers_start_is_held_and_they_take_its_default() -> None:
    """Under stop_signals a SIGTERM inside the pool's start is raised (as Terminated) once the
    workers are started, not in the middle of it (a Ctrl-C's hazard: see above); the workers
    run with SIGTERM's default action, unblocked."""
    from postproc.pools import Terminated, stop_signals

    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    pool = cf.ProcessPoolExecutor(1, mp_context=mp.get_context("fork"), initializer=ignore_sigint)
    reached = False
    try:
        with pytest.raises(Terminated), stop_signals(), starting_workers():
            future = pool.submit(_sigterm_state)  # (forks the worker)
            os.kill(os.getpid(), signal.SIGTERM)
            _step()
            reached = True  # (the old block did not hold SIGTERM: raised before here)
        assert reached and future.result(timeout=30) == (True, False)
    finally:
        close_pool(pool)
        signal.signal(signal.SIGTERM, before[0])
        signal.signal(signal.SIGINT, before[1])  # (pytest's own Ctrl-C: stop_signals set it aside)


@pytest.mark.timeout(60)
def test_a_sigterm_to_a_worker_as_it_starts_ends_it_silently(
        monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]) -> None:
    """A forked worker began with the parent's stop_signals handler: a SIGTERM before its
    initializer (Slurm's to every process of the job) raised Terminated in it, a traceback.
    Now SIGTERM is blocked until the initializer has restored its default: the worker just
    ends by it."""
    from postproc.pools import stop_signals

    before = signal.getsignal(signal.SIGTERM)
    started: list[multiprocessing.process.BaseProcess] = []
    real_start = multiprocessing.process.BaseProcess.start

    def start(self: multiprocessing.process.BaseProcess) -> None:
        real_start(self)
        started.append(self)
        os.kill(self.pid, signal.SIGTERM)  # type: ignore[arg-type]

    monkeypatch.setattr(multiprocessing.process.BaseProcess, "start", start)
    pool = cf.ProcessPoolExecutor(1, mp_context=mp.get_context("fork"), initializer=ignore_sigint)
    try:
        with stop_signals(), starting_workers():
            future = pool.submit(_step)
        with pytest.raises(cf.process.BrokenProcessPool):
            future.result(timeout=30)
    finally:
        close_pool(pool)
        signal.signal(signal.SIGTERM, before)
    started[0].join(timeout=30)
    assert started[0].exitcode == -signal.SIGTERM
    assert "Traceback" not in capfd.readouterr().err
