"""The demo's report: ``RUN/report/summary.json``, a Markdown summary, and the printed table.

Every figure is read from what the stages wrote (the scorer's JSON, the tuner's JSON, the training
log), never assumed.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from dataio.atomic import atomic_write_text
from dataio.manifest import load_manifest
from dataio.spacenet import rgb_composite
from postproc.curves import parse_log
from postproc.provenance import read_tuned

SCORE_KEYS = ("precision", "recall", "f1", "tp", "fp", "fn")


def _read(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ValueError(f"{path} is missing: the stage that writes it did not run") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: unreadable ({e}); rerun the stage that writes it") from None


def _epochs(run: Path) -> list[dict[str, Any]]:
    """One record per epoch, as the curves read them (a torn last line skipped, repeats merged)."""
    path = run / "log.jsonl"
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        raise ValueError(f"{path} is missing: the stage that writes it did not run") from None
    return parse_log(text, path)


def build_summary(run: Path, data: Path, seconds: dict[str, float]) -> dict[str, Any]:
    report = run / "report"
    score = _read(report / "score_test.json")
    if not isinstance(score, dict) or any(k not in score for k in SCORE_KEYS):
        raise ValueError(f"{report / 'score_test.json'}: not postproc.score's JSON (it needs "
                         f"{', '.join(SCORE_KEYS)}); rerun the score stage")
    # the pair checked to be one tuning's: an interrupted tune must not report its F1 for
    # settings that are not the ones in force
    settings, tune = read_tuned(run)
    epochs = _epochs(run)
    # NOTE: the last epoch that logged val_iou; found by val_f1 instead, a run trained with
    # train.val_f1=false (val_iou logged, val_f1 not) reported final_val_iou null
    last_val = next((e for e in reversed(epochs) if "val_iou" in e), {})
    manifest = load_manifest(data)
    return {
        # (the imagery, and which of its bands the tile pictures show as red, green, blue)
        "imagery": {"product": manifest.product, "bands": manifest.bands,
                    "rgb_composite": list(rgb_composite(manifest.product, manifest.bands))},
        "split": "test",
        "precision": score["precision"], "recall": score["recall"], "f1": score["f1"],
        "tp": score["tp"], "fp": score["fp"], "fn": score["fn"],
        "tiles": {s: manifest.samples(s) for s in ("train", "val", "test")},
        "val_f1_default_postproc": tune["default"]["f1"],
        "val_f1_tuned_postproc": tune["best"]["f1"],
        "postproc": settings,
        "epochs": len(epochs),
        "final_train_loss": epochs[-1]["train_loss"] if epochs else None,
        "final_val_iou": last_val.get("val_iou"),
        "seconds": seconds,
        "total_seconds": round(sum(seconds.values()), 1),
    }


def _markdown(summary: dict[str, Any], report: Path) -> str:
    tiles = sorted((report / "tiles").glob("*.png")) if (report / "tiles").is_dir() else []
    lines = [
        "# Demo report",
        "",
        f"Test split ({summary['tiles']['test']} tiles): **F1 {summary['f1']:.4f}** "
        f"(precision {summary['precision']:.4f}, recall {summary['recall']:.4f}; "
        f"TP {summary['tp']}, FP {summary['fp']}, FN {summary['fn']}).",
        "",
        f"Postprocessing tuned on val: F1 {summary['val_f1_default_postproc']:.4f} with the "
        f"default settings, {summary['val_f1_tuned_postproc']:.4f} with "
        f"`{json.dumps(summary['postproc'], sort_keys=True)}`.",
        "",
        "| stage | seconds |",
        "|---|---:|",
        *(f"| {k} | {v:.1f} |" for k, v in summary["seconds"].items()),
        f"| **total** | **{summary['total_seconds']:.1f}** |",
        "",
        "## Training curves",
        "",
        "![training curves](curves.png)",
        "",
        "## Test tiles",
        "",
        f"{summary['imagery']['product']} bands "
        f"{', '.join(map(str, summary['imagery']['rgb_composite']))} as red, green, blue. "
        "Green: true positive proposals; red: false positives; yellow: missed buildings.",
        "",
        *(f"![{p.stem}](tiles/{p.name})" for p in tiles),
        "",
    ]
    return "\n".join(lines)


def print_summary(summary: dict[str, Any]) -> None:
    print()
    print(f"{'stage':<14}{'seconds':>9}")
    for k, v in summary["seconds"].items():
        print(f"{k:<14}{v:>9.1f}")
    print(f"{'total':<14}{summary['total_seconds']:>9.1f}")
    print()
    print(f"test F1 {summary['f1']:.4f}  precision {summary['precision']:.4f}  "
          f"recall {summary['recall']:.4f}  (TP {summary['tp']}, FP {summary['fp']}, "
          f"FN {summary['fn']})")


def write_report(run: Path, data: Path, seconds: dict[str, float]) -> dict[str, Any]:
    summary = build_summary(run, data, seconds)
    report = run / "report"
    atomic_write_text(report / "summary.json", json.dumps(summary, indent=2) + "\n")
    atomic_write_text(report / "README.md", _markdown(summary, report))
    print_summary(summary)
    print(f"\nreport: {report}/README.md")
    return summary
