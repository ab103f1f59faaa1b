"""Shared ControlNet test helpers: the tiny model's seeded ControlNets and an export holding them.

Cached per test session (as fixtures.py does): the export with ControlNets is made once, as an
incremental re-export of a copy of ``tiny_artifacts`` (only ``unet_controlnet`` and the two
ControlNets are exported, validated against PyTorch).
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

_CACHE: dict[str, Any] = {}

#: Seeds of the two test ControlNets: "cn-a" (a diffusers folder) and "cn-b" (one .safetensors file).
SEED_A, SEED_B = 97, 131


def controlnet_sources(tmp_path_factory: Any) -> tuple[Path, Path]:
    """The tiny preset's seeded ControlNets as users have them: a folder and a single file."""
    if "sources" not in _CACHE:
        from sdxl_export.models.controlnet import save_preset_controlnet

        root = tmp_path_factory.mktemp("controlnets")
        a = save_preset_controlnet("tiny", root / "cn-a", seed=SEED_A)
        b = save_preset_controlnet("tiny", root / "cn-b.safetensors", single_file=True, seed=SEED_B)
        _CACHE["sources"] = (a, b)
    return _CACHE["sources"]


def controlnet_artifacts(tmp_path_factory: Any, tiny_artifacts: Path, tiny_model: Any) -> Path:
    """A copy of the tiny export that also holds cn-a and cn-b (read-only)."""
    if "artifacts" not in _CACHE:
        from sdxl_export.export import export_model

        out = tmp_path_factory.mktemp("tiny-controlnet") / "artifacts"
        shutil.copytree(tiny_artifacts, out)
        a, b = controlnet_sources(tmp_path_factory)
        result = export_model(tiny_model, out, controlnets=[str(a), str(b)])
        _CACHE["export_result"] = result
        _CACHE["artifacts"] = out
    return _CACHE["artifacts"]


def reference_controlnets(tiny_model: Any) -> dict[str, Any]:
    """The same two ControlNets as diffusers ``ControlNetModel`` objects (the oracle's)."""
    if "reference" not in _CACHE:
        from sdxl_export.models.controlnet import preset_controlnet

        _CACHE["reference"] = {"cn-a": preset_controlnet(tiny_model.unet, seed=SEED_A),
                               "cn-b": preset_controlnet(tiny_model.unet, seed=SEED_B)}
    return _CACHE["reference"]


def control_map(height: int, width: int, seed: int = 0) -> Any:
    """A deterministic edge-like control map (white lines and blocks on black, RGB PIL)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    arr = np.zeros((height, width, 3), np.uint8)
    for _ in range(6):
        y, x = rng.integers(0, height - 8), rng.integers(0, width - 8)
        arr[y:y + rng.integers(4, height // 2), x:x + 3] = 255
        arr[y:y + 3, x:x + rng.integers(4, width // 2)] = 255
    return Image.fromarray(arr)
