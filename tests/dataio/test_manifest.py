"""The manifest's statistics and accessors: exact percentiles, a usable range for any band, errors
that name the manifest file."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest

from dataio.fixtures import write_dataset
from dataio.manifest import BandStats, ManifestError, load_manifest


def test_percentiles_are_numpys_inverted_cdf_ones() -> None:
    """Values 1..100 once each: p2 is 2 and p98 is 98 exactly (the smallest value with at least
    2% / 98% of the pixels at or below it), not the next value up."""
    img = np.arange(1, 101, dtype=np.uint16).reshape(10, 10, 1)
    stats = BandStats(1)
    stats.add(BandStats.of_image(img))
    got = stats.to_json()
    want = [float(np.percentile(img, q, method="inverted_cdf")) for q in (2, 98)]
    assert [got["p2"][0], got["p98"][0]] == want == [2.0, 98.0]


def test_a_band_constant_but_for_rare_bright_pixels_is_scaled_up_to_its_largest_value() -> None:
    """99% of the pixels at 5 and 1% at 900: p2 == p98 == 5, so the range reaches 900 (the
    bright pixels are not all clipped to one value)."""
    img = np.full((10, 10, 1), 5, np.uint16)
    img[0, 0] = 900
    stats = BandStats(1)
    stats.add(BandStats.of_image(img))
    got = stats.to_json()
    assert (got["p2"], got["p98"]) == ([5.0], [900.0])


def test_an_unknown_split_is_named_with_the_manifest_and_the_known_ones(tmp_path: Path) -> None:
    image, mask = np.zeros((8, 8, 3), np.uint16), np.zeros((8, 8), np.uint8)
    root = write_dataset(tmp_path / "d", {"train": [("a", image, mask)],
                                          "val": [("b", image, mask)]})
    m = load_manifest(root)
    with pytest.raises(ManifestError,
                       match=f"^{re.escape(str(root / 'manifest.json'))}: no split 'tset' "
                             r"\(has train, val\)"):
        m.shards("tset")


def test_a_folder_without_a_manifest_is_named(tmp_path: Path) -> None:
    with pytest.raises(ManifestError, match=f"^{re.escape(str(tmp_path / 'manifest.json'))}: "
                                            "not found; is .* a dataset made by dataio.prepare"):
        load_manifest(tmp_path)


def test_a_data_directory_that_does_not_exist_is_named_as_such(tmp_path: Path) -> None:
    with pytest.raises(ManifestError, match=f"^{re.escape(str(tmp_path / 'nope'))}: no such "
                                            "directory"):
        load_manifest(tmp_path / "nope")


@pytest.mark.parametrize("version", [None, 0, 2, "1"])
def test_a_manifest_of_another_format_version_or_none_is_refused(tmp_path: Path,
                                                                 version: object) -> None:
    image, mask = np.zeros((8, 8, 3), np.uint16), np.zeros((8, 8), np.uint8)
    root = write_dataset(tmp_path / "d", {"train": [("a", image, mask)]})
    path = root / "manifest.json"
    data = json.loads(path.read_text())
    if version is None:
        del data["format_version"]  # e.g. some other tool's manifest.json
    else:
        data["format_version"] = version
    path.write_text(json.dumps(data))
    with pytest.raises(ManifestError, match=f"^{re.escape(str(path))}: format_version "
                                            f"{re.escape(repr(version))}, expected 1"):
        load_manifest(root)


@pytest.mark.parametrize("field", ["name", "index"])
@pytest.mark.parametrize("bad", ["..", ".", "", "..\\..\\shard-000000.tar", "a\0b"])
def test_a_shard_entry_that_is_no_plain_file_name_is_refused(tmp_path: Path, field: str,
                                                             bad: str) -> None:
    """Readers join these names to the split folder: nothing may lead out of it (a backslash is
    a separator on Windows shares)."""
    image, mask = np.zeros((8, 8, 3), np.uint16), np.zeros((8, 8), np.uint8)
    root = write_dataset(tmp_path / "d", {"train": [("a", image, mask)]})
    path = root / "manifest.json"
    data = json.loads(path.read_text())
    data["splits"]["train"]["shards"][0][field] = bad
    path.write_text(json.dumps(data))
    with pytest.raises(ManifestError, match=f"^{re.escape(str(path))}: "
                                            rf"splits\.train\.shards\[0\]\.{field} must be a "
                                            "plain file name"):
        load_manifest(root)


def test_shards_given_as_an_object_are_refused_even_when_empty(tmp_path: Path) -> None:
    """``{}`` is no list of shards: accepted, the split would read as empty without a word."""
    image, mask = np.zeros((8, 8, 3), np.uint16), np.zeros((8, 8), np.uint8)
    root = write_dataset(tmp_path / "d", {"train": [("a", image, mask)]})
    path = root / "manifest.json"
    data = json.loads(path.read_text())
    data["splits"]["train"]["shards"] = {}
    path.write_text(json.dumps(data))
    with pytest.raises(ManifestError, match=f"^{re.escape(str(path))}: "
                                            r"splits\.train\.shards must be a list, got \{\}"):
        load_manifest(root)


def test_band_extremes_are_each_bands_own() -> None:
    img = np.zeros((4, 4, 2), np.uint16)
    img[..., 0] = np.arange(16).reshape(4, 4) + 3  # 3..18
    img[..., 1] = 300
    img[0, 0, 1] = 40
    stats = BandStats(2)
    stats.add(BandStats.of_image(img))
    got = stats.to_json()
    assert (got["min"], got["max"]) == ([3.0, 40.0], [18.0, 300.0])


def test_reading_a_manifest_does_not_load_shapely_or_rasterio() -> None:
    """Every reader of a dataset (the loaders, trainer.predict) imports dataio.manifest; since
    --product it imported dataio.spacenet for the default product, whose top-level shapely
    import put shapely (~0.4 s) back into them, which dataio.classes had taken out."""
    import subprocess
    import sys

    code = ("import sys, dataio.manifest; "
            "print(sorted({'shapely', 'rasterio'} & set(sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120, cwd=Path(__file__).resolve().parents[2], check=True)
    assert out.stdout.strip() == "[]", f"importing dataio.manifest loads {out.stdout.strip()}"
