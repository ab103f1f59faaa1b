"""The server through the real clients users have: ``openai`` and ``webuiapi``, on 127.0.0.1.

One server process for the module (tiny model, ONNX Runtime twin at batch 1, 2, 4). Every
image is compared with ``SDXLPipeline`` on the same artifacts and seed (<= 1/255 per pixel).
"""

from __future__ import annotations

import http.client
import json

import numpy as np
import pytest
from serve_helpers import (
    assert_same_pixels,
    metric_value,
    pil_array,
    png_array,
    request,
    serve_artifacts,
)

openai = pytest.importorskip("openai")
webuiapi = pytest.importorskip("webuiapi")

STEPS = 6


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory, tiny_artifacts):
    return serve_artifacts(tmp_path_factory, tiny_artifacts)


# ---- OpenAI -------------------------------------------------------------------------------------------
def test_openai_models_and_generation_equal_the_runtime(server, pipe):
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused")
    assert [m.id for m in client.models.list().data] == ["sdxl-tiny"]
    res = client.images.generate(model="sdxl-tiny", prompt="a red fox", n=2, size="320x192",
                                 response_format="b64_json",
                                 extra_body={"seed": 11, "steps": STEPS, "negative_prompt": "blurry",
                                             "scheduler": "euler_a", "guidance_scale": 6.0})
    assert res.created > 0 and len(res.data) == 2
    for i, item in enumerate(res.data):
        ref = pipe("a red fox", "blurry", height=192, width=320, num_inference_steps=STEPS, seed=11 + i,
                   scheduler="euler_a", guidance_scale=6.0).images[0]
        assert_same_pixels(png_array(item.b64_json), pil_array(ref))
    assert not np.array_equal(png_array(res.data[0].b64_json), png_array(res.data[1].b64_json))


def test_openai_defaults_are_the_runtime_defaults(server, pipe):
    """No steps/guidance/scheduler/refiner/negative given: 30 Euler steps, guidance 5, refiner at 0.8,
    zero negative conditioning, native size -- what ``sdxl-export run`` does."""
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused")
    res = client.images.generate(prompt="a lighthouse", extra_body={"seed": 5})
    ref = pipe("a lighthouse", seed=5).images[0]
    assert_same_pixels(png_array(res.data[0].b64_json), pil_array(ref))


@pytest.mark.parametrize("kwargs, param, status", [
    ({"size": "512x512"}, "size", 400),            # not served: the error lists what is
    ({"size": "big"}, "size", 400),
    ({"response_format": "url"}, "response_format", 400),
    ({"quality": "hd"}, "quality", 400),
    ({"n": 50}, "n", 400),
    ({"extra_body": {"steps": 0}}, "steps", 400),
    ({"extra_body": {"scheduler": "heun_plus"}}, None, 400),
    ({"extra_body": {"wibble": 1}}, "wibble", 400),
    ({"model": "dall-e-3"}, "model", 404),
])
def test_openai_bad_requests_name_the_field(server, kwargs, param, status):
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
    kwargs = dict(kwargs)
    extra = {"steps": STEPS, **kwargs.pop("extra_body", {})}
    with pytest.raises(openai.APIStatusError) as info:
        client.images.generate(prompt="x", extra_body=extra, **kwargs)
    err = info.value
    assert err.status_code == status
    body = err.body if isinstance(err.body, dict) else {}
    assert body.get("message"), err
    if param:
        assert body.get("param") == param or param in body.get("message", ""), body
    if param == "size" and kwargs.get("size") == "512x512":
        assert "256x256" in body["message"] and "320x192" in body["message"]


