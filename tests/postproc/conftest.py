"""Fixtures for the postproc tests (helpers live in ``pp_helpers``)."""

from __future__ import annotations

from pathlib import Path

import pytest
from pp_helpers import make_pred_dir


@pytest.fixture(scope="module")
def pred_dir(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """3 shards x 4 tiles of 200 px (one empty tile per shard), and their truth CSV."""
    return make_pred_dir(tmp_path_factory.mktemp("pred"), shards=3, per_shard=4)
