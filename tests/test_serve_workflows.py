"""Inpainting and hires fix through the server, with the real clients: ``webuiapi`` (img2img with a
mask, txt2img with ``enable_hr``) and ``openai`` (``images.edit``), on 127.0.0.1.

Each image is compared (<= 1/255) with the runtime on the same artifacts and seeds, composed
the way docs/inpainting-and-hires.md says the web UI's fields map (the runtime itself equals
diffusers' pipelines: tests/test_inpaint.py, tests/test_hires.py). The web UI's mask blur,
fill and paste-back are re-implemented here from its source as the oracle. Then the bad
inputs: a 400 naming the field, and the server keeps serving.
"""

from __future__ import annotations

import io
import json
import math

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFilter, ImageOps
from serve_helpers import assert_same_pixels, pil_array, png_array, request
from test_img2img import test_image

openai = pytest.importorskip("openai")
webuiapi = pytest.importorskip("webuiapi")

STEPS = 4


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory, tiny_artifacts):
    """ONNX Runtime twin engines over 256x256 and its hires target at 1.5 (384x384), batch 1 and 2."""
    import shutil

    from sdxl_export.engines.build import BuildOptions, build

    out = tmp_path_factory.mktemp("serve-workflows") / "artifacts"
    shutil.copytree(tiny_artifacts, out)
    build(BuildOptions(out=out, backend="onnxruntime", buckets="256x256", hires_scales=(1.5,), batch_sizes=(1, 2),
                       profiles="static", validate=False))
    return out


def _mask(h: int, w: int) -> Image.Image:
    m = Image.new("L", (w, h), 0)
    ImageDraw.Draw(m).ellipse([w * 0.3, h * 0.25, w * 0.7, h * 0.6], fill=255)
    return m


# ---- the web UI's pre/post-processing, from its source (modules/processing.py, masking.py) -----------------
def webui_blur(mask: Image.Image, blur: int) -> Image.Image:
    import cv2

    arr = np.array(mask)
    k = 2 * int(2.5 * blur + 0.5) + 1
    arr = cv2.GaussianBlur(arr, (k, 1), blur)
    arr = cv2.GaussianBlur(arr, (1, k), blur)
    return Image.fromarray(arr)


def webui_fill(image: Image.Image, mask: Image.Image) -> Image.Image:
    image_mod = Image.new("RGBA", (image.width, image.height))
    image_masked = Image.new("RGBa", (image.width, image.height))
    image_masked.paste(image.convert("RGBA").convert("RGBa"), mask=ImageOps.invert(mask.convert("L")))
    image_masked = image_masked.convert("RGBa")
    for radius, repeats in [(256, 1), (64, 1), (16, 2), (4, 4), (2, 2), (0, 1)]:
        blurred = image_masked.filter(ImageFilter.GaussianBlur(radius)).convert("RGBA")
        for _ in range(repeats):
            image_mod.alpha_composite(blurred)
    return image_mod.convert("RGB")


def paste_back(mask: Image.Image, original: Image.Image, out: Image.Image) -> Image.Image:
    """The web UI's overlay: the original where the mask is black (alpha from the inverted mask)."""
    from diffusers.image_processor import VaeImageProcessor

    return VaeImageProcessor().apply_overlay(mask, original, out)


