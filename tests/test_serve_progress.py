"""Progress and cancel (issue 18 §3): the pipeline's per-step callback, A1111's progress /
interrupt / skip, the native server-sent-events stream, and the commands' progress bars.
In-process app on the tiny model's plain export (ONNX Runtime)."""

from __future__ import annotations

import base64
import io
import json
import threading
import time

import numpy as np
import pytest
from fixtures import run_cli
from serve_inproc import inproc

LONG = 120  # steps of a request that is still running while the test looks at it


@pytest.fixture(scope="module")
def pipe(tiny_artifacts):
    from sdxl_export.runtime import SDXLPipeline

    with SDXLPipeline.from_artifacts(tiny_artifacts, backend="onnxruntime", device="cpu") as p:
        yield p


def test_callback_on_step_end_has_diffusers_shape_and_changes_nothing(pipe):
    seen = []

    def cb(p, i, t, kwargs):
        assert p is pipe and kwargs["latents"].shape[0] == 1
        seen.append((kwargs["stage"], i, int(t), kwargs["stage_steps"]))
        return {"latents": kwargs["latents"]}

    plain = pipe("a cat", num_inference_steps=5, seed=3, denoising_end=0.6)
    called = pipe("a cat", num_inference_steps=5, seed=3, denoising_end=0.6, callback_on_step_end=cb)
    assert np.array_equal(np.asarray(plain.images[0]), np.asarray(called.images[0]))
    stages = [s for s, *_ in seen]
    assert stages == ["unet"] * stages.count("unet") + ["refiner_unet"] * stages.count("refiner_unet")
    assert len(seen) == plain.info["base_steps"] + plain.info["refiner_steps"]
    assert [i for s, i, _, _ in seen if s == "unet"] == list(range(stages.count("unet")))


def test_a_callback_can_change_the_latents_and_stop_the_call(pipe):
    def zero(p, i, t, kwargs):
        return {"latents": kwargs["latents"] * 0}

    out = pipe("a cat", num_inference_steps=3, seed=3, refiner=False, callback_on_step_end=zero, output_type="latent")
    assert float(out.images.abs().max()) == 0.0

    class Stop(Exception):
        pass

    calls = []

    def stop(p, i, t, kwargs):
        calls.append(i)
        if i == 1:
            raise Stop()
        return {}

    with pytest.raises(Stop):
        pipe("a cat", num_inference_steps=10, seed=3, refiner=False, callback_on_step_end=stop)
    assert calls == [0, 1]


@pytest.fixture(scope="module")
def served(tiny_artifacts):
    with inproc(tiny_artifacts, max_queue=8, timeout_s=300) as (client, service):
        assert service.ready, service.load_error
        yield client, service


def _start(client, results, **body):
    payload = {"prompt": "x", "num_inference_steps": LONG, "refiner": False, "seed": 1, **body}
    t = threading.Thread(target=lambda: results.append(client.post("/v1/generate", json=payload)))
    t.start()
    return t


def _wait_running(service, min_step=2, timeout=60):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        snap = service.progress.snapshot()
        if snap["running"] and snap["step"] >= min_step:
            return snap
        time.sleep(0.02)
    raise AssertionError("the generation never started")


