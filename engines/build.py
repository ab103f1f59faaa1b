"""``build``: export (if not up to date) + one engine per component, incrementally.

Every engine has an *artifact key*: a hash of exactly what determines its bytes -- the
exported ONNX (content hash), the backend, the machine it targets (TensorRT version,
GPU and compute capability; or ONNX Runtime version and platform) and the builder
settings (for TensorRT also precision and profiles). A rerun rebuilds an engine only
when its key changed or its files no longer match their hashes; when only what we
*record* changed (say the requested precision of an ONNX Runtime twin, which runs fp32
either way), the manifest entry is updated without rebuilding. So an unchanged rerun
does nothing, and a changed flag rebuilds exactly the engines it affects.

The manifest is rewritten atomically after every engine (``"complete": false`` until
the last), so an interrupted build keeps the engines it finished.
"""

from __future__ import annotations

import logging
import shlex
import shutil
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from ..artifacts import (
    DEFAULT_ARTIFACTS,
    ENGINE_DIR,
    FORMAT_ENGINES,
    atomic_dir,
    atomic_write_json,
    clean_stale_tmp,
    folder_lock,
    manifest_header,
    read_manifest,
    sha256_file,
    sha256_json,
)
from ..buckets import parse_bucket_list, with_hires_targets
from ..errors import ArtifactError, BackendUnavailableError, InvalidRequestError
from ..specs import ComponentSpec, specs_from_dicts
from ..tensorrt_env import GpuInfo, gpu_info, trt_status, trt_version
from . import ort_builder, ov_builder, ov_int8
from .planner import DEFAULT_MODE, MODES, Plan, plan_profiles
from .store import (
    BACKEND_ORT,
    BACKEND_OV,
    BACKEND_TRT,
    OV_DIR,
    OV_SECTION,
    EngineEntry,
    engine_manifest_path,
    onnx_hash,
    ort_target,
)
from .trt_builder import DEFAULT_OPT_LEVEL, HARDWARE_COMPAT, PRECISIONS, TrtSettings

log = logging.getLogger(__name__)

BACKENDS = ("auto", BACKEND_TRT, BACKEND_ORT, BACKEND_OV)
#: ``calibration(artifacts, component, n) -> list of feeds`` (see :func:`build`)
Calibration = Callable[[Path, str, int], list[dict[str, Any]]]
#: ``--precision``: TensorRT's precisions, and int8 (CPU only: OpenVINO + NNCF, :mod:`.ov_int8`).
BUILD_PRECISIONS = (*PRECISIONS, "int8")
VAE_KINDS = ("vae_decoder", "vae_encoder")
#: Exported components the runtime never opens get no engine (none now: img2img uses the VAE
#: encoder, built over the same buckets as the decoder).
RUNTIME_UNUSED: frozenset[str] = frozenset()
PLAN_FILE = "engine.plan"


