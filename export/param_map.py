"""Where each PyTorch parameter lives in an exported ONNX graph (for run-time weight updates).

The TorchScript exporter keeps most parameters as initializers named after them, but turns a
``Linear`` on a 3-D input into ``MatMul`` with a constant-folded, transposed copy of the
weight under a generated name (``onnx::MatMul_123``). So the map is made by *value*: every
parameter (and, for matrices, its transpose) is fingerprinted while the module is in memory,
the module is freed, then the graph's initializers are read one at a time and matched.
A parameter whose value is in no initializer is ``unused`` -- the graph does not compute
with it (SDXL's first text encoder stops at the penultimate layer, so the last layer's
weights are pruned by the exporter); one whose value is in several initializers, or whose
initializer stands for several parameters, is ``shared``: a run-time update of it is refused
by name, never guessed.

Recorded in the manifest per component as ``parameters``: ``{"map": {param: [initializer,
transposed]}, "unused": [...], "shared": [...]}``.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import numpy as np
import torch

Fingerprint = tuple[str, tuple[int, ...], str]


def _digest(arr: np.ndarray) -> Fingerprint:
    a = np.ascontiguousarray(arr)
    return str(a.dtype), tuple(int(d) for d in a.shape), hashlib.blake2b(a.tobytes(), digest_size=16).hexdigest()


def fingerprint_parameters(module: torch.nn.Module) -> dict[str, tuple[Fingerprint, Fingerprint | None]]:
    """``{parameter: (fingerprint, fingerprint of its transpose or None)}``, one tensor at a time."""
    out: dict[str, tuple[Fingerprint, Fingerprint | None]] = {}
    with torch.no_grad():
        for name, p in module.named_parameters():
            arr = p.detach().cpu().numpy()
            out[name] = (_digest(arr), _digest(arr.T) if arr.ndim == 2 else None)
    return out


def match_initializers(onnx_path: Path, prints: dict[str, tuple[Fingerprint, Fingerprint | None]]) -> dict[str, Any]:
    """Match fingerprinted parameters to ``onnx_path``'s initializers (external data read per tensor)."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(onnx_path), load_external_data=False)
    by_print: dict[Fingerprint, list[str]] = {}
    for init in model.graph.initializer:
        arr = numpy_helper.to_array(init, base_dir=str(onnx_path.parent))
        by_print.setdefault(_digest(arr), []).append(init.name)
        del arr
    mapping: dict[str, list[Any]] = {}
    unused: list[str] = []
    shared: list[str] = []
    for name, (direct, transposed) in prints.items():
        hits = [(n, False) for n in by_print.get(direct, [])]
        if transposed is not None and transposed != direct:
            hits += [(n, True) for n in by_print.get(transposed, [])]
        if len(hits) > 1:  # identical values: the initializer named after the parameter, if one
            hits = [h for h in hits if h[0] == name or h[0].endswith("." + name)] or hits
        if len(hits) == 1:
            mapping[name] = [hits[0][0], hits[0][1]]
        else:
            (shared if hits else unused).append(name)
    # One initializer standing for several parameters (the exporter shares equal constants):
    # updating one of them through it would change the others too.
    users: dict[str, list[str]] = {}
    for name, (init, _) in mapping.items():
        users.setdefault(init, []).append(name)
    for names in users.values():
        if len(names) > 1:
            for name in names:
                shared.append(name)
                del mapping[name]
    return {"map": mapping, "unused": sorted(unused), "shared": sorted(shared)}


__all__ = ["fingerprint_parameters", "match_initializers"]
