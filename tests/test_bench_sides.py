"""The bench names each side by the precision it runs in, and skips (saying why) what this CPU
cannot run natively; the JSON records the CPU's instruction sets."""

from __future__ import annotations

import pytest
from sdxl_export.benchmarks.bench import BASELINE_BF16, BenchConfig, Variant, runnable_sides
from sdxl_export.benchmarks.stats import cpu_isa, machine_info
from sdxl_export.benchmarks.suites import SUITES
from sdxl_export.errors import InvalidRequestError

AVX2_ONLY = {"flags": ["avx2", "fma"], "avx2": True, "avx512": False, "vnni": False, "avx512_bf16": False,
             "amx": False, "native_bf16": False}
SAPPHIRE = {"flags": ["avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_bf16", "amx_int8"],
            "avx2": True, "avx512": True, "vnni": True, "avx512_bf16": True, "amx": True, "native_bf16": True}


def test_machine_info_records_the_cpu_isa():
    isa = machine_info()["cpu_isa"]
    assert isa == cpu_isa()
    assert set(isa) >= {"flags", "avx2", "avx512", "vnni", "avx512_bf16", "amx", "native_bf16"}
    assert isa["native_bf16"] == bool({"avx512_bf16", "amx_bf16"} & set(isa["flags"]))


def test_small_suite_on_an_avx2_cpu_skips_the_bf16_sides_and_says_why():
    cfg = SUITES["small"].config()
    kept, skipped = runnable_sides(cfg, AVX2_ONLY)
    names = [v.name for v in kept.variants]
    assert names == ["onnxruntime", "openvino-fp32", "openvino-int8"]  # int8 runs on any CPU
    assert set(skipped) == {"openvino-bf16", BASELINE_BF16}
    assert all("no native bf16" in why for why in skipped.values())
    assert kept.baseline_bf16 is False and cfg.baseline_bf16 is True  # the suite itself is unchanged


def test_small_suite_on_a_bf16_cpu_keeps_every_side():
    cfg = SUITES["small"].config()
    kept, skipped = runnable_sides(cfg, SAPPHIRE)
    assert skipped == {} and kept is cfg


def test_nothing_runnable_is_a_named_error():
    cfg = BenchConfig(model="tiny", variants=[Variant("ov-bf16", backend="openvino", precision="bf16")],
                      baseline_device="cpu")
    with pytest.raises(InvalidRequestError, match="no side of this benchmark can run natively"):
        runnable_sides(cfg, AVX2_ONLY)


def test_fp32_sides_never_skipped():
    cfg = BenchConfig(model="tiny", variants=[Variant("onnxruntime", backend="onnxruntime", device="cpu")])
    kept, skipped = runnable_sides(cfg, AVX2_ONLY)
    assert skipped == {} and [v.name for v in kept.variants] == ["onnxruntime"]


def test_int8_is_held_to_its_own_3_db_gate_and_reports_the_bf16_one():
    """The bench's fidelity record on synthetic images of known error: a side whose MSE is between
    1x and 2x diffusers bf16's passes int8's gate (3 dB) but not the bf16 gate (1 dB)."""
    from types import SimpleNamespace

    import numpy as np
    from sdxl_export.benchmarks.bench import BASELINE, _fidelity

    rng = np.random.default_rng(0)
    ref = rng.random((1, 16, 16, 3))
    noise = rng.standard_normal(ref.shape)
    outputs = {BASELINE: SimpleNamespace(images=ref),
               BASELINE_BF16: SimpleNamespace(images=ref + 0.01 * noise),
               "ov-int8": SimpleNamespace(images=ref + 0.01 * 1.6 ** 0.5 * noise),  # MSE x1.6: -2.0 dB
               "ov-bf16": SimpleNamespace(images=ref + 0.01 * 1.6 ** 0.5 * noise)}
    cfg = BenchConfig(model="tiny", variants=[Variant("ov-int8", backend="openvino", precision="int8"),
                                              Variant("ov-bf16", backend="openvino", precision="bf16")])
    fid = _fidelity(cfg, outputs)
    assert fid["ov-int8"]["gate"]["margin_db"] == 3.0 and fid["ov-int8"]["gate_passed"] is True
    assert fid["ov-int8"]["bf16_gate_passed"] is False
    assert fid["ov-bf16"]["gate"]["margin_db"] == 1.0 and fid["ov-bf16"]["gate_passed"] is False
    assert "bf16_gate_passed" not in fid["ov-bf16"]
    without = _fidelity(cfg, {k: v for k, v in outputs.items() if k != BASELINE_BF16})
    assert without["ov-int8"]["gate"] is None and without["ov-int8"]["gate_passed"] is None
