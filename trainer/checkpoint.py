"""Checkpoints that survive a killed worker: temp name + fsync + rename, newest complete wins.

Files live in ``RUN/checkpoints/``: ``step-00001234.pt`` (by global step), and ``best.pt`` (a
hard link to the best one; each checkpoint names the best as of itself in ``best_step``, so a crash
between a commit and ``mark_best`` is repaired on resume). Everything in them is plain tensors,
numbers, strings, lists and dicts, so they load with ``torch.load(..., weights_only=True)`` and a
crafted pickle is refused.
"""

from __future__ import annotations

import contextlib
import filecmp
import json
import logging
import os
import random
import re
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from dataio.atomic import TMP_SUFFIX, atomic_open, fsync_dir, with_filename

if TYPE_CHECKING:
    from dataio.manifest import Manifest

log = logging.getLogger("footprints")

CKPT_DIR = "checkpoints"
BEST = "best.pt"
FORMAT = 1
_NAME = re.compile(r"^step-(\d{8})\.pt$")
# What a killed writer leaves: dataio.atomic's ".<name>.<random>.tmp", mark_best's ".best.pt.tmp".
_TEMP = re.compile(rf"^\..+{re.escape(TMP_SUFFIX)}$")


def checkpoint_dir(run_dir: Path) -> Path:
    return Path(run_dir) / CKPT_DIR


