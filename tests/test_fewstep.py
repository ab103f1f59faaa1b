"""Few-step models: a UNet-only file replacing the base UNet, recorded sampling defaults, and
the distillation LoRAs (LCM-LoRA, Hyper-SD, TCD) in their published key layouts.

The oracle is diffusers: ``StableDiffusionXLPipeline`` with the UNet loaded the way
SDXL-Lightning's model card does it (``unet.load_state_dict(load_file(...))`` into the base's
UNet config), or with ``load_lora_weights`` + ``fuse_lora``, and the scheduler a user of that
model sets (``EulerDiscreteScheduler.from_config(cfg, timestep_spacing="trailing")``,
``LCMScheduler``, ``TCDScheduler``...). The "distilled" weights are the tiny preset's,
perturbed with a seed: what is tested is the plumbing, which real weights do not change.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import diffusers as d
import numpy as np
import pytest
import torch
from fixtures import run_cli
from lora_files import TEXT_TARGETS, _adapter
from safetensors.torch import save_file
from sdxl_export.errors import InvalidRequestError, ModelSourceError, UnsafeCheckpointError
from sdxl_export.export import export_model
from sdxl_export.runtime import SDXLPipeline
from sdxl_export.sampling_defaults import ModelDefaults

TOL = 1 / 255
SIZE = {"height": 64, "width": 64}
LIGHTNING = ModelDefaults.checked(4, 0.0, "euler_trailing")


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def distilled_unet(model: Any, seed: int = 7) -> torch.nn.Module:
    """The tiny base UNet with every weight nudged (seeded): "other weights, same architecture"."""
    unet = copy.deepcopy(model.unet)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in unet.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.02 * (p.abs().mean() + 1e-3))
    return unet


def _reference(model: Any, unet: Any, scheduler: Any, prompt: str, **kw: Any) -> np.ndarray:
    pipe = d.StableDiffusionXLPipeline(vae=model.vae, text_encoder=model.text_encoder,
                                       text_encoder_2=model.text_encoder_2, tokenizer=model.tokenizer,
                                       tokenizer_2=model.tokenizer_2, unet=unet, scheduler=scheduler,
                                       force_zeros_for_empty_prompt=True, add_watermarker=False)
    pipe.set_progress_bar_config(disable=True)
    with torch.no_grad():
        return pipe(prompt, output_type="np", **kw).images


# ---- a UNet-only file (SDXL-Lightning / DMD2 layout) with recorded defaults ----------------------
@pytest.fixture(scope="module")
def unet_file(tmp_path_factory, tiny_model) -> Path:
    """A diffusers UNet state dict in fp16, as sdxl_lightning_4step_unet.safetensors is."""
    path = tmp_path_factory.mktemp("unet") / "tiny_lightning_4step_unet.safetensors"
    sd = {k: v.half().contiguous() for k, v in distilled_unet(tiny_model).state_dict().items()}
    save_file(sd, str(path))
    return path


@pytest.fixture(scope="module")
def lightning(tmp_path_factory, tiny_artifacts, unet_file) -> tuple[Path, dict[str, Any]]:
    """The tiny export with the UNet file and Lightning's defaults: only the UNet re-exports."""
    import shutil

    out = tmp_path_factory.mktemp("lightning") / "artifacts"
    shutil.copytree(tiny_artifacts, out)
    manifest = export_model("tiny", out, unet=str(unet_file), defaults=LIGHTNING)
    return out, manifest


def test_unet_file_replaces_only_the_unet_and_is_recorded(lightning, unet_file):
    out, manifest = lightning
    assert manifest["exported"] == ["unet"], manifest["exported"]
    assert manifest["source"]["unet"] == str(unet_file.resolve())
    assert manifest["defaults"] == {"steps": 4, "guidance_scale": 0.0, "scheduler": "euler_trailing"}
    on_disk = json.loads((out / "manifest.json").read_text())
    assert on_disk["defaults"] == manifest["defaults"]
    # the same again: nothing to do; other defaults: the manifest only, no component re-exported
    again = export_model("tiny", out, unet=str(unet_file), defaults=LIGHTNING)
    assert again["up_to_date"] is True
    other = export_model("tiny", out, unet=str(unet_file), defaults=ModelDefaults.checked(8, 1.0, "lcm"))
    assert other["exported"] == [] and other["defaults"]["steps"] == 8
    back = export_model("tiny", out, unet=str(unet_file), defaults=LIGHTNING)
    assert back["exported"] == [] and back["defaults"] == manifest["defaults"]


