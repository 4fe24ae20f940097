"""Worker pools and Ctrl-C: a terminal sends SIGINT to the whole process group, workers included.

The workers ignore it (:func:`ignore_sigint`, their initializer) and the parent, which gets the
KeyboardInterrupt, stops them (:func:`close_pool`). A worker that took it died with a traceback
(or broke the pool); a parent whose wait for its workers a second Ctrl-C cut short left them
waiting for work, and hung at exit joining them. Once the command's top level has the
KeyboardInterrupt (``postproc.cli.exit_on_error``), Ctrl-C stays ignored until the process has
exited (:func:`ignore_further_sigint`): one line, 'interrupted', and exit code 130 however often
it is pressed. A command runs under :func:`sigint_once`, so that "from then on" starts at the
first press itself, not where the unwinding reaches a handler.
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from typing import Any


def say(line: str) -> None:
    """Write ``line`` to stderr in one write: a command's last line on each rank.

    NOTE: under torchrun every rank's stderr is one pipe, and print's two writes (the text, then
    the newline; unbuffered with PYTHONUNBUFFERED) from two ranks interleaved: both ranks'
    'interrupted' lines ran into one. A write up to PIPE_BUF bytes to a pipe is not split.
    """
    sys.stderr.write(f"{line}\n")
    sys.stderr.flush()


def ignore_sigint() -> None:
    """Pool initializer: Ctrl-C is the parent's to handle."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # NOTE: a forked worker inherits the parent's SIGTERM handler (trainer.dist.stop_signals):
    # it raised in the worker, a traceback. A SIGTERM ends a worker silently, as it always did.
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


