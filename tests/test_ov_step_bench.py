"""``benchmarks/ov_step_bench.py``: the OpenVINO settings comparison runs and reports every configuration."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("openvino")


# A whole benchmark harness run (its figures are the docs', not a test's): second tier.
pytestmark = pytest.mark.slow


def test_ov_step_bench_reports_each_configuration(tiny_artifacts, tmp_path):
    from sdxl_export.benchmarks.ov_step_bench import main

    out = tmp_path / "ov.json"
    assert main(["--artifacts", str(tiny_artifacts), "--size", "256x256", "--batch", "2", "--rounds", "1",
                 "--precision", "f32", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert len(result["configs"]) == 5 and result["shape"] == [2, 256, 256]
    assert any("guidance halves" in name for name in result["configs"])
    assert all(r["median_ms"] > 0 and r["vs_default"] > 0 for r in result["configs"].values())
    assert set(result["compile_seconds"]) == {"compile, empty cache", "compile, filled cache"}
