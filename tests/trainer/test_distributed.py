"""torchrun with gloo on 2 CPU processes: DDP averages gradients, a killed worker is survived
bit-exactly, NaN on one rank is skipped by all, metrics are served, bad configs fail everywhere."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families
from trainer_helpers import (
    REPO,
    final_weights,
    first_failure,
    free_port,
    kill_tree,
    run,
    torchrun_cmd,
    train_args,
    worker_env,
    worker_exit_codes,
)

from dataio.prepare import PrepareConfig, prepare
from dataio.synth import SynthConfig, write_aoi
from models import build_model

pytestmark = [pytest.mark.multiproc, pytest.mark.slow]

KILL_RUN = ["train.epochs=8", "train.checkpoint_every_steps=2", "train.val_every=0",
            "data.num_threads=1"]
RefRun = tuple[Path, dict, Path]  # reference_run: run directory, scraped metrics, threads' dir


@pytest.fixture(scope="module")
def ddp_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """16 training tiles and nothing else: every global batch of 4 is full on 1 or 2 ranks."""
    base = tmp_path_factory.mktemp("ddp")
    write_aoi(SynthConfig(out=base / "raw", tiles=16, seed=5, size=96))
    prepare(PrepareConfig([base / "raw"], base / "DATA", split=(100, 0, 0), shard_size=4),
            progress=False)
    return base / "DATA"


@pytest.mark.timeout(240)
def test_ddp_equals_one_process_with_the_same_global_batch(ddp_dataset: Path,
                                                          tmp_path: Path) -> None:
    # GroupNorm (outputs independent of the batch), equal class weights (each rank's mean loss
    # then has the same denominator), no augmentation, and SGD, which unlike Adam would show a
    # summed instead of averaged gradient as a 2x larger step. fp32: on a CPU with native bf16
    # (AMX), amp=auto is bf16, whose rounding alone put the two runs 1.1% of the way apart.
    common = ["train.amp=off", "model.norm=group", "loss.class_weights=[1, 1, 1]", "optim.name=sgd",
              "optim.lr=0.05", "data.crop_size=0", "data.flip=false", "data.rot90=false",
              "data.brightness=0", "data.contrast=0", "train.val_every=0", "train.epochs=2",
              "data.num_threads=1"]
    # NOTE: the one process runs here, as `python -m trainer.train` would (one process makes no
    # process group, under torchrun too): a torchrun of its own cost ~8 s of start-up.
    from trainer.train import main as train_main

    assert train_main(train_args(ddp_dataset, tmp_path / "one",
                                 [*common, "data.batch_size=4"])[2:]) == 0
    two = run(torchrun_cmd(2, train_args(ddp_dataset, tmp_path / "two",
                                         [*common, "data.batch_size=2"])), timeout=150)
    assert two.returncode == 0, two.stderr[-3000:]
    a, b = final_weights(tmp_path / "one"), final_weights(tmp_path / "two")
    assert a.keys() == b.keys()
    torch.manual_seed(0)  # the trainer's seed: the initial weights
    init = build_model("unet_baseline", 3, 3, width_divisor=8, norm="group").state_dict()
    moved = max(float((a[k] - init[k]).abs().max()) for k in a)
    apart = max(float((a[k] - b[k]).abs().max()) for k in a)
    # Equal up to float summation order (batch 2 vs 4 in the conv kernels, then the all-reduce);
    # a summed instead of averaged gradient would put them as far apart as training moved them.
    assert moved > 0.05 and apart < 0.01 * moved, (moved, apart)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-3, atol=1e-3, msg=k)


def _scrape(port: int) -> dict[str, list]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as r:
        text = r.read().decode()
    return {f.name: f.samples for f in text_string_to_metric_families(text)}


@pytest.fixture(scope="module")
def reference_run(small_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> RefRun:
    """An uninterrupted 2-process run, scraped over HTTP while it trains: its run directory,
    the scraped metric families, and the directory where each rank wrote the threads it still
    had after trainer.train's main returned (threads-RANK.json, see teardown_worker.py).

    NOTE: trainer.train's main run by teardown_worker.py, which then lists the rank's threads:
    test_no_gloo_thread_outlives_the_training_command reads them here instead of a torchrun of
    its own (~10 s of start-up on 2 cores for the same check)."""
    base = tmp_path_factory.mktemp("ref")
    run_dir = base / "run"
    port = free_port()
    args = train_args(small_dataset, run_dir, [*KILL_RUN, f"metrics.port={port}"])
    args[:2] = [str(REPO / "tests" / "trainer" / "teardown_worker.py"), str(base)]
    cmd = torchrun_cmd(2, args)
    proc = subprocess.Popen(cmd, cwd=REPO, env=worker_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    scraped: dict[str, list] = {}
    deadline = time.monotonic() + 180
    try:
        while proc.poll() is None and time.monotonic() < deadline:
            try:
                families = _scrape(port)
            except OSError:
                time.sleep(0.1)
                continue
            ranks = {s.labels.get("rank") for s in families.get("footprints_samples", [])
                     if s.value > 0}
            if {"0", "1"} <= ranks:
                scraped = families
            time.sleep(0.1)
        out, err = proc.communicate(timeout=max(1, deadline - time.monotonic()))
    finally:
        if proc.poll() is None:
            kill_tree(proc.pid)
    assert proc.returncode == 0, err[-3000:]
    return run_dir, scraped, base


@pytest.mark.timeout(240)
def test_metrics_are_served_and_parse(reference_run: RefRun) -> None:
    _, families, _ = reference_run
    assert families, "never scraped /metrics with both ranks reporting"
    samples = {s.labels["rank"]: s.value for s in families["footprints_samples"]
               if s.name == "footprints_samples_total"}
    assert samples["0"] > 0 and samples["1"] > 0
    buckets = [s for s in families["footprints_step_seconds"] if s.name.endswith("_bucket")]
    assert {s.labels["rank"] for s in buckets} == {"0", "1"}
    for name in ("footprints_data_wait_seconds", "footprints_loss", "footprints_learning_rate",
                 "footprints_epoch", "footprints_device_memory_bytes", "footprints_steps"):
        assert name in families, name


@pytest.mark.timeout(300)
def test_sigkill_of_a_worker_resumes_bit_exactly(small_dataset: Path, tmp_path: Path,
                                                reference_run: RefRun) -> None:
    run_dir = tmp_path / "run"
    cmd = torchrun_cmd(2, train_args(small_dataset, run_dir, KILL_RUN), max_restarts=1)
    proc = subprocess.Popen(cmd, cwd=REPO, env=worker_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        def saved() -> bool:
            # NOTE: any step from 4 on: step 4's own file is pruned a few steps later, so a test
            # process kept off the CPU for that half second polled on until the run had ended
            return any(int(p.stem[5:]) >= 4 for p in (run_dir / "checkpoints").glob("step-*.pt"))

        deadline = time.monotonic() + 120
        while not saved() and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.02)
        assert saved() and proc.poll() is None, "no checkpoint appeared while the run was on"
        victim = _worker_pid(proc.pid, rank=0)
        os.kill(victim, signal.SIGKILL)
        out, err = proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:
            kill_tree(proc.pid)
    assert proc.returncode == 0, err[-3000:]
    assert "resumed from" in err, err[-3000:]
    ref, got = final_weights(reference_run[0]), final_weights(run_dir)
    assert all(torch.equal(ref[k], got[k]) for k in ref)


@pytest.mark.timeout(240)
def test_a_mid_epoch_resume_logs_the_whole_epoch_of_every_rank(small_dataset: Path,
                                                               tmp_path: Path) -> None:
    """The cut epoch's log line counts every rank's samples once: those before the cut from the
    checkpoint (summed over the ranks), those after it from each rank."""
    run_dir = tmp_path / "run"
    res = run(torchrun_cmd(2, [str(REPO / "tests" / "trainer" / "cut_worker.py"),
                               str(small_dataset), str(run_dir), "4"]), timeout=180)
    assert res.returncode == 0, res.stderr[-3000:]
    # 17 samples, 3 steps an epoch of 2 x 4: step 4 is the first of epoch 2
    assert "(1 epochs done, 1 steps into the next)" in res.stderr, res.stderr[-3000:]
    log = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
    assert [(r["epoch"], r["samples"]) for r in log] == [(1, 17), (2, 17)]
    assert [r["dist_backend"] for r in log] == ["gloo", "gloo"]  # (what dist.backend=auto ran)


def _run_nodes(cmd: list[str], envs: list[dict[str, str]], timeout: float) -> list[str]:
    """``cmd`` once per environment, all at once, like one launcher per node; asserts that each
    exits 0 and returns their stderr. Whatever is left at the timeout is killed, tree and all."""
    nodes = [subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, start_new_session=True)
             for env in envs]
    try:
        results = [n.communicate(timeout=timeout) for n in nodes]
    finally:
        for n in nodes:
            if n.poll() is None:
                kill_tree(n.pid)
    for n, (_, err) in zip(nodes, results, strict=True):
        assert n.returncode == 0, err[-3000:]
    return [err for _, err in results]


@pytest.mark.timeout(300)
def test_two_nodes_train_like_one_node_with_two_workers(small_dataset: Path, tmp_path: Path,
                                                       reference_run: RefRun) -> None:
    """launch/multi_node.sh twice on this machine: two "nodes" of one worker each, c10d
    rendezvous on localhost, a shared run directory."""
    run_dir = tmp_path / "run"
    env = {**worker_env(), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()),
           "NNODES": "2", "NPROC": "1", "RDZV_ID": f"test-{os.getpid()}", "MAX_RESTARTS": "0"}
    sets = [a for o in KILL_RUN for a in ("--set", o)]
    cmd = ["bash", "launch/multi_node.sh", "configs/tiny.toml", str(small_dataset),
           str(run_dir), *sets]
    errs = _run_nodes(cmd, [env, env], timeout=240)
    assert "on 2 x cpu" in "".join(errs)  # one world of two workers
    ref, got = final_weights(reference_run[0]), final_weights(run_dir)
    assert all(torch.equal(ref[k], got[k]) for k in ref)


@pytest.mark.timeout(240)
def test_two_nodes_regroup_when_only_one_counted_a_restart(tmp_path: Path) -> None:
    """Two c10d "nodes" with the launch scripts' store setting: node A's worker dies while B's
    is healthy, so the agents' restart counts differ (1 and 0), and the group still forms."""
    env = {**worker_env(), "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}
    port = free_port()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=1",
           "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}",
           f"--rdzv-id=regroup-{os.getpid()}", "--max-restarts=1",
           str(REPO / "tests" / "trainer" / "restart_worker.py"), str(tmp_path)]
    _run_nodes(cmd, [{**env, "NODE": node} for node in "AB"], timeout=200)
    assert (tmp_path / "B-was-busy").exists()
    assert sorted(p.name for p in tmp_path.glob("*.ok")) == ["A-1.ok", "B-0.ok"]
    assert (tmp_path / "B-0.ok").read_text() == "2"


