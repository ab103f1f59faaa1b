"""Build-time accuracy of TensorRT plans: the shape chosen per profile and the verdict, on CPU.

Running a plan needs TensorRT (``-m trt``: ``test_real_build_of_tiny_vae_decoder`` checks the
recorded result); which shape each profile is checked at and how outputs are judged is plain
Python over numpy arrays, tested here with real planned profiles and specs.
"""

from __future__ import annotations

import numpy as np
import pytest
from sdxl_export.engines.planner import plan_profiles
from sdxl_export.engines.sources import specs_for_plan
from sdxl_export.engines.trt_accuracy import EngineAccuracyError, check_shapes, compare_outputs, tolerance_for


@pytest.fixture(scope="module")
def sdxl_plan():
    specs, native, _ = specs_for_plan("sdxl", "same", True, None)
    return plan_profiles(specs, native=native, batch_sizes=(1, 2), mode="bucketed")


def test_every_profile_is_checked_at_a_shape_it_serves(sdxl_plan):
    for name, cp in sdxl_plan.components.items():
        shapes = check_shapes(cp.profiles, cp.spec)
        assert [s[0] for s in shapes] == list(range(len(cp.profiles))), name
        for index, batch, h, w in shapes:
            p = cp.profiles[index]
            assert batch == min(p.batch_sizes) and any((b.height, b.width) == (h, w) for b in p.buckets)
            assert p.covers(cp.spec.input_shapes(batch, h, w))
            if p.opt_bucket is not None:
                assert (h, w) == (p.opt_bucket.height, p.opt_bucket.width)
    assert len(check_shapes(sdxl_plan.components["unet"].profiles, sdxl_plan.components["unet"].spec)) == 3


def test_outputs_within_tolerance_pass_and_report_the_error(sdxl_plan):
    spec = sdxl_plan.components["unet"].spec
    ref = {"noise_pred": np.linspace(-3, 3, 64, dtype=np.float32).reshape(1, 4, 4, 4)}
    got = {"noise_pred": ref["noise_pred"] + 0.01}
    errors = compare_outputs(spec, "fp16", ref, got)
    assert errors["noise_pred"] == pytest.approx(0.01, rel=1e-3)
    with pytest.raises(EngineAccuracyError, match=r"fp32 TensorRT plan differs .* noise_pred") as info:
        compare_outputs(spec, "fp32", ref, {"noise_pred": ref["noise_pred"] + 0.5}, where=" (profile 1)")
    assert "--precision fp32" in info.value.hint and "profile 1" in info.value.message
    assert tolerance_for(spec, "fp16").atol > tolerance_for(spec, "fp32").atol


def test_nan_fails_and_the_vae_error_names_the_vae_precision(sdxl_plan):
    vae = sdxl_plan.components["vae_decoder"].spec
    ref = {"images": np.zeros((1, 3, 8, 8), dtype=np.float32)}
    bad = {"images": ref["images"].copy()}
    bad["images"][0, 0, 0, 0] = np.nan
    with pytest.raises(EngineAccuracyError, match="NaN/Inf in images") as info:
        compare_outputs(vae, "fp16", ref, bad)
    assert "--vae-precision fp32" in info.value.hint
    unet = sdxl_plan.components["unet"].spec
    with pytest.raises(EngineAccuracyError, match="NaN/Inf") as info:
        compare_outputs(unet, "fp16", {"noise_pred": np.zeros(4)}, {"noise_pred": np.full(4, np.inf)})
    assert "--vae-precision" not in info.value.hint
