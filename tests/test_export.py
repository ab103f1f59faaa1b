"""Export of the tiny preset: every component, the manifest contract, incremental reruns.

The oracle is PyTorch on the very same weights: diffusers' own SDXL pipeline for the
text encoders, the diffusers modules for the UNets and the VAE.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
from importlib import metadata

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from fixtures import file_states, tiny_diffusers_folders
from sdxl_export import ARTIFACT_FORMAT_VERSION, errors
from sdxl_export.artifacts import EXPORT_MANIFEST, FORMAT_EXPORT, verify_files
from sdxl_export.export import export_model, load_export_manifest, onnx_tools
from sdxl_export.export.exporter import validation_shape
from sdxl_export.models.loader import resolve_source
from sdxl_export.models.wrappers import wrap
from sdxl_export.specs import COMPONENTS, component_specs


def session(path) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def manifest_of(root) -> dict:
    return json.loads((root / EXPORT_MANIFEST).read_text())


# ---- what an export contains ---------------------------------------------------------------
def test_all_six_components_exported_and_validated(tiny_artifacts):
    m = load_export_manifest(tiny_artifacts, verify=True)  # every file's sha256 checked
    assert m["complete"] is True
    assert list(m["components"]) == list(COMPONENTS)
    for name, rec in m["components"].items():
        path = tiny_artifacts / rec["file"]
        onnx.checker.check_model(str(path))
        spec = rec["spec"]
        val, traced = rec["validation"], rec["traced_shape"]
        assert val["passed"] is True, name
        # Validated at a shape unlike the traced one in every dynamic dim.
        assert all(val["shape"][d] != traced[d] for d in ("batch", "height", "width")), name
        assert set(val["max_abs_error"]) == {o["name"] for o in spec["outputs"]}
        assert max(val["max_abs_error"].values()) <= val["tolerance"]["atol"], name
        # The graph's inputs/outputs are the spec's, with the spec's symbolic dims.
        graph = onnx.load(str(path), load_external_data=False).graph
        for tensors, specs in ((graph.input, spec["inputs"]), (graph.output, spec["outputs"])):
            assert [t.name for t in tensors] == [s["name"] for s in specs], name
            for t, s in zip(tensors, specs):
                dims = [d.dim_param or d.dim_value for d in t.type.tensor_type.shape.dim]
                assert dims == s["shape"], (name, t.name)


def test_manifest_records_source_versions_specs_and_assets(tiny_artifacts, tiny_model):
    m = manifest_of(tiny_artifacts)
    assert (m["format"], m["format_version"]) == (FORMAT_EXPORT, ARTIFACT_FORMAT_VERSION)
    assert m["source"] == resolve_source("tiny").identity == tiny_model.source
    assert m["source"]["kind"] == "preset" and m["source"]["refiner"] == "tiny"
    assert m["opset"] == onnx_tools.DEFAULT_OPSET and m["native_size"] == 256
    for dist in ("torch", "onnx", "onnxruntime", "diffusers", "transformers"):
        assert m["versions"][dist] == metadata.version(dist)
    assert m["model"] == tiny_model.dims().to_dict()
    specs = component_specs(tiny_model.dims())
    for name, rec in m["components"].items():
        assert rec["spec"] == specs[name].to_dict()
        assert rec["size_bytes"] == sum((tiny_artifacts / f).stat().st_size for f in rec["files"])
        assert rec["export_seconds"] > 0 and len(rec["key"]) == 64
    assert m["vae"]["scaling_factor"] == tiny_model.vae.config.scaling_factor
    assert set(m["assets"]) == {"tokenizer", "tokenizer_2", "scheduler", "refiner_scheduler", "torch/text_encoder",
                                "torch/text_encoder_2", "torch/unet", "torch/refiner_unet", "torch/vae"}
    assert m["assets"]["torch/unet"]["class_name"] == "UNet2DConditionModel"
    sched = json.loads((tiny_artifacts / "scheduler" / "scheduler_config.json").read_text())
    assert sched == tiny_model.scheduler_config


def test_text_encoders_match_diffusers_encode_prompt(tiny_artifacts, tiny_model):
    """ONNX text encoders + the saved tokenizers reproduce StableDiffusionXLPipeline.encode_prompt."""
    from transformers import CLIPTokenizer

    prompts = ["a photo of a cat sitting on a chair", "an astronaut riding a horse on the moon, digital art"]
    with torch.no_grad():
        want, _, want_pooled, _ = tiny_model.base_pipeline().encode_prompt(
            prompts, device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=False)
    hidden = []
    for name, tok_dir in (("text_encoder", "tokenizer"), ("text_encoder_2", "tokenizer_2")):
        tok = CLIPTokenizer.from_pretrained(str(tiny_artifacts / tok_dir))
        ids = tok(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="np").input_ids
        outs = session(tiny_artifacts / "onnx" / name / "model.onnx").run(None, {"input_ids": ids.astype(np.int32)})
        hidden.append(outs[0])
        pooled = outs[1] if name == "text_encoder_2" else None
    np.testing.assert_allclose(np.concatenate(hidden, axis=-1), want.numpy(), atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(pooled, want_pooled.numpy(), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ["unet", "refiner_unet"])
def test_unets_serve_latent_sizes_off_the_traced_grid(tiny_artifacts, tiny_model, name):
    """Odd, non-square latents (25x17) and a large square (64x64): not the traced 34x34's multiples."""
    spec = component_specs(tiny_model.dims())[name]
    module = wrap(tiny_model, spec)
    path = tiny_artifacts / "onnx" / name / "model.onnx"
    for shape in ((3, 200, 136), (1, 512, 512)):
        record = onnx_tools.validate(module, spec, path, shape)
        assert record["passed"] and record["shape"] == dict(zip(("batch", "height", "width"), shape))
        assert record["max_abs_error"]["noise_pred"] < 1e-4


