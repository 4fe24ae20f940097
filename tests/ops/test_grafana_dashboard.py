"""The shipped Grafana dashboard loads, asks only for metrics the code exports, and takes its
Prometheus data source from a variable (so it imports into any Grafana)."""

from __future__ import annotations

import re

from ops_helpers import expressions, load_dashboard, panels

from postproc.pushmetrics import PostprocRun, build_registry
from trainer.dist import DistEnv
from trainer.metrics import TrainMetrics

METRIC = re.compile(r"\bfootprints_[a-z0-9_]+\b")
# The series names each family type puts on /metrics (prometheus_client strips _total from
# counter family names).
SUFFIXES = {"counter": ("_total", "_created"), "gauge": ("",),
            "histogram": ("_bucket", "_count", "_sum", "_created")}


def exported_families() -> dict[str, str]:
    """Family name -> type, from a trainer registry and a postprocessing push registry."""
    train = TrainMetrics(DistEnv())
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
