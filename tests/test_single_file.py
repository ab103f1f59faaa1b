"""Single-file SDXL checkpoints, CLIP's real tokenizers offline, and a separate VAE (--vae).

Single files are written here from the tiny preset's weights by the inverse of diffusers'
key mapping (``single_file_util``); loading them back must give the very same modules,
exports whose graphs compute what the preset's compute, and images equal to diffusers'
own ``from_single_file`` pipeline on the same file (<= 1/255 per pixel).
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from diffusers import AutoencoderKL, StableDiffusionXLImg2ImgPipeline, StableDiffusionXLPipeline
from fixtures import run_cli, tiny_diffusers_folders
from sdxl_export.export import load_export_manifest
from sdxl_export.models import clip_vocab
from sdxl_export.models.loader import SDXLModel, load_model, resolve_source
from sdxl_export.runtime import SDXLPipeline
from single_file_util import write_single_file
from test_parity_diffusers import Case, Reference, _compare, _ours

CORPUS = [
    "a photo of a cat", "", "Hello, World!! It's 3:45pm -- isn't it? (yes) [no] {maybe}",
    "café naïve résumé Ünïcödé Straße", "日本語のテキスト 🐱🚀 emoji ✨", "don't won't they're I'm we've you'll he'd",
    "$100.50 #hashtag @user 1,000,000 50% a+b=c", "  multiple   spaces\tand\nnewlines ", "UPPER lower MiXeD",
    " ".join(["a very detailed intricate baroque painting of a cathedral"] * 12),
]
#: Text CLIP's ftfy/HTML clean-up changes (entities, mojibake, full-width forms, ligatures).
NEEDS_CLEANUP = ["Tom &amp; Jerry", "mojibake: Ã©", "ＦＵＬＬＷＩＤＴＨ", "ﬁne ligature"]


def _open_clip_tokenizer():
    """open_clip's tokenizer module, loaded by path: importing the package would import torchvision."""
    spec = importlib.util.find_spec("open_clip")
    assert spec is not None and spec.submodule_search_locations, "open-clip-torch is a dev dependency (--no-deps)"
    path = Path(next(iter(spec.submodule_search_locations))) / "tokenizer.py"
    mod_spec = importlib.util.spec_from_file_location("open_clip_tokenizer_oracle", path)
    mod = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(mod)
    return mod


# ---- tokenizers ------------------------------------------------------------------------------------
def test_clip_tokenizers_give_open_clip_ids():
    oc = _open_clip_tokenizer()
    tok1, tok2 = clip_vocab.clip_tokenizers()
    assert len(tok1) == len(tok2) == 49408 and tok2.pad_token_id == 0 and tok2.pad_token == "!"
    ref = oc.tokenize(CORPUS).tolist()  # pads with 0 ("!"), truncates to 77 ending in EOS
    for text, want in zip(CORPUS, ref):
        n = want.index(49407) + 1
        ids1 = tok1(text, padding="max_length", max_length=77, truncation=True).input_ids
        assert ids1[:n] == want[:n] and set(ids1[n:]) <= {49407}, text  # tokenizer 1 pads with EOS
        if "!" not in text:
            # Tokenizer 2 pads with "!" (id 0), as open_clip does. It also treats "!" in a prompt as
            # its pad token (transformers splits special tokens out), as SDXL's tokenizer_2 in diffusers does.
            assert tok2(text, padding="max_length", max_length=77, truncation=True).input_ids == want, text
    # Text the clean-up changes: the same ids once cleaned the way CLIP cleans (transformers does not).
    clean = oc.get_clean_fn("lower")
    for text, want in zip(NEEDS_CLEANUP, oc.tokenize(NEEDS_CLEANUP).tolist()):
        assert tok2(clean(text), padding="max_length", max_length=77).input_ids == want, text
        assert tok1(text).input_ids != want[:len(tok1(text).input_ids)], text  # not cleaned: it differs


