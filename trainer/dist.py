"""All distributed set-up in one place: env parsing, process group, seeding, reductions.

Everything else takes ``rank``/``world_size`` explicitly (a :class:`DistEnv`), so that code can be
tested without a process group. Works with and without ``torchrun``: with no ``WORLD_SIZE`` in the
environment a process is rank 0 of 1 and no group is created.
"""

from __future__ import annotations

import contextlib
import datetime
import gc
import importlib
import logging
import os
import random
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np

from dataio.atomic import WriteError

# (the signal part, shared with the commands that run without a process group; re-exported
# here, where trainer.train and trainer.predict have always found it)
from postproc.pools import (  # noqa: F401
    Terminated,
    _stop_once,
    raise_if_interrupted,
    stop_code,
    stop_signals,
    stopped_by,
)

if TYPE_CHECKING:
    import torch

# NOTE: torch is imported in the functions that need it, not here: the postproc commands
# (polygonize, score, tune) import this module for DistEnv and the agreement helpers, and a plain
# ``python -m postproc.score`` (one process, no group) spent ~1.7 s of its start importing torch
# for nothing. Only a torchrun run (WORLD_SIZE > 1) or the trainer, which has torch anyway,
# needs it; the helpers below answer a single process without it (see _active).

log = logging.getLogger("footprints")
T = TypeVar("T")


class RankError(RuntimeError):
    """Another rank's failure, or a disagreement between ranks, raised on every rank so that all
    stop with the reason (the commands print it as one line, like bad input). ``refusal``: the
    failure was a :func:`refusal`; ``kinds``: the failing rank's error's classes by name (its
    type's MRO, empty when no one error failed): so that every rank exits as the failing one
    does (trainer.train by the first, postproc.cli.exit_on_error by the second)."""

    def __init__(self, message: str, refusal: bool = False, kinds: tuple[str, ...] = ()) -> None:
        super().__init__(message)
        self.refusal = refusal
        self.kinds = kinds


def refusal(error: BaseException) -> bool:
    """Whether ``error`` refuses the input or the settings (fix them and rerun: trainer.train's
    exit code 2, as before its process group), not a failure of the run itself (a non-finite
    loss, a full disk, a lost peer: 1). A ValueError (a ConfigError too), an exception class
    that says so (``refusal = True``: dataio's DataError, the metrics port's MetricsError), or
    a RankError carrying one from another rank."""
    return isinstance(error, ValueError) or bool(getattr(error, "refusal", False))


PEER_LOST_EXIT = 1  # a lost peer or failed collective: a failure to rerun, not bad input (2)


def exit_code_for(error: BaseException, oserror_refuses: bool = True) -> int:
    """The exit code of a command stopped by ``error``, its own or another rank's (a
    :class:`RankError`, judged by the failing rank's ``kinds``), so that under torchrun every rank
    exits as the failing one does: 2 for bad input or settings (a :func:`refusal`, an agreed one
    with no one rank's error, and an OSError where ``oserror_refuses``: a path that cannot be
    used), 1 for a failure of the run (a lost peer, an OSError where not ``oserror_refuses``,
    and a :class:`dataio.atomic.WriteError` always: a full disk while writing the outputs; a
    dead pool worker; a bug).

    NOTE: ``oserror_refuses`` is the caller's, as only it knows where the error came from:
    trainer.predict's OSError, once it writes its stage, is the disk's; the postproc commands
    mark their output phase instead (``dataio.atomic.writing``), so that only an OSError
    raised there (a WriteError, also by name in a relayed error's kinds) is the disk's.
    """
    if describe_failure(error) is not None:
        return PEER_LOST_EXIT
    if isinstance(error, RankError):
        kinds = error.kinds
        if not kinds:  # (an agreed refusal: the ranks disagree, no one rank failed)
            return 2
    else:
        kinds = tuple(c.__name__ for c in type(error).__mro__)
    disk = WriteError.__name__ in kinds
    return 2 if refusal(error) or (oserror_refuses and "OSError" in kinds and not disk) else 1


