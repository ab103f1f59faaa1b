"""The latency benchmark: runs end to end on the tiny export and writes a complete record.

No timing is asserted (speed is shown by running the benchmark, not by tests): these
tests check that the benchmark measures what it says -- both sides ran the same stages
the same number of times, the images agree with diffusers', the JSON has every figure
the issue asks for, the table and the plot are written -- and that bad requests are
refused with one-line named errors before anything runs.
"""

from __future__ import annotations

import json
import math

import pytest
from fixtures import run_cli
from sdxl_export.benchmarks import report
from sdxl_export.benchmarks.bench import BenchConfig, Variant, run_bench
from sdxl_export.benchmarks.stats import percentile, summarize

STAGES = ("text_encoder", "text_encoder_2", "unet", "refiner_unet", "vae_decoder")


@pytest.fixture(scope="module")
def tiny_bench(tiny_artifacts, tmp_path_factory):
    """One CLI run of the benchmark on the tiny export: 3 steps, 2 interleaved runs per side."""
    out = tmp_path_factory.mktemp("bench")
    # One torch thread: the baseline's OpenMP pool on a loaded 2-core machine spins (see
    # test_parity_diffusers); the test checks the record, not the speed.
    rc, stdout, stderr = run_cli(
        "bench", "--artifacts", str(tiny_artifacts), "--backend", "onnxruntime", "--steps", "3", "--runs", "2",
        "--warmup", "1", "--torch-threads", "1", "--json", str(out / "bench.json"), "--plot", str(out / "bench.png"),
    )
    assert rc == 0, stderr
    return json.loads((out / "bench.json").read_text()), stdout, out


def test_json_records_machine_versions_config(tiny_bench, tiny_artifacts):
    result, _, _ = tiny_bench
    assert result["schema"] == "sdxl-export/bench" and result["schema_version"] == 1
    m = result["machine"]
    assert m["physical_cores"] >= 1 and m["memory_gb"] > 0 and m["cpu"]
    for lib in ("torch", "onnxruntime", "diffusers", "transformers", "python"):
        assert result["versions"][lib]
    c = result["config"]
    assert c["artifacts"] == str(tiny_artifacts) and c["steps"] == 3 and c["runs"] == 2 and c["warmup"] == 1
    assert c["baseline"] == "diffusers" and c["torch_threads_used"] == 1
    assert result["build"] == {"export_seconds": None, "build_seconds": None, "built_backends": [],
                               "up_to_date": None}
    assert set(result["load_seconds"]) == {"onnxruntime", "diffusers"}
    assert result["variants"]["onnxruntime"]["backend"] == "onnxruntime"


def test_both_sides_ran_the_same_stages(tiny_bench):
    result, _, _ = tiny_bench
    (case,) = result["cases"]
    assert case["bucket"] == "256x256" and case["batch"] == 1
    ours, ref = case["results"]["onnxruntime"], case["results"]["diffusers"]
    for side in (ours, ref):
        assert set(STAGES) <= set(side["stages"])
        for stage in side["stages"].values():
            assert stage["per_call_p50_ms"] > 0 and stage["calls_per_image_batch"] >= 1
    for stage in ("unet", "refiner_unet", "vae_decoder", "text_encoder"):
        assert ours["stages"][stage]["calls_per_image_batch"] == ref["stages"][stage]["calls_per_image_batch"], stage
    # 3 steps split at 0.8: both UNets ran, and together they ran every step.
    assert ours["stages"]["unet"]["calls_per_image_batch"] + ours["stages"]["refiner_unet"]["calls_per_image_batch"] \
        == 3


def test_end_to_end_overhead_memory_figures(tiny_bench):
    result, _, _ = tiny_bench
    for side in result["cases"][0]["results"].values():
        e = side["end_to_end"]
        assert e["n"] == 2 and len(e["runs_ms"]) == 2
        assert e["min_ms"] <= e["p50_ms"] <= e["p90_ms"] <= e["p99_ms"] <= e["max_ms"]
        assert math.isclose(e["mean_ms"], sum(e["runs_ms"]) / 2) and e["std_ms"] >= 0
        assert side["images_per_second"] > 0
        assert side["component_ms_p50"] <= e["max_ms"]
        assert 0 <= side["overhead"]["fraction_p50"] < 1 and side["overhead"]["p50_ms"] >= 0
        assert side["memory"]["rss_peak_mb"] > 100  # torch + ORT + weights are resident
        assert side["memory"]["gpu_used_peak_mb"] is None  # CPU-only run


def test_speedup_and_parity_with_diffusers(tiny_bench):
    result, _, _ = tiny_bench
    case = result["cases"][0]
    s = case["speedup_vs_baseline"]["onnxruntime"]
    assert s["end_to_end_p50"] > 0 and s["end_to_end_paired_median"] > 0
    assert set(STAGES) <= set(s["per_call_p50"])
    assert result["speedup_vs_baseline"]["onnxruntime"] == pytest.approx(s["end_to_end_p50"])
    p = case["parity"]["onnxruntime"]
    assert p["comparable"] and p["within_1_255"], p
    assert p["max_latent_diff"] <= 1e-4


