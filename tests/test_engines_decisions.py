"""Incremental-build decisions for TensorRT engines, and runtime profile selection.

TensorRT cannot run here, so the TensorRT side of ``build``'s incremental logic is
tested through the same functions ``build`` calls (``wanted_engines`` + ``decide``) with
a stated target (TensorRT version, GPU): what must be rebuilt when each input changes.
"""

from __future__ import annotations

import copy
import json
from dataclasses import replace
from pathlib import Path

import pytest
from sdxl_export.buckets import buckets_for
from sdxl_export.engines.build import BuildOptions, decide, make_plan, trt_target, wanted_engines
from sdxl_export.engines.planner import plan_profiles
from sdxl_export.engines.store import EngineEntry, GpuInfo, select_profile
from sdxl_export.errors import InputMismatchError, UnsupportedShapeError
from sdxl_export.specs import specs_from_dicts

H100 = GpuInfo("NVIDIA H100 80GB HBM3", "9.0")
VAES = {"vae_decoder", "vae_encoder"}
TEXT = {"text_encoder", "text_encoder_2"}


@pytest.fixture(scope="module")
def export(tiny_artifacts):
    root = tiny_artifacts
    return root, json.loads((root / "manifest.json").read_text())


def _wanted(export, target=None, **opts):
    root, manifest = export
    o = BuildOptions(out=root, precision="fp16", **opts)
    return wanted_engines(o, manifest, make_plan(o, manifest), "tensorrt", target or trt_target("10.3.0", H100))


def _as_built(export, wanted) -> dict:
    """What the manifest holds after building ``wanted`` (same record ``build`` writes)."""
    root, _ = export
    out = {}
    for name, w in wanted.items():
        e = EngineEntry(component=name, backend=w.backend, path=root / "engines" / name / "engine.plan",
                        files={f"engines/{name}/engine.plan": "0" * 64}, precision_requested=w.precision_requested,
                        precision=w.precision, profiles=w.profiles, spec=w.spec, onnx_sha256=w.onnx_sha256,
                        target=w.target, builder=w.builder, session_options=w.session_options,
                        artifact_key=w.artifact_key)
        out[name] = e.to_dict(root)
    return out


def _rebuilds(prev: dict, wanted: dict) -> dict[str, str]:
    return {n: why for n, w in wanted.items() for act, why in [decide(prev.get(n), w, True)] if act == "build"}


def test_unchanged_inputs_rebuild_nothing(export):
    w = _wanted(export)
    prev = _as_built(export, w)
    assert _rebuilds(prev, _wanted(export)) == {}
    assert all(decide(prev[n], x, True) == ("skip", "up to date") for n, x in w.items())
    assert {n: decide(prev[n], x, False)[0] for n, x in w.items()} == dict.fromkeys(w, "build")  # corrupt files
    assert decide(None, w["unet"], True) == ("build", "not built yet")


def test_vae_precision_rebuilds_only_the_vae(export):
    prev = _as_built(export, _wanted(export))
    changed = _rebuilds(prev, _wanted(export, vae_precision="fp16"))
    assert set(changed) == VAES
    assert "precision fp32 -> fp16" in changed["vae_decoder"]
    w = _wanted(export)
    assert w["vae_decoder"].trt_settings.precision == "fp32" and w["unet"].trt_settings.precision == "fp16"


@pytest.mark.parametrize("target,why", [
    (trt_target("10.4.0", H100), "tensorrt 10.3.0 -> 10.4.0"),
    (trt_target("10.3.0", GpuInfo("NVIDIA A100-SXM4-80GB", "8.0")), "compute_capability 9.0 -> 8.0"),
])
def test_tensorrt_version_or_gpu_rebuilds_everything(export, target, why):
    prev = _as_built(export, _wanted(export))
    changed = _rebuilds(prev, _wanted(export, target=target))
    assert set(changed) == set(prev)
    assert all(why in reason for reason in changed.values())


@pytest.mark.parametrize("flags,key", [
    ({"builder_optimization_level": 5}, "builder_optimization_level 3 -> 5"),
    ({"hardware_compatibility": "ampere_plus"}, "hardware_compatibility none -> ampere_plus"),
    ({"version_compatible": True}, "version_compatible False -> True"),
    ({"workspace_gb": 4.0}, "workspace_gb None -> 4.0"),
    ({"refittable": True}, "refittable False -> True"),
])
def test_builder_flags_rebuild_everything(export, flags, key):
    prev = _as_built(export, _wanted(export))
    changed = _rebuilds(prev, _wanted(export, **flags))
    assert set(changed) == set(prev) and all(key in r for r in changed.values())


def test_refittable_is_in_the_key_and_manifests_from_before_the_flag_are_not_rebuilt(export):
    w = _wanted(export, refittable=True)
    assert all(x.trt_settings.refittable and x.builder["refittable"] is True for x in w.values())
    prev = _as_built(export, _wanted(export))
    assert all(p["builder"]["refittable"] is False for p in prev.values())  # recorded when off too
    for p in prev.values():  # a manifest written before --refittable existed
        del p["builder"]["refittable"]
    off = _wanted(export)
    assert _rebuilds(prev, off) == {}  # same artifact key: no multi-minute rebuild
    assert {decide(prev[n], x, True)[0] for n, x in off.items()} == {"update"}  # the record gains the flag
    assert set(_rebuilds(prev, _wanted(export, refittable=True))) == set(prev)
    cli = BuildOptions(out=export[0], refittable=True).to_cli()
    assert "--refittable" in cli and "--refittable" not in BuildOptions(out=export[0]).to_cli()


