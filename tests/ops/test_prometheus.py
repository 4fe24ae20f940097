"""A real Prometheus scrapes a 2-process training run and a Pushgateway that the postprocessing
batch jobs push to; the figures come back through Prometheus' HTTP query API, and every query of
the Grafana dashboard evaluates there.

Order: the batch jobs push first (the gateway keeps their metrics until it is stopped), then the
training runs while Prometheus scrapes it every second, and is stopped as soon as two scrapes
show both ranks and moving step counts. After that its series are marked stale, so the figures
are read with ``last_over_time`` and ``rate`` over a window, which still find the samples.
"""

from __future__ import annotations

import json
import math
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from ops_helpers import (
    REPO,
    PromStack,
    expressions,
    load_dashboard,
    poll,
    query,
    query_range,
    stop_group,
    torchrun_cmd,
    worker_env,
    write_preds,
)

pytestmark = [pytest.mark.prometheus, pytest.mark.multiproc, pytest.mark.slow]

# NOTE: more epochs than the test waits for: it stops the run once Prometheus has scraped enough
# of it, so neither a slow nor a fast machine makes the scrapes miss the run.
TRAIN = ["train.epochs=1000", "train.val_every=0", "data.num_threads=1"]
TRAIN_TIMEOUT_S = 120
INGEST_TIMEOUT_S = 30  # a scrape a second: anything slower is a failure
RANGE_STEP_S = 1.0  # the panels' step, as Grafana makes it for a range this short
STEP_P50 = "histogram_quantile(0.5, sum by (le) (rate(footprints_step_seconds_bucket[1m])))"


def run_cli(args: list[str], timeout_s: float = 180) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, *args], cwd=REPO, env=worker_env(),
                          capture_output=True, text=True, timeout=timeout_s)


def by_label(result: list[dict], label: str) -> dict[str, float]:
    return {s["metric"].get(label, ""): float(s["value"][1]) for s in result}


def push_batch_jobs(gateway: str, tmp: Path) -> dict:
    """polygonize and score as a scheduler would run them; the score JSON they wrote."""
    pred, truth = write_preds(tmp)
    csv, js = tmp / "proposals.csv", tmp / "score.json"
    p = run_cli(["-m", "postproc.polygonize", "--pred", str(pred), "--out", str(csv),
                 "--workers", "1", "--pushgateway", gateway])
    assert p.returncode == 0 and "could not push" not in p.stderr, p.stderr[-3000:]
    s = run_cli(["-m", "postproc.score", "--truth", str(truth), "--proposals", str(csv),
                 "--json", str(js), "--workers", "1", "--pushgateway", gateway])
    assert s.returncode == 0 and "could not push" not in s.stderr, s.stderr[-3000:]
    return json.loads(js.read_text())