# ---- AUTOMATIC1111 ------------------------------------------------------------------------------------
def test_webuiapi_txt2img_batch_and_seeds(server, pipe):
    api = webuiapi.WebUIApi(host="127.0.0.1", port=server.port)
    res = api.txt2img(prompt="a castle", negative_prompt="fog", seed=21, steps=STEPS, cfg_scale=7.0,
                      width=256, height=256, sampler_name="Euler", batch_size=2, n_iter=2)
    assert len(res.images) == 4
    assert res.info["all_seeds"] == [21, 22, 23, 24] and res.info["seed"] == 21
    assert res.info["sampler_name"] == "Euler" and res.info["width"] == 256
    assert "Seed: 23" in res.info["infotexts"][2] and "Negative prompt: fog" in res.info["infotexts"][0]
    for i in (0, 3):
        ref = pipe("a castle", "fog", height=256, width=256, num_inference_steps=STEPS, guidance_scale=7.0,
                   scheduler="euler", refiner=False, seed=21 + i).images[0]
        assert_same_pixels(pil_array(res.images[i]), pil_array(ref))


def test_webuiapi_random_seed_is_reported_and_reproducible(server, pipe):
    api = webuiapi.WebUIApi(host="127.0.0.1", port=server.port)
    res = api.txt2img(prompt="a boat", steps=STEPS, width=256, height=256, sampler_name="DPM++ 2M",
                      scheduler="Karras")
    seed = res.info["seed"]
    assert isinstance(seed, int) and seed >= 0 and "Schedule type: Karras" in res.info["infotexts"][0]
    ref = pipe("a boat", "", height=256, width=256, num_inference_steps=STEPS, guidance_scale=7.0,
               scheduler="dpmpp_2m_karras", refiner=False, seed=seed).images[0]
    assert_same_pixels(pil_array(res.images[0]), pil_array(ref))


def test_webuiapi_refiner_runs_only_when_named(server, pipe):
    api = webuiapi.WebUIApi(host="127.0.0.1", port=server.port)
    titles = [m["title"] for m in api.get_sd_models()]
    refiner = next(t for t in titles if "refiner" in t)
    payload = {"prompt": "a tower", "seed": 8, "steps": STEPS, "width": 320, "height": 192, "cfg_scale": 5.0,
               "sampler_name": "Euler a", "refiner_checkpoint": refiner, "refiner_switch_at": 0.7}
    res = api.custom_post("txt2img", payload=payload, baseurl=True)
    ref = pipe("a tower", "", height=192, width=320, num_inference_steps=STEPS, guidance_scale=5.0,
               scheduler="euler_a", refiner=True, denoising_end=0.7, seed=8).images[0]
    assert_same_pixels(pil_array(res.images[0]), pil_array(ref))
    assert res.info["extra_generation_params"]["Refiner switch at"] == 0.7


def test_webuiapi_lists(server):
    api = webuiapi.WebUIApi(host="127.0.0.1", port=server.port)
    names = [s["name"] for s in api.get_samplers()]
    assert {"Euler", "Euler a", "DPM++ 2M", "DPM++ 2M Karras", "DDIM", "UniPC"} <= set(names)
    models = api.get_sd_models()
    assert [m["model_name"] for m in models] == ["sdxl-tiny", "sdxl-tiny-refiner"]
    assert api.get_options()["sd_model_checkpoint"] == models[0]["title"]


@pytest.mark.parametrize("field, value", [("restore_faces", True), ("tiling", True),
                                          ("subseed_strength", 0.5), ("styles", ["anime"]),
                                          ("alwayson_scripts", {"ControlNet": {"args": [1]}}),
                                          ("sampler_name", "DPM adaptive"), ("width", 333),
                                          ("refiner_checkpoint", "other-refiner"),
                                          ("override_settings", {"sd_model_checkpoint": "other"})])
def test_webuiapi_values_we_cannot_honour_are_4xx_naming_the_field(server, field, value):
    api = webuiapi.WebUIApi(host="127.0.0.1", port=server.port)
    kwargs = {"prompt": "x", "steps": STEPS, "width": 256, "height": 256, field: value}
    call = api.txt2img if field not in ("refiner_checkpoint",) else None
    with pytest.raises(RuntimeError) as info:
        if call is not None:
            call(**kwargs)
        else:
            api.custom_post("txt2img", payload=kwargs, baseurl=True)
    status, text = info.value.args
    assert status == (404 if field == "sampler_name" else 400)  # the web UI: 404 "Sampler not found"
    body = json.loads(text)
    assert set(body) >= {"error", "detail", "errors"}
    assert field.split("_")[0] in body["detail"], body


