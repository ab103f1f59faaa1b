"""Build one TensorRT plan per component through Polygraphy's loaders.

The chain is ``NetworkFromOnnxPath`` (ONNX parser with TensorRT's native InstanceNorm,
required for hardware/version-compatible plans and the plugin-free path) ->
``CreateConfig`` (precision flags, the planned profiles, timing cache, builder
optimization level, refit, hardware/version compatibility, workspace limit, profiling verbosity
``LAYER_NAMES_ONLY``) -> ``EngineBytesFromNetwork``; we write TensorRT's host buffer
ourselves with :func:`~sdxl_export.artifacts.atomic_write_bytes` (no second host copy of a
multi-GB plan) rather than ``SaveEngine`` so a killed build never leaves a truncated plan
under the final name. The fresh plan is then deserialized once, its profile count checked,
and every profile run against the ONNX in ONNX Runtime (:mod:`.trt_accuracy`).

Refittable plans (``--refittable``): polygraphy's ``CreateConfig(refittable=True)`` sets
``BuilderFlag.REFIT``, so every weight stays refittable and
:meth:`~sdxl_export.runtime.backends.tensorrt.runner.TensorRTRunner.set_weights` can switch LoRAs at
run time through ``trt.Refitter`` without a rebuild. Off by default: TensorRT cannot
constant-fold or pre-fuse weights it must be able to replace, so such a plan may be a little
slower. The related flags are deliberately not offered:

* ``REFIT_IDENTICAL`` -- TensorRT's documentation: "Different weights during refits yield
  unpredictable behavior"; it exists to refit a stripped plan with the *same* weights it was
  built with, which is the opposite of switching LoRAs.
* ``STRIP_PLAN`` (weight-stripped plans, refitted with all weights at every load) -- saves
  disk, but every ``open`` would have to read every initializer of the ONNX and refit the
  whole engine (seconds and a full host copy per component), and the build's accuracy check
  would need that refit first. Worth it only to ship plans without weights; not needed here.
* ``REFIT_INDIVIDUAL`` (only weights marked refittable) -- would keep folding on weights no
  LoRA touches, but needs ``mark_weights_refittable`` per name on the parsed network, i.e.
  knowing every LoRA target at build time.

Version-compatible plans embed TensorRT's lean runtime (no ``EXCLUDE_LEAN_RUNTIME``), so a
later TensorRT loads them with ``engine_host_code_allowed``
(:func:`sdxl_export.tensorrt_env.deserialize_engine`).

Polygraphy's loader objects are lazy: constructing them needs neither TensorRT nor a
GPU, so :func:`network_loader`, :func:`polygraphy_profiles` and :func:`create_config`
are tested on CPU. Only values that are TensorRT enums (parser flags, hardware
compatibility level, memory pool type) need the real module; they are resolved by name
in :func:`resolve_enums` when ``trt`` is given.

Precision: the ONNX graphs are fp32; ``fp16``/``bf16`` set ``BuilderFlag.FP16``/``BF16``
on a weakly typed network (TensorRT 10.12 deprecates these in favour of strongly typed
networks, which would need an fp16 export), plus ``TF32``. ``fp32`` still allows TF32
(TensorRT's default), as SDXL's VAE is built unless ``--vae-precision`` says otherwise:
its fp16 decode overflows.

This module is type-checked with mypy against ``tensorrt-stubs``
(``tests/test_engines_typecheck.py``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..artifacts import atomic_write_bytes
from ..errors import BackendUnavailableError, SDXLExportError
from ..specs import ComponentSpec
from ..tensorrt_env import deserialize_engine, load_tensorrt
from .planner import PlannedProfile

if TYPE_CHECKING:  # pragma: no cover
    import tensorrt as trt

log = logging.getLogger(__name__)

PRECISIONS = ("fp32", "fp16", "bf16")
HARDWARE_COMPAT = {
    "none": "NONE",
    "ampere_plus": "AMPERE_PLUS",
    "same_compute_capability": "SAME_COMPUTE_CAPABILITY",
}
#: TensorRT's builder optimization levels (default 3, maximum 5 in TensorRT 10).
MIN_OPT_LEVEL, MAX_OPT_LEVEL, DEFAULT_OPT_LEVEL = 0, 5, 3


class EngineBuildError(SDXLExportError):
    """TensorRT failed to parse the ONNX graph or to build the plan."""


@dataclass(frozen=True)
class TrtSettings:
    """Everything that changes what TensorRT builds for one component (part of its key)."""

    precision: str = "fp32"
    tf32: bool = True
    builder_optimization_level: int = DEFAULT_OPT_LEVEL
    hardware_compatibility: str = "none"
    version_compatible: bool = False
    workspace_gb: float | None = None
    native_instancenorm: bool = True
    #: ``BuilderFlag.REFIT`` (``--refittable``): weights replaceable at run time (LoRA switching)
    refittable: bool = False

    def __post_init__(self) -> None:
        from ..errors import InvalidRequestError

        if self.precision not in PRECISIONS:
            raise InvalidRequestError(f"unknown precision {self.precision!r}", f"use one of {PRECISIONS}")
        if self.hardware_compatibility not in HARDWARE_COMPAT:
            raise InvalidRequestError(
                f"unknown hardware compatibility {self.hardware_compatibility!r}",
                f"use one of {', '.join(HARDWARE_COMPAT)}",
            )
        if not MIN_OPT_LEVEL <= self.builder_optimization_level <= MAX_OPT_LEVEL:
            raise InvalidRequestError(
                f"builder optimization level {self.builder_optimization_level} is outside "
                f"{MIN_OPT_LEVEL}..{MAX_OPT_LEVEL}", "pass --builder-optimization-level 0..5 (default 3)",
            )
        if self.workspace_gb is not None and self.workspace_gb <= 0:
            raise InvalidRequestError(f"workspace {self.workspace_gb} GB is not positive", "pass --workspace GB > 0")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ---- polygraphy objects (no TensorRT needed to construct) -------------------------------------------
def polygraphy_profiles(profiles: Sequence[PlannedProfile]) -> list[Any]:
    """One ``polygraphy.backend.trt.Profile`` per planned profile, inputs in spec order."""
    from polygraphy.backend.trt import Profile

    out = []
    for p in profiles:
        prof = Profile()
        for name, (lo, opt, hi) in p.shapes.items():
            prof.add(name, min=list(lo), opt=list(opt), max=list(hi))
        out.append(prof)
    return out


def enum_names(settings: TrtSettings) -> dict[str, Any]:
    """The TensorRT enum members ``settings`` needs, by name (resolved by :func:`resolve_enums`)."""
    out: dict[str, Any] = {"hardware_compatibility_level": HARDWARE_COMPAT[settings.hardware_compatibility],
                           "profiling_verbosity": "LAYER_NAMES_ONLY"}
    if settings.native_instancenorm:
        out["parser_flags"] = ["NATIVE_INSTANCENORM"]
    if settings.workspace_gb is not None:
        out["memory_pool_limits"] = {"WORKSPACE": int(settings.workspace_gb * 1024**3)}
    return out


def resolve_enums(settings: TrtSettings) -> dict[str, Any]:
    """:func:`enum_names` with TensorRT enum members instead of names (needs TensorRT)."""
    load_tensorrt()
    import tensorrt as trt

    names = enum_names(settings)
    hw: trt.HardwareCompatibilityLevel = trt.HardwareCompatibilityLevel.__members__[
        names["hardware_compatibility_level"]
    ]
    verbosity: trt.ProfilingVerbosity = trt.ProfilingVerbosity.__members__[names["profiling_verbosity"]]
    out: dict[str, Any] = {"hardware_compatibility_level": hw, "profiling_verbosity": verbosity}
    if "parser_flags" in names:
        flags: list[trt.OnnxParserFlag] = [trt.OnnxParserFlag.__members__[n] for n in names["parser_flags"]]
        out["parser_flags"] = flags
    if "memory_pool_limits" in names:
        pools: dict[trt.MemoryPoolType, int] = {
            trt.MemoryPoolType.__members__[k]: int(v) for k, v in names["memory_pool_limits"].items()
        }
        out["memory_pool_limits"] = pools
    return out


def network_loader(onnx_path: str | Path, settings: TrtSettings, *, with_trt: bool = False) -> Any:
    """``NetworkFromOnnxPath`` with native InstanceNorm (TensorRT 10's default; the flag is
    set explicitly ``with_trt``, and the plugin path is never forced)."""
    from polygraphy.backend.trt import NetworkFromOnnxPath

    flags = resolve_enums(settings).get("parser_flags") if with_trt else None
    return NetworkFromOnnxPath(str(onnx_path), flags=flags, plugin_instancenorm=not settings.native_instancenorm)


def create_config(
    settings: TrtSettings, profiles: Sequence[PlannedProfile], *, timing_cache: str | Path | None = None,
    with_trt: bool = False,
) -> Any:
    """Polygraphy ``CreateConfig`` for ``settings`` and the planned ``profiles``.

    Without ``with_trt`` only settings that need no TensorRT enum are allowed (the default
    hardware compatibility and no workspace limit); that is what CPU tests construct.
    """
    from polygraphy.backend.trt import CreateConfig

    kwargs: dict[str, Any] = {}
    if with_trt:
        enums = resolve_enums(settings)
        kwargs["hardware_compatibility_level"] = enums["hardware_compatibility_level"]
        kwargs["profiling_verbosity"] = enums["profiling_verbosity"]
        if "memory_pool_limits" in enums:
            kwargs["memory_pool_limits"] = enums["memory_pool_limits"]
    elif settings.hardware_compatibility != "none" or settings.workspace_gb is not None:
        raise BackendUnavailableError("hardware compatibility and workspace limits need TensorRT",
                                      "pip install tensorrt, or drop those options")
    return CreateConfig(
        tf32=settings.tf32 or settings.precision != "fp32",
        fp16=settings.precision == "fp16",
        bf16=settings.precision == "bf16",
        profiles=polygraphy_profiles(profiles),
        load_timing_cache=str(timing_cache) if timing_cache else None,
        builder_optimization_level=settings.builder_optimization_level,
        version_compatible=settings.version_compatible or None,
        refittable=settings.refittable,
        # The embedded lean runtime is what lets a later TensorRT run the plan: keep it.
        **kwargs,
    )


# ---- build -------------------------------------------------------------------------------------------
def build_engine(
    onnx_path: Path, plan_path: Path, settings: TrtSettings, profiles: Sequence[PlannedProfile], *,
    spec: ComponentSpec, timing_cache: Path | None = None, name: str = "", check_accuracy: bool = True,
) -> dict[str, Any]:
    """Build, check and atomically write one plan; return what to record (seconds, profiles, accuracy)."""
    trt_module = load_tensorrt()
    from polygraphy.backend.trt import EngineBytesFromNetwork
    from polygraphy.exception import PolygraphyException

    t0 = time.perf_counter()
    log.info("%s: building TensorRT %s plan (%s, %d profile(s), opt level %d) ...", name, trt_module.__version__,
             settings.precision, len(profiles), settings.builder_optimization_level)
    try:
        network = network_loader(onnx_path, settings, with_trt=True)
        config = create_config(settings, profiles, timing_cache=timing_cache, with_trt=True)
        serialized = EngineBytesFromNetwork(
            network, config=config, save_timing_cache=str(timing_cache) if timing_cache else None
        )()
    except PolygraphyException as exc:
        raise EngineBuildError(f"{name}: TensorRT could not build the engine ({exc})",
                               "rerun with -v for TensorRT's log; check the ONNX with `polygraphy inspect model`") from None
    # TensorRT's IHostMemory is a buffer: it is deserialized and written as it is (no bytes() copy).
    plan = memoryview(serialized)
    size = plan.nbytes
    runtime, engine = deserialize_engine(plan, version_compatible=settings.version_compatible,
                                         what=f"the {name} plan it just built")
    n_profiles = check_plan(engine, len(profiles), name)
    record: dict[str, Any] = {"num_profiles": n_profiles, "size_bytes": size}
    if check_accuracy:
        from .trt_accuracy import check_engine

        record["accuracy"] = check_engine(engine, onnx_path, spec, profiles, settings.precision)
    del engine, runtime
    atomic_write_bytes(plan_path, plan)
    del plan, serialized
    seconds = time.perf_counter() - t0
    log.info("%s: TensorRT plan written (%.1f MB, %d profile(s)) in %.1fs", name, size / 1e6, n_profiles, seconds)
    return {"seconds": round(seconds, 2), **record}


def check_plan(engine: trt.ICudaEngine, expected_profiles: int, name: str) -> int:
    """The fresh plan's profile count, checked against the plan (catches a silent failure)."""
    n = int(engine.num_optimization_profiles)
    if n != expected_profiles:
        raise EngineBuildError(f"{name}: plan has {n} profiles, {expected_profiles} were planned",
                               "report this as a bug")
    return n
