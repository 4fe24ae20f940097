"""Outputs another account cannot write, for real: the commands run as ``nobody`` (setpriv),
since as root (how the suite runs here) every permission check passes. Each refuses the output
in one line naming it, with exit code 2, before any work, and leaves everything as it was.

Skipped unless the suite runs as root with setpriv, and nobody can run this Python on this
checkout (a venv under a 0700 home cannot be)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NOBODY = 65534
SETPRIV = shutil.which("setpriv")


def _as_nobody(args: list[str], home: Path) -> subprocess.CompletedProcess:
    cmd = [SETPRIV, f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", sys.executable,
           *args]
    # (HOME: numba's cache for a checkout nobody cannot write goes under it)
    env = dict(os.environ, HOME=str(home), PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1",
               TMPDIR=str(home))
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def scratch() -> Iterator[Path]:
    """A directory nobody can reach, outside pytest's basetemp (under a 0700 directory of
    root's), holding ``home/`` (nobody's) and ``ro/`` (root's, 0755: nobody cannot write it)."""
    if os.geteuid() != 0 or SETPRIV is None:
        pytest.skip("needs root and setpriv to run a command as nobody")
    base = Path(tempfile.mkdtemp(prefix="footprints-nobody-", dir="/tmp"))
    try:
        base.chmod(0o755)
        home = base / "home"
        home.mkdir()
        os.chown(home, NOBODY, NOBODY)
        (base / "ro").mkdir(mode=0o755)
        probe = _as_nobody(["-c", "import dataio.atomic"], home)
        if probe.returncode != 0:
            pytest.skip(f"nobody cannot run {sys.executable} on {ROOT}: "
                        f"{probe.stderr.strip().splitlines()[-1:]}")
        yield base
    finally:
        shutil.rmtree(base, ignore_errors=True)


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
    result = _as_nobody(["-m", "postproc.score", "--truth", str(truth), "--proposals",
                         str(proposals), "--json", str(out), "--workers", "1"], home)
    _refused(result, str(out), "is read-only for this user")
    after = _tree(scratch)
    assert {k: v for k, v in after.items() if not k.startswith("home/.")} == \
        {k: v for k, v in before.items() if not k.startswith("home/.")}
