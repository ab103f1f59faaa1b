"""OpenVINO engines on the tiny preset: build, fp32 parity with diffusers, the bf16 fidelity gate,
stale/foreign engines refused with the rebuild command, concurrency == sequential.

The oracle is diffusers' own pipelines on the same weights (test_parity_diffusers' Reference);
for bf16 also diffusers' bf16 pipeline (``from_pretrained(..., torch_dtype=torch.bfloat16)``).
"""

from __future__ import annotations

import json
import shutil
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch

pytest.importorskip("openvino")

from fixtures import tiny_diffusers_folders
from sdxl_export.engines.build import BuildOptions, build
from sdxl_export.engines.store import load_engine_store
from sdxl_export.errors import CorruptArtifactError, StaleEngineError, UnsupportedShapeError
from sdxl_export.openvino_env import native_bf16
from sdxl_export.runtime import SDXLPipeline
from sdxl_export.runtime.fidelity import fidelity_gate
from test_parity_diffusers import TINY_CASES, Case, Reference, _compare, _ours

BUCKETS = "256x256,192x320"


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _build(tmp_path_factory, tiny_artifacts, precision: str):
    out = tmp_path_factory.mktemp(f"tiny-ov-{precision}") / "artifacts"
    shutil.copytree(tiny_artifacts, out)
    report = build(BuildOptions(out=out, backend="openvino", buckets=BUCKETS, batch_sizes=(1, 2),
                                precision=precision))
    return out, report


@pytest.fixture(scope="module")
def ov_fp32(tiny_ov_fp32):
    return tiny_ov_fp32  # conftest: built once, shared with test_engines_speed


@pytest.fixture(scope="module")
def ov_pipe(ov_fp32):
    with SDXLPipeline.from_artifacts(ov_fp32, backend="auto", device="auto") as pipe:
        yield pipe


@pytest.fixture(scope="module")
def tiny_reference(tiny_model):
    return Reference(tiny_model.base_pipeline(), tiny_model.refiner_pipeline())


def test_build_records_openvino_engines_beside_the_main_table(ov_fp32):
    manifest = json.loads((ov_fp32 / "engines" / "manifest.json").read_text())
    assert manifest["engines"] == {}  # no main engines were built; the OpenVINO section is separate
    section = manifest["openvino"]
    assert section["complete"] and "--backend openvino" in section["build_command"]
    unet = section["engines"]["unet"]
    assert unet["backend"] == "openvino" and unet["precision"] == "fp32"
    assert set(unet["files"]) == {"engines/openvino/unet/model.xml", "engines/openvino/unet/model.bin"}
    assert unet["target"]["openvino"] and "cpu_flags" in unet["target"]
    assert unet["session_options"]["INFERENCE_PRECISION_HINT"] == "f32"
    assert unet["validation"]["parity"]["max_abs_error"]["noise_pred"] < 1e-3
    # a rerun rebuilds nothing
    again = build(BuildOptions(out=ov_fp32, backend="openvino", buckets=BUCKETS, batch_sizes=(1, 2)))
    assert again.up_to_date


@pytest.mark.parametrize("name", ["square-euler-refiner", "landscape-euler_a-batch2"])
def test_openvino_fp32_matches_diffusers(name, ov_pipe, tiny_reference):
    assert ov_pipe.backend == "openvino"  # auto picked it: OpenVINO engines, CPU machine
    assert ov_pipe.runners["unet"].description["config"]["INFERENCE_PRECISION_HINT"] == "f32"
    c = TINY_CASES[name]
    ref_latents, ref_images = tiny_reference(c)
    _compare(_ours(ov_pipe, c), ref_latents, ref_images, c)


def test_openvino_engine_refuses_unbuilt_sizes(ov_pipe):
    with pytest.raises(UnsupportedShapeError):
        ov_pipe("a cat", height=128, width=512, num_inference_steps=2, seed=0)


