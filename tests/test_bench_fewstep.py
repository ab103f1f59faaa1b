"""``bench --fewstep``: the 4-step guidance-free request vs the 30-step CFG default, ours vs
diffusers, in one run. No timing is asserted: the record must say what ran (steps, UNet
evaluations, both sides, each stage the right number of times) and that our images equal
diffusers' at both settings."""

from __future__ import annotations

import json

import pytest
from fixtures import run_cli

# A whole benchmark harness run (its figures are the docs', not a test's): second tier.
pytestmark = pytest.mark.slow


def test_fewstep_bench_records_both_settings_and_parity(tiny_artifacts, tmp_path):
    out = tmp_path / "fewstep.json"
    rc, stdout, stderr = run_cli("bench", "--artifacts", str(tiny_artifacts), "--backend", "onnxruntime",
                                 "--fewstep", "--runs", "1", "--warmup", "0", "--torch-threads", "1",
                                 "--json", str(out))
    assert rc == 0, stderr
    result = json.loads(out.read_text())
    cases = {c["setting"]: c for c in result["cases"]}
    assert set(cases) == {"sdxl-30-cfg", "lightning-4"}
    for name, steps, evals in (("sdxl-30-cfg", 30, 60), ("lightning-4", 4, 4)):
        c = cases[name]
        assert c["steps"] == steps and c["unet_evaluations"] == evals
        for side in ("onnxruntime", "diffusers"):
            assert c["results"][side]["stages"]["unet"]["calls_per_image_batch"] == steps
            assert "refiner_unet" not in c["results"][side]["stages"]
        assert c["parity"]["onnxruntime"]["within_1_255"] is True, c["parity"]
    rows = {(r["setting"], r["side"]) for r in result["fewstep"]}
    assert rows == {(s, side) for s in cases for side in ("onnxruntime", "diffusers")}
    assert "lightning-4" in stdout and "| UNet evals |" in stdout
