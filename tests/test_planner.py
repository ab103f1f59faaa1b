"""Profile planner: coverage of every bucket, modes, batch doubling, TensorRT limits."""

from __future__ import annotations

import dataclasses
import math

import pytest
from sdxl_export.buckets import Bucket, buckets_for, parse_bucket_list
from sdxl_export.engines.planner import (
    MODES,
    TRT_MAX_DIMS,
    TRT_MAX_PROFILES,
    PlanError,
    PlannedProfile,
    group_buckets,
    plan_profiles,
)
from sdxl_export.engines.sources import dims_for_source, specs_for_plan
from sdxl_export.errors import UnknownBucketError
from sdxl_export.specs import ComponentSpec, TensorSpec, component_specs


@pytest.fixture(scope="module")
def sdxl_specs():
    specs, native, _ = specs_for_plan("sdxl", "same", True, None)
    assert native == 1024
    return specs


@pytest.fixture(scope="module")
def tiny_specs():
    specs, native, _ = specs_for_plan("tiny", "same", True, None)
    assert native == 256
    return specs


def _served(plan, name, bucket, batch):
    comp = plan.components[name]
    shapes = comp.spec.input_shapes(batch, bucket.height, bucket.width)
    return [i for i, p in enumerate(comp.profiles)
            if bucket in p.buckets and batch in p.batch_sizes and p.covers(shapes)]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("model", ["sdxl", "tiny"])
def test_every_bucket_and_batch_is_served_in_every_mode(mode, model, sdxl_specs, tiny_specs):
    specs = sdxl_specs if model == "sdxl" else tiny_specs
    native = 1024 if model == "sdxl" else 256
    plan = plan_profiles(specs, native=native, batch_sizes=(1, 2), mode=mode)
    table = buckets_for(native)
    if model == "sdxl":
        assert len(table) == 40
    assert plan.buckets == table
    assert set(plan.components) == set(specs)
    for name, comp in plan.components.items():
        assert len(comp.profiles) <= TRT_MAX_PROFILES
        for b in table:
            for n in comp.batch_sizes:
                assert _served(plan, name, b, n), (mode, name, b, n)


def test_batch_multipliers_follow_classifier_free_guidance(sdxl_specs):
    plan = plan_profiles(sdxl_specs, native=1024, batch_sizes=(1, 3), mode="dynamic")
    # 2B under classifier-free guidance, B with guidance off
    assert plan.components["unet"].batch_sizes == (1, 2, 3, 6)
    assert plan.components["refiner_unet"].batch_sizes == (1, 2, 3, 6)
    assert plan.components["text_encoder"].batch_sizes == (1, 2, 3, 6)
    assert plan.components["vae_decoder"].batch_sizes == (1, 3)
    lo, opt, hi = plan.components["unet"].profiles[0].shapes["sample"]
    assert (lo[0], opt[0], hi[0]) == (1, 2, 6)  # kernels tuned for the guided batch