@dataclass
class BuildOptions:
    """Everything ``sdxl-export build`` accepts (defaults = the no-argument command)."""

    model: str = "tiny"
    refiner: str | None = "same"
    with_refiner: bool = True
    out: Path = DEFAULT_ARTIFACTS
    #: a VAE replacing the model's (``--vae``)
    vae: str | None = None
    precision: str = "fp32"
    vae_precision: str = "fp32"
    buckets: str = "all"
    #: hires fix: also serve every bucket scaled by these (``--hires-scale``)
    hires_scales: tuple[float, ...] = ()
    batch_sizes: tuple[int, ...] = (1,)
    profiles: str = DEFAULT_MODE
    backend: str = "auto"
    timing_cache: Path | None = None
    workspace_gb: float | None = None
    builder_optimization_level: int = DEFAULT_OPT_LEVEL
    hardware_compatibility: str = "none"
    version_compatible: bool = False
    #: TensorRT ``BuilderFlag.REFIT`` (run-time LoRA switching); recorded, not needed, by the ORT twin
    refittable: bool = False
    #: ``(file, scale)`` LoRAs fused before export (``--lora``)
    loras: tuple[tuple[str, float], ...] = ()
    #: ControlNet folders/files exported (and built) with the model
    controlnets: tuple[str, ...] = ()
    ort_optimization: str = ort_builder.DEFAULT_LEVEL
    opset: int = 17
    validate: bool = True
    #: a UNet file/folder replacing the base UNet (``--unet``: Lightning, DMD2, ...)
    unet: str | None = None
    #: sampling defaults recorded in the manifest (``--default-steps/--default-guidance/
    #: --default-scheduler``, ``--prediction-type``); None: not recorded
    default_steps: int | None = None
    default_guidance: float | None = None
    default_scheduler: str | None = None
    prediction_type: str | None = None
    #: the model's native size in pixels when its configs do not say it (``--native-size``)
    native_size: int | None = None
    #: ``--precision int8``: UNet calls recorded for the hybrid recipe's statistics (``--calibration-samples``)
    calibration_samples: int = ov_int8.DEFAULT_SAMPLES

    def sampling_defaults(self) -> Any:
        """The checked :class:`~sdxl_export.sampling_defaults.ModelDefaults` to record."""
        from ..sampling_defaults import ModelDefaults

        return ModelDefaults.checked(self.default_steps, self.default_guidance, self.default_scheduler,
                                     self.prediction_type)

    def __post_init__(self) -> None:
        self.out = Path(self.out)
        for what, value, allowed in (("precision", self.precision, BUILD_PRECISIONS),
                                     ("VAE precision", self.vae_precision, PRECISIONS),
                                     ("profile mode", self.profiles, MODES), ("backend", self.backend, BACKENDS),
                                     ("hardware compatibility", self.hardware_compatibility, tuple(HARDWARE_COMPAT)),
                                     ("ONNX Runtime optimization", self.ort_optimization, ort_builder.LEVELS)):
            if value not in allowed:
                raise InvalidRequestError(f"unknown {what} {value!r}", f"use one of: {', '.join(allowed)}")
        if self.calibration_samples < ov_int8.HOLDOUT_EVERY:
            raise InvalidRequestError(f"--calibration-samples {self.calibration_samples} is too few",
                                      f"use at least {ov_int8.HOLDOUT_EVERY} (default {ov_int8.DEFAULT_SAMPLES})")

    def to_cli(self, **override: Any) -> str:
        """The ``sdxl-export build`` command line that reproduces these options."""
        o = BuildOptions(**{**asdict(self), **override})
        d = BuildOptions()
        args = ["sdxl-export", "build"]
        if o.model != d.model:
            args += ["--model", o.model]
        if not o.with_refiner or o.refiner is None:
            args.append("--no-refiner")
        elif o.refiner != "same":
            args += ["--refiner", o.refiner]
        if o.vae is not None:
            args += ["--vae", o.vae]
        if o.unet is not None:
            args += ["--unet", o.unet]
        if o.native_size is not None:
            args += ["--native-size", str(o.native_size)]
        for flag, value in (("--default-steps", o.default_steps), ("--default-guidance", o.default_guidance),
                            ("--default-scheduler", o.default_scheduler), ("--prediction-type", o.prediction_type)):
            if value is not None:
                args += [flag, str(value)]
        if o.precision == "int8":
            args += ["--precision", "int8"]
        elif o.precision != "fp32":
            args.append(f"--{o.precision}")
        if o.vae_precision != d.vae_precision:
            args += ["--vae-precision", o.vae_precision]
        args += ["--out", str(o.out)]
        for flag, value, default in (("--buckets", o.buckets, d.buckets),
                                     ("--batch-sizes", ",".join(map(str, o.batch_sizes)), "1"),
                                     ("--hires-scale", ",".join(f"{x:g}" for x in o.hires_scales), ""),
                                     ("--profiles", o.profiles, d.profiles), ("--backend", o.backend, d.backend),
                                     ("--timing-cache", o.timing_cache, None), ("--workspace", o.workspace_gb, None),
                                     ("--builder-optimization-level", o.builder_optimization_level,
                                      d.builder_optimization_level),
                                     ("--hardware-compatibility", o.hardware_compatibility, d.hardware_compatibility),
                                     ("--ort-optimization", o.ort_optimization, d.ort_optimization),
                                     ("--opset", o.opset, d.opset),
                                     ("--calibration-samples", o.calibration_samples, d.calibration_samples)):
            if value != default:
                args += [flag, str(value)]
        for flag, on in (("--refittable", o.refittable), ("--version-compatible", o.version_compatible),
                         ("--no-validate", not o.validate)):
            if on:
                args.append(flag)
        return shlex.join(args)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["out"], d["batch_sizes"] = str(self.out), list(self.batch_sizes)
        d["timing_cache"] = str(self.timing_cache) if self.timing_cache else None
        return d