def exit_codes_help(refused: str, failed: str) -> str:
    """A command's ``--help`` epilog for :func:`exit_code_for`'s contract; ``refused`` and
    ``failed`` say what gives 2 and 1 in that command (one text: train's and predict's differed
    on what torchrun shows)."""
    return (f"Exit codes: 0 done; 2 bad input or settings ({refused}): fix it and rerun; 1 a "
            f"failure of the run ({failed}): rerun to resume; 130 Ctrl-C and 143 SIGTERM: rerun "
            "to resume. Under torchrun every rank exits with the failing rank's code (torchrun's "
            "summary names the first); torchrun itself exits 1.")

# NOTE: what a collective's failure says where its type cannot tell: gloo raises a plain
# RuntimeError ("[.../third_party/gloo/gloo/transport/tcp/pair.cc:537] Read error ...:
# Connection reset by peer", "... unbound_buffer.cc:78] Timed out waiting 3000ms for recv"),
# and so does DDP's reducer with the backend's text; NCCL's come as DistBackendError.
_COLLECTIVE_TEXT = ("third_party/gloo", "gloo/transport", "connection closed by peer",
                    "connection reset by peer", "nccl error", "ncclremoteerror",
                    "ncclsystemerror", "remote process exited", "processgroupnccl",
                    "watchdog caught collective operation timeout")


def describe_failure(e: BaseException, rank: int | None = None, rerun: str = "rerun the same "
                     "command") -> str | None:
    """One line for a lost peer rank or a failed collective (``e``), or None for anything else.

    A peer killed (SIGKILL, the OOM killer) or its node lost makes the survivors' next
    collective raise gloo's or NCCL's own text, many lines of it with NCCL or a store, that
    names neither the cause nor what to do. The line says which rank, what failed, the first
    line of the original message (for diagnosis) and the way on: ``rerun``, the command's own
    words for what a rerun resumes from. ``rank``: this process's (default: RANK, else 0).

    Recognised by type first (torch.distributed's DistError family); a RuntimeError only by the
    backends' texts (gloo's errors have no type of their own). :class:`RankError` is not one:
    the peer said why it stopped.
    """
    if isinstance(e, RankError) or not isinstance(e, RuntimeError):
        return None
    dist = sys.modules.get("torch.distributed")  # (not imported: no collective ran)
    typed = dist is not None and isinstance(e, getattr(dist, "DistError", ()))
    text = str(e)
    if not typed and not any(m in text.lower() for m in _COLLECTIVE_TEXT):
        return None
    if rank is None:
        raw = os.environ.get("RANK", "")
        rank = int(raw) if raw.isdigit() else 0
    first = next((line.strip() for line in text.splitlines() if line.strip()),
                 type(e).__name__)
    # (gloo's own advice after the error, "This is typically caused by ... GLHF!", is dropped)
    first = first.split(" This is typically caused", 1)[0][:300]
    what = ("a collective timed out (a peer rank stalled or left the process group)"
            if "timed out" in text.lower() or "timeout" in text.lower() else
            "a peer rank left the process group (killed, out of memory, or its node lost) or "
            "the collective failed")
    return (f"rank {rank}: {what}: {type(e).__name__}: {first}; torchrun restarts the group if "
            f"its --max-restarts allows, else {rerun} (the peer's own log says why it stopped)")


@dataclass(frozen=True)
class DistEnv:
    """Where this process sits in the job, as torchrun describes it."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @classmethod
    def from_env(cls) -> DistEnv:
        """Read torchrun's variables; a plain ``python -m`` run is rank 0 of 1."""

        def geti(name: str, default: int) -> int:
            raw = os.environ.get(name)
            if raw is None or raw == "":
                return default
            try:
                return int(raw)
            except ValueError as e:
                raise ValueError(f"environment variable {name}={raw!r} is not an integer") from e

        world = geti("WORLD_SIZE", 1)
        rank = geti("RANK", 0)
        env = cls(rank=rank, world_size=world, local_rank=geti("LOCAL_RANK", 0),
                  local_world_size=geti("LOCAL_WORLD_SIZE", 1))
        if not 0 <= env.rank < env.world_size:
            raise ValueError(f"RANK={env.rank} is outside WORLD_SIZE={env.world_size}")
        port = os.environ.get("MASTER_PORT")
        # (torch's own words named no variable: "invalid literal for int() with base 10: 'abc'",
        # "port must have value from 0 to 65535 but was 99999")
        if env.distributed and port is not None and not (port.isdigit() and
                                                         0 < int(port) <= 65535):
            raise ValueError(f"environment variable MASTER_PORT={port!r} is not a TCP port "
                             "(1-65535)")
        return env


