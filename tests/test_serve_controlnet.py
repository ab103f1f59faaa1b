"""ControlNet through the server: the real ``webuiapi`` client (A1111 ControlNet units) and the
native API, compared with the Python API on the same artifacts; bad units are 400s naming the
field, and the server keeps serving."""

from __future__ import annotations

import base64
import io
import json

import numpy as np
import pytest
from controlnet_util import control_map, controlnet_artifacts
from serve_helpers import assert_same_pixels, request

webuiapi = pytest.importorskip("webuiapi")
STEPS = 3


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory, tiny_artifacts, tiny_model):
    return controlnet_artifacts(tmp_path_factory, tiny_artifacts, tiny_model)


def test_webuiapi_sees_controlnet_and_lists(server):
    api = webuiapi.WebUIApi(host="127.0.0.1", port=server.port)
    assert api.has_controlnet  # "controlnet m2m" in /sdapi/v1/scripts
    assert api.controlnet_model_list() == ["cn-a", "cn-b"]
    assert api.controlnet_module_list() == ["none", "canny", "invert", "tile_resample"]
    assert api.controlnet_version() == 2
    img = control_map(64, 96, seed=3)
    det = api.controlnet_detect([img], module="canny", processor_res=64, threshold_a=100, threshold_b=200)
    import cv2

    assert len(det.images) == 1  # the extension's canny: OpenCV Canny(low=threshold_a, high=threshold_b)
    want = cv2.Canny(np.asarray(img), 100, 200)
    assert (np.asarray(det.image.convert("L")) == want).all() and want.any()


def test_webuiapi_units_equal_the_python_api(server, pipe):
    api = webuiapi.WebUIApi(host="127.0.0.1", port=server.port)
    m1, m2 = control_map(256, 256, seed=1), control_map(256, 256, seed=2)
    units = [webuiapi.ControlNetUnit(image=m1, module="none", model="cn-a [0123abcd]", weight=0.7,
                                     resize_mode="Just Resize", guidance_start=0.0, guidance_end=0.7,
                                     control_mode="Balanced"),
             webuiapi.ControlNetUnit(image=m2, module="none", model="cn-b", weight=1.2, resize_mode="Just Resize",
                                     guidance_start=0.3, guidance_end=1.0)]
    res = api.txt2img(prompt="a lighthouse", seed=5, steps=STEPS, cfg_scale=6.0, width=256, height=256,
                      sampler_name="Euler", controlnet_units=units)
    ref = pipe("a lighthouse", "", height=256, width=256, num_inference_steps=STEPS, guidance_scale=6.0,
               scheduler="euler", refiner=False, seed=5, control_image=[m1, m2], controlnet=["cn-a", "cn-b"],
               controlnet_conditioning_scale=[0.7, 1.2], control_guidance_start=[0.0, 0.3],
               control_guidance_end=[0.7, 1.0]).images[0]
    assert_same_pixels(res.image, ref)
    # no unit (webuiapi then sends {"args": []}) is the plain image
    plain = api.txt2img(prompt="a lighthouse", seed=5, steps=STEPS, cfg_scale=6.0, width=256, height=256,
                        sampler_name="Euler")
    ref_plain = pipe("a lighthouse", "", height=256, width=256, num_inference_steps=STEPS, guidance_scale=6.0,
                     scheduler="euler", refiner=False, seed=5).images[0]
    assert_same_pixels(plain.image, ref_plain)


def test_native_controlnets_equal_the_python_api(server, pipe):
    m = control_map(192, 320, seed=4)
    buf = io.BytesIO()
    m.save(buf, format="PNG")
    b64 = base64.b64encode(buf.getvalue()).decode()
    status, _, raw = request(server.url + "/v1/generate", {
        "prompt": "a bridge", "seed": 8, "num_inference_steps": STEPS, "refiner": False,
        "controlnets": [{"model": "cn-b", "image": b64, "scale": 0.9, "start": 0.0, "end": 0.8, "guess_mode": True}]})
    body = json.loads(raw)
    assert status == 200, body
    from PIL import Image

    got = Image.open(io.BytesIO(base64.b64decode(body["images"][0])))
    assert got.size == (320, 192)  # the control image's size (diffusers' default)
    ref = pipe("a bridge", height=192, width=320, num_inference_steps=STEPS, refiner=False, seed=8, control_image=m,
               controlnet="cn-b", controlnet_conditioning_scale=0.9, control_guidance_end=0.8,
               guess_mode=True).images[0]
    assert_same_pixels(got, ref)


@pytest.mark.parametrize("unit,param", [
    ({"model": "nope"}, "model"),
    ({"control_mode": "My prompt is more important"}, "control_mode"),
    ({"control_mode": 2}, "control_mode"),
    ({"module": "depth_midas"}, "module"),
    ({"weight": "heavy"}, "weight"),
    ({"weight": 2.5}, "weight"),
    ({"guidance_start": 0.6, "guidance_end": 0.4}, "guidance_start"),
    ({"image": "not base64!"}, "image"),
    ({"module": "canny", "processor_res": 100000}, "processor_res"),  # would resize to a 30 GB array
    ({"module": "canny", "threshold_a": "low"}, "threshold_a"),
    ({"module": "tile_resample", "threshold_a": 1e6}, "threshold_a"),
])
def test_bad_units_are_400_naming_the_field(server, unit, param):
    img = webuiapi.raw_b64_img(control_map(64, 64))
    full = {"image": img, "module": "none", "model": "cn-a", "weight": 1.0, **unit}
    status, _, raw = request(server.url + "/sdapi/v1/txt2img", {
        "prompt": "x", "steps": 1, "width": 64, "height": 64, "alwayson_scripts": {"ControlNet": {"args": [full]}}})
    assert status == 400, raw
    assert param in raw.decode(), raw
    status, _, _ = request(server.url + "/sdapi/v1/txt2img", {"prompt": "x", "steps": 1, "width": 64, "height": 64})
    assert status == 200  # still serving


@pytest.mark.parametrize("extra, param", [
    ({"controlnet_processor_res": 100000}, "controlnet_processor_res"),
    ({"controlnet_processor_res": "big"}, "controlnet_processor_res"),
    ({"controlnet_threshold_a": "low"}, "controlnet_threshold_a"),
    ({"controlnet_module": "tile_resample", "controlnet_threshold_a": 1e6}, "controlnet_threshold_a"),
    ({"controlnet_module": "depth_midas"}, "controlnet_module"),
    ({"controlnet_images": []}, "controlnet_images"),
])
def test_detect_refuses_hostile_arguments_with_a_400_naming_them(server, extra, param):
    body = {"controlnet_images": [webuiapi.raw_b64_img(control_map(64, 64))], "controlnet_module": "canny", **extra}
    status, _, raw = request(server.url + "/controlnet/detect", body)
    assert status == 400, raw
    assert param in raw.decode(), raw
    status, _, raw = request(server.url + "/controlnet/detect", {**body, **{k: v for k, v in {
        "controlnet_images": body["controlnet_images"] or [webuiapi.raw_b64_img(control_map(64, 64))],
        "controlnet_module": "canny", "controlnet_processor_res": 64, "controlnet_threshold_a": 100}.items()}})
    assert status == 200, raw  # still serving
