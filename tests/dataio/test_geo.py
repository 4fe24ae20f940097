"""dataio.geo: pixel <-> CRS mapping through the full geotransform, and which geotransforms can be
inverted at all."""

from __future__ import annotations

import numpy as np
import shapely
from affine import Affine

from dataio.geo import is_invertible, to_geo, to_pixel

# A rotated and sheared UTM grid: every term of the geotransform matters (a north-up one has
# b = d = 0 and would hide a mix-up of the two).
ROTATED = (Affine.translation(500_000.0, 4_000_000.0) @ Affine.rotation(30.0)
           @ Affine.shear(5.0, 0.0) @ Affine.scale(0.3, -0.3))


def test_to_pixel_and_to_geo_apply_the_whole_geotransform() -> None:
    pixels = np.array([[0.0, 0.0], [10.0, 20.0], [650.0, 3.5]])
    geo = np.array([ROTATED @ (float(x), float(y)) for x, y in pixels])  # affine's own product
    line = shapely.LineString(pixels)
    np.testing.assert_allclose(shapely.get_coordinates(to_geo(line, ROTATED)), geo, atol=1e-6)
    np.testing.assert_allclose(shapely.get_coordinates(to_pixel(shapely.LineString(geo), ROTATED)),
                               pixels, atol=1e-6)


def test_a_geotransform_whose_inverse_overflows_is_not_invertible() -> None:
    assert is_invertible(ROTATED)
    assert not is_invertible(Affine(0.0, 0.0, 500_000.0, 0.0, -0.3, 4_000_000.0))  # degenerate
    # a determinant of -1e-320 is not 0, but the inverse's offsets are infinite: GEOS refuses
    # such coordinates much later, with no file named
    assert not is_invertible(Affine(1e-160, 0.0, 1e300, 0.0, -1e-160, 0.0))
