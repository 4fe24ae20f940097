"""Crash-safe file output: write under a temporary name in the same directory, then rename.

A reader therefore sees either the old complete file or the new complete file, never a torn one.
"""

from __future__ import annotations

import contextlib
import errno
import glob
import io
import itertools
import os
import shutil
import stat
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import IO, Any

TMP_SUFFIX = ".tmp"
# NOTE: a name has at most 255 bytes on Linux file systems (ext4, XFS, btrfs, tmpfs: NAME_MAX),
# and atomic_open's temporary name, ".<name>.<mkstemp's 8 random characters>.tmp", is longer
# than the name: a name within 255 - TMP_NAME_EXTRA bytes is what can be written.
NAME_MAX = 255
TMP_NAME_EXTRA = len(".") + len(".") + 8 + len(TMP_SUFFIX)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def fsync_file(path: str | os.PathLike[str]) -> None:
    """Flush a closed file's data to disk (before it is renamed to its final name). An error of
    the sync (EIO) names ``path``: fsync's own names no file."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as e:
        if e.filename is not None or e.errno is None:
            raise
        raise with_filename(e, path) from None
    finally:
        os.close(fd)


def fsync_dir(path: str | os.PathLike[str], placed: str | os.PathLike[str] | None = None
              ) -> None:
    """Make a rename in ``path`` durable (the directory entry itself must reach the disk).

    ``placed``: the file that the rename put in place, named in an error of the sync. NOTE: it
    said only "[Errno 5] Input/output error: 'DIR'", read as the output not written, where the
    file is in place under its name, whole (its data was synced before the rename); only its
    new entry may not survive a crash. Still an error (exit 1 inside ``writing()``): the disk
    errs, and the durability the commands promise is not there; a rerun writes it again."""
    try:
        fsync_file(path)
    except OSError as e:
        if placed is None or e.errno is None:
            raise
        raise OSError(e.errno, f"{e.strerror} at the sync of its directory, after the rename: "
                      f"{placed} is in place, written whole, but its new entry there may not "
                      "survive a crash (rerun to write it again)", str(path)) from None


def check_writable(path: str | os.PathLike[str], what: str,
                   inputs: Iterable[tuple[str, str | os.PathLike[str] | None]] = (),
                   given: str | os.PathLike[str] | None = None,
                   tmp_extra: int = TMP_NAME_EXTRA) -> None:
    """Raise ValueError unless ``path`` could be created or replaced by this user: its name
    leaves room for its temporary name (``tmp_extra`` bytes longer: atomic_open's), its nearest
    existing ancestor is a writable directory, an existing ``path`` is writable, and it is none
    of the command's ``inputs`` (``(flag, path)`` pairs). Checked before a command's work, so a
    typo fails at once. ``given``: the flag's value where ``path`` is a file the command writes
    inside it (an output directory), so that the message names what the user typed."""
    shown = path if given is None else given
    target = Path(path).absolute()
    # NOTE: a name within NAME_MAX but not its temporary name's margin failed only at the write,
    # after the work, with ENAMETOOLONG naming the temporary file: exit 1 (a failure of the run,
    # writing()'s) for a name the user gave, which no rerun fixes
    size = len(os.fsencode(target.name))
    if size > NAME_MAX - tmp_extra:
        raise ValueError(f"{what} {shown}: the name {target.name} has {size} bytes; at most "
                         f"{NAME_MAX - tmp_extra} can be written (its temporary name is "
                         f"{tmp_extra} bytes longer, and a file name has at most {NAME_MAX})")
    if target.is_dir():  # (a file cannot be renamed onto it: found only after the work)
        raise ValueError(f"{what} {path} is a directory; give a file name")
    # NOTE: the rename at the end replaced the input with the output: score --json on its
    # --truth CSV, polygonize --out on a prediction shard. samefile: links and ../ too. Only an
    # existing output can be an input (``inputs`` is then read, so it may be lazy).
    if target.exists():
        for flag, src in inputs:
            if src is not None and Path(src).exists() and os.path.samefile(target, src):
                raise ValueError(f"{what} {path} is the {flag} input {src}; writing it would "
                                 "replace it: give the output another name")
    anc = target.parent
    while not anc.exists():
        anc = anc.parent
    if not anc.is_dir():
        raise ValueError(f"{what} {shown}: {anc} is not a directory")
    if not os.access(anc, os.W_OK | os.X_OK):
        raise ValueError(f"{what} {shown}: {anc} is not writable")
    if target.exists():
        problem = _not_replaceable(target)
        if problem:
            raise ValueError(f"{what} {shown}: {target} {problem}; give another name")


def resolved(path: str | os.PathLike[str], flag: str) -> Path:
    """``path`` absolute, its links followed (``Path.resolve``), or a ValueError naming ``flag``
    and ``path`` for links that cannot be followed to the end (a loop).

    NOTE: Python 3.11 and 3.12 raise a RuntimeError for a loop ("Symlink loop from ..."), 3.13
    an OSError: neither is one of the errors the commands report as bad input, so a loop given
    as a path was a traceback and exit 1, where the path is the user's to change (2)."""
    try:
        return Path(path).resolve()
    except (RuntimeError, OSError) as e:
        raise ValueError(f"{flag} {path}: its symbolic links cannot be followed ({e})") from None


def check_not_a_directory(path: str | os.PathLike[str], flag: str, what: str) -> None:
    """Raise ValueError naming ``path`` if it is a directory: a file the command writes under a
    name it learns only from its input (a tile's, ``DIR/<ImageId>.geojson``), which
    :func:`check_writable` could not see up front. ``flag``: the option and the directory the
    user gave (``--out D``); ``what``: what goes at ``path``.

    NOTE: the rename onto it failed at the output step ("Is a directory"), a WriteError: exit 1,
    "the disk's, rerun", for a directory that the user must move (2). One lstat: a link to a
    directory is replaced like a file, and a name not there (the usual case) costs ~1 us."""
    try:
        mode = os.lstat(path).st_mode
    except OSError:  # (not there; any other trouble shows at the write, naming the file)
        return
    if stat.S_ISDIR(mode):
        raise ValueError(f"{flag}: {path} is a directory, where {what} goes; move it away or "
                         f"give another {flag.split()[0]}")


def _not_replaceable(target: Path) -> str | None:
    """Why this user may not replace the existing file ``target``, or None.

    NOTE: the rename at the end needs only the directory's write permission, so it replaced a
    file whose mode protects it (chmod a-w, another account's 0644 file in a shared directory)
    without a word; and in a sticky directory (/tmp) the rename of another account's file failed
    after the work, with "[Errno 1] Operation not permitted" naming the temporary file. (root
    may do both: os.access says so.)"""
    if not os.access(target, os.W_OK):
        return "is read-only for this user"
    folder = target.parent.stat()
    euid = os.geteuid()
    if folder.st_mode & stat.S_ISVTX and euid not in (0, folder.st_uid, target.stat().st_uid):
        return "belongs to another user in a sticky directory, which only its owner may replace"
    return None


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike[str], mode: str = "wb", sweep: bool = True,
                make_dirs: bool = True, **kwargs: Any) -> Iterator[IO[Any]]:
    """Open a temporary sibling of ``path`` for writing; rename it onto ``path`` on success.

    On an exception the temporary file is removed and ``path`` is left untouched, as are its
    directories: those made for it go too. ``sweep`` first removes the temporary files of
    ``path`` that a killed writer left (see below); pass False where several processes may write
    one path at once. ``make_dirs=False``: the directory must exist (FileNotFoundError if not).
    """
    path = Path(path)
    made = missing_dirs(path.parent) if make_dirs else []
    if make_dirs:
        path.parent.mkdir(parents=True, exist_ok=True)
    if sweep:
        remove_stale_temps(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TMP_SUFFIX, dir=path.parent)
    # NOTE: everything after mkstemp is inside the try, and the file object owns the descriptor
    # first: a Ctrl-C in the fchmod that came between them and the try left the empty temporary
    # file behind (and the descriptor open).
    f = None
    committing = False  # (past the body: flushing, syncing and closing the temporary file)
    try:
        f = _open_output(fd, mode, path, **kwargs)
        with f:
            # mkstemp creates 0600; give the file the mode a plain open() would have.
            os.fchmod(f.fileno(), 0o666 & ~_umask())
            yield f
            committing = True
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent, placed=path)
    except BaseException as e:
        if f is None:  # (_open_output refused the mode or an argument: the descriptor is ours)
            with contextlib.suppress(OSError):
                os.close(fd)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        # NOTE: as trainer.predict removes an --out it made: a polygonize --out NEW/p.csv, whose
        # CSV is open all run, left NEW behind empty on an error or a Ctrl-C
        remove_made_dirs(made)
        if _names_output(e, committing):
            raise with_filename(e, path) from None
        raise


