"""dataio.atomic: a reader sees the old file or the new one, never a torn one, and a killed
writer's temporary file does not outlive the next write of its path."""

from __future__ import annotations

import errno
import io
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from dataio import atomic
from dataio.atomic import (
    NAME_MAX,
    TMP_NAME_EXTRA,
    WriteError,
    atomic_open,
    atomic_write_text,
    check_writable,
    discard_staging_dir,
    fresh_staging_dir,
    missing_dirs,
    writing,
)


def test_an_error_keeps_the_old_file_and_leaves_no_temp(tmp_path: Path) -> None:
    path = tmp_path / "out.csv"
    atomic_write_text(path, "old\n")
    with pytest.raises(RuntimeError), atomic_open(path, "w") as f:
        f.write("half of the new")
        raise RuntimeError("the writer failed")
    assert path.read_text() == "old\n" and sorted(p.name for p in tmp_path.iterdir()) == ["out.csv"]


def test_a_killed_writers_temp_goes_with_the_next_write_of_its_path(tmp_path: Path) -> None:
    # what SIGKILL leaves (no cleanup ran), for this path and for others
    killed = [tmp_path / ".out.csv.k3j_x9a1.tmp", tmp_path / ".out.csv.0qz8w2mm.tmp"]
    others = [tmp_path / ".other.csv.k3j_x9a1.tmp", tmp_path / "out.csv.tmp",
              tmp_path / ".out.csvx.abc.tmp", tmp_path / "notes.txt"]
    for p in killed + others:
        p.write_text("partial")
    (tmp_path / ".out.csv.dir.tmp").mkdir()  # not a file of ours: left alone
    atomic_write_text(tmp_path / "out.csv", "new\n")
    assert (tmp_path / "out.csv").read_text() == "new\n"
    assert not any(p.exists() for p in killed)
    assert all(p.read_text() == "partial" for p in others)
    assert (tmp_path / ".out.csv.dir.tmp").is_dir()


def test_the_file_gets_the_mode_a_plain_open_would_give(tmp_path: Path) -> None:
    # (mkstemp makes 0600: another account reading a shared dataset or run directory could not)
    old = os.umask(0o027)
    try:
        atomic_write_text(tmp_path / "atomic.json", "{}")
        (tmp_path / "plain.json").write_text("{}")
    finally:
        os.umask(old)
    modes = {stat.S_IMODE((tmp_path / n).stat().st_mode) for n in ("atomic.json", "plain.json")}
    assert modes == {0o640}


def test_an_output_that_is_a_directory_is_refused_before_the_work(tmp_path: Path) -> None:
    (tmp_path / "out").mkdir()
    with pytest.raises(ValueError, match=r"--out .*out is a directory; give a file name"):
        check_writable(tmp_path / "out", "--out")
    check_writable(tmp_path / "new" / "deeper" / "scores.csv", "--out")  # made when written


_WRITE = """
import resource, signal, sys
from dataio.atomic import atomic_write_text
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails (EFBIG) instead
resource.setrlimit(resource.RLIMIT_FSIZE, (50_000, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
atomic_write_text(sys.argv[1], "x" * 100_000)
"""


def test_a_write_that_finds_no_room_names_the_output(tmp_path: Path) -> None:
    """A full disk, a quota or a size limit: the write's own error ("[Errno 28] No space left on
    device") names no file, as it was made to an open temporary file; a run's log.jsonl or
    config.json then failed without saying which output, and so which disk."""
    path = tmp_path / "log.jsonl"
    res = subprocess.run([sys.executable, "-c", _WRITE, str(path)], capture_output=True,
                         text=True, timeout=120)
    assert res.returncode == 1
    assert res.stderr.splitlines()[-1] == f"OSError: [Errno 27] File too large: '{path}'"
    assert list(tmp_path.iterdir()) == []  # nor a temporary file left


@pytest.mark.parametrize("code", [errno.ENOENT, errno.EIO])
def test_other_errors_of_the_body_pass_unchanged(tmp_path: Path, code: int) -> None:
    """(the body's own, e.g. a read: a body may read as it writes, and its read's EIO is not
    the output's)"""
    err = OSError(code, os.strerror(code))
    with pytest.raises(OSError) as got, atomic_open(tmp_path / "out.bin"):
        raise err
    assert got.value is err


@pytest.mark.parametrize("code", [errno.EIO, errno.ENOSPC])
@pytest.mark.parametrize("mode", ["wb", "w", "w+b"])
def test_a_failed_write_to_the_temporary_file_in_the_body_names_the_output(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mode: str, code: int) -> None:
    """A large write in the body (past the buffer: it reaches the disk at once, not at the
    commit) failing with EIO said "[Errno 5] Input/output error" and no file: which output, and
    so which disk, was left to guess. Only the temporary file's own writes are named (a read of
    another file in the body is not the output's, see the test above); ENOSPC as EIO. The old
    file stays, and no temporary file is left."""

    class Failing(io.FileIO):
        def write(self, b: object) -> int:
            raise OSError(code, os.strerror(code))

    # (the temporary file's raw layer, its write(2) replaced: real FileIO writes go to the kernel)
    monkeypatch.setattr(atomic, "_OutputFileIO",
                        type("Patched", (atomic._OutputFileIO, Failing), {}))
    path = tmp_path / "out.bin"
    path.write_bytes(b"old")
    big = 4 * io.DEFAULT_BUFFER_SIZE
    with pytest.raises(OSError) as got, atomic_open(path, mode) as f:
        f.write("x" * big if "b" not in mode else b"x" * big)
    assert (got.value.errno, got.value.filename) == (code, str(path))
    assert path.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["out.bin"]


