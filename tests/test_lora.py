"""LoRA, fused at export and switched at run time, held to diffusers' own LoRA path.

Oracle: diffusers' ``StableDiffusionXLPipeline`` on the same base weights with
``load_lora_weights`` + ``set_adapters(names, scales)`` + ``fuse_lora``, same seed,
``output_type="np"``; <= 1/255 per pixel. The LoRA files are made here (tests/lora_files.py):
a diffusers-format one (UNet + text_encoder) and a kohya-format one (UNet + text_encoder_2,
alpha != rank).
"""

from __future__ import annotations

import copy
import pickle

import numpy as np
import pytest
import torch
from lora_files import diffusers_lora, kohya_lora, sd15_shaped_lora
from sdxl_export.errors import InvalidLoraError
from sdxl_export.runtime import SDXLPipeline

TOL = 1 / 255
CALL = {"height": 128, "width": 128, "num_inference_steps": 3, "guidance_scale": 5.0, "refiner": False,
        "output_type": "np"}
PROMPT = "a photo of a cat"


@pytest.fixture(scope="module")
def files(tmp_path_factory, tiny_model):
    d = tmp_path_factory.mktemp("loras")
    return {"A": diffusers_lora(tiny_model, d / "A.safetensors", seed=1),
            "B": kohya_lora(tiny_model, d / "B.safetensors", seed=5),
            "sd15": sd15_shaped_lora(d / "sd15.safetensors"), "dir": d}


