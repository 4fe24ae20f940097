"""Training throughput and where a step's time goes, for 1 and N processes, AMP on and off,
DALI against the plain webdataset + DataLoader backend.

    python -m benchmarks.train [--data DATA] [--config configs/demo.toml] [--steps 20]
                               [--nproc 2] [--json OUT]

Each variant runs under ``torchrun`` (gloo on CPU, NCCL on GPUs) and times every step in four
parts: waiting for the batch, forward + backward (under ``no_sync``, pure compute), the gradient
all-reduce (the communication DDP does, here done explicitly so it can be timed on its own), and
the optimizer step. NOTE: real DDP overlaps the all-reduce with the backward, so its steps are at
most this long; the split shows what each part costs. On a CPU without native bf16 (emulated,
5-6.5x slower on an AVX2 EPYC, ``benchmarks/RESULTS.md``) the bf16 variant is timed over 3
steps instead of ``--steps`` (the table's ``steps`` column).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from benchmarks.common import (
    add_product,
    base_parser,
    check_dataset,
    check_product,
    count,
    imagery,
    non_negative,
    parse_args,
    print_table,
    run,
    write_json,
)
from postproc.pools import run_to_end, say

if TYPE_CHECKING:
    from trainer.dist import DistEnv

PHASES = ("data_wait", "fwd_bwd", "comm", "optimizer")


def _variants(nproc: int, cuda: bool) -> list[dict[str, Any]]:
    amps = ("off", "bf16", "fp16") if cuda else ("off", "bf16")
    out = [{"procs": 1, "backend": "dali", "amp": a} for a in amps]
    out.append({"procs": 1, "backend": "torch", "amp": "off"})
    if nproc > 1:
        out.append({"procs": nproc, "backend": "dali", "amp": "off"})
        out.append({"procs": nproc, "backend": "torch", "amp": "off"})
        if cuda:
            out.append({"procs": nproc, "backend": "dali", "amp": "bf16"})
    return out


def overrides(backend: str, amp: str, cuda: bool) -> list[str]:
    """A variant's config overrides. On CPUs one loader thread per process (the 2-core figures);
    on a GPU machine the config's own ``data.num_threads``: with one thread DALI's CPU stage (the
    mask PNG decode) did not keep up and showed as data wait (H200: 29 ms a batch of 16 with one
    thread, 15 ms with four)."""
    out = [f"data.backend={backend}", f"train.amp={amp}"]
    return out if cuda else [*out, "data.num_threads=1"]


def worker(args: argparse.Namespace) -> int:
    """One process of a variant: time ``--steps`` steps after ``--warmup``; its exit code."""
    from trainer import dist

    env = dist.init(dist.DistEnv.from_env())
    try:
        # NOTE: the model (DDP) lives in _time_steps only, so it is gone before teardown:
        # a DDP that outlives destroy_process_group frees the group later from its reducer,
        # joining gloo's threads with the GIL held (see trainer.dist.init).
        _time_steps(args, env)
    except RuntimeError as e:
        # NOTE: a peer killed (out of memory, a signal) gave gloo's or NCCL's raw text and a
        # traceback on the survivors; now trainer.train's one line and exit code for it. Any
        # other error keeps its traceback: in a benchmark it is a bug to read.
        lost = dist.describe_failure(e, env.rank, "rerun the benchmark")
        if lost is None:
            raise
        say(f"python -m benchmarks.train: error: {lost}")
        return dist.exit_code_for(e)
    finally:
        dist.teardown()
    return 0


def _time_steps(args: argparse.Namespace, env: DistEnv) -> None:
    """The timed steps of :func:`worker`; rank 0 writes the row to ``--out``."""
    import torch

    from dataio.loader import build_loader
    from dataio.manifest import load_manifest
    from models import build_loss, build_model_from_config
    from trainer import dist
    from trainer.amp import resolve
    from trainer.config import load_config
    from trainer.optim import build_optimizer

    cfg = load_config(args.config, overrides(args.backend, args.amp,
                                             torch.cuda.is_available()))
    device = dist.device_for(env)
    manifest = load_manifest(args.data)
    torch.manual_seed(0)
    net = build_model_from_config(cfg.model, manifest.bands, 3).to(device)
    loss_fn = build_loss(cfg.loss, manifest.class_frequencies).to(device)
    opt = build_optimizer(net.parameters(), cfg.optim)
    precision = resolve(args.amp, device)
    scaler = precision.scaler()
    ddp = torch.nn.parallel.DistributedDataParallel(net) if env.distributed else net
    loader = build_loader(args.data, "train", cfg.data, env.rank, env.world_size,
                          train=True, device=device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    times = {p: 0.0 for p in PHASES}
    samples, steps, epoch = 0, 0, 0
    t_start = 0.0
    while steps < args.warmup + args.steps:
        loader.set_epoch(epoch)
        t0 = time.perf_counter()
        for batch in loader:
            if steps == args.warmup:
                dist.barrier()
                t_start, times, samples = time.perf_counter(), dict.fromkeys(PHASES, 0.0), 0
                t0 = t_start
            sync()
            t1 = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            ctx = ddp.no_sync() if env.distributed else contextlib.nullcontext()
            with ctx:
                with precision.autocast():
                    logits = ddp(batch.image)
                loss = loss_fn(logits, batch.mask)
                (scaler.scale(loss) if scaler else loss).backward()
            sync()
            t2 = time.perf_counter()
            if env.distributed:
                grads = [p.grad for p in net.parameters() if p.grad is not None]
                flat = torch.cat([g.flatten() for g in grads])
                torch.distributed.all_reduce(flat)
                flat /= env.world_size
                # the copy back into .grad is part of what DDP does (its buckets are views,
                # but the reduced values still land in every parameter's gradient)
                for g, reduced in zip(grads, torch._utils._unflatten_dense_tensors(
                        flat, grads), strict=True):
                    g.copy_(reduced)
            sync()
            t3 = time.perf_counter()
            if scaler:
                scaler.step(opt)
                scaler.update()
            else:
                opt.step()
            sync()
            t4 = time.perf_counter()
            for p, dt in zip(PHASES, (t1 - t0, t2 - t1, t3 - t2, t4 - t3), strict=True):
                times[p] += dt
            samples += int(batch.valid.sum())
            steps += 1
            t0 = time.perf_counter()
            if steps >= args.warmup + args.steps:
                break
        epoch += 1
    wall = time.perf_counter() - t_start
    loader.close()
    total = dist.all_reduce_sum([samples])[0].item()
    if env.is_main:
        n = args.steps
        row = {"samples_per_s": total / wall, "step_ms": 1000 * wall / n,
               **{f"{p}_ms": 1000 * times[p] / n for p in PHASES},
               "device": device.type, "precision": precision.name,
               "threads": cfg.data.num_threads}
        Path(args.out).write_text(json.dumps(row))


def _dataset(tmp: Path, product: str) -> Path:
    from dataio.prepare import PrepareConfig, prepare
    from dataio.spacenet import DEFAULT_PRODUCT
    from dataio.synth import SynthConfig, write_aoi

    write_aoi(SynthConfig(out=tmp / "raw", tiles=48, seed=1, workers=2,
                          mul=product != DEFAULT_PRODUCT))
    prepare(PrepareConfig([tmp / "raw"], tmp / "DATA", split=(100, 0, 0), shard_size=16,
                          workers=2, product=product), progress=False)
    return tmp / "DATA"


def main(argv: list[str] | None = None) -> int:
    p = base_parser("train", __doc__)
    p.add_argument("--data", type=Path, default=None, help="default: 48 synthetic tiles")
    p.add_argument("--config", type=Path, default=Path("configs/demo.toml"),
                   help="the model, batch and loader settings (default configs/demo.toml)")
    p.add_argument("--steps", type=count, default=20, help="timed steps a variant (default 20)")
    # NOTE: a negative count never reached the step that starts the clock: the rates were then
    # the samples over the time since the machine booted (perf_counter's origin)
    p.add_argument("--warmup", type=non_negative, default=3,
                   help="untimed steps first (default 3)")
    p.add_argument("--nproc", type=count, default=min(2, len(os.sched_getaffinity(0))),
                   help="processes of the N-process rows (default: 2, or 1 on one core; at "
                        "most the GPUs on a GPU machine)")
    add_product(p)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--backend", default="dali", help=argparse.SUPPRESS)
    p.add_argument("--amp", default="off", help=argparse.SUPPRESS)
    p.add_argument("--out", default="", help=argparse.SUPPRESS)
    args = parse_args(p, argv)
    if args.worker:
        return worker(args)
    from trainer.config import ConfigError, load_config

    try:  # before the workers start: else their traceback, then torchrun's
        load_config(args.config)
    except ConfigError as e:
        p.error(str(e))
    check_dataset(p, args.data)
    product = check_product(p, args.data, args.product)
    import torch

    cuda = torch.cuda.is_available()
    nproc = min(args.nproc, torch.cuda.device_count()) if cuda else args.nproc
    with tempfile.TemporaryDirectory() as tmp:
        data = args.data or _dataset(Path(tmp), product)
        what = imagery(data)
        print(f"train benchmark: {what['product']} ({what['bands']} bands)", flush=True)
        rows = []
        from trainer.amp import cpu_has_native_bf16

        for v in _variants(nproc, cuda):
            out = Path(tmp) / "row.json"
            # emulated bf16 on an older CPU runs 5-6.5x slower: a few steps show it
            steps = 3 if (v["amp"] == "bf16" and not cuda and not cpu_has_native_bf16()) \
                else args.steps
            # the cores this process may use (a cpuset or Slurm allocation), not the host's
            cores = len(os.sched_getaffinity(0))
            env = dict(os.environ, OMP_NUM_THREADS=str(max(1, cores // v["procs"])))
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                   f"--nproc_per_node={v['procs']}", "-m", "benchmarks.train", "--worker",
                   "--data", str(data), "--config", str(args.config), "--steps",
                   str(steps), "--warmup", str(args.warmup), "--backend", v["backend"],
                   "--amp", v["amp"], "--out", str(out)]
            # NOTE: on Ctrl-C torchrun passes it on to its workers and waits for them:
            # subprocess.run killed it after 0.25 s (postproc.pools.run_to_end)
            res = run_to_end(cmd, env=env, capture_output=True, text=True)
            if res.returncode != 0:
                print(res.stderr[-3000:], file=sys.stderr)
                return 1
            row = {"variant": f"{v['procs']}x {v['backend']} amp={v['amp']}", **v,
                   "steps": steps, **json.loads(out.read_text())}
            rows.append(row)
            print(f"  {row['variant']}: {row['samples_per_s']:.1f} samples/s over {steps} steps",
                  flush=True)
    # NOTE: "steps" shown: the emulated-bf16 row is timed over 3 steps, not --steps
    cols = ["variant", "precision", "steps", "samples_per_s", "step_ms",
            *(f"{p}_ms" for p in PHASES)]
    print_table(rows, cols)
    hidden = ("worker", "backend", "amp", "out")  # the workers' own flags
    write_json(args.json, "train", rows,
               settings={k: v for k, v in vars(args).items() if k not in hidden},
               config=str(args.config), steps=args.steps, imagery=what,
               units={"samples_per_s": "samples/s (all ranks)", "*_ms": "ms per step",
                      "threads": "DALI threads / DataLoader workers per process"})
    return 0


if __name__ == "__main__":
    sys.exit(run("train", main))
