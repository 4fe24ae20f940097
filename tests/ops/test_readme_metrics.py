"""The metric names and labels that README's "Metrics, Prometheus and Grafana" section lists are the
ones the trainer exports and the postproc commands push: users write their queries and alerts
from that list (it once did not say which metrics carry the ``rank`` label, and gave
``footprints_device_memory_bytes`` only ``{kind}``; and it named two of the three commands that
push, leaving out ``postproc.merge``'s ``footprints_merge``)."""

from __future__ import annotations

import re
from pathlib import Path

import torch

from postproc import merge, mosaic, polygonize, render, score, tune
from postproc.pushmetrics import PostprocRun, build_registry
from trainer.dist import DistEnv
from trainer.metrics import TrainMetrics

README = Path(__file__).resolve().parents[2] / "README.md"


def _documented() -> dict[str, set[str]]:
    """``footprints_*`` names written in backticks in the section, each with its label names
    (``{rank,kind}``, ``{outcome="tp|fp|fn"}``)."""
    text = README.read_text(encoding="utf-8")
    section = text[text.index("## Metrics, Prometheus and Grafana"):text.index("**Grafana.**")]
    found: dict[str, set[str]] = {}
    for name, labels in re.findall(r"`(footprints_\w+)(?:\{([^}`]*)\})?`", section):
        found[name] = {part.split("=")[0].strip() for part in labels.split(",") if part}
    return found


def _exported() -> tuple[dict[str, set[str]], set[str]]:
    """Every family and sample name of a training run's registry and of a scoring and a merge
    push, with the label names its samples carry (every labelled child made to exist first); and
    the families."""
    m = TrainMetrics(DistEnv())
    m.begin(epoch=0, lr=0.1, resumes=0)  # (as the trainer, once it has looked for a checkpoint)
    m.record_step(samples=2, step_s=0.1, wait_s=0.01, loss=1.0)
    m.record_memory(torch.device("cpu"))
    m.skip_step("nonfinite_loss")
    m.set_skipped_samples({"img_invalid": 1})
    m.sync()
    m.val.labels(metric="f1").set(0.5)
    m.checkpoint_time.observe(0.1)
    pushed = build_registry(PostprocRun(tiles=1, polygons=2, seconds=1.0, score=dict(
        f1=0.5, precision=0.5, recall=0.5, tp=1, fp=1, fn=1)))
    merged = build_registry(PostprocRun(tiles=1, polygons=2, seconds=1.0, overlaps=0))
    out: dict[str, set[str]] = {}
    families = set()
    for registry in (m.registry, pushed, merged):
        for family in registry.collect():
            families.add(family.name)
            for sample in family.samples:
                for name in (family.name, sample.name):
                    out.setdefault(name, set()).update(set(sample.labels) - {"le"})
    return out, families


def test_every_metric_the_readme_lists_is_exported_with_the_labels_it_gives() -> None:
    documented = _documented()
    # the --job defaults of every postproc command that pushes are written beside the metrics
    jobs = {action.default for module in (merge, mosaic, polygonize, render, score, tune)
            for action in module.build_parser()._actions if "--job" in action.option_strings}
    assert jobs == {"footprints_polygonize", "footprints_score", "footprints_merge"}
    assert not jobs - set(documented), f"--job defaults not in README: {jobs - set(documented)}"
    exported, families = _exported()
    metrics = {name: labels for name, labels in documented.items() if name not in jobs}
    wrong = {name: (labels, exported.get(name)) for name, labels in metrics.items()
             if exported.get(name) != labels}
    assert not wrong, f"README name: (its labels, exported labels; None: not exported): {wrong}"
    # and nothing exported is left out of the list (a counter is listed by its _total)
    unlisted = {f for f in families if f not in metrics and f"{f}_total" not in metrics}
    assert not unlisted, f"exported but not in README: {sorted(unlisted)}"


def test_step_seconds_says_it_holds_the_data_wait() -> None:
    """The trainer times a step from being ready for its batch to the step's end, so
    footprints_step_seconds includes footprints_data_wait_seconds (the dashboard's input-bound
    share divides one by the other); its help said "wall time of one training step", which
    reads as compute alone, and README said nothing."""
    m = TrainMetrics(DistEnv())
    helps = {f.name: f.documentation for f in m.registry.collect()}
    assert "footprints_data_wait_seconds" in helps["footprints_step_seconds"]
    assert "included" in helps["footprints_step_seconds"]
    text = README.read_text(encoding="utf-8")
    section = text[text.index("## Metrics, Prometheus and Grafana"):text.index("**Grafana.**")]
    said = re.search(r"`footprints_step_seconds\{rank\}` is [^.]*?\.", section)
    assert said and "`footprints_data_wait_seconds{rank}`" in said.group(0) and \
        "included" in said.group(0), "README's metrics section: what a step's time holds"