@pytest.mark.timeout(480)  # NOTE: includes a first-time apt install in the fixture (up to 300 s)
def test_prometheus_scrapes_training_and_receives_batch_pushes(
        prom_stack: PromStack, small_dataset: Path, tmp_path: Path) -> None:
    prom = prom_stack.prometheus.url
    t0 = time.time()
    scored = push_batch_jobs(prom_stack.gateway.url, tmp_path)

    log = tmp_path / "train.log"
    cmd = torchrun_cmd(2, ["-m", "trainer.train", "--config", "configs/tiny.toml",
                           "--data", str(small_dataset), "--run-dir", str(tmp_path / "run"),
                           "--set", f"metrics.port={prom_stack.train_port}",
                           *[a for o in TRAIN for a in ("--set", o)]])
    with open(log, "wb") as f:
        train = subprocess.Popen(cmd, cwd=REPO, env=worker_env(), stdout=f,
                                 stderr=subprocess.STDOUT, start_new_session=True)

    def context() -> str:
        return f"{prom_stack.logs()}\n--- training ---\n{log.read_text(errors='replace')[-3000:]}"

    def scraped() -> dict[str, float] | None:
        """Samples per rank once the last scrape has both ranks and the step histogram moved
        between scrapes (a finite median of its rate)."""
        if train.poll() is not None:
            raise AssertionError(f"training exited with {train.returncode}\n{context()}")
        samples = by_label(query(prom, "footprints_samples_total"), "rank")
        p50 = query(prom, STEP_P50)
        if (set(samples) == {"0", "1"} and min(samples.values()) > 0 and p50
                and 0 < float(p50[0]["value"][1]) < math.inf):
            return samples
        return None

    try:
        live = poll(scraped, TRAIN_TIMEOUT_S, "two scrapes of a training run with both ranks",
                    context)
    finally:
        stop_group(train)
    stopped = time.time()  # no training sample is newer than this

    total = by_label(query(prom, "last_over_time(footprints_samples_total[5m])"), "rank")
    assert set(total) == {"0", "1"} and all(total[r] >= live[r] for r in total), (total, live)
    steps = by_label(query(prom, "sum by (rank) (last_over_time("
                                 "footprints_step_seconds_count[5m]))"), "rank")
    assert set(steps) == {"0", "1"} and min(steps.values()) > 0, steps
    p50 = query(prom, STEP_P50)  # still there: a range over samples before the stale markers
    assert len(p50) == 1 and 0 < float(p50[0]["value"][1]) < math.inf, p50

    # The batch jobs, under their own job label and this host as instance (honor_labels).
    def pushed(promql: str) -> list[dict] | None:
        return query(prom, promql) or None

    tiles = poll(lambda: pushed('footprints_postproc_tiles_total{job="footprints_polygonize"}'),
                 INGEST_TIMEOUT_S, "pushed polygonize tiles", context)
    assert float(tiles[0]["value"][1]) == 4 and \
        tiles[0]["metric"]["instance"] == socket.gethostname(), tiles
    f1 = poll(lambda: pushed('footprints_score_f1{job="footprints_score"}'),
              INGEST_TIMEOUT_S, "pushed F1", context)
    assert float(f1[0]["value"][1]) == pytest.approx(scored["f1"]), (f1, scored)
    outcomes = by_label(query(prom, 'footprints_score_polygons_total{job="footprints_score"}'),
                        "outcome")
    assert outcomes == {k: scored[k] for k in ("tp", "fp", "fn")}, (outcomes, scored)
    assert query(prom, "footprints_postproc_last_success_timestamp_seconds")

    # Every dashboard query is valid PromQL for this Prometheus, and over the test's time range
    # (a range query, as Grafana makes them) the panels this run feeds find data: a finite
    # value, since a histogram nobody observed yet still gives NaN series (0/0).
    # NOTE: a range query answers only at start + k*step. The run is stopped as soon as two scrapes
    # show it, so its rates exist only from the last of those on, which can be less than a step
    # before `stopped`: querying at once found no step there on CI (rate panels empty). Two steps
    # after `stopped` there is one, and the samples are still well inside the [1m] windows.
    time.sleep(max(0.0, stopped + 2 * RANGE_STEP_S - time.time()))
    empty = []
    for title, expr in expressions(load_dashboard()):
        promql = expr.replace("$__rate_interval", "1m").replace("$job", ".*")
        # raises on a syntax error
        series = query_range(prom, promql, t0, time.time(), RANGE_STEP_S)
        if not any(math.isfinite(float(v)) for s in series for _, v in s["values"]):
            empty.append(title)
    fed = {"Skipped samples by reason", "Skipped steps by reason", "Validation F1 / IoU"}
    if not set(empty) <= fed:  # say how many scrapes of the run succeeded, and when it stopped
        up = [s["value"][1] for s in query(prom, 'sum_over_time(up{job="footprints_train"}[10m])')]
        raise AssertionError(f"panels without data: {sorted(set(empty) - fed)}; successful "
                             f"scrapes of the run: {up}; stopped {stopped - t0:.2f}s into the "
                             f"range, checked at {time.time() - t0:.2f}s")
