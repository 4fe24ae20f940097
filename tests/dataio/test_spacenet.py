"""dataio.spacenet: ImageIds from SpaceNet file names, polygons spelled as SpaceNet's CSVs do."""

from __future__ import annotations

from pathlib import Path

import pytest
import shapely
from shapely.geometry import Polygon

from dataio.spacenet import EMPTY, image_id_of, wkt_xyz


@pytest.mark.parametrize("name", ["RGB-PanSharpen_AOI_2_Vegas_img1.tif",
                                  "RGB-PanSharpen_AOI_2_Vegas_img1.TIF",  # prepare lists these
                                  "RGB-PanSharpen_AOI_2_Vegas_img1.tiff"])
def test_image_id_of_a_spacenet_tif(name: str) -> None:
    assert image_id_of(Path("raw") / name) == "AOI_2_Vegas_img1"


@pytest.mark.parametrize("name", ["AOI_2_Vegas_img1.tif", "RGB-PanSharpen_AOI_2_Vegas_img1.png"])
def test_other_names_are_refused_naming_the_file(name: str) -> None:
    with pytest.raises(ValueError, match=f"{name}: not named RGB-PanSharpen_<ImageId>.tif"):
        image_id_of(Path(name))


def test_wkt_keeps_holes_and_spells_a_zero_z() -> None:
    # a building around a courtyard: truth.csv without the hole would count the yard as roof
    yard = Polygon([(0, 0), (10, 0), (10, 10), (0, 10)], [[(3, 3), (7, 3), (7, 7), (3, 7)]])
    text = wkt_xyz(yard, 2)
    assert text.startswith("POLYGON ((0.00 0.00 0,10.00 0.00 0,")
    back = shapely.force_2d(shapely.from_wkt(text))
    assert back.equals(yard) and len(back.interiors) == 1 and back.area == 84.0
    assert wkt_xyz(Polygon(), 2) == EMPTY