def _worker_pid(agent: int, rank: int | None = None) -> int:
    """The pid of the torchrun worker with RANK=rank (a child of the agent process); with no
    rank, the agent's one worker (whichever rank the rendezvous gave it)."""
    children = Path(f"/proc/{agent}/task/{agent}/children").read_text().split()
    if rank is None and len(children) == 1:
        return int(children[0])
    for pid in children:
        env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        if f"RANK={rank}".encode() in env:
            return int(pid)
    raise AssertionError(f"no worker with RANK={rank} among {children}")


def _listening(port: int, proc: subprocess.Popen, timeout: float) -> None:
    """Wait until something accepts connections on ``port`` (``proc`` must stay up)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 1):
            return
        time.sleep(0.1)
    raise AssertionError(f"nothing listened on port {port} within {timeout}s")


@pytest.mark.timeout(300)
def test_the_survivor_of_a_killed_peer_says_so_in_one_line_and_a_rerun_resumes(
        small_dataset: Path, tmp_path: Path) -> None:
    """Two c10d "nodes" of one worker each, node B's worker SIGKILLed mid-run (the OOM killer, a
    lost node). No SIGTERM comes to the survivor first, as torchrun's does on one node: its next
    collective failed, and it said gloo's raw text twice (its log and its error line)."""
    run_dir = tmp_path / "run"
    port = free_port()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=1",
           "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}",
           f"--rdzv-id=lost-{os.getpid()}", "--max-restarts=0",
           *train_args(small_dataset, run_dir, KILL_RUN)]
    env = {**worker_env(), "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}

    def node() -> subprocess.Popen[str]:
        return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, start_new_session=True)

    # NOTE: A first, so that A's agent hosts the rendezvous store: B's agent ends with its
    # worker, and had it held the store, A's agent would stop A's worker with a SIGTERM instead
    nodes = [node()]
    try:
        _listening(port, nodes[0], timeout=60)
        nodes.append(node())
        deadline = time.monotonic() + 120
        while (not any((run_dir / "checkpoints").glob("step-*.pt"))
               and time.monotonic() < deadline and all(n.poll() is None for n in nodes)):
            time.sleep(0.02)
        assert all(n.poll() is None for n in nodes), "a node ended before the kill"
        os.kill(_worker_pid(nodes[1].pid), signal.SIGKILL)
        err = nodes[0].communicate(timeout=120)[1]
        nodes[1].communicate(timeout=60)
    finally:
        for n in nodes:
            if n.poll() is None:
                kill_tree(n.pid)
    said = [line for line in err.splitlines() if "peer" in line or "gloo" in line.lower()]
    assert len(said) == 1 and re.match(r"trainer\.train: error: rank [01]: a peer rank left the "
                                       r"process group", said[0]), err[-3000:]
    assert "Connection reset by peer" in said[0] or "Connection closed by peer" in said[0]
    assert said[0].endswith(f"else rerun the same command to resume from the newest complete "
                            f"checkpoint in {run_dir / 'checkpoints'} (the peer's own log says "
                            "why it stopped)"), said[0]
    # the worker's exit code (torchrun's agent always exits 1), and no traceback of the worker's
    assert "failed (exitcode: 1) local_rank: 0" in err, err[-3000:]
    assert not [line for line in err.splitlines()
                if line.strip().startswith("File") and "/trainer/" in line], err[-3000:]
    rerun = run(torchrun_cmd(2, train_args(small_dataset, run_dir, KILL_RUN)), timeout=180)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "resumed from" in rerun.stderr, rerun.stderr[-3000:]


