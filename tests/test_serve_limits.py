"""Resource limits at the server's edge (issue 18 §1): nothing a client sends may exhaust the
replica. The app runs in-process on the tiny model's plain export (ONNX Runtime, *dynamic*
shapes: no engine bounds the size, so only the server's own caps do)."""

from __future__ import annotations

import asyncio
import base64
import json
import socket
import threading
import time
from typing import ClassVar

import pytest
from serve_helpers import ServerProcess, request
from serve_inproc import inproc, png_b64, png_header_only

STEPS = 2


@pytest.fixture(scope="module")
def served(tiny_artifacts):
    with inproc(tiny_artifacts, max_queue=8) as (client, service):
        assert service.ready, service.load_error
        yield client, service


def _native(client, **body):
    return client.post("/v1/generate", json={"prompt": "x", "num_inference_steps": STEPS, "refiner": False, **body})


def test_a_dynamic_export_caps_output_pixels_at_the_largest_bucket(served):
    client, service = served
    cap = service.max_pixels
    n = service.pipe.native_size
    assert cap == max(h * w for h, w in [(b.height, b.width) for b in __import__(
        "sdxl_export.buckets", fromlist=["buckets_for"]).buckets_for(n)])
    r = _native(client, height=2048, width=2048)
    assert r.status_code == 400, r.text
    assert "pixels" in r.json()["error"]["message"] and str(cap) in r.json()["error"]["message"]
    info = client.get("/v1/info").json()
    assert info["max_pixels"] == cap


def test_max_pixels_option_caps_every_api(tiny_artifacts):
    with inproc(tiny_artifacts, max_pixels=128 * 128) as (client, _):
        assert _native(client, height=128, width=128).status_code == 200
        assert _native(client, height=192, width=128).status_code == 400
        r = client.post("/sdapi/v1/txt2img", json={"prompt": "x", "steps": STEPS, "width": 256, "height": 256})
        assert r.status_code == 400 and "16384" in r.json()["detail"]
        r = client.post("/v1/images/generations", json={"prompt": "x", "size": "256x256", "steps": STEPS})
        assert r.status_code == 400


def test_img2img_keeps_no_oversized_upload(served):
    """img2img without a size keeps the upload's size: over the cap it is refused."""
    client, service = served
    side = int(service.max_pixels ** 0.5) + 64
    side -= side % 8
    r = _native(client, image=png_b64(side, side))
    assert r.status_code == 400, r.text
    assert "pixels" in r.json()["error"]["message"]


def test_uploads_are_capped_from_their_header_before_decoding(served):
    """A header declaring more pixels than the cap is refused as such, before its (truncated)
    data would be decoded; PIL's decompression-bomb error is a 400 too (900 MP, ~100 bytes)."""
    client, _ = served
    big = base64.b64encode(png_header_only(5000, 5000)).decode()  # over --max-upload-pixels (4096^2)
    r = _native(client, image=big)
    assert r.status_code == 400 and "over the cap" in r.json()["error"]["message"], r.text
    bomb = base64.b64encode(png_header_only(30000, 30000)).decode()
    for path, body in (("/v1/generate", {"prompt": "x", "image": bomb}),
                       ("/sdapi/v1/img2img", {"prompt": "x", "init_images": [bomb], "steps": STEPS})):
        r = client.post(path, json=body)
        assert r.status_code == 400, (path, r.status_code, r.text)