@dataclass
class Wanted:
    """What one component's engine must be; compared with the manifest to decide work."""

    component: str
    backend: str
    spec: ComponentSpec
    onnx_path: Path
    onnx_sha256: str
    precision_requested: str
    precision: str
    profiles: list[Any]
    target: dict[str, Any]
    builder: dict[str, Any]
    session_options: dict[str, Any] = field(default_factory=dict)
    trt_settings: TrtSettings | None = None
    artifact_key: str = ""

    def record_view(self) -> dict[str, Any]:
        """The recorded fields that do not change the artifact's bytes."""
        return {"precision_requested": self.precision_requested, "precision": self.precision,
                "profiles": [p.to_dict() for p in self.profiles], "spec": self.spec.to_dict(),
                "session_options": self.session_options, "builder": self.builder}


@dataclass
class ComponentResult:
    component: str
    action: str  # "built" | "up to date" | "updated" | "removed"
    reason: str
    seconds: float = 0.0


@dataclass
class BuildReport:
    out: Path
    backend: str
    backend_note: str
    plan: Plan
    results: list[ComponentResult]
    manifest: dict[str, Any]
    #: ``build --fp16``/``--bf16`` (backend auto) on a CPU machine with native bf16: the OpenVINO
    #: bf16 engines built beside the ONNX Runtime twin (:func:`cpu_reduced_precision_companion`).
    companion: BuildReport | None = None

    @property
    def built(self) -> list[str]:
        return [r.component for r in self.results if r.action == "built"]

    @property
    def up_to_date(self) -> bool:
        return all(r.action == "up to date" for r in self.results)


# ---- decisions (pure) --------------------------------------------------------------------------------
def build_backend(requested: str, precision: str = "fp32") -> tuple[str, str]:
    """(backend to *build* with, one-line note). ``auto`` falls back to the ONNX Runtime twin, saying why.

    Which backend *runs* is decided by :func:`sdxl_export.runtime.backends.resolve_backend`
    from what was built; both ask :mod:`sdxl_export.tensorrt_env` whether TensorRT is usable.
    """
    if precision == "int8" and requested in (BACKEND_TRT, BACKEND_ORT):
        raise InvalidRequestError(
            f"--precision int8 runs on OpenVINO (CPU), not on {requested}",
            "use --backend openvino (or auto on a CPU machine); on a GPU use --fp16")
    if requested == BACKEND_ORT:
        return BACKEND_ORT, "ONNX Runtime twin requested (--backend onnxruntime)"
    if requested == BACKEND_OV:
        ok_ov, why_ov = ov_builder.ov_status()
        if not ok_ov:
            raise BackendUnavailableError(f"--backend openvino, but OpenVINO cannot build here: {why_ov}",
                                          "pip install openvino (or the [openvino] extra)")
        return BACKEND_OV, "OpenVINO CPU engines (--backend openvino), kept beside the main engines"
    ok, why = trt_status()
    if requested == BACKEND_TRT:
        if not ok:
            raise BackendUnavailableError(
                f"--backend tensorrt, but TensorRT cannot build here: {why}",
                "install TensorRT on a machine with an NVIDIA GPU, or use --backend auto / onnxruntime",
            )
        return BACKEND_TRT, "TensorRT"
    if ok and precision == "int8":
        raise InvalidRequestError("--precision int8 is a CPU precision (OpenVINO + NNCF); this machine builds "
                                  "TensorRT engines", "use --fp16 on the GPU, or --backend openvino for CPU engines")
    if ok:
        return BACKEND_TRT, "TensorRT (auto)"
    ok_ort, why_ort = ort_builder.ort_status()
    if not ok_ort:
        raise BackendUnavailableError(f"neither TensorRT ({why}) nor ONNX Runtime ({why_ort}) can build here",
                                      "pip install onnxruntime")
    return BACKEND_ORT, f"TensorRT skipped ({why}): building the ONNX Runtime CPU twin instead"


def trt_target(trt_version: str, gpu: GpuInfo) -> dict[str, Any]:
    return {"tensorrt": trt_version, "gpu": gpu.name, "compute_capability": gpu.compute_capability}


