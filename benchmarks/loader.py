"""Loader throughput: the DALI backend against the torch DataLoader backend and plain webdataset.

    python -m benchmarks.loader [--data DATA] [--json OUT] [--rounds 5] [--epochs 3]

Reads the training split of DATA (without ``--data``: 64 synthetic 650 px tiles made with
``dataio.synth`` + ``dataio.prepare`` in a temporary directory) with every variant, decode only
(whole tiles, ``train=False``) and with training augmentation (crop 512, flips, rotations,
brightness/contrast), batch 8, 2 DALI threads or 2 DataLoader workers:

* ``dali-cpu``  the default backend, CPU-only pipeline (``device_id=None``)
* ``dali-gpu``  the same graph on the GPU (only where CUDA is present)
* ``torch``     the ``torch`` backend: the same plan, numpy/PIL in DataLoader workers
* ``webdataset`` the plain reference: ``wds.WebDataset`` streaming the tars, a shuffle buffer,
  ``decode_sample`` and the same augmentation code, in DataLoader workers

Variants run interleaved, ``--rounds`` times ``--epochs`` epochs each after a warm-up epoch, and
the median is reported: on a shared 2-core VM single runs vary by 2x. A second table times
the DALI backend's wait per batch when an emulated training step (``--step-ms``, a sleep: the CPU
is free, as while a GPU trains) comes between batches, reading ahead in the loader's thread
(``data.read_ahead``, the default) against reading inside DALI's callback (``read_ahead=0``).
Besides samples/s and MB/s (shard bytes of the samples read) each row has the CPU time per
sample of the whole process tree (workers included), which does not depend on how many cores the
host lent us at that moment.
"""

from __future__ import annotations

import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import webdataset as wds

from benchmarks.common import (
    add_product,
    base_parser,
    check_dataset,
    check_product,
    count,
    imagery,
    machine_info,
    non_negative,
    non_negative_float,
    parse_args,
    print_table,
    run,
    write_json,
)
from dataio.augment import Draws, Geometry, Normaliser, transform_image, transform_mask
from dataio.loader import LoaderConfig, build_loader
from dataio.manifest import load_manifest
from dataio.sharding import SampleIndex, usable_samples
from dataio.shards import decode_sample
from dataio.spacenet import DEFAULT_PRODUCT

_TICK = os.sysconf("SC_CLK_TCK")
# NOTE: /proc counts CPU time in clock ticks (10 ms): a round shorter than this many gives no
# CPU figures rather than ones off by more than 10% (or a CPU time of 0 and a division by it)
MIN_CPU_TICKS = 10


def cpu_seconds(pid: int | None = None) -> float:
    """User + system CPU time of a process, its threads and (recursively) its live children."""
    pid = pid or os.getpid()
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        total = (int(fields[11]) + int(fields[12])) / _TICK
        for tid in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                total += sum(cpu_seconds(int(c)) for c in f.read().split())
    except OSError:  # a worker that just exited
        return 0.0
    return total


def make_dataset(root: Path, tiles: int = 64, product: str = DEFAULT_PRODUCT) -> Path:
    from dataio.prepare import PrepareConfig, prepare
    from dataio.synth import SynthConfig, write_aoi

    workers = len(os.sched_getaffinity(0))
    write_aoi(SynthConfig(out=root / "raw", tiles=tiles, seed=1, workers=workers,
                          mul=product != DEFAULT_PRODUCT))
    prepare(PrepareConfig(raw=[root / "raw"], out=root / "DATA", split=(100.0, 0.0, 0.0),
                          shard_size=16, workers=workers, product=product), progress=False)
    return root / "DATA"