@contextlib.contextmanager
def starting_workers() -> Iterator[None]:
    """Start a pool's worker processes inside: they begin with Ctrl-C blocked, and a Ctrl-C
    meanwhile is held and raised on the way out.

    NOTE: for spawned workers: one spends seconds importing (torch) before its initializer sets
    Ctrl-C aside, and a Ctrl-C then killed it with a KeyboardInterrupt traceback. A signal mask
    is inherited across fork and exec, and a blocked Ctrl-C that arrives meanwhile is dropped
    once the initializer ignores it.

    NOTE: blocking it here does not hold it for this process: another thread (tqdm's monitor,
    started by any bar) takes it, and Python raises KeyboardInterrupt in the main thread all the
    same, inside the pool's start. One raised between a worker's start and the pool's note of it
    (or before the pool's manager thread started) left that worker waiting for work no shutdown
    sends: 'interrupted', then a hang at exit joining it. So the press is only recorded inside,
    and delivered once the workers are started and known.

    NOTE: a handler installed from C (a program embedding Python; ``getsignal`` says None) is
    left in place, and a press is its own, not held: Python can neither call it nor put it back
    (``signal.signal(SIGINT, None)`` raised TypeError on the way out, after the workers had
    started, and left the recording handler in place). Ctrl-C is still blocked inside: the
    workers start with it blocked, and a press meanwhile reaches that handler on the way out.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pressed: list[int] = []
    handler = signal.getsignal(signal.SIGINT)
    hold = handler is not None
    if hold:
        signal.signal(signal.SIGINT, lambda signum, frame: pressed.append(signum))
    old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)  # (one pending is recorded here)
        if hold:
            signal.signal(signal.SIGINT, handler)
        if pressed:  # to the handler found: KeyboardInterrupt, or nothing when ignored
            signal.raise_signal(signal.SIGINT)


def close_pool(pool: cf.Executor | None) -> None:
    """Shut ``pool`` down: running tasks finish, queued ones are dropped; a further Ctrl-C
    meanwhile is ignored (the wait is short: one task per worker)."""
    if pool is None:
        return
    main = threading.current_thread() is threading.main_thread()
    # (None: not the main thread, or a handler installed from C, left as it is: see
    # starting_workers)
    old = signal.getsignal(signal.SIGINT) if main else None
    if old is not None:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        pool.shutdown(wait=True, cancel_futures=True)
    finally:
        if old is not None:
            signal.signal(signal.SIGINT, old)


def ignore_further_sigint() -> None:
    """Ignore Ctrl-C from now on: the command has taken the one that stops it and only says so
    and exits.

    NOTE: after its last line the interpreter's teardown took up to a second here (torch,
    numba): a further Ctrl-C raised in threading's shutdown or an atexit callback (an 'Exception
    ignored' traceback after 'interrupted') or, once the teardown had reset the handler to the
    default one, killed the process (exit -2, not 130). That reset leaves SIG_IGN as it is.
    """
    if threading.current_thread() is not threading.main_thread():
        return  # (signal.signal works only there; a command's top level runs there)
    try:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    except KeyboardInterrupt:  # one pressed just before, raised on the way in: ignored as well
        signal.signal(signal.SIGINT, signal.SIG_IGN)


def _interrupt_once(signum: int, frame: object) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    raise KeyboardInterrupt


def interrupted(e: BaseException | None) -> bool:
    """Whether ``e`` is a KeyboardInterrupt or was raised while one was on its way (its chain)."""
    seen: set[int] = set()
    while e is not None and id(e) not in seen:
        if isinstance(e, KeyboardInterrupt):
            return True
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return False


def raise_if_interrupted(e: BaseException) -> None:
    """Raise the KeyboardInterrupt that ``e`` carries in its chain, if it does.

    NOTE: a press while numba boxed the arrays a kernel returns (it calls into Python there)
    comes out as "SystemError: ... returned a result with an exception set", the
    KeyboardInterrupt only in its chain. Where an error is caught to be agreed on or reported,
    that press must go on as the Ctrl-C it was (the command's one line and clean-up)."""
    if not isinstance(e, KeyboardInterrupt) and interrupted(e):
        raise KeyboardInterrupt from e


@contextlib.contextmanager
def sigint_once() -> Iterator[None]:
    """Inside: the first Ctrl-C raises KeyboardInterrupt and sets Ctrl-C aside in the same step.

    NOTE: with the default handler a second press could land while the first one unwound, before
    :func:`close_pool` set Ctrl-C aside; it cut the pool's shutdown short, and at exit the
    interpreter ran every queued chunk before it let the process go. Leaving without a press
    restores the handler found. A handler installed from C stays in place: it could not be put
    back (see :func:`starting_workers`), and Ctrl-C is its own.
    """
    if (threading.current_thread() is not threading.main_thread()
            or signal.getsignal(signal.SIGINT) is None):
        yield
        return
    before = signal.signal(signal.SIGINT, _interrupt_once)
    try:
        yield
    except SystemError as e:  # (numba's form of a press: a traceback, not the one line)
        raise_if_interrupted(e)
        raise
    finally:  # (after a press its handler has set Ctrl-C aside: that stays)
        if signal.getsignal(signal.SIGINT) is _interrupt_once:
            signal.signal(signal.SIGINT, before)


def run_to_end(cmd: list[str], capture_output: bool = False,
               **kwargs: Any) -> subprocess.CompletedProcess:
    """``subprocess.run(cmd, ...)`` for a command that handles Ctrl-C itself: see
    :func:`wait_to_end`."""
    if capture_output:
        kwargs.update(stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    with subprocess.Popen(cmd, **kwargs) as proc:
        out, err = wait_to_end(proc)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def wait_to_end(proc: subprocess.Popen) -> tuple[Any, Any]:
    """``proc.communicate()``; on Ctrl-C the child is waited for to its end, with further
    presses set aside, then KeyboardInterrupt.

    NOTE: the terminal's Ctrl-C reaches the child too (one process group), and the project's
    commands stop by themselves, removing what they half wrote. ``subprocess.run`` gave the
    child 0.25 s and then SIGKILL: a stage killed mid-clean-up left its stage directory, and
    torchrun, killed before it passed the Ctrl-C on to its workers (sessions of their own),
    left them running.
    """
    try:
        return proc.communicate()
    except KeyboardInterrupt:
        ignore_further_sigint()
        proc.communicate()  # (reading on, as after a timeout: the pipes cannot fill up)
        raise
