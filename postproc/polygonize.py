"""Class probabilities -> building instances -> footprint polygons with confidences.

Instances: pixels with building probability above ``building_threshold`` are seeds; seeds that
touch (4-connectivity) form one instance, so the boundary class between two buildings keeps them
apart. Each instance then grows back over its boundary band: an eligible pixel (building +
boundary above ``footprint_threshold``) within ``grow_radius`` px (Euclidean, from its nearest
seed pixel) joins the instance it is nearest to. The training band is 2.5 px on each side of an
outline, so the seeds sit ~2.5 px inside it; growing 3 px restores the footprint without
swallowing the outer half of the band. Polygons are traced exactly along pixel edges (the geometry
GDAL's polygonize gives with 4-connectivity); the confidence is the mean of building + boundary
probability over the polygon's pixels.

CLI: ``python -m postproc.polygonize --pred PRED --out PROPOSALS.csv [--geojson DIR]``; see
``postproc.runner`` for the parallel and torchrun parts.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import shapely
from shapely.geometry import Polygon

from postproc import blobs, grow, label, tilekernel, trace
from postproc.pools import close_pool
from postproc.predio import quantize_probs

if TYPE_CHECKING:  # (postproc.runner imports this module)
    from postproc.runner import RunSummary


def _named(field: str) -> str:
    """A setting as errors name it: its key in a settings file (or a training config's
    [postproc]) and polygonize's flag (a user sets it with either; "polygonize's": trainer.train
    and tune, which check it too, have no such flag)."""
    flag = {"simplify_tolerance": "simplify"}.get(field, field).replace("_", "-")
    return f"{field} (polygonize --{flag})"


@dataclass
class PolygonizeConfig:
    """Thresholds in probability units (0..1) and sizes in pixels; saved as ``postproc.json``."""

    building_threshold: float = 0.5  # seed: p(building) > this
    footprint_threshold: float = 0.5  # growable: p(building) + p(boundary) > this
    grow_radius: float = 3.0  # px from the nearest seed pixel; 0 turns growth off
    min_polygon_area: float = 20.0  # px; smaller blobs are dropped
    simplify_tolerance: float = 0.0  # px, shapely simplify with topology kept; 0 = exact edges
    # components with no seed at all (slivers cut by the tile edge, huts thinner than the band)
    # become instances after losing the band's outer grow_radius px
    seedless: bool = True

    def __post_init__(self) -> None:
        for name in ("building_threshold", "footprint_threshold"):
            v = getattr(self, name)
            if not 0.0 <= v < 1.0:
                raise ValueError(f"{_named(name)} {v} must lie in [0, 1)")
        if self.footprint_threshold > self.building_threshold:
            raise ValueError(f"{_named('footprint_threshold')} must not exceed "
                             f"{_named('building_threshold')} ({self.footprint_threshold} > "
                             f"{self.building_threshold}): a seed must also be growable")
        for name in ("grow_radius", "min_polygon_area", "simplify_tolerance"):
            v = getattr(self, name)
            if not (math.isfinite(v) and v >= 0):
                raise ValueError(f"{_named(name)} {v} must be a finite number >= 0")
        if self.grow_radius > 50:
            raise ValueError(f"{_named('grow_radius')} {self.grow_radius} px is implausible "
                             "(the boundary band is a few px wide)")

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PolygonizeConfig:
        """Build from a dict; unknown keys are an error naming them (typos must not pass)."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown polygonize setting(s) {unknown}; known: {sorted(known)}")
        values: dict[str, Any] = {}
        for k, v in d.items():
            if k == "seedless":
                if not isinstance(v, bool):
                    raise ValueError(f"seedless={v!r} is not true or false")
                values[k] = v
            elif isinstance(v, bool) or not isinstance(v, int | float):
                raise ValueError(f"{k}={v!r} is not a number")
            else:
                values[k] = float(v)
        return cls(**values)

    @classmethod
    def from_json(cls, path_or_text: str | Path) -> PolygonizeConfig:
        """Load a ``postproc.json`` (a path, or the JSON text itself); errors name the file."""
        text, where = str(path_or_text), "settings"
        if not text.lstrip().startswith("{"):
            path = Path(path_or_text)
            where = str(path)
            try:
                text = path.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as e:
                raise ValueError(f"{path}: cannot read settings ({e})") from None
        try:
            d = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"{where}: not valid JSON ({e})") from None
        if not isinstance(d, dict):
            raise ValueError(f"{where}: settings must be a JSON object")
        try:
            return cls.from_dict(d)
        except (ValueError, TypeError) as e:
            raise ValueError(f"{where}: {e}") from None