def test_unet_file_with_defaults_matches_diffusers_lightning_recipe(lightning, tiny_model, unet_file):
    """A call without steps/guidance/scheduler runs the recorded 4 steps, no CFG, Euler trailing:
    diffusers with the UNet loaded from the file (the model card's recipe)."""
    from safetensors.torch import load_file

    out, _ = lightning
    unet = d.UNet2DConditionModel.from_config(tiny_model.unet.config)
    unet.load_state_dict(load_file(str(unet_file)))
    sched = d.EulerDiscreteScheduler.from_config(tiny_model.scheduler_config, timestep_spacing="trailing")
    ref = _reference(tiny_model, unet.eval(), sched, "a photo of a cat", num_inference_steps=4, guidance_scale=0.0,
                     generator=torch.Generator("cpu").manual_seed(3), **SIZE)
    with SDXLPipeline.from_artifacts(out, backend="onnxruntime", device="cpu", load_refiner=False) as pipe:
        assert pipe.defaults.effective()["steps"] == 4
        res = pipe("a photo of a cat", seed=3, refiner=False, output_type="np", **SIZE)
    assert res.info["base_steps"] == 4 and res.info["guidance"] is False and res.info["scheduler"] == "euler_trailing"
    err = float(np.abs(res.images - ref).max())
    assert err <= TOL, f"{err * 255:.3f}/255"


class _CountingRunner:
    """Records the batch of each UNet call, then runs the real runner (a spy, not a stand-in)."""

    def __init__(self, runner: Any):
        self.runner, self.batches = runner, []

    def __call__(self, feeds: dict[str, Any]) -> Any:
        self.batches.append(int(feeds["sample"].shape[0]))
        return self.runner(feeds)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.runner, name)


def test_guidance_free_calls_run_the_unet_once_per_step(lightning):
    """guidance <= 1 (the recorded 0): batch B through the UNet (no negative half), one call per step."""
    out, _ = lightning
    with SDXLPipeline.from_artifacts(out, backend="onnxruntime", device="cpu", load_refiner=False) as pipe:
        spy = _CountingRunner(pipe.runners["unet"])
        pipe.runners["unet"] = spy
        pipe(["a", "b"], seed=0, refiner=False, output_type="latent", **SIZE)
        assert spy.batches == [2] * 4
        spy.batches.clear()
        pipe("a", seed=0, refiner=False, output_type="latent", guidance_scale=5.0, num_inference_steps=2, **SIZE)
        assert spy.batches == [2, 2]
        pipe.runners["unet"] = spy.runner


def test_prediction_type_sample_for_one_step_x0_unets(tmp_path, lightning, tiny_model, unet_file):
    """``--prediction-type sample`` (Lightning's 1-step UNet): diffusers' Euler trailing with
    ``prediction_type="sample"``, 1 step. Recording it rewrites the manifest only."""
    import shutil

    from safetensors.torch import load_file

    out = tmp_path / "artifacts"
    shutil.copytree(lightning[0], out)
    m = export_model("tiny", out, unet=str(unet_file),
                     defaults=ModelDefaults.checked(1, 0.0, "euler_trailing", "sample"))
    assert m["exported"] == [] and m["defaults"]["prediction_type"] == "sample"
    unet = d.UNet2DConditionModel.from_config(tiny_model.unet.config)
    unet.load_state_dict(load_file(str(unet_file)))
    sched = d.EulerDiscreteScheduler.from_config(tiny_model.scheduler_config, timestep_spacing="trailing",
                                                 prediction_type="sample")
    ref = _reference(tiny_model, unet.eval(), sched, "a dog", num_inference_steps=1, guidance_scale=0.0,
                     generator=torch.Generator("cpu").manual_seed(4), **SIZE)
    with SDXLPipeline.from_artifacts(out, backend="onnxruntime", device="cpu", load_refiner=False) as pipe:
        res = pipe("a dog", seed=4, refiner=False, output_type="np", **SIZE)
    assert float(np.abs(res.images - ref).max()) <= TOL


