"""The runtime over built engines: ONNX Runtime twins from ``sdxl-export build`` (CPU).

The twin is loaded instead of the raw export, with the session options the build
recorded; its profiles bound what it serves, exactly as a TensorRT engine's would.
"""

from __future__ import annotations

import shutil

import pytest
from fixtures import ort_twin_artifacts
from sdxl_export.errors import CorruptArtifactError, UnsupportedShapeError
from sdxl_export.runtime import SDXLPipeline


@pytest.fixture(scope="module")
def twin(tmp_path_factory, tiny_artifacts):
    return ort_twin_artifacts(tmp_path_factory, tiny_artifacts, buckets="256x256,192x320")


@pytest.fixture(scope="module")
def twin_pipe(twin):
    with SDXLPipeline.from_artifacts(twin) as p:
        yield p


def test_twin_is_loaded_with_its_recorded_options(twin_pipe):
    assert twin_pipe.backend == "onnxruntime"
    for name, d in twin_pipe.description["components"].items():
        assert d["source"] == "engine (onnxruntime twin)", name
        assert "/engines/" in d["file"]
        assert d["session_options"]["graph_optimization_level"] == "ORT_ENABLE_ALL"  # fusions offline, layout online
        assert d["session_options"]["intra_op_num_threads"] >= 1


def test_twin_matches_the_plain_export(twin_pipe, tiny_artifacts):
    kw = {"num_inference_steps": 4, "seed": 9, "height": 192, "width": 320, "output_type": "latent"}
    with SDXLPipeline.from_artifacts(tiny_artifacts, backend="onnxruntime") as plain:
        want = plain("a lighthouse", **kw).latents
    got = twin_pipe("a lighthouse", **kw).latents
    assert (got - want).abs().max() <= 1e-4


@pytest.mark.parametrize(("prompt", "kw", "served"), [
    ("a cat", {"height": 320, "width": 192}, "buckets 192x320, 256x256"),  # a bucket not built for
    ("a cat", {"num_images_per_prompt": 2}, "at batch 4"),  # UNet at 2 x 2: not built for
    (["a cat", "a dog", "a fox"], {"guidance_scale": 1.0}, "batch sizes [1, 2]"),  # text encoders at 3
])
def test_shapes_outside_the_profiles_are_refused_with_what_is_served(twin_pipe, prompt, kw, served):
    with pytest.raises(UnsupportedShapeError) as err:
        twin_pipe(prompt, num_inference_steps=2, **kw)
    assert served in err.value.message and err.value.hint


def test_guidance_off_is_served(twin_pipe):
    out = twin_pipe("a cat", num_inference_steps=2, guidance_scale=1.0, output_type="latent")
    assert out.info["guidance"] is False and out.latents.shape[0] == 1


def test_refused_before_any_component_runs(twin_pipe):
    calls = []
    runner = twin_pipe.runners["text_encoder"]
    original = runner._run
    runner._run = lambda feeds: calls.append(1) or original(feeds)  # count calls, keep behaviour
    try:
        with pytest.raises(UnsupportedShapeError):
            twin_pipe("a cat", num_inference_steps=2, height=320, width=192)
        assert calls == []
        twin_pipe("a cat", num_inference_steps=1, height=256, width=256, output_type="latent")
        assert calls
    finally:
        del runner._run


def test_corrupt_engine_is_refused_before_loading(twin, tmp_path):
    copy = tmp_path / "art"
    shutil.copytree(twin, copy)
    data = next((copy / "engines/unet").glob("model.onnx*"))
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    data.write_bytes(bytes(raw))
    with pytest.raises(CorruptArtifactError) as err:
        SDXLPipeline.from_artifacts(copy)
    assert "sdxl-export build" in err.value.hint