@pytest.mark.timeout(240)
def test_nan_on_one_rank_is_skipped_by_both(small_dataset: Path, tmp_path: Path) -> None:
    # "ACCUM:CALL": expected optimizer steps an epoch. 1:3, a NaN at rank 1's third loss, one
    # batch a step; 2:1, accumulation of 2: rank 1's first loss is the first of a group of 2
    # (3 batches a rank and epoch: groups of 2 and 1), whose backward runs under no_sync; the
    # group's second is finite on both ranks.
    # NOTE: both runs in one torchrun, one after the other (see nan_worker.py): a torchrun
    # each cost the second case ~8 s of start-up for the same checks.
    cases = {"1:3": 3, "2:1": 2}
    out = tmp_path / "out.json"
    res = run(torchrun_cmd(2, [str(REPO / "tests" / "trainer" / "nan_worker.py"),
                               str(small_dataset), str(tmp_path), str(out), *cases]),
              timeout=180)
    assert res.returncode == 0, res.stderr[-3000:]
    views = json.loads(out.read_text())
    # rank 0's log lines of each run: from its "nan_worker: run CASE" on
    logs = {part.split("\n", 1)[0]: part for part in res.stderr.split("nan_worker: run ")[1:]}
    assert views.keys() == logs.keys() == cases.keys(), (views, res.stderr[-3000:])
    # an agreed decision is said once: once a run, and no rank's line before the first run
    assert res.stderr.count("skipped on all ranks") == len(cases), res.stderr[-3000:]
    for case, steps in cases.items():
        got = views[case]
        assert got["identical"] and got["skipped"] == 1, (case, got)
        assert got["global_step"] == 2 * got["optimizer_steps_per_epoch"] == 2 * steps, (case,
                                                                                          got)
        assert got["steps_taken"] == got["global_step"] - 1, (case, got)  # exactly one skipped
        # one all-reduce per optimizer step taken: none for the skipped one (decided before its
        # last backward), none for the batches a group accumulates before its last
        assert got["synced_backwards"] == got["steps_taken"], (case, got)
        assert logs[case].count("skipped on all ranks") == 1, (case, logs[case][-3000:])


