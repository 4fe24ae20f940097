"""Where numba keeps the compiled kernels (``cache=True``) when it has no place of its own.

numba caches beside the source (``postproc/__pycache__``) or under the user's cache directory
(``~/.cache/numba``). An account that can write neither (a checkout installed by another
account, run by one without a writable home: ``nobody``, a container's arbitrary uid) died at
import of every postproc command, and of training with validation F1, with numba's
"RuntimeError: cannot cache function '_find': no locator available for file ...".
"""

from __future__ import annotations

import contextlib
import os
import stat
import sys
import tempfile
from pathlib import Path

ENV = "NUMBA_CACHE_DIR"


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
