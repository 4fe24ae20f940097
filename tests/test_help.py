"""Every command's --help states the defaults README's commands rely on: a user reading
``--help`` instead of README found ``--tiles TILES``, ``--split SPLIT``, ``--out OUT`` with no
word of 20 or 300 tiles, 70,15,15, 200 samples per shard, the test split or the demo's paths."""

from __future__ import annotations

import importlib
import re

import pytest

WANTED = {
    "dataio.synth": ["tiles to write (default 20)", "tile width and height in pixels (default "
                     "650)", "metres per pixel (default 0.3)", "default EPSG:4326",
                     "default OGC:CRS84", "worker processes (default 1)"],
    "dataio.prepare": ["weights (default 70,15,15)", "samples per shard (default 200)",
                       "outline (default 2.5)", "seed of the split's shuffle (default 0)",
                       "cores, at most 4", "new imagery without labels",
                       "put every tile into the test split", "0 to N px (default 64; 0: none)"],
    "trainer.predict": ["split of --data to predict (default test)",
                        "tiles per prediction shard (default 100)",
                        "2 bad input or settings", "1 a failure of the run (a full disk while "
                        "writing the stage or --out, a lost rank, a bug)"],
    # (a flag left out takes --settings' or the run's tuned value: "default 20.0" was wrong there)
    "postproc.polygonize": ["under this many px (default: the settings' value, else 20.0)",
                            "above this (default: the settings' value, else 0.5)",
                            "tuned RUN/postproc.json"],
    "launch.demo": ["writes (default demo)", "synthetic AOI (default 300)",
                    "training preset (default configs/demo.toml)", "report (default 4)"],
}


@pytest.mark.parametrize("module", sorted(WANTED))
def test_help_states_the_defaults(module: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as stop:
        importlib.import_module(module).main(["--help"])
    assert stop.value.code == 0
    text = re.sub(r"\s+", " ", capsys.readouterr().out)  # (argparse wraps the help lines)
    missing = [w for w in WANTED[module] if w not in text]
    assert not missing, f"{module} --help lacks {missing}:\n{text}"