# ---- webuiapi: inpainting ------------------------------------------------------------------------------------
def test_webuiapi_inpaint_whole_picture_original_fill(server, pipe):
    """inpaint_full_res off, inpainting_fill 1, no blur: diffusers' inpainting at width x height, then the
    web UI's paste-back of the (resized) original outside the mask (x2 mask, here still binary)."""
    api = webuiapi.WebUIApi(host="127.0.0.1", port=server.port)
    init, mask = test_image(320, 320, seed=4), _mask(320, 320)
    res = api.img2img(images=[init], mask_image=mask, prompt="a red flower", seed=21, steps=STEPS, cfg_scale=6.0,
                      width=256, height=256, denoising_strength=0.8, sampler_name="Euler", batch_size=2,
                      mask_blur=0, inpainting_fill=1, inpaint_full_res=False)
    assert len(res.images) == 2 and res.info["all_seeds"] == [21, 22]
    for i in (0, 1):
        out = pipe("a red flower", "", image=init, mask_image=mask, height=256, width=256, strength=0.8,
                   num_inference_steps=STEPS, guidance_scale=6.0, scheduler="euler", refiner=False,
                   seed=21 + i).images[0]
        over = np.clip(np.asarray(mask.resize((256, 256), Image.LANCZOS), dtype=np.float32) * 2, 0, 255)
        ref = paste_back(Image.fromarray(over.astype(np.uint8)), init.resize((256, 256), Image.LANCZOS), out)
        assert_same_pixels(pil_array(res.images[i]), pil_array(ref))


def test_webuiapi_inpaint_with_its_defaults(server, pipe):
    """webuiapi's defaults: mask_blur 4, inpainting_fill 0 (fill), inpaint_full_res with padding 0
    (diffusers' padding_mask_crop: crop around the mask at width x height, paste back)."""
    api = webuiapi.WebUIApi(host="127.0.0.1", port=server.port)
    init, mask = test_image(320, 288, seed=5), _mask(320, 288)
    res = api.img2img(images=[init], mask_image=mask, prompt="a cat", seed=3, steps=STEPS, width=256, height=256,
                      denoising_strength=0.75, sampler_name="Euler a")
    blurred = webui_blur(mask.point(lambda x: 255 if x > 128 else 0), 4)
    out = pipe("a cat", "", image=webui_fill(init, blurred), mask_image=blurred, padding_mask_crop=0, height=256,
               width=256, strength=0.75, num_inference_steps=STEPS, guidance_scale=7.0, scheduler="euler_a",
               refiner=False, seed=3).images[0]
    # The pipeline pastes its crop back over the image it was given (the filled one): outside the
    # blurred mask that is the original, exactly; inside the blur band it is the filled image (the
    # web UI pastes its original there: docs/inpainting-and-hires.md, "what differs").
    got = res.images[0]
    assert got.size == init.size
    assert_same_pixels(pil_array(got), pil_array(out))
    outside = np.asarray(blurred) == 0
    assert np.array_equal(pil_array(got)[outside], pil_array(init)[outside])


def test_webuiapi_inpaint_values_we_cannot_honour_and_bad_masks(server):
    img = test_image(256, 256)
    base = {"init_images": [webuiapi.b64_img(img)], "mask": webuiapi.b64_img(_mask(256, 256)), "prompt": "x",
            "steps": 2, "width": 256, "height": 256}
    for extra, field in [({"inpainting_fill": 2}, "inpainting_fill"), ({"inpainting_fill": 3}, "inpainting_fill"),
                         ({"initial_noise_multiplier": 0.5}, "initial_noise_multiplier"),
                         ({"resize_mode": 3}, "resize_mode"), ({"mask": "data:image/png;base64,AAAA"}, "mask"),
                         ({"mask": webuiapi.b64_img(Image.new("L", (256, 256), 0))}, "mask"),
                         ({"mask_blur": -1}, "mask_blur"), ({"inpaint_full_res": "yes"}, "inpaint_full_res")]:
        status, _, raw = request(server.url + "/sdapi/v1/img2img", {**base, **extra})
        assert status == 400, (extra, raw)
        assert field in json.loads(raw)["detail"], raw
    status, _, raw = request(server.url + "/sdapi/v1/img2img", {**base, "inpainting_mask_invert": 1})
    assert status == 200, raw  # the server kept serving


