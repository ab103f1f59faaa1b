"""The pipeline API on ONNX Runtime CPU: defaults, outputs, seeds, caching, timings, runners.

Exactness to diffusers is tested in test_parity_diffusers.py; these tests pin the API
contract around it, with few steps so they stay fast.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import pytest
import torch
from sdxl_export.buckets import buckets_for
from sdxl_export.errors import InputMismatchError, NumericalError
from sdxl_export.runtime import SDXLPipeline
from sdxl_export.runtime.backends.base import ComponentRunner, RunnerClosedError
from sdxl_export.runtime.backends.onnxruntime import OrtRunner, _numpy_view

STEPS = 3
LONG_PROMPT = " ".join(["a very detailed intricate baroque painting of a cathedral"] * 12)


@pytest.fixture()
def logs(caplog, monkeypatch):
    """caplog, also when the CLI (run earlier in the session) stopped sdxl_export propagating."""
    monkeypatch.setattr(logging.getLogger("sdxl_export"), "propagate", True)
    return caplog


@pytest.fixture(scope="module")
def pipe(tiny_artifacts):
    with SDXLPipeline.from_artifacts(tiny_artifacts, backend="onnxruntime", device="cpu") as p:
        yield p


def test_defaults_native_size_pil_and_refiner(pipe):
    out = pipe("a photo of a cat", num_inference_steps=STEPS, seed=0)
    assert len(out.images) == 1
    img = out.images[0]
    assert img.size == (256, 256) and img.mode == "RGB"  # the tiny preset's native size
    assert out.info["height"] == out.info["width"] == pipe.native_size == 256
    assert out.info["refiner_steps"] > 0 and out.info["base_steps"] > 0
    assert out.seed == 0


def test_output_types_are_views_of_one_result(pipe):
    kw: dict[str, Any] = {"num_inference_steps": STEPS, "seed": 11, "height": 192, "width": 320}
    as_np = pipe("a boat", output_type="np", **kw)
    as_pil = pipe("a boat", output_type="pil", **kw)
    as_pt = pipe("a boat", output_type="pt", **kw)
    as_latent = pipe("a boat", output_type="latent", **kw)
    assert as_np.images.shape == (1, 192, 320, 3) and as_np.images.dtype == np.float32
    assert 0.0 <= as_np.images.min() and as_np.images.max() <= 1.0
    np.testing.assert_array_equal(np.asarray(as_pil.images[0]), (as_np.images[0] * 255).round().astype(np.uint8))
    np.testing.assert_array_equal(as_pt.images.permute(0, 2, 3, 1).numpy(), as_np.images)
    assert torch.equal(as_latent.images, as_np.latents)
    assert as_latent.images.shape == (1, 4, 24, 40)
    assert "vae_decoder" not in as_latent.timings


def test_seed_is_a_cpu_generator(pipe):
    a = pipe("a cat", num_inference_steps=STEPS, seed=7, output_type="latent", scheduler="euler_a")
    b = pipe("a cat", num_inference_steps=STEPS, generator=torch.Generator("cpu").manual_seed(7),
             output_type="latent", scheduler="euler_a")
    c = pipe("a cat", num_inference_steps=STEPS, seed=8, output_type="latent", scheduler="euler_a")
    assert torch.equal(a.latents, b.latents)
    assert not torch.allclose(a.latents, c.latents)
    assert b.seed is None  # a caller's generator has no seed we could report


def test_no_seed_reports_the_one_it_drew(pipe):
    a = pipe("a cat", num_inference_steps=2, output_type="latent")
    b = pipe("a cat", num_inference_steps=2, output_type="latent", seed=a.seed)
    assert isinstance(a.seed, int) and torch.equal(a.latents, b.latents)


def test_timings_are_per_stage_and_per_step(pipe):
    out = pipe("a cat", "ugly", num_inference_steps=5, seed=1)
    t = out.timings
    assert len(t["unet"]) == out.info["base_steps"] and len(t["refiner_unet"]) == out.info["refiner_steps"]
    assert out.info["base_steps"] + out.info["refiner_steps"] == 5  # euler, order 1: every step once
    assert len(t["vae_decoder"]) == 1
    assert len(t["text_encoder"]) == 2 and len(t["text_encoder_2"]) == 2  # prompt + negative
    assert all(s > 0 for v in t.stages.values() for s in v)
    assert t.component_seconds == pytest.approx(sum(sum(v) for v in t.stages.values()))
    assert t.total >= t.component_seconds
    assert t.overhead_seconds == pytest.approx(t.total - t.component_seconds)
    d = t.to_dict()
    assert set(d) == {"stages", "total", "component_seconds", "overhead_seconds"}
    assert any(line.startswith("unet") for line in t.summary_lines())


def test_empty_negative_is_encoded_once_and_cached(tiny_artifacts):
    with SDXLPipeline.from_artifacts(tiny_artifacts, backend="onnxruntime", device="cpu") as p:
        first = p("a cat", num_inference_steps=2, seed=0)
        second = p("a dog", num_inference_steps=2, seed=0)
        # base: zeros (force_zeros_for_empty_prompt); refiner: text_encoder_2("") once
        assert len(first.timings["refiner_text_encoder_2"]) == 1
        assert "refiner_text_encoder_2" not in second.timings
        assert len(second.timings["text_encoder_2"]) == 1
        # an explicit "" is encoded by both encoders on the base (not zeros), te2's from the cache
        third = p("a cat", "", num_inference_steps=2, seed=0, output_type="latent")
        assert len(third.timings["text_encoder"]) == 2 and len(third.timings["text_encoder_2"]) == 1
        assert not torch.allclose(third.latents, p("a cat", num_inference_steps=2, seed=0,
                                                   output_type="latent").latents)


def test_guidance_off_encodes_no_negative(pipe):
    out = pipe("a cat", "ugly", num_inference_steps=2, seed=0, guidance_scale=1.0)
    assert out.info["guidance"] is False
    assert len(out.timings["text_encoder"]) == 1 and len(out.timings["text_encoder_2"]) == 1


def test_empty_prompt_works(pipe):
    out = pipe("", num_inference_steps=2, seed=0, output_type="np")
    assert np.isfinite(out.images).all() and out.images.std() > 0


def test_long_prompt_is_truncated_with_a_warning(pipe, logs):
    kw: dict[str, Any] = {"num_inference_steps": 2, "seed": 3, "output_type": "latent"}
    with logs.at_level(logging.WARNING, logger="sdxl_export"):
        a = pipe(LONG_PROMPT, **kw)
    assert any("truncated" in r.getMessage() for r in logs.records)
    b = pipe(LONG_PROMPT + " with a completely different ending", **kw)
    assert torch.equal(a.latents, b.latents)  # only the first 77 tokens count


def test_refiner_off_runs_every_base_step(pipe):
    out = pipe("a cat", num_inference_steps=4, seed=0, refiner=False, output_type="latent")
    assert out.info["base_steps"] == 4 and out.info["refiner_steps"] == 0
    assert "refiner_unet" not in out.timings


def test_nearest_size_maps_to_a_bucket(pipe):
    assert pipe.nearest_size(250, 262) == (256, 256)
    h, w = pipe.nearest_size(100, 410)
    assert any((b.height, b.width) == (h, w) for b in buckets_for(256)) and h < w


def test_backend_auto_is_onnxruntime_here_and_says_so(tiny_artifacts, logs):
    with logs.at_level(logging.INFO, logger="sdxl_export"):
        p = SDXLPipeline.from_artifacts(tiny_artifacts, load_refiner=False)
    with p:
        assert p.backend == "onnxruntime" and not p.has_refiner
        assert any("backend auto -> onnxruntime" in r.getMessage() for r in logs.records)


def test_description_records_session_options(pipe):
    d = pipe.description
    unet = d["components"]["unet"]
    assert d["backend"] == "onnxruntime" and unet["providers"] == ["CPUExecutionProvider"]
    so = unet["session_options"]
    assert so["graph_optimization_level"] == "ORT_ENABLE_ALL" and so["intra_op_num_threads"] >= 1
    assert so["enable_cpu_mem_arena"] is True and unet["source"] == "export"
    assert d["vae"]["scaling_factor"] == pytest.approx(0.13025)


# ---- the ONNX Runtime runner -----------------------------------------------------------------
def test_runner_checks_inputs_and_lifecycle(tiny_artifacts, pipe):
    spec = pipe.runners["vae_decoder"].spec
    runner = OrtRunner(spec, tiny_artifacts / "onnx/vae_decoder/model.onnx")
    latent = torch.randn(1, 4, 8, 8)
    with pytest.raises(RunnerClosedError):
        runner({"latent": latent})
    with runner:
        out = runner({"latent": latent})["images"]
        assert out.shape == (1, 3, 64, 64) and out.dtype == torch.float32
        with pytest.raises(InputMismatchError):
            runner({"latent": latent.double()})
        with pytest.raises(InputMismatchError):
            runner({"latent": latent, "extra": latent})
    assert not runner.is_open


def test_cpu_inputs_are_not_copied():
    x = torch.randn(2, 4, 8, 8)
    assert np.shares_memory(_numpy_view(x), x.numpy())
    y = x.transpose(2, 3)  # not contiguous: one copy is unavoidable
    assert np.array_equal(_numpy_view(y), y.numpy())


# ---- numerical safety ----------------------------------------------------------------------------
class _NaNRunner(ComponentRunner):
    """A backend whose component returns NaN (what an overflowing fp16 VAE or UNet does)."""

    backend = "nan-test"

    def _open_impl(self) -> None: ...

    def _close_impl(self) -> None: ...

    def _run(self, feeds):
        first = next(iter(feeds.values()))
        shapes = {t.name: t.concrete({"batch": first.shape[0], "latent_height": first.shape[-2],
                                      "latent_width": first.shape[-1], "height": first.shape[-2] * 8,
                                      "width": first.shape[-1] * 8}) for t in self.spec.outputs}
        return {n: torch.full(s, float("nan")) for n, s in shapes.items()}


@pytest.mark.parametrize("component", ["vae_decoder", "refiner_unet"])
def test_nan_is_a_named_error_never_a_black_image(tiny_artifacts, component):
    with SDXLPipeline.from_artifacts(tiny_artifacts, backend="onnxruntime", device="cpu") as p:
        real = p.runners[component]
        p.runners[component] = _NaNRunner(real.spec).open()
        with pytest.raises(NumericalError) as err:
            p("a cat", num_inference_steps=2, seed=0)
        assert "fp32" in err.value.hint


# ---- IO binding (the CUDA data path, exercised on CPU) ------------------------------------------
def test_io_binding_runner_equals_plain_run(tiny_artifacts, pipe):
    spec = pipe.runners["unet"].spec
    path = tiny_artifacts / "onnx/unet/model.onnx"
    feeds = {k: torch.from_numpy(v) for k, v in spec.example_inputs(2, 192, 320, seed=4).items()}
    feeds["sample"] = feeds["sample"].transpose(2, 3).contiguous().transpose(2, 3)  # not contiguous
    with OrtRunner(spec, path) as plain, OrtRunner(spec, path, io_binding=True) as bound:
        assert bound.description["io_binding"] is True and plain.description["io_binding"] is False
        want = plain(feeds)["noise_pred"]
        got = bound(feeds)["noise_pred"]
    assert got.shape == (2, 4, 24, 40) and torch.equal(got, want)


def test_io_binding_pipeline_equals_default(tiny_artifacts, pipe):
    kw = {"num_inference_steps": 3, "seed": 2, "output_type": "latent", "height": 128, "width": 512}
    with SDXLPipeline.from_artifacts(tiny_artifacts, backend="onnxruntime", device="cpu",
                                     backend_options={"io_binding": True}) as bound:
        assert all(d["io_binding"] for d in bound.description["components"].values())
        got = bound(["a cat", "a dog"], **kw).latents
    assert torch.equal(got, pipe(["a cat", "a dog"], **kw).latents)
