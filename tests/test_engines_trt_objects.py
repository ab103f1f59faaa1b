"""The Polygraphy objects the TensorRT builder constructs, and TensorRT availability, on CPU.

Polygraphy's loaders are lazy: they construct without TensorRT, so what we hand to
TensorRT (profiles, precision flags, timing cache, optimization level, compatibility
options) is checked here as plain Python. Real builds are marked ``trt``/``gpu``.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
from sdxl_export import tensorrt_env
from sdxl_export.engines import trt_builder
from sdxl_export.engines.planner import plan_profiles
from sdxl_export.engines.sources import specs_for_plan
from sdxl_export.engines.trt_builder import (
    TrtSettings,
    create_config,
    enum_names,
    network_loader,
    polygraphy_profiles,
)
from sdxl_export.errors import BackendUnavailableError, InvalidRequestError

REAL_TRT = tensorrt_env.trt_version() is not None


@pytest.fixture(scope="module")
def unet_plan():
    specs, native, _ = specs_for_plan("sdxl", "same", True, None)
    return plan_profiles(specs, native=native, batch_sizes=(1, 2), mode="bucketed").components["unet"]


def test_polygraphy_profiles_mirror_the_plan(unet_plan):
    from polygraphy.backend.trt import Profile

    profs = polygraphy_profiles(unet_plan.profiles)
    assert len(profs) == len(unet_plan.profiles)
    for prof, planned in zip(profs, unet_plan.profiles):
        assert isinstance(prof, Profile)
        assert list(prof.keys()) == list(unet_plan.spec.input_names)
        for name, (lo, opt, hi) in planned.shapes.items():
            assert tuple(prof[name].min) == lo
            assert tuple(prof[name].opt) == opt
            assert tuple(prof[name].max) == hi


@pytest.mark.parametrize("precision,fp16,bf16", [("fp32", False, False), ("fp16", True, False),
                                                  ("bf16", False, True)])
def test_create_config_sets_precision_profiles_and_options(unet_plan, tmp_path, precision, fp16, bf16):
    from polygraphy.backend.trt import CreateConfig

    settings = TrtSettings(precision=precision, builder_optimization_level=5,
                           version_compatible=True)
    cache = tmp_path / "timing.cache"
    cfg = create_config(settings, unet_plan.profiles, timing_cache=cache)
    assert isinstance(cfg, CreateConfig)
    assert (cfg.fp16, cfg.bf16, cfg.tf32) == (fp16, bf16, True)
    assert len(cfg.profiles) == len(unet_plan.profiles)
    assert tuple(cfg.profiles[0]["sample"].max) == unet_plan.profiles[0].shapes["sample"][2]
    assert cfg.timing_cache_path == str(cache)
    assert cfg.builder_optimization_level == 5
    assert cfg.refittable is False  # refittable only when asked (--refittable)
    assert create_config(replace(settings, refittable=True), unet_plan.profiles).refittable is True
    # Version-compatible plans keep the lean runtime inside: a later TensorRT runs them with it.
    assert cfg.version_compatible is True and not cfg.exclude_lean_runtime


def test_create_config_defaults_are_tensorrt_defaults(unet_plan):
    cfg = create_config(TrtSettings(), unet_plan.profiles)
    assert cfg.refittable is False and cfg.version_compatible is None
    assert cfg.builder_optimization_level == 3 and cfg.timing_cache_path is None
    cfg32 = create_config(TrtSettings(tf32=False), unet_plan.profiles)
    assert cfg32.tf32 is False  # strict fp32 only when asked; the VAE default keeps TF32


def test_enum_options_need_tensorrt_and_map_by_name(unet_plan):
    s = TrtSettings(hardware_compatibility="ampere_plus", workspace_gb=2)
    assert enum_names(s) == {"hardware_compatibility_level": "AMPERE_PLUS", "parser_flags": ["NATIVE_INSTANCENORM"],
                             "memory_pool_limits": {"WORKSPACE": 2 * 1024**3},
                             "profiling_verbosity": "LAYER_NAMES_ONLY"}
    assert enum_names(TrtSettings(hardware_compatibility="same_compute_capability", native_instancenorm=False)) == {
        "hardware_compatibility_level": "SAME_COMPUTE_CAPABILITY", "profiling_verbosity": "LAYER_NAMES_ONLY"}
    if not REAL_TRT:
        with pytest.raises(BackendUnavailableError):
            create_config(s, unet_plan.profiles)


def test_network_loader_uses_native_instancenorm(tmp_path):
    from polygraphy.backend.trt import NetworkFromOnnxPath

    onnx = tmp_path / "model.onnx"
    loader = network_loader(onnx, TrtSettings())
    assert isinstance(loader, NetworkFromOnnxPath)
    assert loader.path == str(onnx) and loader.plugin_instancenorm is False
    assert network_loader(onnx, TrtSettings(native_instancenorm=False)).plugin_instancenorm is True


@pytest.mark.parametrize("bad", [{"precision": "int8"}, {"hardware_compatibility": "any"},
                                 {"builder_optimization_level": 6}, {"workspace_gb": 0}])
def test_settings_are_validated(bad):
    with pytest.raises(InvalidRequestError):
        TrtSettings(**bad)


@pytest.mark.skipif(REAL_TRT, reason="TensorRT is installed here")
def test_type_stubs_are_not_tensorrt():
    import tensorrt  # the stubs' namespace package imports fine ...

    assert not hasattr(tensorrt, "Builder")
    with pytest.raises(BackendUnavailableError, match="stubs"):  # ... and is recognised as not TensorRT
        tensorrt_env.load_tensorrt()
    ok, why = tensorrt_env.trt_status()
    assert not ok and "stubs" in why
    assert tensorrt_env.trt_version() is None


def test_tensorrt_older_than_10_1_is_refused(monkeypatch):
    import types

    fake = types.ModuleType("tensorrt")
    fake.Builder, fake.__version__ = object, "10.0.1.6"
    monkeypatch.setitem(__import__("sys").modules, "tensorrt", fake)
    with pytest.raises(BackendUnavailableError, match=r"TensorRT 10.0.1.6 is installed.*>= 10.1") as info:
        tensorrt_env.load_tensorrt()
    assert "tensorrt>=10.1" in info.value.hint
    fake.__version__ = "10.1.0"
    assert tensorrt_env.load_tensorrt() is fake


@pytest.mark.trt
@pytest.mark.gpu
def test_real_build_of_tiny_vae_decoder(tmp_path):
    """On a GPU machine with TensorRT: build one small plan with two profiles and check it."""
    from sdxl_export.export import export_model

    out = tmp_path / "art"
    m = export_model("tiny", out, with_refiner=False, validate=False)
    specs, native, _ = specs_for_plan("tiny", None, False, out)
    plan = plan_profiles({"vae_decoder": specs["vae_decoder"]}, native=native, mode="bucketed")
    cp = plan.components["vae_decoder"]
    info = trt_builder.build_engine(out / m["components"]["vae_decoder"]["file"], tmp_path / "e.plan",
                                    TrtSettings(), cp.profiles, spec=cp.spec, timing_cache=tmp_path / "t.cache",
                                    name="vae")
    assert info["num_profiles"] == len(cp.profiles)
    assert [p["profile"] for p in info["accuracy"]["profiles"]] == list(range(len(cp.profiles)))
    assert Path(tmp_path / "e.plan").stat().st_size == info["size_bytes"]
    assert (tmp_path / "t.cache").is_file()