class _OutputFileIO(io.FileIO):
    """The temporary file's raw layer: an error of its write (EIO, ENOSPC: write(2)'s, which
    names no file) names the output ``dest``.

    NOTE: a large write in atomic_open's body (past the buffer) reaches the disk there, not at
    the commit, and its EIO said "[Errno 5] Input/output error" alone; the body's other errors
    cannot be named (a read of another file, see :func:`_names_output`), but one of this file's
    writes is the output's."""

    def __init__(self, fd: int, mode: str, dest: Path) -> None:
        super().__init__(fd, mode)
        self.dest = dest

    def write(self, b: Any) -> int | None:
        try:
            return super().write(b)
        except OSError as e:
            if e.filename is not None or e.errno is None:
                raise
            raise with_filename(e, self.dest) from None


def _open_output(fd: int, mode: str, dest: Path, buffering: int = -1,
                 encoding: str | None = None, errors: str | None = None,
                 newline: str | None = None) -> IO[Any]:
    """``os.fdopen(fd, mode, ...)`` for atomic_open's modes (``w``, ``w+``, binary or text),
    on an :class:`_OutputFileIO`: the layers that ``open`` builds, with their errors."""
    if set(mode) - set("wb+") or "w" not in mode:
        raise ValueError(f"atomic_open writes a new file: mode {mode!r} is not w, wb, w+ or w+b")
    binary = "b" in mode
    if binary and (encoding, errors, newline) != (None, None, None):
        raise ValueError("binary mode doesn't take an encoding, errors or newline argument")
    if buffering == 0 and not binary:
        raise ValueError("can't have unbuffered text I/O")
    raw = _OutputFileIO(fd, "w+" if "+" in mode else "w", dest)
    if buffering == 0:
        return raw
    # (the file system's block size, at least io's default: Python 3.11's open() takes the
    # block size alone, 4096 on ext4; a larger buffer only writes less often)
    size = buffering if buffering > 1 else max(os.fstat(fd).st_blksize, io.DEFAULT_BUFFER_SIZE)
    buf = (io.BufferedRandom if "+" in mode else io.BufferedWriter)(raw, size)
    if binary:
        return buf
    text = io.TextIOWrapper(buf, encoding, errors, newline, line_buffering=buffering == 1)
    text.mode = mode  # type: ignore[misc]  # (as open() sets it: TextIOWrapper has none)
    return text