def test_a1111_defaults_of_every_other_field_are_accepted(server):
    """hires-fix fields at any value while enable_hr is off, unknown empty fields, sampler_index."""
    body = {"prompt": "x", "steps": 2, "width": 256, "height": 256, "enable_hr": False, "hr_scale": 4,
            "hr_upscaler": "ESRGAN", "denoising_strength": 0.3, "sampler_index": "Euler a",
            "some_future_field": None, "another": "", "override_settings": {"CLIP_stop_at_last_layers": 1},
            "send_images": True, "save_images": False}
    status, _, raw = request(server.url + "/sdapi/v1/txt2img", body)
    assert status == 200, raw
    assert json.loads(json.loads(raw)["info"])["sampler_name"] == "Euler a"


# ---- native + operations -------------------------------------------------------------------------------------
def test_native_generate_returns_seeds_and_timings(server, pipe):
    body = {"prompt": ["a cat", "a dog"], "num_images_per_prompt": 1, "seed": 40, "num_inference_steps": STEPS,
            "height": 192, "width": 320, "refiner": False, "scheduler": "ddim"}
    status, headers, raw = request(server.url + "/v1/generate", body)
    assert status == 200, raw
    out = json.loads(raw)
    assert out["seeds"] == [40, 41] and len(out["images"]) == 2 and headers.get("x-request-id")
    assert all(t["stages_ms"]["unet"] > 0 and t["batch_size"] >= 1 for t in out["timings"])
    ref = pipe("a dog", height=192, width=320, num_inference_steps=STEPS, refiner=False, scheduler="ddim",
               seed=41).images[0]
    assert_same_pixels(png_array(out["images"][1]), pil_array(ref))


def test_bad_bodies(server):
    status, _, raw = request(server.url + "/v1/images/generations", raw=b"{not json")
    assert status == 400 and json.loads(raw)["error"]["param"] == "body"
    # A body announced over the cap is refused before it is read (the client sends headers only).
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    conn.putrequest("POST", "/v1/images/generations")
    conn.putheader("Content-Type", "application/json")
    conn.putheader("Content-Length", str(33 << 20))  # over the default 32 MiB cap
    conn.endheaders()
    resp = conn.getresponse()
    assert resp.status == 413 and "bytes" in json.loads(resp.read())["error"]["message"]
    conn.close()
    status, _, raw = request(server.url + "/v1/images/generations", {"prompt": "x" * 5000})
    assert status == 400 and "characters" in json.loads(raw)["error"]["message"]
    status, _, raw = request(server.url + "/sdapi/v1/txt2img", raw=b"[1, 2]")
    assert status == 400 and json.loads(raw)["error"] == "ParamError"
    status, _, _ = request(server.url + "/v1/images/generations", {"prompt": "x", "path": "/etc/passwd"})
    assert status == 400


def test_health_ready_metrics(server):
    assert request(server.url + "/healthz")[0] == 200
    status, _, raw = request(server.url + "/readyz")
    assert status == 200 and json.loads(raw)["max_batch_size"] == 4
    status, headers, raw = request(server.url + "/metrics")
    text = raw.decode()
    assert status == 200 and headers["content-type"].startswith("text/plain")
    assert metric_value(text, "sdxl_requests_total", route="POST /v1/images/generations", status="200") >= 1
    assert metric_value(text, "sdxl_requests_total", route="POST /sdapi/v1/txt2img", status="400") >= 1
    assert metric_value(text, "sdxl_images_generated_total") >= 4
    assert metric_value(text, "sdxl_batch_size_count") >= 1
    assert metric_value(text, "sdxl_stage_seconds_count", stage="unet") >= 1
    assert metric_value(text, "sdxl_queue_wait_seconds_count") >= 1
    assert metric_value(text, "sdxl_errors_total", kind="ParamError") >= 1
    assert "sdxl_queue_depth" in text and metric_value(text, "sdxl_ready") == 1
    log = server.log()
    assert "route=POST /v1/images/generations status=200" in log and "queue_ms=" in log


