"""Load and memory: postprocessing and preparation of thousands of tiles, peak RSS of the run.

    python -m benchmarks.load [--tiles 1000,10000] [--baseline-tiles 1000]
                              [--prepare-tiles 500,2000] [--workers 2] [--json OUT] [--keep DIR]

Runs the real commands as subprocesses and samples the memory of the whole process tree (the
command and every descendant: worker pools fork or spawn) every 50 ms from ``/proc``:

- polygonize: ``python -m postproc.polygonize --pred PRED --out CSV --workers W`` on N prediction
  tiles (650x650, shards of 100). The tiles are made cheaply: a pool of distinct synthetic tiles
  (``postproc.synthmask``, 0-150 buildings) as Gaussian-blurred one-hot probabilities, each PNG
  encoded once and written under N distinct ImageIds, with the matching truth CSV.
- score: ``python -m postproc.score --truth TRUTH --proposals CSV --json OUT --workers W``.
- polygonize, baseline / score, baseline: ``python -m benchmarks.load_baseline polygonize|score``
  on the same inputs (the baseline scores the project's proposals; its TP/FP/FN must equal the
  project's): the sample's polygonizer and the plain shapely scorer, one process, reading the
  CSVs whole and gathering the proposal rows before writing. Only at the ``--baseline-tiles``
  sizes (default: the ``--tiles`` sizes up to 1,000): the plain scorer takes ~38 ms a tile.
- prepare: ``python -m dataio.prepare --raw RAW --out DATA --workers W`` on N tiles: a pool of
  ``dataio.synth`` tiles hard-linked under N ImageIds (synth runs ~5 tiles/s a core).

Figures: wall seconds, tiles/s, CPU time of the tree per tile (steadier than wall time when
other work shares the cores), the peak over samples of the summed RSS of the tree, the largest
RSS of any one process, and the peak summed PSS (RSS with shared pages split among the processes
that share them: forked workers share their parent's pages, so summed RSS counts those twice).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from affine import Affine
from PIL import Image, ImageFilter

from benchmarks.common import (
    base_parser,
    count,
    machine_info,
    parse_args,
    print_table,
    run,
    write_json,
)
from benchmarks.proctree import tree_pids
from dataio.geo import to_geo
from dataio.spacenet import EMPTY, IMAGE_DIR, IMAGE_PREFIX, LABEL_DIR, TRUTH_HEADER, wkt_xyz
from postproc.pools import wait_to_end
from postproc.predio import encode_prob_png, write_pred_shard
from postproc.synthmask import SynthConfig, one_hot, synth_tile

REPO = Path(__file__).resolve().parents[1]
PAGE = os.sysconf("SC_PAGE_SIZE")
MB = 1024 * 1024
SHARD_TILES = 100
TILE_PX = 650
BASELINE_MAX_TILES = 1000  # the default --baseline-tiles: the --tiles sizes up to this
BASELINE = ", baseline"  # the stage of a baseline row is the project's stage + this
AOI = "AOI_2_Vegas"  # ImageIds like SpaceNet's: AOI_2_Vegas_img<N>
# NOTE: a pixel-sized geotransform near Vegas, so PolygonWKT_Geo reads like SpaceNet's.
GEO = Affine(0.3 / 111_320.0, 0.0, -115.30, 0.0, -0.3 / 111_320.0, 36.30)


# ---- process-tree memory ------------------------------------------------------------------------

def rss_bytes(pid: int) -> int:
    """Resident set size of one process (0 once it has gone)."""
    try:
        with open(f"/proc/{pid}/statm") as f:
            return int(f.read().split()[1]) * PAGE
    except (OSError, IndexError, ValueError):
        return 0


def pss_bytes(pid: int) -> int:
    """Proportional set size of one process (0 once it has gone or when unreadable)."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1]) * 1024
    except (OSError, IndexError, ValueError):
        pass
    return 0


@dataclass
class TreeMemory:
    """Samples the memory of a process tree in a thread; keeps the peaks (bytes)."""

    pid: int
    interval: float = 0.05
    tree_rss: int = 0
    single_rss: int = 0
    tree_pss: int = 0
    processes: int = 0
    samples: int = 0
    _stop: threading.Event = field(default_factory=threading.Event, repr=False)
    _thread: threading.Thread | None = field(default=None, repr=False)

    def sample(self) -> None:
        pids = tree_pids(self.pid)
        rss = [rss_bytes(p) for p in pids]
        self.tree_rss = max(self.tree_rss, sum(rss))
        self.single_rss = max(self.single_rss, max(rss))
        self.tree_pss = max(self.tree_pss, sum(pss_bytes(p) for p in pids))
        self.processes = max(self.processes, sum(1 for r in rss if r))
        self.samples += 1

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.interval)

    def __enter__(self) -> TreeMemory:
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()