def _names_output(error: BaseException, committing: bool) -> bool:
    """Whether atomic_open names its output in ``error``: an OSError that names no file, raised
    while the temporary file was flushed, synced or closed (``committing``: an EIO there said
    only "[Errno 5] Input/output error", no file and so no disk), or by the body with an errno
    that only a write gives (:data:`NO_ROOM`).

    NOTE: not every errno of the body: a body may read as it writes (trainer.checkpoint copies
    a file into the output, polygonize's CSV stays open while the shards are read), and an EIO
    or ENOENT of that read names no file either; naming the output there would send the user
    to the wrong disk. A small file's writes reach the kernel only at the flush, which is the
    commit's."""
    return (isinstance(error, OSError) and error.filename is None and error.errno is not None
            and (committing or error.errno in NO_ROOM))


def remove_stale_temps(path: str | os.PathLike[str]) -> None:
    """Remove the temporary files of ``path`` (``.<name>.*.tmp`` beside it) that a killed
    writer left.

    NOTE: every output has one writer (rank 0 for shared files), so a temporary file of this
    path that exists when its writer starts was left by a killed one: it goes, or each kill
    would leave one."""
    path = Path(path)
    for stale in path.parent.glob(f".{glob.escape(path.name)}.*{TMP_SUFFIX}"):
        with contextlib.suppress(FileNotFoundError, IsADirectoryError):
            stale.unlink()


def missing_dirs(path: str | os.PathLike[str]) -> list[Path]:
    """``path`` and those of its ancestors that do not exist, deepest first: the directories
    that making ``path`` creates (looked for only up to the first that exists: its ancestors
    exist too)."""
    path = Path(path)
    return list(itertools.takewhile(lambda d: not d.exists(), (path, *path.parents)))


def remove_made_dirs(made: Sequence[Path]) -> None:
    """Remove the directories of ``made`` (from :func:`missing_dirs`, deepest first) that are
    empty: one that holds something now (another output, the user's file) stays."""
    for d in made:
        with contextlib.suppress(OSError):
            d.rmdir()


# What a write gets from a full disk, a quota or a file size limit.
NO_ROOM = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})


