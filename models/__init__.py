"""SDXL models to export: embedded presets built from a seed, diffusers folders, hub ids."""

from .loader import SDXLModel, build_preset, load_model
from .presets import PRESETS, preset_names

__all__ = ["PRESETS", "SDXLModel", "build_preset", "load_model", "preset_names"]
