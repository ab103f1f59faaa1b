"""The PyTorch reference backend on CPU: loads every component from the artifacts and
agrees with the exported ONNX graphs in ONNX Runtime and with diffusers' own modules."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from sdxl_export.errors import (
    BackendUnavailableError,
    CorruptArtifactError,
    InputMismatchError,
    InvalidRequestError,
    MissingComponentError,
)
from sdxl_export.runtime.backends import ComponentContext, backend_available, create_runner
from sdxl_export.runtime.backends import torch as torch_backend
from sdxl_export.runtime.backends.base import RunnerClosedError
from sdxl_export.specs import COMPONENTS, ComponentSpec

#: Non-square, different from the export's validation shape (2 x 192x320) and from native.
SHAPE = (2, 320, 192)


def make_ctx(artifacts: Path, name: str, device: str = "cpu", **options) -> ComponentContext:
    manifest = json.loads((artifacts / "manifest.json").read_text())
    entry = manifest["components"][name]
    return ComponentContext(artifacts=artifacts, name=name, spec=ComponentSpec.from_dict(entry["spec"]),
                            export_entry=entry, device=device, options=options)


def torch_feeds(spec: ComponentSpec, shape=SHAPE, seed: int = 0) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(v) for k, v in spec.example_inputs(*shape, seed=seed).items()}


@pytest.fixture(scope="module")
def ort_reference(tiny_artifacts):
    """name -> (feeds as numpy, ONNX Runtime outputs) at SHAPE."""
    cache: dict[str, tuple[dict[str, np.ndarray], dict[str, np.ndarray]]] = {}

    def get(name: str):
        if name not in cache:
            ctx = make_ctx(tiny_artifacts, name)
            feeds = ctx.spec.example_inputs(*SHAPE)
            sess = ort.InferenceSession(str(tiny_artifacts / ctx.export_entry["file"]),
                                        providers=["CPUExecutionProvider"])
            outs = sess.run(list(ctx.spec.output_names), feeds)
            cache[name] = (feeds, dict(zip(ctx.spec.output_names, outs)))
        return cache[name]

    return get


def test_available_says_which_device():
    ok, why = torch_backend.available()
    assert ok is True
    assert ("cuda" in why) == torch.cuda.is_available()
    assert ("cpu" in why) != torch.cuda.is_available()
    assert backend_available("torch") == (True, why)


@pytest.mark.parametrize("name", COMPONENTS)
def test_every_component_matches_onnxruntime(tiny_artifacts, ort_reference, name):
    feeds, expected = ort_reference(name)
    ctx = make_ctx(tiny_artifacts, name)
    with create_runner("torch", ctx) as runner:
        assert isinstance(runner, torch_backend.TorchRunner)
        out = runner({k: torch.from_numpy(v) for k, v in feeds.items()})
    tol = ctx.spec.tolerance
    assert set(out) == set(ctx.spec.output_names)
    for t_spec in ctx.spec.outputs:
        got = out[t_spec.name]
        assert got.dtype == torch.float32 and got.device.type == "cpu"
        assert tuple(got.shape) == ctx.spec.output_shapes(*SHAPE)[t_spec.name]
        ref = expected[t_spec.name]
        assert np.abs(ref).max() > 0  # a real signal, not zeros on both sides
        np.testing.assert_allclose(got.numpy(), ref, atol=tol.atol, rtol=tol.rtol, err_msg=f"{name}.{t_spec.name}")


def test_matches_the_diffusers_modules_bit_for_bit(tiny_artifacts, tiny_model):
    """Weights reloaded from torch/<module> are exactly the model's: same code, same numbers."""
    spec = make_ctx(tiny_artifacts, "unet").spec
    feeds = torch_feeds(spec)
    with create_runner("torch", make_ctx(tiny_artifacts, "unet")) as runner:
        got = runner(feeds)["noise_pred"]
    with torch.inference_mode():
        ref = tiny_model.unet(feeds["sample"], feeds["timestep"], encoder_hidden_states=feeds["encoder_hidden_states"],
                              added_cond_kwargs={"text_embeds": feeds["text_embeds"], "time_ids": feeds["time_ids"]},
                              return_dict=False)[0]
    assert torch.equal(got, ref)

    spec2 = make_ctx(tiny_artifacts, "text_encoder_2").spec
    ids = torch_feeds(spec2)["input_ids"]
    with create_runner("torch", make_ctx(tiny_artifacts, "text_encoder_2")) as runner:
        out = runner({"input_ids": ids})
    with torch.inference_mode():
        ref2 = tiny_model.text_encoder_2(ids, output_hidden_states=True)
    assert torch.equal(out["hidden_states"], ref2.hidden_states[-2])
    assert torch.equal(out["text_embeds"], ref2.text_embeds)


def test_outputs_are_ordinary_tensors(tiny_artifacts):
    """Like the ONNX Runtime backend's: a caller may update them in place outside inference mode."""
    ctx = make_ctx(tiny_artifacts, "vae_encoder")
    with create_runner("torch", ctx) as runner:
        out = runner(torch_feeds(ctx.spec, (1, 64, 128)))["moments"]
    assert not out.is_inference()
    out.mul_(2.0)  # would raise on an inference tensor