def wanted_engines(
    opts: BuildOptions, export_manifest: Mapping[str, Any], plan: Plan, backend: str, target: dict[str, Any],
) -> dict[str, Wanted]:
    """What every component's engine must be, for ``backend`` on ``target``."""
    root = Path(opts.out)
    out: dict[str, Wanted] = {}
    for name, comp in export_manifest["components"].items():
        if name in RUNTIME_UNUSED:
            continue
        cplan = plan.components[name]
        spec = cplan.spec
        # The VAE gets its own precision (fp32 unless --vae-precision): SDXL's VAE overflows in fp16.
        requested = opts.vae_precision if spec.kind in VAE_KINDS else opts.precision
        w = Wanted(component=name, backend=backend, spec=spec, onnx_path=root / comp["file"],
                   onnx_sha256=onnx_hash(comp), precision_requested=requested, precision=requested,
                   profiles=list(cplan.profiles), target=dict(target), builder={})
        if backend == BACKEND_TRT:
            w.trt_settings = TrtSettings(
                precision=requested, builder_optimization_level=opts.builder_optimization_level,
                hardware_compatibility=opts.hardware_compatibility,
                version_compatible=opts.version_compatible, workspace_gb=opts.workspace_gb,
                refittable=opts.refittable,
            )
            key_builder = w.trt_settings.to_dict()
            recorded = dict(key_builder)
            if not key_builder["refittable"]:
                # Absent when off, so plans built before the flag existed keep their key (no rebuild);
                # the manifest still records refittable=false (a record-only update).
                del key_builder["refittable"]
            w.artifact_key = sha256_json({"backend": backend, "onnx": w.onnx_sha256, "target": target,
                                          "builder": key_builder, "profiles": [p.to_dict() for p in w.profiles]})
            w.builder = {**recorded, "timing_cache": str(opts.timing_cache) if opts.timing_cache else None}
        elif backend == BACKEND_OV:
            key_builder = {"ir": "convert_model+save_model(compress_to_fp16=False)"}
            if requested == "int8":
                # int8: the UNets hybrid, the text encoders int8 weights (ov_int8); the rest stays fp32.
                recipe = ov_int8.recipe_for(spec.kind)
                w.precision = "int8" if recipe else "fp32"
                if recipe:
                    key_builder.update(int8=recipe, nncf=ov_int8.nncf_version())
                    if recipe == "hybrid":
                        key_builder["calibration_samples"] = opts.calibration_samples
            else:
                # --fp16/--bf16 on the CPU: its native reduced precision (bf16) where it has one.
                w.precision = "bf16" if requested != "fp32" and target.get("bf16") else "fp32"
            w.session_options = ov_builder.compile_config(w.precision, None)
            # The precision is in the key although the IR bytes do not depend on it: a precision change
            # must re-run the build's check (fp32 parity, bf16 tolerance) and refill the compile cache.
            key_builder["precision"] = w.precision
            w.artifact_key = sha256_json({"backend": backend, "onnx": w.onnx_sha256, "target": target,
                                          "builder": key_builder})
            w.builder = {**key_builder, "refittable": opts.refittable}
        else:
            w.precision = "fp32"  # see ort_builder: the CPU twin always runs fp32
            key_builder = {"ort_optimization": opts.ort_optimization, "providers": list(ort_builder.PROVIDERS)}
            w.artifact_key = sha256_json({"backend": backend, "onnx": w.onnx_sha256, "target": target,
                                          "builder": key_builder})
            # The twin switches weights with new sessions (no refit): --refittable is recorded only.
            w.builder = {**key_builder, "refittable": opts.refittable}
            w.session_options = ort_builder.runtime_session_options(opts.ort_optimization)
        out[name] = w
    return out


def _diff(prev: Mapping[str, Any], w: Wanted) -> str:
    if prev.get("backend") != w.backend:
        return f"backend {prev.get('backend')} -> {w.backend}"
    if prev.get("onnx_sha256") != w.onnx_sha256:
        return "the ONNX export changed"
    if prev.get("target") != w.target:
        changed = sorted(k for k in set(prev.get("target", {})) | set(w.target)
                         if prev.get("target", {}).get(k) != w.target.get(k))
        return "target changed: " + ", ".join(
            f"{k} {prev.get('target', {}).get(k)} -> {w.target.get(k)}" for k in changed)
    old_b = prev.get("builder", {})
    changed = sorted(k for k in set(old_b) | set(w.builder) if old_b.get(k) != w.builder.get(k))
    if changed:
        return "builder flags changed: " + ", ".join(f"{k} {old_b.get(k)} -> {w.builder.get(k)}" for k in changed)
    if prev.get("profiles") != [p.to_dict() for p in w.profiles]:
        return "optimization profiles changed"
    return "build settings changed"


