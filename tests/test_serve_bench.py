"""``sdxl-export bench --suite serve``: a bounded closed-loop run against both servers.

Checks the benchmark's record is complete and honest (every request answered, zero errors
while the queue has room, the same image for the same seed on both sides); speed is the
benchmark's business, not this test's.
"""

from __future__ import annotations

import json

import pytest
from fixtures import run_cli
from serve_helpers import serve_artifacts

pytest.importorskip("fastapi")


# A whole benchmark harness run (its figures are the docs', not a test's): second tier.
pytestmark = pytest.mark.slow


def test_serve_bench_records_both_sides(tmp_path_factory, tiny_artifacts, tmp_path):
    artifacts = serve_artifacts(tmp_path_factory, tiny_artifacts)
    out = tmp_path / "serve.json"
    rc, stdout, stderr = run_cli("bench", "--suite", "serve", "--artifacts", str(artifacts), "--concurrency", "1,3",
                                 "--requests", "3", "--steps", "3", "--json", str(out), "--plot",
                                 str(tmp_path / "serve.png"))
    assert rc == 0, stderr
    result = json.loads(out.read_text())
    assert set(result["sides"]) == {"sdxl-export serve", "baseline (diffusers + lock)"}
    for levels in result["sides"].values():
        assert [lv["concurrency"] for lv in levels] == [1, 3]
        for lv in levels:
            assert lv["ok"] == lv["requests"] == 3 and lv["errors"] == 0, lv
            assert lv["images_per_second"] > 0 and lv["p50_ms"] <= lv["p90_ms"] <= lv["p99_ms"]
    assert [s["concurrency"] for s in result["speedup"]] == [1, 3]
    assert all(s["throughput_ratio"] > 0 for s in result["speedup"])
    assert result["parity_max_pixel_diff"] is not None and result["parity_max_pixel_diff"] <= 1
    assert "| sdxl-export serve | 3 |" in stdout and (tmp_path / "serve.png").stat().st_size > 0
