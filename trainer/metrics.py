"""Prometheus metrics for training, served by rank 0 with per-rank values labelled ``rank``.

Every rank buffers its own observations; every ``log_every`` steps :meth:`TrainMetrics.sync`
gathers the buffers (one small collective that all ranks reach at the same step) and rank 0 puts
them into its registry. Names follow Prometheus conventions: ``_total`` counters, ``_seconds``
times, ``_bytes`` sizes.
"""

from __future__ import annotations

import errno
import logging
from dataclasses import dataclass, field
from typing import Any

import torch
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from dataio.reader import REASONS as SAMPLE_SKIP_REASONS
from trainer.dist import DistEnv, gather_objects

log = logging.getLogger("footprints")

PREFIX = "footprints"
STEP_SKIP_REASONS = ("nonfinite_loss", "nonfinite_grad", "fp16_overflow")
STEP_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class MetricsError(RuntimeError):
    """The metrics endpoint cannot start where the config puts it (``metrics.port``/``address``)."""

    refusal = True  # a setting to change, not a failure of the run (trainer.dist.refusal)

    def __init__(self, message: str, errno: int | None = None) -> None:
        super().__init__(message)
        self.errno = errno  # the bind's (EADDRNOTAVAIL: an address this host does not have)


@dataclass
class _Buffer:
    """One rank's observations since the last sync."""

    samples: int = 0
    steps: int = 0
    step_seconds: list[float] = field(default_factory=list)
    data_wait_seconds: list[float] = field(default_factory=list)
    loss: float | None = None
    memory: dict[str, int] = field(default_factory=dict)
    skipped_samples: dict[str, int] = field(default_factory=dict)