@pytest.mark.parametrize("which", ["file", "directory"])
def test_an_io_error_at_the_sync_names_what_was_synced(tmp_path: Path, monkeypatch,
                                                       which: str) -> None:
    """An EIO at the temporary file's fsync said "[Errno 5] Input/output error" and no file (only
    a full disk, a quota or a size limit were named): which output, and so which disk, failed
    was left to guess. The directory's sync comes after the rename: it said only "[Errno 5]
    Input/output error: 'DIR'", read as the output not written, where the new file is in
    place; it says so now. Inside ``writing()`` it leaves as a WriteError (the exit code's 1:
    the disk errs, and the entry may be lost in a crash) with its text, and no temporary file
    is left behind."""
    path = tmp_path / "out.csv"
    atomic_write_text(path, "old\n")
    real, calls = os.fsync, []

    def eio(fd: int) -> None:
        calls.append(fd)
        if len(calls) == (1 if which == "file" else 2):
            raise OSError(errno.EIO, "Input/output error")
        real(fd)

    monkeypatch.setattr(os, "fsync", eio)
    with pytest.raises(WriteError) as got, writing():
        atomic_write_text(path, "new\n")
    said = ("[Errno 5] Input/output error" if which == "file" else
            f"[Errno 5] Input/output error at the sync of its directory, after the rename: "
            f"{path} is in place, written whole, but its new entry there may not survive a "
            "crash (rerun to write it again)")
    named = path if which == "file" else tmp_path
    assert (got.value.errno, str(got.value)) == (errno.EIO, f"{said}: '{named}'")
    assert [p.name for p in tmp_path.iterdir()] == ["out.csv"]
    # (the directory's sync comes after the rename: the new file is in place, as said)
    assert path.read_text() == ("old\n" if which == "file" else "new\n")


def test_a_failed_write_leaves_no_directory_it_made(tmp_path: Path) -> None:
    """The directories made for the output went on only if it was written: a failed write (or
    a Ctrl-C) left them behind, empty. Those that were there stay, as do any that hold more."""
    with pytest.raises(OSError), atomic_open(tmp_path / "new" / "deeper" / "out.bin"):
        raise OSError(errno.ENOSPC, "No space left on device")
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "new").mkdir()
    (tmp_path / "new" / "mine.txt").write_text("x")
    with pytest.raises(KeyboardInterrupt), atomic_open(tmp_path / "new" / "deeper" / "out.bin"):
        raise KeyboardInterrupt
    assert [p.name for p in tmp_path.rglob("*")] == ["new", "mine.txt"]


@pytest.mark.parametrize(("mode", "kwargs"), [
    ("wb", {}), ("w+b", {}), ("w", {}), ("w", {"encoding": "utf-8"}), ("w", {"newline": ""}),
    ("w+", {"encoding": "utf-8"}), ("w", {"buffering": 1})])
def test_the_file_object_is_the_one_open_gives(tmp_path: Path, mode: str,
                                               kwargs: dict[str, object]) -> None:
    """(the temporary file's layers are built by hand, as ``open`` builds them: a text file had
    no ``mode``, which ``open``'s and ``os.fdopen``'s have)"""
    def looks(f: object) -> dict[str, object]:
        return {a: getattr(f, a, "missing") for a in (
            "mode", "encoding", "errors", "line_buffering", "write_through", "closed")}

    with open(tmp_path / "plain", mode, **kwargs) as want, \
            atomic_open(tmp_path / "out", mode, **kwargs) as got:
        assert (type(got), looks(got)) == (type(want), looks(want))
        assert (got.seekable(), got.readable()) == (want.seekable(), want.readable())


def test_a_mode_that_fdopen_refuses_leaves_no_descriptor_open(tmp_path: Path) -> None:
    """(``atomic_open(p, "wb", encoding=...)``: fdopen raised before a file object owned the
    descriptor, and the temporary file went but its descriptor stayed open)"""
    fds = set(os.listdir("/proc/self/fd"))
    with pytest.raises(ValueError, match="encoding"), atomic_open(tmp_path / "out.txt", "wb",
                                                                   encoding="utf-8"):
        pass
    assert set(os.listdir("/proc/self/fd")) <= fds and list(tmp_path.iterdir()) == []


