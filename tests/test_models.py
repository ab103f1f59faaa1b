"""Model sources: presets, diffusers folders, fingerprints, and every way a source is refused."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch
from fixtures import tiny_diffusers_folders as saved_folders
from sdxl_export import errors
from sdxl_export.models import build_preset, load_model
from sdxl_export.models.loader import ModelSource, dims_from_configs, resolve_source
from sdxl_export.models.presets import get_preset

MODULES = ("text_encoder", "text_encoder_2", "unet", "refiner_unet", "vae")


def assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


@pytest.fixture()
def tiny_diffusers_folders(tmp_path_factory, tiny_model) -> tuple[Path, Path]:
    """(base, refiner) diffusers folders of the tiny model, saved once per session. Read-only."""
    return saved_folders(tmp_path_factory, tiny_model)


# ---- presets ---------------------------------------------------------------------------------
def test_preset_fingerprint_needs_no_weights_and_matches_the_built_model(tiny_model):
    src = resolve_source("tiny")
    assert src.identity == tiny_model.source
    assert src.dims() == tiny_model.dims()
    assert set(src.fingerprints) == {"tokenizer", "tokenizer_2", "text_encoder", "text_encoder_2", "unet", "vae",
                                     "scheduler", "refiner_unet", "refiner_scheduler"}
    # Resolving a preset imports no torch: the up-to-date check of a rerun stays cheap.
    code = ("import sys; from sdxl_export.models.loader import resolve_source; "
            "resolve_source('tiny'); print('torch' in sys.modules, 'diffusers' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    assert out.stdout.split() == ["False", "False"]


def test_fingerprints_tell_presets_and_parts_apart():
    tiny, small, base_only = resolve_source("tiny"), resolve_source("small"), resolve_source("tiny", with_refiner=False)
    assert tiny.identity["fingerprint"] != small.identity["fingerprint"]
    assert all(tiny.fingerprints[p] != small.fingerprints[p] for p in ("unet", "vae", "text_encoder"))
    assert len(set(tiny.fingerprints.values())) == len(tiny.fingerprints)
    assert not base_only.has_refiner and base_only.identity["refiner"] is None
    assert {p: tiny.fingerprints[p] for p in base_only.fingerprints} == base_only.fingerprints


def test_preset_parts_are_the_whole_build(tiny_model):
    """Building one part at a time gives exactly the weights of the whole-model build."""
    src = resolve_source("tiny")
    for name in ("unet", "vae"):
        assert_same_weights(src.load_part(name), getattr(tiny_model, name))
    assert tiny_model.dims().sample_size == get_preset("tiny").unet["sample_size"]


def test_presets_are_diffusers_pipelines(tiny_model):
    from diffusers import StableDiffusionXLImg2ImgPipeline, StableDiffusionXLPipeline

    base, refiner = tiny_model.base_pipeline(), tiny_model.refiner_pipeline()
    assert isinstance(base, StableDiffusionXLPipeline) and isinstance(refiner, StableDiffusionXLImg2ImgPipeline)
    assert base.unet is tiny_model.unet and refiner.unet is tiny_model.refiner_unet
    assert refiner.text_encoder_2 is base.text_encoder_2 and refiner.vae is base.vae  # shared, as SDXL does
    assert refiner.config.requires_aesthetics_score
    with pytest.raises(errors.MissingComponentError):
        build_preset("tiny", with_refiner=False).refiner_pipeline()


# ---- diffusers folders -------------------------------------------------------------------------
def test_saved_folders_load_back_with_identical_weights(tiny_model, tiny_diffusers_folders):
    base, refiner = tiny_diffusers_folders
    loaded = load_model(str(base), refiner=str(refiner))
    for name in MODULES:
        assert_same_weights(getattr(loaded, name), getattr(tiny_model, name))
    prompt = "a photo of an astronaut riding a horse"
    for tok in ("tokenizer", "tokenizer_2"):
        assert getattr(loaded, tok)(prompt, padding="max_length").input_ids == \
            getattr(tiny_model, tok)(prompt, padding="max_length").input_ids
    for key, value in tiny_model.scheduler_config.items():
        if not key.startswith("_"):
            assert loaded.scheduler_config[key] == value, key
    assert loaded.dims() == tiny_model.dims()
    assert loaded.source["kind"] == "folder" and loaded.source["id"] == str(base.resolve())
    assert loaded.source["refiner"] == str(refiner.resolve())


def test_folder_without_refiner_is_base_only_and_fingerprint_follows_files(tiny_diffusers_folders, tmp_path):
    base = shutil.copytree(tiny_diffusers_folders[0], tmp_path / "base")
    src = resolve_source(str(base))
    assert not src.has_refiner and src.dims().refiner_context is None
    assert resolve_source(str(base)).fingerprints == src.fingerprints  # stable
    weights = next((base / "unet").glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes())  # rewritten: new mtime
    again = resolve_source(str(base))
    changed = {p for p in src.fingerprints if src.fingerprints[p] != again.fingerprints[p]}
    assert changed == {"unet"}


def test_model_source_from_loaded_model_keeps_its_identity(tiny_model):
    src = ModelSource.from_model(tiny_model)
    assert src.identity == tiny_model.source
    assert src.load_part("unet") is tiny_model.unet
    assert src.load_part("refiner_scheduler") == tiny_model.refiner_scheduler_config


# ---- refusals ------------------------------------------------------------------------------------
class Evil:
    """Unpickling this creates a folder: proof that a loader unpickled a checkpoint."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.makedirs, (str(self.marker),))


