"""SpaceNet naming and CSV conventions (SpaceNet-2 layout, as downloaded)."""

from __future__ import annotations

from pathlib import Path

from shapely.geometry import Polygon

IMAGE_DIR = "RGB-PanSharpen"
IMAGE_PREFIX = "RGB-PanSharpen_"
LABEL_DIR = Path("geojson") / "buildings"
TRUTH_HEADER = ["ImageId", "BuildingId", "PolygonWKT_Pix", "PolygonWKT_Geo"]
PROPOSAL_HEADER = ["ImageId", "BuildingId", "PolygonWKT_Pix", "Confidence"]
EMPTY = "POLYGON EMPTY"
# Present in an AOI directory while dataio.synth writes it: an AOI with it is incomplete.
INCOMPLETE_MARKER = ".synth-incomplete"


def image_id_of(tif: Path) -> str:
    """``RGB-PanSharpen_AOI_2_Vegas_img1.tif`` -> ``AOI_2_Vegas_img1``."""
    name = tif.name
    if not (name.startswith(IMAGE_PREFIX) and name.lower().endswith((".tif", ".tiff"))):
        raise ValueError(f"{tif}: not named {IMAGE_PREFIX}<ImageId>.tif")
    return name[len(IMAGE_PREFIX):].rsplit(".", 1)[0]


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
