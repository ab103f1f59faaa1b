"""ControlNet pieces that need no export: residual layout, specs and profiles at full SDXL size,
config inference of single files, and the weightless preprocessors with A1111's meaning."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image
from sdxl_export.models import presets
from sdxl_export.models.controlnet import config_from_unet, infer_config, residual_layout
from sdxl_export.runtime import control_preprocess as cp
from sdxl_export.specs import controlnet_spec, unet_controlnet_spec


def _sdxl_dims():
    from sdxl_export.models.loader import resolve_source

    return resolve_source("sdxl", with_refiner=False).dims()


def test_sdxl_residual_layout_is_diffusers_nine_plus_mid():
    levels, mid = residual_layout(presets.get_preset("sdxl").unet)
    assert levels == [(320, 0), (320, 0), (320, 0), (320, 1), (640, 1), (640, 1), (640, 2), (1280, 2), (1280, 2)]
    assert mid == 1280


def test_full_size_profiles_put_the_control_image_at_pixels_and_residuals_at_each_level():
    from sdxl_export.buckets import parse_bucket_list
    from sdxl_export.engines.planner import plan_profiles

    dims = _sdxl_dims()
    levels, mid = residual_layout(presets.get_preset("sdxl").unet)
    specs = {"controlnet_x": controlnet_spec("controlnet_x", dims, levels, mid),
             "unet_controlnet": unet_controlnet_spec(dims, levels, mid)}
    plan = plan_profiles(specs, native=1024, buckets=parse_bucket_list("1024x1024,832x1216", 1024),
                         batch_sizes=(1,), mode="bucketed")
    for name, spec in specs.items():
        for h, w in ((1024, 1024), (832, 1216)):
            want = spec.input_shapes(2, h, w)  # batch 2: classifier-free guidance
            assert any(p.covers(want) for p in plan.components[name].profiles), (name, h, w)
    assert specs["controlnet_x"].input_shapes(2, 832, 1216)["controlnet_cond"] == (2, 3, 832, 1216)
    assert specs["controlnet_x"].input_shapes(2, 832, 1216)["conditioning_scale"] == (10,)
    assert specs["unet_controlnet"].input_shapes(2, 832, 1216)["mid_residual"] == (2, 1280, 26, 38)
    hi = max(p.shapes["controlnet_cond"][2] for p in plan.components["controlnet_x"].profiles)
    assert hi[2:] == (1024, 1216)  # pixel dims, not latent ones


def test_odd_latent_sizes_round_up_like_the_stride_2_convolutions():
    dims = _sdxl_dims()
    levels, mid = residual_layout(presets.get_preset("sdxl").unet)
    shapes = unet_controlnet_spec(dims, levels, mid).input_shapes(1, 1032, 1032)  # 129 latents
    assert shapes["down_residual_3"] == (1, 320, 65, 65) and shapes["mid_residual"] == (1, 1280, 33, 33)


def test_single_file_config_is_inferred_from_the_base_unet_and_the_shapes():
    from sdxl_export.models.controlnet import preset_controlnet
    from sdxl_export.models.loader import _build_preset_part

    cn = preset_controlnet(_build_preset_part("tiny", "unet"))
    unet_cfg = presets.get_preset("tiny").unet
    cfg = infer_config(cn.state_dict(), unet_cfg, "x.safetensors")
    assert list(cfg["transformer_layers_per_block"]) == [1, 1, 2]
    assert list(cfg["conditioning_embedding_out_channels"]) == [16, 32, 96, 256]
    assert cfg["conditioning_channels"] == 3
    assert cfg["cross_attention_dim"] == config_from_unet(unet_cfg)["cross_attention_dim"] == 96


# ---- preprocessors --------------------------------------------------------------------------------
def _img(h: int = 96, w: int = 128) -> Image.Image:
    rng = np.random.default_rng(0)
    arr = np.zeros((h, w, 3), np.uint8)
    arr[h // 4:3 * h // 4, w // 4:3 * w // 4] = 200
    arr += rng.integers(0, 20, arr.shape, dtype=np.uint8)
    return Image.fromarray(arr)


def test_canny_is_opencv_with_a1111_thresholds():
    import cv2

    img = _img()
    got = cp.detect(img, "canny", processor_res=96, threshold_a=50, threshold_b=150)
    want = cv2.Canny(np.asarray(img), 50, 150)
    assert (got[:, :, 0] == want).all() and want.any()
    default = cp.detect(img, "canny", processor_res=96)  # A1111's 100/200
    assert (default[:, :, 0] == cv2.Canny(np.asarray(img), 100, 200)).all()


def test_invert_none_and_tile_resample():
    img = _img()
    assert (cp.detect(img, "invert") == 255 - np.asarray(img)).all()
    assert (cp.detect(img, "none") == np.asarray(img)).all()
    assert cp.detect(img, "tile_resample", processor_res=96, threshold_a=2.0).shape == (48, 64, 3)


def test_resize_modes_and_pixel_perfect():
    m = np.zeros((100, 200, 3), np.uint8)
    m[:, :100] = 255  # left half white
    assert cp.fit(m, 64, 64, "Just Resize").shape == (64, 64, 3)
    crop = cp.fit(m, 64, 64, "Crop and Resize")  # cover, centre crop: half white, half black
    assert crop.shape == (64, 64, 3) and crop[:, :28].min() == 255 and crop[:, 36:].max() == 0
    fill = cp.fit(m, 64, 64, "Resize and Fill")  # fit: 32x64 band in the middle, border colour fill
    assert fill.shape == (64, 64, 3) and fill[20:44, :28].min() == 255
    assert cp.fit(m, 64, 64, 0).shape == cp.fit(m, 64, 64, "Inner Fit").shape == (64, 64, 3)
    assert cp.pixel_perfect_resolution(100, 200, 512, 512, "crop") == 512
    assert cp.pixel_perfect_resolution(100, 200, 512, 512, "fill") == 256


def test_preprocessors_needing_weights_or_unknown_are_named_errors():
    with pytest.raises(cp.UnknownPreprocessorError, match="needs model weights") as e:
        cp.canonical_module("depth_midas")
    assert "none, canny, invert, tile_resample" in e.value.hint
    with pytest.raises(cp.UnknownPreprocessorError, match="unknown preprocessor"):
        cp.canonical_module("frobnicate")
    with pytest.raises(Exception, match="resize_mode"):
        cp.canonical_resize_mode("Stretch it")