@pytest.fixture(scope="module")
def reference(tiny_model, files):
    """image of diffusers' pipeline with a LoRA set ({"A": 0.7, ...}), cached per set."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline

    cache: dict[tuple, np.ndarray] = {}

    def run(lset: dict[str, float]) -> np.ndarray:
        key = tuple(sorted(lset.items()))
        if key not in cache:
            m = tiny_model
            pipe = StableDiffusionXLPipeline(
                vae=m.vae, text_encoder=copy.deepcopy(m.text_encoder), text_encoder_2=copy.deepcopy(m.text_encoder_2),
                tokenizer=m.tokenizer, tokenizer_2=m.tokenizer_2, unet=copy.deepcopy(m.unet),
                scheduler=EulerDiscreteScheduler.from_config(m.scheduler_config))
            pipe.set_progress_bar_config(disable=True)
            if lset:
                for name in lset:
                    pipe.load_lora_weights(str(files[name]), adapter_name=name)
                pipe.set_adapters(list(lset), list(lset.values()))
                pipe.fuse_lora()
            with torch.no_grad():
                cache[key] = pipe(PROMPT, generator=torch.Generator("cpu").manual_seed(0), **CALL).images
        return cache[key]

    return run


# the torch backend's LoRA path is the same switch code; its run is second-tier (slow)
@pytest.fixture(scope="module", params=["onnxruntime", pytest.param("torch", marks=pytest.mark.slow)])
def pipe(request, tiny_artifacts):
    p = SDXLPipeline.from_artifacts(tiny_artifacts, request.param, device="cpu", load_refiner=False)
    yield p
    p.close()


def _image(pipe: SDXLPipeline, **kw) -> np.ndarray:
    return pipe(PROMPT, seed=0, **CALL, **kw).images



def test_switch_sequence_matches_diffusers(pipe, files, reference):
    """none -> A -> B -> A+B -> none -> A in one pipeline: each equals diffusers with that set
    (diffusers-format A with text_encoder weights, kohya-format B with text_encoder_2 weights,
    two LoRAs at different scales together); the LoRAs change the image."""
    sets = {"none": {}, "A": {"A": 0.7}, "B": {"B": 1.2}, "A+B": {"A": 0.7, "B": 1.2}}
    images = {}
    for name in ["none", "A", "B", "A+B", "none", "A"]:
        record = pipe.set_loras({str(files[k]): s for k, s in sets[name].items()})
        got = _image(pipe)
        want = reference(sets[name])
        assert np.abs(got - want).max() <= TOL, name
        images[name] = got
        if record is not None:
            assert record["switch_ms"] >= 0 and record["backend"] == pipe.backend
    assert np.abs(images["A"] - images["none"]).max() > 10 * TOL
    assert np.abs(images["B"] - images["A"]).max() > 10 * TOL


def test_per_call_loras_and_names(pipe, files, reference):
    """``loras=`` per call overrides the default set for that call only; names resolve in lora_dir."""
    pipe.set_loras({})
    pipe.lora_dir = files["dir"]
    got = pipe(PROMPT, seed=0, loras={"B": 1.2}, **CALL)
    assert np.abs(got.images - reference({"B": 1.2})).max() <= TOL
    assert got.info["loras"][0]["name"] == "B"
    assert np.abs(_image(pipe) - reference({})).max() <= TOL


@pytest.mark.parametrize("bad, fragment", [
    ("pickle", "not a safetensors"), ("sd15", "does not fit"), ("missing", "does not exist"),
    ("nan", "finite"), ("inf", "finite"), ("absurd", "finite"),
])
def test_bad_lora_is_named_and_changes_nothing(pipe, files, reference, tmp_path, bad, fragment):
    pipe.set_loras({str(files["A"]): 0.7})
    before = pipe.loras.active.key
    loras = {"pickle": {str(tmp_path / "x.ckpt"): 1.0}, "sd15": {str(files["sd15"]): 1.0},
             "missing": {str(tmp_path / "nope.safetensors"): 1.0}, "nan": {str(files["B"]): float("nan")},
             "inf": {str(files["B"]): float("inf")}, "absurd": {str(files["B"]): 1e6}}[bad]
    (tmp_path / "x.ckpt").write_bytes(pickle.dumps({"a": 1}))
    with pytest.raises(InvalidLoraError, match=fragment) as err:
        pipe.set_loras(loras)
    assert "\n" not in err.value.one_line() and err.value.hint
    assert pipe.loras.active.key == before
    assert np.abs(_image(pipe) - reference({"A": 0.7})).max() <= TOL


@pytest.mark.slow  # a second export with the LoRA fused (~1 min)
def test_fused_at_export_equals_switched(tmp_path, tiny_model, files, reference):
    """export --lora fuses before export (== diffusers' fuse_lora); a changed scale re-exports
    only the components that LoRA touches (B: unet + text_encoder_2)."""
    from sdxl_export.export import export_model

    out = tmp_path / "fused"
    export_model(tiny_model, out, loras=[(files["B"], 1.2)])
    with SDXLPipeline.from_artifacts(out, "onnxruntime", device="cpu", load_refiner=False) as p:
        assert np.abs(_image(p) - reference({"B": 1.2})).max() <= TOL
    again = export_model(tiny_model, out, loras=[(files["B"], 0.5)])
    assert sorted(again["exported"]) == ["text_encoder_2", "unet"]
    assert again["loras"][0]["scale"] == 0.5


def test_parameter_map_points_at_equal_values(tiny_artifacts, tiny_model):
    """The exporter's map: every mapped parameter equals its initializer (transposed where recorded),
    and every LoRA target (attention projections) is mapped or unused by the graph (the first text
    encoder's last layer: SDXL reads its penultimate hidden states)."""
    import onnx
    from onnx import numpy_helper
    from sdxl_export.export.exporter import load_export_manifest

    manifest = load_export_manifest(tiny_artifacts)
    for part in ("text_encoder", "text_encoder_2", "unet"):
        rec = manifest["components"][part]
        mapping = rec["parameters"]["map"]
        path = tiny_artifacts / rec["file"]
        inits = {i.name: i for i in onnx.load(str(path), load_external_data=False).graph.initializer}
        params = dict(getattr(tiny_model, part).named_parameters())
        assert any(t for _, t in mapping.values()), "no Linear -> MatMul transposition recorded"
        for name, (init, transposed) in mapping.items():
            value = numpy_helper.to_array(inits[init], base_dir=str(path.parent))
            want = params[name].detach().numpy()
            np.testing.assert_array_equal(value.T if transposed else value, want)
        targets = [n for n in params if n.endswith(("to_q.weight", "q_proj.weight", "out_proj.weight"))]
        unused = set(rec["parameters"]["unused"])
        assert targets and all(n in mapping or n in unused for n in targets)
        assert not rec["parameters"]["shared"] or not set(targets) & set(rec["parameters"]["shared"])
        assert sum(n in mapping for n in targets) >= len(targets) // 2


def test_cli_run_with_lora_and_bad_lora(tiny_artifacts, files, reference, tmp_path):
    """``run --lora FILE:SCALE`` is the API's set; a bad scale or file is one line, exit 2."""
    from fixtures import run_cli
    from PIL import Image

    common = ["run", "a photo of a cat", "--artifacts", str(tiny_artifacts), "--backend", "onnxruntime",
              "--device", "cpu", "--no-refiner", "--steps", "3", "--height", "128", "--width", "128", "--seed", "0"]
    rc, _, err = run_cli(*common, "--lora", f"{files['A']}:0.7", "--out", str(tmp_path / "a.png"))
    assert rc == 0, err
    got = np.asarray(Image.open(tmp_path / "a.png"), dtype=np.float32) / 255
    assert np.abs(got - reference({"A": 0.7})[0]).max() <= 1.5 / 255  # + PNG's 8-bit rounding
    for bad, word in ((f"{files['A']}:nan", "finite"), (str(tmp_path / "none.safetensors"), "does not exist")):
        rc, _, err = run_cli(*common, "--lora", bad, "--out", str(tmp_path / "b.png"))
        lines = [ln for ln in err.splitlines() if ln.startswith("sdxl-export: error: ")]
        assert rc == 2 and len(lines) == 1 and word in lines[0] and ". Fix: " in lines[0], err
        assert not (tmp_path / "b.png").exists()


def test_concurrent_calls_with_different_sets(tiny_artifacts, files, reference):
    """4 threads, alternating LoRA sets per call: every image equals diffusers' with its own set
    (no call runs on another set's or half-switched weights)."""
    from concurrent.futures import ThreadPoolExecutor

    sets = [{"A": 0.7}, {"B": 1.2}, {"A": 0.7}, {}]
    with SDXLPipeline.from_artifacts(tiny_artifacts, "torch", device="cpu", load_refiner=False) as p, \
            ThreadPoolExecutor(4) as pool:
        images = list(pool.map(lambda s: _image(p, loras={str(files[k]): v for k, v in s.items()}), sets))
    for s, got in zip(sets, images):
        assert np.abs(got - reference(s)).max() <= TOL, s