def decide(prev: Mapping[str, Any] | None, w: Wanted, files_ok: bool) -> tuple[str, str]:
    """("build" | "update" | "skip", why) for one component."""
    if prev is None:
        return "build", "not built yet"
    if prev.get("artifact_key") != w.artifact_key:
        return "build", _diff(prev, w)
    if not files_ok:
        return "build", "engine files are missing or do not match their hashes"
    view = w.record_view()
    changed = [k for k, v in view.items() if prev.get(k) != v]
    if changed:
        return "update", f"recorded {', '.join(changed)} changed; engine bytes unaffected"
    return "skip", "up to date"


def files_ok(root: Path, files: Mapping[str, str]) -> bool:
    return bool(files) and all((root / r).is_file() and sha256_file(root / r) == h for r, h in files.items())


# ---- the build -----------------------------------------------------------------------------------
def _load_previous(root: Path) -> dict[str, Any]:
    path = engine_manifest_path(root)
    if not path.is_file():
        return {}
    try:
        return read_manifest(path, FORMAT_ENGINES, "rebuild")
    except ArtifactError as exc:
        log.warning("engine manifest unusable (%s): rebuilding every engine", exc.message)
        return {}


def make_plan(opts: BuildOptions, export_manifest: Mapping[str, Any]) -> Plan:
    specs = specs_from_dicts(c["spec"] for c in export_manifest["components"].values())
    native = int(export_manifest["native_size"])
    buckets = with_hires_targets(parse_bucket_list(opts.buckets, native), tuple(opts.hires_scales))
    recorded = (export_manifest.get("defaults") or {}).get("guidance_scale")
    return plan_profiles(specs, native=native, buckets=buckets, batch_sizes=opts.batch_sizes, mode=opts.profiles,
                         guidance=recorded is None or float(recorded) > 1.0)


def build(opts: BuildOptions, progress: Callable[[str, int, int], None] | None = None,
          calibration: Calibration | None = None) -> BuildReport:
    """Export if needed, then build (or keep) an engine for every component (``progress(name, i,
    total)`` before each: the command's progress bar).

    ``calibration(artifacts, component, n) -> [feeds]``: the UNets' own inputs for ``--precision int8``
    (:class:`sdxl_export.runtime.UNetCalibration`; the engines layer never runs the sampling loop).
    """
    from ..export import export_model

    t_all = time.perf_counter()
    backend, note = build_backend(opts.backend, opts.precision)
    log.info("backend: %s", note)
    if backend == BACKEND_ORT and opts.precision != "fp32":
        log.info("precision: %s requested, the ONNX Runtime CPU twin runs fp32 (few fp16 CPU kernels; keeps "
                 "parity with the export); recorded as precision_requested=%s, precision=fp32",
                 opts.precision, opts.precision)
    if backend == BACKEND_OV and opts.precision == "int8":
        log.info("precision: int8 -> UNets hybrid int8 (NNCF, %d calibration UNet calls), text encoders int8 "
                 "weights; the VAE stays %s", opts.calibration_samples, opts.vae_precision)
    elif backend == BACKEND_OV and opts.precision != "fp32":
        has, why = ov_builder.native_bf16()
        if has:
            log.info("precision: %s requested -> bf16 on this CPU (%s); the VAE stays %s", opts.precision, why,
                     opts.vae_precision)
        else:
            log.warning("precision: %s requested, but %s: building fp32", opts.precision, why)
    export_manifest = export_model(opts.model, opts.out, refiner=opts.refiner, with_refiner=opts.with_refiner,
                                   opset=opts.opset, vae=opts.vae, loras=opts.loras, unet=opts.unet,
                                   defaults=opts.sampling_defaults(), native_size=opts.native_size,
                                   controlnets=opts.controlnets)
    root = Path(opts.out).resolve()
    plan = make_plan(opts, export_manifest)
    if backend == BACKEND_TRT:
        gpu, ver = gpu_info(), trt_version()
        if gpu is None or ver is None:  # build_backend checked both; a driver can vanish meanwhile
            raise BackendUnavailableError("TensorRT or the GPU stopped being usable during the build",
                                          "rerun the build")
        target = trt_target(ver, gpu)
    elif backend == BACKEND_OV:
        target = ov_builder.ov_target()
    else:
        target = ort_target()
    wanted = wanted_engines(opts, export_manifest, plan, backend, target)

    engines_dir = root / ENGINE_DIR
    engines_dir.mkdir(parents=True, exist_ok=True)
    with folder_lock(engines_dir, "build", "wait for it to finish, or pass another --out"):
        report = _build_engines(opts, root, engines_dir, backend, note, target, plan, export_manifest,
                                wanted, t_all, progress, calibration)
    if cpu_reduced_precision_companion(opts, backend):
        if opts.precision == "int8":
            log.info("precision: int8: also building the OpenVINO int8 engines (opt-in: `--backend openvino` "
                     "runs them; `auto` keeps the exact fp32 twin)")
        else:
            log.info("precision: %s on a CPU with native bf16: also building the OpenVINO bf16 engines "
                     "(`auto` runs them; --backend onnxruntime keeps the exact fp32 twin)", opts.precision)
        report.companion = build(replace(opts, backend=BACKEND_OV), calibration=calibration)
    return report


