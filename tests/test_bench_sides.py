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
    assert names == ["onnxruntime", "openvino-fp32"]
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
