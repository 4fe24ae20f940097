"""Chip geometry for ``dataio.prepare --images-only --chip-size N``: a scene cut into a grid.

Per axis of L px, the scene is cut into n = max(1, round(L / N)) chips (a half rounds up),
starting at 0, N, ..., (n - 1)N: every chip is N px but the last row and column, which take the
rest, between N/2 (inclusive) and 1.5N (exclusive) px; only a scene under N/2 px gives a smaller
chip (itself). NOTE: the rest is never a thin chip of its own: a 1 px wide chip is predicted from
almost no context and is garbage at both its edges. Chips are never shifted back to overlap
their neighbours: ``postproc.merge`` joins footprints of tiles that meet edge to edge, and
``trainer.predict`` runs each tile size on its own. A scene that gives one chip both ways (each
side under 1.5N px) stays whole.

With ``--chip-margin M`` a chip's sample is its window grown by M px on each side, clipped to the
scene (no padding: the net pads a tile itself), so the pixels near its edges are predicted with
the context beyond them; ``trainer.predict`` cuts each prediction back to the chip (its *core*),
so what ``postproc`` sees are still chips that meet edge to edge. NOTE: M defaults to 64 px, a
multiple of the U-Nets' 16x downsampling (four poolings, ``UNet.multiple``): with N one too, a
sample starts on the scene's 16 px grid, as the whole scene's pooling windows do where its sides
are multiples of 16 px (the net pads other sizes, centred).

A chip's ImageId is ``<ImageId>_r<row0>_c<col0>``, its pixel offset in the scene. Read from the
right, the suffix gives back one scene and offset, so chips of two scenes never share an ImageId;
only a scene whose own ImageId looks like a chip's can clash with one (prepare's scan checks).

A chip whose own pixels (not its margin's) are all nodata by the scene's dataset mask
(:func:`core_is_nodata`) is left out: a satellite strip or an orthomosaic has wide borders of
nodata, and predicting them is GPU time for nothing.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
from rasterio.enums import ColorInterp, MaskFlags
from rasterio.errors import NodataShadowWarning
from rasterio.io import DatasetReader
from rasterio.windows import Window

# NOTE: a chip much smaller than the network's receptive field predicts from little context, and
# the U-Nets downsample 16x; 64 px is a floor against a typo (--chip-size 5), not a guide.
MIN_CHIP_SIZE = 64
DEFAULT_CHIP_MARGIN = 64  # px of context on each side of a chip (see above)


@dataclass(frozen=True)
class Chip:
    """One chip's pixel window in its scene (rows ``row0:row0+height``, cols ``col0:...``)."""

    row0: int
    col0: int
    height: int
    width: int

    def window(self) -> Window:
        return Window(self.col0, self.row0, self.width, self.height)

    def span(self) -> str:
        """Its pixels in words, for messages: ``rows 128-199 and columns 0-127``."""
        return (f"rows {self.row0}-{self.row0 + self.height - 1} and columns "
                f"{self.col0}-{self.col0 + self.width - 1}")

    def image_id(self, scene_id: str) -> str:
        return f"{scene_id}_r{self.row0}_c{self.col0}"

    def grown(self, margin: int, height: int, width: int) -> Chip:
        """This window grown by ``margin`` px on each side, clipped to a ``height`` x ``width``
        scene: the pixels of its sample with ``--chip-margin``."""
        r0, c0 = max(0, self.row0 - margin), max(0, self.col0 - margin)
        r1 = min(height, self.row0 + self.height + margin)
        c1 = min(width, self.col0 + self.width + margin)
        return Chip(r0, c0, r1 - r0, c1 - c0)

    def core_in(self, window: Chip) -> list[int]:
        """Where this chip lies in ``window`` (its grown window): [row_off, col_off, height,
        width], the ``core`` of its sample's meta.json."""
        return [self.row0 - window.row0, self.col0 - window.col0, self.height, self.width]


