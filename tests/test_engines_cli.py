"""``sdxl-export plan``: the printed plan covers every bucket in every mode."""

from __future__ import annotations

import json

import pytest
from conftest_engines import run_cli
from sdxl_export.buckets import buckets_for


@pytest.mark.parametrize("mode", ["static", "bucketed", "dynamic"])
@pytest.mark.parametrize("model,native", [("tiny", 256), ("sdxl", 1024)])
def test_plan_json_covers_all_buckets(tmp_path, mode, model, native):
    rc, out, err = run_cli("plan", "--json", "--model", model, "--profiles", mode, "--batch-sizes", "1,2",
                           "--out", str(tmp_path / "none"))
    assert rc == 0, err
    plan = json.loads(out)
    table = [str(b) for b in buckets_for(native)]
    assert plan["mode"] == mode and plan["buckets"] == table and plan["native_size"] == native
    if model == "sdxl":
        assert len(table) == 40
    assert set(plan["components"]) == {"text_encoder", "text_encoder_2", "unet", "refiner_unet", "vae_decoder",
                                       "vae_encoder"}
    for name, comp in plan["components"].items():
        served = set()
        for prof in comp["profiles"]:
            served.update(prof["buckets"])
            for s in prof["shapes"].values():
                assert set(s) == {"min", "opt", "max"}
                assert all(a <= o <= b for a, o, b in zip(s["min"], s["opt"], s["max"]))
        assert served == set(table), name
        if comp["spatial"]:  # each (bucket, batch) served by a profile whose range holds it
            key = "sample" if "unet" in name else ("latent" if name == "vae_decoder" else "images")
            scale = 8 if key != "images" else 1
            for b in buckets_for(native):
                for n in comp["batch_sizes"]:
                    h, w = b.height // scale, b.width // scale
                    assert any(str(b) in p["buckets"] and p["shapes"][key]["min"][0] <= n <= p["shapes"][key]["max"][0]
                               and p["shapes"][key]["min"][2] <= h <= p["shapes"][key]["max"][2]
                               and p["shapes"][key]["min"][3] <= w <= p["shapes"][key]["max"][3]
                               for p in comp["profiles"]), (name, str(b), n)


def test_plan_text_and_options(tmp_path):
    rc, out, err = run_cli("plan", "--buckets", "128x512,256x256", "--no-refiner", "--out", str(tmp_path))
    assert rc == 0, err
    assert out.startswith("plan: bucketed profiles, 2 buckets at native 256px")
    assert "refiner_unet" not in out and "unet: " in out and "serves 256x256" in out
    rc, out, err = run_cli("plan", "--buckets", "1024x1024", "--out", str(tmp_path))
    assert rc == 2 and "not one of the 13 SDXL buckets at native size 256" in err
    rc, out, err = run_cli("plan", "--profiles", "static", "--model", "sdxl", "--batch-sizes", "1,2,3,4",
                           "--out", str(tmp_path))
    assert rc == 2 and "exceed the limit of 128 per engine" in err and "Traceback" not in err
