"""Chip geometry for ``dataio.prepare --images-only --chip-size N``: a scene cut into a grid.

A scene larger than N px in either dimension is cut into chips of N x N from its top-left
corner; the last row and column of chips hold the remainder (smaller), never shifted back to
overlap their neighbours: ``postproc.merge`` joins footprints of tiles that meet edge to edge,
and ``trainer.predict`` runs each tile size on its own. A scene of at most N x N stays whole.

A chip's ImageId is ``<ImageId>_r<row0>_c<col0>``, its pixel offset in the scene. Read from the
right, the suffix gives back one scene and offset, so chips of two scenes never share an ImageId;
only a scene whose own ImageId looks like a chip's can clash with one (prepare's scan checks).
"""

from __future__ import annotations

from dataclasses import dataclass

from rasterio.windows import Window

# NOTE: a chip much smaller than the network's receptive field predicts from little context, and
# the U-Nets downsample 16-32x; 64 px is a floor against a typo (--chip-size 5), not a guide.
MIN_CHIP_SIZE = 64


@dataclass(frozen=True)
class Chip:
    """One chip's pixel window in its scene (rows ``row0:row0+height``, cols ``col0:...``)."""

    row0: int
    col0: int
    height: int
    width: int

    def window(self) -> Window:
        return Window(self.col0, self.row0, self.width, self.height)

    def image_id(self, scene_id: str) -> str:
        return f"{scene_id}_r{self.row0}_c{self.col0}"


def check_chip_size(size: int) -> int:
    """``size`` if it is a usable --chip-size, else ValueError naming the flag."""
    if isinstance(size, bool) or not isinstance(size, int) or size < MIN_CHIP_SIZE:
        raise ValueError(f"--chip-size must be an integer >= {MIN_CHIP_SIZE} px, got {size!r}")
    return size


def needs_chips(height: int, width: int, size: int) -> bool:
    """Whether a scene of ``height`` x ``width`` px is cut at ``size`` (larger either way)."""
    return height > size or width > size


def chip_grid(height: int, width: int, size: int) -> list[Chip]:
    """The chips of a ``height`` x ``width`` scene, row by row from the top-left corner."""
    check_chip_size(size)
    if height < 1 or width < 1:
        raise ValueError(f"a scene of {height} x {width} px has no pixels to cut")
    return [Chip(r, c, min(size, height - r), min(size, width - c))
            for r in range(0, height, size) for c in range(0, width, size)]