def test_cli_run_uses_recorded_defaults(lightning, tmp_path):
    out, _ = lightning
    rc, stdout, stderr = run_cli("run", "a cat", "--artifacts", str(out), "--no-refiner", "--height", "64",
                                 "--width", "64", "--seed", "1", "--out", str(tmp_path / "x.png"), "--json",
                                 "--backend", "onnxruntime")
    assert rc == 0, stderr
    info = json.loads(stdout)
    assert info["base_steps"] == 4 and info["guidance"] is False and info["scheduler"] == "euler_trailing"
    rc, _, stderr = run_cli("run", "a cat", "--artifacts", str(out), "--no-refiner", "--height", "64", "--width",
                            "64", "--scheduler", "warp9", "--out", str(tmp_path / "y.png"), "--backend", "onnxruntime")
    assert rc == 2 and "unknown scheduler" in stderr and "euler_trailing" in stderr


def test_unet_folder_and_bad_unet_sources(tmp_path, tiny_model, unet_file):
    from sdxl_export.models.loader import resolve_source

    folder = tmp_path / "unet"
    distilled_unet(tiny_model).save_pretrained(str(folder), safe_serialization=True)
    src = resolve_source("tiny", unet=str(folder))
    assert src.identity["unet"] == str(folder.resolve())
    assert src.fingerprints["unet"] != resolve_source("tiny").fingerprints["unet"]
    loaded = src.load_part("unet")
    ref = distilled_unet(tiny_model)
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), ref.state_dict().values()))
    # a pickle file, a refiner UNet, a UNet with a guidance embedding, a non-UNet file: named errors
    (tmp_path / "u.bin").write_bytes(b"x")
    with pytest.raises(UnsafeCheckpointError):
        resolve_source("tiny", unet=str(tmp_path / "u.bin"))
    save_file({k: v.contiguous() for k, v in tiny_model.refiner_unet.state_dict().items()},
              str(tmp_path / "refiner.safetensors"))
    with pytest.raises(ModelSourceError, match="refiner"):
        resolve_source("tiny", unet=str(tmp_path / "refiner.safetensors"))
    save_file({"foo.weight": torch.zeros(2)}, str(tmp_path / "foo.safetensors"))
    with pytest.raises(ModelSourceError, match="not a UNet"):
        resolve_source("tiny", unet=str(tmp_path / "foo.safetensors"))
    plain = {k: v for k, v in tiny_model.unet.config.items() if not k.startswith("_")}
    lcm_unet = d.UNet2DConditionModel.from_config({**plain, "time_cond_proj_dim": 32})
    lcm_unet.save_pretrained(str(tmp_path / "lcm_unet"), safe_serialization=True)
    with pytest.raises(ModelSourceError, match="guidance embedding"):
        resolve_source("tiny", unet=str(tmp_path / "lcm_unet"))
    with pytest.raises(InvalidRequestError, match="unknown scheduler"):
        ModelDefaults.checked(4, 0.0, "warp9")


# ---- distillation LoRAs in their published layouts -------------------------------------------------
#: LCM-LoRA / Hyper-SD train LoRA on attention, projections, feed-forward and the resnets' convs
#: and time projections (LoCon style): 2-D and 4-D factors.
DISTILL_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2",
                   "conv1", "conv2", "time_emb_proj"]


def kohya_locon(model: Any, path: Path, seed: int) -> Path:
    """kohya layout (lcm-lora-sdxl, Hyper-SDXL-*-lora): ``lora_unet_<path>.lora_down/up/alpha``."""
    out: dict[str, torch.Tensor] = {}
    for key, value in _adapter(model.unet, DISTILL_TARGETS, 4, 8.0, seed).items():
        layer, kind = key.rsplit(".lora_", 1)
        name = "lora_unet_" + layer.replace(".", "_")
        out[f"{name}.lora_down.weight" if kind.startswith("A") else f"{name}.lora_up.weight"] = value
        out[f"{name}.alpha"] = torch.tensor(8.0)
    save_file(out, str(path))
    return path


def peft_layout(model: Any, path: Path, seed: int) -> Path:
    """diffusers/PEFT layout (TCD-SDXL-LoRA, DMD2's LoRA, diffusers' training scripts):
    ``unet.<path>.lora_A/lora_B.weight`` plus text-encoder LoRA ``text_encoder.*``."""
    out = {f"unet.{k}": v for k, v in _adapter(model.unet, DISTILL_TARGETS, 4, 4.0, seed).items()}
    out |= {f"text_encoder.{k}": v for k, v in _adapter(model.text_encoder, TEXT_TARGETS, 4, 4.0, seed + 1).items()}
    save_file(out, str(path))
    return path


