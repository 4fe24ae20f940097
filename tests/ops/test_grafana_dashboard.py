"""The shipped Grafana dashboard loads, asks only for metrics the code exports, and takes its
Prometheus data source from a variable (so it imports into any Grafana)."""

from __future__ import annotations

import re

from ops_helpers import expressions, load_dashboard, panels
from prometheus_client import CollectorRegistry

from postproc.pushmetrics import PostprocRun, build_registry
from trainer.dist import DistEnv
from trainer.metrics import TrainMetrics

METRIC = re.compile(r"\bfootprints_[a-z0-9_]+\b")
# The series names each family type puts on /metrics (prometheus_client strips _total from
# counter family names).
SUFFIXES = {"counter": ("_total", "_created"), "gauge": ("",),
            "histogram": ("_bucket", "_count", "_sum", "_created")}


# Labels Prometheus adds to every scraped or pushed series (honor_labels keeps the pushed ones).
TARGET_LABELS = {"job", "instance"}
# The values dashboards select on. NOTE: "f1"/"iou" are what Trainer.end_epoch exports
# (test_metrics' test_a_run_exports_its_figures_and_a_resume_counts_once checks that).
LABEL_VALUES = {"metric": {"f1", "iou"}, "outcome": {"tp", "fp", "fn"}}
SELECTOR = re.compile(r"\b(footprints_[a-z0-9_]+)\b(?:\{([^}]*)\})?")
MATCHER = re.compile(r'(\w+)\s*(=~|!~|!=|=)\s*"([^"]*)"')
BY = re.compile(r"\bby\s*\(([^)]*)\)")
AGGREGATE = re.compile(r"\b(sum|avg|min|max|count|histogram_quantile)\s*\(")
LEGEND = re.compile(r"\{\{\s*(\w+)\s*\}\}")


def registries() -> list[CollectorRegistry]:
    train = TrainMetrics(DistEnv())
    train.begin(epoch=0, lr=0.1, resumes=0)  # (as the trainer, once it has looked for a checkpoint)
    push = build_registry(PostprocRun(tiles=1, polygons=1, seconds=1.0,
                                      score=dict(f1=1, precision=1, recall=1, tp=1, fp=0, fn=0)))
    return [train.registry, push]


def series_labels(*which: CollectorRegistry) -> dict[str, set[str]]:
    """Series name on /metrics -> its label names (the collectors' own, ``le`` for buckets).

    NOTE: ``_labelnames`` is prometheus_client's; a labelled family with no child yet has no
    samples to read the names from.
    """
    out: dict[str, set[str]] = {}
    for registry in which or registries():
        for collector in registry._collector_to_names:  # noqa: SLF001
            names = set(collector._labelnames)  # noqa: SLF001
            for fam in collector.collect():
                for suffix in SUFFIXES[fam.type]:
                    out[fam.name + suffix] = names | ({"le"} if suffix == "_bucket" else set())
    return out


def test_dashboard_queries_use_labels_the_metrics_have() -> None:
    """A label the code does not put on a metric (a typo, a renamed label) makes a query match
    nothing or group everything into one line; no error anywhere says so."""
    labels = series_labels()
    dash = load_dashboard()
    wrong = []
    for p in panels(dash):
        for t in p.get("targets", []):
            expr, where = t["expr"], (p["title"], t["refId"])
            have: set[str] = set()
            for metric, matchers in SELECTOR.findall(expr):
                mine = labels.get(metric, set()) | TARGET_LABELS
                have |= mine
                for name, op, value in MATCHER.findall(matchers):
                    if name not in mine:
                        wrong.append((where, f"{metric} has no label {name}"))
                    elif name in LABEL_VALUES and op in ("=", "=~"):
                        known = LABEL_VALUES[name]
                        pattern = re.compile(value if op == "=~" else re.escape(value))
                        if not all(any(pattern.fullmatch(v) for v in known)
                                   for v in value.split("|")):
                            wrong.append((where, f"{name}{op}{value!r}: values are {known}"))
            grouped = [set(map(str.strip, g.split(","))) for g in BY.findall(expr)]
            for g in grouped:
                wrong += [(where, f"by ({lbl}): no metric here has it") for lbl in g - have]
            # the legend can only name labels the query's result keeps
            kept = grouped[0] if grouped else set() if AGGREGATE.search(expr) else have
            wrong += [(where, f"legend {{{{{lbl}}}}}: not a label of the result")
                      for lbl in set(LEGEND.findall(t.get("legendFormat", ""))) - kept]
    assert not wrong, wrong