def cpu_reduced_precision_companion(opts: BuildOptions, backend: str) -> bool:
    """Whether ``build --fp16``/``--bf16`` with ``--backend auto`` also builds OpenVINO bf16 engines.

    On a machine without TensorRT the main engines are the ONNX Runtime twin, which runs fp32 (CPU
    kernels); a reduced precision asked for there means the CPU's native one where it has it: bf16
    through OpenVINO on AVX512_BF16/AMX CPUs. Plain fp32 builds and explicit backends never do.
    """
    if opts.backend != "auto" or backend != BACKEND_ORT or opts.precision == "fp32":
        return False
    ok, why = ov_builder.ov_status()
    if opts.precision == "int8":
        if not ok:
            raise BackendUnavailableError(f"--precision int8 needs OpenVINO, which is not available ({why})",
                                          'pip install "sdxl-export[openvino]"')
        return True
    if not ok:
        log.info("precision: %s requested; OpenVINO is not available (%s): the fp32 twin only",
                 opts.precision, why)
        return False
    has, why = ov_builder.native_bf16()
    if not has:
        log.info("precision: %s requested, but %s: the fp32 twin only", opts.precision, why)
    return has


def _build_engines(opts: BuildOptions, root: Path, engines_dir: Path, backend: str, note: str, target: Any,
                   plan: Any, export_manifest: dict[str, Any], wanted: Any, t_all: float,
                   progress: Callable[[str, int, int], None] | None = None,
                   calibration: Calibration | None = None) -> BuildReport:
    """The engine phase of :func:`build`, under the engines folder's lock."""
    clean_stale_tmp(engines_dir)
    previous = _load_previous(root)
    ov = backend == BACKEND_OV
    header: dict[str, Any] = {
        "complete": False,
        "backend": backend,
        "backend_note": note,
        # Absolute --out: the command in an error message must work from any directory.
        "build_command": opts.to_cli(out=root),
        "build_options": opts.to_dict(),
        "export": {"source": export_manifest.get("source"), "native_size": export_manifest.get("native_size"),
                   "opset": export_manifest.get("opset")},
        "plan": {k: v for k, v in plan.to_dict().items() if k != "components"},
        "engines": {},
    }
    manifest: dict[str, Any]
    if ov:
        # OpenVINO engines go in their own section; the main table (TensorRT or the ORT twin) is kept.
        (engines_dir / OV_DIR).mkdir(exist_ok=True)
        clean_stale_tmp(engines_dir / OV_DIR)
        prev_entries: dict[str, Any] = dict((previous.get(OV_SECTION) or {}).get("engines", {}))
        manifest = {**previous, **manifest_header(FORMAT_ENGINES)} if previous.get("engines") is not None else {
            **manifest_header(FORMAT_ENGINES), "complete": True, "backend": None,
            "backend_note": "no main engines built", "engines": {}}
        manifest[OV_SECTION] = header
        table, state = header["engines"], header
    else:
        prev_entries = dict(previous.get("engines", {}))
        manifest = {**manifest_header(FORMAT_ENGINES), **header}
        if previous.get(OV_SECTION):
            manifest[OV_SECTION] = previous[OV_SECTION]
        table, state = manifest["engines"], manifest
    comp_dir = (engines_dir / OV_DIR) if ov else engines_dir
    results: list[ComponentResult] = []
    for name in [n for n in prev_entries if n not in wanted]:
        shutil.rmtree(comp_dir / name, ignore_errors=True)
        why = "not used by the runtime" if name in RUNTIME_UNUSED else "no longer exported"
        results.append(ComponentResult(name, "removed", why))
        log.info("%s: engine removed (%s)", name, why)
    # Entries we keep are written first so an interruption never drops a good engine.
    for name, w in wanted.items():
        prev = prev_entries.get(name)
        if prev is not None and prev.get("artifact_key") == w.artifact_key:
            table[name] = prev
    atomic_write_json(engine_manifest_path(root), manifest)

    total = len(wanted)
    for i, (name, w) in enumerate(wanted.items(), 1):
        if progress is not None:
            progress(name, i, total)
        prev = prev_entries.get(name)
        action, why = decide(prev, w, files_ok(root, (prev or {}).get("files", {})))
        if action == "skip":
            log.info("[%d/%d] %s: up to date (%s)", i, total, name, w.backend)
            table[name] = prev
            results.append(ComponentResult(name, "up to date", why))
            continue
        if action == "update":
            assert prev is not None
            entry = EngineEntry.from_dict(prev, root)
            _apply_record(entry, w)
            table[name] = entry.to_dict(root)
            log.info("[%d/%d] %s: manifest updated (%s)", i, total, name, why)
            results.append(ComponentResult(name, "updated", why))
        else:
            log.info("[%d/%d] %s: building %s engine (%s) ...", i, total, name, w.backend, why)
            entry = _build_one(root, w, opts, calibration)
            table[name] = entry.to_dict(root)
            log.info("[%d/%d] %s: built in %.1fs", i, total, name, entry.build_seconds)
            results.append(ComponentResult(name, "built", why, entry.build_seconds))
        atomic_write_json(engine_manifest_path(root), manifest)

    if ov and opts.validate and manifest.get("engines"):
        from . import speed

        moved = speed.assign(root, table, manifest["engines"], engines_dir / OV_DIR / ov_builder.CACHE_DIR,
                             lambda e: _check_shape_of(e.profiles))
        if moved:
            log.info("measured faster on the ONNX Runtime twin at fp32 (runs there): %s", ", ".join(moved))
    state["complete"] = True
    atomic_write_json(engine_manifest_path(root), manifest)
    n_built = sum(r.action == "built" for r in results)
    if n_built == 0 and all(r.action == "up to date" for r in results):
        log.info("all %d engines up to date (%s) in %s", total, backend, engines_dir)
    else:
        log.info("build done in %.1fs: %d built, %d updated, %d up to date, %d removed",
                 time.perf_counter() - t_all, n_built, sum(r.action == "updated" for r in results),
                 sum(r.action == "up to date" for r in results), sum(r.action == "removed" for r in results))
    return BuildReport(root, backend, note, plan, results, manifest)