# ---- img2img ---------------------------------------------------------------------------------------------
def _busy_image(height: int, width: int, seed: int = 0):
    from PIL import Image

    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def test_webuiapi_img2img_equals_the_runtime_and_a_1024_png_fits_the_body_cap(server, pipe):
    """A 1024x1024 noise PNG is ~4 MiB in base64 (over the old 1 MiB cap); the web UI's "Just
    resize" to width x height is diffusers' resize; each image of the batch has its own seed."""
    api = webuiapi.WebUIApi(host="127.0.0.1", port=server.port)
    init = _busy_image(1024, 1024)
    res = api.img2img(images=[init], prompt="a painting", seed=31, steps=STEPS, cfg_scale=7.0, width=256,
                      height=256, denoising_strength=0.6, sampler_name="Euler", batch_size=2)
    assert len(res.images) == 2 and res.info["all_seeds"] == [31, 32]
    assert res.info["denoising_strength"] == 0.6 and "Denoising strength: 0.6" in res.info["infotexts"][0]
    assert res.parameters["init_images"] is None  # as the web UI: not echoed back
    for i in (0, 1):
        ref = pipe("a painting", "", image=init, height=256, width=256, strength=0.6, num_inference_steps=STEPS,
                   guidance_scale=7.0, scheduler="euler", refiner=False, seed=31 + i).images[0]
        assert_same_pixels(pil_array(res.images[i]), pil_array(ref))


def test_webuiapi_img2img_refuses_an_empty_mask_and_bad_images(server):
    """(Inpainting itself: tests/test_serve_workflows.py.)"""
    from PIL import Image

    api = webuiapi.WebUIApi(host="127.0.0.1", port=server.port)
    img = _busy_image(256, 256)
    with pytest.raises(RuntimeError) as info:
        api.img2img(images=[img], mask_image=Image.new("L", (256, 256), 0), prompt="x", steps=STEPS, width=256,
                    height=256)
    assert info.value.args[0] == 400 and "the mask is empty" in json.loads(info.value.args[1])["detail"]
    for body, field in [({"init_images": ["data:image/png;base64,AAAA"]}, "init_images[0]"),
                        ({"init_images": ["not base64!"]}, "init_images[0]"),
                        ({"init_images": []}, "init_images"),
                        ({"init_images": [webuiapi.b64_img(img)], "denoising_strength": 0}, "denoising_strength"),
                        ({"init_images": [webuiapi.b64_img(img)], "resize_mode": 2}, "resize_mode")]:
        status, _, raw = request(server.url + "/sdapi/v1/img2img",
                                 {"prompt": "x", "steps": 2, "width": 256, "height": 256, **body})
        assert status == 400, raw
        assert field in json.loads(raw)["detail"], raw


def test_native_generate_with_an_image(server, pipe):
    import base64
    import io

    img = _busy_image(192, 320, seed=2)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    b64 = base64.b64encode(buf.getvalue()).decode()
    body = {"prompt": "a harbour", "image": b64, "strength": 0.5, "refiner_only": True, "seed": 12,
            "num_inference_steps": STEPS}
    status, _, raw = request(server.url + "/v1/generate", body)
    assert status == 200, raw
    out = json.loads(raw)
    ref = pipe("a harbour", image=img, strength=0.5, refiner_only=True, num_inference_steps=STEPS,
               seed=12).images[0]
    assert_same_pixels(png_array(out["images"][0]), pil_array(ref))
    # The image's own size is served or refused, naming the sizes that are.
    status, _, raw = request(server.url + "/v1/generate", {"prompt": "x", "image": webuiapi.raw_b64_img(
        _busy_image(320, 320)), "strength": 0.5, "num_inference_steps": 2})
    assert status == 400 and "256x256" in json.loads(raw)["error"]["message"], raw
    status, _, raw = request(server.url + "/v1/generate", {"prompt": "x", "strength": 0.5})
    assert status == 400 and "no image was given" in json.loads(raw)["error"]["message"], raw
    # A mask makes it inpainting (tests/test_serve_workflows.py); without the image it masks, a 400.
    status, _, raw = request(server.url + "/v1/generate", {"prompt": "x", "mask": b64})
    assert status == 400 and json.loads(raw)["error"]["param"] == "mask", raw
