"""Checkpoints: crash-safe commits, newest complete wins, safe loading, pruning, RNG state."""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import IO

import numpy as np
import pytest
import torch

from dataio import atomic
from trainer import checkpoint as ckpt
from trainer import dist


def _state(v: float) -> dict:
    return {"format": ckpt.FORMAT, "model": {"w": torch.full((3,), v)}, "epoch": int(v)}


def test_save_load_and_newest_complete_wins(tmp_path: Path) -> None:
    for step in (10, 20, 30):
        ckpt.save(_state(step), ckpt.checkpoint_path(tmp_path, step))
    state, path = ckpt.load_latest(tmp_path)
    assert path.name == "step-00000030.pt" and state["epoch"] == 30
    # a temp file from a crashed writer is never taken for a checkpoint
    (ckpt.checkpoint_dir(tmp_path) / ".step-00000040.pt.abc.tmp").write_bytes(b"half")
    assert ckpt.load_latest(tmp_path)[1].name == "step-00000030.pt"


def test_crash_during_write_keeps_the_previous_checkpoint(tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    ckpt.save(_state(1), ckpt.checkpoint_path(tmp_path, 1))

    def dying_save(obj: object, f: object) -> None:
        f.write(b"PK\x03\x04 partial zip")  # type: ignore[attr-defined]
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", dying_save)
    with pytest.raises(OSError):
        ckpt.save(_state(2), ckpt.checkpoint_path(tmp_path, 2))
    monkeypatch.undo()
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["step-00000001.pt"]
    assert list(ckpt.checkpoint_dir(tmp_path).glob("*.tmp")) == []
    assert ckpt.load_latest(tmp_path)[0]["epoch"] == 1


def test_a_damaged_newest_checkpoint_falls_back(tmp_path: Path) -> None:
    ckpt.save(_state(1), ckpt.checkpoint_path(tmp_path, 1))
    ckpt.save(_state(2), ckpt.checkpoint_path(tmp_path, 2))
    newest = ckpt.checkpoint_path(tmp_path, 2)
    newest.write_bytes(newest.read_bytes()[:100])  # e.g. a disk error after the rename
    state, path = ckpt.load_latest(tmp_path)
    assert state["epoch"] == 1 and path.name == "step-00000001.pt"


class _Evil:
    def __reduce__(self) -> tuple:
        return (os.system, ("echo pwned > /dev/null",))


def test_a_crafted_pickle_is_refused(tmp_path: Path) -> None:
    path = ckpt.checkpoint_path(tmp_path, 5)
    path.parent.mkdir(parents=True)
    torch.save({"format": ckpt.FORMAT, "model": _Evil()}, path)
    with pytest.raises(ValueError, match="not a readable checkpoint.*UnpicklingError"):
        ckpt.load(path)
    assert ckpt.load_latest(tmp_path) is None  # nothing safe to resume from


def test_prune_keeps_the_newest_and_best(tmp_path: Path) -> None:
    for step in range(1, 6):
        ckpt.save(_state(step), ckpt.checkpoint_path(tmp_path, step))
    ckpt.mark_best(ckpt.checkpoint_path(tmp_path, 2))
    ckpt.prune(tmp_path, keep_last=2)
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["step-00000004.pt",
                                                                 "step-00000005.pt"]
    assert ckpt.load(ckpt.checkpoint_dir(tmp_path) / ckpt.BEST)["epoch"] == 2


def test_rng_state_round_trips_through_a_weights_only_load(tmp_path: Path) -> None:
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    np.random.standard_normal()  # draws two, keeps one for the next call
    state = {"format": ckpt.FORMAT, "model": {}, "rng": [ckpt.rng_state()]}
    expected = (random.random(), np.random.rand(), np.random.standard_normal(),
                torch.rand(1).item())
    path = tmp_path / "r.pt"
    torch.save(state, path)
    ckpt.set_rng_state(ckpt.load(path)["rng"][0])
    assert (random.random(), np.random.rand(), np.random.standard_normal(),
            torch.rand(1).item()) == expected


def test_unreadable_or_incomplete_checkpoints_name_the_file(tmp_path: Path) -> None:
    garbage, empty, partial = tmp_path / "g.pt", tmp_path / "e.pt", tmp_path / "p.pt"
    garbage.write_bytes(b"garbage")
    empty.write_bytes(b"")
    torch.save({"format": ckpt.FORMAT}, partial)
    listed = tmp_path / "l.pt"  # (load_state_dict raised a TypeError, no file named)
    torch.save({"format": ckpt.FORMAT, "model": [torch.zeros(2)]}, listed)
    numbered = tmp_path / "k.pt"  # (an AttributeError traceback from load_state_dict)
    torch.save({"format": ckpt.FORMAT, "model": {0: torch.zeros(2)}}, numbered)
    foreign, future = tmp_path / "f.pt", tmp_path / "n.pt"  # another program's; a later format
    torch.save({"model": {}}, foreign)
    torch.save({"format": ckpt.FORMAT + 1, "model": {}}, future)
    for path, match in ((garbage, "not a readable checkpoint"),
                        (empty, "not a readable checkpoint"),
                        (partial, "checkpoint lacks model"),
                        (listed, "'model' is a list, not a state dict"),
                        (numbered, "'model' has a key 0, not a state dict's tensor name"),
                        (foreign, "not a checkpoint of this trainer"),
                        (future, "not a checkpoint of this trainer")):
        with pytest.raises(ValueError, match=match) as e:
            ckpt.load(path)
        assert str(e.value).startswith(str(path))


def test_repair_best_points_best_at_the_named_checkpoint_once(tmp_path: Path) -> None:
    for step in (1, 2, 3):
        ckpt.save(_state(step), ckpt.checkpoint_path(tmp_path, step))
    best = ckpt.checkpoint_dir(tmp_path) / ckpt.BEST
    assert ckpt.repair_best(tmp_path, 2)  # no best.pt yet (killed before the first mark_best)
    assert os.path.samefile(best, ckpt.checkpoint_path(tmp_path, 2))
    inode = os.stat(best).st_ino
    assert not ckpt.repair_best(tmp_path, 2) and os.stat(best).st_ino == inode  # idempotent
    assert ckpt.repair_best(tmp_path, 3)  # stale: re-pointed
    assert ckpt.load(best)["epoch"] == 3
    ckpt.checkpoint_path(tmp_path, 1).unlink()  # pruned: best.pt was marked before that
    assert not ckpt.repair_best(tmp_path, 1) and ckpt.load(best)["epoch"] == 3
    # a file system without hard links holds a copy: the same bytes are the same checkpoint
    best.unlink()
    best.write_bytes(ckpt.checkpoint_path(tmp_path, 2).read_bytes())
    assert not ckpt.repair_best(tmp_path, 2) and ckpt.load(best)["epoch"] == 2


def test_repair_best_tells_apart_copies_of_the_same_size_and_time(tmp_path: Path) -> None:
    """Where hard links fail best.pt is a copy, and such file systems (FAT, some SMB shares) keep
    times to a second or two: a stale copy with the size and time of the checkpoint it should be
    (one model's checkpoints are all one size) must still be re-pointed."""
    for step in (1, 2):
        ckpt.save(_state(step), ckpt.checkpoint_path(tmp_path, step))
    best, right = ckpt.checkpoint_dir(tmp_path) / ckpt.BEST, ckpt.checkpoint_path(tmp_path, 2)
    best.write_bytes(ckpt.checkpoint_path(tmp_path, 1).read_bytes())  # stale: step 1's
    os.utime(best, ns=(right.stat().st_atime_ns, right.stat().st_mtime_ns))
    assert best.stat().st_size == right.stat().st_size
    assert ckpt.repair_best(tmp_path, 2) and ckpt.load(best)["epoch"] == 2


def test_remove_temp_files_takes_only_temp_names(tmp_path: Path) -> None:
    ckpt.save(_state(1), ckpt.checkpoint_path(tmp_path, 1))
    d = ckpt.checkpoint_dir(tmp_path)
    temp = [d / ".step-00000002.pt.abc123.tmp", d / ".best.pt.tmp", d / "..best.pt.tmp.x.tmp"]
    kept = [d / "a.tmp", d / ".hidden", d / "step-00000002.pt.tmp"]
    for p in temp + kept:
        p.write_bytes(b"half")
    assert sorted(ckpt.remove_temp_files(tmp_path)) == sorted(temp)
    assert sorted(p.name for p in d.iterdir()) == sorted(
        [p.name for p in kept] + ["step-00000001.pt"])
    assert ckpt.remove_temp_files(tmp_path / "nothing_here") == []
    # a link with a temp name is not a killed write of ours: neither it nor its target goes
    target = tmp_path / "elsewhere.pt"
    target.write_bytes(b"keep")
    (d / ".step-00000003.pt.x.tmp").symlink_to(target)
    assert ckpt.remove_temp_files(tmp_path) == []
    assert (d / ".step-00000003.pt.x.tmp").is_symlink() and target.read_bytes() == b"keep"



_SAVE = """
import resource, signal, sys, torch
from pathlib import Path
from dataio import atomic
from trainer import checkpoint as ckpt
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails (EFBIG) instead
resource.setrlimit(resource.RLIMIT_FSIZE, (50_000, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
ckpt.save({"model": {"w": torch.zeros(100_000)}}, Path(sys.argv[1]))
"""


def test_a_write_cut_short_names_the_checkpoint_and_the_cause(tmp_path: Path) -> None:
    """A file that stops growing part-way (a full disk; here a file size limit) gave torch a
    short write: the trainer's one-line error was "[enforce fail at inline_container.cc:672] .
    unexpected pos 768 vs 662", naming neither the file nor the cause."""
    path = ckpt.checkpoint_path(tmp_path, 2)
    res = subprocess.run([sys.executable, "-c", _SAVE, str(path)], capture_output=True,
                         text=True, timeout=120)
    assert res.returncode == 1
    assert res.stderr.splitlines()[-1] == f"OSError: [Errno 27] File too large: '{path}'"
    # the temp file is gone, and the directory made for it (dataio.atomic.atomic_open)
    assert not ckpt.checkpoint_dir(tmp_path).exists()


def _keep_dev_full_mode(monkeypatch: pytest.MonkeyPatch) -> None:
    """atomic_open gives its file a plain open()'s mode (fchmod); a /dev/full handed to it in
    place of the temporary file would be chmod-ed, as root for the whole machine (0666 -> 0644:
    no other account could write to /dev/full after the suite)."""
    real = os.fchmod

    def fchmod(fd: int, mode: int) -> None:
        if os.path.samestat(os.fstat(fd), os.stat("/dev/full")):
            return
        real(fd, mode)

    monkeypatch.setattr(os, "fchmod", fchmod)


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
def test_a_full_disk_at_close_names_the_checkpoint(tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """(where the file's buffer failed only when closed, the error named no file)"""
    ckpt.save(_state(1), ckpt.checkpoint_path(tmp_path, 1))
    real_open = atomic._open_output

    def full_disk(fd: int, mode: str, *args: object, **kwargs: object):  # noqa: ANN202
        os.close(fd)  # the temp file stays empty: every write fails as on a full disk
        return real_open(os.open("/dev/full", os.O_WRONLY), mode, *args, **kwargs)

    _keep_dev_full_mode(monkeypatch)
    monkeypatch.setattr(atomic, "_open_output", full_disk)
    path = ckpt.checkpoint_path(tmp_path, 2)
    with pytest.raises(OSError, match="No space left on device") as err:
        ckpt.save({"model": {"w": torch.zeros(100_000)}}, path)
    monkeypatch.undo()
    assert err.value.filename == str(path)
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["step-00000001.pt"]
    assert list(ckpt.checkpoint_dir(tmp_path).glob(".*")) == []


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
def test_a_failed_write_leaves_no_cycle_holding_its_callers(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A full disk's error was kept by the file save() wrote through, which torch's zip writer
    holds unseen by the garbage collector: a cycle never freed, holding save's callers (the
    Trainer, its DDP model and process group) past destroy_process_group, gloo's threads into
    the interpreter's exit. Its callers' frames now go when the error is dropped."""
    import gc
    import weakref

    real_open = atomic._open_output

    def full_disk(fd: int, mode: str, *args: object, **kwargs: object):  # noqa: ANN202
        os.close(fd)
        return real_open(os.open("/dev/full", os.O_WRONLY), mode, *args, **kwargs)

    class Trainer:  # (what Trainer.save_checkpoint's frame holds)
        pass

    def save_checkpoint(held: Trainer) -> None:
        ckpt.save({"model": {"w": torch.zeros(100_000)}}, ckpt.checkpoint_path(tmp_path, 2))

    _keep_dev_full_mode(monkeypatch)
    monkeypatch.setattr(atomic, "_open_output", full_disk)
    held = Trainer()
    gone = weakref.ref(held)
    gc.disable()
    try:
        with pytest.raises(OSError, match="No space left on device"):
            save_checkpoint(held)
        del held
        gc.collect()  # (not even the collector could free it)
        assert gone() is None
    finally:
        gc.enable()


def _unet(bands: int = 3, classes: int = 3, width_divisor: int = 8) -> torch.nn.Module:
    from models import build_model

    return build_model("unet_baseline", bands, classes, width_divisor=width_divisor)


@pytest.mark.parametrize("prefix", ["_orig_mod.", "module.", "module._orig_mod."])
def test_a_compiled_or_ddp_models_keys_load(tmp_path: Path, prefix: str) -> None:
    """(a state dict saved from a torch.compile or DDP wrapper, not the plain module, was 'its
    model does not match ...', its keys all missing and unexpected)"""
    torch.manual_seed(0)
    src, dst = _unet(), _unet()
    saved = {f"{prefix}{k}": v for k, v in src.state_dict().items()}
    ckpt.load_model(dst, {"model": saved}, tmp_path / "c.pt", "config.json")
    for k, v in src.state_dict().items():
        assert torch.equal(dst.state_dict()[k], v), k


def test_a_prefix_the_model_itself_has_is_kept(tmp_path: Path) -> None:
    # a wrapper module named "module" keeps its keys (only a prefix the model lacks is stripped)
    net = torch.nn.ModuleDict({"module": torch.nn.Linear(2, 2)})
    saved = {k: torch.ones_like(v) for k, v in net.state_dict().items()}
    ckpt.load_model(net, {"model": saved}, tmp_path / "c.pt", "")
    assert torch.equal(net.module.weight, torch.ones(2, 2))


def test_a_mismatched_model_names_the_file_bands_classes_and_config(tmp_path: Path) -> None:
    """torch's first line was all the error said: 'Error(s) in loading state_dict for UNet:'."""
    path = tmp_path / "other.pt"
    cases = [
        (_unet(bands=8), None, "it has 8 input bands (here 3); 1 tensor(s) of another shape: "
                               "stem.0.weight 4x8x3x3 (here 4x3x3x3))"),
        (_unet(classes=2), None, "it has 2 classes (here 3); 2 tensor(s) of another shape: "
                                 "head.weight 2x4x1x1 (here 3x4x1x1), head.bias 2 (here 3))"),
        (_unet(width_divisor=4), {"model": {"name": "unet_baseline", "width_divisor": 4}},
         "the checkpoint was trained with model.width_divisor=4 (here 8); 99 tensor(s) of "
         "another shape: stem.0.weight 8x3x3x3 (here 4x3x3x3), stem.1.weight 8 (here 4), ...)"),
    ]
    for src, config, detail in cases:
        state = {"model": src.state_dict()}
        if config is not None:
            state["config"] = json.dumps(config)
        with pytest.raises(ValueError) as e:
            ckpt.load_model(_unet(), state, path, "run/config.json",
                            {"name": "unet_baseline", "width_divisor": 8, "norm": "batch"})
        assert str(e.value) == f"{path}: its model does not match run/config.json ({detail}"
    # a GroupNorm model's checkpoint for a BatchNorm one: no running statistics
    own = _unet().state_dict()
    group = {k: v for k, v in own.items() if "running" not in k}
    with pytest.raises(ValueError, match=rf"\({len(own) - len(group)} tensor\(s\) missing: "
                                         r"stem.1.running_mean, stem.1.running_var, \.\.\.\)$"):
        ckpt.load_model(_unet(), {"model": group}, path, "config.json")


class _TerminatedFile:
    """A checkpoint's temp file whose third write sends this process a real SIGTERM."""

    def __init__(self, f: IO[bytes]) -> None:
        self.f, self.writes = f, 0

    def write(self, data: bytes) -> int:
        self.writes += 1
        n = self.f.write(data)
        if self.writes == 3:
            os.kill(os.getpid(), signal.SIGTERM)
        return n

    def flush(self) -> None:
        self.f.flush()


def test_a_sigterm_during_a_save_leaves_the_last_checkpoint_whole_and_nothing_else(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """torchrun's or Slurm's SIGTERM in the middle of a checkpoint write, under the commands'
    trainer.dist.stop_signals: it stops the save as a Ctrl-C does, and the directory holds the
    previous checkpoint, whole, and no temporary file."""
    ckpt.save(_state(1), ckpt.checkpoint_path(tmp_path, 1))
    real_open = ckpt.atomic_open

    @contextlib.contextmanager
    def terminated_open(path: Path, mode: str) -> Iterator[_TerminatedFile]:
        with real_open(path, mode) as f:
            yield _TerminatedFile(f)

    monkeypatch.setattr(ckpt, "atomic_open", terminated_open)
    found = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        with pytest.raises(dist.Terminated), dist.stop_signals():
            ckpt.save(_state(2), ckpt.checkpoint_path(tmp_path, 2))
    finally:
        for s, handler in found.items():
            signal.signal(s, handler)
    monkeypatch.undo()
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["step-00000001.pt"]
    assert list(ckpt.checkpoint_dir(tmp_path).glob(".*")) == []
    assert ckpt.load(ckpt.checkpoint_path(tmp_path, 1))["epoch"] == 1


class _PressedFile:
    """A checkpoint's temp file in which Ctrl-C is handled at its third write: before the write
    (torch computing between two) or as the write returns (in the file system's write)."""

    def __init__(self, f: IO[bytes], when: str) -> None:
        self.f, self.when, self.writes = f, when, 0

    def write(self, data: bytes) -> int:
        self.writes += 1
        if self.writes == 3 and self.when == "before_a_write":
            raise KeyboardInterrupt
        n = self.f.write(data)
        if self.writes == 3:
            raise KeyboardInterrupt
        return n

    def flush(self) -> None:
        self.f.flush()


# Each system call of a save outside torch's zip writer (dataio.atomic_open's), and the
# how-many-th call of it in the save: mkstemp's open of the temporary file, its mode, its fsync,
# the rename, the directory's open and fsync (fsync_dir).
_SAVE_CALLS = [("open", 1), ("fchmod", 1), ("fsync", 1), ("replace", 1), ("open", 2),
               ("fsync", 2)]


@pytest.mark.parametrize(("call", "nth"), _SAVE_CALLS)
def test_a_ctrl_c_at_any_step_of_a_save_leaves_the_checkpoint_whole_or_nothing(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, call: str, nth: int) -> None:
    """A Ctrl-C outside torch's zip writer's own writes (the test below covers those): the
    checkpoint directory must hold complete checkpoints under their names and nothing else.
    One landing as the temporary file was given its mode (after mkstemp, before atomic_open's
    try) left that empty temporary file, a .step-N.pt.*.tmp, behind."""
    ckpt.save(_state(1), ckpt.checkpoint_path(tmp_path, 1))
    real, calls = getattr(os, call), []

    def pressed(*args: object, **kwargs: object) -> object:
        calls.append(args)
        if len(calls) == nth:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(os, call, pressed)
    with pytest.raises(KeyboardInterrupt):
        ckpt.save(_state(2), ckpt.checkpoint_path(tmp_path, 2))
    monkeypatch.undo()
    assert len(calls) >= nth  # (the press happened in the save)
    left = sorted(p.name for p in ckpt.checkpoint_dir(tmp_path).iterdir())
    assert left in (["step-00000001.pt"], ["step-00000001.pt", "step-00000002.pt"]), left
    for name in left:
        assert ckpt.load(ckpt.checkpoint_dir(tmp_path) / name)["epoch"] == int(name[5:13])


@pytest.mark.parametrize("when", ["before_a_write", "in_a_write"])
def test_a_ctrl_c_during_a_save_stays_a_keyboard_interrupt(tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch,
                                                           when: str) -> None:
    """torch's zip writer, left out of step, raised "[enforce fail at inline_container.cc:672] .
    unexpected pos 46 vs 0" over the KeyboardInterrupt: the trainer reported that as its error
    and exit 1, instead of 'interrupted' and 130."""
    ckpt.save(_state(1), ckpt.checkpoint_path(tmp_path, 1))
    real_open = ckpt.atomic_open

    @contextlib.contextmanager
    def pressed_open(path: Path, mode: str) -> Iterator[_PressedFile]:
        with real_open(path, mode) as f:
            yield _PressedFile(f, when)

    monkeypatch.setattr(ckpt, "atomic_open", pressed_open)
    with pytest.raises(KeyboardInterrupt):
        ckpt.save(_state(2), ckpt.checkpoint_path(tmp_path, 2))
    monkeypatch.undo()
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["step-00000001.pt"]
    assert list(ckpt.checkpoint_dir(tmp_path).glob(".*")) == []


def test_a_run_s_best_is_best_pt_when_a_damaged_newest_hides_its_record(tmp_path: Path) -> None:
    """source_checkpoint (train.init_from, trainer.export, trainer.predict's default) takes the
    best the newest checkpoint names (best_step) over a best.pt not yet re-pointed at it. A
    damaged newest is skipped, and the older one's record names an older best than best.pt (a
    copy where links fail, intact): that stale record was taken, older weights than the run's
    best, where best.pt was right (predict used best.pt before it took source_checkpoint)."""
    for step, best_step in ((1, 1), (2, 1), (3, 3)):
        state = {**_state(step), "global_step": step, "best_step": best_step}
        ckpt.save(state, ckpt.checkpoint_path(tmp_path, step))
    best = ckpt.checkpoint_dir(tmp_path) / ckpt.BEST
    best.write_bytes(ckpt.checkpoint_path(tmp_path, 3).read_bytes())  # (a copy: no hard links)
    newest = ckpt.checkpoint_path(tmp_path, 3)
    newest.write_bytes(newest.read_bytes()[:100])  # a disk error after the rename
    assert ckpt.source_checkpoint(str(tmp_path)) == best
    # best.pt older than the record (killed before re-pointing it) still yields to the record
    best.write_bytes(ckpt.checkpoint_path(tmp_path, 1).read_bytes())
    ckpt.save({**_state(4), "global_step": 4, "best_step": 2}, ckpt.checkpoint_path(tmp_path, 4))
    assert ckpt.source_checkpoint(str(tmp_path)) == ckpt.checkpoint_path(tmp_path, 2)
