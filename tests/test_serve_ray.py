"""``sdxl-export serve --ray``: the same app on a local Ray Serve instance serves both APIs.

One bounded run: start (a local Ray instance), one OpenAI and one A1111 request through their
real clients, images equal to the runtime's, then SIGTERM and a clean exit.
"""

from __future__ import annotations

import numpy as np
import pytest
from serve_helpers import ServerProcess, metric_value, pil_array, png_array, request, serve_artifacts

pytest.importorskip("ray.serve")
openai = pytest.importorskip("openai")
webuiapi = pytest.importorskip("webuiapi")


def test_ray_serve_deployment_serves_both_apis(tmp_path_factory, tiny_artifacts, tmp_path):
    from sdxl_export.runtime import SDXLPipeline

    artifacts = serve_artifacts(tmp_path_factory, tiny_artifacts)
    srv = ServerProcess(artifacts, "--ray", "--replicas", "1", "--model-name", "sdxl-tiny",
                        log_path=tmp_path / "ray.log", ready_timeout=300)
    try:
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key="unused")
        assert [m.id for m in client.models.list().data] == ["sdxl-tiny"]
        res = client.images.generate(prompt="a ray of light", size="256x256", n=2,
                                     extra_body={"seed": 3, "steps": 4})
        api = webuiapi.WebUIApi(host="127.0.0.1", port=srv.port)
        a1111 = api.txt2img(prompt="a ray of light", steps=4, width=320, height=192, seed=9, sampler_name="Euler")
        text = request(srv.url + "/metrics")[2].decode()
        assert metric_value(text, "sdxl_images_generated_total") == 3
        assert metric_value(text, "sdxl_batch_size_count") <= 2  # the two OpenAI images shared a @serve.batch call
    finally:
        rc = srv.stop(timeout=180)
    assert rc == 0, srv.log()
    with SDXLPipeline.from_artifacts(artifacts, backend="onnxruntime", device="cpu") as pipe:
        for i in range(2):
            ref = pipe("a ray of light", height=256, width=256, num_inference_steps=4, seed=3 + i).images[0]
            assert int(np.abs(png_array(res.data[i].b64_json) - pil_array(ref)).max()) <= 1
        ref = pipe("a ray of light", "", height=192, width=320, num_inference_steps=4, seed=9, guidance_scale=7.0,
                   refiner=False).images[0]
        assert int(np.abs(pil_array(a1111.images[0]) - pil_array(ref)).max()) <= 1
    assert a1111.info["all_seeds"] == [9]