LORA_CASES = {
    # name: (writer, our scheduler, diffusers scheduler, steps, guidance, extra call kwargs)
    "lcm_lora-kohya": (kohya_locon, "lcm", lambda c: d.LCMScheduler.from_config(c), 4, 1.0, {}),
    "hyper_sd-kohya-ddim_trailing": (kohya_locon, "ddim_trailing",
                                     lambda c: d.DDIMScheduler.from_config(c, timestep_spacing="trailing"), 2, 0.0, {}),
    "tcd-peft-eta": (peft_layout, "tcd", lambda c: d.TCDScheduler.from_config(c), 4, 0.0, {"eta": 0.3}),
}


@pytest.fixture(scope="module")
def base_pipe(tiny_artifacts):
    with SDXLPipeline.from_artifacts(tiny_artifacts, backend="onnxruntime", device="cpu", load_refiner=False) as p:
        yield p


@pytest.mark.parametrize("name", list(LORA_CASES))
def test_distillation_lora_layouts_match_diffusers(name, tmp_path, tiny_model, base_pipe):
    write, ours, make, steps, guidance, extra = LORA_CASES[name]
    path = write(tiny_model, tmp_path / f"{name}.safetensors", seed=hash(name) % 1000)
    m = tiny_model
    pipe = d.StableDiffusionXLPipeline(
        vae=m.vae, text_encoder=copy.deepcopy(m.text_encoder), text_encoder_2=copy.deepcopy(m.text_encoder_2),
        tokenizer=m.tokenizer, tokenizer_2=m.tokenizer_2, unet=copy.deepcopy(m.unet),
        scheduler=make(m.scheduler_config), force_zeros_for_empty_prompt=True, add_watermarker=False)
    pipe.set_progress_bar_config(disable=True)
    pipe.load_lora_weights(str(path), adapter_name="fewstep")
    pipe.fuse_lora()
    with torch.no_grad():
        ref = pipe("a cat", num_inference_steps=steps, guidance_scale=guidance, output_type="np",
                   generator=torch.Generator("cpu").manual_seed(5), **SIZE, **extra).images
    res = base_pipe("a cat", num_inference_steps=steps, guidance_scale=guidance, scheduler=ours, seed=5,
                    refiner=False, output_type="np", loras={str(path): 1.0}, **SIZE, **extra)
    err = float(np.abs(res.images - ref).max())
    print(f"\n{name}: max |pixel diff| {err * 255:.3f}/255")
    assert err <= TOL, f"{err * 255:.3f}/255"
    plain = _reference(m, m.unet, make(m.scheduler_config), "a cat", num_inference_steps=steps,
                       guidance_scale=guidance, generator=torch.Generator("cpu").manual_seed(5), **SIZE, **extra)
    assert float(np.abs(plain - ref).max()) > 2 * TOL, "the LoRA changed nothing: the test would prove nothing"


