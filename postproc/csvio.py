"""SpaceNet CSV files: the ground truth and the proposals, read strictly and written atomically.

Truth: ``ImageId,BuildingId,PolygonWKT_Pix,PolygonWKT_Geo``; proposals:
``ImageId,BuildingId,PolygonWKT_Pix,Confidence``. A tile without buildings is one row with
BuildingId ``-1`` and ``POLYGON EMPTY``, so the tile is present but holds nothing. WKT may carry a
z coordinate (``POLYGON ((1 2 0, ...))``) as real SpaceNet files do; it is dropped. A malformed
row raises :class:`CsvError` naming the file and line. :class:`PolygonIndex` reads the same
files one image at a time (the scorer's way: flat memory however large the files).
"""

from __future__ import annotations

import csv
import io
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

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
    """Polygons per ImageId, in file order; ``repaired`` counts invalid polygons made valid.

    An empty WKT (the ``-1`` row of an image with no buildings) lists no polygon; a polygon that
    repairs to nothing (zero area) stays, as an empty polygon: a proposal row is a proposal, and
    one that matches nothing is a false positive, as in SpaceNet's scorer (``buffer(0)``).
    """

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


def _not_utf8(path: Path) -> CsvError:
    """The error for a file that is not UTF-8, naming its first undecodable line: a text file
    decodes in chunks of 8 KB, so where its reader stood says nothing about the line."""
    with open(path, "rb") as f:
        for n, raw in enumerate(f, start=1):  # "\n" never occurs inside a UTF-8 sequence
            try:
                raw.decode("utf-8-sig" if n == 1 else "utf-8")
            except UnicodeDecodeError as e:
                return CsvError(f"{path}:{n}: not UTF-8 text ({e.reason})")
    return CsvError(f"{path}: not UTF-8 text")


def _header(reader: csv.reader, path: Path, need: tuple[str, ...]) -> dict[str, int]:
    try:
        head = next(reader)
    except StopIteration:
        raise CsvError(f"{path}: empty file (expected a header {','.join(need)})") from None
    except UnicodeDecodeError:
        raise _not_utf8(path) from None
    except csv.Error as e:
        raise CsvError(f"{path}:1: malformed header ({e})") from None
    cols = {name.strip(): i for i, name in enumerate(head)}
    missing = [c for c in need if c not in cols]
    if missing:
        raise CsvError(f"{path}:1: header lacks {', '.join(missing)} (has {', '.join(cols)}; "
                       f"want {','.join(need)})")
    return cols


def _columns(reader: Any, path: Path, proposals: bool) -> tuple[dict[str, int], int]:
    """The header's column positions, and the fewest fields a row may have."""
    need = ("ImageId", "BuildingId", "PolygonWKT_Pix") + (("Confidence",) if proposals else ())
    cols = _header(reader, path, need)
    return cols, max(cols[c] for c in need) + 1


def _fields(row: list[str], cols: dict[str, int], width: int, path: Path, line: int,
            proposals: bool) -> tuple[str, str, float] | None:
    """(ImageId, WKT, confidence) of one row; None for a blank line; CsvError if malformed."""
    if not row or (len(row) == 1 and not row[0].strip()):
        return None
    if len(row) < width:
        raise CsvError(f"{path}:{line}: expected {len(cols)} fields, got {len(row)}")
    if len(row) > len(cols):
        raise CsvError(f"{path}:{line}: {len(row)} fields where the header has "
                       f"{len(cols)} (is the WKT quoted?)")
    image_id = row[cols["ImageId"]].strip()
    if not image_id:
        raise CsvError(f"{path}:{line}: empty ImageId")
    cb = cols["BuildingId"]
    try:
        bid = int(float(row[cb]))
    except (ValueError, OverflowError):  # OverflowError: "inf", "1e999"
        raise CsvError(f"{path}:{line}: BuildingId {row[cb]!r} is not a number") from None
    conf = 0.0
    cc = cols.get("Confidence")
    if proposals and cc is not None:
        try:
            conf = float(row[cc])
        except ValueError:
            raise CsvError(f"{path}:{line}: Confidence {row[cc]!r} is not a number") from None
    return image_id, (row[cols["PolygonWKT_Pix"]].strip() if bid != -1 else "POLYGON EMPTY"), conf


