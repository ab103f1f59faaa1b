"""The CPU fast-path benchmark sides: OpenVINO fp32 and bf16 engines, diffusers' bf16 baseline,
and the fidelity gate's fields, on the tiny preset with a few steps (no timing is asserted)."""

from __future__ import annotations

import math

import pytest
from sdxl_export.benchmarks import report
from sdxl_export.benchmarks.bench import BASELINE, BASELINE_BF16, BenchConfig, Variant, run_bench
from sdxl_export.benchmarks.suites import SUITES
from sdxl_export.errors import InvalidRequestError
from sdxl_export.openvino_env import ov_status

OV_FP32, OV_BF16, OV_INT8 = "openvino-fp32", "openvino-bf16", "openvino-int8"

# A whole bench run with three engine builds (fp32, bf16, int8 with calibration): minutes. The side
# selection and the gates' arithmetic are tested fast in test_bench_sides.
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def ov_bench(tmp_path_factory):
    ok, why = ov_status()
    if not ok:
        pytest.skip(why)
    work = tmp_path_factory.mktemp("bench-ov") / "art"
    cfg = BenchConfig(model="tiny", work_dir=work, steps=3, runs=1, warmup=0, torch_threads=1, baseline_bf16=True,
                      variants=[Variant(OV_FP32, backend="openvino", device="cpu"),
                                Variant(OV_BF16, backend="openvino", device="cpu", precision="bf16"),
                                Variant(OV_INT8, backend="openvino", device="cpu", precision="int8")])
    return run_bench(cfg), work


def test_without_native_bf16_the_bf16_sides_are_skipped_not_misnamed(ov_bench):
    """On a CPU without AVX512_BF16/AMX a "bf16" side would run fp32 engines (and diffusers' bf16
    would be emulated): both are skipped with the reason, the fp32 side is measured."""
    from sdxl_export.benchmarks.stats import cpu_isa

    result, _work = ov_bench
    if cpu_isa()["native_bf16"]:
        pytest.skip("this CPU has native bf16: every side runs (the next test)")
    (case,) = result["cases"]
    assert set(case["results"]) == {OV_FP32, OV_INT8, BASELINE}
    assert set(result["skipped"]) == {OV_BF16, BASELINE_BF16}
    assert all("no native bf16" in why for why in result["skipped"].values())
    assert case["parity"][OV_FP32]["within_1_255"]
    assert result["machine"]["cpu_isa"]["native_bf16"] is False
    table = report.markdown_table(result)
    assert f"skipped {OV_BF16}: " in table and f"skipped {BASELINE_BF16}: " in table
    # int8 runs on any CPU; without the bf16 yardstick it is reported, not gated.
    assert result["variants"][OV_INT8]["engine_precision"] == "int8"
    int8 = case["fidelity"][OV_INT8]
    assert int8["finite"] and int8["gate"] is None and int8["psnr_db"] > 20
    assert f"fidelity {case['bucket']} b1 {OV_INT8}: PSNR vs diffusers fp32" in table and "not gated" in table


def test_openvino_sides_bf16_baseline_and_gate_fields(ov_bench):
    from sdxl_export.benchmarks.stats import cpu_isa

    result, work = ov_bench
    if not cpu_isa()["native_bf16"]:
        pytest.skip("this CPU has no native bf16: the bf16 sides are skipped (the test before)")
    assert result["skipped"] == {}
    (case,) = result["cases"]
    assert set(case["results"]) == {OV_FP32, OV_BF16, OV_INT8, BASELINE, BASELINE_BF16}
    # Two engine sets: fp32 in the work folder, bf16 in its own sibling folder.
    assert result["variants"][OV_FP32]["artifacts"] == str(work)
    assert result["variants"][OV_BF16]["artifacts"] == str(work.with_name("art-openvino-bf16"))
    assert result["variants"][OV_BF16]["engine_precision"] == "bf16"
    assert set(case["speedup_vs_baseline"]) == {OV_FP32, OV_BF16, OV_INT8, BASELINE_BF16}
    assert set(case["speedup_vs_diffusers_bf16"]) == {OV_FP32, OV_BF16, OV_INT8}
    assert all(s["end_to_end_p50"] > 0 for s in case["speedup_vs_diffusers_bf16"].values())
    fid = case["fidelity"]
    assert set(fid) == {OV_FP32, OV_BF16, OV_INT8, BASELINE_BF16}
    for f in fid.values():
        assert f["comparable"] and f["finite"] and f["max_pixel_diff_255"] >= 0
    # fp32 OpenVINO matches diffusers within 1/255; diffusers' bf16 does not match its fp32 bit for bit.
    assert case["parity"][OV_FP32]["within_1_255"]
    assert fid[OV_FP32]["max_pixel_diff_255"] <= 1.0
    assert math.isfinite(fid[BASELINE_BF16]["psnr_db"]) and fid[BASELINE_BF16]["max_pixel_diff_255"] > 0
    # The gate: only the reduced-precision variant, computed from the recorded PSNRs.
    assert "gate" not in fid[OV_FP32]
    gate = fid[OV_BF16]["gate"]
    assert gate["psnr_diffusers"] == pytest.approx(fid[BASELINE_BF16]["psnr_db"])
    assert fid[OV_BF16]["gate_passed"] == (gate["psnr_ours"] >= gate["psnr_diffusers"] - gate["margin_db"])
    assert fid[OV_INT8]["gate"]["margin_db"] == 3.0 and "bf16_gate_passed" in fid[OV_INT8]
    assert result["fidelity_gate_passed"] == (fid[OV_BF16]["gate_passed"] and fid[OV_INT8]["gate_passed"])
    assert set(result["speedup_vs_diffusers_bf16"]) == {OV_FP32, OV_BF16, OV_INT8}
    table = report.markdown_table(result)
    assert f"vs {BASELINE_BF16}" in table and "PSNR dB vs fp32" in table
    assert f"fidelity gate {case['bucket']} b1 {OV_BF16}:" in table


def test_reduced_precision_variant_needs_model_and_small_suite_has_the_sides(tmp_path):
    cfg = BenchConfig(artifacts=tmp_path, variants=[Variant("x", backend="openvino", precision="bf16")])
    with pytest.raises(InvalidRequestError, match="only with --model"):
        cfg.check()
    with pytest.raises(InvalidRequestError, match="unknown precision"):
        BenchConfig(model="tiny", variants=[Variant("x", precision="int4")]).check()
    small = SUITES["small"].config()
    assert [v.name for v in small.variants] == ["onnxruntime", OV_FP32, OV_BF16, OV_INT8] and small.baseline_bf16
    assert [v.name for v in SUITES["tiny"].config().variants] == ["onnxruntime"]
