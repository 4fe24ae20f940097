"""Command-line plumbing shared by the postproc commands: bad input is one line and exit code 2,
a failure while the outputs are written (a full disk) one line and 1; the
``--pushgateway``/``--job`` flags that push a run's metrics (``postproc.pushmetrics``)."""

from __future__ import annotations

import argparse
import errno
import os
import sys
import urllib.parse
from collections.abc import Callable
from concurrent.futures import BrokenExecutor

from dataio.atomic import WriteError, writing
from postproc.csvio import CsvError
from postproc.pools import ignore_further_sigint, say, stop_code, stop_signals, stopped_by
from postproc.predio import PredError
from postproc.pushmetrics import PostprocRun, push


def exit_on_error(main: Callable[[], int]) -> int:
    """Run ``main``; turn expected failures (bad paths, malformed files) into one line on stderr.

    Unexpected exceptions keep their traceback: they are bugs, not bad input. An OSError is a
    path that cannot be used (2), but one raised while the outputs are written (a WriteError,
    see ``dataio.atomic.writing``: a full disk, EIO) is a failure of the run (1). Ctrl-C is one line
    and 130, a SIGTERM one line and 143, and from then on both are ignored in this process
    (``postproc.pools``): the caller is to exit with that code. Under torchrun another rank's
    failure (a RankError) is its line and the code that rank exits with; a lost peer is
    ``trainer.dist.describe_failure``'s line and 1. A closed stdout (``| head -0``) is 1 and
    nothing said (:func:`end_quietly`), or after a failure, that failure's line and code.
    """
    code = _exit_code(main)
    if code != 0:
        # NOTE: a failure's stdout is flushed here too: at the interpreter's exit, what it had
        # printed (score's figures before its --json failed) met the closed pipe, and exit
        # 120 with "Exception ignored ... BrokenPipeError" replaced the failure's code. Any
        # error of it (a closed pipe, the full disk already said) is left unsaid: the
        # failure's line and code are the run's.
        try:
            if sys.stdout is not None:
                sys.stdout.flush()
        except OSError:
            end_quietly()
        except ValueError:  # (a closed stdout object: nothing held)
            pass
    return code


def _exit_code(main: Callable[[], int]) -> int:
    """:func:`exit_on_error`'s code for ``main``, its line said."""
    try:
        # (a second press, or a SIGTERM after it, cannot cut the first one's clean-up short)
        with stop_signals():
            code = main()
            # (a closed stdout shows here, where it is handled, not in the interpreter's exit;
            # a full disk under it is a failure of the run, 1, as for the outputs)
            if sys.stdout is not None:
                with writing():
                    sys.stdout.flush()
            return code
    except (PredError, CsvError, ValueError, OSError) as e:  # OSError: paths that cannot be used
        if stdout_gone(e):
            return end_quietly()
        say(f"error: {e}")
        # NOTE: a full disk while writing said 2, "fix the input", for a rerun that needs room
        return 1 if isinstance(e, WriteError) else 2
    except KeyboardInterrupt:  # (a SIGTERM too: the outputs are written whole at the end)
        ignore_further_sigint()  # (a second Ctrl-C in the exit was a traceback, or exit -2)
        say(stopped_by())
        return stop_code()
    except BrokenExecutor:  # (a RuntimeError: before the clause below)
        # NOTE: a pool worker killed (the kernel's OOM killer on a large share, a signal) or
        # crashed: the pool's traceback said nothing the user can act on; the outputs are
        # written at the end (or staged), so none was.
        say("error: a worker process died (killed, e.g. out of memory, or crashed); no output "
            "was written: rerun, with fewer --workers if memory ran out")
        return 1
    except RuntimeError as e:  # under torchrun: another rank's failure, or a lost one
        dist = sys.modules.get("trainer.dist")
        if dist is None:
            raise
        # (a peer killed mid-run: gloo's or NCCL's raw text and a traceback, before; the
        # outputs are written at the end or staged, so a rerun starts over)
        lost = dist.describe_failure(e)
        if lost is None and not isinstance(e, dist.RankError):
            raise
        say(f"error: {lost or e}")
        if isinstance(e, dist.RankError) and BrokenPipeError.__name__ in e.kinds:
            return 1  # (rank 0's stdout closed: it ends quietly with 1, see end_quietly)
        # NOTE: exit as the failing rank does (the clauses above): 1 for a lost peer; 2 for its
        # bad input (a PredError or CsvError is a ValueError; an OSError) and for an agreed
        # refusal with no error of one rank; 1 for a dead pool worker, a full disk while
        # writing the outputs (a WriteError, by its name in the kinds), and for a bug (a
        # traceback there, exit 1). The others said 2 for all, and torchrun's summary named bad
        # input or not by which ended first. (The mapping is trainer.predict's too.)
        return dist.exit_code_for(e)


