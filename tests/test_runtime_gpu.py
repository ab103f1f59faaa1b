"""The runtime on a CUDA GPU (run with ``-m gpu``).

ONNX Runtime's CUDA provider with IO binding (needs onnxruntime-gpu), and the pipeline's
own device handling (scheduler maths, noise, guidance on the GPU) with the torch backend.
GPU kernels (cuDNN convolutions, TF32) round differently from the CPU, so these compare
with the CPU run at a looser bound than the CPU parity tests; the images must still be
the same images.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sdxl_export.runtime import SDXLPipeline
from sdxl_export.runtime.backends.onnxruntime import OrtRunner, cuda_available

pytestmark = pytest.mark.gpu

GPU_PIXEL_TOL = 4 / 255
GPU_LATENT_TOL = 2e-2
KW = {"num_inference_steps": 6, "seed": 3, "height": 192, "width": 320, "output_type": "np"}


@pytest.fixture(scope="module")
def cpu_result(tiny_artifacts):
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    with SDXLPipeline.from_artifacts(tiny_artifacts, backend="onnxruntime", device="cpu") as p:
        return p(["a lighthouse", "a red car"], **KW)


def _close(out, ref) -> None:
    lat = float((out.latents.cpu() - ref.latents).abs().max())
    pix = float(np.abs(out.images - ref.images).max())
    print(f"\ncuda vs cpu: max |latent diff| {lat:.2e}, max |pixel diff| {pix * 255:.2f}/255")
    assert lat <= GPU_LATENT_TOL and pix <= GPU_PIXEL_TOL


def test_onnxruntime_cuda_io_binding_matches_cpu(tiny_artifacts, cpu_result):
    if not cuda_available():
        pytest.skip("onnxruntime-gpu (CUDAExecutionProvider) is not installed")
    with SDXLPipeline.from_artifacts(tiny_artifacts, backend="onnxruntime") as p:  # device auto -> cuda
        assert p.device.type == "cuda"
        unet = p.description["components"]["unet"]
        assert unet["providers"][0] == "CUDAExecutionProvider" and unet["io_binding"] is True
        out = p(["a lighthouse", "a red car"], **KW)
    assert out.latents.device.type == "cuda"
    _close(out, cpu_result)


def test_onnxruntime_cuda_runner_binds_device_memory(tiny_artifacts):
    if not cuda_available():
        pytest.skip("onnxruntime-gpu (CUDAExecutionProvider) is not installed")
    from sdxl_export.runtime.artifact_reader import read_artifacts

    spec = read_artifacts(tiny_artifacts).specs["vae_decoder"]
    path = tiny_artifacts / "onnx/vae_decoder/model.onnx"
    latent = torch.randn(2, 4, 16, 24)
    with OrtRunner(spec, path, device="cpu") as cpu, OrtRunner(spec, path, device="cuda") as gpu:
        want = cpu({"latent": latent})["images"]
        got_from_cpu_input = gpu({"latent": latent})["images"]  # moved to the GPU by the runner
        got = gpu({"latent": latent.cuda()})["images"]
    assert got.device.type == "cuda" and got.shape == (2, 3, 128, 192)
    assert torch.equal(got, got_from_cpu_input)
    assert (got.cpu() - want).abs().max() <= 1e-2


def test_pipeline_on_cuda_with_the_torch_backend(tiny_artifacts, cpu_result):
    with SDXLPipeline.from_artifacts(tiny_artifacts, backend="torch", device="cuda") as p:
        assert p.device.type == "cuda"
        out = p(["a lighthouse", "a red car"], **KW)
        again = p(["a lighthouse", "a red car"], **KW)
    assert out.latents.device.type == "cuda"
    assert torch.equal(out.latents, again.latents)  # seed = CPU generator: reproducible on GPU too
    _close(out, cpu_result)