@pytest.mark.timeout(240)
def test_no_gloo_thread_outlives_the_training_command(reference_run: RefRun) -> None:
    """trainer.train leaves no thread of the process group behind: one that ran on into the
    interpreter's exit, wanting the GIL to drop a tensor, aborted a rank after its training had
    ended ('terminate called without an active exception', exit -6; or hung it), about once a
    full suite. (DDP imported torch.distributed.nn.functional, whose default arguments held the
    group past destroy_process_group.) The reference run's ranks list their threads once
    trainer.train's main has returned (its exit code 0 is asserted in the fixture)."""
    threads = reference_run[2]
    left = {r: json.loads((threads / f"threads-{r}.json").read_text()) for r in (0, 1)}
    assert left[0] and left[1]  # (the main thread at least: the names were read)
    assert not [n for names in left.values() for n in names if "gloo" in n], left


@pytest.mark.timeout(120)
def test_bad_config_fails_on_every_rank_before_training(small_dataset: Path,
                                                        tmp_path: Path) -> None:
    args = train_args(small_dataset, tmp_path / "run", ["train.epochs=ten"])
    res = run(torchrun_cmd(2, args), timeout=90)
    assert res.returncode != 0
    assert "train.epochs: expected int, got 'ten'" in res.stderr, res.stderr[-2000:]
    assert not (tmp_path / "run").exists()
    # Every rank checks on its own, before it would wait for the others: rank 1 of 2 started
    # alone (its peers never come) still fails at once instead of hanging at the rendezvous.
    env = {**worker_env(), "RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1",
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    t0 = time.monotonic()
    alone = subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True,
                           text=True, timeout=60)
    assert alone.returncode == 2 and time.monotonic() - t0 < 30
    assert "train.epochs: expected int, got 'ten'" in alone.stderr


