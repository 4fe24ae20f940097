"""Where numba keeps the compiled kernels (``cache=True``) when it has no place of its own.

numba caches beside the source (``postproc/__pycache__``) or under the user's cache directory
(``~/.cache/numba``). An account that can write neither (a checkout installed by another
account, run by one without a writable home: ``nobody``, a container's arbitrary uid) died at
import of every postproc command, and of training with validation F1, with numba's
"RuntimeError: cannot cache function '_find': no locator available for file ...".

It also makes numba's cache writes safe across processes (:func:`njit`): several processes
compiling the kernels at once (torchrun ranks, pytest-xdist workers on a fresh checkout) crossed
numba's cache index and its data files, and a later process ran one signature's code on
another's arguments (or, loading during a save after an edit, the older source's code); and it
makes a kernel's cache go stale when a module it imports changes, not only its own file
(:func:`_stamp_imports`).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import inspect
import os
import re
import stat
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

ENV = "NUMBA_CACHE_DIR"
LOCK_NAME = ".footprints-numba-save.lock"  # one a cache directory, beside numba's own files


def can_write(path: Path) -> bool:
    """numba's own test of a cache directory (``_CacheLocator.ensure_cache_path``)."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=path).close()
    except OSError:
        return False
    return True


def user_cache() -> Path:
    """numba's user-wide cache directory on Linux (appdirs' ``user_cache_dir``)."""
    return Path(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")) / "numba"


def private_dir() -> Path | None:
    """``<temp dir>/footprints-numba-<uid>``, made 0700 and used only while it is this user's
    alone (compiled code is loaded from it: another account could plant some), else a fresh
    directory; None where the temp dir cannot be written either."""
    try:
        # NOTE: in the try: with no writable temp dir at all gettempdir raises (FileNotFoundError)
        path = Path(tempfile.gettempdir()) / f"footprints-numba-{os.getuid()}"
        with contextlib.suppress(FileExistsError):
            path.mkdir(mode=0o700)
        st = path.lstat()
        if stat.S_ISDIR(st.st_mode) and st.st_uid == os.getuid() and not st.st_mode & 0o077:
            return path
        return Path(tempfile.mkdtemp(prefix="footprints-numba-"))
    except OSError:
        return None


def ensure_cache_dir() -> None:
    """Point numba at :func:`private_dir` when neither of its own cache places is writable (and
    NUMBA_CACHE_DIR is not set): the kernels then compile once per user, not fail."""
    if os.environ.get(ENV):
        return
    if can_write(Path(__file__).parent / "__pycache__") or can_write(user_cache()):
        return
    path = private_dir()
    if path is None:
        return  # (nothing writable at all: numba says so itself)
    os.environ[ENV] = str(path)  # (also for the processes this one starts)
    if "numba" in sys.modules:  # NOTE: numba reads the variable once, at its import
        from numba.core import config

        config.CACHE_DIR = str(path)


def _locked(method: Callable[..., Any], exclusive: bool = True) -> Callable[..., Any]:
    """``method`` (numba's cache save or load) holding a ``flock`` on the cache directory's
    :data:`LOCK_NAME`: exclusive for a save, shared for a load."""

    @functools.wraps(method)
    def locked(self: Any, *args: Any) -> Any:
        import fcntl  # (POSIX: serialize_cache_writes patches nothing without it)

        try:  # read-only is enough for flock: an account that shares the cache can lock too
            fd = os.open(os.path.join(self._cache_path, LOCK_NAME), os.O_RDONLY | os.O_CREAT,
                         0o644)
        except OSError:  # (numba's own save then says what is wrong; a load finds nothing)
            return method(self, *args)
        try:
            with contextlib.suppress(OSError):  # NOTE: ENOLCK (NFS without lockd): unlocked,
                fcntl.flock(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)  # as numba's
            return method(self, *args)
        finally:
            os.close(fd)  # (releases the lock)

    locked.footprints_locked = True  # type: ignore[attr-defined]
    return locked


def serialize_cache_writes() -> None:
    """Make numba's cache saves take turns between processes, and its loads wait for a save
    under way (idempotent).

    NOTE: numba writes each index and data file atomically (a temporary name, then
    ``os.replace``), so no process reads a partial file, but ``IndexDataCacheFile.save`` is an
    unlocked read-modify-write: load the index, give a new signature the first free data number,
    write the index, then the data. Two processes that add different signatures of one kernel at
    once both take number 1; the index keeps one's entry and the data file can keep the other's
    code, which every later process loads for the wrong signature (no check: a float64 argument
    went to the int64 code and ``twice(1.5)`` returned 2). Same-signature writes only lost
    entries (a recompile). Holding a lock over the whole save (compiling stays parallel; a save
    is milliseconds) keeps the index and the data files in step. A load takes the lock shared:
    between a save's index and its data, the index names a data file that may still hold the
    code of an older source (a stale index is replaced, and its data numbers are reused from 1),
    which a reader then ran as the new (``twice`` edited from ``x * 2`` to ``x * 3`` returned 6).
    tests/postproc/test_numbacache_race.py forces both interleavings.
    """
    try:
        import fcntl  # noqa: F401 (locked's)
    except ImportError:  # (not POSIX: numba's own save and load)
        return
    from numba.core import caching

    # (numba's internals: a numba without them runs its own; the tests say so)
    cls = getattr(caching, "IndexDataCacheFile", None)
    for name, exclusive in (("save", True), ("load", False)):
        method = getattr(cls, name, None)
        if method is not None and not getattr(method, "footprints_locked", False):
            setattr(cls, name, _locked(method, exclusive))


def _module_file(base: Path, parts: list[str]) -> Path | None:
    """The file of module ``parts`` under ``base`` (``a/b.py`` or ``a/b/__init__.py``)."""
    for path in (base.joinpath(*parts).with_suffix(".py"), base.joinpath(*parts, "__init__.py")):
        if parts and path.is_file():
            return path
    return None


# a top-level import statement: ``from M import a, b`` (names in parentheses over several lines
# too) or ``import M, N``. NOTE: a scan, not ast.parse: parsing the kernel modules cost ~50 ms at
# every import of them.
IMPORT = re.compile(r"^(?:from[ \t]+([\w.]+)[ \t]+import[ \t]+(\([^)]*\)|[^\n#]*)"
                    r"|import[ \t]+([^\n#]+))", re.M)


@functools.cache
def _imported_files(path: Path, top: str, top_dir: Path) -> frozenset[Path]:
    """The files of the modules of package ``top`` (in ``top_dir``) that ``path`` imports at its
    top level (absolute imports, as the project writes them)."""
    found: set[Path] = set()
    for m in IMPORT.finditer(path.read_text(encoding="utf-8")):
        words = [w.split()[0] for w in (m[2] or m[3]).strip("()").split(",") if w.split()]
        names = [f"{m[1]}", *(f"{m[1]}.{w}" for w in words)] if m[1] else words
        for name in names:
            first, *rest = name.split(".")
            if first == top and (f := _module_file(top_dir, rest)) is not None:
                found.add(f)
    return frozenset(found)


@functools.cache
def kernel_sources(path: Path, module: str) -> tuple[Path, ...]:
    """``path`` (module ``module``) and every module of its package it imports, and they import,
    and so on: the source a kernel there may have compiled into itself."""
    parts = module.split(".") + (["__init__"] if path.name == "__init__.py" else [])
    files = {path}
    if len(parts) > 1:  # (a top-level module imports no package of its own)
        top, top_dir = parts[0], path.parents[len(parts) - 2]
        todo = [path]
        while todo:
            for f in _imported_files(todo.pop(), top, top_dir) - files:
                files.add(f)
                todo.append(f)
    return tuple(sorted(files))


@functools.cache  # (once a module: its kernels share it)
def sources_stamp(path: Path, module: str) -> str:
    """A hash of :func:`kernel_sources`' contents."""
    digest = hashlib.sha256()
    for f in kernel_sources(path, module):
        digest.update(f.name.encode() + b"\0" + f.read_bytes())
    return digest.hexdigest()


def _stamp_imports(dispatcher: Any) -> Any:
    """``dispatcher``'s cache made stale by an edit of a module its source imports, not only of
    its own file.

    NOTE: numba stamps a cache index with its own source file's time and size alone, and a
    kernel holds the machine code of the kernels it calls: after an edit (or a ``git pull``)
    that changed only ``label.py``, ``tilekernel.polygonize_tile`` kept running the old
    labelling from the cache (numba's docs, "Cache invalidation", say so). The stamp gets a
    hash of the imported modules' source too.
    """
    cache_file = getattr(getattr(dispatcher, "_cache", None), "_cache_file", None)
    stamp = getattr(cache_file, "_source_stamp", None)
    if stamp is not None:  # (None: no cache, numba's NullCache)
        func = dispatcher.py_func
        cache_file._source_stamp = (stamp, sources_stamp(Path(inspect.getfile(func)).resolve(),
                                                         func.__module__))
    return dispatcher


def njit(*args: Any, **kwargs: Any) -> Any:
    """``numba.njit`` for the project's kernels (all ``cache=True``), after
    :func:`serialize_cache_writes`, with :func:`_stamp_imports`. (numba is imported here, not
    at ``import postproc``: a command that runs no kernel does not pay for it.)"""
    serialize_cache_writes()
    from numba import njit as numba_njit

    if args:  # njit(func, ...)
        return _stamp_imports(numba_njit(*args, **kwargs))
    decorate = numba_njit(**kwargs)
    return lambda func: _stamp_imports(decorate(func))
