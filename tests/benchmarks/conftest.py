"""Fixtures for the benchmark tests: a benchmark run once and read by several tests."""

from __future__ import annotations

import contextlib
import io
import json
from typing import Any

import pytest

POSTPROC_ARGS = ["--tiles", "2", "--repeat", "1", "--workers", "1"]


@pytest.fixture(scope="session")
def postproc_bench(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], str]:
    """``benchmarks.postproc`` on 2 tiles, 1 repeat, 1 worker (``POSTPROC_ARGS``): its JSON and
    what it printed.

    NOTE: one run for test_bench_json (the JSON's header) and test_postproc_bench (its rows and
    stages), which ran this same command each; the first run in a fresh clone also compiles
    every numba kernel of the polygonizer and scorer.
    """
    from benchmarks import postproc

    out = tmp_path_factory.mktemp("postproc_bench") / "postproc.json"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        postproc.main([*POSTPROC_ARGS, "--json", str(out)])
    return json.loads(out.read_text()), printed.getvalue()