def default_backend() -> str:
    """NCCL where CUDA is present, gloo otherwise."""
    import torch
    import torch.distributed as dist

    return "nccl" if torch.cuda.is_available() and dist.is_nccl_available() else "gloo"


def check_one_gpu_each(procs: int, setting: str = "torchrun --nproc_per_node=") -> None:
    """NCCL needs a GPU of its own for each process of a node: ``procs`` processes that all see
    the same, fewer CUDA devices would share one and fail in NCCL ("Duplicate GPU detected").
    ``setting`` names what sets ``procs`` (the message appends the count to it)."""
    import torch

    gpus = torch.cuda.device_count()
    if procs > gpus:
        raise ValueError(
            f"{procs} processes on this node but {gpus} CUDA device(s) visible: NCCL needs one "
            f"GPU per process; start at most {gpus} ({setting}{gpus}), or hide the "
            "GPUs (CUDA_VISIBLE_DEVICES=) to run on the CPU with gloo")


def device_for(env: DistEnv) -> torch.device:
    """The device this rank computes on: its local GPU, or the CPU."""
    import torch

    if torch.cuda.is_available():
        torch.cuda.set_device(env.local_rank % torch.cuda.device_count())
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def init(env: DistEnv | None = None, backend: str | None = None,
         timeout_s: float = 600.0) -> DistEnv:
    """Create the process group when there is more than one process; return the env.

    ``timeout_s`` bounds every collective, so a dead peer turns into an error instead of a hang.
    """
    env = env or DistEnv.from_env()
    setup_logging(env)
    watch_agent(env)
    if env.distributed and not _active():
        import torch.distributed as dist

        backend = backend or default_backend()
        kwargs: dict[str, Any] = {}
        timeout = datetime.timedelta(seconds=timeout_s)
        restart = os.environ.get("TORCHELASTIC_RESTART_COUNT")
        one_agent = env.world_size == env.local_world_size
        if restart is not None and "MASTER_ADDR" in os.environ and one_agent:
            # NOTE: torchrun keeps one agent store across group restarts, so after a worker
            # dies a restarted rank can read the dead peer's gloo address from the previous
            # attempt ("Connection refused", seen here about one restart in three). A
            # per-attempt key prefix keeps attempts apart. Only with one agent: each agent
            # counts its own restarts (a node whose workers were healthy restarts them for a
            # new member without counting), so across nodes the prefixes would differ and
            # the group would wait on keys nobody writes.
            store, _, _ = next(dist.rendezvous("env://", env.rank, env.world_size,
                                               timeout=timeout))
            kwargs["store"] = dist.PrefixStore(f"footprints/attempt_{restart}", store)
        elif (restart is not None and env.is_main
              and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == str(True)):
            log.warning("several torchrun agents share one store across restarts: a restarted "
                        "group may read the previous attempt's addresses. Export "
                        "TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 on every node (launch/ does) "
                        "for a fresh store each rendezvous round.")
        if backend == "nccl":
            if "TORCHELASTIC_RUN_ID" in os.environ:
                # torchrun gives all workers of a node one environment, so all see the same
                # GPUs (and all refuse); another launcher may bind one GPU per process
                # (CUDA_VISIBLE_DEVICES per rank, as device_for's modulo allows)
                check_one_gpu_each(env.local_world_size)
            # NOTE: binding the device up front lets NCCL create its communicator eagerly.
            kwargs["device_id"] = device_for(env)
        # NOTE: imported before the group exists: this module binds group.WORLD as a default
        # argument when imported, and DDP imports it (through torch._dynamo) once the group is
        # up. That default held the group past destroy_process_group (teardown), its gloo
        # threads running on into the interpreter's exit, where one that needed the GIL to drop
        # a tensor aborted the process ('terminate called without an active exception').
        importlib.import_module("torch.distributed.nn.functional")
        dist.init_process_group(backend=backend, rank=env.rank, world_size=env.world_size,
                                timeout=timeout, **kwargs)
        log.debug("process group up: backend=%s world=%d", backend, env.world_size)
    return env


