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
    return [name for name in thread_names() if "gloo" in name]