def test_a1111_progress_reports_the_running_steps_and_a_preview(served):
    client, service = served
    results: list = []
    t = _start(client, results, height=128, width=128)
    try:
        _wait_running(service)
        p = client.get("/sdapi/v1/progress").json()
        st = p["state"]
        assert st["sampling_steps"] == LONG and 0 < st["sampling_step"] < LONG
        assert 0 < p["progress"] < 1 and p["eta_relative"] > 0 and st["job_count"] >= 1 and st["job"] == "txt2img"
        from PIL import Image

        preview = Image.open(io.BytesIO(base64.b64decode(p["current_image"])))
        assert preview.size == (128 // 8, 128 // 8)  # one pixel per latent: no VAE, no extra weights
        assert client.get("/sdapi/v1/progress", params={"skip_current_image": True}).json()["current_image"] is None
        assert client.post("/sdapi/v1/interrupt").status_code == 200
    finally:
        t.join(120)
    r = results[0]
    assert r.status_code == 499 and "interrupt" in r.json()["error"]["message"]
    stop = service.progress.last_stop
    assert stop["why"] == "interrupt" and stop["step"] < LONG
    idle = client.get("/sdapi/v1/progress").json()
    assert idle["progress"] == 0 and idle["state"]["job_count"] == 0
    assert client.post("/v1/generate", json={"prompt": "x", "num_inference_steps": 2, "refiner": False}).status_code \
        == 200


def test_interrupt_also_drops_the_queue_and_skip_only_the_running_batch(served):
    client, service = served
    first: list = []
    queued: list = []
    t1 = _start(client, first, height=128, width=128)
    try:
        _wait_running(service)
        t2 = _start(client, queued, height=64, width=64, num_inference_steps=2)  # another size: its own batch
        deadline = time.monotonic() + 30
        while service.waiting == 0 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert client.post("/sdapi/v1/skip").status_code == 200
    finally:
        t1.join(120)
        t2.join(120)
    assert first[0].status_code == 499
    assert queued[0].status_code == 200, queued[0].text  # skip leaves the queue alone

    first.clear()
    queued.clear()
    t1 = _start(client, first, height=128, width=128)
    try:
        _wait_running(service)
        t2 = _start(client, queued, height=64, width=64, num_inference_steps=2)
        deadline = time.monotonic() + 30
        while service.waiting == 0 and time.monotonic() < deadline:
            time.sleep(0.02)
        client.post("/sdapi/v1/interrupt")
    finally:
        t1.join(120)
        t2.join(120)
    assert first[0].status_code == 499 and queued[0].status_code == 499


def test_native_progress_stream_sends_every_step_then_done(served):
    client, service = served
    results: list = []
    t = _start(client, results, height=64, width=64, num_inference_steps=12)
    events = []
    try:
        _wait_running(service, min_step=1)
        with client.stream("GET", "/v1/progress/stream", params={"max_seconds": 60}) as r:
            assert r.headers["content-type"].startswith("text/event-stream")
            kind = None
            for line in r.iter_lines():
                if line.startswith("event: "):
                    kind = line[7:]
                elif line.startswith("data: "):
                    events.append((kind, json.loads(line[6:])))
    finally:
        t.join(120)
    assert results[0].status_code == 200
    running = [e for k, e in events if k == "progress" and e["state"] == "running"]
    steps = [e["step"] for e in running]
    assert steps == sorted(steps) and steps[-1] == 12 and all(e["steps"] == 12 for e in running)
    assert events[-1][0] == "done" and events[-1][1]["state"] == "idle"
    assert client.get("/v1/progress").json()["state"] == "idle"


@pytest.mark.parametrize("force, drawn", [("1", True), ("0", False)])
def test_run_draws_a_step_bar_only_when_asked_or_on_a_terminal(tiny_artifacts, tmp_path, monkeypatch, force, drawn):
    monkeypatch.setenv("SDXL_EXPORT_PROGRESS", force)
    code, _, err = run_cli("run", "a cat", "--artifacts", str(tiny_artifacts), "--backend", "onnxruntime",
                           "--steps", "3", "--no-refiner", "--out", str(tmp_path / "cat.png"))
    assert code == 0, err
    assert ("3/3" in err) == drawn, err


def test_bars_are_off_when_stderr_is_not_a_terminal(monkeypatch):
    from sdxl_export.progress_bars import bars_enabled

    monkeypatch.delenv("SDXL_EXPORT_PROGRESS", raising=False)
    assert bars_enabled(io.StringIO()) is False

    class Tty(io.StringIO):
        def isatty(self):
            return True

    assert bars_enabled(Tty()) is True
