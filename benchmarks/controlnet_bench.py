"""What one ControlNet costs per base step, ours (ONNX Runtime) and diffusers' (PyTorch), same run.

Four timings of one base denoising step at the same inputs (batch 2 under guidance), interleaved
round-robin so machine load lands on all of them alike, median of ``--rounds``:

``ours plain``        the ``unet`` graph (what a call without ControlNet runs; the export with a
                      ControlNet leaves this graph byte-identical)
``ours controlnet``   ``controlnet_<name>`` + ``unet_controlnet`` (residual inputs)
``diffusers plain``   ``UNet2DConditionModel`` eager fp32
``diffusers controlnet``  ``ControlNetModel`` + the UNet with residuals, eager fp32

plus, from the export manifest, the export time and ONNX size a ControlNet adds. JSON + table.

    python -m sdxl_export.benchmarks.controlnet_bench --artifacts DIR --size 512x512 --rounds 5 \\
        --json controlnet_step.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

import torch


def _load_torch(arts: Path, name: str) -> Any:
    from diffusers import ControlNetModel, UNet2DConditionModel

    cls = ControlNetModel if name.startswith("controlnet_") else UNet2DConditionModel
    return cls.from_pretrained(str(arts / "torch" / name)).eval()


def bench(artifacts: str | Path, size: tuple[int, int], rounds: int = 5, controlnet: str | None = None,
          threads: int | None = None) -> dict[str, Any]:
    from ..runtime.artifact_reader import read_artifacts
    from ..runtime.backends import ComponentContext, create_runner
    from ..runtime.controlnet import component_names

    if threads:
        torch.set_num_threads(threads)
    arts = read_artifacts(artifacts, with_refiner=False)
    names = component_names(list(arts.components))
    if not names:
        from ..errors import MissingComponentError

        raise MissingComponentError(f"{artifacts} holds no ControlNet", "export or build it with --controlnet first")
    cn = f"controlnet_{controlnet}" if controlnet else names[1]
    h, w = size
    runners = {}
    for n in ("unet", "unet_controlnet", cn):
        ctx = ComponentContext(artifacts=arts.root, name=n, spec=arts.specs[n], export_entry=arts.component(n),
                               device="cpu")
        runners[n] = create_runner("onnxruntime", ctx).open()
    feeds = {k: torch.from_numpy(v) for k, v in arts.specs[cn].example_inputs(2, h, w, seed=0).items()}
    plain_feeds = {k: feeds[k] for k in arts.specs["unet"].input_names}
    t_unet, t_cn = _load_torch(arts.root, "unet"), _load_torch(arts.root, cn)

    def ours_plain() -> Any:
        return runners["unet"](plain_feeds)

    def ours_cn() -> Any:
        res = runners[cn](feeds)
        return runners["unet_controlnet"]({**plain_feeds, **res})

    added = {"text_embeds": feeds["text_embeds"], "time_ids": feeds["time_ids"]}

    def diff_plain() -> Any:
        with torch.no_grad():
            return t_unet(feeds["sample"], feeds["timestep"], encoder_hidden_states=feeds["encoder_hidden_states"],
                          added_cond_kwargs=added, return_dict=False)

    def diff_cn() -> Any:
        with torch.no_grad():
            down, mid = t_cn(feeds["sample"], feeds["timestep"], encoder_hidden_states=feeds["encoder_hidden_states"],
                             controlnet_cond=feeds["controlnet_cond"], conditioning_scale=1.0,
                             added_cond_kwargs=added, return_dict=False)
            return t_unet(feeds["sample"], feeds["timestep"], encoder_hidden_states=feeds["encoder_hidden_states"],
                          added_cond_kwargs=added, down_block_additional_residuals=down,
                          mid_block_additional_residual=mid, return_dict=False)

    cases = {"ours plain": ours_plain, "ours controlnet": ours_cn, "diffusers plain": diff_plain,
             "diffusers controlnet": diff_cn}
    for f in cases.values():  # warm-up
        f()
    times: dict[str, list[float]] = {k: [] for k in cases}
    for _ in range(rounds):
        for k, f in cases.items():
            t0 = time.perf_counter()
            f()
            times[k].append(time.perf_counter() - t0)
    for r in runners.values():
        r.close()
    med = {k: statistics.median(v) * 1000 for k, v in times.items()}
    comps = arts.manifest["components"]

    store = arts.engine_store

    def cost(n: str) -> dict[str, Any]:
        c = comps[n]
        out = {"size_bytes": c.get("size_bytes"), "export_seconds": c.get("export_seconds"),
               "validation_seconds": (c.get("validation") or {}).get("seconds")}
        entry = getattr(store, "entries", {}).get(n) if store is not None else None
        if entry is not None:  # the engine build (TensorRT plan or ORT twin)
            size = sum((arts.root / rel).stat().st_size for rel in entry.files if (arts.root / rel).is_file())
            out.update(engine_backend=entry.backend, engine_seconds=entry.build_seconds, engine_bytes=size)
        return out

    return {"artifacts": str(arts.root), "size": f"{h}x{w}", "batch": 2, "rounds": rounds,
            "threads": torch.get_num_threads(), "controlnet": cn, "median_ms": med,
            "controlnet_overhead": {"ours": med["ours controlnet"] / med["ours plain"],
                                    "diffusers": med["diffusers controlnet"] / med["diffusers plain"]},
            "speedup_vs_diffusers": {"plain": med["diffusers plain"] / med["ours plain"],
                                     "controlnet": med["diffusers controlnet"] / med["ours controlnet"]},
            "added_by_controlnet": {"unet_controlnet": cost("unet_controlnet"), cn: cost(cn)}}


def table(r: dict[str, Any]) -> str:
    title = (f"ControlNet step benchmark ({r['size']}, batch {r['batch']}, {r['rounds']} rounds, "
             f"{r['threads']} torch threads)")
    lines = [title, "", "| step | median ms |", "|---|---|"]
    lines += [f"| {k} | {v:.1f} |" for k, v in r["median_ms"].items()]
    o, s = r["controlnet_overhead"], r["speedup_vs_diffusers"]
    lines += ["", f"ControlNet step / plain step: ours {o['ours']:.2f}x, diffusers {o['diffusers']:.2f}x",
              f"ours vs diffusers: plain {s['plain']:.2f}x faster, with ControlNet {s['controlnet']:.2f}x faster", ""]
    for n, c in r["added_by_controlnet"].items():
        eng = (f"; {c['engine_backend']} engine {c['engine_bytes'] / 2**20:.1f} MiB, built in "
               f"{c['engine_seconds']} s" if "engine_backend" in c else "")
        lines.append(f"{n}: {c['size_bytes'] / 2**20:.1f} MiB ONNX, export {c['export_seconds']} s, "
                     f"validation {c['validation_seconds']} s{eng}")
    return "\n".join(lines)


def cmd(args: Any) -> int:
    """``sdxl-export bench --artifacts DIR --controlnet [NAME]``."""
    from ..errors import InvalidRequestError

    if args.artifacts is None:
        raise InvalidRequestError("bench --controlnet measures an export", "pass --artifacts DIR (built with "
                                  "--controlnet)")
    size = (args.buckets or "256x256").split(",")[0]
    h, w = (int(x) for x in size.lower().split("x"))
    r = bench(args.artifacts, (h, w), args.runs or 5, args.controlnet or None, args.torch_threads)
    if args.json:
        Path(args.json).write_text(json.dumps(r, indent=2) + "\n")
    print(table(r))
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    p.add_argument("--artifacts", required=True)
    p.add_argument("--size", default="256x256")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--controlnet", default=None)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", type=Path, default=None)
    a = p.parse_args(argv)
    h, w = (int(x) for x in a.size.lower().split("x"))
    r = bench(a.artifacts, (h, w), a.rounds, a.controlnet, a.threads)
    if a.json:
        a.json.write_text(json.dumps(r, indent=2) + "\n")
    print(table(r))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
