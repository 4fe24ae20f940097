"""TrainMetrics: the endpoint binds where configured, a busy port is a clear error, sums agree."""

from __future__ import annotations

import socket
import sys
import urllib.request
from pathlib import Path

import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families
from trainer_helpers import free_port, run, train_args

from trainer import metrics
from trainer.dist import DistEnv
from trainer.metrics import MetricsError, TrainMetrics, _Buffer


def test_serves_on_the_configured_loopback_address_only() -> None:
    port = free_port()
    m = TrainMetrics(DistEnv(), port=port, address="127.0.0.1")
    m.start()
    try:
        m.record_step(samples=8, step_s=0.2, wait_s=0.01, loss=0.5)
        m.skip_step("nonfinite_loss")
        m.set_skipped_samples({"img_invalid": 2})
        m.sync()
        assert m._server.server_address[0] == "127.0.0.1"
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read()
        fams = {f.name: f for f in text_string_to_metric_families(text.decode())}
        total = [s for s in fams["footprints_samples"].samples
                 if s.name == "footprints_samples_total"]
        assert [(s.labels, s.value) for s in total] == [({"rank": "0"}, 8.0)]
        skipped = {s.labels["reason"]: s.value for s in fams["footprints_skipped_samples"].samples
                   if s.name.endswith("_total")}
        assert skipped == {"img_invalid": 2.0, "mask_invalid": 0.0, "meta_invalid": 0.0,
                           "read_error": 0.0}
        assert 'footprints_skipped_steps_total{reason="nonfinite_loss"} 1.0' in text.decode()
        # counters only grow: a later sync with the same cumulative figure adds nothing
        m.set_skipped_samples({"img_invalid": 2})
        m.sync()
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read()
        assert 'footprints_skipped_samples_total{reason="img_invalid"} 2.0' in text.decode()
    finally:
        m.stop()


def test_steps_are_summed_into_the_right_series() -> None:
    m = TrainMetrics(DistEnv())  # not served: the registry is what the endpoint shows
    m.record_step(samples=8, step_s=0.2, wait_s=0.01, loss=0.5)
    m.record_step(samples=8, step_s=0.3, wait_s=0.02, loss=0.25)
    m.sync()

    def value(name: str) -> float | None:
        return m.registry.get_sample_value(f"footprints_{name}", {"rank": "0"})

    assert value("samples_total") == 16 and value("steps_total") == 2
    assert value("step_seconds_sum") == pytest.approx(0.5)
    assert value("data_wait_seconds_sum") == pytest.approx(0.03)
    assert value("step_seconds_count") == value("data_wait_seconds_count") == 2
    assert value("loss") == 0.25  # the last step's


def test_the_runs_state_is_served_only_once_it_is_known() -> None:
    """Not 0 while the checkpoint loads: a scrape of that 0 between a run's N and N + 1 resumes
    is a counter reset to Prometheus' increase(), which then counted N resumes more."""
    m = TrainMetrics(DistEnv())
    for name in ("resumes_total", "epoch", "learning_rate"):
        assert m.registry.get_sample_value(f"footprints_{name}") is None
    m.begin(epoch=3, lr=0.5, resumes=2)
    assert m.registry.get_sample_value("footprints_resumes_total") == 2
    assert m.registry.get_sample_value("footprints_epoch") == 3
    assert m.registry.get_sample_value("footprints_learning_rate") == 0.5
    m.begin(epoch=4, lr=0.25, resumes=3)  # a second train() of one Trainer
    assert m.registry.get_sample_value("footprints_resumes_total") == 3
    assert m.registry.get_sample_value("footprints_epoch") == 4


def test_every_skip_reason_is_served_at_0_before_its_first_skip() -> None:
    """A series that first appears at N is no increase to Prometheus: increase() and rate()
    need two samples of it, so a reason's first skips (a burst of unreadable samples) never
    showed on the dashboard's skipped panels nor fired an alert on increase(...) > 0
    (promtool test rules: the same series fires from 0 and stays silent from absent)."""
    from dataio.reader import REASONS

    m = TrainMetrics(DistEnv())

    def value(name: str, reason: str) -> float | None:
        return m.registry.get_sample_value(f"footprints_{name}_total", {"reason": reason})

    assert REASONS and all(value("skipped_samples", r) == 0 for r in REASONS)
    for reason in ("nonfinite_loss", "nonfinite_grad", "fp16_overflow"):
        assert value("skipped_steps", reason) == 0
    m.skip_step("nonfinite_grad")
    assert value("skipped_steps", "nonfinite_grad") == 1


