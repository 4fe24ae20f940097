"""Run by test_predict under torchrun: ``predict_record_worker.py PREDICT-ARGS...``: the real
``trainer.predict`` command, each rank noting its writes into the prediction's directories (the
stage's key and provenance, every shard, the publish into --out) as lines ``WHAT NAME`` in
``$PRED_RECORD/rank-R.txt``: which rank did which side effect."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

from postproc import predio
from trainer import predict, predresume

_RANK = os.environ.get("RANK", "0")


def _note(what: str, path: Path | str) -> None:
    record = Path(os.environ["PRED_RECORD"]) / f"rank-{_RANK}.txt"
    with open(record, "a", encoding="utf-8") as f:
        f.write(f"{what} {Path(path).name}\n")


def _noting(what: str, fn: Any) -> Any:
    def wrapper(path: Path, *args: Any, **kwargs: Any) -> Any:
        _note(what, path)
        return fn(path, *args, **kwargs)
    return wrapper


# (each module's own name: predict and predresume imported atomic_write_text from dataio.atomic;
# predict imports write_pred_shard and publish_pred_dir from postproc.predio inside its run)
predict.atomic_write_text = _noting("write", predict.atomic_write_text)
predresume.atomic_write_text = _noting("write", predresume.atomic_write_text)
predio.write_pred_shard = _noting("shard", predio.write_pred_shard)
_real_publish = predio.publish_pred_dir


def _publish(staging: Path, out: Path) -> None:
    _note("publish", out)
    _real_publish(staging, out)


predio.publish_pred_dir = _publish

if __name__ == "__main__":
    sys.exit(predict.main())