def test_refittable_is_recorded_only_for_the_onnxruntime_twin(export):
    """The twin switches weights by new sessions, so the flag never changes its bytes."""
    root, manifest = export

    def twin(**flags):
        o = BuildOptions(out=root, **flags)
        return wanted_engines(o, manifest, make_plan(o, manifest), "onnxruntime", {"onnxruntime": "1.32.0"})

    prev = _as_built(export, twin())
    on = twin(refittable=True)
    assert all(x.builder["refittable"] is True for x in on.values())
    assert _rebuilds(prev, on) == {}
    assert {decide(prev[n], x, True)[0] for n, x in on.items()} == {"update"}


def test_timing_cache_path_is_recorded_not_rebuilt(export, tmp_path):
    prev = _as_built(export, _wanted(export))
    w = _wanted(export, timing_cache=tmp_path / "t.cache")
    assert _rebuilds(prev, w) == {}
    assert decide(prev["unet"], w["unet"], True)[0] == "update"


def test_profile_changes_rebuild_only_components_whose_profiles_change(export):
    prev = _as_built(export, _wanted(export))
    changed = _rebuilds(prev, _wanted(export, profiles="dynamic"))
    assert set(changed) == set(prev) - TEXT  # the text encoders' batch-only profile is the same
    assert all(r == "optimization profiles changed" for r in changed.values())
    assert set(_rebuilds(prev, _wanted(export, batch_sizes=(1, 2)))) == set(prev)


def test_changed_onnx_rebuilds_only_that_component(export):
    prev = _as_built(export, _wanted(export))
    root, manifest = export
    m2 = copy.deepcopy(manifest)
    rel = next(iter(m2["components"]["refiner_unet"]["files"]))
    m2["components"]["refiner_unet"]["files"][rel] = "f" * 64
    o = BuildOptions(out=root, precision="fp16")
    w2 = wanted_engines(o, m2, make_plan(o, m2), "tensorrt", trt_target("10.3.0", H100))
    assert _rebuilds(prev, w2) == {"refiner_unet": "the ONNX export changed"}


def test_backend_switch_rebuilds(export):
    root, manifest = export
    prev = _as_built(export, _wanted(export))
    o = BuildOptions(out=root, precision="fp16")
    w = wanted_engines(o, manifest, make_plan(o, manifest), "onnxruntime", {"onnxruntime": "1.32.0"})
    changed = _rebuilds(prev, w)
    assert set(changed) == set(prev) and all(r == "backend tensorrt -> onnxruntime" for r in changed.values())


# ---- profile selection -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def entries(export):
    _root, manifest = export
    specs = specs_from_dicts(c["spec"] for c in manifest["components"].values())
    out = {}
    for mode in ("static", "bucketed", "dynamic"):
        plan = plan_profiles(specs, native=256, batch_sizes=(1, 2), mode=mode)
        out[mode] = {n: EngineEntry(component=n, backend="tensorrt", path=Path("/x"), files={},
                                    precision_requested="fp16", precision="fp16", profiles=list(c.profiles),
                                    spec=c.spec, onnx_sha256="") for n, c in plan.components.items()}
    return out


@pytest.mark.parametrize("mode", ["static", "bucketed", "dynamic"])
def test_select_profile_prefers_the_profile_planned_for_the_bucket(entries, mode):
    e = entries[mode]["unet"]
    for b in buckets_for(256):
        for n in (1, 2, 4):
            shapes = e.spec.input_shapes(n, b.height, b.width)
            i = select_profile(e, shapes)
            p = e.profiles[i]
            assert b in p.buckets and n in p.batch_sizes and p.covers(shapes)
    te = entries[mode]["text_encoder"]
    assert te.profiles[select_profile(te, {"input_ids": (2, 77)})].covers({"input_ids": (2, 77)})


def test_select_profile_range_fallback_and_refusal(entries):
    e = entries["bucketed"]["unet"]
    b = e.profiles[0].buckets[0]
    # not a bucket, but inside profile 0's range (latent size between two of its buckets)
    inside = e.spec.input_shapes(2, e.profiles[0].shapes["sample"][2][2] * 8, e.profiles[0].shapes["sample"][0][3] * 8)
    assert select_profile(e, inside) == 0
    with pytest.raises(UnsupportedShapeError, match="serves batch sizes \\[1, 2, 4\\] and buckets 128x512"):
        select_profile(e, e.spec.input_shapes(6, b.height, b.width))
    with pytest.raises(UnsupportedShapeError, match="1024x1024"):
        select_profile(e, e.spec.input_shapes(2, 1024, 1024))
    static = entries["static"]["unet"]
    with pytest.raises(UnsupportedShapeError):  # static: between buckets is refused
        select_profile(static, static.spec.input_shapes(2, 136, 520))
    with pytest.raises(InputMismatchError):
        select_profile(e, {"latents": (2, 4, 16, 16)})
    with pytest.raises(UnsupportedShapeError):
        select_profile(entries["dynamic"]["text_encoder"], {"input_ids": (5, 77)})


def test_entry_roundtrip(entries, tmp_path):
    e = replace(entries["bucketed"]["unet"], path=tmp_path / "engines/unet/engine.plan")
    d = e.to_dict(tmp_path)
    assert d["file"] == "engines/unet/engine.plan"
    back = EngineEntry.from_dict(json.loads(json.dumps(d)), tmp_path)
    assert back.profiles == e.profiles and back.spec == e.spec and back.path == e.path.resolve()
    assert set(back.buckets) == set(buckets_for(256)) and back.batch_sizes == (1, 2, 4)