def check_chip_size(size: int) -> int:
    """``size`` if it is a usable --chip-size, else ValueError naming the flag."""
    if isinstance(size, bool) or not isinstance(size, int) or size < MIN_CHIP_SIZE:
        raise ValueError(f"--chip-size must be an integer >= {MIN_CHIP_SIZE} px, got {size!r}")
    return size


def check_chip_margin(margin: int, size: int) -> int:
    """``margin`` if it is a usable --chip-margin for --chip-size ``size``, else ValueError."""
    # NOTE: a margin wider than the chip makes a sample mostly context (at M = N, 9x the chip's
    # pixels to predict); more than that is a typo, not a setting
    if (isinstance(margin, bool) or not isinstance(margin, int)
            or not 0 <= margin <= size):
        raise ValueError(f"--chip-margin must be a whole number of px from 0 to the --chip-size "
                         f"({size}), got {margin!r}")
    return margin


def chip_count(length: int, size: int) -> int:
    """How many chips an axis of ``length`` px is cut into: max(1, floor(length / size + 0.5))."""
    return max(1, (2 * length + size) // (2 * size))  # (in integers: no float rounding at 1.5N)


def _starts(length: int, size: int) -> list[tuple[int, int]]:
    """(offset, extent) of the chips along one axis; the last takes the rest."""
    n = chip_count(length, size)
    return [(i * size, size if i < n - 1 else length - i * size) for i in range(n)]


def needs_chips(height: int, width: int, size: int) -> bool:
    """Whether a scene of ``height`` x ``width`` px is cut at ``size`` (more than one chip)."""
    return chip_count(height, size) > 1 or chip_count(width, size) > 1


def chip_grid(height: int, width: int, size: int) -> list[Chip]:
    """The chips of a ``height`` x ``width`` scene, row by row from the top-left corner."""
    check_chip_size(size)
    if height < 1 or width < 1:
        raise ValueError(f"a scene of {height} x {width} px has no pixels to cut")
    return [Chip(r, c, h, w) for r, h in _starts(height, size) for c, w in _starts(width, size)]


def core_is_nodata(ds: DatasetReader, sample: np.ndarray, chip: Chip, window: Chip) -> bool:
    """Whether every pixel of ``chip`` is nodata in ``ds``'s dataset mask (rasterio's
    ``dataset_mask``: a pixel is valid where any band is; a nodata value, an alpha band, an
    internal or external mask); ``sample`` holds the pixels of ``window`` (bands first, as read),
    the chip's grown window or the chip itself. An image without nodata or mask: False.

    NOTE: with nodata values alone (the usual border of 0s) the mask is worked out from
    ``sample``, which was read anyway: no second read of the image. An alpha band or a mask is
    read for the chip alone; so is a nodata value that GDAL might compare otherwise (one the
    dtype cannot hold exactly), for GDAL's own answer."""
    flags = ds.mask_flag_enums
    if all(f == [MaskFlags.all_valid] for f in flags):
        return False
    nodata = ds.nodatavals
    if (all(f == [MaskFlags.nodata] for f in flags) and ColorInterp.alpha not in ds.colorinterp
            and all(_holds(v, dt) for v, dt in zip(nodata, ds.dtypes, strict=True))):
        r, c, h, w = chip.core_in(window)
        core = sample[:, r:r + h, c:c + w]
        return bool((core == np.array(nodata, sample.dtype)[:, None, None]).all())
    # (nodata beside an alpha band: rasterio warns that it takes the nodata, and does)
    with warnings.catch_warnings(action="ignore", category=NodataShadowWarning):
        return not ds.dataset_mask(window=chip.window()).any()


def _holds(value: float | None, dtype: str) -> bool:
    """Whether an integer ``dtype`` holds the nodata ``value`` exactly."""
    if value is None or not float(value).is_integer() or not np.issubdtype(dtype, np.integer):
        return False
    info = np.iinfo(dtype)
    return info.min <= value <= info.max