def test_sdxl_preset_uses_clip_tokenizers():
    src = resolve_source("sdxl", with_refiner=False)
    tok = src.load_part("tokenizer_2")
    assert len(tok) == 49408 and tok("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert src.dims().vocab_size == 49408


# ---- single files: weights, CLIP vocabulary ---------------------------------------------------------
def _state_equal(a: torch.nn.Module, b: torch.nn.Module, atol: float = 0.0) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert set(sa) == set(sb)
    for k in sa:
        torch.testing.assert_close(sb[k].float(), sa[k].float(), atol=atol, rtol=0, msg=k)


def test_single_files_load_the_same_weights(tiny_model, tmp_path):
    base = write_single_file(tiny_model, tmp_path / "base.safetensors")
    ref = write_single_file(tiny_model, tmp_path / "refiner.safetensors", "refiner", dtype=torch.float16)
    src = resolve_source(str(base), refiner=str(ref))
    assert src.identity["kind"] == "file" and src.identity["refiner"] == str(ref.resolve())
    assert src.dims() == resolve_source("tiny").dims()
    m = src.load()
    for part in ("text_encoder", "text_encoder_2", "unet", "vae"):
        _state_equal(getattr(tiny_model, part), getattr(m, part))
    _state_equal(tiny_model.refiner_unet, m.refiner_unet, atol=1e-3)  # written as fp16, loaded as fp32
    assert m.refiner_unet.dtype == torch.float32
    assert m.tokenizer.get_vocab() == tiny_model.tokenizer.get_vocab()  # the preset's vocabulary size -> its tokenizer
    # Incremental: the fingerprint changes with the file (a rewrite), not with a second look.
    before = resolve_source(str(base)).identity
    assert resolve_source(str(base)).identity == before
    st = base.stat()
    os.utime(base, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert resolve_source(str(base)).identity["fingerprint"] != before["fingerprint"]


def test_single_file_with_clip_vocabulary_gets_clip_tokenizers(tiny_model, tmp_path):
    """A checkpoint whose text encoders have CLIP's 49408 tokens is read with CLIP's tokenizers,
    and diffusers' pipeline over the loaded modules draws what it draws over the originals."""
    from sdxl_export.models.presets import get_preset
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    cfg = get_preset("tiny")
    torch.manual_seed(7)
    te1 = CLIPTextModel(CLIPTextConfig(vocab_size=49408, **cfg.text_encoder)).eval()
    te2 = CLIPTextModelWithProjection(CLIPTextConfig(vocab_size=49408, **cfg.text_encoder_2)).eval()
    tok1, tok2 = clip_vocab.clip_tokenizers()
    orig = SDXLModel(tok1, tok2, te1, te2, tiny_model.unet, tiny_model.vae, tiny_model.scheduler_config)
    path = write_single_file(orig, tmp_path / "clip-vocab.safetensors")
    loaded = load_model(str(path))
    assert loaded.tokenizer.get_vocab() == tok1.get_vocab() and loaded.tokenizer_2.pad_token == "!"
    images = []
    for m in (orig, loaded):
        pipe = m.base_pipeline()
        pipe.set_progress_bar_config(disable=True)
        images.append(pipe("café, a photo of a cat!", height=64, width=64, num_inference_steps=2, output_type="np",
                           generator=torch.Generator().manual_seed(0)).images)
    assert images[0].std() > 1e-3
    np.testing.assert_allclose(images[1], images[0], atol=1 / 255, rtol=0)


# ---- export + runtime from single files, with a separate VAE ---------------------------------------
@pytest.fixture(scope="module")
def other_vae(tmp_path_factory, tiny_model):
    """A different VAE for the tiny model: other weights, SDXL-unlike scaling and latents mean/std."""
    root = tmp_path_factory.mktemp("other-vae")
    torch.manual_seed(99)
    vae = AutoencoderKL(**{**dict(tiny_model.vae.config), "scaling_factor": 0.3,
                           "latents_mean": [0.1, -0.2, 0.05, 0.0], "latents_std": [1.5, 0.8, 1.2, 1.0]}).eval()
    vae.save_pretrained(root / "vae-folder", safe_serialization=True)
    return vae, root / "vae-folder"


def test_export_from_single_files_with_vae_matches_diffusers(tiny_model, tiny_artifacts, tmp_path_factory,
                                                             other_vae, tmp_path):
    vae, vae_dir = other_vae
    base = write_single_file(tiny_model, tmp_path / "sd_xl_base.safetensors")
    ref = write_single_file(tiny_model, tmp_path / "sd_xl_refiner.safetensors", "refiner")
    out = tmp_path / "artifacts"
    rc, _, stderr = run_cli("export", "--model", str(base), "--refiner", str(ref), "--vae", str(vae_dir),
                            "--out", str(out))
    assert rc == 0, stderr
    m = load_export_manifest(out, verify=True)
    assert m["source"]["kind"] == "file" and m["source"]["vae"] == str(vae_dir.resolve())
    assert m["vae"]["scaling_factor"] == 0.3 and m["vae"]["latents_mean"] == [0.1, -0.2, 0.05, 0.0]
    assert all(c["validation"]["passed"] for c in m["components"].values())
    # The same weights as the preset (and its folders): the UNet graphs compute the same.
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    from sdxl_export.specs import ComponentSpec

    feeds = ComponentSpec.from_dict(m["components"]["unet"]["spec"]).example_inputs(1, 256, 256, seed=5)
    outs = [ort.InferenceSession(str(r / "onnx/unet/model.onnx"), opts, providers=["CPUExecutionProvider"])
            .run(None, feeds)[0] for r in (out, tiny_artifacts)]
    np.testing.assert_allclose(outs[0], outs[1], atol=1e-6)
    # A rerun is a no-op; the images are diffusers' own single-file pipelines' with that VAE.
    rc, stdout, stderr = run_cli("export", "--model", str(base), "--refiner", str(ref), "--vae", str(vae_dir),
                                 "--out", str(out))
    assert rc == 0 and "up to date" in (stdout + stderr).lower(), stdout + stderr
    config_dir, _ = tiny_diffusers_folders(tmp_path_factory, tiny_model)
    ref_base = StableDiffusionXLPipeline.from_single_file(
        str(base), config=str(config_dir), local_files_only=True, vae=vae, add_watermarker=False)
    ref_refiner = StableDiffusionXLImg2ImgPipeline(
        vae=vae, text_encoder=None, text_encoder_2=ref_base.text_encoder_2, tokenizer=None,
        tokenizer_2=ref_base.tokenizer_2, unet=load_model(str(base), refiner=str(ref)).refiner_unet,
        scheduler=ref_base.scheduler, requires_aesthetics_score=True, force_zeros_for_empty_prompt=False,
        add_watermarker=False)
    c = Case("a photo of a cat", None, 256, 256, 5.0, True, "euler", 11, steps=6)
    with SDXLPipeline.from_artifacts(out, backend="onnxruntime", device="cpu") as pipe:
        ours = _ours(pipe, c)
    ref_latents, ref_images = Reference(ref_base, ref_refiner)(c)
    _compare(ours, ref_latents, ref_images, c)


def test_vae_as_single_file_and_folder(tiny_model, other_vae, tmp_path):
    vae, vae_dir = other_vae
    vae_file = write_single_file(SDXLModel(None, None, None, None, None, vae, {}), tmp_path / "vae.safetensors",
                                 "vae", dtype=torch.float16)
    plain = resolve_source("tiny")
    by_dir, by_file = resolve_source("tiny", vae=str(vae_dir)), resolve_source("tiny", vae=str(vae_file))
    assert "vae" not in plain.identity and by_file.identity["vae"] == str(vae_file.resolve())
    assert len({s.identity["parts"]["vae"] for s in (plain, by_dir, by_file)}) == 3
    assert {k: v for k, v in by_dir.identity["parts"].items() if k != "vae"} == \
        {k: v for k, v in plain.identity["parts"].items() if k != "vae"}
    assert by_dir.part_config("vae")["scaling_factor"] == 0.3
    _state_equal(vae, by_dir.load_part("vae"))
    _state_equal(vae, by_file.load_part("vae"), atol=1e-3)


# ---- bad inputs: one line, exit 2, nothing written ----------------------------------------------------
def _bad_file(case: str, tiny_model: SDXLModel, tmp: Path) -> tuple[list[str], tuple[str, ...]]:
    from safetensors.torch import save_file

    base = write_single_file(tiny_model, tmp / "base.safetensors")
    if case == "truncated":
        cut = tmp / "cut.safetensors"
        cut.write_bytes(base.read_bytes()[: base.stat().st_size // 2])
        return ["--model", str(cut)], ("truncated", "download the checkpoint again")
    if case == "sd15":
        f = tmp / "v1-5.safetensors"
        save_file({"cond_stage_model.transformer.text_model.embeddings.token_embedding.weight": torch.zeros(8, 4),
                   "model.diffusion_model.input_blocks.0.0.weight": torch.zeros(4, 4, 3, 3),
                   "first_stage_model.encoder.conv_in.weight": torch.zeros(4, 3, 3, 3)}, str(f))
        return ["--model", str(f)], ("Stable Diffusion 1.x/2.x", "not SDXL")
    if case == "refiner_as_model":
        ref = write_single_file(tiny_model, tmp / "refiner.safetensors", "refiner")
        return ["--model", str(ref)], ("SDXL refiner checkpoint, given as the base", "--refiner FILE")
    if case == "base_as_refiner":
        return ["--model", str(base), "--refiner", str(base)], ("SDXL base checkpoint, given as the refiner",)
    if case == "pickle":
        f = tmp / "model.ckpt"
        f.write_bytes(b"not unpickled")
        return ["--model", str(f)], ("not a .safetensors file", "never unpickles")
    if case == "not_sdxl":
        f = tmp / "other.safetensors"
        save_file({"weight": torch.zeros(2)}, str(f))
        return ["--model", str(f)], ("not an SDXL checkpoint",)
    if case == "vae_latent_channels":
        v = AutoencoderKL(**{**dict(tiny_model.vae.config), "latent_channels": 8})
        v.save_pretrained(tmp / "vae8", safe_serialization=True)
        return ["--vae", str(tmp / "vae8")], ("the VAE has 8",)
    raise ValueError(case)


@pytest.mark.parametrize("case", ["truncated", "sd15", "refiner_as_model", "base_as_refiner", "pickle", "not_sdxl",
                                  "vae_latent_channels"])
def test_bad_single_files_are_one_line(tiny_model, tmp_path, case):
    argv, words = _bad_file(case, tiny_model, tmp_path)
    out = tmp_path / "out"
    rc, _, stderr = run_cli("export", *argv, "--out", str(out))
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    assert rc == 2 and len(lines) == 1 and lines[0].startswith("sdxl-export: error: ") and "Fix: " in lines[0], stderr
    for w in words:
        assert w in lines[0], lines[0]
    assert not out.exists()
