"""Trace one component to ONNX, clean the graph, save it, validate it in ONNX Runtime.

Exporter choice (measured on this project's 2-core CPU machines, torch 2.13, see README):
the TorchScript exporter (``dynamo=False``) exports the tiny UNet in ~3 s and the full
SDXL UNet in ~76 s; the dynamo exporter takes ~55 s / ~262 s, needs opset >= 18 and
string axis names, and trips diffusers' Upsample2D batch check with bounded dims. We use
TorchScript with ``dynamic_axes`` taken from the component spec.

Tracing bakes Python control flow. diffusers' UNet decides at trace time whether to pass
explicit upsample sizes (only when the latent size is not a multiple of 2^levels); we
trace at a latent size that is NOT such a multiple, so the graph computes upsample sizes
from tensor shapes and serves every latent size, not just the traced one's multiples.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx

from ..errors import ExportValidationError
from ..specs import ComponentSpec

if TYPE_CHECKING:  # imported where used: the exporter's up-to-date check needs no torch
    import torch

log = logging.getLogger(__name__)

#: protobuf's hard limit; above it the weights go to an external data file.
PROTOBUF_LIMIT = 2 * 1024**3
EXTERNAL_DATA_THRESHOLD = int(1.8 * 1024**3)
EXTERNAL_DATA_NAME = "model.onnx.data"
#: Tensors smaller than this stay in the graph file (as ``onnx.save_model``'s size_threshold).
INLINE_BELOW = 1024

#: 17 is the first opset with LayerNormalization (one node per norm, which TensorRT fuses);
#: 20 is the newest the TorchScript exporter writes.
MIN_OPSET, MAX_OPSET = 17, 20
DEFAULT_OPSET = 17


def trace_shape(spec: ComponentSpec, native: int) -> tuple[int, int, int]:
    """(batch, height, width) to trace at: batch 1, native size + 2 latent pixels.

    +2 latents keeps every UNet level's size odd somewhere, so upsample sizes are traced
    as shape computations (see module docstring) and >= 16x16 latents at every preset.
    """
    s = spec.vae_scale
    side = native + 2 * s if spec.kind in ("unet", "unet_controlnet", "controlnet") else native
    return 1, side, side


def export_onnx(module: torch.nn.Module, spec: ComponentSpec, path: Path, opset: int, native: int) -> None:
    """Trace ``module`` and write a cleaned, checked graph to ``path`` (+ external data if large).

    Graphs under protobuf's 2 GB limit are cleaned in memory (:func:`clean_graph`).
    Larger ones (SDXL's text_encoder_2 and UNets in fp32) keep torch's own constant
    folding and are rewritten tensor by tensor into one ``model.onnx.data``
    (:func:`consolidate_external_data`): cleaning them in memory would hold three more
    copies of the weights (~40 GB for the UNet), more than the machines we target have.
    """
    import torch

    batch, height, width = trace_shape(spec, native)
    example = spec.example_inputs(batch, height, width, seed=0)
    args = tuple(torch.from_numpy(example[n]) for n in spec.input_names)
    with tempfile.TemporaryDirectory(prefix=".trace-", dir=path.parent) as tmp:
        raw = Path(tmp) / "raw.onnx"
        with torch.no_grad():
            torch.onnx.export(
                module,
                args,
                str(raw),
                input_names=list(spec.input_names),
                output_names=list(spec.output_names),
                dynamic_axes=spec.dynamic_axes(),
                opset_version=opset,
                do_constant_folding=True,
                dynamo=False,
            )
        external = [p for p in Path(tmp).iterdir() if p != raw]
        for stale in (path, path.with_name(EXTERNAL_DATA_NAME)):
            stale.unlink(missing_ok=True)
        if external:
            log.info("%s: graph over 2 GB: writing weights to %s", spec.name, EXTERNAL_DATA_NAME)
            consolidate_external_data(raw, path)
        else:
            save_onnx(clean_graph(onnx.load(str(raw))), path)
    # The path-based checker and shape inference read the graph, not the weights: no
    # 2 GB limit, no extra copy in memory.
    onnx.checker.check_model(str(path))
    shape_infer_in_place(path)


def consolidate_external_data(raw: Path, path: Path) -> None:
    """Rewrite ``raw`` (weights in one file per tensor) as ``path`` + one ``model.onnx.data``.

    Streams one tensor at a time, so memory stays at the largest tensor. Offsets are
    aligned to 4 KiB so that readers can mmap the data file; tensors under 1 KiB (shape
    constants, which runtimes need while loading the graph) go back into the graph.
    """
    from onnx.external_data_helper import ExternalDataInfo

    model = onnx.load(str(raw), load_external_data=False)
    data_path = path.with_name(EXTERNAL_DATA_NAME)
    align = 4096
    with open(data_path, "wb") as out:
        for tensor in _all_tensors(model):
            if tensor.data_location != onnx.TensorProto.EXTERNAL:
                continue
            info = ExternalDataInfo(tensor)
            with open(raw.parent / info.location, "rb") as src:
                src.seek(int(info.offset or 0))
                blob = src.read(int(info.length)) if info.length else src.read()
            del tensor.external_data[:]
            if len(blob) < INLINE_BELOW:  # shape constants: ORT and TensorRT read them at load
                tensor.data_location = onnx.TensorProto.DEFAULT
                tensor.raw_data = blob
                continue
            offset = out.tell()
            if offset % align:
                out.write(b"\0" * (align - offset % align))
                offset = out.tell()
            out.write(blob)
            for key, value in (("location", EXTERNAL_DATA_NAME), ("offset", str(offset)), ("length", str(len(blob)))):
                entry = tensor.external_data.add()
                entry.key, entry.value = key, value
        out.flush()
        os.fsync(out.fileno())
    model.producer_name = "sdxl-export"
    onnx.save_model(model, str(path))


def _all_tensors(model: onnx.ModelProto):
    """Every tensor of the model: initializers and Constant tensors, subgraphs included."""

    def walk(graph: onnx.GraphProto):
        yield from graph.initializer
        for node in graph.node:
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.TENSOR:
                    yield attr.t
                elif attr.type == onnx.AttributeProto.GRAPH:
                    yield from walk(attr.g)
                elif attr.type == onnx.AttributeProto.GRAPHS:
                    for g in attr.graphs:
                        yield from walk(g)

    yield from walk(model.graph)


def clean_graph(model: onnx.ModelProto) -> onnx.ModelProto:
    """Constant folding, dead-node removal and topological sort (onnx-graphsurgeon).

    On top of torch's folding this turns Constant nodes into initializers and drops
    Identity nodes (the tiny UNet goes from ~4300 to ~2900 nodes).
    """
    import onnx_graphsurgeon as gs
    import onnxruntime as ort

    ort.set_default_logger_severity(3)  # folding warnings are ORT-internal chatter
    graph = gs.import_onnx(model)
    try:
        graph.fold_constants(error_ok=True)
    except Exception as exc:  # noqa: BLE001 -- folding is an optimisation, never a reason to fail
        log.debug("constant folding skipped: %s", exc)
    graph.cleanup(remove_unused_graph_inputs=False).toposort()
    out = gs.export_onnx(graph, do_type_check=False)
    out.producer_name = "sdxl-export"
    return out


def save_onnx(model: onnx.ModelProto, path: Path) -> None:
    """Save with all weights in one external file when the graph is too big for protobuf."""
    size = sum(t.ByteSize() for t in model.graph.initializer)
    if size > EXTERNAL_DATA_THRESHOLD:
        onnx.save_model(
            model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
            location=EXTERNAL_DATA_NAME, size_threshold=1024,
        )
    else:
        onnx.save_model(model, str(path))


def shape_infer_in_place(path: Path) -> None:
    """Annotate intermediate shapes (TensorRT and readers like Netron use them)."""
    try:
        onnx.shape_inference.infer_shapes_path(str(path), str(path))
    except Exception as exc:  # noqa: BLE001 -- inference gaps are not fatal: ORT/TRT infer at load
        log.debug("shape inference incomplete for %s: %s", path, exc)


def onnx_files(path: Path) -> list[Path]:
    """The graph file and its external data file, if any."""
    out = [path]
    data = path.with_name(EXTERNAL_DATA_NAME)
    if data.exists():
        out.append(data)
    return out


def reference_outputs(module: torch.nn.Module, spec: ComponentSpec, shape: tuple[int, int, int],
                      seed: int = 1) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """PyTorch fp32 outputs of ``module`` on the spec's seeded example inputs at ``shape``.

    Returns (feeds, outputs) as numpy: small next to the weights, so the exporter can free
    the module before ONNX Runtime loads the graph (:func:`compare_with_onnxruntime`).
    """
    import torch

    batch, height, width = shape
    feeds = spec.example_inputs(batch, height, width, seed=seed)
    with torch.no_grad():
        ref = module(*(torch.from_numpy(feeds[n]) for n in spec.input_names))
    return feeds, {name: r.numpy().copy() for name, r in zip(spec.output_names, ref)}


def validation_session_options() -> Any:
    """ONNX Runtime options for a one-off check of a possibly 10 GB graph: no pre-packed weight
    copies, no arena that keeps its peak, basic (semantics-preserving) graph optimisations."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = max(1, os.cpu_count() or 1)
    opts.log_severity_level = 3
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    opts.enable_cpu_mem_arena = False
    opts.add_session_config_entry("session.disable_prepacking", "1")
    return opts


def compare_with_onnxruntime(spec: ComponentSpec, path: Path, shape: tuple[int, int, int],
                             feeds: dict[str, np.ndarray], reference: dict[str, np.ndarray]) -> dict[str, Any]:
    """Run the graph at ``path`` in ONNX Runtime on ``feeds``; compare with ``reference``.

    Returns a record for the manifest; raises :class:`ExportValidationError` when an output
    misses the spec's tolerance, is not finite, or has the wrong shape.
    """
    import onnxruntime as ort

    batch, height, width = shape
    t0 = time.perf_counter()
    sess = ort.InferenceSession(str(path), validation_session_options(), providers=["CPUExecutionProvider"])
    got = dict(zip(spec.output_names, sess.run(list(spec.output_names), feeds)))
    del sess
    ort_s = time.perf_counter() - t0
    want_shapes = spec.output_shapes(batch, height, width)
    errors: dict[str, float] = {}
    ok = True
    for name in spec.output_names:
        g, r_np = got[name], reference[name]
        if tuple(g.shape) != want_shapes[name]:
            raise ExportValidationError(
                f"{spec.name}.{name}: ONNX Runtime output shape {tuple(g.shape)} != spec {want_shapes[name]}",
                "the export traced a fixed shape: report this with the model config",
            )
        err = float(np.max(np.abs(g.astype(np.float64) - r_np.astype(np.float64))))
        limit = spec.tolerance.atol + spec.tolerance.rtol * float(np.max(np.abs(r_np)))
        errors[name] = err
        ok = ok and err <= limit and bool(np.isfinite(g).all())
    record = {
        "shape": {"batch": batch, "height": height, "width": width},
        "max_abs_error": errors,
        "tolerance": {"atol": spec.tolerance.atol, "rtol": spec.tolerance.rtol},
        "passed": ok,
        "onnxruntime_seconds": round(ort_s, 3),
    }
    if not ok:
        raise ExportValidationError(
            f"{spec.name}: ONNX Runtime disagrees with PyTorch at {batch}x{height}x{width}: "
            f"max abs errors {errors}, tolerance {spec.tolerance}",
            "try another --opset; if it persists, report it with the model config",
        )
    return record


def validate(
    module: torch.nn.Module, spec: ComponentSpec, path: Path, shape: tuple[int, int, int], seed: int = 1
) -> dict[str, Any]:
    """Run PyTorch (fp32) and then ONNX Runtime on the same inputs; compare every output."""
    feeds, reference = reference_outputs(module, spec, shape, seed)
    return compare_with_onnxruntime(spec, path, shape, feeds, reference)
