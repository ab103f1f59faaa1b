"""The PyTorch backend on a CUDA GPU: eager vs CPU reference, CUDA-graph replay vs eager, dtypes.

Every test here is marked ``gpu`` (excluded by default; run with ``-m gpu``).
"""

from __future__ import annotations

import pytest
import torch
from sdxl_export.runtime.backends import create_runner
from sdxl_export.specs import COMPONENTS
from test_torch_backend import SHAPE, make_ctx, torch_feeds

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

#: GPU fp32 vs CPU fp32: cuDNN may use TF32 for convolutions (torch's default), so allow
#: a looser bound than the spec's ONNX-vs-PyTorch tolerance.
GPU_FP32_ATOL = 2e-2


@pytest.fixture(scope="module")
def cpu_reference(tiny_artifacts):
    cache: dict[str, tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]] = {}

    def get(name: str):
        if name not in cache:
            ctx = make_ctx(tiny_artifacts, name)
            feeds = torch_feeds(ctx.spec)
            with create_runner("torch", ctx) as runner:
                cache[name] = (feeds, runner(feeds))
        return cache[name]

    return get


@pytest.mark.parametrize("name", COMPONENTS)
def test_cuda_eager_matches_cpu(tiny_artifacts, cpu_reference, name):
    feeds, expected = cpu_reference(name)
    with create_runner("torch", make_ctx(tiny_artifacts, name, device="cuda")) as runner:
        out = runner(feeds)  # CPU inputs are moved to the GPU
    for k, ref in expected.items():
        assert out[k].device.type == "cuda" and out[k].dtype == torch.float32
        torch.testing.assert_close(out[k].cpu(), ref, atol=GPU_FP32_ATOL, rtol=1e-2)


@pytest.mark.parametrize("name", COMPONENTS)
def test_cuda_graph_replay_matches_eager(tiny_artifacts, name):
    eager = create_runner("torch", make_ctx(tiny_artifacts, name, device="cuda")).open()
    graphed = create_runner("torch", make_ctx(tiny_artifacts, name, device="cuda", cuda_graphs=True)).open()
    try:
        spec = eager.spec
        f1 = {k: v.cuda() for k, v in torch_feeds(spec, seed=1).items()}
        f2 = {k: v.cuda() for k, v in torch_feeds(spec, seed=2).items()}
        g1 = graphed(f1)
        g2 = graphed(f2)  # replay with new values gives the new outputs
        assert graphed.graphs.stats.captures == 1 and graphed.graphs.stats.replays == 2
        e1, e2 = eager(f1), eager(f2)
        for k in spec.output_names:
            torch.testing.assert_close(g1[k], e1[k], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(g2[k], e2[k], atol=1e-5, rtol=1e-5)
            assert not torch.equal(g1[k], g2[k])
            assert not g1[k].is_inference()
    finally:
        eager.close()
        graphed.close()
    assert len(graphed.graphs) == 0  # close() released the graphs


def test_two_shapes_two_graphs(tiny_artifacts):
    ctx = make_ctx(tiny_artifacts, "unet", device="cuda", cuda_graphs=True, max_graphs=4)
    with create_runner("torch", ctx) as runner:
        a = torch_feeds(ctx.spec, (2, 256, 256))
        b = torch_feeds(ctx.spec, SHAPE)
        runner(a)
        runner(b)
        runner(a)
        runner(b)
        assert runner.graphs.stats.captures == 2 and len(runner.graphs) == 2
        assert runner.graphs.stats.replays == 4
        assert runner.description["graphs"]["captures"] == 2


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_unet_and_fp32_vae(tiny_artifacts, cpu_reference, dtype):
    feeds, expected = cpu_reference("unet")
    with create_runner("torch", make_ctx(tiny_artifacts, "unet", device="cuda", dtype=dtype)) as unet:
        assert str(next(unet._module.parameters()).dtype) == f"torch.{dtype}"
        out = unet(feeds)["noise_pred"]
    assert out.dtype == torch.float32  # IO stays in the spec dtype
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.cpu(), expected["noise_pred"], atol=0.1, rtol=0.05)

    ctx = make_ctx(tiny_artifacts, "vae_decoder", device="cuda", dtype=dtype)
    with create_runner("torch", ctx) as vae:
        assert vae.compute_dtype == torch.float32
        assert next(vae._module.parameters()).dtype == torch.float32
        assert vae.description["dtype"] == "float32"


def test_half_precision_with_cuda_graphs(tiny_artifacts):
    opts = {"dtype": "float16"}
    eager = create_runner("torch", make_ctx(tiny_artifacts, "unet", device="cuda", **opts)).open()
    graphed = create_runner("torch", make_ctx(tiny_artifacts, "unet", device="cuda", cuda_graphs=True, **opts)).open()
    try:
        feeds = {k: v.cuda() for k, v in torch_feeds(eager.spec).items()}
        torch.testing.assert_close(graphed(feeds)["noise_pred"], eager(feeds)["noise_pred"], atol=1e-3, rtol=1e-3)
    finally:
        eager.close()
        graphed.close()
