"""Acceptance: ControlNet on ONNX Runtime CPU produces diffusers' ControlNet images for the same seed.

The oracle is diffusers' own ``StableDiffusionXLControlNetPipeline`` (``MultiControlNetModel``
for two) and ``StableDiffusionXLControlNetImg2ImgPipeline`` on the very same weights (the tiny
preset and two seeded ControlNets, one loaded from a diffusers folder, one from a single
.safetensors file), with the refiner hand-off as diffusers documents it. Then the export
(validated graphs, incremental) and every bad input: a named error, nothing changed.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytest
import torch
from controlnet_util import control_map, controlnet_artifacts, controlnet_sources, reference_controlnets
from diffusers import (
    MultiControlNetModel,
    StableDiffusionXLControlNetImg2ImgPipeline,
    StableDiffusionXLControlNetPipeline,
)
from sdxl_export.errors import InvalidImageError, ModelSourceError
from sdxl_export.runtime import SDXLPipeline
from sdxl_export.runtime.controlnet import InvalidControlError, UnknownControlNetError
from test_img2img import test_image
from test_parity_diffusers import LATENT_TOL, PIXEL_TOL


@dataclass(frozen=True)
class Case:
    nets: tuple[str, ...]
    size: tuple[int, int]
    seed: int
    scale: Any = 1.0
    start: Any = 0.0
    end: Any = 1.0
    guess: bool = False
    strength: float | None = None  # img2img
    refiner: bool = False
    steps: int = 4
    prompt: Any = "a house by a lake"
    extra: dict = field(default_factory=dict)


CASES = {
    "one": Case(("cn-a",), (256, 256), 0, scale=0.8),
    "one-landscape-window": Case(("cn-b",), (192, 320), 1, scale=1.3, start=0.2, end=0.7),
    "two-scales-windows": Case(("cn-a", "cn-b"), (256, 256), 2, scale=[0.6, 1.2], start=[0.0, 0.3], end=[0.7, 1.0]),
    "guess-mode": Case(("cn-a",), (256, 256), 3, scale=0.9, guess=True),
    "img2img": Case(("cn-b",), (256, 256), 4, scale=1.0, strength=0.6),
    "refiner": Case(("cn-a",), (256, 256), 5, scale=1.0, refiner=True),
}


def _control(c: Case) -> Any:
    maps = [control_map(*c.size, seed=c.seed + k) for k in range(len(c.nets))]
    return maps if len(c.nets) > 1 else maps[0]


def _generator(c: Case) -> torch.Generator:
    return torch.Generator("cpu").manual_seed(c.seed)


class Reference:
    def __init__(self, model: Any):
        self.model = model
        self.nets = reference_controlnets(model)
        self.refiner = model.refiner_pipeline()
        self.refiner.set_progress_bar_config(disable=True)

    def __call__(self, c: Case, lora: tuple[str, float] | None = None) -> tuple[torch.Tensor, np.ndarray]:
        base = self.model.base_pipeline()
        nets = [self.nets[n] for n in c.nets]
        cn = nets[0] if len(nets) == 1 else MultiControlNetModel(nets)
        cls = StableDiffusionXLControlNetPipeline if c.strength is None else StableDiffusionXLControlNetImg2ImgPipeline
        comps = {k: v for k, v in base.components.items() if k in
                 ("vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "unet", "scheduler")}
        if lora is not None:  # fused into copies: the shared tiny model stays as it is
            import copy

            comps.update({k: copy.deepcopy(comps[k]) for k in ("text_encoder", "text_encoder_2", "unet")})
        pipe = cls(**comps, controlnet=cn, force_zeros_for_empty_prompt=True, add_watermarker=False)
        pipe.set_progress_bar_config(disable=True)
        if lora is not None:
            pipe.load_lora_weights(lora[0], adapter_name="style")
            pipe.set_adapters(["style"], [lora[1]])
            pipe.fuse_lora()
        final: dict[str, torch.Tensor] = {}

        def keep(p: Any, i: int, t: Any, kw: dict[str, Any]) -> dict[str, Any]:
            final["latents"] = kw["latents"].clone()
            return kw

        kw: dict[str, Any] = dict(num_inference_steps=c.steps, guidance_scale=5.0, generator=_generator(c),  # noqa: C408 - keyword arguments of a call
                                  controlnet_conditioning_scale=c.scale, control_guidance_start=c.start,
                                  control_guidance_end=c.end, guess_mode=c.guess)
        with torch.no_grad():
            if c.strength is not None:
                out = pipe(c.prompt, image=test_image(*c.size, seed=c.seed), control_image=_control(c),
                           strength=c.strength, output_type="np", callback_on_step_end=keep, **kw).images
            elif c.refiner:
                lat = pipe(c.prompt, image=_control(c), output_type="latent", denoising_end=0.8, **kw).images
                out = self.refiner(c.prompt, image=lat, denoising_start=0.8, output_type="np",
                                   num_inference_steps=c.steps, guidance_scale=5.0, generator=kw["generator"],
                                   callback_on_step_end=keep).images
            else:
                out = pipe(c.prompt, image=_control(c), output_type="np", callback_on_step_end=keep, **kw).images
        return final["latents"], out


def _ours(pipe: SDXLPipeline, c: Case, **over: Any) -> Any:
    kw: dict[str, Any] = dict(num_inference_steps=c.steps, guidance_scale=5.0, generator=_generator(c),  # noqa: C408 - keyword arguments of a call
                              control_image=_control(c), controlnet=list(c.nets) if len(c.nets) > 1 else c.nets[0],
                              controlnet_conditioning_scale=c.scale, control_guidance_start=c.start,
                              control_guidance_end=c.end, guess_mode=c.guess, refiner=c.refiner, output_type="np")
    if c.strength is not None:
        kw.update(image=test_image(*c.size, seed=c.seed), strength=c.strength)
    return pipe(c.prompt, **{**kw, **over})


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def cn_artifacts(tmp_path_factory, tiny_artifacts, tiny_model):
    return controlnet_artifacts(tmp_path_factory, tiny_artifacts, tiny_model)


@pytest.fixture(scope="module")
def pipe(cn_artifacts):
    with SDXLPipeline.from_artifacts(cn_artifacts, backend="onnxruntime", device="cpu") as p:
        yield p


@pytest.fixture(scope="module")
def reference(tiny_model):
    return Reference(tiny_model)


@pytest.mark.parametrize("name", list(CASES))
def test_controlnet_matches_diffusers(name, pipe, reference):
    c = CASES[name]
    ref_latents, ref_images = reference(c)
    ours = _ours(pipe, c)
    assert ref_images.std() > 1e-3
    assert ours.images.shape == ref_images.shape
    lat_err = float((ours.latents - ref_latents).abs().max())
    pix_err = float(np.abs(ours.images - ref_images).max())
    print(f"\ncontrolnet parity {name}: max |latent diff| {lat_err:.2e}, max |pixel diff| {pix_err * 255:.3f}/255")
    assert lat_err <= LATENT_TOL and pix_err <= PIXEL_TOL
    assert [u["name"] for u in ours.info["controlnet"]["controlnets"]] == list(c.nets)
    assert "controlnet" in ours.timings.to_dict().get("stages", ours.timings.to_dict())


def test_a_runtime_lora_reaches_the_controlnet_unet(pipe, reference, tiny_model, tmp_path):
    """A LoRA set at run time is on the ControlNet UNet too (the base UNet's weights again, its own
    graph): == diffusers' ControlNet pipeline with the LoRA fused, and != the call without it."""
    from lora_files import diffusers_lora

    lora = diffusers_lora(tiny_model, tmp_path / "style.safetensors", seed=7)
    c = CASES["one"]
    ref_latents, ref_images = reference(c, (str(lora), 0.8))
    ours = _ours(pipe, c, loras={str(lora): 0.8})
    lat_err = float((ours.latents - ref_latents).abs().max())
    pix_err = float(np.abs(ours.images - ref_images).max())
    print(f"\ncontrolnet + run-time LoRA: max |latent diff| {lat_err:.2e}, max |pixel diff| {pix_err * 255:.3f}/255")
    assert lat_err <= LATENT_TOL and pix_err <= PIXEL_TOL
    assert float(np.abs(ours.images - _ours(pipe, c).images).max()) > 0.02  # the LoRA changed the image
    assert pipe.loras.last_switch is not None and "unet_controlnet" in pipe.loras.last_switch["components"]