def test_table_and_plot(tiny_bench):
    _, stdout, out = tiny_bench
    assert "| bucket | batch | side | p50 ms |" in stdout
    assert "| 256x256 | 1 | onnxruntime |" in stdout and "| 256x256 | 1 | diffusers |" in stdout
    assert "within 1/255" in stdout
    # The table is a view of the JSON: regenerated from the file, it is the same.
    assert report.markdown_table(report.read_json(out / "bench.json")) in stdout
    png = (out / "bench.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000


def test_without_baseline(tiny_artifacts):
    cfg = BenchConfig(artifacts=tiny_artifacts, variants=[Variant("ort", backend="onnxruntime")], steps=2,
                      runs=1, warmup=0, baseline="none", use_refiner=False, buckets="128x512")
    result = run_bench(cfg)
    (case,) = result["cases"]
    assert case["bucket"] == "128x512" and set(case["results"]) == {"ort"}
    assert "speedup_vs_baseline" not in result and "parity" not in case
    assert "refiner_unet" not in case["results"]["ort"]["stages"]


@pytest.mark.parametrize("args, fragment", [
    (["--runs", "0"], "--runs must be an integer >= 1"),
    (["--buckets", "100x100"], "is not one of the"),
    (["--batch-sizes", "1,x"], "cannot parse batch sizes"),
    (["--session-option", "novalue"], "cannot parse session option"),
    (["--backend", "nosuch"], "unknown backend"),
])
def test_bad_requests_are_one_line_errors(tiny_artifacts, tmp_path, args, fragment):
    rc, stdout, stderr = run_cli("bench", "--artifacts", str(tiny_artifacts), "--baseline", "none",
                                 "--json", str(tmp_path / "out.json"), *args)
    assert rc == 2 and stdout == ""
    assert stderr.startswith("sdxl-export: error: ") and fragment in stderr and "Fix: " in stderr
    assert len(stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out.json").exists()


def test_missing_artifacts_is_a_named_error(tmp_path):
    rc, _, stderr = run_cli("bench", "--artifacts", str(tmp_path / "nothing"), "--baseline", "none")
    assert rc == 2 and stderr.startswith("sdxl-export: error: ")


def test_percentiles_are_nearest_rank():
    values = [0.005, 0.001, 0.003, 0.002, 0.004]
    assert percentile(values, 50) == 0.003 and percentile(values, 90) == 0.005 and percentile(values, 99) == 0.005
    assert percentile(values, 20) == 0.001
    s = summarize(values)
    assert s["p50_ms"] == pytest.approx(3.0) and s["min_ms"] == pytest.approx(1.0) and s["max_ms"] == pytest.approx(5.0)
    assert s["std_ms"] == pytest.approx(1.5811, rel=1e-3)


def test_step_bench_compares_ort_configs_with_torch(tiny_artifacts):
    from sdxl_export.benchmarks.step_bench import CONFIGS, markdown, run_step_bench

    chosen = [c for c in CONFIGS if c.name in ("ort disable_all", "ort all + static shapes",
                                               "twin(extended) opened all")]
    result = run_step_bench(tiny_artifacts, "unet", rounds=2, clock="thread", configs=chosen)
    assert (result["height"], result["width"], result["batch"]) == (256, 256, 2)
    rows = {r["config"]: r for r in result["rows"]}
    assert list(rows) == ["torch eager fp32", *(c.name for c in chosen)]
    for r in rows.values():
        assert len(r["runs_ms"]) == 2 and r["median_ms"] > 0 and r["speedup_vs_torch"] > 0
        assert r["max_abs_error"] <= 2e-4, r  # the unet spec's tolerance: every config computes the same
    assert "| ort all + static shapes |" in markdown(result)


def test_model_source_is_exported_and_built_and_timed(tiny_artifacts_copy, tmp_path):
    """``--model``: the benchmark exports (here: finds the export up to date) and builds, timing both."""
    rc, stdout, stderr = run_cli("bench", "--model", "tiny", "--work-dir", str(tiny_artifacts_copy), "--backend",
                                 "onnxruntime", "--buckets", "192x320", "--steps", "2", "--runs", "1", "--warmup",
                                 "0", "--baseline", "none", "--no-refiner", "--json", str(tmp_path / "r.json"))
    assert rc == 0, stderr
    assert "| 192x320 | 1 | onnxruntime |" in stdout and "build (onnxruntime)" in stdout
    build = json.loads((tmp_path / "r.json").read_text())["build"]
    assert build["export_seconds"] >= 0 and build["build_seconds"] > 0 and build["built_backends"] == ["onnxruntime"]
    assert build["up_to_date"] is False  # the engines were built now
    engines = json.loads((tiny_artifacts_copy / "engines" / "manifest.json").read_text())["engines"]
    assert engines["unet"]["backend"] == "onnxruntime"
    assert any("192x320" in p["buckets"] for p in engines["unet"]["profiles"])


def test_gpu_suite_refuses_a_machine_without_gpu():
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: the sdxl suite would run for real")
    rc, stdout, stderr = run_cli("bench", "--suite", "sdxl")
    assert rc == 2 and stdout == "" and "needs a CUDA GPU" in stderr and "Fix: " in stderr
