"""Inference on a CPU: the exported ONNX graph on onnxruntime against PyTorch eager, fp32 and
bf16 autocast.

    python -m benchmarks.export [--model unet_baseline|unet] [--tile-px 650] [--batch-sizes 1,4]
                                [--threads 1,all] [--repeat 3] [--json OUT]

The network is the ``--model`` preset's (``configs/MODEL.toml``'s ``[model]``, uncompiled, as
``trainer.predict.load_net`` builds it: channels_last weights where the preset says so),
freshly initialised with a fixed seed: weights do not change the speed of a dense network, so no
trained checkpoint is needed. It is wrapped as ``trainer.export.Deployable`` (the loader's
normalisation, the network, the softmax) and exported by ``trainer.export.to_onnx``, the graph
``python -m trainer.export`` writes (less its metadata). The tiles are random 11-bit RGB values
(SpaceNet's RGB-PanSharpen range) as float32, the same arrays for every variant.

- onnxruntime fp32: the graph on onnxruntime's CPUExecutionProvider (default graph optimisation,
  ``intra_op_num_threads`` = the row's threads, ``inter_op_num_threads`` 1).
- torch eager fp32: the same Deployable module under ``torch.no_grad()``,
  ``torch.set_num_threads`` = the row's threads (the baseline of the speedups).
- torch eager bf16 (autocast): the same, under ``torch.autocast("cpu", torch.bfloat16)``
  (``trainer.amp``), which ``trainer.predict`` runs on a CPU with native bf16 (AVX512-BF16 or
  AMX; elsewhere it predicts in fp32). On a CPU without it (emulated bf16, 5-6.5x slower) this
  row is timed once instead of ``--repeat`` times (the ``repeat`` column).

Per thread count and batch size, each variant is called once untimed (``first_s``: onnxruntime's
and oneDNN's per-shape set-up), then the variants alternate ``--repeat`` times (a busy neighbour
slows all alike) and the fastest call counts. The probabilities are compared with torch fp32's on
the same batch: onnxruntime's must agree within 1e-4 (else the run fails); bf16's difference is
reported.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import (
    base_parser,
    count,
    machine_info,
    parse_args,
    print_table,
    run,
    write_json,
)

REPO = Path(__file__).resolve().parents[1]
ORT, TORCH, BF16 = "onnxruntime fp32", "torch eager fp32", "torch eager bf16 (autocast)"
VARIANTS = (ORT, TORCH, BF16)
MODELS = ("unet_baseline", "unet")
BANDS = 3  # RGB-PanSharpen
# NOTE: fp32 on both sides; onnxruntime's kernels sum in another order than torch's (1e-6 to
# 3e-5 measured, tests/trainer/test_export.py), which is the bound of the README's claim
ATOL = 1e-4
# any fixed percentiles: the graph's first step normalises with them, at the same cost whatever
# they are (SpaceNet RGB-PanSharpen's are of this order)
P2, P98 = [120.0, 180.0, 140.0], [720.0, 760.0, 620.0]


@dataclasses.dataclass
class Setup:
    """What one (threads, batch) measurement runs: the module, the sessions, the tiles."""

    model: Any  # trainer.export.Deployable
    sessions: dict[int, Any]  # threads -> onnxruntime.InferenceSession
    tiles: np.ndarray  # (max batch, bands, tile, tile) float32


def build(model_name: str, width_divisor: int | None, tile: int, batch: int,
          threads: list[int]) -> tuple[Setup, float, dict[str, Any]]:
    """The preset's network as a Deployable, its ONNX graph on one session per thread count,
    ``batch`` random tiles; the seconds the export took; the model's description."""
    import onnxruntime as ort
    import torch

    from models import build_model_from_config
    from trainer.config import load_config
    from trainer.export import Deployable, size_multiple, to_onnx

    cfg = load_config(REPO / "configs" / f"{model_name}.toml").model
    # (uncompiled, as predict's load_net builds it: it sees every tile size once)
    cfg = dataclasses.replace(cfg, compile=False,
                              width_divisor=width_divisor or cfg.width_divisor)
    torch.manual_seed(0)
    net = build_model_from_config(cfg, BANDS, 3)
    model = Deployable(net.float().eval(), P2, P98).eval()
    t0 = time.perf_counter()
    with torch.no_grad():
        graph = to_onnx(model, BANDS, None).SerializeToString()
    export_s = time.perf_counter() - t0
    sessions = {}
    for n in threads:
        opts = ort.SessionOptions()
        opts.intra_op_num_threads, opts.inter_op_num_threads = n, 1
        sessions[n] = ort.InferenceSession(graph, opts, providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    tiles = rng.integers(0, 2048, (batch, BANDS, tile, tile)).astype(np.float32)
    about = {"name": cfg.name, "width_divisor": cfg.width_divisor, "norm": cfg.norm,
             "pad_mode": cfg.pad_mode, "channels_last": cfg.channels_last,
             "widths": list(getattr(net, "widths", ())), "size_multiple": size_multiple(net),
             "parameters": sum(p.numel() for p in net.parameters()),
             "onnx_bytes": len(graph)}
    return Setup(model, sessions, tiles), export_s, about


def callers(setup: Setup, threads: int, batch: int) -> dict[str, Callable[[], np.ndarray]]:
    """Each variant as a call on the first ``batch`` tiles that returns its probabilities."""
    import torch

    from trainer.amp import resolve

    x = np.ascontiguousarray(setup.tiles[:batch])
    bf16 = resolve("bf16", torch.device("cpu"))
    session = setup.sessions[threads]

    def on_ort() -> np.ndarray:
        return session.run(None, {"image": x})[0]

    def on_torch(autocast: bool) -> Callable[[], np.ndarray]:
        def call() -> np.ndarray:
            # NOTE: set before every call, not once: the variants alternate, and torch's
            # thread count is process-wide
            torch.set_num_threads(threads)
            with torch.no_grad():
                if autocast:
                    with bf16.autocast():
                        return setup.model(torch.from_numpy(x)).float().numpy()
                return setup.model(torch.from_numpy(x)).numpy()
        return call

    return {ORT: on_ort, TORCH: on_torch(False), BF16: on_torch(True)}


def measure(setup: Setup, threads: int, batch: int, repeat: int,
            bf16_repeat: int) -> list[dict[str, Any]]:
    """One row per variant at ``threads`` and ``batch``: the first call, the fastest of the
    alternating timed ones, and the largest difference from torch fp32's probabilities."""
    calls = callers(setup, threads, batch)
    first, out = {}, {}
    for name, call in calls.items():
        t0 = time.perf_counter()
        out[name] = call()
        first[name] = time.perf_counter() - t0
    best = dict.fromkeys(calls, float("inf"))
    for i in range(repeat):
        for name, call in calls.items():  # (alternating: a busy neighbour slows each alike)
            if name == BF16 and i >= bf16_repeat:
                continue
            t0 = time.perf_counter()
            out[name] = call()
            best[name] = min(best[name], time.perf_counter() - t0)
    want = out[TORCH]
    rows = []
    tile = setup.tiles.shape[-1]
    for name in calls:
        got = out[name]
        if got.shape != want.shape:
            raise ValueError(f"{name}: probabilities of shape {got.shape}, torch fp32's "
                             f"{want.shape}")
        s = best[name]
        rows.append({"variant": name, "threads": threads, "batch": batch, "tile_px": tile,
                     "repeat": min(repeat, bf16_repeat) if name == BF16 else repeat,
                     "first_s": first[name], "seconds": s, "ms_per_tile": 1000 * s / batch,
                     "tiles_per_s": batch / s, "mpx_per_s": batch * tile * tile / 1e6 / s,
                     "speedup_vs_torch_fp32": best[TORCH] / s,
                     "max_abs_diff_vs_torch_fp32": float(np.abs(got - want).max())})
    check_agreement(rows)
    return rows


def check_agreement(rows: list[dict[str, Any]]) -> None:
    """ValueError unless every fp32 row's probabilities are torch fp32's within ``ATOL``."""
    for r in rows:
        if "fp32" in r["variant"] and not r["max_abs_diff_vs_torch_fp32"] <= ATOL:
            raise ValueError(f"{r['variant']}: its probabilities differ from torch fp32's by "
                             f"{r['max_abs_diff_vs_torch_fp32']:.3g} (> {ATOL}) at "
                             f"{r['threads']} threads, batch {r['batch']}: the exported graph "
                             "does not compute the network (trainer.export)")


def _counts(text: str, cores: int) -> list[int]:
    """A comma-separated list of whole numbers >= 1, where ``all`` is ``cores``; duplicates
    dropped, in the order given."""
    out: list[int] = []
    for item in text.split(","):
        item = item.strip()
        if not item:
            raise argparse.ArgumentTypeError(f"{text!r} has an empty item")
        n = cores if item == "all" else count(item)
        if n not in out:
            out.append(n)
    return out


COLUMNS = ["variant", "threads", "batch", "repeat", "first_s", "seconds", "ms_per_tile",
           "tiles_per_s", "speedup_vs_torch_fp32", "max_abs_diff_vs_torch_fp32"]
UNITS = {"first_s": "s (the first, untimed call at this shape and thread count)",
         "seconds": "s a batch (the fastest of the row's repeat calls)",
         "ms_per_tile": "ms (seconds / batch)", "tiles_per_s": "tiles/s",
         "mpx_per_s": "megapixels/s", "speedup_vs_torch_fp32": "ratio (torch fp32 seconds / "
         "the row's, same threads and batch)",
         "max_abs_diff_vs_torch_fp32": "probability (0-1), the largest over the batch's "
         "pixels and classes", "export_s": "s (trainer.export.to_onnx)",
         "load_average_1min": "os.getloadavg()[0] at the start and the end"}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = base_parser("export", __doc__)
    cores = len(os.sched_getaffinity(0))
    p.add_argument("--model", choices=MODELS, default="unet_baseline",
                   help="the preset (configs/MODEL.toml) whose network is timed "
                        "(default unet_baseline)")
    p.add_argument("--width-divisor", type=count, default=None,
                   help="divide the network's widths (model.width_divisor; default the "
                        "preset's, 1)")
    p.add_argument("--tile-px", type=count, default=650,
                   help="tile height and width in px (default 650, a SpaceNet tile)")
    p.add_argument("--batch-sizes", type=lambda t: _counts(t, cores), default=[1, 4],
                   help="batch sizes, comma-separated (default 1,4)")
    p.add_argument("--threads", type=lambda t: _counts(t, cores), default=_counts("1,all", cores),
                   help=f"thread counts, comma-separated; all: this process's cores, {cores} "
                        "here (default 1,all)")
    p.add_argument("--repeat", type=count, default=3, help="timed calls a row (default 3)")
    args = parse_args(p, argv)
    if args.tile_px < 16:
        p.error(f"--tile-px {args.tile_px}: at least 16 (the exported graph's smallest side)")
    try:  # (before the minutes of timing; run() makes a ValueError one line)
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
        import onnxscript  # noqa: F401 (what torch's exporter needs)
    except ImportError as e:
        raise ValueError(f"this benchmark needs onnx, onnxscript and onnxruntime ({e}): "
                         "pip install -e '.[dev]'") from None
    from trainer.amp import cpu_has_native_bf16

    native = cpu_has_native_bf16()
    bf16_repeat = args.repeat if native else 1
    setup, export_s, about = build(args.model, args.width_divisor, args.tile_px,
                                   max(args.batch_sizes), args.threads)
    load = [os.getloadavg()[0]]  # (a shared machine: what else ran, at the start and the end)
    rows: list[dict[str, Any]] = []
    for n in args.threads:
        for b in args.batch_sizes:
            rows += measure(setup, n, b, args.repeat, bf16_repeat)
            print(f"  {n} threads, batch {b}: " + ", ".join(
                f"{r['variant']} {r['seconds']:.3g} s" for r in rows[-len(VARIANTS):]),
                flush=True)
    load.append(os.getloadavg()[0])
    info = machine_info()
    print(f"{info['cores']} cores: {info['cpu']} (native bf16: {native}); {args.model} "
          f"({about['parameters']:,} parameters, freshly initialised), {args.tile_px}x"
          f"{args.tile_px} px tiles; exported in {export_s:.1f} s; load {load[0]:.1f} -> "
          f"{load[1]:.1f}")
    print_table(rows, COLUMNS)
    return write_json(args.json, "export", rows, settings=args, units=UNITS, model=about,
                      export_s=export_s, native_bf16=native, atol=ATOL,
                      load_average_1min=load)


if __name__ == "__main__":
    sys.exit(run("export", main))