@pytest.mark.timeout(240)
def test_ranks_that_read_different_shards_stop_with_the_reason(small_dataset: Path,
                                                                tmp_path: Path) -> None:
    """Rank 1 leaves out a train shard that rank 0 reads: it would take fewer steps an epoch and
    leave rank 0 waiting in a collective until the process-group timeout (600 s by default).
    Rank 1 finding no val shard at all stopped alone, rank 0 dying on a reset connection."""
    worker = str(REPO / "tests" / "trainer" / "data_worker.py")
    args = train_args(small_dataset, tmp_path / "run", ["train.epochs=1"])
    t0 = time.monotonic()
    res = run(torchrun_cmd(2, [worker, "train/shard-000001.tar", *args[2:]]), timeout=120)
    assert res.returncode != 0
    assert time.monotonic() - t0 < 100  # not the 600 s timeout
    assert f"split 'train' of {small_dataset}: the ranks read different data" in res.stderr, \
        res.stderr[-3000:]
    assert "rank 1: 13 samples" in res.stderr and "this node's copy" in res.stderr

    res = run(torchrun_cmd(2, [worker, "val/shard-000000.tar", *args[2:]]), timeout=120)
    assert res.returncode != 0
    assert f"rank 1 could not open split 'val' of {small_dataset}: DataError" in res.stderr, \
        res.stderr[-3000:]
    assert "Connection closed by peer" not in res.stderr


