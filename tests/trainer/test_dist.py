"""trainer.dist without a process group: torchrun's variables, seeds per rank, the timeout."""

from __future__ import annotations

import datetime
import random
from collections.abc import Callable

import numpy as np
import pytest
import torch
from proc_helpers import numba_interrupt

from dataio.atomic import WriteError
from trainer import checkpoint as ckpt
from trainer import dist
from trainer.dist import DistEnv

TORCHRUN_VARS = ("WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_PORT",
                 "TORCHELASTIC_RUN_ID", "TORCHELASTIC_RESTART_COUNT")


@pytest.fixture
def no_torchrun(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for name in TORCHRUN_VARS:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def test_torchrun_variables_and_their_absence(no_torchrun: pytest.MonkeyPatch) -> None:
    assert DistEnv.from_env() == DistEnv(rank=0, world_size=1, local_rank=0, local_world_size=1)
    for k, v in {"WORLD_SIZE": "4", "RANK": "3", "LOCAL_RANK": "1",
                 "LOCAL_WORLD_SIZE": "2"}.items():
        no_torchrun.setenv(k, v)
    env = DistEnv.from_env()
    assert env == DistEnv(rank=3, world_size=4, local_rank=1, local_world_size=2)
    assert env.distributed and not env.is_main
    # set but empty (a launch script exporting a variable of its own that is unset): as if unset
    for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        no_torchrun.setenv(k, "")
    assert DistEnv.from_env() == DistEnv()


@pytest.mark.parametrize("rank", ["-1", "2"])
def test_a_rank_outside_the_world_is_refused(no_torchrun: pytest.MonkeyPatch, rank: str) -> None:
    no_torchrun.setenv("WORLD_SIZE", "2")
    no_torchrun.setenv("RANK", rank)  # ranks are 0 and 1
    with pytest.raises(ValueError, match=f"RANK={rank} is outside WORLD_SIZE=2"):
        DistEnv.from_env()


@pytest.mark.parametrize("port", ["abc", "99999", "0", ""])
def test_a_master_port_that_is_no_port_is_named(no_torchrun: pytest.MonkeyPatch,
                                                port: str) -> None:
    """(init_process_group said "invalid literal for int() with base 10: 'abc'", or "port must
    have value from 0 to 65535 but was 99999", after the config and data were loaded)"""
    no_torchrun.setenv("WORLD_SIZE", "2")
    no_torchrun.setenv("MASTER_PORT", port)
    with pytest.raises(ValueError, match=f"MASTER_PORT={port!r} is not a TCP port"):
        DistEnv.from_env()
    no_torchrun.setenv("WORLD_SIZE", "1")  # one process: no rendezvous, the port is not used
    assert DistEnv.from_env().world_size == 1


def _draws() -> tuple[float, float, float]:
    return random.random(), float(np.random.rand()), float(torch.rand(()))


def test_each_rank_gets_its_own_repeatable_random_streams() -> None:
    saved = ckpt.rng_state()
    try:
        dist.seed_everything(7, rank=0)
        rank0 = _draws()
        dist.seed_everything(7, rank=1)
        rank1 = _draws()
        dist.seed_everything(7, rank=0)
        again = _draws()
    finally:
        ckpt.set_rng_state(saved)
    assert again == rank0  # the same seed and rank: the same run
    assert all(a != b for a, b in zip(rank0, rank1, strict=True))  # python, numpy and torch


def test_the_process_group_gets_the_configured_timeout(no_torchrun: pytest.MonkeyPatch) -> None:
    seen: dict[str, object] = {}

    def group(**kwargs: object) -> None:
        seen.update(kwargs)

    no_torchrun.setattr(dist, "setup_logging", lambda env: None)  # (once per process)
    no_torchrun.setattr(torch.distributed, "is_initialized", lambda: False)
    no_torchrun.setattr(torch.distributed, "init_process_group", group)
    env = DistEnv(rank=1, world_size=2, local_rank=1, local_world_size=2)
    assert dist.init(env, "gloo", timeout_s=42.0) == env
    assert seen == {"backend": "gloo", "rank": 1, "world_size": 2,
                    "timeout": datetime.timedelta(seconds=42)}


def test_in_one_process_a_failure_is_raised_as_itself() -> None:
    """This rank's own failure keeps its type and message (what the commands print and catch);
    only another rank's failure becomes a RankError, and one process has no other rank."""
    from dataio.sharding import DataError

    err = DataError("DATA/train: no usable shard")

    def fail() -> None:
        raise err

    for call in (lambda: dist.agreed_loader("train", "DATA", fail),
                 lambda: dist.on_every("validating", fail),
                 lambda: dist.on_main(DistEnv(), "writing", fail)):
        with pytest.raises(DataError) as e:
            call()
        assert e.value is err


@pytest.mark.parametrize("agreed", ["agreed_loader", "on_every"])
def test_this_ranks_own_failure_leaves_no_cycle_holding_its_callers(agreed: str) -> None:
    """agreed_loader (and on_every, by agree_on) raised this rank's own failure from a local that
    its traceback's frame holds: a reference cycle, freed only by the garbage collector. It held
    the Trainer being built (its DDP model, the process group) past destroy_process_group, and
    gloo's threads aborted the refusing rank at exit (-6). Its callers' frames now go when the
    error is dropped."""
    import gc
    import weakref

    from dataio.sharding import DataError

    class Trainer:  # (what Trainer.__init__'s frame holds: the model, the group)
        pass

    def fail() -> None:
        raise DataError("DATA/val: no usable sample in split 'val'")

    def build(held: Trainer) -> None:  # (a frame that holds it, as Trainer.__init__'s does)
        if agreed == "agreed_loader":
            dist.agreed_loader("val", "DATA", fail)
        else:
            dist.on_every("validating", fail)

    held = Trainer()
    gone = weakref.ref(held)
    gc.disable()
    try:
        with pytest.raises(DataError):
            build(held)
        del held
        assert gone() is None, [type(r).__name__ for r in gc.get_referrers(gone())]
    finally:
        gc.enable()


def test_ranks_that_read_different_data_name_a_few_left_out_shards_each(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A node missing a whole split of 400 shards: every rank's every shard went into one line
    (~100 kB). Now each rank's first three reasons and a count."""
    from types import SimpleNamespace

    reasons = [f"DATA/train/shard-{i:06d}.tar: missing (this node's copy)" for i in range(400)]
    mine = SimpleNamespace(fingerprint="a" * 16, num_samples=10,
                           index=SimpleNamespace(skipped_detail=reasons))
    monkeypatch.setattr(dist, "gather_objects",  # (this rank's view, and a rank 1 that read all)
                        lambda view: [view, ("b" * 16, 4000, "", None)])
    with pytest.raises(dist.RankError) as e:
        dist.agreed_loader("train", "DATA", lambda: mine)
    msg = str(e.value)
    assert (f"rank 0: 10 samples, fingerprint aaaaaaaaaaaa, left out [{reasons[0]}; "
            f"{reasons[1]}; {reasons[2]}; and 397 more]; rank 1: 4000 samples, fingerprint "
            "bbbbbbbbbbbb, left out [none]") in msg
    assert len(msg) < 1000


def test_a_ctrl_c_that_numba_reported_as_a_system_error_is_not_agreed_on(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """It was taken for the share's failure: agreed on (a collective the interrupted peers
    never join), then out as a SystemError that the commands' Ctrl-C clean-up (trainer.predict
    removing its stage) did not see. Now it is the KeyboardInterrupt it was, at once, as a plain
    one is; another SystemError is agreed on as before."""
    agreed: list[BaseException | None] = []
    monkeypatch.setattr(dist, "agree_on", lambda what, error: agreed.append(error))
    with pytest.raises(KeyboardInterrupt) as e:
        dist.on_every("writing predictions", lambda: numba_interrupt(KeyboardInterrupt()))
    assert isinstance(e.value.__cause__, SystemError) and agreed == []
    dist.on_every("writing predictions", lambda: numba_interrupt(ValueError("not a press")))
    assert len(agreed) == 1 and isinstance(agreed[0], SystemError)


def test_a_rank_whose_peers_are_gone_raises_its_own_failure(monkeypatch: pytest.MonkeyPatch
                                                            ) -> None:
    """When the agreement itself fails (the others stopped, or the timeout), a rank that failed
    says why it did, not only that the connection closed."""
    def gone(obj: object) -> list[object]:
        raise RuntimeError("Connection closed by peer")

    monkeypatch.setattr(dist, "gather_objects", gone)
    with pytest.raises(OSError, match="No space left"):
        dist.agree_on("writing predictions", OSError(28, "No space left on device"))
    with pytest.raises(RuntimeError, match="Connection closed by peer"):  # nothing of its own
        dist.agree_on("writing predictions", None)


def _model_alive_at_destroy(no_torchrun: pytest.MonkeyPatch, small_dataset, tmp_path,
                            train_fails: Callable[[], None], collect: bool) -> tuple[int, bool]:
    """trainer.train's exit code with a Trainer whose ``train`` is ``train_fails``, and whether
    the model it built (a stand-in for the DDP model) was alive at destroy_process_group.
    ``collect``: the fake destroy collects first (only what something holds survives); without
    it, and with the collector off, a reference cycle the teardown left counts as alive."""
    import gc
    import weakref
    from pathlib import Path

    import trainer.trainer
    from trainer import train

    class Model:
        pass

    made: list[weakref.ref] = []
    alive_at_destroy: list[bool] = []

    class Trainer:
        def __init__(self, *args: object, **kwargs: object) -> None:
            self.model = Model()
            made.append(weakref.ref(self.model))

        def train(self) -> None:
            model = self.model  # (a frame's local too, as in the real loop)
            assert model is not None
            train_fails()

    def destroy() -> None:
        if collect:
            gc.collect()
        alive_at_destroy.append(made[0]() is not None)

    no_torchrun.setattr(trainer.trainer, "Trainer", Trainer)
    no_torchrun.setattr(dist, "init", lambda env, *args: env)
    no_torchrun.setattr(dist, "setup_logging", lambda env: None)
    no_torchrun.setattr(torch.distributed, "is_initialized", lambda: True)
    no_torchrun.setattr(torch.distributed, "destroy_process_group", destroy)
    # (the logger off: pytest's log capture keeps each record, and so the error its line
    # names, alive, and a handler an earlier test left on a closed stream kept its error; the
    # command's own handler, a stream's, keeps none)
    no_torchrun.setattr(dist.log, "disabled", True)
    config = Path(__file__).resolve().parents[2] / "configs" / "tiny.toml"
    if not collect:
        gc.disable()  # (a collection on the way, as any allocation may start, would hide it)
    try:
        rc = train.main(["--config", str(config), "--data", str(small_dataset),
                         "--run-dir", str(tmp_path / "run")])
    finally:
        gc.enable()
    assert len(alive_at_destroy) == 1
    return rc, alive_at_destroy[0]


def test_a_ctrl_c_leaves_no_model_alive_when_the_group_is_destroyed(
        no_torchrun: pytest.MonkeyPatch, small_dataset, tmp_path) -> None:
    """trainer.train's teardown runs in a ``finally`` while the Ctrl-C is on its way out, and
    the KeyboardInterrupt's traceback held the Trainer's frames, so the DDP model outlived
    destroy_process_group; its reducer then freed the group later, joining gloo's threads with
    the GIL held (a hang if one of them needed the GIL). By then it must be gone."""
    def pressed() -> None:
        raise KeyboardInterrupt

    rc, alive = _model_alive_at_destroy(no_torchrun, small_dataset, tmp_path, pressed,
                                        collect=True)
    assert rc == 130
    assert not alive, "the model outlived destroy_process_group"


def test_an_error_held_by_a_cycle_leaves_no_model_alive_when_the_group_is_destroyed(
        no_torchrun: pytest.MonkeyPatch, small_dataset, tmp_path) -> None:
    """An error handled before the teardown (its line said, exit 2) but held by a reference
    cycle of its traceback (a frame's local naming it, as agreed_loader's was) kept the Trainer's
    frames, and so the DDP model, past destroy_process_group: the collector ran only with an
    exception on its way out, and gloo's threads aborted the rank at exit (-6)."""
    from dataio.sharding import DataError

    def refused() -> None:
        try:
            raise DataError("DATA/val: no usable sample in split 'val'")
        except DataError as e:
            error = e  # (this frame's local, held by the error's own traceback)
        raise error

    rc, alive = _model_alive_at_destroy(no_torchrun, small_dataset, tmp_path, refused,
                                        collect=False)
    assert rc == 2
    assert not alive, "the model outlived destroy_process_group"


def test_a_sigterm_stops_as_a_ctrl_c_does_and_sets_both_aside() -> None:
    """A real SIGTERM to this process inside stop_signals: raised as Terminated (a
    KeyboardInterrupt: every clean-up that handles a Ctrl-C handles it), said as 'terminated
    (SIGTERM)', exit code 143; a Ctrl-C or SIGTERM after it (torchrun's SIGTERM after the Ctrl-C
    it forwarded) is set aside, not raised into the clean-up. Without one, both handlers come
    back as they were. (With the default action the process vanished without a line.)"""
    import os
    import signal
    import time

    found = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        with pytest.raises(dist.Terminated), dist.stop_signals():
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)  # (the handler runs at the next bytecode: not reached)
        assert (dist.stopped_by(), dist.stop_code()) == ("terminated (SIGTERM)", 143)
        assert {s: signal.getsignal(s) for s in found} == dict.fromkeys(found, signal.SIG_IGN)
        for s in found:
            signal.signal(s, found[s])
        with pytest.raises(KeyboardInterrupt) as pressed, dist.stop_signals():
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(5)
        assert not isinstance(pressed.value, dist.Terminated)
        assert (dist.stopped_by(), dist.stop_code()) == ("interrupted", 130)
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_IGN
        for s in found:
            signal.signal(s, found[s])
        with dist.stop_signals():
            pass
        assert {s: signal.getsignal(s) for s in found} == found
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # (ignored by whatever started it)
        with dist.stop_signals():
            assert signal.getsignal(signal.SIGTERM) is signal.SIG_IGN
    finally:
        for s in found:
            signal.signal(s, found[s])


def test_a_sigterm_during_the_teardown_is_raised_once_the_group_is_destroyed(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """After an error the teardown runs with SIGTERM not set aside, and torchrun sends one to the
    survivors once a worker has died: raised inside it, destroy_process_group was skipped and
    the group lived into the interpreter's exit. Now it is held until the group is gone."""
    import os
    import signal

    import torch.distributed as tdist

    real, order = tdist.destroy_process_group, []

    def destroy(*args: object) -> None:
        os.kill(os.getpid(), signal.SIGTERM)  # (torchrun's, as the teardown begins)
        order.append("signalled")
        real(*args)
        order.append("destroyed")

    found = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    tdist.init_process_group("gloo", store=tdist.HashStore(), rank=0, world_size=1)
    try:
        monkeypatch.setattr(tdist, "destroy_process_group", destroy)
        with pytest.raises(dist.Terminated), dist.stop_signals():
            dist.teardown()
        assert order == ["signalled", "destroyed"] and not tdist.is_initialized()
        assert dist.stop_code() == 143
    finally:
        if tdist.is_initialized():
            real()
        for s in found:
            signal.signal(s, found[s])


GLOO_RESET = ("[/__w/pytorch/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:537] Read error "
              "[127.0.0.1]:59054: Connection reset by peer. This is typically caused by a remote "
              "worker hanging or bugs in the application. Check the logs of the remote worker "
              "before reporting an error. GLHF!")
NCCL_EXITED = ("NCCL error in: /pytorch/torch/csrc/distributed/c10d/NCCLUtils.cpp:77, remote "
               "process exited or there was a network error, NCCL version 2.21.5\n"
               "ncclRemoteError: A call failed possibly due to a network error or a remote "
               "process exiting prematurely.\nLast error:\nsocketProgress: Connection closed by "
               "remote peer node1<51234>")


@pytest.mark.parametrize(("error", "says", "first"), [
    # gloo's: a plain RuntimeError (its type cannot tell), known by its text
    (RuntimeError(GLOO_RESET), "a peer rank left",
     "RuntimeError: [/__w/pytorch/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:537] Read "
     "error [127.0.0.1]:59054: Connection reset by peer.;"),
    (RuntimeError("[../third_party/gloo/gloo/transport/tcp/unbound_buffer.cc:78] Timed out "
                  "waiting 3000ms for recv operation to complete"), "a collective timed out",
     "Timed out waiting 3000ms for recv operation to complete;"),
    # NCCL's and the store's: torch.distributed's DistError family, by type whatever the text
    (torch.distributed.DistBackendError(NCCL_EXITED), "a peer rank left",
     "DistBackendError: NCCL error in: /pytorch/torch/csrc/distributed/c10d/NCCLUtils.cpp:77, "
     "remote process exited or there was a network error, NCCL version 2.21.5;"),
    (torch.distributed.DistNetworkError("failed to recv, got 0 bytes\nException raised from "
                                        "recvBytes\nframe #0: c10::Error"), "a peer rank left",
     "DistNetworkError: failed to recv, got 0 bytes;"),
    (torch.distributed.DistStoreError("wait timeout after 600000ms, keys: /default_pg/0//1"),
     "a collective timed out", "DistStoreError: wait timeout after 600000ms"),
])
def test_a_lost_peer_or_failed_collective_is_one_line_naming_the_rank_and_the_way_on(
        error: RuntimeError, says: str, first: str) -> None:
    line = dist.describe_failure(error, 3, "rerun to resume from RUN/checkpoints")
    assert line is not None and "\n" not in line
    assert line.startswith(f"rank 3: {says}"), line
    assert first in line, line  # the original's first line, for diagnosis (gloo's advice cut)
    assert "GLHF" not in line and "Last error" not in line and "frame #0" not in line
    assert line.endswith("torchrun restarts the group if its --max-restarts allows, else rerun "
                         "to resume from RUN/checkpoints (the peer's own log says why it "
                         "stopped)"), line


def test_other_errors_are_not_taken_for_a_lost_peer(monkeypatch: pytest.MonkeyPatch) -> None:
    """Bad input, a bug, and another rank's agreed failure keep their own words; without a
    rank given, RANK names it."""
    for e in (RuntimeError("a bug"), ValueError("Connection reset by peer"), OSError(28, "full"),
              dist.RankError("rank 1 stopped while validating: ValueError: x"),
              KeyboardInterrupt()):
        assert dist.describe_failure(e) is None, e
    monkeypatch.setenv("RANK", "5")
    assert str(dist.describe_failure(RuntimeError(GLOO_RESET))).startswith("rank 5: ")
    monkeypatch.delenv("RANK")
    assert str(dist.describe_failure(RuntimeError(GLOO_RESET))).startswith("rank 0: ")


@pytest.mark.parametrize(("error", "reading", "writing"), [
    (ValueError("bad --set"), 2, 2),
    (OSError(28, "No space left on device"), 2, 1),
    # (raised in a command's marked output phase: the disk's wherever the caller is)
    (WriteError(28, "No space left on device", "p.csv"), 1, 1),
    (RuntimeError("a bug"), 1, 1),
    (TypeError("a bug"), 1, 1),
    (RuntimeError(GLOO_RESET), 1, 1),  # a lost peer
], ids=["refusal", "oserror", "write-error", "runtime-bug", "type-bug", "lost-peer"])
def test_exit_code_for_is_the_failing_ranks_on_every_rank(error: BaseException, reading: int,
                                                          writing: int) -> None:
    """2 bad input or settings, 1 a failure of the run: the failing rank's own error and the
    RankError that relays it to the others give the same code (trainer.predict and the postproc
    commands: another rank's bug or full disk was 2 there, as bad input). An OSError is bad
    input where the caller says so (reading inputs), else a failure of the run (writing)."""
    relayed = dist._relayed("rank 1 stopped while writing predictions", dist._said(error))
    for e in (error, relayed):
        if e is relayed and dist.describe_failure(error) is not None:
            continue  # (a lost peer is no rank's own error to relay)
        assert dist.exit_code_for(e) == reading, e
        assert dist.exit_code_for(e, oserror_refuses=False) == writing, e


def test_exit_code_for_an_agreed_refusal_and_a_refusal_class() -> None:
    """An agreed refusal with no one rank's error (the ranks read different data) and a class
    that says it refuses (DataError, a RuntimeError) are bad input, relayed or not."""
    from dataio.sharding import DataError

    assert dist.exit_code_for(dist.RankError("the ranks read different data", True)) == 2
    bad = DataError("no usable shard")
    assert dist.exit_code_for(bad, oserror_refuses=False) == 2
    assert dist.exit_code_for(dist._relayed("rank 1 could not open split", dist._said(bad))) == 2