def test_spec_checks_raise_input_mismatch(tiny_artifacts):
    ctx = make_ctx(tiny_artifacts, "unet")
    feeds = torch_feeds(ctx.spec, (1, 128, 64))
    with create_runner("torch", ctx) as runner:
        with pytest.raises(InputMismatchError, match="dtype float64"):
            runner({**feeds, "sample": feeds["sample"].double()})
        with pytest.raises(InputMismatchError, match="expected"):
            runner({k: v for k, v in feeds.items() if k != "time_ids"})
        with pytest.raises(InputMismatchError, match="shape"):
            runner({**feeds, "time_ids": torch.zeros(1, 5)})  # base UNet takes 6 time ids
        with pytest.raises(InputMismatchError, match="disagrees"):
            runner({**feeds, "text_embeds": torch.cat([feeds["text_embeds"]] * 2)})
        # still usable after refusing bad calls
        assert runner(feeds)["noise_pred"].shape == feeds["sample"].shape


def test_lifecycle(tiny_artifacts):
    ctx = make_ctx(tiny_artifacts, "text_encoder")
    feeds = torch_feeds(ctx.spec, (1, 64, 64))
    runner = create_runner("torch", ctx)
    assert not runner.is_open
    with pytest.raises(RunnerClosedError, match="not open"):
        runner(feeds)
    runner.open()
    first = runner(feeds)["hidden_states"]
    runner.open()  # idempotent
    runner.close()
    with pytest.raises(RunnerClosedError):
        runner(feeds)
    runner.close()  # idempotent
    with runner:  # reopens
        assert torch.equal(runner(feeds)["hidden_states"], first)
    assert not runner.is_open


def test_export_without_torch_weights_is_a_named_error(tiny_model, tiny_artifacts_copy):
    from sdxl_export.export import export_model

    manifest = export_model(tiny_model, tiny_artifacts_copy, torch_weights=False)  # incremental: assets only
    assert not any(k.startswith("torch/") for k in manifest["assets"])
    runner = create_runner("torch", make_ctx(tiny_artifacts_copy, "unet"))
    with pytest.raises(MissingComponentError, match="--no-torch-weights") as info:
        runner.open()
    assert "onnxruntime" in info.value.hint
    assert not runner.is_open


def test_deleted_weights_folder_is_a_named_error(tiny_artifacts_copy):
    shutil.rmtree(tiny_artifacts_copy / "torch" / "vae")
    with pytest.raises(MissingComponentError, match="vae"):
        create_runner("torch", make_ctx(tiny_artifacts_copy, "vae_decoder")).open()


def test_corrupt_weights_caught_with_verify(tiny_artifacts_copy):
    weights = next((tiny_artifacts_copy / "torch" / "text_encoder").glob("*.safetensors"))
    data = bytearray(weights.read_bytes())
    data[-8:] = b"\x00" * 8
    weights.write_bytes(bytes(data))
    with pytest.raises(CorruptArtifactError, match="hash"):
        create_runner("torch", make_ctx(tiny_artifacts_copy, "text_encoder", verify=True)).open()


def test_unknown_class_in_manifest_is_refused(tiny_artifacts_copy):
    path = tiny_artifacts_copy / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest["assets"]["torch/unet"]["class_name"] = "os.system"
    path.write_text(json.dumps(manifest))
    from sdxl_export.errors import ArtifactError

    with pytest.raises(ArtifactError, match="os.system"):
        create_runner("torch", make_ctx(tiny_artifacts_copy, "unet")).open()


@pytest.mark.parametrize(
    ("device", "options", "error", "match"),
    [
        ("cpu", {"dtype": "float16"}, InvalidRequestError, "needs a CUDA device"),
        ("cpu", {"dtype": "float8"}, InvalidRequestError, "unknown dtype"),
        ("cpu", {"cuda_graphs": True}, InvalidRequestError, "cuda_graphs needs a CUDA device"),
        ("cpu", {"cuda_graph": True}, InvalidRequestError, "unknown torch backend option"),
        ("cpu", {"max_graphs": 0}, InvalidRequestError, "max_graphs"),
        ("tpu", {}, InvalidRequestError, "device"),
    ],
)
def test_bad_options_are_named_errors(tiny_artifacts, device, options, error, match):
    with pytest.raises(error, match=match):
        create_runner("torch", make_ctx(tiny_artifacts, "unet", device=device, **options))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU message")
def test_cuda_without_a_gpu_is_backend_unavailable(tiny_artifacts):
    with pytest.raises(BackendUnavailableError, match="no CUDA GPU"):
        create_runner("torch", make_ctx(tiny_artifacts, "unet", device="cuda"))


def test_description_records_how_it_runs(tiny_artifacts):
    runner = create_runner("torch", make_ctx(tiny_artifacts, "vae_decoder"))
    assert runner.description == {"backend": "torch", "component": "vae_decoder", "device": "cpu",
                                  "dtype": "float32", "cuda_graphs": False, "graphs": None}


def test_pipeline_on_the_torch_backend_matches_onnxruntime(tiny_artifacts):
    """Base + refiner through SDXLPipeline: only the backend differs, so the images must agree."""
    from sdxl_export.runtime.pipeline import SDXLPipeline

    images = {}
    for backend in ("torch", "onnxruntime"):
        with SDXLPipeline.from_artifacts(tiny_artifacts, backend=backend, device="cpu") as pipe:
            assert all(r.backend == backend for r in pipe.runners.values())
            out = pipe("a red bicycle", height=192, width=320, num_inference_steps=5, seed=3, output_type="np")
            images[backend] = out.images
    assert images["torch"].shape == (1, 192, 320, 3)
    assert images["torch"].std() > 0.01
    np.testing.assert_allclose(images["torch"], images["onnxruntime"], atol=1e-4, rtol=0)
