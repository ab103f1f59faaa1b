"""What real clients hit (issue 18 §4): A1111's settings POST and start-up endpoints, its
status codes, ``--size-policy nearest``, ``--model-alias``, and Ray's ``key=value`` arguments.
In-process app; the size policy on the ORT twin engines of two buckets (256x256, 192x320)."""

from __future__ import annotations

import base64
import io
import json

import pytest
from serve_helpers import serve_artifacts
from serve_inproc import inproc

STEPS = 2


@pytest.fixture(scope="module")
def bucketed(tmp_path_factory, tiny_artifacts):
    return serve_artifacts(tmp_path_factory, tiny_artifacts)


@pytest.fixture(scope="module")
def nearest(bucketed):
    with inproc(bucketed, size_policy="nearest", model_aliases=("dall-e-3", "gpt-image-1"),
                max_queue=8) as (client, service):
        assert service.ready, service.load_error
        yield client


def test_a1111_default_512_snaps_to_the_nearest_bucket_and_says_so(nearest):
    r = nearest.post("/sdapi/v1/txt2img", json={"prompt": "x", "steps": STEPS})  # the web UI's 512x512
    assert r.status_code == 200, r.text
    info = json.loads(r.json()["info"])
    assert (info["width"], info["height"]) == (256, 256)
    assert any("512x512" in n and "256x256" in n for n in info["sdxl_export_notes"])
    from PIL import Image

    assert Image.open(io.BytesIO(base64.b64decode(r.json()["images"][0]))).size == (256, 256)
    r = nearest.post("/sdapi/v1/txt2img", json={"prompt": "x", "steps": STEPS, "width": 1000, "height": 600})
    assert json.loads(r.json()["info"])["width"] == 320  # wide -> the wide bucket
    assert nearest.get("/v1/info").json()["size_policy"] == "nearest"


def test_openai_sizes_and_model_aliases(nearest):
    for model in ("dall-e-3", "gpt-image-1"):
        r = nearest.post("/v1/images/generations", json={"prompt": "x", "model": model, "size": "1024x1024",
                                                          "steps": STEPS})
        assert r.status_code == 200, r.text
    ids = [m["id"] for m in nearest.get("/v1/models").json()["data"]]
    assert ids[1:] == ["dall-e-3", "gpt-image-1"]
    r = nearest.post("/v1/images/generations", json={"prompt": "x", "model": "dall-e-2", "steps": STEPS})
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    r = nearest.post("/v1/generate", json={"prompt": "x", "height": 512, "width": 512, "num_inference_steps": STEPS,
                                           "refiner": False})
    assert r.status_code == 200 and r.json()["notes"], r.text


def test_exact_policy_refuses_unserved_sizes(bucketed):
    with inproc(bucketed) as (client, _):
        r = client.post("/sdapi/v1/txt2img", json={"prompt": "x", "steps": STEPS})
        assert r.status_code == 400 and "256x256" in r.json()["detail"]
        r = client.post("/v1/images/generations", json={"prompt": "x", "model": "dall-e-3", "steps": STEPS})
        assert r.status_code == 404  # no alias configured


def test_a1111_options_post_and_startup_endpoints(nearest):
    opts = nearest.get("/sdapi/v1/options").json()
    assert nearest.post("/sdapi/v1/options", json=opts).status_code == 200  # Open WebUI posts the whole dict
    assert nearest.post("/sdapi/v1/options", json={"sd_model_checkpoint": opts["sd_model_checkpoint"],
                                                   "outdir_samples": "x"}).status_code == 200
    r = nearest.post("/sdapi/v1/options", json={"sd_model_checkpoint": "sd_xl_base_1.0.safetensors"})
    assert r.status_code == 400 and "sd_model_checkpoint" in r.json()["detail"]
    r = nearest.post("/sdapi/v1/options", json={"CLIP_stop_at_last_layers": 2})
    assert r.status_code == 400
    assert nearest.get("/sdapi/v1/sd-vae").json() == []
    assert nearest.get("/sdapi/v1/embeddings").json() == {"loaded": {}, "skipped": {}}
    assert nearest.get("/sdapi/v1/prompt-styles").json() == []
    assert nearest.post("/sdapi/v1/refresh-checkpoints").status_code == 200
    mem = nearest.get("/sdapi/v1/memory").json()
    assert mem["ram"]["total"] > 0 and "cuda" in mem


def test_png_info_reads_the_infotext(nearest):
    from PIL import Image
    from PIL.PngImagePlugin import PngInfo

    meta = PngInfo()
    meta.add_text("parameters", "a red fox\nNegative prompt: blurry\nSteps: 20, Sampler: Euler a, CFG scale: 7, "
                                "Seed: 42, Size: 512x512")
    meta.add_text("Software", "sdxl-export")
    buf = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buf, format="PNG", pnginfo=meta)
    r = nearest.post("/sdapi/v1/png-info", json={"image": "data:image/png;base64," + base64.b64encode(
        buf.getvalue()).decode()})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["info"].startswith("a red fox") and body["items"] == {"Software": "sdxl-export"}
    p = body["parameters"]
    assert p["Prompt"] == "a red fox" and p["Negative prompt"] == "blurry" and p["Seed"] == "42"
    assert nearest.post("/sdapi/v1/png-info", json={"image": "not base64!"}).status_code == 400


def test_unknown_sampler_is_a_404_as_in_the_web_ui(nearest):
    r = nearest.post("/sdapi/v1/txt2img", json={"prompt": "x", "steps": STEPS, "sampler_name": "DPM adaptive"})
    assert r.status_code == 404 and "DPM adaptive" in r.json()["detail"]


def test_ray_key_value_arguments_take_the_configs_types():
    from sdxl_export.serve.config import ServeConfigError, config_from_args

    cfg = config_from_args({"load_refiner": "false", "cors_origins": "http://a.example,http://b.example",
                            "max_queue": "12", "timeout_s": "30", "model_aliases": "dall-e-3", "max_pixels": "65536",
                            "size_policy": "nearest", "lora_dir": "/tmp", "api_auth": "u:p", "warmup": "native",
                            "backend_options": '{"dtype": "float16"}', "max_batch_size": "none"})
    assert cfg.load_refiner is False
    assert cfg.cors_origins == ("http://a.example", "http://b.example")
    assert cfg.max_queue == 12 and cfg.timeout_s == 30.0 and cfg.max_pixels == 65536 and cfg.max_batch_size is None
    assert cfg.model_aliases == ("dall-e-3",) and cfg.size_policy == "nearest" and str(cfg.lora_dir) == "/tmp"
    assert cfg.basic_auth == ("u", "p") and cfg.warmup == ((0, 0),) and cfg.backend_options == {"dtype": "float16"}
    assert config_from_args({"load_refiner": True}).load_refiner is True  # typed values from a config file
    for bad in ({"load_refiner": "maybe"}, {"max_queue": "lots"}, {"no_such_option": "1"}):
        with pytest.raises(ServeConfigError):
            config_from_args(bad)