@dataclass
class Instances:
    """The blobs of one tile in the kernels' padded layout (see ``postproc.label``)."""

    shape: tuple[int, int]
    codes: np.ndarray
    lab: np.ndarray
    final: np.ndarray
    n: int
    first: np.ndarray
    count: np.ndarray  # pixels per blob (index 0 unused)
    fsum: np.ndarray  # sum of min(255, building + boundary) per blob

    def labels(self) -> np.ndarray:
        """Compact int32 label raster (1..n, 0 = none), HxW, for inspection and tests."""
        h, w = self.shape
        inblob = self.codes >= label.SEED
        out = np.where(inblob, self.final[np.where(inblob, self.lab, 0)], 0).astype(np.int32)
        return out.reshape(h + 2, w + 2)[1:-1, 1:-1].copy()


def _thresholds_u8(cfg: PolygonizeConfig) -> tuple[float, float]:
    # p = u8 / 255, so p > t  <=>  u8 > 255 t; the sum of two channels compares the same way.
    return 255.0 * cfg.building_threshold, 255.0 * cfg.footprint_threshold


def _growth(cfg: PolygonizeConfig) -> tuple[int, int, int, int]:
    """``find_blobs``' seed and eligible thresholds (uint8), squared radius and layers."""
    seed_t, fp_t = _thresholds_u8(cfg)
    r2 = int(math.floor(cfg.grow_radius * cfg.grow_radius + 1e-9))  # d2 is an integer
    # a pixel within Euclidean r can be up to r*sqrt(2) 4-steps away from its seed
    layers = int(math.floor(cfg.grow_radius * math.sqrt(2.0))) + 1 if r2 > 0 else 0
    return int(seed_t), int(fp_t), r2, layers