def test_a_batch_of_padding_only_leaves_the_loss_gauge_at_the_last_real_one() -> None:
    """A rank's last batch of an epoch can hold padding only (more ranks than samples left): its
    loss is 0 by definition, not a measurement, and the epoch's closing sync showed that rank's
    loss as 0 until the next sync, a dip to 0 on the dashboard every epoch."""
    m = TrainMetrics(DistEnv())
    m.record_step(samples=3, step_s=0.2, wait_s=0.01, loss=0.75)
    m.record_step(samples=0, step_s=0.1, wait_s=0.01, loss=0.0)
    m.sync()
    assert m.registry.get_sample_value("footprints_loss", {"rank": "0"}) == 0.75
    assert m.registry.get_sample_value("footprints_steps_total", {"rank": "0"}) == 2
    m.record_step(samples=0, step_s=0.1, wait_s=0.01, loss=0.0)  # a window of padding only
    m.sync()
    assert m.registry.get_sample_value("footprints_loss", {"rank": "0"}) == 0.75


def test_each_rank_gets_its_own_series_and_skips_are_summed(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Rank 0 exports every rank's figures under that rank's label (not its own), and the
    skipped samples of all ranks as one total per reason."""
    other = _Buffer(samples=4, steps=1, step_seconds=[0.5], data_wait_seconds=[0.25], loss=2.0,
                    memory={"max_rss": 7}, skipped_samples={"img_invalid": 3})
    monkeypatch.setattr(metrics, "gather_objects", lambda mine: [mine, other])
    m = TrainMetrics(DistEnv(rank=0, world_size=2))
    m.record_step(samples=8, step_s=0.2, wait_s=0.01, loss=0.5)
    m.set_skipped_samples({"img_invalid": 1})
    m.sync()

    def value(name: str, **labels: str) -> float | None:
        return m.registry.get_sample_value(f"footprints_{name}", labels)

    assert value("samples_total", rank="0") == 8 and value("samples_total", rank="1") == 4
    assert value("loss", rank="1") == 2.0 and value("step_seconds_sum", rank="1") == 0.5
    assert value("device_memory_bytes", rank="1", kind="max_rss") == 7
    assert value("skipped_samples_total", reason="img_invalid") == 4


def _rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024  # "VmRSS:   123456 kB"
    raise AssertionError("no VmRSS in /proc/self/status")


def test_cpu_memory_is_exported_in_bytes() -> None:
    """ru_maxrss counts KiB; the metric is ``_bytes``, so it is of the order of the RSS now.

    NOTE: not ``>= rss``: the kernel updates the peak lazily, and it lagged VmRSS by ~100 KiB here.
    """
    m = TrainMetrics(DistEnv())
    rss = _rss_bytes()
    m.record_memory(torch.device("cpu"))
    m.sync()
    peak = m.registry.get_sample_value("footprints_device_memory_bytes",
                                       {"rank": "0", "kind": "max_rss"})
    assert peak is not None and peak >= rss // 2  # KiB read as bytes gives rss / 1024


def test_cuda_memory_is_exported_as_allocated_and_reserved(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Two kinds, each its own figure (reserved minus allocated is the caching allocator's
    slack, which a dashboard shows by putting the two side by side)."""
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device: 3 << 20)
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device: 8 << 20)
    m = TrainMetrics(DistEnv())
    m.record_memory(torch.device("cuda", 0))
    m.sync()
    got = {kind: m.registry.get_sample_value("footprints_device_memory_bytes",
                                             {"rank": "0", "kind": kind})
           for kind in ("allocated", "reserved", "max_rss")}
    assert got == {"allocated": 3 << 20, "reserved": 8 << 20, "max_rss": None}


def test_histogram_buckets_are_seconds_up_to_a_minute() -> None:
    """The dashboards' p50/p95 come from the buckets: a 0.2 s step must land between 0.1 and
    0.25 s, and a 20 s checkpoint in a finite bucket (past the last one, p95 reads as that
    bucket's bound however slow the checkpoints get)."""
    m = TrainMetrics(DistEnv())
    m.record_step(samples=8, step_s=0.2, wait_s=0.2, loss=0.5)
    m.sync()
    m.checkpoint_time.observe(20.0)

    def bucket(name: str, le: str, **labels: str) -> float | None:
        return m.registry.get_sample_value(f"footprints_{name}_bucket", {**labels, "le": le})

    for name in ("step_seconds", "data_wait_seconds"):
        assert bucket(name, "0.1", rank="0") == 0 and bucket(name, "0.25", rank="0") == 1
    assert bucket("checkpoint_seconds", "10.0") == 0
    assert bucket("checkpoint_seconds", "30.0") == 1


def test_a_stopped_endpoint_frees_its_port() -> None:
    """stop() releases the port: a trainer built again in the same process (a notebook, a
    resume) can serve there."""
    port = free_port()
    for _ in range(2):
        m = TrainMetrics(DistEnv(), port=port)
        m.start()
        m.stop()
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))


