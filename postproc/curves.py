"""Training curves of a run as one PNG: losses, and val IoU / F1 (with precision, recall) per epoch.

Reads ``RUN/log.jsonl`` (one JSON object per epoch: ``epoch``, ``train_loss``, and on validation
epochs ``val_loss``, ``val_iou``, ``val_f1``, ``val_precision``, ``val_recall``). Drawn with
matplotlib's object API on the Agg canvas: no pyplot state, no display needed.
The command line is ``python -m postproc.render --curves RUN/log.jsonl --out curves.png``.
"""

from __future__ import annotations

import io
import json
import math
from pathlib import Path
from typing import Any

from dataio.atomic import atomic_write_bytes

LOSSES = (("train_loss", "train loss", "-"), ("val_loss", "val loss", "-"))
METRICS = (("val_f1", "val F1 (SpaceNet)", "-"), ("val_iou", "val IoU (building px)", "-"),
           ("val_precision", "val precision", ":"), ("val_recall", "val recall", ":"))


def read_log(path: str | Path) -> list[dict[str, Any]]:
    """Epoch records sorted by epoch (see :func:`parse_log`); at least one."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        raise ValueError(f"--curves {path}: training log not found") from None
    except OSError as e:
        raise ValueError(f"--curves {path}: cannot read the training log ({e})") from None
    epochs = parse_log(text, path)
    if not epochs:
        raise ValueError(f"{path}: no epochs logged (train first)")
    return epochs


def parse_log(text: str, path: str | Path, repair: bool = False) -> list[dict[str, Any]]:
    """The epoch records of a training log's ``text``, sorted by epoch; a repeated epoch (a
    resumed run) keeps its last record. A last line cut short by a crash (it does not parse and
    its newline was never written) is skipped, as the trainer drops it when it resumes; any other
    bad line is a ValueError naming ``path:line``, unless ``repair`` (the trainer cleaning its own
    log at start) skips it too."""
    lines = text.splitlines()
    torn_tail = not text.endswith("\n")
    by_epoch: dict[int, dict[str, Any]] = {}
    for n, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            epoch = _epoch_of(rec)
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
            if repair or (n == len(lines) and torn_tail):
                continue
            raise ValueError(f"{path}:{n}: not an epoch record ({type(e).__name__}: {e})") from None
        by_epoch[epoch] = rec
    return [by_epoch[e] for e in sorted(by_epoch)]


def _epoch_of(rec: Any) -> int:
    """The epoch number of a log record; only a whole number counts (not true, 2.7 or inf)."""
    epoch = rec["epoch"]
    if isinstance(epoch, bool) or not isinstance(epoch, int | str) or \
            (isinstance(epoch, str) and not epoch.isdecimal()):
        raise ValueError(f"epoch {epoch!r} is not a whole number")
    return int(epoch)


def _series(epochs: list[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    pts = [(int(e["epoch"]), float(e[key])) for e in epochs
           if isinstance(e.get(key), int | float) and math.isfinite(float(e[key]))]
    return [p[0] for p in pts], [p[1] for p in pts]


def plot_curves(epochs: list[dict[str, Any]], out: str | Path, title: str = "") -> None:
    """Two panels (losses; val metrics) written atomically as a PNG."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 4), dpi=100)
    FigureCanvasAgg(fig)
    ax_loss, ax_val = fig.subplots(1, 2)
    panels = ((ax_loss, LOSSES, "loss (training objective)"), (ax_val, METRICS, "score"))
    for ax, series, ylabel in panels:
        drawn = 0
        for key, label, style in series:
            x, y = _series(epochs, key)
            if x:
                ax.plot(x, y, style, marker="o" if len(x) < 30 else None, ms=3, label=label)
                drawn += 1
        ax.set_xlabel("epoch")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        if drawn:
            ax.legend(fontsize=8)
        else:
            ax.text(0.5, 0.5, "not logged", ha="center", va="center", transform=ax.transAxes)
    ax_val.set_ylim(0, 1)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    atomic_write_bytes(out, buf.getvalue())
