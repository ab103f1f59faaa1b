"""Benchmark output: the JSON file, a markdown table for humans, a PNG plot.

The JSON is the complete record (machine, library versions, config, every figure); the
table and the plot are views of it, so they can be regenerated from a saved JSON with
:func:`markdown_table` / :func:`plot` without re-running anything.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..artifacts import atomic_write_bytes
from ..errors import OutputDirError
from .bench import BASELINE, BASELINE_BF16, SCHEMA

#: Stage columns of the table: (stage key, header). UNet stages are per step.
STAGE_COLUMNS = (
    ("text_encoder", "TE1 ms"),
    ("text_encoder_2", "TE2 ms"),
    ("unet", "UNet/step ms"),
    ("refiner_unet", "refiner/step ms"),
    ("vae_decoder", "VAE dec ms"),
)


def write_json(result: dict[str, Any], path: str | Path) -> None:
    path = Path(path)
    try:
        atomic_write_bytes(path, (json.dumps(result, indent=2, default=str) + "\n").encode())
    except OSError as exc:
        raise OutputDirError(f"cannot write {path} ({exc.strerror or exc})", "pass a writable --json FILE") from None


def read_json(path: str | Path) -> dict[str, Any]:
    data = json.loads(Path(path).read_text())
    if data.get("schema") != SCHEMA:
        raise ValueError(f"{path} is not a sdxl-export benchmark result")
    return data


def _fmt(x: float | None, digits: int = 1) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def markdown_table(result: dict[str, Any]) -> str:
    """One row per (case, side): latency percentiles, throughput, stages, overhead, memory, speedup."""
    head = ["bucket", "batch", "side", "p50 ms", "p90 ms", "p99 ms", "mean ± std ms", "img/s",
            *(h for _, h in STAGE_COLUMNS), "overhead", "RSS MB", "speedup"]
    with_bf16 = any("speedup_vs_diffusers_bf16" in c for c in result["cases"])
    with_fidelity = any("fidelity" in c for c in result["cases"])
    if with_bf16:
        head.append(f"vs {BASELINE_BF16}")
    if with_fidelity:
        head += ["PSNR dB vs fp32", "max diff /255"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for case in result["cases"]:
        speed = case.get("speedup_vs_baseline", {})
        speed_bf16 = case.get("speedup_vs_diffusers_bf16", {})
        fid = case.get("fidelity", {})
        for side, r in case["results"].items():
            e = r["end_to_end"]
            stages = r["stages"]
            cells = [case["bucket"], str(case["batch"]), side, _fmt(e["p50_ms"]), _fmt(e["p90_ms"]),
                     _fmt(e["p99_ms"]), f"{e['mean_ms']:.1f} ± {e['std_ms']:.1f}", _fmt(r["images_per_second"], 3)]
            cells += [_fmt(stages[k]["per_call_p50_ms"]) if k in stages else "-" for k, _ in STAGE_COLUMNS]
            cells += [f"{r['overhead']['fraction_p50'] * 100:.2f}%", _fmt(r["memory"]["rss_peak_mb"], 0)]
            s = speed.get(side, {}).get("end_to_end_p50")
            cells.append("1.00x (baseline)" if side == BASELINE else f"{s:.2f}x" if s else "-")
            if with_bf16:
                s2 = speed_bf16.get(side, {}).get("end_to_end_p50")
                cells.append("1.00x" if side == BASELINE_BF16 else f"{s2:.2f}x" if s2 else "-")
            if with_fidelity:
                f = fid.get(side, {})
                if side == BASELINE:
                    cells += ["(reference)", "0"]
                else:
                    cells += [_psnr(f.get("psnr_db")) if f.get("comparable") else "-",
                              _fmt(f.get("max_pixel_diff_255"), 2)]
            lines.append("| " + " | ".join(cells) + " |")
    lines += ["", *summary_lines(result)]
    return "\n".join(lines)


def _psnr(x: float | None) -> str:
    return "NaN" if x is None else "inf" if x == float("inf") else f"{x:.2f}"


def summary_lines(result: dict[str, Any]) -> list[str]:
    """Parity, the fidelity gate, build times and the machine, one line each, under the table."""
    out = []
    for case in result["cases"]:
        for side, f in case.get("fidelity", {}).items():
            gate = f.get("gate")
            if gate is not None:
                out.append(f"- fidelity gate {case['bucket']} b{case['batch']} {side}: "
                           f"{'PASSED' if f['gate_passed'] else 'FAILED'} -- PSNR vs diffusers fp32 "
                           f"{_psnr(gate['psnr_ours'])} dB (max diff {gate['max_pixel_diff_ours']:.1f}/255), "
                           f"{BASELINE_BF16} {_psnr(gate['psnr_diffusers'])} dB (max diff "
                           f"{gate['max_pixel_diff_diffusers']:.1f}/255), margin {gate['margin_db']} dB"
                           + ("" if "bf16_gate_passed" not in f else
                              f"; the bf16 gate (1 dB, what `auto` needs): "
                              f"{'passed' if f['bf16_gate_passed'] else 'not passed'}"))
            elif f.get("comparable") and side not in (BASELINE_BF16,) and f.get("gate_passed", 0) is None:
                out.append(f"- fidelity {case['bucket']} b{case['batch']} {side}: PSNR vs diffusers fp32 "
                           f"{_psnr(f['psnr_db'])} dB, max diff {f['max_pixel_diff_255']:.1f}/255; not gated "
                           f"(no {BASELINE_BF16} yardstick in this run)")
    if result.get("speedup_vs_diffusers_bf16"):
        overall = result.get("speedup_vs_baseline", {})
        for side, s in result["speedup_vs_diffusers_bf16"].items():
            s1 = overall.get(side)
            out.append(f"- {side}: {_fmt(s1, 2)}x diffusers fp32, {_fmt(s, 2)}x {BASELINE_BF16} (end-to-end p50, "
                       "geometric mean over cases)")
    for case in result["cases"]:
        for side, p in case.get("parity", {}).items():
            if p.get("comparable"):
                out.append(f"- parity {case['bucket']} b{case['batch']} {side} vs {BASELINE}: max pixel diff "
                           f"{p['max_pixel_diff_255']:.3f}/255, max latent diff {p['max_latent_diff']:.2e}"
                           f" ({'within' if p['within_1_255'] else 'OUTSIDE'} 1/255)")
            else:
                out.append(f"- parity {case['bucket']} b{case['batch']} {side}: not comparable ({p.get('why')})")
    lora = result.get("lora")
    if lora:
        files = ", ".join(f"{Path(x['file']).name}:{x['scale']:g}" for x in lora["loras"])
        for side, r in lora["variants"].items():
            out.append(f"- LoRA {files} on {side} ({lora['bucket']}): first switch {r['first_switch_ms']:.0f} ms "
                       f"(read + fit + apply), cached {r['switch_ms_cached']:.0f} ms, back to base "
                       f"{r['switch_back_ms']:.0f} ms; UNet step p50 {r['unet_step_p50_ms_without']:.1f} ms without, "
                       f"{r['unet_step_p50_ms_with']:.1f} ms with; a fused rebuild of the touched components took "
                       f"{lora['fused_rebuild_seconds']:.1f} s")
    for side, why in (result.get("skipped") or {}).items():
        out.append(f"- skipped {side}: {why}")
    b = result.get("build", {})
    if b.get("export_seconds") is not None:
        out.append(f"- export {b['export_seconds']:.1f} s" + (
            f", build ({', '.join(b['built_backends'])}) {b['build_seconds']:.1f} s"
            if b.get("build_seconds") is not None else "")
            + (" (already up to date: no export/build work done)" if b.get("up_to_date") else ""))
    m, c = result["machine"], result["config"]
    gpu = f", GPU {m['gpu']}" if m.get("gpu") else ""
    out.append(f"- {c['steps']} steps, guidance {c['guidance_scale']}, refiner {c['use_refiner']} "
               f"(denoising_end {c['denoising_end']}), {c['scheduler']}; {c['runs']} interleaved runs after "
               f"{c['warmup']} warm-up; torch threads {c['torch_threads_used']}")
    isa = m.get("cpu_isa") or {}
    isa_text = f" ({', '.join(isa['flags'])}; native bf16: {'yes' if isa.get('native_bf16') else 'no'})" \
        if isa.get("flags") is not None else ""
    out.append(f"- {m['cpu']}{isa_text}, {m['physical_cores']} cores, {m['memory_gb']} GB{gpu}; load average "
               f"{_fmt((m.get('load_average_at_start') or [None])[0], 2)} at start, "
               f"{_fmt((m.get('load_average') or [None])[0], 2)} at end")
    return out


def plot(result: dict[str, Any], path: str | Path) -> None:
    """Grouped bars: end-to-end p50 latency per case (bucket, batch) and side; whiskers to p90."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cases = result["cases"]
    sides = list(dict.fromkeys(s for c in cases for s in c["results"]))
    labels = [f"{c['bucket']}\nbatch {c['batch']}" for c in cases]
    width = 0.8 / max(1, len(sides))
    fig, ax = plt.subplots(figsize=(max(5.0, 1.4 * len(cases) * max(1, len(sides)) / 2 + 2) + 2.2, 4.2))
    for i, side in enumerate(sides):
        xs, p50, err = [], [], []
        for j, c in enumerate(cases):
            r = c["results"].get(side)
            if r is None:
                continue
            xs.append(j + (i - (len(sides) - 1) / 2) * width)
            p50.append(r["end_to_end"]["p50_ms"] / 1e3)
            err.append((r["end_to_end"]["p90_ms"] - r["end_to_end"]["p50_ms"]) / 1e3)
        bars = ax.bar(xs, p50, width, yerr=[[0] * len(err), err], capsize=3, label=side)
        speedups = [(c.get("speedup_vs_baseline") or {}).get(side) for c in cases if side in c["results"]]
        for bar, e, sp in zip(bars, err, speedups):
            ratio = sp.get("end_to_end_p50") if isinstance(sp, dict) else None
            if ratio:
                ax.annotate(f"{ratio:.2f}x", (bar.get_x() + bar.get_width() / 2, bar.get_height() + e),
                            xytext=(0, 2), textcoords="offset points", ha="center", va="bottom", fontsize=7)
    # Sides this machine could not run natively are named, not silently absent (bench.runnable_sides).
    skipped = result.get("skipped") or {}
    handles, names = ax.get_legend_handles_labels()
    if skipped:
        from matplotlib.patches import Patch

        handles += [Patch(facecolor="none", edgecolor="grey", hatch="//") for _ in skipped]
        names += [f"{side}: skipped" for side in skipped]
        reasons = sorted({why.split(":")[0] for why in skipped.values()})
        fig.text(0.01, 0.01, "skipped: " + "; ".join(reasons), fontsize=7, color="dimgrey")
    ax.set_xticks(range(len(cases)), labels)
    ax.set_ylabel("end to end, seconds (p50, whisker p90)")
    c = result["config"]
    ax.set_title(f"SDXL base{'+refiner' if c['use_refiner'] else ''}, {c['steps']} steps: latency per bucket "
                 f"and backend", fontsize=10)
    ax.legend(handles, names, fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout(rect=(0, 0.04 if result.get("skipped") else 0, 1, 1))
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=110)
    except OSError as exc:
        raise OutputDirError(f"cannot write {path} ({exc.strerror or exc})", "pass a writable --plot FILE.png") \
            from None
    finally:
        plt.close(fig)