class WebdatasetReference:
    """Plain webdataset + DataLoader: stream the tars, shuffle in a buffer, decode, augment."""

    def __init__(self, data: Path, index: SampleIndex, train: bool, cfg: LoaderConfig) -> None:
        manifest = load_manifest(data)
        # NOTE: the shards the project's loaders read (``index``, checked against the manifest),
        # not every shard the manifest lists: a truncated one, which they leave out with a
        # warning, stopped the benchmark here with a tarfile traceback from a DataLoader worker
        # (and the rows would otherwise count different samples).
        urls = list(dict.fromkeys(str(ref.shard) for ref in index.samples))
        self.norm = Normaliser(*manifest.percentiles())
        self.spec = cfg.aug_spec() if train else None
        self.seed = cfg.seed
        # NOTE: an integer shardshuffle (webdataset 1.0.2 warns on True); split_by_worker, as
        # under DDP one would also pass nodesplitter=wds.split_by_node.
        dataset = (wds.WebDataset(urls, shardshuffle=len(urls) if train else False,
                                  workersplitter=wds.split_by_worker, empty_check=False)
                   .shuffle(64 if train else 0).map(self.sample)
                   .batched(cfg.batch_size, partial=True))
        self.loader = torch.utils.data.DataLoader(dataset, batch_size=None,
                                                  num_workers=cfg.num_threads,
                                                  persistent_workers=cfg.num_threads > 0)
        self.calls = 0

    def sample(self, members: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
        image, mask, _ = decode_sample(members, members["__key__"])
        self.calls += 1
        draws = Draws.draw(1, self.seed, self.calls, self.spec)
        g = Geometry.resolve(image.shape[0], image.shape[1], self.spec, draws, 0)
        rows = image[g.ay: g.ay + g.ch]
        mean, std = self.norm.mean_std(*(draws.bk[0] if draws is not None else (1.0, 1.0)))
        out = transform_image(rows[::-1] if g.v else rows, g, mean, std)
        return out, transform_mask(mask, g).astype(np.int64)

    def __iter__(self) -> Iterable[Any]:
        return iter(self.loader)


def _run(batches: Callable[[], Iterable[Any]], epochs: int) -> tuple[int, float, float]:
    """Samples, wall seconds and process-tree CPU seconds for ``epochs`` passes."""
    n, cpu0, t0 = 0, cpu_seconds(), time.perf_counter()
    for _ in range(epochs):
        for batch in batches():
            image = batch.image if hasattr(batch, "image") else batch[0]
            n += int(batch.valid.sum()) if hasattr(batch, "valid") else len(image)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return n, time.perf_counter() - t0, cpu_seconds() - cpu0


def _variants(data: Path, index: SampleIndex, cfg: LoaderConfig
              ) -> list[tuple[dict[str, Any], Any]]:
    variants = []
    devices = ["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"]
    for mode, train in (("decode", False), ("train-aug", True)):
        for device in devices:
            loader = build_loader(data, "train", cfg, train=train, device=device)
            variants.append(({"name": f"dali-{device.replace('cuda', 'gpu')}", "mode": mode,
                              "device": device}, loader))
        torch_cfg = LoaderConfig(**{**cfg.__dict__, "backend": "torch"})
        variants.append(({"name": "torch", "mode": mode, "device": "cpu"},
                         build_loader(data, "train", torch_cfg, train=train, device="cpu")))
        variants.append(({"name": "webdataset", "mode": mode, "device": "cpu"},
                         WebdatasetReference(data, index, train, cfg)))
    return variants


def step_waits(data: Path, cfg: LoaderConfig, step_ms: float, rounds: int,
               epochs: int) -> list[dict[str, Any]]:
    """The DALI loader's wait per batch when a training step of ``step_ms`` that leaves the CPU
    free (as a GPU step does) comes between batches: reading inside DALI's callback (read_ahead
    0, as before 2026-11-26) against reading ahead in the loader's thread. Median over rounds,
    the variants interleaved."""
    devices = ["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"]
    variants = [({"device": d, "read_ahead": ahead},
                 build_loader(data, "train", LoaderConfig(**{**cfg.__dict__, "read_ahead": ahead}),
                              train=True, device=d))
                for d in devices for ahead in (0, cfg.read_ahead or 2)]
    waits: list[list[float]] = [[] for _ in variants]
    try:
        for r in range(rounds + 1):  # the first round warms up
            for i, (_, loader) in enumerate(variants):
                total, batches = 0.0, 0
                for epoch in range(epochs):
                    loader.set_epoch(epoch)
                    it = iter(loader)
                    while True:
                        t0 = time.perf_counter()
                        batch = next(it, None)
                        if batch is not None and batch.image.is_cuda:
                            torch.cuda.synchronize()
                        total += time.perf_counter() - t0
                        if batch is None:
                            break
                        batches += 1
                        time.sleep(step_ms / 1000)
                if r:
                    waits[i].append(1000 * total / batches)
    finally:
        for _, loader in variants:
            loader.close()
    rows = []
    for (row, _), w in zip(variants, waits, strict=True):
        rows.append({**row, "step_ms": step_ms, "wait_ms_per_batch": statistics.median(w),
                     "wait_ms_best": min(w)})
    for row in rows:
        base = next(r for r in rows if r["device"] == row["device"] and r["read_ahead"] == 0)
        row["wait_vs_callback"] = row["wait_ms_per_batch"] / base["wait_ms_per_batch"]
    return rows


UNITS = {"samples_per_s": "samples/s (median over rounds)",
         "samples_per_s_best": "samples/s (best round)",
         "mb_per_s": "MB/s (10^6 bytes of the samples' shard members)",
         "cpu_ms_per_sample": "ms of CPU (user + system, whole process tree) per sample; "
                              "null where a round used under MIN_CPU_TICKS clock ticks",
         "cores_used": "CPU seconds per wall second",
         "speedup_vs_torch": "ratio (samples/s over the torch row's, same mode)",
         "cpu_ratio_vs_torch": "ratio (the torch row's CPU ms/sample over this row's)",
         "batch_size": "samples", "crop": "px (0: whole tiles)",
         "workers": "DALI threads / DataLoader workers", "sample_mb": "MB (10^6 bytes)",
         "step_ms": "ms (emulated step between batches)",
         "wait_ms_per_batch": "ms (median over rounds)", "wait_ms_best": "ms (best round)",
         "wait_vs_callback": "ratio (wait over read_ahead=0's, same device)"}


def cpu_rows(variants: list[tuple[dict[str, Any], Any]],
             results: list[list[tuple[int, float, float]]], mb: float) -> list[dict[str, Any]]:
    """Each variant's row from its rounds' (samples, wall s, CPU s), with its ratios to the
    torch row of the same mode. CPU figures are None where a round took under
    ``MIN_CPU_TICKS`` clock ticks of CPU."""
    rows = []
    for (row, _), runs in zip(variants, results, strict=True):
        rates = [n / wall for n, wall, _ in runs]
        rate = statistics.median(rates)
        timed = all(c * _TICK >= MIN_CPU_TICKS for _, _, c in runs)
        row.update(samples_per_s=rate, samples_per_s_best=max(rates), mb_per_s=rate * mb,
                   cpu_ms_per_sample=(statistics.median(1000 * c / n for n, _, c in runs)
                                      if timed else None),
                   cores_used=statistics.median(c / w for _, w, c in runs) if timed else None)
        rows.append(row)
    for row in rows:
        base = next(r for r in rows if r["name"] == "torch" and r["mode"] == row["mode"])
        row["speedup_vs_torch"] = row["samples_per_s"] / base["samples_per_s"]
        row["cpu_ratio_vs_torch"] = (base["cpu_ms_per_sample"] / row["cpu_ms_per_sample"]
                                     if None not in (base["cpu_ms_per_sample"],
                                                     row["cpu_ms_per_sample"]) else None)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = base_parser("loader", __doc__)
    parser.add_argument("--data", type=Path, default=None, help="a prepared dataset (default: "
                        "64 synthetic 650 px tiles in a temporary directory)")
    parser.add_argument("--rounds", type=count, default=5,
                        help="interleaved rounds; the median is reported (default 5)")
    parser.add_argument("--epochs", type=count, default=3,
                        help="epochs per round and variant (default 3)")
    parser.add_argument("--batch-size", type=count, default=8, help="samples (default 8)")
    parser.add_argument("--crop", type=non_negative, default=512,
                        help="training crop in px, train-aug rows (default 512; 0: whole tiles)")
    # NOTE: not 0: DALI runs at least one thread, so a row said 0 of what was 1
    parser.add_argument("--workers", type=count, default=2,
                        help="DALI threads / DataLoader workers (default 2)")
    parser.add_argument("--step-ms", type=non_negative_float, default=50.0,
                        help="the emulated training step between batches for the DALI wait "
                             "table (default 50; 0: skip it)")
    add_product(parser)
    args = parse_args(parser, argv)
    check_dataset(parser, args.data)
    product = check_product(parser, args.data, args.product)
    # NOTE: the consumer here does nothing, and torch's intra-op threads would only fight the
    # loaders' threads and workers for the cores.
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        data = args.data or make_dataset(Path(tmp), product=product)
        index = usable_samples(load_manifest(data), "train")  # (the loaders' list: see there)
        what = imagery(data)
        mb = np.mean([sum(size for _, size in r.members.values()) for r in index.samples]) / 1e6
        cfg = LoaderConfig(batch_size=args.batch_size, crop_size=args.crop,
                           num_threads=args.workers)
        variants = _variants(data, index, cfg)
        results: list[list[tuple[int, float, float]]] = [[] for _ in variants]
        for _, loader in variants:
            _run(lambda loader=loader: loader, 1)  # warm-up: workers, pipelines, page cache
        for _ in range(args.rounds):
            for i, (_, loader) in enumerate(variants):
                results[i].append(_run(lambda loader=loader: loader, args.epochs))
        for _, loader in variants:
            if hasattr(loader, "close"):
                loader.close()
        waits = (step_waits(data, cfg, args.step_ms, args.rounds, args.epochs)
                 if args.step_ms > 0 else [])
    rows = cpu_rows(variants, results, mb)
    for row in rows:
        row.update(batch_size=args.batch_size, crop=args.crop, workers=args.workers)
    info = machine_info()
    print(f"loader benchmark: {info['cores']} cores ({info['cpu']}), GPU {info['gpu']}, "
          f"{len(index)} samples of {mb:.2f} MB ({what['product']}, {what['bands']} bands), "
          f"batch {args.batch_size}, crop {args.crop}, "
          f"{args.workers} threads/workers, median of {args.rounds} rounds x {args.epochs} epochs")
    print_table(rows, ["name", "mode", "device", "samples_per_s", "samples_per_s_best",
                       "mb_per_s", "cpu_ms_per_sample", "cores_used", "speedup_vs_torch",
                       "cpu_ratio_vs_torch"])
    if any(r["cpu_ms_per_sample"] is None for r in rows):
        print(f"(no CPU figures where a round used under {MIN_CPU_TICKS} clock ticks of CPU, "
              f"{MIN_CPU_TICKS / _TICK * 1000:.0f} ms: more --epochs, or a larger --data)")
    if waits:
        print(f"\nDALI data wait per batch with a {args.step_ms:g} ms step between batches "
              "(train-aug; read_ahead 0 reads inside DALI's callback):")
        print_table(waits, ["device", "read_ahead", "step_ms", "wait_ms_per_batch",
                            "wait_ms_best", "wait_vs_callback"])
    write_json(args.json, "loader", rows, settings=args, units=UNITS, samples=len(index),
               sample_mb=mb, imagery=what, rounds=args.rounds, epochs=args.epochs, step_waits=waits)
    return 0


if __name__ == "__main__":
    sys.exit(run("loader", main))
