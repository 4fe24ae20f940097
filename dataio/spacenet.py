"""SpaceNet naming and CSV conventions (SpaceNet-2 layout, as downloaded)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    # NOTE: for the annotation alone: dataio.manifest (so every reader of a dataset: the loaders,
    # trainer.predict, the validator) imports this module for the product names, and a shapely
    # import there cost them ~0.4 s (dataio.classes' reason)
    from shapely.geometry import Polygon

# The imagery products prepare reads (--product), each with its bands and the three of them
# (1-based) that a picture shows as red, green, blue. Both lie on the same 650x650 grid with the
# same ImageIds, so labels, truth CSVs and predictions do not depend on the product.
# NOTE: MUL-PanSharpen's bands are WorldView-2's: 1 coastal, 2 blue, 3 green, 4 yellow, 5 red,
# 6 red edge, 7 NIR1, 8 NIR2 (SpaceNet-2's README); its true-colour composite is 5, 3, 2.
PRODUCTS: dict[str, tuple[str, ...]] = {
    "RGB-PanSharpen": ("red", "green", "blue"),
    "MUL-PanSharpen": ("coastal", "blue", "green", "yellow", "red", "red edge", "nir1", "nir2"),
}
RGB_BANDS: dict[str, tuple[int, int, int]] = {"RGB-PanSharpen": (1, 2, 3),
                                              "MUL-PanSharpen": (5, 3, 2)}
DEFAULT_PRODUCT = "RGB-PanSharpen"
# Every imagery folder a SpaceNet-2 AOI ships (MUL and PAN lie on other grids: not read)
SPACENET_PRODUCTS = ("RGB-PanSharpen", "MUL-PanSharpen", "MUL", "PAN")
IMAGE_DIR = DEFAULT_PRODUCT
IMAGE_PREFIX = f"{DEFAULT_PRODUCT}_"
LABEL_DIR = Path("geojson") / "buildings"
TRUTH_HEADER = ["ImageId", "BuildingId", "PolygonWKT_Pix", "PolygonWKT_Geo"]
PROPOSAL_HEADER = ["ImageId", "BuildingId", "PolygonWKT_Pix", "Confidence"]
EMPTY = "POLYGON EMPTY"
# Present in an AOI directory while dataio.synth writes it: an AOI with it is incomplete.
INCOMPLETE_MARKER = ".synth-incomplete"


def image_prefix(product: str = DEFAULT_PRODUCT) -> str:
    """``MUL-PanSharpen`` -> ``MUL-PanSharpen_``: how its files are named in its folder."""
    return f"{product}_"


def image_id_of(tif: Path, product: str = DEFAULT_PRODUCT) -> str:
    """``RGB-PanSharpen_AOI_2_Vegas_img1.tif`` -> ``AOI_2_Vegas_img1`` (``MUL-PanSharpen_...``
    with ``product="MUL-PanSharpen"``)."""
    name, prefix = tif.name, image_prefix(product)
    if not (name.startswith(prefix) and name.lower().endswith((".tif", ".tiff"))):
        raise ValueError(f"{tif}: not named {prefix}<ImageId>.tif")
    return name[len(prefix):].rsplit(".", 1)[0]


def rgb_composite(product: str, bands: int) -> tuple[int, int, int]:
    """The bands (1-based) a picture of ``product`` shows as red, green, blue: the product's
    own (MUL-PanSharpen: 5, 3, 2), else the first three, or band 1 as grey below three."""
    own = RGB_BANDS.get(product)
    if own is not None and max(own) <= bands:
        return own
    return (1, 2, 3) if bands >= 3 else (1, 1, 1)


def products_in(raw: Path) -> list[str]:
    """The SpaceNet imagery folders that ``raw`` holds (for an error that names them)."""
    return [p for p in SPACENET_PRODUCTS if (raw / p).is_dir()]


def label_path(raw: Path, image_id: str) -> Path:
    return raw / LABEL_DIR / f"buildings_{image_id}.geojson"


def wkt_xyz(poly: Polygon, precision: int) -> str:
    """WKT with a zero z coordinate and no Z tag, as SpaceNet's CSVs spell polygons."""
    if poly.is_empty:
        return EMPTY
    parts = []
    for ring in (poly.exterior, *poly.interiors):
        coords = ",".join(f"{x:.{precision}f} {y:.{precision}f} 0" for x, y in ring.coords)
        parts.append(f"({coords})")
    return f"POLYGON ({','.join(parts)})"