def test_the_controlnet_changes_the_image(pipe):
    """The seeded ControlNets are not zero: with one, the image differs from the plain call's."""
    c = CASES["one"]
    with_cn = _ours(pipe, c).images
    plain = pipe(c.prompt, num_inference_steps=c.steps, guidance_scale=5.0, generator=_generator(c),
                 height=256, width=256, refiner=False, output_type="np").images
    assert float(np.abs(with_cn - plain).max()) > 0.05
    # scale 0 everywhere is the plain image (the plain UNet graph runs: x + 0 residuals is x)
    zero = _ours(pipe, c, controlnet_conditioning_scale=0.0).images
    assert float(np.abs(zero - plain).max()) <= PIXEL_TOL


def test_size_defaults_to_the_control_image_and_refiner_has_no_controlnet(pipe):
    c = CASES["one-landscape-window"]
    out = _ours(pipe, c, num_inference_steps=2, output_type="latent")
    assert (out.info["height"], out.info["width"]) == (192, 320)
    with pytest.raises(InvalidControlError, match="refiner takes no ControlNet"):
        pipe.check_call("x", control_image=_control(c), controlnet="cn-b", image=test_image(64, 64),
                        refiner_only=True)


def test_export_holds_validated_controlnets_and_is_incremental(cn_artifacts, tiny_artifacts):
    from controlnet_util import _CACHE

    m = json.loads((cn_artifacts / "manifest.json").read_text())
    assert set(m["controlnets"]) == {"cn-a", "cn-b"}
    assert sorted(_CACHE["export_result"]["exported"]) == ["controlnet_cn-a", "controlnet_cn-b", "unet_controlnet"]
    for name in ("unet_controlnet", "controlnet_cn-a", "controlnet_cn-b"):
        val = m["components"][name]["validation"]
        assert val["passed"] is True and max(val["max_abs_error"].values()) < 1e-4
    spec = m["components"]["controlnet_cn-a"]["spec"]
    ins = {t["name"]: t["shape"] for t in spec["inputs"]}
    assert ins["controlnet_cond"] == ["batch", 3, "height", "width"] and ins["conditioning_scale"] == [10]
    assert len(spec["outputs"]) == 10  # 9 down residuals + mid
    # the plain UNet graph is the one of the export without ControlNet (same key, same file)
    plain = json.loads((tiny_artifacts / "manifest.json").read_text())
    assert m["components"]["unet"]["key"] == plain["components"]["unet"]["key"]
    assert m["components"]["unet"]["files"] == plain["components"]["unet"]["files"]