class Workspace:
    """Scratch buffers for one tile size, reused across tiles (one per thread).

    NOTE: fresh multi-MB buffers per tile cost more than the kernels themselves (page faults on
    every call); reusing them keeps a 650x650 tile at a few ms.
    """

    def __init__(self, height: int, width: int) -> None:
        if not (0 < height < 2**15 and 0 < width < 2**15):
            raise ValueError(f"tile of {height}x{width} px is outside 1..32767 px per side")
        n = height * width
        # NOTE: blobs of equal values (polygonize_labels) can be one pixel each: n, not n / 2
        cap = n + 2
        padded = (height + 2) * (width + 2)
        self.shape = (height, width)
        # NOTE: the zero border of codes is never written, so it stays "nothing" for good.
        self.codes = np.zeros(padded, np.uint8)
        self.lab = np.zeros(padded, np.int32)
        i32 = np.int32
        # union-find parent, first pixel, pixel count and confidence sum per provisional label
        # (see blobs.find_blobs; label.label_values takes the first three)
        self.uf = (np.empty(cap, i32), np.empty(cap, np.int64), np.empty(cap, np.int64),
                   np.empty(cap, np.int64))
        runs = n // 2 + height + 2  # row runs of eligible pixels (see label.row_runs)
        self.runs = (np.empty(runs, i32), np.empty(runs, i32), np.empty(runs, i32),
                     np.empty(runs, i32), np.empty(runs, np.uint8))
        self.stack = np.empty(n, i32)  # label.seedless's flood fill
        # one row of classes and one of growth's first layer (zero past the width: scanned 8 px
        # at a time), one row's seed runs, and seed segments of two rows (see blobs.find_blobs)
        row8 = (width // 8 + 2) * 8
        seg = width + 1
        self.rows = (np.zeros(row8, np.uint8), np.zeros(row8, np.uint8),
                     (np.empty(seg, i32), np.empty(seg, i32)),
                     (np.empty(seg, i32), np.empty(seg, i32), np.empty(seg, i32)),
                     (np.empty(seg, i32), np.empty(seg, i32), np.empty(seg, i32)))
        self._queue: tuple[np.ndarray, np.ndarray] | None = None

    def queue(self, layers: int) -> tuple[np.ndarray, ...]:
        """Growth's state for at least ``layers`` layers (see ``grow.grow_row``): the queues
        (columns, counts) and the rows of best candidates."""
        if self._queue is None or self._queue[1].shape[0] < layers:
            layers = max(layers, 1)
            ring, wp = grow.RING, self.shape[1] + 2
            # NOTE: each queued pixel's best candidate so far, one int64 (see grow.grow_row),
            # in a ring of rows small enough to stay in cache; grow_radius <= 50 keeps the
            # seed offsets in a byte each
            rows = 1 << (2 * layers + 3).bit_length()  # >= 2 * layers + 4 rows, a power of two
            self._queue = (np.empty((layers, ring, self.shape[1] + 1), np.int32),
                           np.zeros((layers, ring), np.int64), np.empty(rows * wp, np.int64))
        return self._queue


_local = threading.local()


def _workspace(height: int, width: int) -> Workspace:
    ws = getattr(_local, "ws", None)
    if ws is None or ws.shape != (height, width):
        ws = _local.ws = Workspace(height, width)
    return ws


def find_instances(prob: np.ndarray, cfg: PolygonizeConfig) -> Instances:
    """Seeds, labelled and grown (see the module doc). ``prob``: HxWx3, uint8 or float.

    The returned rasters live in this thread's workspace: valid until its next call.
    """
    q = np.ascontiguousarray(quantize_probs(prob))
    ws = _workspace(q.shape[0], q.shape[1])
    seed_t, fp_t, r2, layers = _growth(cfg)
    nprov, nrun = blobs.find_blobs(q, seed_t, fp_t, r2, layers, (ws.codes, ws.lab), ws.uf,
                                   ws.runs, ws.rows, ws.queue(layers))
    final, n, first, count, fsum = label.finish(*ws.uf, nprov)
    if cfg.seedless and nrun > 0:
        final, first, count, fsum, n = label.seedless(
            q, ws.codes, ws.lab, (final, first, count, fsum), n, ws.runs, nrun, r2, ws.stack)
    return Instances(q.shape[:2], ws.codes, ws.lab, final, n, first, count, fsum)


def polygons_from_instances(inst: Instances, min_area: float = 0.0
                            ) -> tuple[np.ndarray, np.ndarray]:
    """Trace blobs into shapely polygons; returns (polygons, blob ids), in blob order."""
    coords, ring_off, poly_off, ids = trace.trace_blobs(
        inst.codes, inst.lab, inst.final, inst.n, inst.first, inst.count, inst.shape[1],
        float(min_area))
    if ids.size == 0:
        return np.empty(0, object), ids
    polys = shapely.from_ragged_array(shapely.GeometryType.POLYGON, coords, (ring_off, poly_off))
    return polys, ids


def polygonize_labels(values: np.ndarray, min_area: float = 0.0) -> list[Polygon]:
    """GDAL-style polygonize of an integer raster: one polygon per 4-connected blob of equal
    non-zero value, traced along pixel edges, in raster order of each blob's first pixel."""
    values = np.ascontiguousarray(values)
    if values.ndim != 2:
        raise ValueError(f"expected a 2-D raster, got shape {values.shape}")
    if values.dtype == bool:
        values = values.view(np.uint8)
    ws = _workspace(values.shape[0], values.shape[1])
    final, n, first, count = label.label_values(values, ws.codes, ws.lab, ws.uf)
    inst = Instances(values.shape, ws.codes, ws.lab, final, n, first, count, np.zeros_like(count))
    return list(polygons_from_instances(inst, min_area)[0])


def _simplify(polys: np.ndarray, tolerance: float) -> np.ndarray:
    out = shapely.simplify(polys, tolerance, preserve_topology=True)
    bad = ~shapely.is_valid(out)
    for i in np.flatnonzero(bad):
        # NOTE: simplify keeps topology per ring, not between rings; repair the rare overlap and
        # keep the largest part so each instance stays one Polygon.
        fixed = shapely.make_valid(out[i])
        parts = [g for g in shapely.get_parts(fixed) if isinstance(g, Polygon) and g.area > 0]
        out[i] = max(parts, key=lambda g: g.area) if parts else polys[i]
    return out


def polygonize_probs(prob: np.ndarray, cfg: PolygonizeConfig | None = None
                     ) -> list[tuple[Polygon, float]]:
    """Footprints of one tile as (polygon in pixel coordinates, confidence), most confident first.

    Pure and cheap (a few ms per 650x650 tile): the trainer calls it on every validation tile.
    """
    cfg = cfg or PolygonizeConfig()
    q = np.ascontiguousarray(quantize_probs(prob))
    ws = _workspace(q.shape[0], q.shape[1])
    seed_t, fp_t, r2, layers = _growth(cfg)
    # NOTE: find_instances + polygons_from_instances in one numba call (see postproc.tilekernel)
    coords, ring_off, poly_off, conf, order = tilekernel.polygonize_tile(
        q, (seed_t, fp_t, r2, layers, cfg.seedless, float(cfg.min_polygon_area)),
        (ws.codes, ws.lab), ws.uf, ws.runs, ws.rows, ws.queue(layers), ws.stack)
    if order.size == 0:
        return []
    polys = shapely.from_ragged_array(shapely.GeometryType.POLYGON, coords, (ring_off, poly_off))
    if cfg.simplify_tolerance > 0:
        polys = _simplify(polys, cfg.simplify_tolerance)
    # NOTE: tolist() makes the Python objects in C; indexing element by element cost ~20 us a tile
    return list(zip(polys[order].tolist(), conf.tolist(), strict=True))


def warmup() -> None:
    """Compile (or load from the numba cache) every kernel, e.g. before forking workers or timing.

    The tile holds a blob with a hole, so the hole-tracing path is compiled too.
    """
    prob = np.zeros((8, 8, 3), np.uint8)
    prob[..., 0] = 255
    prob[1:7, 1:7] = (0, 255, 0)
    prob[3:5, 3:5] = (255, 0, 0)
    polygonize_probs(prob, PolygonizeConfig(min_polygon_area=0))
    polygonize_labels(prob[..., 1] > 0)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m postproc.polygonize",
        description="Building footprints from every prediction shard (pred-*.tar) of a directory: "
                    "a SpaceNet proposal CSV and optionally GeoJSON per tile. Also runs under "
                    "torchrun (ranks split the shards; rank 0 writes the CSV).")
    p.add_argument("--pred", type=Path, required=True, help="directory of pred-*.tar shards")
    p.add_argument("--out", type=Path, required=True, help="proposal CSV to write")
    p.add_argument("--geojson", type=Path, default=None,
                   help="also write <DIR>/<ImageId>.geojson in each tile's CRS (published "
                        "after the CSV; tiles an earlier run wrote there and this one did not "
                        "are removed, other files are left alone)")
    p.add_argument("--settings", type=Path, default=None,
                   help="postproc.json with PolygonizeConfig fields (flags below override it; "
                        "default: the run's tuned RUN/postproc.json, RUN named by "
                        "PRED/provenance.json)")
    p.add_argument("--no-tuned", action="store_true",
                   help="ignore the run's tuned postproc.json: defaults and flags only")
    d = PolygonizeConfig()
    # NOTE: a flag left out takes the settings' value (--settings, else the run's tuned
    # postproc.json), and only without one the dataclass default: the help once said
    # "default 20.0" where a tuned run polygonized at its own area.
    def default(value: object) -> str:
        return f"(default: the settings' value, else {value})"

    p.add_argument("--min-polygon-area", type=float, default=None,
                   help=f"drop blobs under this many px {default(d.min_polygon_area)}")
    p.add_argument("--building-threshold", type=float, default=None,
                   help=f"seed pixels: p(building) above this {default(d.building_threshold)}")
    p.add_argument("--footprint-threshold", type=float, default=None,
                   help="growable pixels: p(building) + p(boundary) above this "
                        f"{default(d.footprint_threshold)}")
    p.add_argument("--grow-radius", type=float, default=None,
                   help=f"grow instances this many px over the band {default(d.grow_radius)}")
    p.add_argument("--simplify", type=float, default=None, dest="simplify_tolerance",
                   help="simplify polygons with this tolerance in px "
                        f"{default('0: exact edges')}")
    p.add_argument("--no-seedless", action="store_false", dest="seedless", default=None,
                   help="drop components without any building-class pixel instead of eroding "
                        "them into instances")
    p.add_argument("--workers", type=int, default=None,
                   help="worker processes per rank (default: this rank's share of the cores)")
    from postproc.cli import add_push_args

    add_push_args(p, job="footprints_polygonize")
    return p


