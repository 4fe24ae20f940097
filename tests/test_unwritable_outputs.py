"""Outputs that cannot be written: each command refuses them in one line naming the flag and the
path the user gave (not a file it writes inside it), with exit code 2, before any work, and
leaves everything as it was.

The ``nobody`` tests run the commands as another account for real (setpriv), since as root (how
the suite runs here) every permission check passes; they are skipped unless the suite runs as
root with setpriv and nobody can run this Python on this checkout (a venv under a 0700 home
cannot be). The others fake os.access or put the output under a file, so they run anywhere."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from proc_helpers import NOBODY, as_nobody, nobody_scratch

from dataio.prepare import PrepareConfig, check_output
from launch.demo import check_out

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def scratch() -> Iterator[Path]:
    """:func:`proc_helpers.nobody_scratch` for this module's tests (skipped where nobody cannot
    run this Python; the root-free tests below still run)."""
    with nobody_scratch() as base:
        yield base


def _tree(path: Path) -> dict[str, tuple[int, bytes]]:
    return {str(p.relative_to(path)): (p.stat().st_mode, p.read_bytes() if p.is_file() else b"")
            for p in sorted(path.rglob("*"))}


def _refused(result: subprocess.CompletedProcess, named: str, problem: str) -> None:
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2, result.stderr
    assert named in lines[-1] and problem in lines[-1], lines
    assert "Traceback" not in result.stderr, result.stderr


def test_score_json_that_is_a_read_only_file_is_refused(scratch: Path) -> None:
    home = scratch / "home"
    truth = scratch / "truth.csv"
    truth.write_text("ImageId,BuildingId,PolygonWKT_Pix,PolygonWKT_Geo\n"
                     "t1,1,\"POLYGON ((0 0,0 10,10 10,10 0,0 0))\",POLYGON EMPTY\n")
    proposals = scratch / "proposals.csv"
    proposals.write_text("ImageId,BuildingId,PolygonWKT_Pix,Confidence\n"
                         "t1,1,\"POLYGON ((0 0,0 10,10 10,10 0,0 0))\",1\n")
    out = home / "score.json"  # nobody's own file in nobody's directory, but read-only
    out.write_text("kept\n")
    os.chown(out, NOBODY, NOBODY)
    out.chmod(0o444)
    before = _tree(scratch)
    result = as_nobody(["-m", "postproc.score", "--truth", str(truth), "--proposals",
                         str(proposals), "--json", str(out), "--workers", "1"], home)
    _refused(result, str(out), "is read-only for this user")
    after = _tree(scratch)
    assert {k: v for k, v in after.items() if not k.startswith("home/.")} == \
        {k: v for k, v in before.items() if not k.startswith("home/.")}


def test_prepare_into_an_existing_directory_nobody_may_write_is_refused(scratch: Path,
                                                                        small_aoi: Path) -> None:
    # (was "[Errno 13] Permission denied: 'OUT/.partial'", naming no flag)
    ro = scratch / "ro"
    for p in (small_aoi, *small_aoi.rglob("*")):  # (pytest's basetemp is root's 0700: a copy)
        dst = scratch / "raw" / p.relative_to(small_aoi)
        dst.mkdir(parents=True) if p.is_dir() else shutil.copyfile(p, dst)
    for p in (scratch / "raw", *(scratch / "raw").rglob("*")):
        p.chmod(0o755 if p.is_dir() else 0o644)
    result = as_nobody(["-m", "dataio.prepare", "--raw", str(scratch / "raw"), "--out",
                         str(ro), "--workers", "1", "--quiet"], scratch / "home")
    _refused(result, f"--out {ro}: {ro} is not writable", "")
    assert list(ro.iterdir()) == []


def test_a_demo_out_nobody_may_write_is_refused(scratch: Path) -> None:
    # (was exit code 1 after the checks, "[Errno 13] Permission denied: 'OUT'")
    out = scratch / "ro" / "demo"
    result = as_nobody(["-m", "launch.demo", "--out", str(out), "--tiles", "5"],
                        scratch / "home")
    _refused(result, f"--out {out}: {scratch / 'ro'} is not writable", "")
    assert not out.exists()


def _deny_writing(monkeypatch: pytest.MonkeyPatch, denied: Path) -> None:
    real = os.access
    monkeypatch.setattr(os, "access", lambda p, mode, **kw: False if Path(p).absolute() ==
                        denied.absolute() and mode & os.W_OK else real(p, mode, **kw))


def test_an_existing_prepare_out_that_cannot_be_written_is_refused(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "data"
    out.mkdir()
    _deny_writing(monkeypatch, out)
    with pytest.raises(ValueError, match=f"^--out {out}: {out} is not writable$"):
        check_output(PrepareConfig(raw=[tmp_path], out=out))


def test_a_demo_out_that_cannot_be_written_is_refused(tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    _deny_writing(monkeypatch, tmp_path)
    with pytest.raises(ValueError, match=f"^--out {tmp_path}/demo: {tmp_path} is not writable$"):
        check_out(tmp_path / "demo")


def _main(module: str, argv: list[str]) -> int:
    import importlib

    from postproc.cli import exit_on_error

    main = importlib.import_module(module).main
    if module.startswith("postproc."):
        return exit_on_error(lambda: main(argv))
    return main(argv)


@pytest.mark.parametrize("module, flag", [
    ("dataio.synth", "--out"), ("dataio.prepare", "--out"), ("trainer.predict", "--out"),
    ("trainer.train", "--run-dir"), ("postproc.render", "--out"),
    ("postproc.polygonize", "--geojson"), ("launch.demo", "--out")])
def test_an_output_directory_is_named_as_given(module: str, flag: str, tmp_path: Path,
                                               small_aoi: Path, small_dataset: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    """Not by a file the command writes inside it: "--run-dir RUN/config.json", "--geojson
    DIR/x.geojson" (a file no run writes), "--out AOI/.synth-incomplete" were named."""
    (tmp_path / "file").write_text("")
    given = tmp_path / "file" / "out"
    ckpt = tmp_path / "ckpt.pt"
    ckpt.write_text("")
    argv = {"dataio.synth": ["--tiles", "1", "--size", "64"],
            "dataio.prepare": ["--raw", str(small_aoi), "--quiet"],
            "trainer.predict": ["--run-dir", str(tmp_path), "--data", str(small_dataset),
                                "--checkpoint", str(ckpt)],
            "trainer.train": ["--config", str(ROOT / "configs" / "tiny.toml"), "--data",
                              str(small_dataset), "--check"],
            "postproc.render": [],
            "postproc.polygonize": ["--pred", str(tmp_path / "pred"), "--out",
                                    str(tmp_path / "p.csv")],
            "launch.demo": ["--tiles", "5"]}[module]
    try:
        rc = _main(module, [*argv, flag, str(given)])
    except SystemExit as e:  # (launch.demo refuses through argparse)
        rc = e.code
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert rc == 2 and last.endswith(f"{flag} {given}: {tmp_path / 'file'} is not a directory"), \
        last


def test_the_kernels_load_for_an_account_with_no_cache_of_its_own(scratch: Path) -> None:
    """nobody can write neither the checkout's postproc/__pycache__ nor its home (/nonexistent,
    as /etc/passwd has it): every postproc command died at import with numba's "RuntimeError:
    cannot cache function '_find': no locator available". The cache goes to a 0700 directory
    of its own under TMPDIR instead."""
    home = scratch / "home"
    result = as_nobody(["-c", "import postproc.score, postproc.polygonize"], home,
                        HOME="/nonexistent", XDG_CACHE_HOME="")
    assert result.returncode == 0, result.stderr
    cache = home / f"footprints-numba-{NOBODY}"
    assert cache.is_dir() and cache.stat().st_uid == NOBODY and \
        stat.S_IMODE(cache.stat().st_mode) == 0o700
