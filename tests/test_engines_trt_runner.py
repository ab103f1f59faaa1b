"""runtime/tensorrt_runner.py: refusals on CPU; real engines, profiles and CUDA graphs on a GPU."""

from __future__ import annotations

from pathlib import Path

import pytest
from sdxl_export.engines.planner import plan_profiles
from sdxl_export.engines.sources import specs_for_plan
from sdxl_export.engines.store import EngineEntry
from sdxl_export.errors import InvalidRequestError
from sdxl_export.runtime.backends import ComponentContext, backend_available
from sdxl_export.runtime.backends.tensorrt import runner as tensorrt_runner


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
    with pytest.raises(InvalidRequestError, match="max_graphs"):
        tensorrt_runner.create(_ctx(_entry("tensorrt"), max_graphs=0))
    runner = tensorrt_runner.create(_ctx(_entry("tensorrt")))
    assert not runner.is_open and runner.cuda_graphs and runner.graph_stats == {}  # nothing touched CUDA yet
    runner.check_supported(2, 256, 256)  # a planned bucket: fine before open()


@pytest.fixture(scope="module")
def trt_build(tmp_path_factory):
    """Tiny TensorRT engines for two buckets (GPU + TensorRT only)."""
    from sdxl_export.engines.build import BuildOptions, build
    from sdxl_export.engines.store import load_engine_store

    out = tmp_path_factory.mktemp("trt") / "art"
    build(BuildOptions(out=out, backend="tensorrt", buckets="256x256,128x512", batch_sizes=(1,)))
    return out, load_engine_store(out).verify("unet")


def _runners(out, e, **options):
    from sdxl_export.runtime.backends.onnxruntime import create as create_ort

    ctx = ComponentContext(artifacts=out, name="unet", spec=e.spec, export_entry={}, engine_entry=e, device="cuda",
                           options=options)
    ort_ctx = ComponentContext(artifacts=out, name="unet", spec=e.spec,
                               export_entry={"file": "onnx/unet/model.onnx"}, device="cpu")
    return tensorrt_runner.create(ctx), create_ort(ort_ctx)


def _feeds(e, h, w, seed=0):
    import torch

    return {k: torch.from_numpy(v) for k, v in e.spec.example_inputs(2, h, w, seed=seed).items()}


@pytest.mark.trt
@pytest.mark.gpu
def test_tensorrt_shapes_a_b_a_graphs_and_eager_match_onnxruntime(trt_build):
    import torch

    out, e = trt_build
    assert e.validation["accuracy"]["profiles"]  # the build ran every profile against the ONNX
    graphed, ort_run = _runners(out, e)
    eager, _ = _runners(out, e, cuda_graphs=False)
    with graphed, eager, ort_run:
        for h, w in ((256, 256), (128, 512), (256, 256)):  # A -> B -> A
            feeds = _feeds(e, h, w)
            ref = ort_run(feeds)["noise_pred"]
            g = graphed({k: v.cuda() for k, v in feeds.items()})["noise_pred"].cpu()
            x = eager({k: v.cuda() for k, v in feeds.items()})["noise_pred"].cpu()
            torch.testing.assert_close(g, x, rtol=0, atol=0)  # replayed graph == eager enqueue
            assert torch.allclose(g, ref, atol=2e-2)  # fp32/TF32 engine vs ORT fp32
        stats = graphed.graph_stats
        assert stats["captures"] == 2 and stats["replays"] == 3 and stats["contexts"] == 2
        assert eager.graph_stats["eager_calls"] == 3


@pytest.mark.trt
@pytest.mark.gpu
def test_tensorrt_four_threads_mixed_buckets_equal_sequential(trt_build):
    import threading

    import torch

    out, e = trt_build
    runner, _ = _runners(out, e)
    sizes = [(256, 256), (128, 512)]
    with runner:
        calls = [[(sizes[(t + i) % 2], _feeds(e, *sizes[(t + i) % 2], seed=10 * t + i)) for i in range(6)]
                 for t in range(4)]
        sequential = [[runner({k: v.cuda() for k, v in f.items()})["noise_pred"].cpu() for _, f in c] for c in calls]
        results: list[list] = [[] for _ in calls]

        def worker(t):
            results[t] = [runner({k: v.cuda() for k, v in f.items()})["noise_pred"].cpu() for _, f in calls[t]]

        threads = [threading.Thread(target=worker, args=(t,)) for t in range(4)]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        for t in range(4):
            for got, want in zip(results[t], sequential[t]):
                torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.trt
@pytest.mark.gpu
def test_tensorrt_refit_matches_onnxruntime_on_changed_weights(tmp_path_factory):
    """A --refittable tiny UNet: refit changed weights (graphs captured before must not replay the old
    ones), compare with ONNX Runtime on an ONNX holding the same changed weights; then back to base."""
    import onnx
    import tensorrt as trt
    import torch
    from onnx import numpy_helper
    from sdxl_export.engines.build import BuildOptions, build
    from sdxl_export.engines.store import load_engine_store
    from sdxl_export.runtime.backends.onnxruntime import create as create_ort

    out = tmp_path_factory.mktemp("trt-refit") / "art"
    build(BuildOptions(out=out, backend="tensorrt", buckets="256x256", batch_sizes=(1,), refittable=True))
    e = load_engine_store(out).verify("unet")
    assert e.refittable and e.builder["refittable"] is True
    ctx = ComponentContext(artifacts=out, name="unet", spec=e.spec, export_entry={"file": "onnx/unet/model.onnx"},
                           engine_entry=e, device="cuda")
    runner = tensorrt_runner.create(ctx)
    model = onnx.load(str(out / "onnx/unet/model.onnx"))
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    feeds = _feeds(e, 256, 256)
    with runner:
        refittable = set(trt.Refitter(runner._engine, trt.Logger(trt.Logger.WARNING)).get_all_weights())
        names = [n for n, a in inits.items() if n in refittable and a.dtype.kind == "f" and a.ndim >= 2][:6]
        assert names, "no refittable float initializer"
        base = {n: torch.from_numpy(inits[n].copy()) for n in names}
        changed = {n: t * 1.5 + 0.01 for n, t in base.items()}
        before = runner({k: v.cuda() for k, v in feeds.items()})["noise_pred"].cpu()  # captures a graph
        runner.set_weights(changed)
        after = runner({k: v.cuda() for k, v in feeds.items()})["noise_pred"].cpu()
        assert runner.last_switch and runner.last_switch["switch_ms"] > 0 and runner.last_switch["graphs_dropped"] >= 1
        runner.set_weights(base)  # A -> B -> A
        again = runner({k: v.cuda() for k, v in feeds.items()})["noise_pred"].cpu()
    for i in model.graph.initializer:
        if i.name in changed:
            i.CopyFrom(numpy_helper.from_array(changed[i.name].numpy(), i.name))
    (out / "onnx_changed").mkdir()
    onnx.save(model, str(out / "onnx_changed/model.onnx"))
    ort = create_ort(ComponentContext(artifacts=out, name="unet", spec=e.spec,
                                      export_entry={"file": "onnx_changed/model.onnx"}, device="cpu"))
    with ort:
        ref = ort(feeds)["noise_pred"]
    assert not torch.allclose(after, before, atol=1e-3)  # the refit changed what runs (no stale graph)
    assert torch.allclose(after, ref, atol=2e-2)  # fp32/TF32 engine vs ORT fp32 on the same weights
    torch.testing.assert_close(again, before, rtol=0, atol=1e-5)  # back to base: no blend left