# ---- bad input ----------------------------------------------------------------------------------
def test_bad_runtime_arguments_are_named_errors(pipe):
    img = control_map(64, 64)
    with pytest.raises(UnknownControlNetError, match="unknown ControlNet 'nope'.*cn-a, cn-b"):
        pipe.check_call("x", control_image=img, controlnet="nope")
    with pytest.raises(UnknownControlNetError, match="several ControlNets"):
        pipe.check_call("x", control_image=img)
    with pytest.raises(InvalidControlError, match="finite"):
        pipe.check_call("x", control_image=img, controlnet="cn-a", controlnet_conditioning_scale=float("nan"))
    with pytest.raises(InvalidControlError, match="start=0.5 end=0.5"):
        pipe.check_call("x", control_image=img, controlnet="cn-a", control_guidance_start=0.5,
                        control_guidance_end=0.5)
    with pytest.raises(InvalidImageError, match=r"control image: .*\(N, 3, H, W\).*\(1, 4, 64, 64\)"):
        pipe.check_call("x", control_image=torch.rand(1, 4, 64, 64), controlnet="cn-a")
    with pytest.raises(InvalidControlError, match="2 ControlNets need 2 control images"):
        pipe.check_call("x", control_image=img, controlnet=["cn-a", "cn-b"])
    with pytest.raises(InvalidControlError, match="one controlnet_conditioning_scale per ControlNet|2 ControlNet"):
        pipe.check_call("x", control_image=[img, img], controlnet=["cn-a", "cn-b"],
                        controlnet_conditioning_scale=[1.0, 1.0, 1.0])
    with pytest.raises(InvalidImageError, match="control image"):
        pipe.check_call("x", control_image=np.full((64, 64, 3), np.nan, np.float32), controlnet="cn-a")
    # the pipeline still runs afterwards
    out = pipe("x", control_image=img, controlnet="cn-a", num_inference_steps=1, refiner=False, output_type="latent")
    assert out.latents.shape == (1, 4, 8, 8)


