"""Worker pools and Ctrl-C: a terminal sends SIGINT to the whole process group, workers included.

The workers ignore it (:func:`ignore_sigint`, their initializer) and the parent, which gets the
KeyboardInterrupt, stops them (:func:`close_pool`). A worker that took it died with a traceback
(or broke the pool); a parent whose wait for its workers a second Ctrl-C cut short left them
waiting for work, and hung at exit joining them.
"""

from __future__ import annotations

import concurrent.futures as cf
import signal
import threading


def ignore_sigint() -> None:
    """Pool initializer: Ctrl-C is the parent's to handle."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def close_pool(pool: cf.Executor | None) -> None:
    """Shut ``pool`` down: running tasks finish, queued ones are dropped; a further Ctrl-C
    meanwhile is ignored (the wait is short: one task per worker)."""
    if pool is None:
        return
    main = threading.current_thread() is threading.main_thread()
    old = signal.signal(signal.SIGINT, signal.SIG_IGN) if main else None
    try:
        pool.shutdown(wait=True, cancel_futures=True)
    finally:
        if main:
            signal.signal(signal.SIGINT, old)