# ---- webuiapi: hires fix -------------------------------------------------------------------------------------
def test_webuiapi_hires_fix_equals_the_runtime(server, pipe):
    api = webuiapi.WebUIApi(host="127.0.0.1", port=server.port)
    res = api.txt2img(prompt="a lighthouse", seed=8, steps=STEPS, cfg_scale=5.0, width=256, height=256,
                      sampler_name="Euler", enable_hr=True, hr_scale=1.5, hr_upscaler="Latent (bicubic)",
                      hr_second_pass_steps=3, denoising_strength=0.6)
    assert res.images[0].size == (384, 384)
    n = math.ceil(3 / 0.6)  # A1111: that many steps of a schedule of steps / strength
    ref = pipe("a lighthouse", "", height=256, width=256, num_inference_steps=STEPS, guidance_scale=5.0,
               scheduler="euler", refiner=False, seed=8, hires_scale=1.5, hires_upscaler="latent-bicubic",
               hires_steps=n, hires_strength=0.6)
    assert ref.info["base_steps"] == 3
    assert_same_pixels(pil_array(res.images[0]), pil_array(ref.images[0]))


def test_webuiapi_upscaler_lists_and_hires_refusals(server):
    api = webuiapi.WebUIApi(host="127.0.0.1", port=server.port)
    assert [u["name"] for u in api.get_upscalers()] == ["None", "Lanczos", "Nearest"]
    assert [m["name"] for m in api.get_latent_upscale_modes()] == [
        "Latent", "Latent (antialiased)", "Latent (bicubic)", "Latent (bicubic antialiased)", "Latent (nearest)",
        "Latent (nearest-exact)"]
    for extra, needle in [({"hr_upscaler": "R-ESRGAN 4x+"}, "hr_upscaler"), ({"hr_scale": 2}, "hires target 512x512"),
                          ({"hr_prompt": "other"}, "hr_prompt"), ({"hr_sampler_name": "DDIM"}, "hr_sampler_name")]:
        with pytest.raises(RuntimeError) as info:
            api.txt2img(**{"prompt": "x", "steps": 2, "width": 256, "height": 256, "enable_hr": True,
                           "hr_scale": 1.5, **extra})
        status, text = info.value.args
        assert status == 400 and needle in json.loads(text)["detail"], text
    res = api.txt2img(prompt="x", steps=2, width=256, height=256, seed=1)  # still serving
    assert res.images[0].size == (256, 256)


# ---- openai: images.edit ---------------------------------------------------------------------------------------
def _png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def test_openai_edit_with_a_mask_equals_the_runtime(server, pipe):
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused")
    init = test_image(256, 256, seed=6)
    area = _mask(256, 256)
    mask = Image.new("RGBA", (256, 256), (0, 0, 0, 255))
    mask.putalpha(ImageOps.invert(area))  # alpha 0 = redraw
    res = client.images.edit(model="sdxl-tiny", image=("in.png", _png(init), "image/png"),
                             mask=("mask.png", _png(mask), "image/png"), prompt="a blue bird", n=2, size="256x256",
                             response_format="b64_json",
                             extra_body={"seed": 40, "steps": STEPS, "strength": 0.85, "guidance_scale": 6.0,
                                         "negative_prompt": "blurry"})
    assert len(res.data) == 2
    for i, item in enumerate(res.data):
        ref = pipe("a blue bird", "blurry", image=init, mask_image=area, height=256, width=256, strength=0.85,
                   num_inference_steps=STEPS, guidance_scale=6.0, seed=40 + i).images[0]
        assert_same_pixels(png_array(item.b64_json), pil_array(ref))


def test_openai_edit_without_a_mask_redraws_the_transparent_pixels(server, pipe):
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused")
    init = test_image(256, 256, seed=7).convert("RGBA")
    area = _mask(256, 256)
    init.putalpha(ImageOps.invert(area))
    res = client.images.edit(image=("in.png", _png(init), "image/png"), prompt="a hat",
                             extra_body={"seed": 2, "steps": STEPS})
    ref = pipe("a hat", image=init.convert("RGB"), mask_image=area, num_inference_steps=STEPS, seed=2).images[0]
    assert_same_pixels(png_array(res.data[0].b64_json), pil_array(ref))