@pytest.mark.timeout(240)
@pytest.mark.parametrize("refused", ["split", "metrics_port"])
def test_a_refusal_once_the_ranks_have_started_exits_2_on_every_rank(small_dataset: Path,
                                                                     tmp_path: Path,
                                                                     refused: str) -> None:
    """Bad input found once the process group is up (the loaders' agreed refusal of a split,
    the metrics port taken: rank 0's failure, the other ranks' RankError) exited 1, as a
    failure of the run does, where the same input refused before the group exited 2."""
    args = train_args(small_dataset, tmp_path / "run", ["train.epochs=1"])
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        if refused == "split":  # rank 1 finds no usable val shard: a DataError there
            worker = str(REPO / "tests" / "trainer" / "data_worker.py")
            cmd = torchrun_cmd(2, [worker, "val/shard-000000.tar", *args[2:]])
            said = f"could not open split 'val' of {small_dataset}"
        else:  # rank 0 cannot bind it: a MetricsError there
            port = busy.getsockname()[1]
            cmd = torchrun_cmd(2, [*args, "--set", f"metrics.port={port}", "--set",
                                   "metrics.address=127.0.0.1"])
            said = f"metrics port {port} on 127.0.0.1 is already in use"
        res = run(cmd, timeout=150)
    assert res.returncode == 1  # (torchrun's own, whatever its workers' codes)
    codes, first = worker_exit_codes(res.stderr), first_failure(res.stderr)
    assert first is not None and codes[first] == 2, res.stderr[-3000:]
    # (a rank still tearing down when torchrun saw the first exit gets its SIGTERM: 143; one
    # already past main, its line said and the interpreter exiting, ends by it: -15)
    assert set(codes.values()) <= {2, 143, -15}, codes
    assert res.stderr.count("trainer.train: error:") == 2 and said in res.stderr, \
        res.stderr[-3000:]
    assert res.stderr.count("Traceback") == 1, res.stderr[-3000:]  # (torchrun's own alone)


@pytest.mark.timeout(240)
def test_ranks_that_read_as_many_other_samples_stop_with_the_reason(small_dataset: Path,
                                                                    small_aoi: Path,
                                                                    tmp_path: Path) -> None:
    """A node's copy prepared again with another seed has splits of the same sizes but other
    tiles in each: the ranks would take the same steps, without an error, each training on a
    split of its own (and validating on tiles another rank trains on)."""
    other = tmp_path / "DATA"
    prepare(PrepareConfig(raw=[small_aoi], out=other, shard_size=4, seed=1),
            progress=False)
    worker = str(REPO / "tests" / "trainer" / "data_worker.py")
    args = train_args(small_dataset, tmp_path / "run", ["train.epochs=1"])
    res = run(torchrun_cmd(2, [worker, f"data={other}", *args[2:]]), timeout=120)
    assert res.returncode != 0
    assert "the ranks read different data" in res.stderr, res.stderr[-3000:]
    assert "rank 0: 17 samples" in res.stderr and "rank 1: 17 samples" in res.stderr


@pytest.mark.timeout(150)
def test_a_failed_checkpoint_write_stops_every_rank_with_the_reason(small_dataset: Path,
                                                                     tmp_path: Path) -> None:
    """Rank 0 alone writes checkpoints: its failure (a full disk) is agreed, so rank 1 stops
    with the reason too instead of dying on gloo's reset connection."""
    args = train_args(small_dataset, tmp_path / "run", ["train.epochs=2"])
    args[:2] = [str(REPO / "tests" / "trainer" / "save_fail_worker.py")]
    res = run(torchrun_cmd(2, args), timeout=120)
    assert res.returncode != 0
    assert "rank 0 stopped while writing a checkpoint: OSError: [Errno 28] No space left on " \
           "device" in res.stderr, res.stderr[-3000:]
    # rank 0's own error, once, naming it (it was a '[rank 0] ERROR ...' log line too)
    assert res.stderr.count("trainer.train: error: rank 0: [Errno 28] No space left on "
                            "device") == 1, res.stderr[-3000:]
    assert "] ERROR " not in res.stderr, res.stderr[-3000:]
    assert "Connection closed by peer" not in res.stderr and "GLOO" not in res.stderr.upper()


