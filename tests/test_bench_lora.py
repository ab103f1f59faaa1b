"""``sdxl-export bench --lora FILE[:SCALE]``: switch times and the UNet step with and without the set."""

from __future__ import annotations

import json

import pytest
from fixtures import run_cli
from lora_files import diffusers_lora

# A whole benchmark harness run (its figures are the docs', not a test's): second tier.
pytestmark = pytest.mark.slow


def test_bench_lora_reports_switch_and_step_cost(tiny_artifacts, tiny_model, tmp_path):
    lora = diffusers_lora(tiny_model, tmp_path / "style.safetensors", seed=3)
    out = tmp_path / "bench.json"
    rc, stdout, stderr = run_cli("bench", "--artifacts", str(tiny_artifacts), "--backend", "onnxruntime,torch",
                                 "--steps", "3", "--runs", "1", "--warmup", "0", "--baseline", "none",
                                 "--lora", f"{lora}:0.7", "--json", str(out))
    assert rc == 0, stderr
    result = json.loads(out.read_text())["lora"]
    assert result["loras"] == [{"file": str(lora), "scale": 0.7}]
    assert set(result["variants"]) == {"onnxruntime", "torch"}
    for r in result["variants"].values():
        assert r["first_switch_ms"] > 0 and r["switch_ms_cached"] > 0 and r["switch_back_ms"] > 0
        assert r["unet_step_p50_ms_without"] > 0 and r["unet_step_p50_ms_with"] > 0
    assert result["fused_rebuild_seconds"] > 0
    assert "- LoRA style.safetensors:0.7 on torch" in stdout