def watch_agent(env: DistEnv, poll_s: float = 1.0) -> None:
    """Under torchrun, end this worker when its agent dies.

    torchrun starts each worker in a session of its own, so killing the launcher (its process
    group, or the agent alone, as a scheduler may) left the workers running: still writing
    checkpoints into the run directory, beside a rerun's. A daemon thread watches the parent.
    """
    if "TORCHELASTIC_RUN_ID" not in os.environ or getattr(watch_agent, "_started", False):
        return
    agent = os.getppid()

    def stop() -> None:
        print(f"[rank {env.rank}] the torchrun agent (pid {agent}) is gone; stopping",
              file=sys.stderr, flush=True)
        if os.getpgrp() == os.getpid():
            # torchrun made this worker a group leader: its worker pools (polygonize's, the
            # DataLoader's) are in the group and go with it instead of lingering orphaned
            os.killpg(0, signal.SIGKILL)
        os._exit(1)

    if agent == 1:  # the agent died before this worker got here
        stop()

    def watch() -> None:
        while True:
            time.sleep(poll_s)
            if os.getppid() != agent:
                stop()

    threading.Thread(target=watch, name="agent-watch", daemon=True).start()
    watch_agent._started = True  # type: ignore[attr-defined]


def teardown() -> None:
    """Destroy the process group if one exists (always call this, also on errors)."""
    if _active():
        with _stops_held():
            _destroy()


@contextlib.contextmanager
def _stops_held() -> Iterator[None]:
    """Inside: a Ctrl-C or SIGTERM that :func:`stop_signals` would raise is held, and raised on
    the way out.

    NOTE: a teardown after an error runs with neither set aside, and torchrun's SIGTERM (sent
    to the survivors once a worker has died) landed in it: destroy_process_group skipped, the
    group alive into the interpreter's exit (see :func:`_destroy`).

    NOTE: not ``postproc.pools.starting_workers``, which holds signals too, on purpose: that one
    holds a signal whatever its handler (the default action, SIG_IGN, Python's own Ctrl-C) and
    blocks both in the signal mask, so that the workers it forks start with them blocked. Here
    only the command's own :func:`stop_signals` handler is held. Where a SIGTERM has its
    default action (a benchmark's workers, ``sigint_once``: Ctrl-C only), a teardown hung in
    destroy_process_group (gloo's threads, the GIL) is still ended by it, the kernel's doing,
    where held it would wait for a SIGKILL; and no process is forked, so nothing needs the
    mask."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    held: list[int] = []
    ours = [sig for sig in (signal.SIGINT, signal.SIGTERM) if signal.getsignal(sig) is _stop_once]
    for sig in ours:
        signal.signal(sig, lambda signum, frame: held.append(signum))
    try:
        yield
    finally:
        for sig in ours:
            signal.signal(sig, _stop_once)
        if held:
            signal.raise_signal(held[0])


def _destroy() -> None:
    import torch.distributed as dist

    exc = sys.exc_info()[1]
    if exc is not None:
        # NOTE: called in a ``finally`` while an exception (a Ctrl-C, an error) is on its
        # way out, whose traceback still holds the finished frames that built the DDP model.
        # A DDP model alive past destroy_process_group keeps the group, and its reducer frees
        # it later, joining gloo's threads with the GIL held: a hang if one of them needs the
        # GIL to finish. So those frames' locals go first (clear_frames skips running ones).
        traceback.clear_frames(exc.__traceback__)
    # NOTE: always, not only with an exception on its way out: an error already handled (its
    # line said, its exit code chosen) can still be held by a reference cycle of its traceback
    # (a frame's local naming it; agreed_loader's was one), which held the Trainer's frames and
    # so the DDP model, and only the collector frees it (~0.1 s, once a run)
    gc.collect()
    dist.destroy_process_group()


def setup_logging(env: DistEnv, level: int = logging.INFO) -> None:
    """One logger for the project, with a ``[rank N]`` prefix; only rank 0 logs INFO."""
    if getattr(setup_logging, "_done", False):
        return
    handler = logging.StreamHandler()
    fmt = f"%(asctime)s [rank {env.rank}] %(levelname)s %(message)s"
    handler.setFormatter(logging.Formatter(fmt, "%H:%M:%S"))
    log.addHandler(handler)
    log.setLevel(level if env.is_main else logging.WARNING)
    log.propagate = False
    setup_logging._done = True  # type: ignore[attr-defined]


def seed_everything(seed: int, rank: int = 0) -> None:
    """Seed python, numpy and torch; each rank gets its own stream derived from the seed."""
    import torch

    s = seed + 1_000_003 * rank
    random.seed(s)
    np.random.seed(s % 2**32)
    torch.manual_seed(s)


def _active() -> bool:
    """Is a process group up? False without importing torch where torch.distributed was never
    imported: no group can exist then (a single process of a postproc command)."""
    if "torch.distributed" not in sys.modules:
        return False
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def backend_name() -> str | None:
    """The process group's backend ("gloo", "nccl"), None in a process without one."""
    if not _active():
        return None
    import torch.distributed as dist

    return str(dist.get_backend())


