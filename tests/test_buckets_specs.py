"""The bucket table and the component specs: the shared facts every stage builds on."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sdxl_export.buckets import (
    Bucket,
    buckets_for,
    find_bucket,
    nearest_bucket,
    parse_bucket_list,
    sdxl_buckets,
)
from sdxl_export.errors import InputMismatchError, InvalidRequestError, UnknownBucketError
from sdxl_export.specs import COMPONENTS, ComponentSpec, ModelDims, component_specs


def test_the_paper_table_has_40_buckets_of_about_a_megapixel():
    table = sdxl_buckets()
    assert len(table) == 40 == len(set(table))
    for b in table:
        assert b.height % 64 == 0 and b.width % 64 == 0
        assert 0.85 < b.height * b.width / 1024**2 < 1.1
    assert Bucket(1024, 1024) in table
    assert min(b.aspect for b in table) == 0.25 and max(b.aspect for b in table) == 4.0


def test_scaled_buckets_keep_latents_a_multiple_of_8():
    for native in (256, 512):
        table = buckets_for(native)
        assert Bucket(native, native) in table
        assert all(b.height % 64 == 0 and b.width % 64 == 0 for b in table)
        assert len(table) == len(set(table)) < 40


def test_nearest_and_find_bucket():
    assert nearest_bucket(1000, 1000) == Bucket(1024, 1024)
    assert nearest_bucket(720, 1280) == Bucket(768, 1344)  # 16:9 landscape
    assert find_bucket(832, 1216) == Bucket(832, 1216)
    with pytest.raises(UnknownBucketError, match="nearest bucket 1024x1024"):
        find_bucket(1000, 1000)
    assert parse_bucket_list("1024x1024, 832x1216") == (Bucket(1024, 1024), Bucket(832, 1216))
    assert len(parse_bucket_list("all")) == 40
    with pytest.raises(InvalidRequestError):
        parse_bucket_list("big")


SDXL_DIMS = ModelDims(vocab_size=49408, text_hidden=768, text2_hidden=1280, pooled_dim=1280, unet_context=2048,
                      unet_time_ids=6, refiner_context=1280, refiner_time_ids=5)


def test_specs_follow_sdxl_sizes():
    specs = component_specs(SDXL_DIMS)
    assert tuple(specs) == COMPONENTS
    unet = specs["unet"]
    assert unet.input_names == ("sample", "timestep", "encoder_hidden_states", "text_embeds", "time_ids")
    shapes = unet.input_shapes(2, 832, 1216)
    assert shapes["sample"] == (2, 4, 104, 152)
    assert shapes["encoder_hidden_states"] == (2, 77, 2048)
    assert shapes["time_ids"] == (2, 6)
    assert specs["refiner_unet"].input_shapes(1, 1024, 1024)["encoder_hidden_states"] == (1, 77, 1280)
    assert specs["refiner_unet"].input_shapes(1, 1024, 1024)["time_ids"] == (1, 5)
    assert specs["text_encoder_2"].output_names == ("hidden_states", "text_embeds")
    assert specs["vae_decoder"].output_shapes(1, 1024, 768)["images"] == (1, 3, 1024, 768)
    assert unet.dynamic_axes()["sample"] == {0: "batch", 2: "latent_height", 3: "latent_width"}
    assert "refiner_unet" not in component_specs(SDXL_DIMS, with_refiner=False)


def test_spec_round_trips_through_json_dicts():
    for spec in component_specs(SDXL_DIMS).values():
        assert ComponentSpec.from_dict(spec.to_dict()) == spec


def test_check_inputs_names_dtypes_shapes_and_agreement():
    unet = component_specs(SDXL_DIMS)["unet"]
    feeds = {k: torch.from_numpy(v) for k, v in unet.example_inputs(2, 128, 192).items()}
    assert unet.check_inputs(feeds) == (2, 128, 192)
    with pytest.raises(InputMismatchError, match="expected"):
        unet.check_inputs({k: v for k, v in feeds.items() if k != "time_ids"})
    with pytest.raises(InputMismatchError, match="dtype"):
        unet.check_inputs({**feeds, "sample": feeds["sample"].double()})
    with pytest.raises(InputMismatchError, match="disagrees"):
        unet.check_inputs({**feeds, "text_embeds": feeds["text_embeds"][:1]})
    with pytest.raises(InputMismatchError, match="fixed dims"):
        unet.check_inputs({**feeds, "time_ids": feeds["time_ids"][:, :5]})
    np_feeds = unet.example_inputs(1, 64, 64)
    assert unet.check_inputs(np_feeds) == (1, 64, 64)
    with pytest.raises(InvalidRequestError, match="multiple of 8"):
        unet.input_shapes(1, 100, 64)
    assert np.issubdtype(np_feeds["time_ids"].dtype, np.float32)