@pytest.mark.timeout(240)
def test_a_ranks_own_failure_names_the_rank_when_a_restart_mends_it(small_dataset: Path,
                                                                    tmp_path: Path) -> None:
    """A failure of one rank that no collective agrees on (a CUDA out-of-memory error in its
    step): its line was the only record of which rank failed, once 2e08484 dropped the
    '[rank N] ERROR' log line, and it named none. The survivor's line says 'the peer's own log
    says why it stopped', and after a restart that mends it torchrun prints no summary naming
    the rank; the Slurm output of a run of many ranks said the error without whose it was."""
    args = train_args(small_dataset, tmp_path / "run", ["train.epochs=1", "train.val_every=0",
                                                        "data.num_threads=1"])
    args[:2] = [str(REPO / "tests" / "trainer" / "step_fail_worker.py")]
    res = run(torchrun_cmd(2, args, max_restarts=1), timeout=200)
    assert res.returncode == 0, res.stderr[-3000:]
    # (after rank 0's progress bar, on its line: the ranks share one stderr)
    said = re.findall(r"trainer\.train: error: [^\r\n]*CUDA out of memory[^\r\n]*", res.stderr)
    assert said == ["trainer.train: error: rank 1: CUDA out of memory. Tried to allocate "
                    "2.00 GiB"], res.stderr[-3000:]


@pytest.mark.timeout(150)
def test_a_failure_in_one_ranks_validation_stops_every_rank_with_the_reason(
        small_dataset: Path, tmp_path: Path) -> None:
    """(rank 1 stopped alone; rank 0 was killed by torchrun, saying nothing)"""
    args = train_args(small_dataset, tmp_path / "run", ["train.epochs=1"])
    args[:2] = [str(REPO / "tests" / "rank_fail_worker.py"), "trainer.train"]
    res = run(torchrun_cmd(2, args), timeout=120, env={"FAIL_AT": "val"})
    assert res.returncode != 0
    assert "trainer.train: error: rank 1 stopped while validating: ValueError: simulated" \
        in res.stderr, res.stderr[-3000:]
    assert "Connection closed by peer" not in res.stderr


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie (not yet reaped by init) counts as gone
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):  # reaped between the looks (or the read)
        return False


@pytest.mark.timeout(120)
@pytest.mark.parametrize("mode", ["init", "score"])
def test_workers_stop_when_the_torchrun_agent_is_killed(tmp_path: Path, mode: str) -> None:
    """torchrun puts each worker in a session of its own: killing the launcher left them
    training on into the run directory, beside a rerun's. ``score`` works before it joins the
    process group (its pool forks), and must stop too, not finish its share first."""
    (tmp_path / "s.csv").write_text("ImageId,BuildingId,PolygonWKT_Pix,Confidence\n"
                                    "img0,-1,POLYGON EMPTY,1\n")
    cmd = torchrun_cmd(2, [str(REPO / "tests" / "trainer" / "agent_worker.py"), str(tmp_path),
                           mode])
    agent = subprocess.Popen(cmd, cwd=REPO, env=worker_env(), stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL, start_new_session=True)
    pids: list[int] = []
    try:
        deadline = time.monotonic() + 60
        while len(pids) < 2 and time.monotonic() < deadline:
            time.sleep(0.2)
            pids = [int(p.read_text()) for p in sorted(tmp_path.glob("*.pid"))]
        assert len(pids) == 2, "the workers did not start"
        pids += [int(p.read_text()) for p in sorted(tmp_path.glob("*.child"))]
        assert len(pids) == 4
        agent.send_signal(signal.SIGKILL)
        agent.wait(timeout=10)
        deadline = time.monotonic() + 15
        while any(_alive(p) for p in pids) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not any(_alive(p) for p in pids), "workers (or their children) outlived the agent"
    finally:
        for p in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(p, signal.SIGKILL)
        with contextlib.suppress(ProcessLookupError):
            agent.kill()