def stdout_gone(error: BaseException) -> bool:
    """Whether ``error`` is a write to a pipe that its reader has closed: ``| head``, a pager
    quit. EPIPE naming no file: a BrokenPipeError, or the WriteError that
    ``dataio.atomic.writing`` makes of one (the outputs are files, written under a temporary
    name: theirs name the file), so a command's stdout or stderr."""
    return isinstance(error, OSError) and error.errno == errno.EPIPE and error.filename is None


def end_quietly() -> int:
    """Exit code 1, nothing said, for a closed stdout (:func:`stdout_gone`), as Python's docs
    recommend (the signal module's "Note on SIGPIPE"): stdout becomes /dev/null, so that the
    interpreter's flush at exit does not fail again.

    NOTE: it said "error: [Errno 32] Broken pipe", exit 2 ("fix the input"), where a print
    wrote at once (PYTHONUNBUFFERED, -u), and without a buffer flushed only at exit: "Exception
    ignored ... BrokenPipeError" and exit 120. score's --json is written after its figures are
    printed, so with the first, not at all (whole or absent, as for any failure of the run)."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError, AttributeError):  # (no stdout, or one without a descriptor)
        pass
    return 1


def report(text: str) -> None:
    """Print a command's report (its last lines) at once, as one of its output writes.

    NOTE: inside ``writing()``: a print to a full disk (``> report.txt`` on /dev/full) with an
    unbuffered stdout (``python -u``, PYTHONUNBUFFERED) raised a bare OSError there, read as a
    path that cannot be used, exit 2, where the buffered flush at the end said 1. Now 1 either
    way, and a closed stdout (``| head -0``) still ends quietly with 1 (:func:`stdout_gone`
    sees a WriteError of EPIPE as it sees a BrokenPipeError)."""
    with writing():
        print(text, flush=True)


def _gateway_url(text: str) -> str:
    # NOTE: checked at start-up: a typo should not surface only after the run's work is done.
    if any(c.isspace() or not c.isprintable() for c in text):  # (urllib refuses it at the push)
        raise argparse.ArgumentTypeError(f"{text!r}: a URL holds no spaces or control characters")
    # NOTE: the URL that prometheus_client will push to: it keeps an http(s) scheme and puts
    # http:// before anything else, so 'http:/gw:9091' (one slash) is pushed as it is (no host),
    # and 'http//gw:9091' goes to a host named "http".
    parts = urllib.parse.urlsplit(text)
    if parts.scheme not in ("http", "https") and "://" not in text:
        parts = urllib.parse.urlsplit(f"http://{text}")
    try:
        _ = parts.port  # ValueError for a port that is not a number in 0-65535
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"{text!r}: {e}") from None
    if (parts.scheme not in ("http", "https") or not parts.hostname
            or parts.hostname in ("http", "https")):
        raise argparse.ArgumentTypeError(f"{text!r} is not http://HOST:PORT "
                                         "(e.g. http://127.0.0.1:9091)")
    return text


def add_push_args(p: argparse.ArgumentParser, job: str) -> None:
    g = p.add_argument_group("metrics")
    g.add_argument("--pushgateway", type=_gateway_url, default=None, metavar="URL",
                   help="push the run's metrics to this Prometheus Pushgateway when it ends "
                        "(rank 0); a failed push is a warning, the exit code stays 0")
    g.add_argument("--job", default=job,
                   help=f"job label of the pushed metrics (default {job}); the grouping key "
                        "adds instance=<host name>")


def push_metrics(args: argparse.Namespace, run: PostprocRun) -> None:
    """Push ``run`` if ``--pushgateway`` was given (rank 0 only: the caller's job)."""
    if args.pushgateway is not None:
        push(args.pushgateway, args.job, run)