def read_polygon_csv(path: str | Path, proposals: bool) -> PolygonTable:
    """Read a truth (``proposals=False``) or proposal CSV into a :class:`PolygonTable`."""
    path = Path(path)
    ids: list[str] = []
    wkts: list[str] = []
    lines: list[int] = []
    confs: list[float] = []
    with _open_text(path) as f:
        reader = csv.reader(f)
        cols, width = _columns(reader, path, proposals)
        try:
            for row in reader:
                line = reader.line_num
                rec = _fields(row, cols, width, path, line, proposals)
                if rec is not None:
                    ids.append(rec[0])
                    wkts.append(rec[1])
                    lines.append(line)
                    confs.append(rec[2])
        except csv.Error as e:
            raise CsvError(f"{path}:{reader.line_num}: malformed CSV ({e})") from None
        except UnicodeDecodeError:
            raise _not_utf8(path) from None
    return _build_table(path, ids, wkts, lines, confs)


class _ByteLines:
    """The lines of a binary file as text, counting the bytes read. ``csv.reader`` pulls exactly
    the lines of one record per row (no read-ahead), so the count bounds every record."""

    def __init__(self, f: Any) -> None:
        self.f, self.pos = f, 0

    def __iter__(self) -> _ByteLines:
        return self

    def __next__(self) -> str:
        b = self.f.readline()
        if not b:
            raise StopIteration
        first = self.pos == 0
        self.pos += len(b)
        return b.decode("utf-8-sig" if first else "utf-8")


class PolygonIndex(Mapping[str, list[BaseGeometry]]):
    """Polygons per ImageId of a truth or proposal CSV, parsed from the file when asked for.

    Holds only where each image's rows lie in the file (one byte range per run of adjacent rows;
    one per image in files written by image), so memory does not grow with the polygons: the
    scorer asks for one image at a time. Rows are checked when indexed (ImageId, BuildingId,
    Confidence, field count: errors name the line); WKT is parsed, checked and repaired per image
    (:func:`read_polygon_csv`'s rules), and ``repaired`` counts the repairs made so far. Safe to
    use in forked workers (the file is opened per look-up).
    NOTE: lines end with LF or CRLF; a CR-only file is refused as malformed CSV.
    """

    def __init__(self, path: str | Path, proposals: bool) -> None:
        self.path, self.proposals = Path(path), proposals
        self.rows = 0
        self.repaired = 0
        # ImageId -> runs of its rows: (first byte, end byte, lines before the run)
        self._runs: dict[str, list[tuple[int, int, int]]] = {}
        try:
            f = open(self.path, "rb")  # noqa: SIM115 - closed below
        except FileNotFoundError:
            raise CsvError(f"{self.path}: file not found") from None
        except OSError as e:
            raise CsvError(f"{self.path}: cannot open ({e.strerror})") from None
        with f:
            self._scan(_ByteLines(f))

    def _scan(self, lines: _ByteLines) -> None:
        reader = csv.reader(lines)
        self._cols, self._width = _columns(reader, self.path, self.proposals)
        run: list[int] = []
        run_id = None
        start, before = lines.pos, reader.line_num
        try:
            for row in reader:
                rec = _fields(row, self._cols, self._width, self.path, reader.line_num,
                              self.proposals)
                if rec is not None:
                    self.rows += 1
                    if rec[0] == run_id:
                        run[1] = lines.pos
                    else:
                        if run_id is not None:
                            self._runs.setdefault(run_id, []).append((run[0], run[1], run[2]))
                        run_id, run = rec[0], [start, lines.pos, before]
                start, before = lines.pos, reader.line_num
        except csv.Error as e:
            raise CsvError(f"{self.path}:{reader.line_num}: malformed CSV ({e})") from None
        except UnicodeDecodeError:
            raise _not_utf8(self.path) from None
        if run_id is not None:
            self._runs.setdefault(run_id, []).append((run[0], run[1], run[2]))

    def __getitem__(self, image_id: str) -> list[BaseGeometry]:
        runs = self._runs[image_id]
        ids: list[str] = []
        wkts: list[str] = []
        lines: list[int] = []
        confs: list[float] = []
        with open(self.path, "rb") as f:
            for start, end, before in runs:
                f.seek(start)
                reader = csv.reader(b.decode("utf-8") for b in io.BytesIO(f.read(end - start)))
                for row in reader:
                    line = before + reader.line_num
                    rec = _fields(row, self._cols, self._width, self.path, line,
                                  self.proposals)
                    if rec is None:
                        continue
                    if rec[0] != image_id:
                        raise CsvError(f"{self.path}:{line}: the file changed while it was read")
                    ids.append(rec[0])
                    wkts.append(rec[1])
                    lines.append(line)
                    confs.append(rec[2])
        table = _build_table(self.path, ids, wkts, lines, confs)
        self.repaired += table.repaired
        return table.polygons.get(image_id, [])

    def __contains__(self, image_id: object) -> bool:
        return image_id in self._runs

    def __iter__(self) -> Iterator[str]:
        return iter(self._runs)

    def __len__(self) -> int:
        return len(self._runs)