def test_truncated_image_is_a_400(served):
    client, _ = served
    raw = base64.b64decode(png_b64(64, 64))
    r = _native(client, image=base64.b64encode(raw[: len(raw) // 2]).decode())
    assert r.status_code == 400, r.text


def test_surplus_init_images_are_refused(served):
    client, _ = served
    body = {"prompt": "x", "steps": STEPS, "width": 64, "height": 64, "batch_size": 1,
            "init_images": [png_b64(64, 64)] * 3}
    r = client.post("/sdapi/v1/img2img", json=body)
    assert r.status_code == 400 and "init_images" in r.json()["detail"], r.text


@pytest.mark.parametrize("path", ["/v1/generate", "/sdapi/v1/txt2img", "/v1/images/generations"])
def test_deeply_nested_json_is_a_400(served, path):
    client, _ = served
    for depth in (100, 50_000):
        raw = b'{"prompt": "x", "comments": ' + b"[" * depth + b"]" * depth + b"}"
        r = client.post(path, content=raw, headers={"content-type": "application/json"})
        assert r.status_code == 400, (depth, r.status_code, r.text[:200])
    assert client.get("/healthz").status_code == 200


@pytest.mark.parametrize("path, field", [("/v1/generate", "guidance_scale"), ("/sdapi/v1/txt2img", "cfg_scale"),
                                         ("/v1/images/generations", "guidance_scale"),
                                         ("/v1/generate", "aesthetic_score")])
@pytest.mark.parametrize("value", ["1e30", "NaN", "Infinity", "-1e300"])
def test_absurd_floats_are_refused(served, path, field, value):
    client, _ = served
    raw = f'{{"prompt": "x", "{field}": {value}}}'.encode()  # Python's json reads NaN/Infinity
    r = client.post(path, content=raw, headers={"content-type": "application/json"})
    assert r.status_code == 400, (r.status_code, r.text[:300])
    assert field in r.text


def test_a_client_that_leaves_frees_its_queue_slot_and_images_at_once(tiny_artifacts):
    """While the worker is busy, a job whose client left is out of the batcher's queue (and its
    input image released) at once, not when the worker gets to it."""
    from sdxl_export.serve import ImageService, ServeConfig
    from sdxl_export.serve.service import ClientGoneError
    from serve_inproc import png_b64 as b64

    async def scenario() -> None:
        svc = ImageService(ServeConfig(artifacts=tiny_artifacts, backend="onnxruntime", device="cpu", warmup=()))
        await svc.start_embedded()
        for _ in range(600):
            if svc.ready:
                break
            await asyncio.sleep(0.1)
        assert svc.ready, svc.load_error
        gate = threading.Event()
        blocker = asyncio.get_running_loop().run_in_executor(svc._worker, gate.wait, 60)
        from sdxl_export.serve.common import decode_image

        image = decode_image(b64(64, 64), "image")
        jobs = svc.make_jobs(["x"] * 3, None, [1, 2, 3], request_id="gone", images=[image] * 3,
                             num_inference_steps=STEPS, refiner=False, strength=1.0)
        assert svc.queued_jobs == 0

        async def gone() -> bool:
            return True

        with pytest.raises(ClientGoneError):
            await svc.generate(jobs, disconnected=gone)
        try:
            assert svc.queued_jobs == 0 and svc.waiting == 0
            assert all(j.image is None and j.cancelled.is_set() for j in jobs)
        finally:
            gate.set()
            await blocker
            await svc.drain()
            svc.close()

    asyncio.run(scenario())


def test_a_timed_out_request_stops_at_the_next_step_and_frees_the_worker(tiny_artifacts):
    with inproc(tiny_artifacts, timeout_s=1.0) as (client, service):
        r = _native(client, num_inference_steps=150, height=256, width=256)
        assert r.status_code == 504, r.text
        assert r.headers.get("x-should-retry") == "false"
        # the worker stopped the call between two steps, long before its 150th
        deadline = time.monotonic() + 60
        while service.progress.snapshot()["running"] and time.monotonic() < deadline:
            time.sleep(0.05)
        stop = service.progress.last_stop
        assert stop is not None and stop["why"] == "cancelled" and stop["step"] < stop["steps"], stop
        assert _native(client).status_code == 200  # the replica goes on serving


def test_deterministic_500_says_do_not_retry(served):
    """NumericalError (a NaN image) is deterministic: x-should-retry false."""
    from sdxl_export.errors import NumericalError
    from sdxl_export.serve.http import exception_response

    class Req:
        scope: ClassVar[dict] = {"state": {"request_id": "r1"}}

        class url:
            path = "/v1/generate"

    resp = exception_response(Req(), NumericalError("the VAE decode produced NaN/Inf", "decode in fp32"),
                              lambda: None)
    assert resp.status_code == 500 and resp.headers["x-should-retry"] == "false"


def test_readyz_and_errors_name_no_paths(tmp_path):
    """A replica that failed to load says so on the unauthenticated /readyz without naming the
    server's folders; 4xx bodies do not either."""
    missing = tmp_path / "secret-folder" / "artifacts"
    with inproc(missing, ready_timeout=30) as (client, service):
        assert service.load_error and str(tmp_path) in service.load_error
        r = client.get("/readyz")
        assert r.status_code == 503 and r.json()["status"] == "failed"
        assert str(tmp_path) not in r.text and "secret-folder/" not in r.text, r.text
        r = client.post("/v1/generate", json={"prompt": "x"})
        assert r.status_code == 503 and str(tmp_path) not in r.text


def test_sd_models_names_no_server_path(served):
    client, _ = served
    for m in client.get("/sdapi/v1/sd-models").json():
        assert "/" not in m["filename"], m


def test_healthz_answers_at_the_connection_limit(tiny_artifacts, tmp_path):
    """64 idle connections were uvicorn's concurrency limit (--max-queue 1): the liveness probe
    got 503 and an orchestrator would restart a merely busy replica."""
    srv = ServerProcess(tiny_artifacts, "--backend", "onnxruntime", "--max-queue", "1", "--max-images", "1",
                        "--warmup", "", log_path=tmp_path / "s.log")
    socks = []
    try:
        for _ in range(70):
            s = socket.create_connection(("127.0.0.1", srv.port), timeout=5)
            s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")  # headers never finished: the request hangs
            socks.append(s)
        time.sleep(0.5)
        status, _, body = request(srv.url + "/healthz", timeout=10)
        assert status == 200, body
        status, _, body = request(srv.url + "/readyz", timeout=10)
        assert status == 200, body
    finally:
        for s in socks:
            s.close()
        assert srv.stop() == 0, srv.log()


def test_app_level_in_flight_limit_spares_the_probes(served, tiny_artifacts):
    """Requests beyond max_in_flight get 503 with Retry-After; /healthz and /readyz still 200."""
    from sdxl_export.serve import ServeConfig
    from sdxl_export.serve.app import build_app
    from starlette.testclient import TestClient

    _, service = served
    release = threading.Event()
    app = build_app(lambda: service, ServeConfig(artifacts=tiny_artifacts), max_in_flight=1)

    @app.get("/hold")
    async def hold() -> dict:
        await asyncio.get_running_loop().run_in_executor(None, release.wait, 30)
        return {}

    with TestClient(app) as c:
        t = threading.Thread(target=lambda: c.get("/hold"))
        t.start()
        try:
            time.sleep(0.5)
            r = c.get("/v1/models")
            assert r.status_code == 503 and r.headers.get("retry-after") == "1"
            assert c.get("/healthz").status_code == 200 and c.get("/readyz").status_code == 200
        finally:
            release.set()
            t.join(30)
        assert c.get("/v1/models").status_code == 200
    assert json.loads(json.dumps(service.progress.snapshot()))["running"] is False


def test_scrub_paths_keeps_routes_and_names_only():
    from sdxl_export.serve.http import scrub_paths

    text = "LoRA /srv/models/loras/x.safetensors does not fit (GET /sdapi/v1/loras, /readyz)"
    assert scrub_paths(text) == "LoRA x.safetensors does not fit (GET /sdapi/v1/loras, /readyz)"