# ---- the server: recorded defaults on every API, the samplers on A1111's lists ------------------
@pytest.mark.slow  # its own server process over a Lightning build (~35 s)
def test_server_uses_recorded_defaults_and_lists_samplers(lightning, tmp_path):
    from serve_helpers import ServerProcess, png_array, request

    out, _ = lightning
    with SDXLPipeline.from_artifacts(out, backend="onnxruntime", device="cpu", load_refiner=False) as pipe:
        expected = np.asarray(pipe("a lighthouse", seed=21, refiner=False, **SIZE).images[0].convert("RGB"),
                              dtype=np.int16)
    srv = ServerProcess(out, "--backend", "onnxruntime", "--batch-wait-ms", "10", log_path=tmp_path / "s.log")
    try:
        status, _, raw = request(srv.url + "/v1/info")
        assert status == 200
        defaults = json.loads(raw)["defaults"]
        assert (defaults["steps"], defaults["guidance_scale"], defaults["scheduler"]) == (4, 0.0, "euler_trailing")
        assert "dpmpp_2m_sde_karras" in json.loads(raw)["schedulers"]
        # native: no steps/guidance/scheduler -> the recorded ones (the same image as the Python API)
        status, _, raw = request(srv.url + "/v1/generate", {"prompt": "a lighthouse", "seed": 21, "refiner": False,
                                                            **SIZE})
        assert status == 200, raw
        got = png_array(json.loads(raw)["images"][0])
        assert int(np.abs(got - expected).max()) <= 1
        # native: explicit schedule arguments reach the pipeline; a bad one is a 400 naming it
        status, _, raw = request(srv.url + "/v1/generate", {"prompt": "x", "seed": 1, "scheduler": "lcm",
                                                            "timesteps": [999, 749, 499, 249], **SIZE})
        assert status == 200, raw
        status, _, raw = request(srv.url + "/v1/generate", {"prompt": "x", "scheduler": "lms",
                                                            "timesteps": [999, 500], **SIZE})
        assert status == 400 and b"custom timesteps" in raw
        # A1111: no steps/cfg/sampler -> recorded; infotext names A1111's sampler and schedule type
        status, _, raw = request(srv.url + "/sdapi/v1/txt2img", {"prompt": "a lighthouse", "seed": 21,
                                                                 "width": 64, "height": 64})
        assert status == 200, raw
        info = json.loads(json.loads(raw)["info"])
        assert "Steps: 4, Sampler: Euler, Schedule type: SGM Uniform, CFG scale: 0" in info["infotexts"][0]
        assert int(np.abs(png_array(json.loads(raw)["images"][0]) - expected).max()) <= 1
        status, _, raw = request(srv.url + "/sdapi/v1/txt2img", {"prompt": "x", "steps": 3, "width": 64,
                                                                 "height": 64, "sampler_name": "DPM++ 2M SDE",
                                                                 "scheduler": "Karras", "cfg_scale": 2})
        assert status == 200, raw
        assert "Sampler: DPM++ 2M SDE, Schedule type: Karras" in json.loads(json.loads(raw)["info"])["infotexts"][0]
        names = {s["name"] for s in json.loads(request(srv.url + "/sdapi/v1/samplers")[2])}
        assert {"Euler", "Euler a", "Heun", "LMS", "DPM2", "DPM2 a", "DPM++ 2M", "DPM++ 2M SDE", "DPM++ SDE",
                "DPM++ 2S a", "DEIS", "DDIM", "UniPC", "LCM", "TCD", "DPM++ 2M Karras"} <= names
        labels = {s["label"] for s in json.loads(request(srv.url + "/sdapi/v1/schedulers")[2])}
        assert labels == {"Automatic", "Karras", "Exponential", "Beta", "SGM Uniform", "Uniform"}
        status, _, raw = request(srv.url + "/sdapi/v1/txt2img", {"prompt": "x", "sampler_name": "DPM fast"})
        assert status == 404 and b"DPM++ 2M SDE" in raw  # unknown sampler: 404, as the web UI answers
    finally:
        srv.stop()


def test_native_size_for_turbo_like_single_files(tmp_path):
    """``--native-size 512`` (SDXL-Turbo from a single file, read with SDXL's 1024 configs): the
    source's dims, identity and the planned buckets follow it; bad sizes are named errors."""
    from sdxl_export.models.loader import resolve_source

    src = resolve_source("tiny", native_size=128)
    assert src.dims().native_size == 128 and src.identity["native_size"] == 128
    assert resolve_source("tiny").dims().native_size == 256 and "native_size" not in resolve_source("tiny").identity
    with pytest.raises(ModelSourceError, match="multiple of 64"):
        resolve_source("tiny", native_size=100)
    rc, stdout, stderr = run_cli("plan", "--model", "tiny", "--native-size", "128", "--buckets", "all", "--json",
                                 "--out", str(tmp_path / "none"))
    assert rc == 0, stderr
    plan = json.loads(stdout)
    assert plan["native_size"] == 128
    assert "128x128" in {str(b) for b in plan["buckets"]}, plan["buckets"]


def test_guidance_free_default_tunes_unet_profiles_at_batch_b(lightning, tiny_artifacts):
    """Recorded guidance <= 1: the UNet's TensorRT ``opt`` is the guidance-free batch B; B and 2B
    are served either way (a request may still ask for guidance)."""
    from sdxl_export.engines.build import BuildOptions, make_plan
    from sdxl_export.export.exporter import load_export_manifest

    opts = BuildOptions(buckets="256x256", batch_sizes=(2,), profiles="bucketed")
    for folder, opt in ((lightning[0], 2), (tiny_artifacts, 4)):
        plan = make_plan(opts, load_export_manifest(folder))
        unet = plan.components["unet"]
        assert set(unet.batch_sizes) == {2, 4}
        opts_seen = {p.shapes["sample"][1][0] for p in unet.profiles}
        assert opts_seen == {opt}, (folder, opts_seen)