def checkpoint_path(run_dir: Path, global_step: int) -> Path:
    return checkpoint_dir(run_dir) / f"step-{global_step:08d}.pt"


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints (final names only; temp files are ignored), oldest first."""
    d = checkpoint_dir(run_dir)
    if not d.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in d.iterdir() if (m := _NAME.match(p.name))]
    return [p for _, p in sorted(found)]


def save(state: dict[str, Any], path: Path) -> float:
    """Write ``state`` crash-safely to ``path``; returns the seconds it took."""
    import time

    t0 = time.perf_counter()
    out: _Recorded | None = None
    try:
        with atomic_open(path, "wb") as f:
            out = _Recorded(f)
            torch.save(state, out)
    except RuntimeError as e:
        # NOTE: a Ctrl-C in the middle of the save (in a write, between two) left torch's zip
        # writer out of step, and the end-of-file record it writes on the way out raised
        # "[enforce fail at inline_container.cc] unexpected pos 46 vs 0" over the
        # KeyboardInterrupt: the trainer said that as its error, exit 1, not 'interrupted', 130.
        if isinstance(e.__context__, KeyboardInterrupt):
            raise e.__context__ from None
        # NOTE: on a full disk torch's zip writer got a short write and raised the same: name
        # the checkpoint and the real cause. (An OSError of the file itself already names it:
        # atomic_open.)
        if out is None or out.error is None:
            raise
        raise with_filename(out.error, path) from None
    finally:
        # NOTE: the error's traceback holds this frame, which holds out, which held the error: a
        # cycle that torch's zip writer (holding out, unseen by the garbage collector) made
        # uncollectable. It kept this frame's callers, the Trainer and its DDP model, alive past
        # destroy_process_group after a failed write (a full disk): gloo's threads then ran into
        # the interpreter's exit, which can abort the rank (-6; see trainer.dist.agreed_loader)
        if out is not None:
            out.error = None
    return time.perf_counter() - t0


class _Recorded:
    """A binary file whose failed write is kept in ``error`` (see :func:`save`)."""

    def __init__(self, f: Any) -> None:
        self.f, self.error = f, None

    def write(self, data: bytes) -> int:
        try:  # (a buffered file writes all of ``data`` or raises: no short writes to resume)
            return self.f.write(data)
        except OSError as e:
            self.error = e
            raise

    def flush(self) -> None:
        self.f.flush()


def mark_best(path: Path) -> None:
    """Point ``best.pt`` at ``path`` atomically (hard link, or a copy where links fail)."""
    best = path.parent / BEST
    tmp = path.parent / f".{BEST}.tmp"
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    try:
        os.link(path, tmp)
    except OSError:
        with open(path, "rb") as src, atomic_open(tmp, "wb") as dst:
            dst.write(src.read())
    os.replace(tmp, best)
    fsync_dir(path.parent, placed=best)


def repair_best(run_dir: Path, best_step: int) -> bool:
    """Point ``best.pt`` at ``step-<best_step>.pt`` unless it already is that checkpoint (the same
    file, or a copy of it); True if it had to move. A gone ``step-<best_step>.pt`` is left alone:
    it was pruned after a later checkpoint, and ``mark_best`` always runs before that prune."""
    path = checkpoint_path(run_dir, best_step)
    best = path.parent / BEST
    if not path.is_file():
        return False
    if best.is_file() and (os.path.samefile(best, path) or filecmp.cmp(best, path, shallow=False)):
        return False
    log.warning("%s did not point at %s (a crash before it was marked); re-pointing it", best,
                path.name)
    mark_best(path)
    return True


def remove_temp_files(run_dir: Path) -> list[Path]:
    """Delete the temp files that killed writers left in the checkpoint directory (each is up to a
    full checkpoint; a SIGKILL skips ``atomic_open``'s own clean-up). Only the run's single
    writer may call this, and only while it is not writing (``Trainer.resume`` on rank 0)."""
    d = checkpoint_dir(run_dir)
    if not d.is_dir():
        return []
    gone = [p for p in d.iterdir() if _TEMP.match(p.name) and p.is_file() and not p.is_symlink()]
    for p in gone:
        with contextlib.suppress(FileNotFoundError):
            p.unlink()
    if gone:
        log.info("removed %d temp file(s) left by a killed checkpoint write in %s", len(gone), d)
    return gone


def prune(run_dir: Path, keep_last: int) -> None:
    """Delete all but the newest ``keep_last`` step checkpoints (best.pt is its own link)."""
    for old in list_checkpoints(run_dir)[:-keep_last]:
        with contextlib.suppress(FileNotFoundError):
            old.unlink()


# What every reader needs (predict needs only this).
REQUIRED = ("model",)
# A weight EMA's state (``train.ema_decay`` > 0; ``trainer.ema.WeightEMA.state_dict``): its
# "model" is what validation scored, and what predict and init_from load (:func:`scored`);
# "model" beside it stays the raw weights, which a resume trains on.
EMA = "ema"
# What a resume reads besides (every Trainer.state has them).
# (``best_step`` is optional: checkpoints written before it existed resume without it.)
RESUME_KEYS = ("optimizer", "scheduler", "epoch", "step_in_epoch", "global_step", "best_score",
               "loader", "rng")


def load(path: Path, map_location: str | torch.device = "cpu", mmap: bool = False
         ) -> dict[str, Any]:
    """Load a checkpoint safely (no arbitrary unpickling); ValueError naming the file if it does
    not load, is not this trainer's format, or has no model (``Trainer.resume`` checks the rest
    it needs). ``mmap``: map the file rather than read it, so that only the tensors used are
    read (for a reader of the model alone: its optimizer state is twice its size with Adam)."""
    try:
        state = torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except Exception as e:  # torn, empty, foreign or crafted: all the same to the caller
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise ValueError(f"{path}: not a readable checkpoint ({type(e).__name__}: {first})"
                         ) from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise ValueError(f"{path}: not a checkpoint of this trainer (format {FORMAT})")
    missing = [k for k in REQUIRED if k not in state]
    if missing:
        raise ValueError(f"{path}: checkpoint lacks {', '.join(missing)}")
    _check_state_dict(state["model"], path, "'model'")
    ema = state.get(EMA)
    if ema is not None:
        if not (isinstance(ema, dict) and isinstance(ema.get("updates"), int)):
            raise ValueError(f"{path}: not a checkpoint of this trainer ('{EMA}' is not a "
                             "weight EMA's state: its model and updates)")
        _check_state_dict(ema.get("model"), path, f"'{EMA}' 'model'")
    return state


def _check_state_dict(weights: Any, path: Path, what: str) -> None:
    if not isinstance(weights, dict):
        raise ValueError(f"{path}: not a checkpoint of this trainer ({what} is a "
                         f"{type(weights).__name__}, not a state dict)")
    # (a key that is not a name stopped torch's load_state_dict with an AttributeError)
    odd = next((k for k in weights if not isinstance(k, str)), None)
    if odd is not None:
        raise ValueError(f"{path}: not a checkpoint of this trainer ({what} has a key "
                         f"{odd!r}, not a state dict's tensor name)")


def has_ema(state: dict[str, Any]) -> bool:
    """Does the checkpoint hold a weight EMA (``train.ema_decay`` > 0)?"""
    return state.get(EMA) is not None


def scored(state: dict[str, Any]) -> dict[str, Any]:
    """``state`` with the weights its run validated as its ``"model"``: the weight EMA's where
    it has one (``train.ema_decay``), else its own. What best.pt was chosen by, so what
    ``trainer.predict`` and ``train.init_from`` take; only a resume takes the raw weights."""
    return {**state, "model": state[EMA]["model"]} if has_ema(state) else state


# What torch.compile ("_orig_mod.") and DDP ("module.") put before every key of a wrapped model's
# state dict. This trainer saves the plain module's (models.unwrap_model); another script may not.
WRAPPER_PREFIXES = ("_orig_mod.", "module.")


def plain_state_dict(saved: dict[str, Any], own: Iterable[str]) -> dict[str, Any]:
    """``saved`` without the wrapper prefixes that all of its keys carry (in any order) and none
    of ``own`` (the receiving module's keys) does."""
    own = list(own)
    while saved:
        prefix = next((p for p in WRAPPER_PREFIXES if all(k.startswith(p) for k in saved)
                       and not any(k.startswith(p) for k in own)), None)
        if prefix is None:
            break
        saved = {k[len(prefix):]: v for k, v in saved.items()}
    return saved


def load_model(net: torch.nn.Module, state: dict[str, Any], path: Path, hint: str,
               model_cfg: dict[str, Any] | None = None) -> None:
    """Load ``state``'s weights into ``net`` (a compiled or DDP model's keys too); a mismatch is
    one ValueError naming the file and ``hint`` (what it should match) and saying what differs:
    the model.* keys of ``model_cfg`` that the checkpoint's own config has otherwise, the input
    bands and classes, and the first tensors that differ."""
    own = net.state_dict()
    saved = check_model(own, state, path, hint, model_cfg)
    try:
        net.load_state_dict(saved)
    except RuntimeError as e:  # what the key and shape check does not see (a dtype, ...)
        raise _mismatch(state, path, hint, model_cfg, " ".join(str(e).split())) from None


def check_model(own: dict[str, Any], state: dict[str, Any], path: Path, hint: str,
                model_cfg: dict[str, Any] | None = None) -> dict[str, Any]:
    """``state``'s weights named as ``own`` (a module's state dict: a model built on the meta
    device will do) names them, or :func:`load_model`'s ValueError if their keys or shapes
    differ; for checks made before the weights are needed (``trainer.train``'s
    ``train.init_from``)."""
    saved = plain_state_dict(state["model"], own)
    problem = describe_mismatch(saved, own)
    if problem:
        raise _mismatch(state, path, hint, model_cfg, problem)
    return saved


def _mismatch(state: dict[str, Any], path: Path, hint: str, model_cfg: dict[str, Any] | None,
              problem: str) -> ValueError:
    differs = _config_differences(state, model_cfg)
    return ValueError(f"{path}: its model does not match {hint} "
                      f"({'; '.join([*differs, problem])})")


def source_checkpoint(init_from: str, key: str = "train.init_from") -> Path:
    """The checkpoint file that ``train.init_from`` names: a checkpoint (``step-*.pt``,
    ``best.pt``), or a run directory, whose ``checkpoints/best.pt`` it means (or the best that
    best.pt was not re-pointed at yet: :func:`_recorded_best`); ValueError naming the key and
    the path if there is no such file. ``key``: the setting or flag that named it, for the
    message (``trainer.export`` resolves its ``--checkpoint`` here too)."""
    given = Path(init_from).expanduser()
    path = checkpoint_dir(given) / BEST if given.is_dir() else given
    if path.is_file():
        return _recorded_best(given, path) if given.is_dir() else path
    if not given.is_dir():
        raise ValueError(f"{key}={init_from}: no such file or run directory")
    steps = list_checkpoints(given)
    hint = (f"name one of its checkpoints, e.g. its newest {steps[-1]}" if steps else
            "it has no checkpoints: is it a run directory?")
    raise ValueError(f"{key}={init_from}: {path} not found (the run has no best "
                     f"checkpoint yet); {hint}")


def _recorded_best(run_dir: Path, best: Path) -> Path:
    """``best`` (``run_dir``'s best.pt), unless the run's newest checkpoint names another as its
    best (``best_step``) that best.pt is not: the run was killed between committing that one and
    re-pointing best.pt (a hard link, or a whole copy where links fail), which its own resume
    repairs (:func:`repair_best`); a fine-tune from it before that took the older best.

    NOTE: mapped, not read (see :func:`load`): every rank makes this choice in its pre-group
    check. A gone ``step-<best_step>.pt`` was pruned after ``mark_best`` had run."""
    found = load_latest(run_dir, mmap=True)
    step = found[0].get("best_step") if found else None
    marked = checkpoint_path(run_dir, step) if isinstance(step, int) else None
    try:
        if marked is None or not marked.is_file() or os.path.samefile(best, marked):
            return best
    except OSError:  # (pruned just now by a run still training: best.pt was marked before)
        return best
    try:
        at = load(best, mmap=True).get("global_step")
    except ValueError:  # (a best.pt that does not load: the one named is the run's best)
        return marked
    # NOTE: a best is always at a later step than the one before it, so only a best.pt older
    # than the record lags behind it; one as new or newer is a copy of it, or the record is
    # stale: from an older checkpoint that load_latest fell back to past a damaged newest one
    # (whose best best.pt holds), where taking the record meant older weights than the run's best
    return marked if not isinstance(at, int) or at < step else best


def other_product(state: dict[str, Any], manifest: Manifest) -> str | None:
    """``"was trained on 3-band RGB-PanSharpen imagery, but DATA/manifest.json holds 8-band
    MUL-PanSharpen"`` when the checkpoint ``state`` records another imagery product
    (``prepare --product``) than ``manifest``'s, else None (also for a checkpoint from before
    the record: its band count is load_model's to check).

    NOTE: the band counts alone (load_model) said "it has 3 input bands (here 8)", blaming the
    config, and named neither product; two products of one band count would have loaded."""
    trained = state.get("product")
    if not isinstance(trained, str) or trained == manifest.product:
        return None
    saved = state.get("percentiles")
    n = (f"{len(saved['p2'])}-band " if isinstance(saved, dict)
         and isinstance(saved.get("p2"), list) else "")
    return (f"was trained on {n}{trained} imagery, but {manifest.root / 'manifest.json'} holds "
            f"{manifest.imagery()}")


def check_product(state: dict[str, Any], path: Path, manifest: Manifest, fix: str) -> None:
    """ValueError ``"PATH was trained on ..., but ... holds ...: FIX"`` if the checkpoint
    ``state`` (at ``path``) was trained on another imagery product than ``manifest``'s
    (:func:`other_product`); ``fix``: what to do instead, the caller's.

    NOTE: before its weights are matched: their check said "its model does not match this
    config's model.* settings and the 8 bands (MUL-PanSharpen) of DATA/manifest.json (... it has
    3 input bands (here 8))", blaming the config and naming the checkpoint's imagery nowhere."""
    problem = other_product(state, manifest)
    if problem is not None:
        raise ValueError(f"{path} {problem}: {fix}")


def check_init_from_product(state: dict[str, Any], path: Path, manifest: Manifest) -> None:
    """:func:`check_product` for the ``train.init_from`` checkpoint (train.py's check and the
    Trainer's load say the same)."""
    check_product(state, path, manifest, f"fine-tune from a run trained on {manifest.product}, "
                  "or train this one without train.init_from")


# What a resumed checkpoint's weights must match (said when they do not).
RESUME_HINT = ("this config's model.* settings; resume with the run's config or start a new "
               "--run-dir")


def check_resume(state: dict[str, Any], path: Path, manifest: Manifest, own: dict[str, Any],
                 model_cfg: dict[str, Any], optim_name: str) -> None:
    """ValueError naming ``path`` if the run cannot resume from ``state`` on ``manifest``'s
    dataset with this config: a key missing, another imagery product, weights of another model
    (``own``: this config's state dict; a model on the meta device will do), another
    optimizer, or another dataset. ``Trainer.resume`` makes these checks in every worker, and
    ``trainer.train --check`` once before torchrun (the launch scripts): from the workers,
    every rank exits 2 and torchrun restarts the group on it MAX_RESTARTS times."""
    missing = [k for k in RESUME_KEYS if k not in state]
    if missing:
        raise ValueError(f"{path}: cannot resume from it, it lacks {', '.join(missing)}")
    problem = other_product(state, manifest)
    if problem is not None:  # (load_model's band check blamed the config)
        raise ValueError(f"{path}: it {problem}; resume on the dataset it trained on, or "
                         "start a new --run-dir")
    check_model(own, state, path, RESUME_HINT, model_cfg)
    # NOTE: torch loads one optimizer's state into another without a word (Adam's into SGD
    # died at the first step on a missing 'momentum'; AdamW's into Adam trained on as Adam).
    saved = json.loads(state.get("config") or "{}").get("optim", {}).get("name")
    if saved is not None and saved != optim_name:
        raise ValueError(f"{path}: it was trained with optim.name={saved!r}, this config has "
                         f"{optim_name!r}; resume with the run's optimizer or start a new "
                         "--run-dir")
    # NOTE: a dataset prepared again with another --seed or --split (or other AOIs) was
    # resumed on without a word: its val split then held tiles the weights had trained on,
    # and best.pt and the tuned thresholds were chosen on them.
    trained_on = state.get("data")
    if trained_on is not None and trained_on != manifest.fingerprint():
        # (the masks count too: another --boundary-width gave the same splits, refused as
        # "the splits differ", which sent the user looking for a --seed they never changed)
        raise ValueError(f"{path}: it was trained on another dataset than --data "
                         f"{manifest.root} (its train or val split holds other tiles or other "
                         "masks: prepared again with another --seed, --split or "
                         "--boundary-width, or other AOIs?); resume on the dataset it trained "
                         "on, or start a new --run-dir")


def init_from_hint(manifest: Manifest) -> str:
    """What a ``train.init_from`` checkpoint must match (said when it does not)."""
    return (f"this config's model.* settings and the {manifest.bands} bands "
            f"({manifest.product}) of {manifest.root / 'manifest.json'} "
            "(train.init_from fine-tunes the same model on another dataset)")


# The model.* keys that decide a network's tensors (compile, channels_last, pad_mode do not).
_SHAPING_KEYS = ("name", "width_divisor", "norm")


def _config_differences(state: dict[str, Any], model_cfg: dict[str, Any] | None) -> list[str]:
    """"the checkpoint has model.K=V (here W)" for each shaping key its config has otherwise."""
    if model_cfg is None or not isinstance(state.get("config"), str):
        return []
    try:
        saved = json.loads(state["config"]).get("model", {})
    except (json.JSONDecodeError, AttributeError):
        return []
    if not isinstance(saved, dict):
        return []
    return [f"the checkpoint was trained with model.{k}={saved[k]!r} (here {model_cfg[k]!r})"
            for k in _SHAPING_KEYS if k in saved and k in model_cfg and saved[k] != model_cfg[k]]


def _shape(t: Any) -> str:
    return "x".join(map(str, t.shape)) if isinstance(t, torch.Tensor) else type(t).__name__


def io_channels(sd: dict[str, Any]) -> tuple[int, int] | None:
    """(input channels of the first convolution, output channels of the last) of a state dict
    in module order: the bands a registry model takes and the classes it gives."""
    convs = [v for v in sd.values() if isinstance(v, torch.Tensor) and v.ndim == 4]
    return (int(convs[0].shape[1]), int(convs[-1].shape[0])) if convs else None


def describe_mismatch(saved: dict[str, Any], own: dict[str, Any], show: int = 2) -> str:
    """What keeps ``saved`` from loading into a module whose state dict is ``own`` ("" if it
    fits): bands and classes first (a user's likeliest mistake), then the tensors that differ.

    NOTE: torch's own error starts "Error(s) in loading state_dict for UNet:" and lists every one
    of the ~100 tensors on the lines after it: one line of it said nothing, all of it too much.
    """
    parts = []
    io_saved, io_own = io_channels(saved), io_channels(own)
    if io_saved and io_own:
        for i, what in enumerate(("input bands", "classes")):
            if io_saved[i] != io_own[i]:
                parts.append(f"it has {io_saved[i]} {what} (here {io_own[i]})")
    shaped = [k for k in own if k in saved and _shape(saved[k]) != _shape(own[k])]
    missing = [k for k in own if k not in saved]
    unexpected = [k for k in saved if k not in own]
    if shaped:
        parts.append(f"{len(shaped)} tensor(s) of another shape: " + ", ".join(
            f"{k} {_shape(saved[k])} (here {_shape(own[k])})" for k in shaped[:show])
            + (", ..." if len(shaped) > show else ""))
    for keys, what in ((missing, "missing"), (unexpected, "unexpected")):
        if keys:
            parts.append(f"{len(keys)} tensor(s) {what}: {', '.join(keys[:show])}"
                         + (", ..." if len(keys) > show else ""))
    return "; ".join(parts)


def load_latest(run_dir: Path, map_location: str | torch.device = "cpu", mmap: bool = False
                ) -> tuple[dict[str, Any], Path] | None:
    """The newest checkpoint that loads; a damaged newest one is reported and skipped."""
    for path in reversed(list_checkpoints(run_dir)):
        try:
            return load(path, map_location, mmap), path
        except Exception as e:  # a torn or foreign file: fall back to the previous one
            log.warning("checkpoint %s does not load (%s); trying an older one", path, e)
    return None


# ---- RNG state in weights_only-safe form --------------------------------------------------------

def rng_state() -> dict[str, Any]:
    """This process's python, numpy and torch RNG states as tensors and lists."""
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "python": [list(random.getstate()[1]), random.getstate()[0]],
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached": float(np_state[4])},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    internal, version = state["python"]
    random.setstate((version, tuple(internal), None))
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