def config_from_args(args: argparse.Namespace, announce: bool = True) -> PolygonizeConfig:
    """Settings file first (``--settings``, else the run's tuned one), then any flag given."""
    settings = args.settings
    if settings is None and not args.no_tuned:
        from postproc.provenance import tuned_settings

        settings, run = tuned_settings(args.pred)
        if announce and settings is not None:
            print(f"polygonize: tuned settings {settings} (the run in {args.pred}/provenance.json;"
                  " --settings or --no-tuned to change)", file=sys.stderr)
        elif announce and run is not None:
            print(f"polygonize: default settings ({run} has no postproc.json; "
                  "python -m postproc.tune writes it)", file=sys.stderr)
    base = asdict(PolygonizeConfig.from_json(settings)) if settings else {}
    for name in ("min_polygon_area", "building_threshold", "footprint_threshold",
                 "grow_radius", "simplify_tolerance", "seedless"):
        v = getattr(args, name)
        if v is not None:
            base[name] = v
    return PolygonizeConfig.from_dict(base)


def _check_apart(out: Path, geojson: Path) -> None:
    """Refuse a CSV and a GeoJSON directory that would collide: found only after the work, the
    CSV's commit failed ("Is a directory") when --geojson was --out or under it, leaving that
    directory with a publish mark; and a tile's GeoJSON replaced an --out named like one."""
    from dataio.atomic import resolved

    csv, gj = resolved(out, "--out"), resolved(geojson, "--geojson")
    if csv == gj or csv in gj.parents:
        raise ValueError(f"--geojson {geojson} is --out {out} or under it; give the CSV and "
                         "the GeoJSON directory paths apart")
    if csv.parent == gj and csv.suffix.lower() == ".geojson":
        raise ValueError(f"--out {out} is named like a tile's GeoJSON in --geojson {geojson}, "
                         "which the tile would replace; give the CSV another name")