def _apply_record(entry: EngineEntry, w: Wanted) -> None:
    entry.precision_requested, entry.precision = w.precision_requested, w.precision
    entry.profiles, entry.spec = list(w.profiles), w.spec
    entry.session_options, entry.builder = dict(w.session_options), dict(w.builder)


def _build_one(root: Path, w: Wanted, opts: BuildOptions, calibration: Calibration | None = None) -> EngineEntry:
    rel_dir = Path(ENGINE_DIR) / (f"{OV_DIR}/{w.component}" if w.backend == BACKEND_OV else w.component)
    t0 = time.perf_counter()
    extra: dict[str, Any] = {}
    with atomic_dir(root / rel_dir) as tmp:
        if w.backend == BACKEND_TRT:
            from .trt_builder import build_engine

            if w.trt_settings is None:
                raise InvalidRequestError(f"{w.component}: no TensorRT settings", "report this as a bug")
            extra = build_engine(w.onnx_path, tmp / PLAN_FILE, w.trt_settings, w.profiles, spec=w.spec,
                                 timing_cache=opts.timing_cache, name=w.component, check_accuracy=opts.validate)
            written = [tmp / PLAN_FILE]
        elif w.backend == BACKEND_OV and w.precision == "int8":
            written, extra = _build_int8(root, w, opts, tmp, calibration)
        elif w.backend == BACKEND_OV:
            written = ov_builder.build_ir(w.onnx_path, tmp)
            # Compile once now: checks the IR and fills the cache the runtime loads from.
            cfg = ov_builder.compile_config(w.precision, root / ENGINE_DIR / OV_DIR / ov_builder.CACHE_DIR)
            if opts.validate:
                extra["parity"] = ov_builder.check_parity(w.onnx_path, written[0], w.spec, _check_shape(w),
                                                          w.precision, cfg)
            else:
                ov_builder.compile_ir(written[0], cfg)
        else:
            written = ort_builder.build_twin(w.onnx_path, tmp, opts.ort_optimization)
            if opts.validate:
                shape = _check_shape(w)
                extra["parity"] = ort_builder.check_parity(w.onnx_path, written[0], w.spec, shape,
                                                           w.session_options)
        files = {(rel_dir / p.name).as_posix(): sha256_file(p) for p in written}
        main = rel_dir / written[0].name
    seconds = round(time.perf_counter() - t0, 2)
    entry = EngineEntry(
        component=w.component, backend=w.backend, path=(root / main).resolve(), files=files,
        precision_requested=w.precision_requested, precision=w.precision, profiles=list(w.profiles), spec=w.spec,
        onnx_sha256=w.onnx_sha256, target=dict(w.target), builder=dict(w.builder),
        session_options=dict(w.session_options), build_seconds=seconds, artifact_key=w.artifact_key,
        built_at=time.strftime("%Y-%m-%dT%H:%M:%S%z"), validation=extra,
    )
    if "parity" in extra:
        log.info("%s: %s engine matches the export (max abs error %.1e)", w.component, w.backend,
                 max(extra["parity"]["max_abs_error"].values(), default=0.0))
    return entry