def test_a_port_in_use_is_a_clear_error() -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        m = TrainMetrics(DistEnv(), port=port)
        with pytest.raises(MetricsError, match=f"port {port} on 127.0.0.1 is already in use"):
            m.start()


def test_only_rank_0_serves_and_port_0_is_off() -> None:
    port = free_port()
    rank1, off = TrainMetrics(DistEnv(rank=1, world_size=2), port=port), TrainMetrics(DistEnv(),
                                                                                      port=0)
    rank1.start()
    off.start()
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))  # nobody took it
    # port 0 would otherwise make the server bind any free port: it must start nothing
    assert rank1._server is None and off._server is None


@pytest.mark.parametrize("run_dir", ["new", "existing", "existing_with_files"])
def test_training_stops_with_the_reason_when_the_port_is_taken(small_dataset, tmp_path,
                                                               capsys, run_dir) -> None:
    """Refused at the port (after the run directory is made for its lock), a new run directory
    stayed behind, empty but for .lock; now it goes, with the parents made for it. One that
    was there stays as it was."""
    from trainer.train import main

    run = tmp_path / "runs" / "run"
    if run_dir != "new":
        run.mkdir(parents=True)
    if run_dir == "existing_with_files":
        (run / "notes.txt").write_text("mine")
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        rc = main(["--config", "configs/tiny.toml", "--data", str(small_dataset), "--run-dir",
                   str(run), "--set", f"metrics.port={port}"])
    assert rc == 2  # (a setting to change and rerun: was 1, as a failure of the run)
    assert "already in use" in capsys.readouterr().err
    if run_dir == "new":
        assert not (tmp_path / "runs").exists()
    else:
        assert sorted(p.name for p in run.iterdir()) == (
            ["notes.txt"] if run_dir == "existing_with_files" else [])


@pytest.mark.timeout(120)
def test_an_error_once_training_has_started_is_said_once(small_dataset: Path,
                                                         tmp_path: Path) -> None:
    """An error found after the checks (here rank 0's port, bound once the group is up) was
    printed twice: a timestamped '[rank 0] ERROR ...' log line, then the same text as
    'trainer.train: error: ...'. (A process of its own: the logger is set up once per process.)"""
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        res = run([sys.executable, *train_args(small_dataset, tmp_path / "run",
                                               [f"metrics.port={port}"])], timeout=100)
    assert res.returncode == 2
    assert res.stderr.strip().splitlines() == [
        f"trainer.train: error: metrics port {port} on 127.0.0.1 is already in use; choose "
        "another with --set metrics.port=N (0 turns the endpoint off)"], res.stderr


def test_check_refuses_a_port_in_use_before_torchrun(small_dataset: Path, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    """The launch scripts' --check passed a metrics.port in use (node_exporter's 9100, which the
    GPU presets take): rank 0 refused it once started, every rank exited 2, and torchrun
    restarted the group MAX_RESTARTS times on it, exiting 1 (35 s on the tiny preset)."""
    from trainer.train import main

    argv = ["--check", "--config", "configs/tiny.toml", "--data", str(small_dataset),
            "--run-dir", str(tmp_path / "run")]
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert main([*argv, "--set", f"metrics.port={port}"]) == 2
    assert capsys.readouterr().err.strip() == (
        f"trainer.train: error: metrics port {port} on 127.0.0.1 is already in use; choose "
        "another with --set metrics.port=N (0 turns the endpoint off)")
    port = free_port()
    assert main([*argv, "--set", f"metrics.port={port}"]) == 0
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))  # let go again, for the run's rank 0
    assert not (tmp_path / "run").exists()


def test_check_on_several_nodes_leaves_another_nodes_address_to_it(
        small_dataset: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """metrics.address set to one node's cluster address (the config's advice for a scrape from
    another machine), which multi_node.sh hands every node: each other node's --check could not
    bind it ('Cannot assign requested address') and stopped its node before torchrun, exit 2,
    so the job never started, where rank 0 serves it on the node that has it. On one node
    (single_node.sh) rank 0 starts here: still refused."""
    from trainer.train import main

    argv = ["--check", "--config", "configs/tiny.toml", "--data", str(small_dataset),
            "--run-dir", str(tmp_path / "run"), "--set", f"metrics.port={free_port()}",
            "--set", "metrics.address=192.0.2.1"]  # (TEST-NET-1, RFC 5737: no host's)
    assert main([*argv, "--multi-node"]) == 0
    assert capsys.readouterr().err == ""
    assert main(argv) == 2
    assert capsys.readouterr().err.startswith(
        "trainer.train: error: cannot serve metrics on 192.0.2.1:")
    # a port in use here is refused on several nodes too (rank 0 may start on any)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert main([*argv, "--set", f"metrics.port={port}", "--set",
                     "metrics.address=127.0.0.1", "--multi-node"]) == 2
    assert "is already in use" in capsys.readouterr().err


