"""Where a prediction directory came from, and the run's tuned postprocessing settings.

``trainer.predict`` writes ``PRED/provenance.json`` (run_dir, checkpoint, data, split, tta;
absolute paths); ``postproc.tune`` writes ``RUN/postproc.json``. Together they let
``postproc.polygonize --pred PRED`` use the settings tuned for the model that made PRED.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

PROVENANCE = "provenance.json"  # the name trainer.predict.PROVENANCE writes
SETTINGS = "postproc.json"  # PolygonizeConfig.to_json() of the tuned settings, in RUN
TUNE_JSON = "tune.json"  # RUN/tune.json: every grid point; best.settings is RUN/postproc.json


def read_provenance(pred_dir: str | Path) -> dict[str, Any] | None:
    """``PRED/provenance.json`` as a dict, None if there is none; malformed is an error."""
    path = Path(pred_dir) / PROVENANCE
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: unreadable provenance ({e}); fix or delete it") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: provenance must be a JSON object; fix or delete it")
    return data


def provenance_path(pred_dir: str | Path, key: str) -> Path | None:
    """A path member (``run_dir``, ``data``, ...) of the provenance, None if absent."""
    data = read_provenance(pred_dir)
    value = None if data is None else data.get(key)
    if value is None:
        return None
    if not isinstance(value, str) or not value:
        raise ValueError(f"{Path(pred_dir) / PROVENANCE}: {key} {value!r} is not a path")
    return Path(value)


def tuned_settings(pred_dir: str | Path) -> tuple[Path | None, Path | None]:
    """(RUN/postproc.json if it exists, RUN) for the run named by the provenance (or Nones)."""
    run = provenance_path(pred_dir, "run_dir")
    if run is None:
        return None, None
    path = run / SETTINGS
    return (path if path.is_file() else None), run


def read_tuned(run: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """(``RUN/postproc.json``, ``RUN/tune.json``) as dicts, checked to be one tuning's pair.

    The tuned F1 in tune.json describes ``best.settings``; a postproc.json with other settings
    (an interrupted tune, or one edited by hand) is an error naming both files.
    """
    docs = []
    for path in (run / SETTINGS, run / TUNE_JSON):
        try:
            docs.append(json.loads(path.read_text(encoding="utf-8")))
        except FileNotFoundError:
            raise ValueError(f"{path} is missing: run postproc.tune --run-dir {run}") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"{path}: unreadable ({e}); rerun postproc.tune --run-dir {run}"
                             ) from None
    settings, doc = docs
    best = doc.get("best") if isinstance(doc, dict) else None
    if not isinstance(best, dict) or best.get("settings") != settings:
        raise ValueError(f"{run / SETTINGS} is not the best.settings of {run / TUNE_JSON} (an "
                         f"interrupted tune, or edited by hand): rerun postproc.tune --run-dir "
                         f"{run}")
    return settings, doc