def index_truth_csv(path: str | Path) -> PolygonIndex:
    """:func:`read_truth_csv` for large files: the polygons of one image at a time."""
    return PolygonIndex(path, proposals=False)


def index_proposal_csv(path: str | Path) -> PolygonIndex:
    """:func:`read_proposal_csv` for large files: the polygons of one image at a time."""
    return PolygonIndex(path, proposals=True)


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
    with np.errstate(invalid="ignore"):  # (numpy's warning on nan in WKT; reported below)
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
    # NOTE: WKT reads nan and inf; GEOS fails on them in make_valid, and a NaN area drops a
    # truth polygon from the scoring without a word.
    coords, owner = shapely.get_coordinates(geoms, return_index=True)
    nonfinite = owner[~np.isfinite(coords).all(axis=1)]
    if nonfinite.size:
        i = int(nonfinite.min())
        raise CsvError(f"{path}:{lines[i]}: non-finite coordinate (NaN or Infinity) in the WKT")
    listed = ~shapely.is_empty(geoms)
    invalid = np.flatnonzero(~shapely.is_valid(geoms) & listed)
    for i in invalid:
        # NOTE: SpaceNet's scorer buffers invalid polygons by 0; make_valid keeps more of them.
        geoms[i] = _polygonal(shapely.make_valid(geoms[i]))
    table.repaired = int(invalid.size)
    for image_id, g, conf, keep in zip(ids, geoms, confs, listed, strict=True):
        polys = table.polygons.setdefault(image_id, [])
        cl = table.confidence.setdefault(image_id, [])
        if keep:
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
    # NOTE: rings joined by "),(" as SpaceNet's CSVs spell them (GDAL's WKT): the SpaceNet-2
    # scorer (BuildingVisualizer.java, Polygon(String)) splits rings only on "),(", so GEOS's
    # "), (" glued a courtyard's ring onto the outline and scored that building wrong.
    wkts = [w.replace("), (", "),(") for w in wkts]
    return [[image_id, str(k), w, f"{c:.6g}"]
            for k, (w, c) in enumerate(zip(wkts, confidences, strict=True), start=1)]


def write_rows(f: io.TextIOBase, rows: Iterable[list[str]], header: bool = False) -> None:
    """Write proposal rows (and the header first, if asked) to an open text file."""
    w = csv.writer(f, lineterminator="\n")
    if header:
        w.writerow(PROPOSAL_COLUMNS)
    w.writerows(rows)
