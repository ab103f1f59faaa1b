"""``bench --workflows``: an inpainting and a hires-fix request, ours vs diffusers' same
composition, in one tiny run (figures are for benchmarks, not asserted; parity is)."""

from __future__ import annotations

import pytest
from sdxl_export.benchmarks.bench import BenchConfig, Variant, run_bench
from sdxl_export.benchmarks.workflow_bench import markdown

# A whole benchmark harness run (its figures are the docs', not a test's): second tier.
pytestmark = pytest.mark.slow


def test_bench_reports_inpainting_and_hires_with_parity(tiny_artifacts):
    cfg = BenchConfig(artifacts=tiny_artifacts, variants=[Variant("ort", backend="onnxruntime", device="cpu")],
                      steps=3, runs=1, warmup=0, use_refiner=False, workflows=True, torch_threads=1)
    result = run_bench(cfg)
    wf = result["workflows"]
    assert wf["size"] == "256x256" and wf["hires"]["target"] == "384x384"
    for what in ("inpaint", "hires"):
        rec = wf["requests"][what]
        assert set(rec["results"]) == {"ort", "diffusers"}
        assert rec["results"]["ort"]["p50_s"] > 0 and rec["results"]["diffusers"]["p50_s"] > 0
        assert rec["speedup_vs_diffusers"]["ort"] > 0
        assert rec["max_pixel_diff_255"]["ort"] <= 1.0, rec
    table = markdown(wf)
    assert "| inpaint | ort |" in table and "| hires | diffusers |" in table
