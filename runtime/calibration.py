"""Calibration inputs for ``build --precision int8``: the UNets' own inputs, captured while the
pipeline runs a prompt set that ships with the package (``data/calibration_prompts.txt``).

Post-training int8 needs activation statistics from the distribution the UNet really sees:
every noise level of a sampling run, with real text conditioning and guidance batches. So the
build opens the freshly built exact fp32 engines (the ONNX Runtime twin) through the ordinary
pipeline and records the feeds of every UNet call -- base and refiner, each as it is used (the
refiner only at its low-noise steps). Nothing is fetched; prompts and seeds are fixed, so the
same artifacts always calibrate to the same samples.

The build (``engines/``, which never runs the sampling loop) is handed a :class:`UNetCalibration`
by its caller: ``sdxl-export build`` does it, and so can the Python API::

    from sdxl_export.engines.build import BuildOptions, build
    from sdxl_export.runtime import UNetCalibration
    build(BuildOptions(model="...", precision="int8"), calibration=UNetCalibration())
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

#: The UNet components whose calls are recorded.
UNETS = ("unet", "refiner_unet")


def calibration_prompts() -> list[str]:
    """The shipped prompt set (comments and blank lines dropped)."""
    text = resources.files("sdxl_export").joinpath("data/calibration_prompts.txt").read_text()
    return [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")]


class _Recorder:
    """Stands in for a UNet runner: records each call's feeds (as float32 numpy copies), then runs it."""

    def __init__(self, runner: Any, samples: list[dict[str, np.ndarray]]):
        self._runner, self.samples = runner, samples

    def __call__(self, feeds: dict[str, Any]) -> Any:
        self.samples.append({k: np.array(v.detach().cpu().numpy() if hasattr(v, "detach") else v, np.float32)
                             for k, v in feeds.items()})
        return self._runner(feeds)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._runner, name)


class UNetCalibration:
    """``calibration(artifacts, component, n) -> list of feeds``: what :func:`~sdxl_export.engines.build.build`
    calls for each UNet it quantizes.

    The first call runs images (``steps``: the model's recorded default when None; its recorded guidance;
    base then refiner as the pipeline does by default) until the base UNet has ``n`` calls, and keeps both
    UNets' calls; later calls for the same artifacts reuse them. Not shared between threads: one per build.
    """

    def __init__(self, prompts: Sequence[str] | None = None, steps: int | None = None, seed: int = 0,
                 progress: Callable[[int, int], None] | None = None):
        self.prompts = list(prompts) if prompts else calibration_prompts()
        self.steps, self.seed, self.progress = steps, int(seed), progress
        self._captured: dict[tuple[str, int], dict[str, list[dict[str, np.ndarray]]]] = {}

    def __call__(self, artifacts: str | Path, component: str, n: int) -> list[dict[str, np.ndarray]]:
        key = (str(Path(artifacts).resolve()), int(n))
        if key not in self._captured:
            self._captured[key] = self._capture(Path(artifacts), int(n))
        return self._captured[key].get(component, [])

    def _capture(self, artifacts: Path, n: int) -> dict[str, list[dict[str, np.ndarray]]]:
        from .pipeline import SDXLPipeline

        samples: dict[str, list[dict[str, np.ndarray]]] = {}
        with SDXLPipeline.from_artifacts(artifacts, backend="onnxruntime") as pipe:
            for name in UNETS:
                if name in pipe.runners:
                    samples[name] = []
                    pipe.runners[name] = _Recorder(pipe.runners[name], samples[name])
            log.info("int8 calibration: running the shipped prompts until %d UNet calls are recorded (%s)",
                     n, ", ".join(samples))
            base = samples.get("unet", next(iter(samples.values()), []))
            inpainting = pipe.unet_in_channels != pipe.latent_channels  # a 9-channel UNet: it only inpaints
            i = 0
            while len(base) < n and i < n:  # at least one UNet call per image: bounded by n images
                extra = _inpainting_inputs(pipe.native_size, self.seed + i) if inpainting else {}
                pipe(self.prompts[i % len(self.prompts)], num_inference_steps=self.steps, seed=self.seed + i,
                     output_type="latent", refiner=pipe.has_refiner, **extra)
                i += 1
                if self.progress is not None:
                    self.progress(min(len(base), n), n)
        out = {name: s[:n] for name, s in samples.items()}
        log.info("int8 calibration: %s", ", ".join(f"{k} {len(v)} UNet calls" for k, v in out.items()))
        return out


def _inpainting_inputs(size: int, seed: int) -> dict[str, Any]:
    """An image and a mask for an inpainting UNet's calibration call: smooth seeded colour fields (the
    statistics of a photo's low frequencies, not of white noise) and a rectangle of varying place and
    size to repaint."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    coarse = rng.random((8, 8, 3)) * 255
    image = Image.fromarray(coarse.astype(np.uint8), "RGB").resize((size, size), Image.BICUBIC)
    mask = np.zeros((size, size), np.uint8)
    h, w = (int(size * f) for f in rng.uniform(0.25, 0.6, 2))
    top, left = (int(rng.integers(0, size - d)) for d in (h, w))
    mask[top:top + h, left:left + w] = 255
    return {"image": image, "mask_image": Image.fromarray(mask, "L")}

