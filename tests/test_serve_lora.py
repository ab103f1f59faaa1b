"""Per-request LoRA sets through the server: names from ``--lora-dir`` (native/OpenAI ``loras``,
A1111 ``<lora:name:scale>`` tags), each image equal to the runtime with that set, whatever
else is queued; names that are not in the folder (or look like paths) are 400s."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from lora_files import diffusers_lora, kohya_lora
from serve_helpers import ServerProcess, pil_array, png_array, request, serve_artifacts

webuiapi = pytest.importorskip("webuiapi")
STEPS = 4


@pytest.fixture(scope="module")
def lora_dir(tmp_path_factory, tiny_model):
    d = tmp_path_factory.mktemp("loras")
    diffusers_lora(tiny_model, d / "style.safetensors", seed=5)
    kohya_lora(tiny_model, d / "ink.safetensors", seed=9)
    return d


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory, tiny_artifacts):
    return serve_artifacts(tmp_path_factory, tiny_artifacts)


@pytest.fixture(scope="module")
def server(artifacts, lora_dir, tmp_path_factory):
    srv = ServerProcess(artifacts, "--lora-dir", str(lora_dir), "--batch-wait-ms", "100",
                        log_path=tmp_path_factory.mktemp("logs") / "server.log")
    yield srv
    assert srv.stop() == 0, srv.log()


@pytest.fixture(scope="module")
def pipe(artifacts, lora_dir):
    from sdxl_export.runtime import SDXLPipeline

    with SDXLPipeline.from_artifacts(artifacts, backend="onnxruntime", device="cpu") as p:
        p.lora_dir = lora_dir
        yield p


def _native(server, body):
    status, _, raw = request(server.url + "/v1/generate", {"num_inference_steps": STEPS, "height": 256, "width": 256,
                                                             "refiner": False, **body})
    assert status == 200, raw
    return json.loads(raw)


def _same(a: np.ndarray, b: np.ndarray) -> None:
    assert int(np.abs(a - b).max()) <= 1


def test_native_loras_equal_the_runtime_and_change_the_image(server, pipe):
    out = _native(server, {"prompt": "a cat", "seed": 3, "loras": {"style": 0.8, "ink": 0.5}})
    ref = pipe("a cat", height=256, width=256, num_inference_steps=STEPS, refiner=False, seed=3,
               loras={"style": 0.8, "ink": 0.5}).images[0]
    _same(png_array(out["images"][0]), pil_array(ref))
    plain = _native(server, {"prompt": "a cat", "seed": 3})
    assert int(np.abs(png_array(plain["images"][0]) - png_array(out["images"][0])).max()) > 5


def test_a1111_prompt_tags_select_loras_and_leave_the_prompt(server, pipe):
    api = webuiapi.WebUIApi(host="127.0.0.1", port=server.port)
    names = [x["name"] for x in api.custom_get("loras", baseurl=True)]
    assert names == ["ink", "style"]
    res = api.txt2img(prompt="a castle <lora:style:0.7>", seed=4, steps=STEPS, width=256, height=256,
                      sampler_name="Euler", cfg_scale=5.0)
    ref = pipe("a castle ", "", height=256, width=256, num_inference_steps=STEPS, refiner=False, seed=4,
               scheduler="euler", guidance_scale=5.0, loras={"style": 0.7}).images[0]
    _same(pil_array(res.images[0]), pil_array(ref))


def test_concurrent_requests_with_different_sets_each_get_their_own(server, pipe):
    bodies = [{"prompt": "a fox", "seed": 10 + i, "loras": sets}
              for i, sets in enumerate([{"style": 1.0}, {}, {"ink": 0.6}, {"style": 1.0}, {}, {"ink": 0.6}])]
    with ThreadPoolExecutor(6) as pool:
        outs = list(pool.map(lambda b: _native(server, b), bodies))
    for body, out in zip(bodies, outs):
        ref = pipe("a fox", height=256, width=256, num_inference_steps=STEPS, refiner=False, seed=body["seed"],
                   loras=body["loras"]).images[0]
        _same(png_array(out["images"][0]), pil_array(ref))


@pytest.mark.parametrize("body, field", [
    ({"loras": {"nope": 1.0}}, "loras"),
    ({"loras": {"../style": 1.0}}, "loras"),
    ({"loras": {"/etc/passwd": 1.0}}, "loras"),
    ({"loras": {"style": float("nan")}}, "loras"),
    ({"loras": {"style": 1e9}}, "loras"),
    ({"loras": ["style"]}, "loras"),
])
def test_bad_lora_requests_are_400_naming_the_field(server, body, field):
    raw_body = json.dumps({"prompt": "x", "num_inference_steps": 2, **body}).replace("NaN", "1e999")
    status, _, raw = request(server.url + "/v1/generate", raw=raw_body.encode())
    assert status == 400, raw
    err = json.loads(raw)["error"]
    assert err["param"] == field
    if "nope" in raw_body:
        assert "ink, style" in err["message"]
    status, _, raw = request(server.url + "/sdapi/v1/txt2img", {"prompt": "x", "negative_prompt": "<lora:style:1>"})
    assert status == 400 and "negative" in json.loads(raw)["detail"]