def _inputs(args: argparse.Namespace) -> Iterator[tuple[str, Path | None]]:
    """The files the command reads, which its outputs must not replace: --settings, and --pred's
    shards and provenance (lazily: ``check_writable`` lists them only for an existing --out)."""
    from postproc.predio import SHARD_GLOB
    from postproc.provenance import PROVENANCE

    yield "--settings", args.settings
    if args.pred.is_dir():
        yield "--pred", args.pred / PROVENANCE
        yield from (("--pred", p) for p in args.pred.glob(SHARD_GLOB))


def main(argv: list[str] | None = None) -> int:
    t0 = time.monotonic()
    args = build_parser().parse_args(argv)
    from dataio.atomic import check_writable, discard_staging_dir, missing_dirs, resolved
    from postproc import runner
    from postproc.predio import list_pred_shards
    from trainer import dist

    env = dist.DistEnv.from_env()
    cfg = config_from_args(args, announce=env.is_main)
    check_writable(args.out, "--out", _inputs(args))
    if args.geojson is not None:
        check_writable(args.geojson / "x.geojson", "--geojson", given=args.geojson)
        # NOTE: the GeoJSON publish marks its directory (predio.begin_publish): in --pred, a run
        # cut short (a full disk at the CSV's commit, a kill) left the prediction refused, with
        # "rerun trainer.predict", though its shards were whole, and a rerun here was refused.
        if resolved(args.geojson, "--geojson") == resolved(args.pred, "--pred"):
            raise ValueError(f"--geojson {args.geojson} is the --pred directory; give the "
                             "GeoJSON a directory of its own")
        _check_apart(args.out, args.geojson)
        runner.check_geojson_marks(args.geojson)
    if args.workers is not None and args.workers < 1:
        raise ValueError(f"--workers {args.workers} must be at least 1")
    workers = args.workers or runner.default_workers(env.local_world_size)
    shards = list_pred_shards(args.pred)
    geojson_made = [] if args.geojson is None else missing_dirs(args.geojson)
    pool = runner.make_pool(workers)  # NOTE: fork before the process group starts its threads
    try:
        try:
            env = dist.init(env)
            try:
                summary = runner.run(shards, args.out, cfg, args.geojson, workers, env, pool)
                # NOTE: said while the ranks are together (on_main): a closed stdout on rank 0
                # (| head -0) then stops every rank with exit 1 (postproc.cli.end_quietly),
                # where rank 0 alone exited 1. Flushed here: a worker's stdout is buffered
                # where the launcher gives no -u (torchrun --no-python python -m ...)
                dist.on_main(env, "reporting", lambda: _push_and_report(args, summary, t0))
            finally:
                dist.teardown()
        finally:
            close_pool(pool)
    except BaseException:
        # NOTE: as trainer.predict does with its stage: an error or a Ctrl-C left DIR/.partial
        # (and a DIR made for it). Removed once the pool is closed: its workers write there.
        if env.is_main and args.geojson is not None:
            discard_staging_dir(args.geojson, geojson_made)
        raise
    return 0


def _push_and_report(args: argparse.Namespace, summary: RunSummary, t0: float) -> None:
    """Rank 0's end: the metrics pushed (``--pushgateway``), then the report line.

    NOTE: pushed first: the CSV and GeoJSON are complete here, and a closed stdout (| head -0)
    at the report, which ends quietly with 1, skipped the push of a finished run. (A push
    bounded by its timeout, postproc.pushmetrics.PUSH_TIMEOUT_S, while the ranks wait.)"""
    from postproc.cli import push_metrics, report
    from postproc.pushmetrics import PostprocRun

    push_metrics(args, PostprocRun(summary.tiles, summary.polygons, time.monotonic() - t0))
    report(f"{summary.tiles} tiles, {summary.polygons} polygons from {summary.shards} shards "
           f"-> {args.out}")


if __name__ == "__main__":
    from postproc.cli import exit_on_error

    sys.exit(exit_on_error(main))
