"""A process and all its descendants, from ``/proc``: to measure a command's whole tree, or to
kill it (torchrun starts its workers in sessions of their own, out of reach of ``killpg``)."""

from __future__ import annotations

import contextlib
import os
import signal


def _children(pid: int) -> list[int]:
    """Direct children of ``pid`` (every thread's, since any thread may fork)."""
    out: list[int] = []
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                out.extend(int(x) for x in f.read().split())
        except FileNotFoundError:
            return _children_by_scan(pid)  # NOTE: kernels without CONFIG_PROC_CHILDREN
        except OSError:
            continue
    return out


def _children_by_scan(pid: int) -> list[int]:
    out = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/stat") as f:
                    # the comm field may hold spaces and parentheses: ppid follows the last ')'
                    if int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
                        out.append(int(name))
            except (OSError, IndexError, ValueError):
                continue
    return out


def tree_pids(pid: int) -> list[int]:
    """``pid`` and all its live descendants."""
    seen, todo = [], [pid]
    while todo:
        p = todo.pop()
        seen.append(p)
        todo.extend(c for c in _children(p) if c not in seen)
    return seen


def kill_tree(pid: int) -> None:
    """SIGKILL ``pid``'s whole tree: torchrun starts its workers in sessions of their own, so
    killing the launcher's process group alone leaves them running."""
    for p in tree_pids(pid):  # NOTE: found before any is killed: orphans lose their parent
        with contextlib.suppress(ProcessLookupError):
            os.kill(p, signal.SIGKILL)
