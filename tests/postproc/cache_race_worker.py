"""Run by test_numbacache_race: ``cache_race_worker.py A|B SYNC_DIR`` compiles ``race_kernel.twice``
(A for an int64, B for a float64 argument) with barriers inside numba's cache save, so that both
processes read the cache index before either writes it: the interleaving that crossed numba's
index and data files. ``check`` instead prints, as JSON, what a later process gets from the
cache: ``twice(3)``, ``twice(1.5)`` and every index entry whose data file holds another
signature's code. ``W`` and ``R`` (after ``plain`` cached an older ``twice``): W compiles the
edited kernel and writes its index, then waits for R to load before it writes the data, the
interleaving in which R loaded the older code as the new."""

from __future__ import annotations

import json
import pickle
import sys
import time
from pathlib import Path

from numba.core import caching

WAIT_S = 3.0  # NOTE: with the lock the other process cannot get there: each wait runs out


def _wait(path: Path) -> None:
    end = time.monotonic() + WAIT_S
    while not path.exists() and time.monotonic() < end:
        time.sleep(0.01)


def _hook(role: str, sync: Path) -> None:
    """A writes its index after B has read the index and its data after B has written both."""
    cls = caching.IndexDataCacheFile
    save_index, save_data = cls._save_index, cls._save_data

    def hooked_index(self, overloads):  # type: ignore[no-untyped-def]
        if role == "A":
            _wait(sync / "B_read")
        else:
            (sync / "B_read").touch()
            _wait(sync / "A_index")
        save_index(self, overloads)

    def hooked_data(self, name, data):  # type: ignore[no-untyped-def]
        if role == "A":
            (sync / "A_index").touch()
            _wait(sync / "B_done")
        save_data(self, name, data)
        if role == "B":
            (sync / "B_done").touch()

    cls._save_index, cls._save_data = hooked_index, hooked_data


PRECONDITION_S = 60.0  # (R waits for W's compile: not the race, a start that may be slow)


def _hook_reload(role: str, sync: Path) -> None:
    """W writes its data after R has loaded (or WAIT_S); R loads once W has written its index
    (outside numba's load: a reader waiting inside the lock would hold the writer off)."""
    cls = caching.IndexDataCacheFile
    load_data, save_data = cls._load_data, cls._save_data

    def hooked_save_data(self, name, data):  # type: ignore[no-untyped-def]
        (sync / "W_index").touch()
        _wait(sync / "R_loaded")
        save_data(self, name, data)

    def hooked_load_data(self, name):  # type: ignore[no-untyped-def]
        try:
            return load_data(self, name)
        finally:
            (sync / "R_loaded").touch()

    if role == "W":
        cls._save_data = hooked_save_data
        return
    cls._load_data = hooked_load_data
    end = time.monotonic() + PRECONDITION_S
    while not (sync / "W_index").exists() and time.monotonic() < end:
        time.sleep(0.01)


def _crossed(cache: Path) -> list[str]:
    """Index entries (of every ``.nbi`` under ``cache``) whose data is another signature's."""
    bad = []
    for index in cache.rglob("*.nbi"):
        with open(index, "rb") as f:
            pickle.load(f)  # (numba's version)
            _, overloads = pickle.loads(f.read())
        for key, name in overloads.items():
            data = index.parent / name
            if data.exists():
                sig = pickle.loads(data.read_bytes())[3]  # (CompileResult._reduce's signature)
                if tuple(sig.args) != tuple(key[0]):
                    bad.append(f"{name}: index {key[0]}, data {sig.args}")
    return bad


def main() -> None:
    import race_kernel  # (written by the test; NUMBA_CACHE_DIR is the test's)

    role = sys.argv[1]
    if role == "check":
        crossed = _crossed(Path(sys.argv[2]))
        print(json.dumps({"int": repr(race_kernel.twice(3)), "float": repr(race_kernel.twice(1.5)),
                          "crossed": crossed}))
        return
    if role == "plain":
        print(repr(race_kernel.twice(3)))
        return
    if role in ("W", "R"):
        _hook_reload(role, Path(sys.argv[2]))
        print(repr(race_kernel.twice(3)))
        return
    _hook(role, Path(sys.argv[2]))
    print(repr(race_kernel.twice(3 if role == "A" else 1.5)))


if __name__ == "__main__":
    main()