def test_openai_edit_bad_input_names_the_field_and_the_server_keeps_serving(server):
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
    rgb = _png(test_image(256, 256))
    cases = [({"image": ("in.png", rgb, "image/png")}, "image"),  # no mask, no transparency
             ({"image": ("in.png", rgb, "image/png"), "mask": ("m.png", rgb, "image/png")}, "mask"),  # no alpha
             ({"image": ("in.png", b"not a png", "image/png")}, "image"),
             ({"image": ("in.png", rgb, "image/png"), "mask": ("m.png", _png(Image.new("RGBA", (256, 256),
                                                                                        (0, 0, 0, 255))),
                                                               "image/png")}, "mask"),  # nothing transparent
             ({"image": ("in.png", rgb, "image/png"), "mask": ("m.png", _png(Image.new("RGBA", (64, 64))),
                                                               "image/png"),
               "extra_body": {"strength": 1.5}}, "strength")]
    for kwargs, param in cases:
        with pytest.raises(openai.BadRequestError) as info:
            client.images.edit(prompt="x", **kwargs)
        assert info.value.body["param"] == param, info.value.body
    status, _, raw = request(server.url + "/v1/images/edits", {"prompt": "x"})
    assert status == 400 and "multipart" in json.loads(raw)["error"]["message"]
    # a mask of another size than the image is resized (as diffusers does): it runs
    mask = Image.new("RGBA", (64, 64), (0, 0, 0, 255))
    mask.paste((0, 0, 0, 0), (16, 16, 48, 48))
    res = client.images.edit(image=("in.png", rgb, "image/png"), mask=("m.png", _png(mask), "image/png"),
                             prompt="x", extra_body={"seed": 1, "steps": 2})
    assert png_array(res.data[0].b64_json).shape == (256, 256, 3)


# ---- native: inpainting on /v1/generate ----------------------------------------------------------------------
def _b64(image: Image.Image) -> str:
    import base64

    return base64.b64encode(_png(image)).decode()


def test_native_inpainting_equals_the_runtime(server, pipe):
    init, area = test_image(256, 256, seed=8), _mask(256, 256)
    for extra, kw in (({}, {}), ({"strength": 0.7, "padding_mask_crop": 16}, {"strength": 0.7, "padding_mask_crop": 16})):
        status, _, raw = request(server.url + "/v1/generate", {
            "prompt": "a green lamp", "image": _b64(init), "mask_image": _b64(area), "seed": 12,
            "num_inference_steps": STEPS, "num_images_per_prompt": 2, **extra})
        assert status == 200, raw
        out = json.loads(raw)
        assert out["seeds"] == [12, 13]
        for i, b64 in enumerate(out["images"]):
            ref = pipe("a green lamp", image=init, mask_image=area, num_inference_steps=STEPS, seed=12 + i,
                       **kw).images[0]
            assert_same_pixels(png_array(b64), pil_array(ref))


@pytest.mark.parametrize("body, param", [
    ({"mask_image": "MASK"}, "mask_image"),  # no image to mask
    ({"image": "IMG", "mask_image": "MASK", "mask": "MASK"}, "mask"),
    ({"image": "IMG", "padding_mask_crop": 8}, "padding_mask_crop"),  # no mask
    ({"image": "IMG", "mask_image": "not base64!"}, "mask_image"),
    ({"image": "IMG", "mask_image": "BLACK"}, "mask"),  # nothing to repaint
])
def test_native_inpainting_bad_input_is_400_naming_the_field(server, body, param):
    values = {"IMG": _b64(test_image(256, 256)), "MASK": _b64(_mask(256, 256)),
              "BLACK": _b64(Image.new("L", (256, 256), 0))}
    body = {k: values.get(v, v) if isinstance(v, str) else v for k, v in body.items()}
    status, _, raw = request(server.url + "/v1/generate", {"prompt": "x", "num_inference_steps": 2, **body})
    assert status == 400, raw
    assert param in raw.decode(), raw
