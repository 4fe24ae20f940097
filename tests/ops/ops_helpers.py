"""Helpers for the observability tests: Prometheus and Pushgateway processes on loopback ports,
their HTTP APIs, torchrun commands, and prediction shards made by code."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from proc_helpers import (  # noqa: F401 (re-exported)
    REPO,
    free_port,
    kill_tree,
    torchrun_cmd,
    worker_env,
)

DASHBOARD = REPO / "launch" / "grafana" / "footprints.json"
T = TypeVar("T")


def stop_group(proc: subprocess.Popen, grace_s: float = 10.0) -> None:
    """SIGTERM the process group, SIGKILL the whole tree if it is still there after ``grace_s``
    (torchrun's workers live in sessions of their own, out of reach of the group)."""
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        kill_tree(proc.pid)
        proc.wait(timeout=grace_s)
    except ProcessLookupError:
        pass


def poll(fn: Callable[[], T | None], timeout_s: float, what: str,
         context: Callable[[], str] = lambda: "", every_s: float = 0.5) -> T:
    """``fn()`` until it returns something truthy; fail naming ``what`` after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    last: Any = None
    while True:
        last = fn()
        if last:
            return last
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout_s:.0f}s (last: {last!r})\n"
                                 f"{context()}")
        time.sleep(every_s)


def http_get(url: str, timeout_s: float = 2.0) -> tuple[int, str]:
    """(status, body); status 0 when nothing answers."""
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode(errors="replace")
    except (urllib.error.URLError, OSError):
        return 0, ""


@dataclass
class Server:
    """A Prometheus or Pushgateway process of our own, in its own process group."""

    name: str
    proc: subprocess.Popen
    url: str
    log: Path

    def log_tail(self, chars: int = 3000) -> str:
        text = self.log.read_text(errors="replace") if self.log.exists() else ""
        return f"--- {self.name} log ({self.log}) ---\n{text[-chars:]}"

    def wait_ready(self, timeout_s: float) -> None:
        def ready() -> bool:
            if self.proc.poll() is not None:
                raise AssertionError(f"{self.name} exited with {self.proc.returncode}\n"
                                     f"{self.log_tail()}")
            return http_get(f"{self.url}/-/ready")[0] == 200

        poll(ready, timeout_s, f"{self.name} ready at {self.url}/-/ready", self.log_tail)

    def stop(self) -> None:
        stop_group(self.proc)


@dataclass
class PromStack:
    prometheus: Server
    gateway: Server
    train_port: int  # what Prometheus scrapes as job footprints_train

    def logs(self) -> str:
        return f"{self.prometheus.log_tail()}\n{self.gateway.log_tail()}"


def start_server(name: str, cmd: list[str], port: int, workdir: Path) -> Server:
    log = workdir / f"{name}.log"
    with open(log, "wb") as f:
        proc = subprocess.Popen(cmd, cwd=workdir, stdout=f, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
    return Server(name, proc, f"http://127.0.0.1:{port}", log)


def prometheus_config(path: Path, train_port: int, gateway_port: int) -> Path:
    """Scrape the trainer and the Pushgateway every second (JSON is valid YAML)."""
    cfg = {
        "global": {"scrape_interval": "1s", "scrape_timeout": "1s",
                   "evaluation_interval": "1s"},
        "scrape_configs": [
            {"job_name": "footprints_train",
             "static_configs": [{"targets": [f"127.0.0.1:{train_port}"]}]},
            # NOTE: honor_labels keeps the pushed job/instance instead of the gateway's own.
            {"job_name": "pushgateway", "honor_labels": True,
             "static_configs": [{"targets": [f"127.0.0.1:{gateway_port}"]}]},
        ],
    }
    path.write_text(json.dumps(cfg, indent=1))
    return path


def query(base_url: str, promql: str) -> list[dict]:
    """An instant query through the HTTP API; its result vector (raises on an API error)."""
    return _api(f"{base_url}/api/v1/query", {"query": promql})


def query_range(base_url: str, promql: str, start: float, end: float, step_s: float = 1.0
                ) -> list[dict]:
    """A range query, as Grafana's panels make them; its result matrix."""
    return _api(f"{base_url}/api/v1/query_range",
                {"query": promql, "start": start, "end": end, "step": step_s})


def _api(endpoint: str, params: dict[str, Any]) -> list[dict]:
    promql = params["query"]
    status, body = http_get(f"{endpoint}?{urllib.parse.urlencode(params)}", timeout_s=5.0)
    if status != 200:
        raise AssertionError(f"{promql!r}: HTTP {status}: {body[:500]}")
    doc = json.loads(body)
    assert doc["status"] == "success", doc
    return doc["data"]["result"]


def write_preds(root: Path, tiles: int = 4, size: int = 128) -> tuple[Path, Path]:
    """One shard of one-hot predictions of synthetic masks, and the truth CSV they come from."""
    from postproc.predio import write_pred_shard
    from postproc.synthmask import SynthConfig, one_hot, synth_tile

    cfg = SynthConfig(size=size, buildings=8)
    samples, rows = [], []
    for seed in range(tiles):
        mask, polys = synth_tile(seed, cfg)
        key = f"AOI_9_Ops_img{seed}"
        meta = {"image_id": key, "crs": "EPSG:4326", "width": size, "height": size, "bands": 3,
                "transform": [3e-6, 0.0, -115.2, 0.0, -3e-6, 36.2], "building_count": len(polys)}
        samples.append((key, one_hot(mask), meta))
        rows += [[key, k, p.wkt, "POLYGON EMPTY"] for k, p in enumerate(polys, start=1)]
    write_pred_shard(root / "pred" / "pred-000000.tar", samples)
    with open(root / "truth.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["ImageId", "BuildingId", "PolygonWKT_Pix", "PolygonWKT_Geo"])
        w.writerows(rows)
    return root / "pred", root / "truth.csv"


def load_dashboard(path: Path = DASHBOARD) -> dict:
    return json.loads(path.read_text())


def panels(dash: dict) -> Iterator[dict]:
    for p in dash["panels"]:
        yield p
        yield from p.get("panels", [])  # collapsed rows keep theirs inside


def expressions(dash: dict) -> list[tuple[str, str]]:
    """(panel title, PromQL) of every query target."""
    return [(p["title"], t["expr"]) for p in panels(dash) for t in p.get("targets", [])]