def _build_int8(root: Path, w: Wanted, opts: BuildOptions, tmp: Path,
                calibration: Calibration | None) -> tuple[list[Path], dict[str, Any]]:
    """An int8 OpenVINO engine in ``tmp`` (:mod:`.ov_int8`): fp32 IR, then NNCF, then the build's check."""
    recipe = ov_int8.recipe_for(w.spec.kind)
    fp32_dir = tmp / "fp32"
    fp32_dir.mkdir()
    ov_builder.build_ir(w.onnx_path, fp32_dir)
    samples = None
    if recipe == "hybrid":
        if calibration is None:
            raise ov_int8.Int8CalibrationError(
                f"{w.component}: --precision int8 needs the UNet's calibration inputs and none were given",
                "build through `sdxl-export build --precision int8`, or pass "
                "calibration=sdxl_export.runtime.UNetCalibration() to build()")
        samples = calibration(root, w.component, opts.calibration_samples)
        if len(samples) < ov_int8.HOLDOUT_EVERY:
            raise ov_int8.Int8CalibrationError(
                f"{w.component}: only {len(samples)} calibration UNet calls were recorded",
                f"raise --calibration-samples (at least {ov_int8.HOLDOUT_EVERY} calls of this UNet are needed)")
    xml = tmp / ov_builder.IR_FILE
    extra: dict[str, Any] = {"int8": ov_int8.quantize_ir(fp32_dir / ov_builder.IR_FILE, xml, recipe, samples)}
    cfg = ov_builder.compile_config(w.precision, root / ENGINE_DIR / OV_DIR / ov_builder.CACHE_DIR)
    if opts.validate and samples is not None:
        extra["int8_check"] = ov_int8.check_int8(fp32_dir / ov_builder.IR_FILE, xml, samples,
                                                 w.spec.output_names[0], cfg, w.component)
        log.info("%s: int8 noise prediction within %.1f%% relative RMS of fp32 on %d held-out calls", w.component,
                 100 * extra["int8_check"]["rel_rms_error_max"], extra["int8_check"]["held_out_samples"])
    elif opts.validate:
        extra["parity"] = ov_builder.check_parity(w.onnx_path, xml, w.spec, _check_shape(w), w.precision, cfg)
    else:
        ov_builder.compile_ir(xml, cfg)
    shutil.rmtree(fp32_dir)
    return [xml, tmp / ov_builder.IR_WEIGHTS], extra


def _check_shape(w: Wanted) -> tuple[int, int, int]:
    """The cheapest planned (batch, height, width): smallest batch, smallest bucket."""
    return _check_shape_of(w.profiles)


def _check_shape_of(profiles: Any) -> tuple[int, int, int]:
    if not profiles:
        raise InvalidRequestError("an engine with no planned profile has no shape to check", "report this as a bug")
    p = min(profiles, key=lambda p: min(p.batch_sizes))
    b = min(p.buckets, key=lambda b: b.height * b.width)
    return min(p.batch_sizes), b.height, b.width
