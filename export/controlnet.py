"""ControlNets in an export: one ``controlnet_<name>`` graph each, plus ``unet_controlnet``.

``unet_controlnet`` is the base UNet that also takes the residuals (diffusers'
``down_block_additional_residuals`` / ``mid_block_additional_residual``). It is a second graph
of the same weights, exported only when at least one ControlNet is, so the plain ``unet`` graph
-- and every step without ControlNet -- stays exactly what it was (measured in docs/controlnet.md).

The ControlNets passed are the ControlNets the export holds (as ``--lora``: the arguments say
what the folder contains); each has its own incremental key (its weights' fingerprint, the
spec, opset, versions), so adding one to an existing export exports only it (and
``unet_controlnet`` the first time), and dropping one removes its graph.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..models.controlnet import (
    ControlNetSource,
    ControlNetSourceError,
    load_controlnet,
    read_config,
    residual_layout,
    resolve_controlnet,
)
from ..specs import controlnet_spec, unet_controlnet_spec

log = logging.getLogger(__name__)

#: part name of a ControlNet's weights in the plan (``controlnet:<name>``)
PART_PREFIX = "controlnet:"


def add_to_plan(plan: Any, controlnets: Sequence[str | Path], key: Any, asset_key: Any) -> None:
    """Add ``unet_controlnet`` and one ``controlnet_<name>`` per source to an ExportPlan (checked first).

    ``key(name, part_fingerprint, spec)`` computes a component's incremental key the way the plan
    does for the base components.
    """
    plan.controlnets = {}
    if not controlnets:
        return
    sources: dict[str, ControlNetSource] = {}
    for arg in controlnets:
        src = resolve_controlnet(arg)
        if src.name in sources:
            raise ControlNetSourceError(f"two ControlNets are named {src.name!r}",
                                        "rename one folder/file (the name is its stem)")
        sources[src.name] = src
    unet_cfg = plan.source.part_config("unet")
    levels, mid = residual_layout(unet_cfg)
    plan.specs["unet_controlnet"] = unet_controlnet_spec(plan.dims, levels, mid)
    # Its own load of the UNet ("unet#controlnet"), not a second use of the plain UNet's: each is
    # dropped before ONNX Runtime validates its graph, so the peak stays one UNet + one session
    # (sharing the module would hold it across the refiner's and VAE's exports).
    plan.parts["unet_controlnet"] = "unet#controlnet"
    plan.component_keys["unet_controlnet"] = key("unet_controlnet", plan.source.fingerprints["unet"],
                                                 plan.specs["unet_controlnet"], "unet")
    for name, src in sources.items():
        cfg = read_config(src, unet_cfg)
        cond = int(cfg.get("conditioning_channels", 3))
        spec = controlnet_spec(src.component, plan.dims, levels, mid, cond_channels=cond, config={
            "controlnet": name, "global_pool_conditions": bool(cfg.get("global_pool_conditions", False))})
        plan.specs[src.component] = spec
        plan.parts[src.component] = PART_PREFIX + name
        plan.component_keys[src.component] = key(src.component, src.fingerprint, spec, None)
        plan.controlnets[name] = src
        if "torch/unet" in plan.asset_parts:  # the reference (torch) backend's weights
            plan.asset_parts[f"torch/{src.component}"] = PART_PREFIX + name
            plan.asset_keys[f"torch/{src.component}"] = asset_key(f"torch/{src.component}", src.fingerprint)
    log.info("ControlNets in this export: %s", ", ".join(sources))


def load_part(plan: Any, part: str, base_unet: Any = None) -> Any:
    """The ControlNet module of part ``controlnet:<name>``."""
    src = plan.controlnets[part[len(PART_PREFIX):]]
    return load_controlnet(src, plan.source.part_config("unet"),
                           unet=base_unet if src.kind == "preset" else None)


def records(plan: Any) -> dict[str, Any]:
    """The manifest's ``controlnets``: name -> component and source."""
    return {n: {"component": s.component, **s.describe()} for n, s in (getattr(plan, "controlnets", None) or {}).items()}
