"""Authentication, readiness, graceful shutdown, and bad start-up options of ``sdxl-export serve``."""

from __future__ import annotations

import base64
import json
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from fixtures import run_cli
from serve_helpers import ServerProcess, metric_value, request, serve_artifacts

openai = pytest.importorskip("openai")
webuiapi = pytest.importorskip("webuiapi")

KEY = "sk-test-0123456789"


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory, tiny_artifacts):
    return serve_artifacts(tmp_path_factory, tiny_artifacts)


def test_api_key_and_basic_auth(artifacts, tmp_path):
    srv = ServerProcess(artifacts, "--api-key", KEY, "--api-auth", "alice:s3cret", log_path=tmp_path / "s.log",
                        wait_ready=False)
    try:
        srv.wait_ready(180)  # /readyz needs no credentials (probes)
        assert request(srv.url + "/healthz")[0] == 200
        # OpenAI clients send the key as a bearer token
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key=KEY)
        assert len(client.images.generate(prompt="x", size="256x256", extra_body={"steps": 2}).data) == 1
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=srv.url + "/v1", api_key="sk-wrong-wrong", max_retries=0).models.list()
        # A1111 clients send HTTP Basic (the web UI's --api-auth)
        api = webuiapi.WebUIApi(host="127.0.0.1", port=srv.port)
        api.set_auth("alice", "s3cret")
        assert len(api.txt2img(prompt="x", steps=2, width=256, height=256).images) == 1
        api.set_auth("alice", "wrong")
        with pytest.raises(RuntimeError) as info:
            api.txt2img(prompt="x", steps=2, width=256, height=256)
        assert info.value.args[0] == 401
        # nothing but the probes without credentials, metrics included
        for path in ("/metrics", "/v1/models", "/sdapi/v1/sd-models", "/v1/info"):
            status, headers, _ = request(srv.url + path)
            assert status == 401 and "www-authenticate" in headers, path
        basic = base64.b64encode(b"alice:s3cret").decode()
        assert request(srv.url + "/metrics", headers={"Authorization": f"Basic {basic}"})[0] == 200
        assert request(srv.url + "/metrics", headers={"Authorization": f"Bearer {KEY}"})[0] == 200
        assert request(srv.url + "/metrics", headers={"Authorization": f"Bearer {KEY}x"})[0] == 401
    finally:
        assert srv.stop() == 0, srv.log()


def test_sigterm_finishes_every_accepted_request_and_exits_0(artifacts, tmp_path):
    srv = ServerProcess(artifacts, "--max-batch-size", "1", "--grace", "120", log_path=tmp_path / "s.log")
    body = {"prompt": "draining", "steps": 25, "size": "256x256"}
    with ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(request, srv.url + "/v1/images/generations", {**body, "seed": i}, timeout=180)
                   for i in range(4)]
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            text = request(srv.url + "/metrics")[2].decode()
            if metric_value(text, "sdxl_queue_depth") + metric_value(text, "sdxl_images_running") >= 4:
                break
            time.sleep(0.05)
        else:
            pytest.fail("the 4 requests were not all accepted")
        rc = srv.stop(timeout=180)
        results = [f.result(timeout=180) for f in futures]
    assert rc == 0, srv.log()
    assert [r[0] for r in results] == [200] * 4, [r[2][:200] for r in results]
    assert all(json.loads(r[2])["data"][0]["b64_json"] for r in results)
    with pytest.raises(OSError):
        request(srv.url + "/healthz", timeout=5)


@pytest.mark.slow  # a server of its own, held before loading (~20 s)
def test_not_ready_until_loaded(artifacts, tmp_path):
    """/healthz answers at once, /readyz and generation say 503 + Retry-After until warmed up."""
    srv = ServerProcess(artifacts, "--warmup", "256x256,320x192", log_path=tmp_path / "s.log", wait_ready=False)
    try:
        seen_loading = False
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                status, headers, raw = request(srv.url + "/readyz", timeout=5)
            except OSError:
                time.sleep(0.05)
                continue
            if status == 503:
                seen_loading = True
                assert headers["retry-after"] and json.loads(raw)["status"] in ("loading", "starting")
                gen = request(srv.url + "/v1/images/generations", {"prompt": "x", "steps": 2}, timeout=5)
                assert gen[0] in (503, 200)  # 200 only if it became ready in between
            elif status == 200:
                break
            time.sleep(0.05)
        assert seen_loading, "the server should listen (and say 503) while it loads"
        assert request(srv.url + "/readyz")[0] == 200
        assert "warm-up 320x192 batch 4" in srv.log()
    finally:
        assert srv.stop() == 0, srv.log()


@pytest.mark.parametrize("args, expected", [
    (["--artifacts", "/nonexistent/folder"], "/nonexistent/folder"),
    (["--api-auth", "nocolon"], "USER:PASSWORD"),
    (["--warmup", "12x"], "--warmup"),
    (["--max-queue", "0"], "--max-queue"),
    (["--api-key", "short"], "--api-key"),
])
def test_bad_options_are_one_line_errors(args, expected, artifacts):
    if "--artifacts" not in args:
        args = ["--artifacts", str(artifacts), *args]
    rc, out, err = run_cli("serve", "--port", "1", *args)
    assert rc == 2, (out, err)
    assert "sdxl-export: error:" in err and expected in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1, err
