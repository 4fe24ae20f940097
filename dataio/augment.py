"""Training augmentation and normalisation, defined once for both backends.

Every random number is drawn here, per epoch and per sample id, from ``SeedSequence([seed, epoch,
1])``; the backends only apply the result. So the same seed gives the same augmented stream, a
restored position gives the same remaining batches, and DALI and torch give the same tensors for
the same sample even with augmentation on.

Per sample, in this order (the mask follows every geometric step exactly, nearest neighbour):
  1. crop rows ``ay:ay+ch`` and columns ``ax:ax+cw`` (``ch = min(crop, H)``; whole tile if 0),
  2. vertical flip ``v``, 3. horizontal flip ``h``, 4. transpose of H and W ``t``.
``flip`` draws ``v``, ``h``; ``rot90`` alone draws one of the four rotations (rot90 = t+h,
rot180 = h+v, rot270 = t+v); both together give all eight symmetries of the square.
  5. brightness ``b`` and contrast ``k`` on the 16-bit values, per band around the middle ``c`` of
     its [p2, p98] range: ``y = b * (c + k * (x - c))``,
  6. normalisation: ``clip((y - p2) / (p98 - p2), 0, 1)`` with the manifest's percentiles.
Steps 5 and 6 fold into one affine map per band, ``(x - mean) / std`` then clip, which is what
DALI's ``crop_mirror_normalize`` computes in a single pass.
Tiles smaller than the crop are padded at the bottom/right after step 4 (image 0, mask ignored).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from dataio.sharding import epoch_seed

MASK_PAD = 255  # mask value of padded pixels in uint8; the loader turns it into IGNORE_INDEX

# The four rotations as (h, v, t): 0, 90, 180 and 270 degrees.
_ROTATIONS = np.array([[0, 0, 0], [1, 0, 1], [1, 1, 0], [0, 1, 1]], dtype=np.uint8)


@dataclass(frozen=True)
class AugSpec:
    """What augmentation a training loader applies (``None`` in its place: evaluation)."""

    crop: int = 512
    flip: bool = True
    rot90: bool = True
    brightness: float = 0.1
    contrast: float = 0.1

    def __post_init__(self) -> None:
        if self.crop < 0:
            raise ValueError(f"data.crop_size must be >= 0 (0 = whole tiles), got {self.crop}")
        for name in ("brightness", "contrast"):
            value = getattr(self, name)
            if not 0.0 <= value < 1.0:
                raise ValueError(f"data.{name} must be in [0, 1) (max relative change), "
                                 f"got {value}")


@dataclass(frozen=True)
class Draws:
    """One epoch's random numbers, one row per sample id."""

    u: np.ndarray  # (N, 2) crop position in [0, 1): y, x
    hvt: np.ndarray  # (N, 3) uint8 flags
    bk: np.ndarray  # (N, 2) brightness and contrast factors

    @classmethod
    def draw(cls, n: int, seed: int, epoch: int, spec: AugSpec | None) -> Draws | None:
        if spec is None:
            return None
        rng = epoch_seed(seed, epoch, 1)
        u = rng.random((n, 2))
        flips = rng.integers(0, 2, (n, 3), dtype=np.uint8)
        rot = _ROTATIONS[rng.integers(0, 4, n)]
        if spec.flip and spec.rot90:
            hvt = flips
        elif spec.rot90:
            hvt = rot
        else:
            hvt = flips * np.array([1, 1, 0], np.uint8) if spec.flip else np.zeros_like(flips)
        bk = 1.0 + (rng.random((n, 2)) * 2.0 - 1.0) * [spec.brightness, spec.contrast]
        return cls(u, hvt, bk)


@dataclass(frozen=True)
class Geometry:
    """A sample's resolved geometric transform (see the module docstring for the order)."""

    ay: int
    ax: int
    ch: int
    cw: int
    h: bool
    v: bool
    t: bool
    height: int  # the tile's
    width: int

    @classmethod
    def resolve(cls, height: int, width: int, spec: AugSpec | None, draws: Draws | None,
                i: int) -> Geometry:
        if spec is None or draws is None:
            return cls(0, 0, height, width, False, False, False, height, width)
        ch = min(spec.crop, height) if spec.crop else height
        cw = min(spec.crop, width) if spec.crop else width
        ay = int(draws.u[i, 0] * (height - ch + 1))
        ax = int(draws.u[i, 1] * (width - cw + 1))
        h, v, t = (bool(x) for x in draws.hvt[i])
        return cls(ay, ax, ch, cw, h, v, t, height, width)

    @property
    def out_shape(self) -> tuple[int, int]:
        return (self.cw, self.ch) if self.t else (self.ch, self.cw)

    @property
    def mask_y(self) -> int:
        """Crop row in the vertically flipped full mask (the mask is flipped before cropping)."""
        return self.height - self.ch - self.ay if self.v else self.ay

    def rel_x(self) -> float:
        """Column anchor normalised the way ``crop_mirror_normalize`` rounds it back."""
        return self.ax / (self.width - self.cw) if self.width > self.cw else 0.0

    def rel_mask_y(self) -> float:
        return self.mask_y / (self.height - self.ch) if self.height > self.ch else 0.0


class Normaliser:
    """Per-band affine map from the manifest percentiles, with optional brightness/contrast."""

    def __init__(self, p2: list[float], p98: list[float]) -> None:
        self.p2 = np.asarray(p2, np.float64)
        self.p98 = np.asarray(p98, np.float64)
        if np.any(self.p98 <= self.p2):
            raise ValueError(f"manifest percentiles need p98 > p2 per band, got {p2} / {p98}")
        self.centre = (self.p2 + self.p98) / 2.0

    @property
    def bands(self) -> int:
        return len(self.p2)

    def mean_std(self, b: float = 1.0, k: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
        """float32 (mean, std) with ``clip((x - mean) / std, 0, 1)`` = steps 5 and 6."""
        gain = b * k
        std = (self.p98 - self.p2) / gain
        mean = (self.p2 - b * self.centre * (1.0 - k)) / gain
        return mean.astype(np.float32), std.astype(np.float32)


def transform_image(rows: np.ndarray, g: Geometry, mean: np.ndarray, std: np.ndarray,
                    out: np.ndarray | None = None) -> np.ndarray:
    """Reference for the DALI graph: ``rows`` are the crop's rows, already in flipped order (as
    :mod:`dataio.reader` reads them); returns float32 CHW in [0, 1] (into ``out`` if given)."""
    y = rows[:, g.ax: g.ax + g.cw]
    if g.h:
        y = y[:, ::-1]
    chw = y.transpose(2, 1, 0) if g.t else y.transpose(2, 0, 1)
    if out is None:
        out = np.empty(chw.shape, np.float32)
    np.subtract(chw, mean[:, None, None], out=out, casting="unsafe")
    # NOTE: multiply by a float32 reciprocal, as crop_mirror_normalize does, so the two agree.
    out *= (np.float32(1.0) / std)[:, None, None]
    return np.clip(out, 0.0, 1.0, out=out)


def transform_mask(mask: np.ndarray, g: Geometry) -> np.ndarray:
    """Reference for the mask path: the full decoded mask (H, W) -> uint8 (out_shape)."""
    m = mask[::-1] if g.v else mask
    m = m[g.mask_y: g.mask_y + g.ch, g.ax: g.ax + g.cw]
    if g.h:
        m = m[:, ::-1]
    return np.ascontiguousarray(m.T if g.t else m)