def _reduce_device() -> torch.device:
    # NCCL reduces only CUDA tensors; gloo only CPU ones.
    import torch

    if backend_name() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_sum(values: torch.Tensor | np.ndarray | list[float]) -> torch.Tensor:
    """Sum a vector over all ranks (identity in a single process). Returns a CPU float64 tensor."""
    import torch

    t = torch.as_tensor(np.asarray(values, dtype=np.float64)).to(_reduce_device())
    if _active():
        import torch.distributed as dist

        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.cpu()


def agree_any(flag: bool) -> bool:
    """True on every rank if ``flag`` is true on any rank (a collective stop/skip decision)."""
    import torch

    t = torch.tensor([1 if flag else 0], dtype=torch.int32, device=_reduce_device())
    if _active():
        import torch.distributed as dist

        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def gather_objects(obj: Any) -> list[Any]:
    """Every rank's ``obj`` on every rank (picklable objects; small payloads only)."""
    if not _active():
        return [obj]
    import torch.distributed as dist

    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def agreed_loader(split: str, data: Any, build: Callable[[], T]) -> T:
    """``build()`` this rank's loader of ``split`` (a :class:`dataio.loader.Loader` of ``data``)
    and raise on every rank unless every rank built one over the same sample list.

    Each rank checks the shards on its own; one that leaves out a shard the others accept (a
    node-local copy that differs, a shard replaced while the job starts) would take fewer steps
    an epoch and hang the others at the next collective until the process-group timeout, and
    one that finds no usable shard at all would stop alone, the others dying on a reset
    connection.
    """
    try:
        loader, error = build(), None
    except Exception as e:
        loader, error = None, e
    from dataio.sharding import left_out  # (the loader's module: build imported it)

    # (each rank's shards left out as the error names them, a few and a count: every one of
    # them, for a node missing a whole split, made a line of hundreds of kB)
    view = ((None, 0, "", _said(error)) if error is not None else
            (loader.fingerprint, loader.num_samples, left_out(loader.index.skipped_detail),
             None))
    views = gather_objects(view)
    if error is not None:
        # NOTE: raised from a local of this frame, which its traceback holds: a cycle that only
        # the garbage collector frees. It held the Trainer being built, and with it the DDP
        # model, past destroy_process_group: gloo's threads ran on into the interpreter's exit
        # and aborted the rank that refused ('terminate called without an active exception',
        # exit -6, not 2; seen in a fresh-clone run of the 2-rank refusal test)
        try:
            raise error
        finally:
            del error
    failed = [(r, v[3]) for r, v in enumerate(views) if v[3] is not None]
    if failed:
        rank, said = failed[0]
        raise _relayed(f"rank {rank} could not open split {split!r} of {data}", said)
    if any(v[0] != views[0][0] for v in views):
        detail = "; ".join(f"rank {r}: {n} samples, fingerprint {fp[:12]}, left out "
                           f"[{skipped or 'none'}]" for r, (fp, n, skipped, _) in enumerate(views))
        raise RankError(f"split {split!r} of {data}: the ranks read different data ({detail}); "
                        "every rank must see the same shards (check node-local copies)",
                        refusal=True)
    return loader  # type: ignore[return-value]