def run_measured(cmd: list[str], log: Path) -> dict[str, Any]:
    """Run ``cmd`` from the repository root; wall seconds and peak memory of its process tree.

    Output goes to ``log`` (progress bars and all); a failure raises with the log's tail.
    """
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    with open(log, "w") as out:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=out, stderr=subprocess.STDOUT)
        with TreeMemory(proc.pid) as mem:
            wait_to_end(proc)  # (a Ctrl-C: the command got it too, and stops by itself)
            rc = proc.returncode
        seconds = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    if rc != 0:
        tail = log.read_text(errors="replace")[-2000:]
        raise RuntimeError(f"{' '.join(cmd)} exited with {rc}:\n{tail}")
    return {"seconds": seconds, "cpu_seconds": cpu, "peak_tree_rss_mb": mem.tree_rss / MB,
            "peak_single_rss_mb": mem.single_rss / MB, "peak_tree_pss_mb": mem.tree_pss / MB,
            "processes": mem.processes, "memory_samples": mem.samples}


# ---- inputs -------------------------------------------------------------------------------------

@dataclass
class PoolTile:
    png: bytes
    truth: list[tuple[int, str, str]]  # (BuildingId, PolygonWKT_Pix, PolygonWKT_Geo)


def make_pool(n: int, seed: int = 0) -> list[PoolTile]:
    """``n`` distinct prediction tiles with their truth: 0-150 buildings (tile 0 empty), as
    one-hot masks blurred like a model's output (sigma 1.5 px; ~100 kB a PNG)."""
    rng = np.random.default_rng(seed)
    pool = []
    for i in range(n):
        buildings = 0 if i == 0 else int(rng.integers(1, 151))
        mask, polys = synth_tile(seed * 100_003 + i, SynthConfig(size=TILE_PX,
                                                                 buildings=buildings))
        # NOTE: blur, not per-pixel noise: a noisy PNG is ~0.9 MB, ten times a model's output.
        prob = Image.fromarray(one_hot(mask)).filter(ImageFilter.GaussianBlur(1.5))
        truth = [(k, wkt_xyz(p, 2), wkt_xyz(to_geo(p, GEO), 9))
                 for k, p in enumerate(polys, start=1)]
        pool.append(PoolTile(encode_prob_png(np.asarray(prob)), truth))
    return pool


def image_ids(n: int) -> list[str]:
    return [f"{AOI}_img{i + 1}" for i in range(n)]