def with_filename(error: OSError, path: str | os.PathLike[str]) -> OSError:
    """``error`` naming ``path``: a write to an open file fails naming no file, and "[Errno 28]
    No space left on device" alone does not say which output, and so which disk, it was.
    (A :class:`WriteError` stays one: its class says the exit code.)"""
    cls = WriteError if isinstance(error, WriteError) else OSError
    return cls(error.errno, error.strerror, str(path))


class WriteError(OSError):
    """An OSError raised while a command wrote or published its outputs (a full disk, EIO, a
    quota): a failure of the run, to rerun (exit code 1), where an OSError otherwise is a path
    that cannot be used (bad input, 2). Raised by :func:`writing`; its message is the
    original's, naming the file."""


@contextlib.contextmanager
def writing() -> Iterator[None]:
    """Inside, an OSError is the disk's: it leaves as a :class:`WriteError`.

    NOTE: one marker for every command's output phase (trainer.predict's stage, the postproc
    commands' outputs): they check their output paths up front (:func:`check_writable`, bad
    input, 2) and their readers turn an unreadable input into their own error (a PredError, a
    CsvError), so an OSError left by the time the outputs are written is the disk's. An
    exit code cannot tell that by the error's type (ENOSPC and EACCES are both OSError), and a
    relayed error reaches the other ranks as its classes' names only (``trainer.dist._said``):
    so the class says it."""
    try:
        yield
    except WriteError:
        raise
    except OSError as e:
        raise as_write_error(e).with_traceback(e.__traceback__) from None


def as_write_error(error: OSError) -> WriteError:
    """``error`` as a :class:`WriteError`, with the same errno, text and file names."""
    if error.errno is not None and error.strerror is not None:
        return WriteError(error.errno, error.strerror, error.filename, None, error.filename2)
    return WriteError(*error.args)


STAGING = ".partial"
DISCARDED = ".discarded-"  # a stage being removed: STAGING + this + a process id


def staging_dir(out: str | os.PathLike[str]) -> Path:
    """Where a command builds a whole output directory before moving it up into ``out``: inside
    ``out``, so the moves are renames on one file system even when ``out`` is a mount point, and
    hidden, so readers of ``out`` that list its files do not see it."""
    return Path(out) / STAGING


def fresh_staging_dir(out: str | os.PathLike[str]) -> Path:
    """An empty :func:`staging_dir` of ``out`` (a killed run's removed first)."""
    staging = staging_dir(out)
    if staging.exists():
        shutil.rmtree(staging)
    remove_discarded(out)
    staging.mkdir(parents=True)
    return staging


def remove_discarded(out: str | os.PathLike[str]) -> None:
    """Remove what a killed :func:`discard_staging_dir` of ``out`` left (its renamed stage)."""
    for trash in Path(out).glob(f"{glob.escape(STAGING)}{DISCARDED}*"):
        shutil.rmtree(trash, ignore_errors=True)


def discard_staging_dir(out: str | os.PathLike[str], made: Sequence[Path] = ()) -> None:
    """Remove a failed or interrupted run's :func:`staging_dir` of ``out``, and the directories
    this run created for it (``made``: :func:`missing_dirs` of ``out`` before the run, ``out``
    and its new ancestors) that hold nothing else: the file system is left as it was.

    NOTE: a rerun would remove the stage too, but until then a directory that this run made for
    nothing stayed, holding only it. A publish under way leaves its mark (``out`` not empty).
    Ancestors too: ``--geojson NEW/gj`` left NEW behind, empty (and with ``--out NEW/p.csv``,
    whose own clean-up came first, while NEW still held the stage).
    """
    staging = staging_dir(out)
    # NOTE: renamed aside, then removed: under torchrun another rank's pool may still finish a
    # chunk into the stage (postproc.polygonize --geojson), and a tile renamed in after rmtree
    # had listed the stage kept it (and a DIR made for it) from going. Once it is renamed, no
    # write reaches it: those writes make no directory (they fail; that rank is stopping).
    trash = staging.with_name(f"{STAGING}{DISCARDED}{os.getpid()}")
    try:
        os.rename(staging, trash)
    except OSError:  # (no stage: nothing to rename; or the name taken: removed in place)
        trash = staging
    shutil.rmtree(trash, ignore_errors=True)
    remove_made_dirs(made)  # (not empty, or never made: stays)


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    with atomic_open(path, "wb") as f:
        f.write(data)


def atomic_write_text(path: str | os.PathLike[str], text: str, sweep: bool = True,
                      make_dirs: bool = True) -> None:
    with atomic_open(path, "w", sweep=sweep, make_dirs=make_dirs, encoding="utf-8") as f:
        f.write(text)
