"""Shared plumbing for the benchmarks: machine description, timing, table and JSON output.

Every benchmark prints one table and writes one JSON object ``{"benchmark", "created", "commit",
"settings", "machine", "versions", "units", "rows", ...}`` where each row names the variant
(project or baseline) and carries its figures, whose units ``units`` names.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from dataio.atomic import atomic_write_text, check_writable
from postproc.pools import ignore_further_sigint, say, sigint_once


def machine_info() -> dict[str, Any]:
    """Cores, CPU model and GPU (or ``None``) of the machine the benchmark ran on."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    gpu, gpus, gpu_memory = None, 0, None
    try:
        import torch

        if torch.cuda.is_available():
            gpu, gpus = torch.cuda.get_device_name(0), torch.cuda.device_count()
            gpu_memory = torch.cuda.get_device_properties(0).total_memory
    except ImportError:
        pass
    return {
        "cores": len(os.sched_getaffinity(0)),
        "cpu": cpu,
        "memory_bytes": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"),  # MemTotal
        "gpu": gpu,
        "gpus": gpus,
        "gpu_memory_bytes": gpu_memory,
        "python": platform.python_version(),
        "os": platform.platform(),
        "hostname": platform.node(),
    }


# the distributions whose versions decide the figures (DALI's name carries its CUDA major)
PACKAGES = ("torch", "nvidia-dali-cuda120", "nvidia-dali-cuda110", "nvidia-dali-cuda130",
            "webdataset", "numpy", "numba", "rasterio", "shapely", "pyproj", "pillow",
            "onnx", "onnxscript", "onnxruntime")  # (the last three: benchmarks.export)


def versions() -> dict[str, str | None]:
    """Versions of the packages the benchmarks time (those installed), CUDA and NCCL as torch
    was built with them (None without CUDA), and GDAL's."""
    out: dict[str, str | None] = {}
    for name in PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    try:
        import torch

        out["cuda"] = torch.version.cuda
        out["nccl"] = (".".join(map(str, torch.cuda.nccl.version()))
                       if torch.cuda.is_available() else None)
    except (ImportError, RuntimeError, AttributeError):
        pass
    try:
        import rasterio

        out["gdal"] = rasterio.__gdal_version__
    except ImportError:
        pass
    return out


def source_commit() -> str | None:
    """The repository's commit, with ``-dirty`` when tracked files differ from it (None when
    this is no git checkout)."""
    repo = Path(__file__).resolve().parents[1]
    try:
        head = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True,
                              text=True, timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(repo), "status", "--porcelain",
                                "--untracked-files=no"], capture_output=True, text=True,
                               timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return head + ("-dirty" if dirty else "")


def best_time(fn: Callable[[], Any], repeat: int = 3) -> float:
    """The fastest of ``repeat`` wall-clock runs of ``fn`` in seconds (least disturbed by noise)."""
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def print_table(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> None:
    """Print rows as an aligned text table with the given columns."""

    def fmt(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:,.3g}" if abs(v) < 100 else f"{v:,.0f}"
        return "" if v is None else str(v)

    cells = [[fmt(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True)))
    print("  ".join("-" * w for w in widths))
    for row in cells:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)))


def write_json(path: str | os.PathLike[str] | None, name: str, rows: list[dict[str, Any]],
               settings: argparse.Namespace | dict[str, Any], units: dict[str, str],
               **extra: Any) -> dict[str, Any]:
    """Assemble the benchmark's JSON object and write it atomically when ``path`` is given.

    Besides the rows it says what a later reader needs to compare two runs: when, from which
    commit, with which settings (every flag, defaults included), on which machine and package
    versions, and the units of the figures.
    """
    if isinstance(settings, argparse.Namespace):
        settings = vars(settings)
    result = {"benchmark": name,
              "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
              "commit": source_commit(),
              "settings": {k: str(v) if isinstance(v, os.PathLike) else v
                           for k, v in settings.items()},
              "machine": machine_info(), "versions": versions(), "units": units, "rows": rows,
              **extra}
    if path is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps(result, indent=2) + "\n")
    return result