class TrainMetrics:
    """The trainer's metrics; construct on every rank, only rank 0 registers and serves them."""

    def __init__(self, env: DistEnv, port: int = 0, address: str = "127.0.0.1") -> None:
        self.env = env
        self.port, self.address = port, address
        self.registry = CollectorRegistry()
        self._buf = _Buffer()
        self._server: Any = None
        self._skipped_seen: dict[str, int] = {}
        self._begun, self._resumes = False, 0
        r = self.registry
        p = PREFIX
        self.samples = Counter(f"{p}_samples", "Training samples processed", ["rank"], registry=r)
        # NOTE: a step here is a loader batch: train.grad_accum_steps of them make one optimizer
        # step (global_step), as the README says
        self.steps = Counter(f"{p}_steps", "Training steps run, in loader batches (skipped "
                             "ones too)", ["rank"], registry=r)
        self.step_time = Histogram(f"{p}_step_seconds", "Wall time of one training step (a "
                                   "loader batch), from being ready for its batch to the step's "
                                   "end: its wait for the batch (footprints_data_wait_seconds) "
                                   "included", ["rank"], buckets=STEP_BUCKETS, registry=r)
        self.data_wait = Histogram(f"{p}_data_wait_seconds", "Time a step waited for its batch",
                                   ["rank"], buckets=STEP_BUCKETS, registry=r)
        self.loss = Gauge(f"{p}_loss", "Training loss of the last step", ["rank"], registry=r)
        # NOTE: these three are registered by begin(), once resume() has set the run's state:
        # a metric without labels is served as 0 from its creation, and the endpoint starts
        # before the checkpoint loads, so every start and restart showed a learning rate of 0
        # until the first log_every sync, epoch 0, and 0 resumes (a scrape of that 0 between N
        # and N + 1 is a counter reset to increase(), which then counted N resumes more)
        self.lr = Gauge(f"{p}_learning_rate", "Current learning rate", registry=None)
        self.epoch = Gauge(f"{p}_epoch", "Current epoch (0-based)", registry=None)
        self.skipped_samples = Counter(f"{p}_skipped_samples", "Samples left out, by reason",
                                       ["reason"], registry=r)
        self.skipped_steps = Counter(f"{p}_skipped_steps", "Optimizer steps skipped, by reason",
                                     ["reason"], registry=r)
        # NOTE: every reason at 0 from the start: a series that first appears at N is no
        # increase to Prometheus (increase() and rate() need two samples of it), so a reason's
        # first skips never showed on the dashboard nor fired an alert on increase(...) > 0
        for reason in SAMPLE_SKIP_REASONS:
            self.skipped_samples.labels(reason=reason)
        for reason in STEP_SKIP_REASONS:
            self.skipped_steps.labels(reason=reason)
        self.checkpoint_time = Histogram(f"{p}_checkpoint_seconds", "Time to write a checkpoint",
                                         buckets=STEP_BUCKETS, registry=r)
        self.memory = Gauge(f"{p}_device_memory_bytes",
                            "Memory by kind: allocated and reserved (CUDA, now); max_rss (CPU: "
                            "the process's peak resident set, not what it holds now)",
                            ["rank", "kind"], registry=r)
        self.val = Gauge(f"{p}_validation", "Last validation figures: f1, iou (building), "
                         "iou_background, iou_building, iou_boundary, miou", ["metric"],
                         registry=r)
        self.resumes = Counter(f"{p}_resumes", "Times the run resumed from a checkpoint, over "
                               "its processes (kept in its checkpoints)", registry=None)

    # ---- server -------------------------------------------------------------------------------
    def start(self) -> None:
        """Serve /metrics on rank 0 when a port is configured."""
        if not self.env.is_main or self.port == 0:
            return
        try:
            self._server, _ = start_http_server(self.port, addr=self.address,
                                                registry=self.registry)
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                raise MetricsError(f"metrics port {self.port} on {self.address} is already in "
                                   "use; choose another with --set metrics.port=N "
                                   "(0 turns the endpoint off)") from None
            raise MetricsError(f"cannot serve metrics on {self.address}:{self.port}: {e}",
                               e.errno) from None
        log.info("metrics on http://%s:%d/metrics", self.address, self.port)

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    # ---- recording (every rank, local and cheap) -------------------------------------------
    def record_step(self, samples: int, step_s: float, wait_s: float, loss: float) -> None:
        b = self._buf
        b.samples += samples
        b.steps += 1
        b.step_seconds.append(step_s)
        b.data_wait_seconds.append(wait_s)
        # NOTE: a batch of padding only (a rank's last of an epoch, more ranks than samples
        # left) has a loss of 0 by definition, not a measurement: the gauge keeps the last real
        # one (it read 0 after every such epoch end)
        if samples > 0:
            b.loss = loss

    def record_memory(self, device: torch.device) -> None:
        if device.type == "cuda":
            self._buf.memory = {"allocated": torch.cuda.memory_allocated(device),
                                "reserved": torch.cuda.memory_reserved(device)}
        else:
            self._buf.memory = {"max_rss": _max_rss_bytes()}

    def begin(self, epoch: int, lr: float, resumes: int) -> None:
        """The run's state once resume() has set it (a fresh run's too), served from now on:
        the epoch in progress (0-based), the learning rate, the run's resumes so far."""
        self.epoch.set(epoch)
        self.lr.set(lr)
        # (a second train() of one Trainer begins again: the resumes since, registered once)
        self.resumes.inc(max(0, resumes - self._resumes))
        self._resumes = max(resumes, self._resumes)
        if not self._begun:
            for metric in (self.epoch, self.lr, self.resumes):
                self.registry.register(metric)
            self._begun = True

    def skip_step(self, reason: str) -> None:
        if reason not in STEP_SKIP_REASONS:  # (a new reason: add it there, to be served at 0)
            raise ValueError(f"unknown step skip reason {reason!r}; known: {STEP_SKIP_REASONS}")
        if self.env.is_main:
            self.skipped_steps.labels(reason=reason).inc()

    def set_skipped_samples(self, totals: dict[str, int]) -> None:
        """The data layer's cumulative skip counts on this rank (by reason)."""
        self._buf.skipped_samples = dict(totals)

    # ---- aggregation (a collective: call on all ranks at the same step) ---------------------
    def sync(self) -> None:
        buffers = gather_objects(self._buf)
        prev = self._buf.skipped_samples
        self._buf = _Buffer(skipped_samples=prev)
        if not self.env.is_main:
            return
        for rank, b in enumerate(buffers):
            lbl = str(rank)
            self.samples.labels(rank=lbl).inc(b.samples)
            self.steps.labels(rank=lbl).inc(b.steps)
            for s in b.step_seconds:
                self.step_time.labels(rank=lbl).observe(s)
            for s in b.data_wait_seconds:
                self.data_wait.labels(rank=lbl).observe(s)
            if b.loss is not None:
                self.loss.labels(rank=lbl).set(b.loss)
            for kind, v in b.memory.items():
                self.memory.labels(rank=lbl, kind=kind).set(v)
        totals: dict[str, int] = {}
        for b in buffers:
            for reason, n in b.skipped_samples.items():
                totals[reason] = totals.get(reason, 0) + n
        for reason, n in totals.items():
            delta = n - self._skipped_seen.get(reason, 0)  # counters only go up: add the new
            if delta > 0:
                self.skipped_samples.labels(reason=reason).inc(delta)
                self._skipped_seen[reason] = n


def _max_rss_bytes() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
