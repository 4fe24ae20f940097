"""Metrics of a batch postprocessing run, pushed to a Prometheus Pushgateway when the run ends.

A batch job lives shorter than a scrape interval, so Prometheus cannot scrape it; the convention
(https://prometheus.io/docs/practices/pushing/) is to push once, at the end, to a Pushgateway that
Prometheus scrapes with ``honor_labels: true``. Rank 0 pushes after the ranks' counts are summed.

Grouping key: ``job`` (``--job``, default ``footprints_polygonize`` / ``footprints_score`` /
``footprints_merge``) and ``instance`` = this host's name. A push is a PUT, so it replaces the
group's previous run: the gateway keeps the last run per job and host, and two hosts running the
same job don't overwrite each other.

A failed push (gateway down, wrong URL) is a warning on stderr naming the URL; the command still
exits 0. The run's real product (the CSV, the JSON) is already written and correct, and a pipeline
should not stop or re-run hours of work for a monitoring outage. A missed push shows up where
batch jobs are watched anyway: ``time() - footprints_postproc_last_success_timestamp_seconds``
grows (README, "Metrics, Prometheus and Grafana").
"""

from __future__ import annotations

import http.client
import socket
import sys
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Gauge, push_to_gateway

PREFIX = "footprints"
PUSH_TIMEOUT_S = 10.0  # a slow gateway must not hold a finished job for long


@dataclass
class PostprocRun:
    """What one finished run reports; ``score`` holds f1/precision/recall/tp/fp/fn for scoring,
    ``overlaps`` merge's pairs of overlapping tiles (None: not a merge)."""

    tiles: int
    polygons: int
    seconds: float
    score: dict[str, float] = field(default_factory=dict)
    overlaps: int | None = None


def build_registry(run: PostprocRun) -> CollectorRegistry:
    """A fresh registry with this run's figures (every family, whichever command ran).

    NOTE: help strings do not depend on the command: the gateway refuses a push whose family
    has another help text than the same family pushed by another job.
    """
    r = CollectorRegistry()
    p = PREFIX
    Counter(f"{p}_postproc_tiles", "Tiles (images, for scoring) handled by the last run",
            registry=r).inc(run.tiles)
    Counter(f"{p}_postproc_polygons", "Polygons written (proposals, for scoring) by the last run",
            registry=r).inc(run.polygons)
    Gauge(f"{p}_postproc_seconds", "Wall time of the last run", registry=r).set(run.seconds)
    Gauge(f"{p}_postproc_last_success_timestamp_seconds",
          "Unix time at which the last run finished successfully", registry=r
          ).set_to_current_time()
    if run.score:
        for name in ("f1", "precision", "recall"):
            Gauge(f"{p}_score_{name}", f"SpaceNet building {name} of the last scoring run",
                  registry=r).set(run.score[name])
        outcomes = Counter(f"{p}_score_polygons", "Polygons of the last scoring run by outcome "
                           "(tp, fp: proposals; fn: missed truth)", ["outcome"], registry=r)
        for name in ("tp", "fp", "fn"):
            outcomes.labels(outcome=name).inc(run.score[name])
    # NOTE: pushed by every merge, 0 too: an alert on > 0 must see a run that had none
    if run.overlaps is not None:
        Counter(f"{p}_merge_overlapping_tile_pairs", "Pairs of tiles of one pixel grid that "
                "overlap in the last merge run (their footprints there are written once per "
                "tile)", registry=r).inc(run.overlaps)
    return r


def push(url: str, job: str, run: PostprocRun) -> bool:
    """Push ``run`` under ``job``/this host; False (and a warning on stderr) if that failed."""
    try:
        push_to_gateway(url, job=job, registry=build_registry(run),
                        grouping_key={"instance": socket.gethostname()}, timeout=PUSH_TIMEOUT_S)
    # URLError and HTTPError are OSErrors; a port that does not speak HTTP raises BadStatusLine
    except (OSError, ValueError, http.client.HTTPException) as e:
        print(f"warning: could not push metrics to the Pushgateway at {url} ({e}); the run's "
              "output is written and complete", file=sys.stderr)
        return False
    return True
