"""benchmarks.export: a tiny run writes a row per variant, thread count and batch size, with
onnxruntime's probabilities torch fp32's within 1e-4 and bf16's visibly rounded; an fp32 row
that differs fails the run; bad flags are refused before the export (speed is measured, not
asserted)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks import export as bench

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")


@pytest.mark.slow  # (torch's ONNX export: ~20 s on 2 cores however small the net)
@pytest.mark.timeout(300)
def test_a_tiny_run_writes_a_row_per_variant_threads_and_batch(tmp_path: Path) -> None:
    out = tmp_path / "export.json"
    # (40 px: not a multiple of 16, so the graph's padding and crop run too)
    bench.main(["--model", "unet", "--width-divisor", "8", "--tile-px", "40", "--batch-sizes",
                "1,2", "--threads", "1", "--repeat", "1", "--json", str(out)])
    js = json.loads(out.read_text())
    assert js["benchmark"] == "export" and js["versions"]["onnxruntime"]
    assert js["settings"]["model"] == js["model"]["name"] == "unet"
    assert js["model"]["width_divisor"] == 8 and js["model"]["parameters"] > 0
    assert js["export_s"] > 0 and len(js["load_average_1min"]) == 2
    rows = js["rows"]
    assert [(r["variant"], r["threads"], r["batch"]) for r in rows] == [
        (v, 1, b) for b in (1, 2) for v in bench.VARIANTS]
    for r in rows:
        assert r["tile_px"] == 40 and r["repeat"] == 1
        assert r["seconds"] > 0 and r["first_s"] > 0
        assert r["ms_per_tile"] == pytest.approx(1000 * r["seconds"] / r["batch"])
        assert all(k in js["units"] for k, v in r.items() if isinstance(v, float)), r
    by = {(r["variant"], r["batch"]): r for r in rows}
    for b in (1, 2):
        torch_fp32 = by[bench.TORCH, b]
        assert torch_fp32["max_abs_diff_vs_torch_fp32"] == 0
        assert torch_fp32["speedup_vs_torch_fp32"] == 1
        assert 0 <= by[bench.ORT, b]["max_abs_diff_vs_torch_fp32"] <= bench.ATOL
        # (the bf16 row did run in bf16: its probabilities are rounded, not fp32's)
        assert 1e-4 < by[bench.BF16, b]["max_abs_diff_vs_torch_fp32"] < 0.5


def _row(variant: str, diff: float) -> dict[str, object]:
    return {"variant": variant, "threads": 2, "batch": 4, "max_abs_diff_vs_torch_fp32": diff}


def test_an_fp32_row_that_differs_from_torch_fails_the_run() -> None:
    bench.check_agreement([_row(bench.ORT, 3e-5), _row(bench.TORCH, 0.0),
                           _row(bench.BF16, 0.03)])  # (bf16's rounding is reported, not refused)
    for diff in (2e-4, float("nan")):
        with pytest.raises(ValueError, match="onnxruntime fp32: its probabilities differ from "
                                             "torch fp32's by .* at 2 threads, batch 4"):
            bench.check_agreement([_row(bench.ORT, diff), _row(bench.TORCH, 0.0)])


def test_thread_and_batch_lists() -> None:
    assert bench._counts("1,all", 2) == [1, 2]
    assert bench._counts("all,1,2", 2) == [2, 1]  # (duplicates dropped, order kept)
    assert bench._counts("4", 2) == [4]


@pytest.mark.parametrize(("argv", "named"), [
    (["--tile-px", "8"], "--tile-px 8: at least 16"),
    (["--threads", "0"], "--threads: must be >= 1, got 0"),
    (["--batch-sizes", "1,,4"], "--batch-sizes: '1,,4' has an empty item"),
    (["--threads", "two"], "--threads: 'two' is not a whole number"),
    (["--model", "resnet"], "--model: invalid choice: 'resnet'"),
])
def test_bad_flags_are_refused_before_the_export(argv: list[str], named: str,
                                                 capsys: pytest.CaptureFixture[str],
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    def started(*_a: object, **_k: object) -> None:
        raise AssertionError("the benchmark started its work")

    monkeypatch.setattr(bench, "build", started)
    with pytest.raises(SystemExit) as e:
        bench.main(argv)
    assert e.value.code == 2 and named in capsys.readouterr().err