def test_validation_shape_differs_from_the_trace_and_is_a_bucket():
    b, h, w = validation_shape(256)
    assert (b, h, w) == (2, 192, 320)
    # full size: SDXL's 768x1344 bucket scaled under MAX_VALIDATION_PIXELS (aspect kept, 64-px steps)
    assert validation_shape(1024) == (2, 448, 832)
    assert validation_shape(512) == (2, 384, 704)  # small: its own bucket, under the cap


def test_export_records_peak_memory_and_frees_each_module(tiny_artifacts):
    """Every component's record carries its peak RSS; the summary prints it."""
    from sdxl_export.export.exporter import load_export_manifest
    from sdxl_export.export.report import export_summary

    m = load_export_manifest(tiny_artifacts)
    for name, rec in m["components"].items():
        assert rec["peak_rss_bytes"] > 50 * 2**20, name
        assert rec["validation"]["torch_seconds"] >= 0
    text = export_summary({**m, "exported": list(m["components"])}, tiny_artifacts)
    assert "peak RSS" in text.splitlines()[0]


# ---- incremental and atomic ---------------------------------------------------------------
def test_rerun_with_same_inputs_does_no_work(tiny_artifacts_copy, tiny_model):
    before = file_states(tiny_artifacts_copy)
    for model in ("tiny", tiny_model):  # the preset name and the built model are the same source
        result = export_model(model, tiny_artifacts_copy)
        assert result["up_to_date"] is True and result["exported"] == []
    assert file_states(tiny_artifacts_copy) == before  # nothing rewritten, manifest included


def test_no_refiner_rerun_drops_the_refiner_and_keeps_the_rest(tiny_artifacts_copy):
    before = manifest_of(tiny_artifacts_copy)
    result = export_model("tiny", tiny_artifacts_copy, with_refiner=False)
    assert result["exported"] == [] and result["up_to_date"] is False
    m = load_export_manifest(tiny_artifacts_copy, verify=True)
    assert list(m["components"]) == ["text_encoder", "text_encoder_2", "unet", "vae_decoder", "vae_encoder"]
    assert m["source"]["refiner"] is None and m["model"]["refiner_context"] is None
    assert "refiner_scheduler" not in m["assets"] and "torch/refiner_unet" not in m["assets"]
    for name, rec in m["components"].items():
        assert rec == before["components"][name]  # same graphs, same records
    assert not (tiny_artifacts_copy / "onnx" / "refiner_unet").exists()
    assert not (tiny_artifacts_copy / "torch" / "refiner_unet").exists()


