"""Export: model -> ONNX graphs + manifest, each graph validated against PyTorch."""

from .exporter import export_model, load_export_manifest

__all__ = ["export_model", "load_export_manifest"]