def test_a_discarded_stage_takes_the_directories_made_for_it(tmp_path: Path) -> None:
    """A stage in NEW/sub/OUT went, with OUT, but NEW and NEW/sub (made for it too) stayed,
    empty. Those that hold something else stay."""
    out = tmp_path / "new" / "sub" / "out"
    made = missing_dirs(out)
    fresh_staging_dir(out)
    (tmp_path / "new" / "mine.txt").write_text("x")
    discard_staging_dir(out, made)
    assert [p.name for p in tmp_path.rglob("*")] == ["new", "mine.txt"]
    (tmp_path / "new" / "mine.txt").unlink()
    fresh_staging_dir(out)
    discard_staging_dir(out, made)
    assert list(tmp_path.iterdir()) == []


def test_an_existing_output_this_user_may_not_write_is_refused(tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch
                                                                ) -> None:
    """The rename needs only the directory's write permission: it replaced a read-only file
    (or another account's, in a shared directory) without a word. (os.access is faked, so that
    this runs as root too, whom a file's mode does not stop.)"""
    out = tmp_path / "score.json"
    out.write_text("kept\n")
    out.chmod(0o444)
    real = os.access
    monkeypatch.setattr(os, "access", lambda p, mode, **kw: False if Path(p) == out and
                        mode & os.W_OK else real(p, mode, **kw))
    with pytest.raises(ValueError, match=r"--json .*score.json: .*score.json is read-only for "
                                         "this user; give another name"):
        check_writable(out, "--json")
    check_writable(tmp_path / "new.json", "--json")  # (a new file in the same directory: fine)
    assert out.read_text() == "kept\n"


def test_another_users_file_in_a_sticky_directory_is_refused(tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch
                                                             ) -> None:
    """In /tmp (sticky) the rename of another account's file failed only after the work, with
    "[Errno 1] Operation not permitted" naming the temporary file. (geteuid is faked: this
    process owns both the directory and the file.)"""
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o1777)
    (shared / "theirs.csv").write_text("")
    stranger = os.geteuid() + 4242
    monkeypatch.setattr(os, "geteuid", lambda: stranger)
    with pytest.raises(ValueError, match=r"theirs.csv belongs to another user in a sticky "
                                         "directory"):
        check_writable(shared / "theirs.csv", "--out")
    check_writable(shared / "mine.csv", "--out")
    monkeypatch.undo()
    check_writable(shared / "theirs.csv", "--out")  # (its owner may)


def test_an_oserror_while_writing_is_a_write_error_with_its_text(tmp_path: Path) -> None:
    """Inside ``writing()`` an OSError leaves as a WriteError (the exit code's 1, not 2) with
    its errno, text and file; one named by atomic_open (a full disk) stays a WriteError."""
    with pytest.raises(WriteError) as got, writing():
        raise PermissionError(errno.EACCES, "Permission denied", "a.csv")
    assert (got.value.errno, str(got.value)) == (errno.EACCES, "[Errno 13] Permission denied: "
                                                 "'a.csv'")
    path = tmp_path / "out.csv"
    with pytest.raises(WriteError) as got, atomic_open(path, "w") as f, writing():
        f.write("x")
        raise OSError(errno.ENOSPC, "No space left on device")  # (as write() names none)
    assert str(got.value) == f"[Errno 28] No space left on device: '{path}'"
    with pytest.raises(ValueError), writing():  # (other errors pass unchanged)
        raise ValueError("bad input")


def test_a_name_without_room_for_its_temporary_name_is_refused_up_front(tmp_path: Path) -> None:
    """A name within NAME_MAX whose temporary name is not failed only at the write, after the
    work (ENAMETOOLONG naming the temporary file, exit 1 in writing()); now it is refused
    before, naming the flag. The longest name allowed is written (where the file system's limit
    is NAME_MAX, as on every Linux one; the refusal itself needs no file system)."""
    longest = tmp_path / ("a" * (NAME_MAX - TMP_NAME_EXTRA - len(".json")) + ".json")
    check_writable(longest, "--json")
    over = tmp_path / ("b" * (NAME_MAX - TMP_NAME_EXTRA - len(".json") + 1) + ".json")
    with pytest.raises(ValueError, match=f"--json {over}: the name b+\\.json has "
                                         f"{NAME_MAX - TMP_NAME_EXTRA + 1} bytes; at most "
                                         f"{NAME_MAX - TMP_NAME_EXTRA} can be written"):
        check_writable(over, "--json")
    if os.pathconf(tmp_path, "PC_NAME_MAX") == NAME_MAX:
        atomic_write_text(longest, "{}\n")
        assert longest.read_text() == "{}\n"
        with pytest.raises(OSError, match="File name too long"):  # (what the write would say)
            atomic_write_text(over, "{}\n")
    with pytest.raises(ValueError, match="at most 200 can be written"):  # (another writer's)
        check_writable(tmp_path / ("c" * 201), "--out", tmp_extra=NAME_MAX - 200)
    check_writable(tmp_path / ("c" * 200), "--out", tmp_extra=NAME_MAX - 200)