def test_a_damaged_component_is_reexported_alone(tiny_artifacts_copy):
    path = tiny_artifacts_copy / "onnx" / "vae_encoder" / "model.onnx"
    path.write_bytes(path.read_bytes()[:-16])
    shutil.rmtree(tiny_artifacts_copy / "tokenizer_2")
    before = manifest_of(tiny_artifacts_copy)
    result = export_model("tiny", tiny_artifacts_copy)
    assert result["exported"] == ["vae_encoder"]
    m = load_export_manifest(tiny_artifacts_copy, verify=True)
    assert m["components"]["vae_encoder"]["validation"]["passed"]
    assert m["components"]["unet"] == before["components"]["unet"]
    assert (tiny_artifacts_copy / "tokenizer_2" / "tokenizer_config.json").is_file()


def test_torch_weights_can_be_left_out_and_added_back(tiny_artifacts_copy):
    result = export_model("tiny", tiny_artifacts_copy, torch_weights=False)
    assert result["exported"] == []
    assert not any(a.startswith("torch/") for a in result["assets"])
    assert not (tiny_artifacts_copy / "torch" / "unet").exists()
    result = export_model("tiny", tiny_artifacts_copy)
    assert result["exported"] == [] and "torch/unet" in result["assets"]
    verify_files(tiny_artifacts_copy, result["assets"]["torch/unet"]["files"], "torch/unet")


def test_a_second_export_into_the_same_folder_is_refused(tiny_artifacts_copy):
    fd = os.open(tiny_artifacts_copy, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # as a running export holds it
        with pytest.raises(errors.OutputDirError, match="another sdxl-export export"):
            export_model("tiny", tiny_artifacts_copy, with_refiner=False)
    finally:
        os.close(fd)
    assert manifest_of(tiny_artifacts_copy)["complete"] is True  # untouched


def test_failed_first_export_leaves_no_folder(tiny_model, tmp_path_factory, tmp_path):
    base = shutil.copytree(tiny_diffusers_folders(tmp_path_factory, tiny_model)[0], tmp_path / "base")
    weights = next((base / "text_encoder").glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:64])  # loads fine as a source, fails as weights
    out = tmp_path / "out"
    with pytest.raises(errors.ModelSourceError, match="cannot load text_encoder"):
        export_model(str(base), out)
    assert not out.exists()


def test_opset_out_of_range_is_refused_before_anything(tmp_path):
    for opset in (onnx_tools.MIN_OPSET - 1, onnx_tools.MAX_OPSET + 1):
        with pytest.raises(errors.OpsetError, match=str(opset)):
            export_model("tiny", tmp_path / "out", opset=opset)
    assert not (tmp_path / "out").exists()


def test_per_tensor_external_data_is_consolidated_into_one_file(tiny_artifacts, tmp_path):
    """The >2 GB path (torch writes one file per tensor) on a small graph: same graph, same outputs."""
    src = tiny_artifacts / "onnx" / "text_encoder_2" / "model.onnx"
    raw = tmp_path / "raw" / "raw.onnx"
    raw.parent.mkdir()
    onnx.save_model(onnx.load(str(src)), str(raw), save_as_external_data=True, all_tensors_to_one_file=False,
                    size_threshold=0)
    assert len(list(raw.parent.iterdir())) > 10  # one file per tensor, as torch writes big models
    out = tmp_path / "out" / "model.onnx"
    out.parent.mkdir()
    onnx_tools.consolidate_external_data(raw, out)
    assert sorted(p.name for p in out.parent.iterdir()) == ["model.onnx", onnx_tools.EXTERNAL_DATA_NAME]
    onnx.checker.check_model(str(out))
    shutil.rmtree(raw.parent)  # nothing may point back at the per-tensor files
    ids = np.random.default_rng(0).integers(1, 800, size=(2, 77)).astype(np.int32)
    want = session(src).run(None, {"input_ids": ids})
    got = session(out).run(None, {"input_ids": ids})
    for w, g in zip(want, got):
        np.testing.assert_array_equal(w, g)