def base_parser(name: str, doc: str) -> argparse.ArgumentParser:
    """The parser of ``python -m benchmarks.NAME``: its docstring's first paragraph describes it,
    and the rest (what each row measures, against which baseline) follows the options."""
    first, _, rest = doc.partition("\n\n")
    parser = argparse.ArgumentParser(prog=f"python -m benchmarks.{name}",
                                     description=" ".join(first.split()), epilog=rest.strip("\n"),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", type=Path, default=None, help="write the results here as JSON")
    return parser


def _whole(text: str, least: int) -> int:
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if n < least:
        raise argparse.ArgumentTypeError(f"must be >= {least}, got {n}")
    return n


def count(text: str) -> int:
    """An argparse type: a whole number >= 1 (tiles, rounds, steps, processes)."""
    return _whole(text, 1)


def non_negative(text: str) -> int:
    """An argparse type: a whole number >= 0 (warm-up steps, a crop size where 0 means none)."""
    return _whole(text, 0)


def sizes(text: str, least: int, unit: str) -> list[int]:
    """An argparse type's body: comma-separated whole numbers >= ``least``, each given once,
    sorted (``--grids 4,16``; ``unit`` names them in the message)."""
    try:
        out = [int(x) for x in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not whole numbers like 4,8,16") from None
    if any(n < least for n in out) or len(set(out)) != len(out):
        raise argparse.ArgumentTypeError(f"{text!r}: each size >= {least} {unit}, given once")
    return sorted(out)


def non_negative_float(text: str) -> float:
    """An argparse type: a finite number >= 0 (milliseconds)."""
    try:
        x = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0 <= x < float("inf"):
        raise argparse.ArgumentTypeError(f"must be finite and >= 0, got {text}")
    return x


def parse_args(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """Parse, and refuse a ``--json`` that cannot be written before the minutes of timing."""
    args = parser.parse_args(argv)
    if getattr(args, "json", None) is not None:
        try:
            check_writable(args.json, "--json")
        except ValueError as e:
            parser.error(str(e))
    return args


def add_product(parser: argparse.ArgumentParser) -> None:
    """``--product``: the imagery of the synthetic dataset a benchmark makes without ``--data``."""
    from dataio.spacenet import DEFAULT_PRODUCT, PRODUCTS

    parser.add_argument("--product", choices=list(PRODUCTS), default=None,
                        help=f"the synthetic dataset's imagery (default {DEFAULT_PRODUCT}; "
                        "MUL-PanSharpen: 8 bands, 2.7x the bytes a sample); not with --data, "
                        "whose manifest says its own")


def check_product(parser: argparse.ArgumentParser, data: Path | None,
                  product: str | None) -> str:
    """The product a synthetic dataset is made of; ``--product`` with ``--data`` is refused."""
    from dataio.spacenet import DEFAULT_PRODUCT

    if product is not None and data is not None:
        parser.error(f"--product makes the synthetic dataset; --data {data} is prepared already "
                     "(its manifest says its product)")
    return product or DEFAULT_PRODUCT


def imagery(data: Path) -> dict[str, Any]:
    """What a benchmark's samples are: the dataset's product and band count (a MUL-PanSharpen
    sample is 8 bands, 2.7x an RGB one's bytes: figures of the two do not compare as such)."""
    from dataio.manifest import load_manifest

    m = load_manifest(data)
    return {"product": m.product, "bands": m.bands}


def check_dataset(parser: argparse.ArgumentParser, data: Path | None) -> None:
    """Refuse a ``--data`` that is not a prepared dataset, or whose training split has no usable
    sample, before any work, in one line.

    NOTE: checked in the parent: a benchmark whose workers open the dataset under torchrun got
    their error and then torchrun's own traceback and failure report."""
    if data is None:
        return
    from dataio.manifest import load_manifest
    from dataio.sharding import DataError, check_usable

    try:
        # (and its training split, which both read: benchmarks.train's torchrun workers found
        # it empty or every shard unusable, and their error came with torchrun's traceback)
        check_usable(load_manifest(data), "train")
    except (ValueError, OSError, DataError) as e:
        parser.error(f"--data {data}: {e}")


def _bad_input(e: Exception) -> bool:
    """Whether ``e`` is input a benchmark cannot use, said in one line: a ValueError or OSError,
    or the loader's ``DataError`` (a --data whose split has no usable shard was a traceback).

    NOTE: DataError is looked up, not imported: some benchmarks keep the project's modules out
    of their processes, and a DataError was raised only where its module is loaded."""
    sharding = sys.modules.get("dataio.sharding")
    return isinstance(e, ValueError | OSError) or (
        sharding is not None and isinstance(e, sharding.DataError))


def run(name: str, main: Callable[[], Any]) -> int:
    """``python -m benchmarks.NAME``: bad input (a missing dataset, a malformed file) is one
    line, as in the project's commands, not a traceback; so is Ctrl-C (exit code 130), handled
    as theirs is (``postproc.pools``): the first press stops the benchmark, further ones are
    ignored until it has exited.

    NOTE: a shell starts a command in the background without job control (``cmd &`` in a
    script, a suite run left to itself) with Ctrl-C ignored, and Python then installs no
    KeyboardInterrupt. The benchmarks, left at that default, ignored a Ctrl-C and ran on: the
    Ctrl-C test waited 120 s for a synth of 400 tiles. :func:`sigint_once` installs the
    handler, as the project's commands do.
    """
    try:
        with sigint_once():
            result = main()
    except Exception as e:
        if not _bad_input(e):
            raise
        print(f"python -m benchmarks.{name}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # (the JSON is written whole at the end or not at all)
        ignore_further_sigint()  # (a further Ctrl-C in the interpreter's exit: a traceback)
        say(f"python -m benchmarks.{name}: interrupted")
        return 130
    return result if isinstance(result, int) else 0  # (some return their JSON object)
