"""SDXL models to export: embedded presets built from a seed, diffusers folders, hub ids."""

from .loader import ModelSource, SDXLModel, build_preset, load_model, resolve_source
from .presets import PRESETS, preset_names

__all__ = ["PRESETS", "ModelSource", "SDXLModel", "build_preset", "load_model", "preset_names", "resolve_source"]
