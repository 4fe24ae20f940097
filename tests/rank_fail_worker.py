"""Run under torchrun: ``rank_fail_worker.py MODULE ARGS...``: on rank ``FAIL_RANK`` (default 1)
the step named by ``FAIL_AT`` fails, then MODULE's real main runs with ARGS.

``FAIL_AT``: ``geojson`` (postproc.polygonize's GeoJSON writes hit a full disk), ``pred``
(trainer.predict's shard writes hit a full disk), ``bug`` (trainer.predict's network raises a
RuntimeError, as for a bug in the code), ``publish`` (its publish into --out fails: EIO; rank 0
is the one that publishes), ``val`` (trainer.train's validation raises, as for a
tile the polygonizer refuses), ``ckpt`` (trainer.predict's checkpoint does not load, as one
replaced while the ranks read it), ``weights`` (it loads other weights than on the other ranks),
``fsync`` (the sync of the file named ``FAIL_FILE`` fails, EIO, as atomic_open commits it:
postproc.polygonize's CSV, its GeoJSON ledger as it publishes, postproc.score's --json)."""

from __future__ import annotations

import errno
import os
import sys


def _full(*args, **kwargs):  # type: ignore[no-untyped-def]
    raise OSError(errno.ENOSPC, "No space left on device")


def _eio(*args, **kwargs):  # type: ignore[no-untyped-def]
    raise OSError(errno.EIO, "Input/output error", "simulated")


def _bug(*args, **kwargs):  # type: ignore[no-untyped-def]
    raise RuntimeError("simulated: a bug in this rank's prediction")


def _refused(*args, **kwargs):  # type: ignore[no-untyped-def]
    raise ValueError("simulated: a tile the polygonizer refuses")


def _unreadable(path, *args, **kwargs):  # type: ignore[no-untyped-def]
    raise ValueError(f"{path}: simulated: not a readable checkpoint")


def _eio_at_sync_of(name: str):  # type: ignore[no-untyped-def]
    """os.fsync, failing (EIO, naming no file, as the kernel's) for a temporary file of ``name``
    (atomic_open's ``.<name>.*.tmp``) only."""
    real = os.fsync

    def fsync(fd):  # type: ignore[no-untyped-def]
        if os.path.basename(os.readlink(f"/proc/self/fd/{fd}")).startswith(f".{name}."):
            raise OSError(errno.EIO, "Input/output error")
        return real(fd)
    return fsync


def _other_weights(load):  # type: ignore[no-untyped-def]
    def other(*args, **kwargs):  # type: ignore[no-untyped-def]
        state = load(*args, **kwargs)
        first = next(iter(state["model"]))
        state["model"][first] = state["model"][first] + 1
        return state
    return other


if __name__ == "__main__":
    module, argv = sys.argv[1], sys.argv[2:]
    if os.environ.get("RANK") == os.environ.get("FAIL_RANK", "1"):
        what = os.environ["FAIL_AT"]
        if what == "geojson":
            from postproc import geojson
            geojson.atomic_write_text = _full
        elif what == "pred":
            from postproc import predio
            predio.write_pred_shard = _full  # (predict imports it when it runs)
        elif what == "bug":
            from trainer import predict
            predict.predict_probs = _bug  # (looked up by name where each batch is predicted)
        elif what == "publish":
            from postproc import predio
            predio.publish_pred_dir = _eio  # (predict imports it when it runs)
        elif what == "fsync":
            os.fsync = _eio_at_sync_of(os.environ["FAIL_FILE"])
        elif what in ("ckpt", "weights"):
            from trainer import checkpoint
            checkpoint.load = _other_weights(checkpoint.load) if what == "weights" else _unreadable
        else:
            from trainer.validate import Validator
            Validator._f1_counts = _refused  # type: ignore[method-assign]
    from importlib import import_module
    main = import_module(module).main
    if module.startswith("postproc."):  # (as their ``__main__`` runs them)
        from postproc.cli import exit_on_error
        sys.exit(exit_on_error(lambda: main(argv)))
    sys.exit(main(argv))