def broken_copy(folders, tmp_path: Path, how: str) -> Path:
    base = shutil.copytree(folders[0], tmp_path / "base")
    if how == "missing_vae":
        shutil.rmtree(base / "vae")
    elif how == "pickle_only":
        for p in (base / "unet").glob("*.safetensors"):
            p.unlink()
        (base / "unet" / "diffusion_pytorch_model.bin").write_bytes(pickle.dumps(Evil(tmp_path / "UNPICKLED")))
    elif how == "no_weights":
        for p in (base / "text_encoder").glob("*.safetensors"):
            p.unlink()
    elif how == "no_model_index":
        (base / "model_index.json").unlink()
    elif how == "bad_config":
        (base / "unet" / "config.json").write_text("{not json")
    return base


@pytest.mark.parametrize(("how", "error", "words"), [
    ("missing_vae", errors.MissingComponentError, "missing vae"),
    ("pickle_only", errors.UnsafeCheckpointError, "only pickle weights"),
    ("no_weights", errors.MissingComponentError, "no weights"),
    ("no_model_index", errors.ModelSourceError, "model_index.json"),
    ("bad_config", errors.ModelSourceError, "config"),
])
def test_broken_folders_are_refused_before_loading(tiny_diffusers_folders, tmp_path, how, error, words):
    base = broken_copy(tiny_diffusers_folders, tmp_path, how)
    with pytest.raises(error, match=words) as info:
        resolve_source(str(base))
    assert info.value.hint
    assert not (tmp_path / "UNPICKLED").exists()


def test_pickle_is_never_loaded_even_beside_safetensors(tiny_diffusers_folders, tmp_path):
    base = shutil.copytree(tiny_diffusers_folders[0], tmp_path / "base")
    (base / "unet" / "diffusion_pytorch_model.bin").write_bytes(pickle.dumps(Evil(tmp_path / "UNPICKLED")))
    unet = resolve_source(str(base)).load_part("unet")
    assert isinstance(unet, torch.nn.Module)
    assert not (tmp_path / "UNPICKLED").exists()


def test_corrupt_weights_are_a_named_error(tiny_diffusers_folders, tmp_path):
    base = shutil.copytree(tiny_diffusers_folders[0], tmp_path / "base")
    weights = next((base / "vae").glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:100])
    src = resolve_source(str(base))  # configs are fine: the weights fail when loaded
    with pytest.raises(errors.ModelSourceError, match="cannot load vae"):
        src.load_part("vae")


@pytest.mark.parametrize(("model", "refiner", "words"), [
    ("nosuch", "same", "neither a preset"),
    ("./does/not/exist", "same", "neither a preset"),
    ("tiny", "small", "not an SDXL refiner"),
])
def test_bad_sources_are_named_errors(model, refiner, words):
    with pytest.raises(errors.ModelSourceError, match=words):
        resolve_source(model, refiner=refiner)


def test_base_folder_passed_as_refiner_is_refused(tiny_diffusers_folders):
    base, _ = tiny_diffusers_folders
    with pytest.raises(errors.ModelSourceError, match="is it a base model"):
        resolve_source(str(base), refiner=str(base))


def test_unreadable_file_as_model_is_refused(tmp_path):
    f = tmp_path / "model.safetensors"
    f.write_bytes(b"x")
    with pytest.raises(errors.ModelSourceError, match="not a readable safetensors file"):
        resolve_source(str(f))
    with pytest.raises(errors.ModelSourceError, match="unknown preset"):
        build_preset("huge")


def test_non_sdxl_configs_are_refused():
    cfg = get_preset("tiny")
    te1, te2 = {**cfg.text_encoder, "vocab_size": 100}, {**cfg.text_encoder_2, "vocab_size": 100}
    sd15_unet = {**cfg.unet, "addition_embed_type": None}
    with pytest.raises(errors.ModelSourceError, match="addition_embed_type"):
        dims_from_configs(te1, te2, sd15_unet, cfg.vae)
    wrong_context = {**cfg.unet, "cross_attention_dim": 64}
    with pytest.raises(errors.ModelSourceError, match="context dim"):
        dims_from_configs(te1, te2, wrong_context, cfg.vae)
    dims = dims_from_configs(te1, te2, cfg.unet, cfg.vae, cfg.refiner_unet)
    assert (dims.unet_time_ids, dims.refiner_time_ids, dims.vae_scale) == (6, 5, 8)
    assert json.loads(json.dumps(dims.to_dict())) == dims.to_dict()


def test_a_model_without_recorded_source_is_fingerprinted_by_content(tiny_model):
    import dataclasses

    anonymous = dataclasses.replace(tiny_model, source={})
    fps = ModelSource.from_model(anonymous).fingerprints
    with tempfile.TemporaryDirectory() as tmp:  # saving touches the config (architectures, dtype)
        tiny_model.text_encoder.save_pretrained(tmp)
    assert fps == ModelSource.from_model(dataclasses.replace(tiny_model, source={})).fingerprints
    other = build_preset("tiny", with_refiner=False)
    with torch.no_grad():
        other.unet.conv_out.bias += 1.0
    changed = ModelSource.from_model(dataclasses.replace(other, source={})).fingerprints
    assert {p for p in changed if changed[p] != fps[p]} == {"unet"}