def test_openvino_concurrent_calls_equal_sequential(ov_pipe):
    reqs = [{"prompt": "a cat", "seed": 1, "scheduler": "euler_a", "height": 256, "width": 256},
            {"prompt": ["a dog", "a fox"], "seed": 2, "scheduler": "euler", "height": 192, "width": 320},
            {"prompt": "a ship", "seed": 3, "scheduler": "dpmpp_2m_karras", "refiner": False},
            {"prompt": "a tree", "seed": 4, "scheduler": "ddim", "guidance_scale": 1.0}]

    def run(r):
        kw = dict(r)
        return ov_pipe(kw.pop("prompt"), num_inference_steps=3, output_type="latent", **kw).latents

    with ThreadPoolExecutor(max_workers=4) as pool:
        concurrent = list(pool.map(run, reqs))
    sequential = [run(r) for r in reqs]
    for r, a, b in zip(reqs, concurrent, sequential):
        assert torch.equal(a, b), f"{r}: max diff {(a - b).abs().max():.3e}"
    assert len({tuple(x.flatten()[:8].tolist()) for x in sequential}) == len(reqs)


def _rewrite(art, edit):
    path = art / "engines" / "manifest.json"
    m = json.loads(path.read_text())
    edit(m["openvino"]["engines"]["unet"])
    path.write_text(json.dumps(m))


@pytest.mark.parametrize("what", ["version", "cpu", "onnx"])
def test_stale_or_foreign_openvino_engine_refused_with_rebuild_command(what, ov_fp32, tmp_path):
    art = tmp_path / "artifacts"
    shutil.copytree(ov_fp32, art)
    edits = {"version": lambda e: e["target"].update(openvino="2024.0.0"),
             "cpu": lambda e: e["target"].update(cpu_flags=["avx2", "amx_bf16", "amx_tile"]),
             "onnx": lambda e: e.update(onnx_sha256="0" * 64)}
    _rewrite(art, edits[what])
    with pytest.raises(StaleEngineError) as err:
        SDXLPipeline.from_artifacts(art, backend="openvino")
    assert "sdxl-export build" in err.value.hint and "--backend openvino" in err.value.hint
    assert str(art) in err.value.hint


def test_corrupt_openvino_weights_refused(ov_fp32, tmp_path):
    art = tmp_path / "artifacts"
    shutil.copytree(ov_fp32, art)
    with open(art / "engines/openvino/unet/model.bin", "r+b") as f:
        f.write(b"\0\0\0\0")
    with pytest.raises(CorruptArtifactError) as err:
        load_engine_store(art).verify("unet", backend="openvino")
    assert "--backend openvino" in err.value.hint


# ---- bf16 -----------------------------------------------------------------------------------------
GATE_CASE = Case("a photo of a cat", None, 256, 256, 5.0, False, "euler", 11, steps=8)


def test_openvino_bf16_passes_the_fidelity_gate(tmp_path_factory, tiny_artifacts, tiny_model, tiny_reference):
    has, why = native_bf16()
    if not has:
        pytest.skip(f"no bf16 gate here: {why}")
    from diffusers import StableDiffusionXLPipeline

    art, _report = _build(tmp_path_factory, tiny_artifacts, "fp16")  # --fp16 on a CPU -> bf16
    ov = json.loads((art / "engines" / "manifest.json").read_text())["openvino"]["engines"]
    assert ov["unet"]["precision"] == "bf16" and ov["unet"]["precision_requested"] == "fp16"
    assert ov["vae_decoder"]["precision"] == "fp32"  # the VAE stays fp32, as on the GPU
    c = GATE_CASE
    _, ref_images = tiny_reference(c)
    base_dir, _ = tiny_diffusers_folders(tmp_path_factory, tiny_model)
    bf16 = StableDiffusionXLPipeline.from_pretrained(base_dir, torch_dtype=torch.bfloat16, add_watermarker=False,
                                                     use_safetensors=True)
    bf16.set_progress_bar_config(disable=True)
    with torch.no_grad():
        theirs = bf16(c.prompt, height=c.height, width=c.width, num_inference_steps=c.steps,
                      guidance_scale=c.guidance, generator=torch.Generator("cpu").manual_seed(c.seed),
                      output_type="np").images.astype(np.float32)
    with SDXLPipeline.from_artifacts(art, backend="openvino") as pipe:
        assert pipe.runners["unet"].description["config"]["INFERENCE_PRECISION_HINT"] == "bf16"
        ours = _ours(pipe, c).images
    gate = fidelity_gate(ours, theirs, ref_images)
    print(f"\nbf16 fidelity: {gate.to_dict()}")
    assert np.abs(ours - ref_images).max() > 0, "bf16 images equal fp32 bit for bit: bf16 did not run"
    assert gate.passed, gate.why
