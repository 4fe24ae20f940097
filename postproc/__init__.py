"""Prediction shards -> building footprints -> SpaceNet F1 (issue 6).

- ``predio``: prediction shards (``pred-NNNNNN.tar``: ``prob.png`` + ``meta.json``).
- ``polygonize``: instances from class probabilities, exact polygons; CLI.
- ``score``: the SpaceNet F1; CLI. ``csvio``: the truth and proposal CSVs.
- ``label``, ``grow``, ``trace``, ``iou``, ``pngfast``: the numba kernels behind them;
  ``blobs`` and ``tilekernel`` drive them (one sweep down a tile; one call per tile).
- ``runner``: all cores and torchrun ranks over a directory of shards. ``geojson``: GeoJSON output.
- ``merge``: the tiles' GeoJSON as one WGS 84 layer, buildings cut by tile edges merged; CLI.
- ``mosaic``: the tiles' probabilities as one Cloud-Optimized GeoTIFF for GIS tools; CLI.
- ``synthmask``: synthetic masks with known footprints for tests and benchmarks.
- ``numbacache``: the kernels' ``njit`` (numba's cache written in turns, and stale when a
  module a kernel imports changes) and a cache directory where numba has none of its own.
"""

from postproc.numbacache import ensure_cache_dir

ensure_cache_dir()  # (before any kernel module imports numba)