def test_quantile_legends_say_the_quantile_queried() -> None:
    wrong, found = [], 0
    for p in panels(load_dashboard()):
        for t in p.get("targets", []):
            legend = re.match(r"p(\d+)\b", t.get("legendFormat", ""))
            q = re.match(r"histogram_quantile\(\s*([0-9.]+)", t["expr"])
            if legend or q:
                found += 1
                if not (legend and q and float(q.group(1)) == int(legend.group(1)) / 100):
                    wrong.append((p["title"], t["legendFormat"], t["expr"]))
    assert found >= 4 and not wrong, wrong


def test_training_panels_follow_the_job_variable() -> None:
    """``Training job`` is multi-value with All: Grafana puts a regex in ``$job``, so every
    training series is selected with ``job=~"$job"`` (``=`` matches nothing once two are picked,
    and a query without it mixes every run's lines)."""
    training = series_labels(registries()[0])
    unfiltered = [(title, metric) for title, expr in expressions(load_dashboard())
                  for metric, matchers in SELECTOR.findall(expr) if metric in training
                  and ("job", "=~", "$job") not in MATCHER.findall(matchers)]
    assert not unfiltered, unfiltered
    job = {v["name"]: v for v in load_dashboard()["templating"]["list"]}["job"]
    assert job["multi"] and job["includeAll"]


def test_job_variable_lists_jobs_of_a_training_metric() -> None:
    variables = {v["name"]: v for v in load_dashboard()["templating"]["list"]}
    query = variables["job"]["query"]
    query = query["query"] if isinstance(query, dict) else query
    m = re.fullmatch(r"label_values\((footprints_[a-z0-9_]+),\s*job\)", query)
    assert m and m.group(1) in series_labels(), query
    assert "rank" in series_labels()[m.group(1)]  # a training series, not a pushed one


def exported_families() -> dict[str, str]:
    """Family name -> type, from a trainer registry and a postprocessing push registry."""
    train = TrainMetrics(DistEnv())
    train.begin(epoch=0, lr=0.1, resumes=0)  # (as the trainer, once it has looked for a checkpoint)
    push = build_registry(PostprocRun(tiles=1, polygons=1, seconds=1.0,
                                      score=dict(f1=1, precision=1, recall=1, tp=1, fp=0, fn=0)))
    return {f.name: f.type for registry in (train.registry, push) for f in registry.collect()}


def test_dashboard_queries_only_exported_metrics() -> None:
    families = exported_families()
    series = {name + s for name, kind in families.items() for s in SUFFIXES[kind]}
    exprs = expressions(load_dashboard())
    assert len(exprs) >= 15
    unknown = sorted((title, e) for title, e in exprs if set(METRIC.findall(e)) - series)
    assert not unknown, f"queries for metrics nobody exports: {unknown}"
    used = {name for _, e in exprs for name in METRIC.findall(e)}
    missing = sorted(f for f in families if not any(u.startswith(f) for u in used))
    assert not missing, f"exported but on no panel: {missing}"


def test_datasource_is_a_template_variable() -> None:
    dash = load_dashboard()
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    ref = {"type": "prometheus", "uid": "${datasource}"}
    for p in panels(dash):
        if p["type"] == "row":
            continue
        assert p["datasource"] == ref, p["title"]
        for t in p["targets"]:
            assert t["datasource"] == ref, (p["title"], t["refId"])
    assert dash["schemaVersion"] >= 38
    ids = [p["id"] for p in panels(dash)]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
