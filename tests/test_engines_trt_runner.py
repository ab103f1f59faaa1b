"""runtime/tensorrt_runner.py: refusals on CPU; real engines, profiles and CUDA graphs on a GPU."""

from __future__ import annotations

from pathlib import Path

import pytest
from sdxl_export.engines.planner import plan_profiles
from sdxl_export.engines.sources import specs_for_plan
from sdxl_export.engines.store import EngineEntry
from sdxl_export.errors import InvalidRequestError
from sdxl_export.runtime import tensorrt_runner
from sdxl_export.runtime.backends import ComponentContext, backend_available


def _ctx(entry, device="cuda", **options):
    specs, _, _ = specs_for_plan("tiny", "same", True, None)
    return ComponentContext(artifacts=Path("/nonexistent"), name="unet", spec=specs["unet"], export_entry={},
                            engine_entry=entry, device=device, options=options)


def _entry(backend):
    specs, native, _ = specs_for_plan("tiny", "same", True, None)
    cp = plan_profiles({"unet": specs["unet"]}, native=native).components["unet"]
    return EngineEntry(component="unet", backend=backend, path=Path("/nonexistent/engine.plan"), files={},
                       precision_requested="fp16", precision="fp16", profiles=list(cp.profiles), spec=cp.spec,
                       onnx_sha256="")


@pytest.mark.skipif(tensorrt_runner.available()[0], reason="TensorRT is usable here")
def test_unavailable_without_tensorrt_says_why():
    ok, why = tensorrt_runner.available()
    assert not ok and why
    assert backend_available("tensorrt") == (False, why)  # what the runtime's registry sees


def test_runner_refuses_what_it_cannot_run():
    with pytest.raises(InvalidRequestError, match="no TensorRT engine"):
        tensorrt_runner.create(_ctx(None))
    with pytest.raises(InvalidRequestError, match="no TensorRT engine"):
        tensorrt_runner.create(_ctx(_entry("onnxruntime")))
    with pytest.raises(InvalidRequestError, match="runs on CUDA"):
        tensorrt_runner.create(_ctx(_entry("tensorrt"), device="cpu"))
    with pytest.raises(InvalidRequestError, match="unknown tensorrt backend option"):
        tensorrt_runner.create(_ctx(_entry("tensorrt"), graphs=True))
    runner = tensorrt_runner.create(_ctx(_entry("tensorrt")))
    assert not runner.is_open and runner.graphs.enabled  # nothing touched CUDA yet
    runner.check_supported(2, 256, 256)  # a planned bucket: fine before open()


@pytest.mark.trt
@pytest.mark.gpu
def test_tensorrt_engines_match_onnxruntime_and_replay_graphs(tmp_path):
    import torch
    from sdxl_export.engines.build import BuildOptions, build
    from sdxl_export.engines.store import load_engine_store
    from sdxl_export.runtime.onnxruntime_backend import create as create_ort

    out = tmp_path / "art"
    build(BuildOptions(out=out, backend="tensorrt", buckets="256x256,128x512", batch_sizes=(1,)))
    store = load_engine_store(out)
    e = store.verify("unet")
    assert e.backend == "tensorrt" and len(e.profiles) >= 1
    ctx = ComponentContext(artifacts=out, name="unet", spec=e.spec, export_entry={}, engine_entry=e, device="cuda")
    ort_ctx = ComponentContext(artifacts=out, name="unet", spec=e.spec,
                               export_entry={"file": "onnx/unet/model.onnx"}, device="cpu")
    with tensorrt_runner.create(ctx) as trt_run, create_ort(ort_ctx) as ort_run:
        for h, w in ((256, 256), (128, 512)):
            feeds = {k: torch.from_numpy(v) for k, v in e.spec.example_inputs(2, h, w).items()}
            ref = ort_run(feeds)["noise_pred"]
            first = trt_run({k: v.cuda() for k, v in feeds.items()})["noise_pred"].cpu()
            again = trt_run({k: v.cuda() for k, v in feeds.items()})["noise_pred"].cpu()
            assert torch.equal(first, again)  # replayed graph == captured call
            assert torch.allclose(first, ref, atol=2e-2)  # fp32/TF32 engine vs ORT fp32
        assert trt_run.graphs.stats.captures == 2 and trt_run.graphs.stats.replays == 4
        assert tensorrt_runner.SCRATCH.size > 0
