"""The threads of this process by their OS names (Linux), for the torchrun workers that check
what outlives dist.teardown (imports nothing from the tests)."""

from __future__ import annotations

from pathlib import Path


def thread_names() -> list[str]:
    names = []
    for task in Path("/proc/self/task").iterdir():
        try:
            names.append((task / "comm").read_text().strip())
        except FileNotFoundError:  # (a thread that ended since the listing: not alive)
            continue
    return sorted(names)


def gloo_threads() -> list[str]:
    """The process group's threads (pt_gloo_runloop, gloo_tcp_loop) still running here."""
    return [name for name in settled_thread_names() if "gloo" in name]


def settled_thread_names(timeout: float = 2.0) -> list[str]:
    """:func:`thread_names` once no gloo thread is listed, or after ``timeout`` s.

    NOTE: a joined thread's /proc entry can outlast the join by a moment (the kernel wakes the
    joiner before it removes the task); a thread that outlives teardown stays for good."""
    import time

    deadline = time.monotonic() + timeout
    names = thread_names()
    while any("gloo" in n for n in names) and time.monotonic() < deadline:
        time.sleep(0.05)
        names = thread_names()
    return names
