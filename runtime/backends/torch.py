"""The PyTorch reference backend: each component's torch module, loaded from the artifacts.

Why it exists: it is the ground truth the ONNX Runtime and TensorRT backends are held
to (eager fp32 on CPU is exactly what diffusers computes), and on a GPU it is a fast
baseline with optional fp16/bf16 and CUDA-graph replay.

It reads only the artifact folder, never the exporter's objects: the weights are the
``torch/<module>`` folders the export writes with ``save_pretrained`` (safetensors), the
class comes from the manifest's ``assets["torch/<module>"]["class_name"]``, and the module
is wrapped by :mod:`sdxl_export.models.wrappers` so that it takes and returns exactly the
component spec's tensors. An export made with ``--no-torch-weights`` has no such folders:
opening a component then raises :class:`MissingComponentError`.

Options (``ComponentContext.options``):

``dtype``
    ``"float32"`` (default), ``"float16"`` or ``"bfloat16"``; CUDA only. The VAE always
    runs in float32 (SDXL's VAE overflows in fp16). Inputs and outputs stay in the spec
    dtype (float32): floating inputs are cast to the compute dtype inside the runner and
    outputs cast back, except the UNet's ``timestep``, which stays float32 as diffusers
    passes it.
``cuda_graphs``
    ``True`` to capture each call in a CUDA graph per input shape and replay it
    (:class:`~sdxl_export.runtime.backends.cuda.graphs.GraphCache`); CUDA only. Outputs are clones.
``max_graphs``
    How many shapes keep a captured graph (least recently used evicted), default 8.
``verify``
    ``True`` hashes the weight files against the manifest's sha256 on open (seconds per
    GB); the default only checks that every listed file exists, as the artifact reader does.
``synchronize``
    ``True`` (default on CUDA) waits for the GPU before returning, so that the pipeline's
    per-stage timings are device times like the other backends'; ``False`` returns as soon
    as the work is queued (outputs are still correct: later CUDA work on the same stream
    is ordered after it).

Inputs may be on any device; they are moved to the runner's device. Outputs are on the
runner's device, in the spec dtype, and are ordinary tensors (not inference tensors).
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from ...artifacts import EXPORT_MANIFEST, FORMAT_EXPORT, read_manifest, verify_files
from ...errors import (
    ArtifactError,
    BackendUnavailableError,
    InvalidRequestError,
    MissingComponentError,
    WeightMismatchError,
)
from .base import ComponentRunner, RunnerClosedError
from .cuda.graphs import DEFAULT_MAX_GRAPHS, GraphCache
from .registry import ComponentContext

log = logging.getLogger(__name__)

#: component -> the torch module folder (``artifacts/torch/<module>``) its weights live in.
COMPONENT_MODULE = {
    "text_encoder": "text_encoder",
    "text_encoder_2": "text_encoder_2",
    "unet": "unet",
    "refiner_unet": "refiner_unet",
    "vae_decoder": "vae",
    "vae_encoder": "vae",
}

#: class_name recorded in the manifest -> the library that defines it. Only these are loaded:
#: a manifest cannot make the runtime import an arbitrary class.
MODULE_CLASSES = {
    "CLIPTextModel": "transformers",
    "CLIPTextModelWithProjection": "transformers",
    "UNet2DConditionModel": "diffusers",
    "AutoencoderKL": "diffusers",
    "ControlNetModel": "diffusers",
}


def module_of(component: str) -> str | None:
    """The torch/ folder of a component (ControlNets: ``unet_controlnet`` is the UNet's weights,
    ``controlnet_<name>`` its own folder); None when the torch backend cannot run it."""
    if component == "unet_controlnet":
        return "unet"
    if component.startswith("controlnet_"):
        return component
    return COMPONENT_MODULE.get(component)

def module_class(class_name: Any, where: Path) -> Any:
    """The torch module class a manifest names, from :data:`MODULE_CLASSES` only."""
    library = MODULE_CLASSES.get(str(class_name))
    if library is None:
        raise ArtifactError(
            f"{where}: the manifest records class {class_name!r}, which sdxl-export does not load",
            f"re-export with this sdxl-export (it loads {sorted(MODULE_CLASSES)})",
        )
    return getattr(importlib.import_module(library), str(class_name))


DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}

#: Inputs that keep the spec dtype when the module computes in fp16/bf16 (as diffusers does).
KEEP_FP32_INPUTS = frozenset({"timestep"})

KNOWN_OPTIONS = frozenset({"dtype", "cuda_graphs", "max_graphs", "verify", "synchronize"})
#: Options the pipeline passes to every backend that belong to another one (ignored here).
FOREIGN_OPTIONS = frozenset({"session_options"})


def available() -> tuple[bool, str]:
    """Always available; says whether a CUDA device is there."""
    if torch.cuda.is_available():
        return True, f"torch {torch.__version__}: cuda ({torch.cuda.get_device_name(0)})"
    return True, f"torch {torch.__version__}: cpu"


def create(ctx: ComponentContext) -> TorchRunner:
    """A (closed) runner for ``ctx.name``; ``open()`` loads the weights."""
    return TorchRunner(ctx)


class TorchRunner(ComponentRunner):
    """One component as a PyTorch module, eager or replayed from CUDA graphs."""

    backend = "torch"
    weight_keys = "torch"

    def __init__(self, ctx: ComponentContext):
        super().__init__(ctx.spec)
        self.ctx = ctx
        if ctx.options.get("session_options"):
            log.warning("%s: session_options are ONNX Runtime settings; the torch backend ignores them", ctx.name)
        unknown = set(ctx.options) - KNOWN_OPTIONS - FOREIGN_OPTIONS
        if unknown:
            raise InvalidRequestError(
                f"unknown torch backend option(s) {sorted(unknown)}",
                f"use only {sorted(KNOWN_OPTIONS)}",
            )
        if module_of(ctx.name) is None:
            raise InvalidRequestError(
                f"the torch backend has no module for component {ctx.name!r}",
                f"use one of {sorted(COMPONENT_MODULE)}",
            )
        self.device = _device(ctx.device)
        dtype_name = str(ctx.options.get("dtype", "float32"))
        if dtype_name not in DTYPES:
            raise InvalidRequestError(f"unknown dtype {dtype_name!r}", f"use one of {sorted(DTYPES)}")
        if self.device.type != "cuda" and dtype_name != "float32":
            raise InvalidRequestError(
                f"dtype {dtype_name} needs a CUDA device (the CPU backend is the fp32 reference)",
                "pass device='cuda' or drop the dtype option",
            )
        self.module_name = str(module_of(ctx.name))
        # SDXL's VAE overflows in fp16 (NaN / black images): it always computes in float32.
        self.compute_dtype = torch.float32 if self.module_name == "vae" else DTYPES[dtype_name]
        use_graphs = bool(ctx.options.get("cuda_graphs", False))
        if use_graphs and self.device.type != "cuda":
            raise InvalidRequestError(
                "cuda_graphs needs a CUDA device", "pass device='cuda' or drop the cuda_graphs option"
            )
        self.verify = bool(ctx.options.get("verify", False))
        self.synchronize = self.device.type == "cuda" and bool(ctx.options.get("synchronize", True))
        self.graphs = GraphCache(
            name=f"{ctx.name}(torch)",
            enabled=use_graphs,
            max_graphs=int(ctx.options.get("max_graphs", DEFAULT_MAX_GRAPHS)),
        )
        self._module: torch.nn.Module | None = None
        self._params: dict[str, torch.nn.Parameter] = {}

    # ---- lifecycle --------------------------------------------------------------------------
    def _open_impl(self) -> None:
        cls, folder = self._weights()
        log.info("%s: loading %s from %s (%s, %s%s)", self.spec.name, cls.__name__, folder, self.device,
                 str(self.compute_dtype).replace("torch.", ""), ", cuda graphs" if self.graphs.enabled else "")
        # Load straight into the compute dtype (diffusers keeps its fp32-only modules that way);
        # the two libraries spell the argument differently.
        dtype_kw = "torch_dtype" if cls.__module__.startswith("diffusers") else "dtype"
        model = cls.from_pretrained(str(folder), use_safetensors=True, **{dtype_kw: self.compute_dtype})
        model = model.to(device=self.device).eval()
        model.requires_grad_(False)
        self._module = _wrap(self.spec.name, model).eval()
        self._params = dict(model.named_parameters())

    def set_weights(self, weights: Mapping[str, torch.Tensor]) -> None:
        """Copy ``weights`` (parameter names of the module) in place into the loaded parameters.

        In place on purpose: captured CUDA graphs read the parameters' storage, so they stay
        valid and replay the new weights. Every name and shape is checked before any copy.
        """
        if self._module is None:
            raise RunnerClosedError(f"{self.spec.name} (torch) is not open", "call open() first")
        params = self._params
        for name, value in weights.items():
            p = params.get(name)
            if p is None:
                raise WeightMismatchError(f"{self.spec.name} (torch) has no parameter {name!r}",
                                          "pass parameter names of the component's torch module")
            if tuple(p.shape) != tuple(value.shape):
                raise WeightMismatchError(
                    f"{self.spec.name} (torch): {name} is {tuple(p.shape)}, the update is {tuple(value.shape)}",
                    "pass weights of the model this export was made from")
        with torch.no_grad():
            for name, value in weights.items():
                params[name].copy_(value.to(device=params[name].device, dtype=params[name].dtype))
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _close_impl(self) -> None:
        self.graphs.clear()
        self._module = None
        self._params = {}
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def _weights(self) -> tuple[Any, Path]:
        """The class and folder of this component's weights, checked against the manifest."""
        root = Path(self.ctx.artifacts)
        manifest = read_manifest(root / EXPORT_MANIFEST, FORMAT_EXPORT, f"sdxl-export export --out {root}")
        asset_name = f"torch/{self.module_name}"
        asset = manifest.get("assets", {}).get(asset_name)
        if asset is None:
            raise MissingComponentError(
                f"{root} has no PyTorch weights for {self.spec.name} ({asset_name}): "
                "it was exported with --no-torch-weights",
                f"re-export without --no-torch-weights (sdxl-export export --out {root}), "
                "or use --backend onnxruntime",
            )
        cls = module_class(asset.get("class_name"), root / asset_name)
        folder = root / asset.get("dir", asset_name)
        files = asset.get("files", {})
        if not folder.is_dir() or not files:
            raise MissingComponentError(
                f"{folder} (PyTorch weights of {self.spec.name}) is missing",
                f"re-export into {root} to rewrite it",
            )
        if self.verify:
            verify_files(root, files, f"PyTorch weights of {self.spec.name}")
        else:
            for rel in files:
                if not (root / rel).is_file():
                    raise MissingComponentError(f"{root / rel} is missing", f"re-export into {root} to rewrite it")
        return cls, folder

    @property
    def description(self) -> dict[str, Any]:
        return {
            **super().description,
            "device": str(self.device),
            "dtype": str(self.compute_dtype).replace("torch.", ""),
            "cuda_graphs": self.graphs.enabled,
            "graphs": self.graphs.stats.as_dict() if self.graphs.enabled else None,
        }

    # ---- calls --------------------------------------------------------------------------------
    def _run(self, feeds: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        on_device = {n: t.to(self.device, non_blocking=True) for n, t in feeds.items()}
        outputs = self.graphs.run(on_device, self._forward)
        if self.synchronize:
            torch.cuda.synchronize(self.device)
        if self.graphs.enabled:
            return outputs  # clones made by the cache, outside inference mode
        # Eager outputs were made in inference mode; hand out ordinary tensors, like the other
        # backends, so a caller may update them in place.
        return {n: t.clone() if t.is_inference() else t for n, t in outputs.items()}

    def _forward(self, feeds: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Spec inputs -> spec outputs; capturable (no host sync) for CUDA graphs."""
        module = self._module
        if module is None:  # closed between the check in __call__ and here
            raise RunnerClosedError(f"{self.spec.name} (torch) was closed during the call", "open() the runner again")
        with torch.inference_mode():
            args = [self._to_compute(name, feeds[name]) for name in self.spec.input_names]
            raw = module(*args)
            out: dict[str, torch.Tensor] = {}
            for t_spec, value in zip(self.spec.outputs, raw):
                want = DTYPES[t_spec.dtype]
                out[t_spec.name] = value if value.dtype == want else value.to(want)
            return out

    def _to_compute(self, name: str, t: torch.Tensor) -> torch.Tensor:
        if t.is_floating_point() and t.dtype != self.compute_dtype and name not in KEEP_FP32_INPUTS:
            return t.to(self.compute_dtype)
        return t


def _device(name: str) -> torch.device:
    try:
        dev = torch.device(name)
    except (RuntimeError, TypeError):
        raise InvalidRequestError(f"unknown device {name!r}", "use 'cpu', 'cuda' or 'cuda:N'") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise BackendUnavailableError(
                f"device {name!r} requested but torch sees no CUDA GPU (torch {torch.__version__})",
                "use device='cpu', or install a CUDA build of torch on a GPU machine",
            )
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise BackendUnavailableError(
                f"device {name!r} requested but only {torch.cuda.device_count()} CUDA device(s) exist",
                "pick an existing device index",
            )
    elif dev.type != "cpu":
        raise InvalidRequestError(f"the torch backend runs on cpu or cuda, not {name!r}", "use 'cpu' or 'cuda'")
    return dev


def _wrap(component: str, model: torch.nn.Module) -> torch.nn.Module:
    """The spec-shaped wrapper of ``model`` for ``component`` (same wrappers the exporter traces)."""
    from ...models.wrappers import TextEncoderWrapper, UNetWrapper, VAEDecoderWrapper, VAEEncoderWrapper

    if component == "text_encoder":
        return TextEncoderWrapper(model, pooled=False)
    if component == "text_encoder_2":
        return TextEncoderWrapper(model, pooled=True)
    if component in ("unet", "refiner_unet"):
        return UNetWrapper(model)
    if component == "unet_controlnet" or component.startswith("controlnet_"):
        from ...models.wrappers import wrap_module

        return wrap_module(component, model)
    if component == "vae_decoder":
        return VAEDecoderWrapper(model)
    return VAEEncoderWrapper(model)


__all__ = ["COMPONENT_MODULE", "TorchRunner", "available", "create"]
