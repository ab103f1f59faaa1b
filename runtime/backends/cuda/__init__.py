"""CUDA machinery shared by the GPU backends: :mod:`.lanes` (a device stream, scratch and lock
per concurrent caller) and :mod:`.graphs` (CUDA-graph capture and replay per input signature)."""