def test_bad_controlnet_sources_are_named_errors_and_change_nothing(tmp_path, cn_artifacts, tiny_model,
                                                                    tmp_path_factory):
    from diffusers import ControlNetModel
    from safetensors.torch import save_file
    from sdxl_export.errors import UnsafeCheckpointError
    from sdxl_export.export import export_model

    before = (cn_artifacts / "manifest.json").read_bytes()
    a, b = controlnet_sources(tmp_path_factory)
    # a truncated single file
    trunc = tmp_path / "trunc.safetensors"
    trunc.write_bytes(b.read_bytes()[: b.stat().st_size // 2])
    # an SD 1.5-style ControlNet (768-wide context, no added conditioning)
    sd15 = tmp_path / "sd15-cn"
    ControlNetModel(block_out_channels=(32, 64, 128), down_block_types=("DownBlock2D", "CrossAttnDownBlock2D",
                    "CrossAttnDownBlock2D"), cross_attention_dim=768, norm_num_groups=32,
                    attention_head_dim=(2, 4, 8)).save_pretrained(str(sd15))
    # a pickle checkpoint, and a state dict that is no ControlNet
    pickle = tmp_path / "cn.ckpt"
    pickle.write_bytes(b"x")
    other = tmp_path / "other.safetensors"
    save_file({"foo.weight": torch.zeros(2)}, str(other))
    cases = [(trunc, ModelSourceError, "not a readable safetensors"),
             (sd15, ModelSourceError, "SD 1.x/2.x ControlNet"),
             (pickle, UnsafeCheckpointError, "pickle"),
             (other, ModelSourceError, "no ControlNet weights"),
             (tmp_path / "missing", ModelSourceError, "does not exist")]
    for src, err, msg in cases:
        with pytest.raises(err, match=msg) as e:
            export_model(tiny_model, cn_artifacts, controlnets=[str(a), str(src)])
        assert e.value.hint
        assert (cn_artifacts / "manifest.json").read_bytes() == before
    with pytest.raises(ModelSourceError, match="two ControlNets are named"):
        export_model(tiny_model, cn_artifacts, controlnets=[str(a), str(a)])
    assert (cn_artifacts / "manifest.json").read_bytes() == before


# ---- CLI --------------------------------------------------------------------------------------------
def test_cli_run_with_canny_equals_the_python_api(pipe, cn_artifacts, tmp_path):
    from fixtures import run_cli
    from PIL import Image
    from sdxl_export.runtime.control_preprocess import control_map as preprocess

    src = tmp_path / "photo.png"
    test_image(192, 320, seed=9).save(src)
    out = tmp_path / "out.png"
    rc, _stdout, stderr = run_cli("run", "a street", "--artifacts", str(cn_artifacts), "--control-image", str(src),
                                 "--controlnet", "cn-b", "--controlnet-scale", "0.8", "--control-start", "0.1",
                                 "--control-end", "0.9", "--control-module", "canny", "--steps", "3",
                                 "--seed", "4", "--no-refiner", "--out", str(out), "--backend", "onnxruntime")
    assert rc == 0, stderr
    got = np.asarray(Image.open(out).convert("RGB"), dtype=np.int16)
    cmap = preprocess(Image.open(src), "canny", 192, 320, processor_res=192)
    assert np.asarray(cmap).any()
    ref = pipe("a street", control_image=cmap, controlnet="cn-b", controlnet_conditioning_scale=0.8,
               control_guidance_start=0.1, control_guidance_end=0.9, num_inference_steps=3, seed=4,
               refiner=False).images[0]
    assert got.shape == (192, 320, 3)
    assert int(np.abs(got - np.asarray(ref, dtype=np.int16)).max()) <= 1
    rc, _, stderr = run_cli("run", "x", "--artifacts", str(cn_artifacts), "--control-image", str(src),
                            "--controlnet", "cn-b", "--control-module", "openpose", "--no-refiner",
                            "--out", str(tmp_path / "no.png"))
    assert rc != 0 and "needs model weights" in stderr and "canny" in stderr
    assert not (tmp_path / "no.png").exists()


def test_bench_reports_the_controlnet_step_ours_and_diffusers(cn_artifacts, tmp_path):
    from fixtures import run_cli

    out = tmp_path / "cn.json"
    rc, stdout, stderr = run_cli("bench", "--artifacts", str(cn_artifacts), "--controlnet", "cn-a", "--runs", "1",
                                 "--buckets", "64x64", "--json", str(out))
    assert rc == 0, stderr
    r = json.loads(out.read_text())
    assert set(r["median_ms"]) == {"ours plain", "ours controlnet", "diffusers plain", "diffusers controlnet"}
    assert all(v > 0 for v in r["median_ms"].values())
    assert r["added_by_controlnet"]["controlnet_cn-a"]["size_bytes"] > 0
    assert "ours vs diffusers" in stdout
