"""Worker pools and Ctrl-C: a terminal sends SIGINT to the whole process group, workers included.

The workers ignore it (:func:`ignore_sigint`, their initializer) and the parent, which gets the
KeyboardInterrupt, stops them (:func:`close_pool`). A worker that took it died with a traceback
(or broke the pool); a parent whose wait for its workers a second Ctrl-C cut short left them
waiting for work, and hung at exit joining them. Once the command's top level has the
KeyboardInterrupt (``postproc.cli.exit_on_error``), Ctrl-C stays ignored until the process has
exited (:func:`ignore_further_sigint`): one line, 'interrupted', and exit code 130 however often
it is pressed. A command runs under :func:`stop_signals`, so that "from then on" starts at the
first press itself, not where the unwinding reaches a handler; a SIGTERM (``kill``, Slurm's
``scancel`` or time limit, torchrun's) takes the same path: 'terminated (SIGTERM)', exit code 143.
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
    # NOTE: a forked worker inherits the parent's SIGTERM handler (stop_signals): it raised in
    # the worker, a traceback. A SIGTERM ends a worker silently, as it always did; one that came
    # while it started (blocked then: starting_workers) ends it here.
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})


@contextlib.contextmanager
def starting_workers() -> Iterator[None]:
    """Start a pool's worker processes inside: they begin with Ctrl-C and SIGTERM blocked (until
    their initializer, :func:`ignore_sigint`, has set the handlers of a worker), and a Ctrl-C or
    SIGTERM meanwhile is held and raised on the way out.

    NOTE: a forked worker starts with the parent's handlers: a SIGTERM (Slurm's ``scancel`` to
    every process of the job) before its initializer raised :class:`Terminated` in it, a
    traceback.

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

    NOTE: ``trainer.dist._stops_held`` (around the process group's teardown) holds signals
    too, and differs on purpose: it holds only the command's own :func:`stop_signals` handler
    and blocks nothing, so that a teardown hung with the GIL held is still ended by a SIGTERM
    whose action is the default (the kernel's), and it forks no worker that needs the mask.
    Here every Python-level handler is held (a pool starts in a moment), and the mask is for
    the forked workers.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pressed: list[int] = []
    # (a handler installed from C, None, is left in place: see the note above)
    found = {sig: handler for sig in (signal.SIGINT, signal.SIGTERM)
             if (handler := signal.getsignal(sig)) is not None}
    for sig in found:
        signal.signal(sig, lambda signum, frame: pressed.append(signum))
    old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)  # (one pending is recorded here)
        for sig, handler in found.items():
            signal.signal(sig, handler)
        if pressed:  # to the handler found: KeyboardInterrupt, Terminated, the default action,
            signal.raise_signal(pressed[0])  # or nothing when ignored


def close_pool(pool: cf.Executor | None) -> None:
    """Shut ``pool`` down: running tasks finish, queued ones are dropped; a further Ctrl-C or
    SIGTERM meanwhile is ignored (the wait is short: one task per worker).

    NOTE: SIGTERM too since :func:`stop_signals` made it raise: one that came while an error's
    clean-up waited here cut the wait short, and the workers, still running their tasks, were
    joined at the interpreter's exit instead."""
    if pool is None:
        return
    main = threading.current_thread() is threading.main_thread()
    # (None: not the main thread, or a handler installed from C, left as it is: see
    # starting_workers; a SIGTERM with its default action is left to end the process)
    old = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)} if main else {}
    held = {sig: h for sig, h in old.items()
            if h is not None and (sig == signal.SIGINT or h is _stop_once)}
    for sig in held:
        signal.signal(sig, signal.SIG_IGN)
    try:
        pool.shutdown(wait=True, cancel_futures=True)
    finally:
        for sig, handler in held.items():
            signal.signal(sig, handler)


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


TERMINATED_EXIT = 128 + signal.SIGTERM  # a shell's code for a process ended by SIGTERM: 143


class Terminated(KeyboardInterrupt):
    """A SIGTERM, taken as a Ctrl-C is (see :func:`stop_signals`): a KeyboardInterrupt, so that
    every clean-up that handles a Ctrl-C handles it too."""


_stops: list[int] = []  # the signal that stopped this process inside stop_signals, if any


def _stop_once(signum: int, frame: object) -> None:
    _stops.append(signum)
    for sig in (signal.SIGINT, signal.SIGTERM):  # (a handler installed from C stays)
        if signal.getsignal(sig) is _stop_once:
            signal.signal(sig, signal.SIG_IGN)
    raise Terminated if signum == signal.SIGTERM else KeyboardInterrupt


@contextlib.contextmanager
def stop_signals(sigterm: bool = True) -> Iterator[None]:
    """Inside: a SIGTERM stops the command as a Ctrl-C does, and the first of either raises
    (:class:`Terminated` for SIGTERM, KeyboardInterrupt for Ctrl-C) and sets both aside.

    torchrun sends SIGTERM to the surviving workers when one fails (and on a second Ctrl-C), Slurm
    at a job's end or ``scancel`` (SIGKILL follows after KillWait, 30 s by default), ``kill`` by
    default. With the default action the command vanished without a line, its clean-up skipped
    (a stage directory, a pool's workers). Both are set aside at the first, so that neither cuts
    that clean-up short (a SIGTERM that torchrun sends after the Ctrl-C it forwarded; a second
    Ctrl-C while the pool's shutdown waited: the interpreter then ran every queued chunk before
    it let the process go); a clean-up that hangs is ended by the launcher's SIGKILL. Leaving
    without a signal restores the handlers found. ``sigterm=False``: Ctrl-C only
    (:func:`sigint_once`).

    NOTE: Python runs the handler in the main thread between bytecodes: a rank blocked in a
    collective stops once it returns or times out (``dist.timeout_s``), or at the SIGKILL.
    """
    _stops.clear()
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    found = {sig: signal.getsignal(sig)
             for sig in ((signal.SIGINT, signal.SIGTERM) if sigterm else (signal.SIGINT,))}
    for sig, handler in found.items():
        # (None: a handler installed from C, left in place: Python can neither call it nor put
        # it back, see starting_workers; a SIGTERM ignored since the start was ignored on
        # purpose by whatever started this process, as a shell leaves such a signal alone)
        if handler is not None and not (sig == signal.SIGTERM and handler == signal.SIG_IGN):
            signal.signal(sig, _stop_once)
    try:
        yield
    except SystemError as e:  # (numba's form of a press: a traceback, not the one line)
        raise_if_interrupted(e)
        raise
    finally:  # (after a signal both stay set aside)
        for sig, handler in found.items():
            if signal.getsignal(sig) is _stop_once:
                signal.signal(sig, handler)


def sigint_once() -> contextlib.AbstractContextManager[None]:
    """:func:`stop_signals` for Ctrl-C alone: SIGTERM keeps its default action.

    NOTE: for launch.demo (and the benchmarks, which run it): a stop makes it wait for its
    running stage to end (``wait_to_end``), and a ``kill`` of the demo alone reaches no stage,
    which would then run to its end first."""
    return stop_signals(sigterm=False)


def stopped_by() -> str:
    """What stopped this process inside :func:`stop_signals`, for its last line: 'terminated
    (SIGTERM)' or 'interrupted' (a Ctrl-C)."""
    return "terminated (SIGTERM)" if signal.SIGTERM in _stops else "interrupted"


def stop_code() -> int:
    """The exit code for that: 143 (128 + SIGTERM, what a shell reports for a process the signal
    ended) or 130 (128 + SIGINT)."""
    return TERMINATED_EXIT if signal.SIGTERM in _stops else 130


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