def test_a_run_exports_its_figures_and_a_resume_counts_once(small_dataset: Path,
                                                            tmp_path: Path) -> None:
    """What dashboards plot besides the step series: the epoch, the learning rate, validation
    F1/IoU and checkpoint times of the run, and one more resume each time a run picks up its
    checkpoint, counted over the run's processes (the resumed run's epoch gauge then follows
    the checkpoint, not 0)."""
    from trainer.config import load_config
    from trainer.trainer import Trainer

    run_dir = tmp_path / "run"

    def run(epochs: int) -> Trainer:
        cfg = load_config(Path("configs/tiny.toml"), [f"train.epochs={epochs}",
                                                      "data.num_threads=1"])
        t = Trainer(cfg, DistEnv(), small_dataset, run_dir)
        t.train()
        return t

    def value(t: Trainer, name: str, **labels: str) -> float | None:
        return t.metrics.registry.get_sample_value(f"footprints_{name}", labels)

    first = run(1)
    assert value(first, "resumes_total") == 0
    assert value(first, "epoch") == 0
    assert value(first, "learning_rate") == first.optimizer.param_groups[0]["lr"] > 0
    assert value(first, "validation", metric="f1") == first.history[-1]["val_f1"]
    assert value(first, "validation", metric="iou") == first.history[-1]["val_iou"]
    for metric in ("iou_background", "iou_building", "iou_boundary", "miou"):
        assert value(first, "validation", metric=metric) == first.history[-1][f"val_{metric}"]
    assert value(first, "checkpoint_seconds_count") == 1  # one checkpoint, at the epoch's end
    second = run(2)
    assert value(second, "resumes_total") == 1
    assert value(second, "epoch") == 1
    assert value(second, "checkpoint_seconds_count") == 1  # this process's own
    # NOTE: the run's resumes, carried in its checkpoints: every resume is a new process (a
    # torchrun restart, a requeue), whose own count was never more than 1, so the dashboard's
    # Resumes stat said 1 after any number of them, and increase() saw 1 -> 1, no resume at all
    third = run(3)
    assert value(third, "resumes_total") == 2


def test_a_resumed_run_serves_its_epoch_and_learning_rate_before_its_first_sync(
        small_dataset: Path, tmp_path: Path) -> None:
    """The gauges were served as 0 from the endpoint's start until train_epoch (the epoch) and
    the first log_every sync (the learning rate, 20 steps and a compile on the GPU presets): a
    drop to 0 on the dashboard at every start and restart, and epoch 0 for a resumed run."""
    from trainer.config import load_config
    from trainer.trainer import Trainer

    def trainer(epochs: int) -> Trainer:
        cfg = load_config(Path("configs/tiny.toml"), [f"train.epochs={epochs}",
                                                      "data.num_threads=1", "train.log_every=100"])
        return Trainer(cfg, DistEnv(), small_dataset, tmp_path / "run")

    trainer(1).train()
    t = trainer(2)
    seen = []
    train_epoch = t.train_epoch

    def spy() -> dict:
        r = t.metrics.registry
        seen.append((r.get_sample_value("footprints_epoch"),
                     r.get_sample_value("footprints_learning_rate"),
                     t.optimizer.param_groups[0]["lr"]))
        return train_epoch()

    t.train_epoch = spy  # type: ignore[method-assign]
    t.train()
    (epoch, lr, optimizer_lr), = seen
    assert epoch == 1 and lr == optimizer_lr > 0


def test_a_class_without_an_iou_is_null_in_the_log_and_nan_on_its_gauge(
        small_dataset: Path, tmp_path: Path) -> None:
    """A val split without a boundary pixel, predicting none, has no boundary IoU (None): the
    gauge cannot take None (a TypeError at the epoch's end stopped the run), so it is NaN."""
    import json
    import math

    from trainer.config import load_config
    from trainer.trainer import Trainer

    cfg = load_config(Path("configs/tiny.toml"), ["train.epochs=1", "data.num_threads=1"])
    t = Trainer(cfg, DistEnv(), small_dataset, tmp_path / "run")
    scores = {"val_f1": 0.5, "val_iou": 0.6, "val_iou_background": 0.8, "val_iou_building": 0.6,
              "val_iou_boundary": None, "val_miou": 0.7}
    t.validator.run = lambda _net: dict(scores)  # type: ignore[method-assign]
    t.train()

    def value(metric: str) -> float | None:
        return t.metrics.registry.get_sample_value("footprints_validation", {"metric": metric})

    assert math.isnan(value("iou_boundary")) and value("miou") == 0.7  # type: ignore[arg-type]
    logged = json.loads((tmp_path / "run" / "log.jsonl").read_text())
    assert "val_iou_boundary" in logged and logged["val_iou_boundary"] is None