def write_predictions(pred: Path, truth_csv: Path, pool: list[PoolTile], n: int,
                      shard_tiles: int = SHARD_TILES) -> int:
    """N tiles (tile i is pool tile i mod len(pool)) as ``pred-NNNNNN.tar`` shards of
    ``shard_tiles`` and the matching SpaceNet truth CSV; returns the shards' total bytes."""
    pred.mkdir(parents=True, exist_ok=True)
    ids = image_ids(n)
    meta = {"crs": "EPSG:4326", "transform": list(GEO)[:6], "width": TILE_PX,
            "height": TILE_PX, "bands": 3}
    with open(truth_csv, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(TRUTH_HEADER)
        for i, iid in enumerate(ids):
            t = pool[i % len(pool)].truth
            if t:
                w.writerows([iid, k, pix, geo] for k, pix, geo in t)
            else:
                w.writerow([iid, -1, EMPTY, EMPTY])
    total = 0
    for s in range(0, n, shard_tiles):
        path = pred / f"pred-{s // shard_tiles:06d}.tar"
        write_pred_shard(path, ((ids[i], pool[i % len(pool)].png,
                                 {**meta, "building_count": len(pool[i % len(pool)].truth)})
                                for i in range(s, min(n, s + shard_tiles))))
        total += path.stat().st_size
    return total


def link_aoi(pool_raw: Path, raw: Path, n: int) -> None:
    """A SpaceNet-2 layout AOI of ``n`` tiles hard-linked (copied across file systems) from the
    tiles of ``pool_raw`` under new ImageIds."""
    tifs = sorted((pool_raw / IMAGE_DIR).glob(f"{IMAGE_PREFIX}*.tif"))
    if not tifs:
        raise ValueError(f"{pool_raw}: no {IMAGE_DIR}/*.tif to link")
    (raw / IMAGE_DIR).mkdir(parents=True)
    (raw / LABEL_DIR).mkdir(parents=True)
    for i, iid in enumerate(image_ids(n)):
        src = tifs[i % len(tifs)]
        src_id = src.name[len(IMAGE_PREFIX):-len(".tif")]
        for a, b in ((src, raw / IMAGE_DIR / f"{IMAGE_PREFIX}{iid}.tif"),
                     (pool_raw / LABEL_DIR / f"buildings_{src_id}.geojson",
                      raw / LABEL_DIR / f"buildings_{iid}.geojson")):
            try:
                os.link(a, b)
            except OSError:
                shutil.copyfile(a, b)


# ---- stages -------------------------------------------------------------------------------------

def _row(stage: str, n: int, m: dict[str, Any], **extra: Any) -> dict[str, Any]:
    side = "baseline" if stage.endswith(BASELINE) else "project"
    return {"variant": f"{stage}, {n} tiles", "stage": stage, "side": side, "tiles": n, **m,
            "tiles_per_s": n / m["seconds"], "cpu_ms_per_tile": 1000 * m["cpu_seconds"] / n,
            **extra}


def _counts(score_json: Path) -> dict[str, Any]:
    js = json.loads(score_json.read_text())
    return {k: js[k] for k in ("tp", "fp", "fn", "f1")}


def bench_postproc(n: int, pool: list[PoolTile], work: Path, workers: int,
                   baseline: bool = False) -> list[dict]:
    """polygonize and score rows for ``n`` tiles under ``work``; with ``baseline``, the
    baseline commands' rows too, on the same inputs (the baseline scorer on the project's
    proposals: a disagreement on TP/FP/FN raises)."""
    work.mkdir(parents=True, exist_ok=True)
    pred, truth, props = work / "pred", work / "truth.csv", work / "proposals.csv"
    t0 = time.perf_counter()
    pred_bytes = write_predictions(pred, truth, pool, n)
    made = time.perf_counter() - t0
    py, base_cmd = sys.executable, [sys.executable, "-m", "benchmarks.load_baseline"]
    sizes = {"pred_mb": pred_bytes / MB, "truth_csv_mb": truth.stat().st_size / MB,
             "generate_seconds": made}
    poly = run_measured([py, "-m", "postproc.polygonize", "--pred", str(pred), "--out",
                         str(props), "--workers", str(workers)], work / "polygonize.log")
    rows = [_row("polygonize", n, poly, **sizes, proposals_csv_mb=props.stat().st_size / MB)]
    if baseline:
        bprops = work / "proposals-baseline.csv"
        bpoly = run_measured([*base_cmd, "polygonize", "--pred", str(pred), "--out",
                              str(bprops)], work / "polygonize-baseline.log")
        rows.append(_row("polygonize" + BASELINE, n, bpoly, **sizes,
                         proposals_csv_mb=bprops.stat().st_size / MB))
    sizes["proposals_csv_mb"] = props.stat().st_size / MB
    sc = run_measured([py, "-m", "postproc.score", "--truth", str(truth), "--proposals",
                       str(props), "--json", str(work / "score.json"), "--workers",
                       str(workers)], work / "score.log")
    rows.append(_row("score", n, sc, **sizes, **_counts(work / "score.json")))
    if baseline:
        bsc = run_measured([*base_cmd, "score", "--truth", str(truth), "--proposals",
                            str(props), "--json", str(work / "score-baseline.json")],
                           work / "score-baseline.log")
        rows.append(_row("score" + BASELINE, n, bsc, **sizes,
                         **_counts(work / "score-baseline.json")))
        if [rows[-1][k] for k in ("tp", "fp", "fn")] != [rows[-2][k] for k in ("tp", "fp", "fn")]:
            raise RuntimeError(f"{work}: score.json and score-baseline.json disagree on TP/FP/FN")
    return rows


def bench_prepare(n: int, pool_raw: Path, work: Path, workers: int) -> dict[str, Any]:
    """One prepare row for ``n`` tiles hard-linked from ``pool_raw``; its output is removed."""
    raw, data = work / f"raw-{n}", work / f"data-{n}"
    link_aoi(pool_raw, raw, n)
    m = run_measured([sys.executable, "-m", "dataio.prepare", "--raw", str(raw), "--out",
                      str(data), "--workers", str(workers)], work / f"prepare-{n}.log")
    size = sum(p.stat().st_size for p in data.rglob("*") if p.is_file())
    return _row("prepare", n, m, data_mb=size / MB)


def add_growth(rows: list[dict[str, Any]]) -> None:
    """Per stage: peak tree RSS/PSS relative to the stage's smallest run, and the growth in
    MB per 1,000 tiles between the smallest and this run."""
    for stage in {r["stage"] for r in rows}:
        mine = sorted((r for r in rows if r["stage"] == stage), key=lambda r: r["tiles"])
        base = mine[0]
        for r in mine:
            r["rss_x_smallest"] = r["peak_tree_rss_mb"] / base["peak_tree_rss_mb"]
            if r is not base:
                dn = (r["tiles"] - base["tiles"]) / 1000
                r["pss_mb_per_1000_tiles"] = (r["peak_tree_pss_mb"] - base["peak_tree_pss_mb"]) / dn


def add_vs_project(rows: list[dict[str, Any]]) -> None:
    """Each baseline row: its peak tree PSS over the project's, same stage and tiles."""
    project = {(r["stage"], r["tiles"]): r for r in rows if r["side"] == "project"}
    for r in rows:
        p = project.get((r["stage"].removesuffix(BASELINE), r["tiles"]))
        if r["side"] == "baseline" and p is not None:
            r["pss_x_project"] = r["peak_tree_pss_mb"] / p["peak_tree_pss_mb"]


def _sizes(text: str) -> list[int]:
    """Comma-separated tile counts; '' or 0 means none (``--prepare-tiles 0``)."""
    items = text.split(",") if text.strip() else []
    # NOTE: '1000,,10000' (a size left out, or a typo) ran 1000 and 10000 without a word
    if any(not x.strip() for x in items):
        raise argparse.ArgumentTypeError(f"{text!r} has an empty item: give counts like 500,2000")
    sizes = [int(x) for x in items]
    if any(n < 0 for n in sizes):
        raise argparse.ArgumentTypeError(f"tile counts must be >= 0, got {text!r}")
    sizes = [n for n in sizes if n > 0]
    # NOTE: a size given twice ran twice, then the growth per 1,000 tiles between the two
    # divided by zero and the whole run's rows were lost (no table, no JSON)
    repeated = sorted({n for n in sizes if sizes.count(n) > 1})
    if repeated:
        raise argparse.ArgumentTypeError(
            f"{','.join(map(str, repeated))} given twice in {text!r}: each size runs once")
    return sizes


def baseline_sizes(tiles: list[int], asked: list[int] | None) -> list[int]:
    """The --tiles sizes at which the baselines run: those asked for (each must be one of
    --tiles: a baseline runs on the project's inputs), by default those up to 1,000."""
    if asked is None:
        return [n for n in tiles if n <= BASELINE_MAX_TILES]
    missing = sorted(set(asked) - set(tiles))
    if missing:
        raise ValueError(f"--baseline-tiles {','.join(map(str, missing))} not among --tiles "
                         f"{','.join(map(str, tiles)) or '(none)'}: a baseline runs on the "
                         "project's inputs of the same size")
    return [n for n in tiles if n in asked]


COLUMNS = ["stage", "tiles", "seconds", "tiles_per_s", "cpu_ms_per_tile", "peak_tree_rss_mb",
           "peak_single_rss_mb", "peak_tree_pss_mb", "processes", "rss_x_smallest",
           "pss_mb_per_1000_tiles", "pss_x_project"]
UNITS = {"seconds": "s", "cpu_seconds": "s (user + system, whole tree)",
         "cpu_ms_per_tile": "ms", "tiles_per_s": "tiles/s", "peak_tree_rss_mb": "MiB",
         "peak_single_rss_mb": "MiB", "peak_tree_pss_mb": "MiB", "pred_mb": "MiB",
         "truth_csv_mb": "MiB", "proposals_csv_mb": "MiB", "data_mb": "MiB",
         "generate_seconds": "s", "pss_mb_per_1000_tiles": "MiB per 1,000 tiles",
         "rss_x_smallest": "ratio", "pss_x_project": "ratio (baseline / project, same tiles)",
         "f1": "ratio", "tp": "polygons", "fp": "polygons", "fn": "polygons"}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = base_parser("load", __doc__)
    p.add_argument("--tiles", type=_sizes, default=[1000, 10000],
                   help="postprocessing sizes, comma-separated (default 1000,10000; '' or 0 = "
                        "none)")
    p.add_argument("--baseline-tiles", type=_sizes, default=None,
                   help="the --tiles sizes at which the baselines run too, comma-separated "
                        f"(default: those up to {BASELINE_MAX_TILES}; '' or 0 = none): the plain "
                        "scorer takes ~38 ms a tile on one core")
    p.add_argument("--prepare-tiles", type=_sizes, default=[500, 2000],
                   help="prepare sizes, comma-separated (default 500,2000; '' or 0 = none)")
    p.add_argument("--workers", type=count, default=2, help="--workers of every command")
    p.add_argument("--pool", type=count, default=50, help="distinct prediction tiles (default 50)")
    p.add_argument("--synth-pool", type=count, default=100,
                   help="distinct dataio.synth tiles linked for prepare (default 100)")
    p.add_argument("--keep", type=Path, default=None,
                   help="work here and keep the inputs and outputs (default: a temp dir, removed)")
    args = parse_args(p, argv)
    if not args.tiles and not args.prepare_tiles:  # (--tiles 0 alone times prepare only)
        p.error("--tiles and --prepare-tiles are both 0: nothing to time")
    try:
        baselines = baseline_sizes(args.tiles, args.baseline_tiles)
    except ValueError as e:
        p.error(str(e))
    # NOTE: an earlier run's work there (the same --keep again) failed only after the timing
    # that came before it: dataio.synth and prepare refuse to write over an AOI or a dataset.
    if args.keep is not None and args.keep.is_dir() and any(args.keep.iterdir()):
        p.error(f"--keep {args.keep} is not empty (an earlier run's work?); give a new or empty "
                "directory")
    work = args.keep or Path(tempfile.mkdtemp(prefix="bench-load-"))
    work.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    extra: dict[str, Any] = {}
    try:
        if args.tiles:
            pool = make_pool(args.pool)
            extra["buildings_per_tile"] = float(np.mean([len(t.truth) for t in pool]))
            extra["prob_png_kb"] = float(np.mean([len(t.png) for t in pool])) / 1024
            # NOTE: fills numba's on-disk cache, so no measured run pays for compilation; runs
            # the baselines too, so that a failing one stops the benchmark in seconds.
            bench_postproc(min(20, args.pool), pool, work / "warmup", args.workers,
                           baseline=bool(baselines))
            for n in args.tiles:
                rows += bench_postproc(n, pool, work / f"post-{n}", args.workers,
                                       baseline=n in baselines)
                if args.keep is None:
                    shutil.rmtree(work / f"post-{n}")
        if args.prepare_tiles:
            pool_raw = work / "synth-pool"
            synth = run_measured([sys.executable, "-m", "dataio.synth", "--out", str(pool_raw),
                                  "--tiles", str(args.synth_pool), "--workers",
                                  str(args.workers)], work / "synth.log")
            rows.append(_row("synth (pool)", args.synth_pool, synth))
            for n in args.prepare_tiles:
                rows.append(bench_prepare(n, pool_raw, work, args.workers))
                if args.keep is None:
                    shutil.rmtree(work / f"raw-{n}")
                    shutil.rmtree(work / f"data-{n}")
    finally:
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)
    add_growth(rows)
    add_vs_project(rows)
    info = machine_info()
    print(f"{info['cores']} cores: {info['cpu']}; --workers {args.workers}; 650x650 tiles"
          + (f", {extra['buildings_per_tile']:.0f} buildings a prediction tile on average"
             if "buildings_per_tile" in extra else ""))
    print("baselines (benchmarks.load_baseline, one process): "
          + (f"at {', '.join(map(str, baselines))} tiles" if baselines else "none")
          + " (--baseline-tiles)")
    print_table(rows, COLUMNS)
    return write_json(args.json, "load", rows, settings=args, units=UNITS, workers=args.workers,
                      baseline_tiles=baselines,
                      pool=args.pool, synth_pool=args.synth_pool, shard_tiles=SHARD_TILES,
                      tile_px=TILE_PX, sample_interval_s=0.05, **extra)


if __name__ == "__main__":
    sys.exit(run("load", main))
