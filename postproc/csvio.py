"""SpaceNet CSV files: the ground truth and the proposals, read strictly and written atomically.

Truth: ``ImageId,BuildingId,PolygonWKT_Pix,PolygonWKT_Geo``; proposals:
``ImageId,BuildingId,PolygonWKT_Pix,Confidence``. A tile without buildings is one row with
BuildingId ``-1`` and ``POLYGON EMPTY``, so the tile is present but holds nothing. WKT may carry a
z coordinate (``POLYGON ((1 2 0, ...))``) as real SpaceNet files do; it is dropped. A malformed
row raises :class:`CsvError` naming the file and line.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import shapely
from shapely.geometry.base import BaseGeometry

TRUTH_COLUMNS = ("ImageId", "BuildingId", "PolygonWKT_Pix", "PolygonWKT_Geo")
PROPOSAL_COLUMNS = ("ImageId", "BuildingId", "PolygonWKT_Pix", "Confidence")
# NOTE: real SpaceNet WKT runs to tens of kB per field; the csv module's default cap is 128 kB.
csv.field_size_limit(1 << 28)


class CsvError(ValueError):
    """A CSV that cannot be scored; the message names the file and the line."""


@dataclass
class PolygonTable:
    """Polygons per ImageId, in file order; ``repaired`` counts invalid polygons made valid."""

    polygons: dict[str, list[BaseGeometry]] = field(default_factory=dict)
    confidence: dict[str, list[float]] = field(default_factory=dict)
    rows: int = 0
    repaired: int = 0


def _open_text(path: Path) -> io.TextIOBase:
    try:
        return open(path, newline="", encoding="utf-8-sig")  # noqa: SIM115 - closed by caller
    except FileNotFoundError:
        raise CsvError(f"{path}: file not found") from None
    except OSError as e:
        raise CsvError(f"{path}: cannot open ({e.strerror})") from None


def _header(reader: csv.reader, path: Path, need: tuple[str, ...]) -> dict[str, int]:
    try:
        head = next(reader)
    except StopIteration:
        raise CsvError(f"{path}: empty file (expected a header {','.join(need)})") from None
    except (csv.Error, UnicodeDecodeError) as e:
        raise CsvError(f"{path}:1: malformed header ({e})") from None
    cols = {name.strip(): i for i, name in enumerate(head)}
    missing = [c for c in need if c not in cols]
    if missing:
        raise CsvError(f"{path}:1: header lacks {', '.join(missing)} (has {', '.join(cols)}; "
                       f"want {','.join(need)})")
    return cols


def read_polygon_csv(path: str | Path, proposals: bool) -> PolygonTable:
    """Read a truth (``proposals=False``) or proposal CSV into a :class:`PolygonTable`."""
    path = Path(path)
    need = ("ImageId", "BuildingId", "PolygonWKT_Pix") + (("Confidence",) if proposals else ())
    ids: list[str] = []
    wkts: list[str] = []
    lines: list[int] = []
    confs: list[float] = []
    with _open_text(path) as f:
        reader = csv.reader(f)
        cols = _header(reader, path, need)
        width = max(cols[c] for c in need) + 1
        ci, cb, cw = cols["ImageId"], cols["BuildingId"], cols["PolygonWKT_Pix"]
        cc = cols.get("Confidence")
        line = reader.line_num
        try:
            for row in reader:
                line = reader.line_num
                if not row or (len(row) == 1 and not row[0].strip()):
                    continue  # a blank line
                if len(row) < width:
                    raise CsvError(f"{path}:{line}: expected {len(cols)} fields, got {len(row)}")
                if len(row) > len(cols):
                    raise CsvError(f"{path}:{line}: {len(row)} fields where the header has "
                                   f"{len(cols)} (is the WKT quoted?)")
                image_id = row[ci].strip()
                if not image_id:
                    raise CsvError(f"{path}:{line}: empty ImageId")
                try:
                    bid = int(float(row[cb]))
                except ValueError:
                    raise CsvError(f"{path}:{line}: BuildingId {row[cb]!r} is not a number") \
                        from None
                conf = 0.0
                if proposals and cc is not None:
                    try:
                        conf = float(row[cc])
                    except ValueError:
                        raise CsvError(f"{path}:{line}: Confidence {row[cc]!r} is not a "
                                       "number") from None
                ids.append(image_id)
                wkts.append(row[cw].strip() if bid != -1 else "POLYGON EMPTY")
                lines.append(line)
                confs.append(conf)
        except csv.Error as e:
            raise CsvError(f"{path}:{reader.line_num}: malformed CSV ({e})") from None
        except UnicodeDecodeError as e:
            raise CsvError(f"{path}:{line + 1}: not UTF-8 text ({e.reason})") from None
    return _build_table(path, ids, wkts, lines, confs)


def _polygonal(g: BaseGeometry) -> BaseGeometry:
    """The polygonal part of a (repaired) geometry; an empty polygon if there is none."""
    if g.geom_type in ("Polygon", "MultiPolygon"):
        return g
    parts = [p for p in shapely.get_parts(g) if p.geom_type in ("Polygon", "MultiPolygon")]
    return shapely.union_all(parts) if parts else shapely.Polygon()


def _build_table(path: Path, ids: list[str], wkts: list[str], lines: list[int],
                 confs: list[float]) -> PolygonTable:
    table = PolygonTable(rows=len(ids))
    if not ids:
        return table
    geoms = shapely.from_wkt(np.asarray(wkts, dtype=object), on_invalid="ignore")
    bad = np.flatnonzero(shapely.is_missing(geoms))
    if bad.size:
        i = int(bad[0])
        snippet = wkts[i] if len(wkts[i]) <= 60 else wkts[i][:57] + "..."
        raise CsvError(f"{path}:{lines[i]}: malformed WKT {snippet!r}")
    kinds = shapely.get_type_id(geoms)
    wrong = np.flatnonzero(~np.isin(kinds, (3, 6)) & ~shapely.is_empty(geoms))
    if wrong.size:
        i = int(wrong[0])
        raise CsvError(f"{path}:{lines[i]}: {geoms[i].geom_type} is not a footprint polygon")
    geoms = shapely.force_2d(geoms)
    invalid = np.flatnonzero(~shapely.is_valid(geoms) & ~shapely.is_empty(geoms))
    for i in invalid:
        # NOTE: SpaceNet's scorer buffers invalid polygons by 0; make_valid keeps more of them.
        geoms[i] = _polygonal(shapely.make_valid(geoms[i]))
    table.repaired = int(invalid.size)
    for image_id, g, conf in zip(ids, geoms, confs, strict=True):
        polys = table.polygons.setdefault(image_id, [])
        cl = table.confidence.setdefault(image_id, [])
        if not g.is_empty:
            polys.append(g)
            cl.append(conf)
    return table


def read_truth_csv(path: str | Path) -> PolygonTable:
    """The SpaceNet ground-truth CSV (``PolygonWKT_Geo`` is not needed for scoring)."""
    return read_polygon_csv(path, proposals=False)


def read_proposal_csv(path: str | Path) -> PolygonTable:
    """A SpaceNet proposal CSV; polygons per image stay in file order (the scorer's order)."""
    return read_polygon_csv(path, proposals=True)


def proposal_rows(image_id: str, polygons: Iterable[BaseGeometry],
                  confidences: Iterable[float]) -> list[list[str]]:
    """CSV rows for one tile (BuildingId from 1 in the given order; a -1 row if empty)."""
    polys = list(polygons)
    if not polys:
        return [[image_id, "-1", "POLYGON EMPTY", "0"]]
    wkts = shapely.to_wkt(np.asarray(polys, dtype=object), trim=True, rounding_precision=-1)
    return [[image_id, str(k), w, f"{c:.6g}"]
            for k, (w, c) in enumerate(zip(wkts, confidences, strict=True), start=1)]


def write_rows(f: io.TextIOBase, rows: Iterable[list[str]], header: bool = False) -> None:
    """Write proposal rows (and the header first, if asked) to an open text file."""
    w = csv.writer(f, lineterminator="\n")
    if header:
        w.writerow(PROPOSAL_COLUMNS)
    w.writerows(rows)