def on_main(env: DistEnv, what: str, fn: Callable[[], T]) -> T | None:
    """Run ``fn`` (a side effect: a file write) on rank 0 only, and agree on how it went.

    Its result comes back on rank 0 (None elsewhere). If it raises, rank 0 re-raises it and every
    other rank raises RankError naming it: a failure on rank 0 alone (a full disk) used to
    leave the others to die on gloo's reset connection, or wait out the process-group timeout.
    """
    if not env.is_main:
        error = broadcast_object(None)
        if error is not None:
            raise _relayed(f"rank 0 stopped while {what}", error)
        return None
    try:
        result = fn()
    except Exception as e:
        broadcast_object(_said(e))
        raise
    broadcast_object(None)
    return result


def on_every(what: str, fn: Callable[[], T]) -> T:
    """Run ``fn``, this rank's share of the work (no collective inside), and agree on how it went
    (see :func:`agree_on`)."""
    try:
        result, error = fn(), None
    except Exception as e:
        # a Ctrl-C that numba reported as a SystemError (the polygonizer in validation, the
        # PNG read-back of trainer.predict's shards) is no failure of this share to agree on:
        # on its way at once, as a plain one is
        raise_if_interrupted(e)
        result, error = None, e
    try:
        agree_on(what, error)
    finally:
        error = None  # (the raised error held here is a reference cycle: see agreed_loader)
    return result  # type: ignore[return-value]


def agree_on(what: str, error: BaseException | None) -> None:
    """Agree on how every rank's share went (``error``: this rank's failure, or None).

    If any rank failed, every rank raises: that rank its own error, the others RankError naming
    it (alone, it would stop and leave the others to die on gloo's reset connection).
    """
    try:
        try:
            errors = gather_objects(None if error is None else _said(error))
        except Exception:
            if error is not None:  # the others were not there in time: this rank's reason first
                raise error from None
            raise
        if error is not None:
            raise error
    finally:
        error = None  # (the raised error held here is a reference cycle: see agreed_loader)
    failed = [(r, said) for r, said in enumerate(errors) if said is not None]
    if failed:
        rank, said = failed[0]
        raise _relayed(f"rank {rank} stopped while {what}", said)


Said = tuple[str, bool, tuple[str, ...]]


def _said(error: BaseException) -> Said:
    """How a rank's failure reaches the others: its line, whether it is a :func:`refusal`, and
    its classes by name (plain strings: any error's reach the others, as its class may not
    pickle)."""
    return (f"{type(error).__name__}: {error}", refusal(error),
            tuple(c.__name__ for c in type(error).__mro__))


def _relayed(where: str, said: Said) -> RankError:
    """The RankError that the other ranks raise for a failure :func:`_said` reached them."""
    why, refused, kinds = said
    return RankError(f"{where}: {why}", refused, kinds)


def barrier() -> None:
    if _active():
        import torch.distributed as dist

        dist.barrier()


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s ``obj`` on every rank (how rank 0's decisions reach the others)."""
    if not _active():
        return obj
    import torch.distributed as dist

    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def broadcast_tensors(tensors: list[torch.Tensor], src: int = 0) -> None:
    """Overwrite every rank's ``tensors`` in place with rank ``src``'s (the same shapes on all
    ranks, on the backend's device: a module's ``state_dict().values()``)."""
    if not _active():
        return
    import torch.distributed as dist

    for t in tensors:
        dist.broadcast(t, src=src)


def broadcast_buffers(module: torch.nn.Module) -> None:
    """Every rank takes rank 0's floating-point buffers of ``module`` (BatchNorm's running
    statistics, a few KB); a no-op without a process group. A collective.

    NOTE: each rank updates them from its own batches in training (DDP gives every rank rank
    0's before each forward, and the ranks' own updates after it), so without this each rank
    would validate with statistics of its own, not the ones rank 0's checkpoint holds."""
    broadcast_tensors([b for b in module.buffers() if b.is_floating_point()])