def test_static_profiles_are_exact_shapes(tiny_specs):
    plan = plan_profiles(tiny_specs, native=256, batch_sizes=(1, 2), mode="static")
    n_buckets = len(buckets_for(256))
    unet = plan.components["unet"]
    assert len(unet.profiles) == n_buckets * 3  # UNet batches 1, 2 (guided 1) and 4 (guided 2)
    for p in unet.profiles:
        assert len(p.buckets) == 1 and len(p.batch_sizes) == 1
        for lo, opt, hi in p.shapes.values():
            assert lo == opt == hi
        b, n = p.buckets[0], p.batch_sizes[0]
        assert p.shapes["sample"][0] == (n, 4, b.height // 8, b.width // 8)
    # text encoders: one exact profile per batch, each serving every bucket
    te = plan.components["text_encoder"]
    assert [p.batch_sizes for p in te.profiles] == [(1,), (2,), (4,)]
    assert all(p.buckets == plan.buckets for p in te.profiles)


def test_bucketed_groups_neighbours_with_bounded_area(sdxl_specs):
    plan = plan_profiles(sdxl_specs, native=1024, batch_sizes=(1,), mode="bucketed")
    unet = plan.components["unet"]
    assert 2 <= len(unet.profiles) <= 6  # a few profiles, one engine
    seen: list[Bucket] = []
    for p in unet.profiles:
        assert p.opt_bucket in p.buckets  # opt at a real bucket
        hs = [b.height for b in p.buckets]
        ws = [b.width for b in p.buckets]
        assert max(hs) * max(ws) <= 1.5 * max(b.height * b.width for b in p.buckets)
        lo, opt, hi = p.shapes["sample"]
        assert (hi[2], hi[3]) == (max(hs) // 8, max(ws) // 8)
        assert (lo[2], lo[3]) == (min(hs) // 8, min(ws) // 8)
        assert opt[2:] == (p.opt_bucket.height // 8, p.opt_bucket.width // 8)
        seen += p.buckets
    assert sorted(seen) == sorted(buckets_for(1024))  # each bucket in exactly one profile


def test_dynamic_is_one_wide_profile_with_opt_at_square(sdxl_specs):
    plan = plan_profiles(sdxl_specs, native=1024, mode="dynamic")
    vae = plan.components["vae_decoder"]
    assert len(vae.profiles) == 1
    lo, opt, hi = vae.profiles[0].shapes["latent"]
    assert lo == (1, 4, 64, 64) and hi == (1, 4, 256, 256) and opt == (1, 4, 128, 128)
    enc = plan.components["vae_encoder"].profiles[0].shapes["images"]
    assert enc == ((1, 3, 512, 512), (1, 3, 1024, 1024), (1, 3, 2048, 2048))


def test_group_buckets_partitions_in_aspect_order():
    table = buckets_for(1024)
    for ratio in (1.0, 1.25, 1.5, 3.0, 100.0):
        groups = group_buckets(table, ratio)
        flat = [b for g in groups for b in g]
        assert sorted(flat) == sorted(table)
        assert [b.aspect for b in flat] == sorted(b.aspect for b in flat)
        for g in groups:
            box = max(b.height for b in g) * max(b.width for b in g)
            assert len(g) == 1 or box <= ratio * max(b.height * b.width for b in g)
    assert len(group_buckets(table, 100.0)) == 1
    # ratio 1: only buckets nested in the largest one (same height, narrower) share a profile
    assert len(group_buckets(table, 1.0)) > len(group_buckets(table, 1.5)) >= 2


def test_shapes_come_from_the_spec_not_from_names():
    dims = dataclasses.replace(dims_for_source("tiny"), latent_channels=16, pooled_dim=40)
    specs = component_specs(dims)
    plan = plan_profiles(specs, native=256, mode="dynamic")
    sample = plan.components["unet"].profiles[0].shapes["sample"]
    assert sample[0][1] == 16
    assert plan.components["unet"].profiles[0].shapes["text_embeds"][1] == (2, 40)  # opt
    # a component with other input names is planned from its own spec
    odd = ComponentSpec(
        name="odd", kind="vae_decoder",
        inputs=(TensorSpec("z", "float32", ("batch", 7, "latent_height", "latent_width")),
                TensorSpec("scale", "float32", (3,))),
        outputs=(TensorSpec("y", "float32", ("batch", 3, "height", "width")),),
        tolerance=specs["vae_decoder"].tolerance,
    )
    p = plan_profiles({"odd": odd}, native=256, mode="static").components["odd"]
    assert set(p.profiles[0].shapes) == {"z", "scale"}
    assert p.profiles[0].shapes["scale"] == ((3,), (3,), (3,))


def test_subset_of_buckets_and_unknown_bucket(sdxl_specs):
    chosen = parse_bucket_list("1024x1024,832x1216", 1024)
    plan = plan_profiles(sdxl_specs, native=1024, buckets=chosen, mode="bucketed")
    assert set(plan.buckets) == set(chosen)
    assert all(_served(plan, "unet", b, 2) and _served(plan, "unet", b, 1) for b in chosen)
    with pytest.raises(UnknownBucketError):
        parse_bucket_list("1000x1000", 1024)


def test_limits_are_enforced(sdxl_specs, tiny_specs):
    with pytest.raises(PlanError, match="exceed the limit"):
        plan_profiles(sdxl_specs, native=1024, batch_sizes=(1, 2, 3, 4), mode="static")
    with pytest.raises(PlanError, match="2\\*\\*31"):
        # the decoder's output images at batch 300 x 2048^2 exceed int32 indexing
        plan_profiles(sdxl_specs, native=1024, batch_sizes=(300,), mode="dynamic")
    with pytest.raises(PlanError, match="unknown profile mode"):
        plan_profiles(tiny_specs, native=256, mode="wide")
    with pytest.raises(PlanError, match="batch sizes"):
        plan_profiles(tiny_specs, native=256, batch_sizes=(0,))
    deep = ComponentSpec(
        name="deep", kind="vae_decoder",
        inputs=(TensorSpec("x", "float32", ("batch", 1, 1, 1, 1, 1, 1, 1, 1)),),
        outputs=(TensorSpec("y", "float32", ("batch",)),), tolerance=tiny_specs["unet"].tolerance,
    )
    assert len(deep.inputs[0].shape) > TRT_MAX_DIMS
    with pytest.raises(PlanError, match="rank"):
        plan_profiles({"deep": deep}, native=256)


def test_profile_roundtrip_and_covers():
    p = PlannedProfile(shapes={"x": ((1, 4, 8, 8), (2, 4, 16, 16), (2, 4, 32, 32))},
                       buckets=(Bucket(128, 128),), batch_sizes=(1, 2), opt_bucket=Bucket(128, 128))
    assert PlannedProfile.from_dict(p.to_dict()) == p
    assert p.covers({"x": (2, 4, 32, 8)})
    assert not p.covers({"x": (3, 4, 32, 8)})
    assert not p.covers({"x": (2, 4, 32)})
    assert not p.covers({"y": (1, 4, 8, 8)})
    assert math.prod(p.shapes["x"][2]) == 8192


def test_plan_json_serves_all_40_paper_buckets_for_the_default_model():
    """The acceptance check: ``sdxl-export plan --json`` (tiny, scaled buckets) covers all 40."""
    import json
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "sdxl_export.cli", "-q", "plan", "--json"],
                         capture_output=True, text=True, timeout=300, check=False)
    assert out.returncode == 0, out.stderr
    plan = json.loads(out.stdout)
    assert len(plan["sdxl_buckets"]) == 40
    for name, comp in plan["components"].items():
        served = {b for prof in comp["profiles"] for b in prof["buckets"]}
        assert set(plan["sdxl_buckets"].values()) <= served, name
