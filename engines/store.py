"""The engine store: ``<artifacts>/engines/manifest.json`` and the checks made before loading.

Public API (stable; the runtime depends on it)
  :func:`load_engine_store` ``(artifacts_dir) -> EngineStore | None``
      None when there is no ``engines/`` folder (the runtime then runs the exported
      ONNX directly). Raises :class:`ArtifactError` / :class:`CorruptArtifactError` /
      :class:`IncompatibleManifestError` for a manifest that is missing, unreadable,
      foreign or of another format version.
  :class:`EngineStore` ``.entries: dict[str, EngineEntry]``, ``.build_command`` (the
      ``sdxl-export build ...`` that rewrites the folder), ``.verify(component, *,
      gpu=None, trt_version=None)``.
  :class:`EngineEntry` ``component, backend ("tensorrt" | "onnxruntime"), path
      (absolute Path of the plan / optimized ONNX), precision_requested, precision
      (effective), profiles (list of PlannedProfile: ``.shapes[input] = (min, opt, max)``,
      ``.buckets``, ``.batch_sizes``), spec (ComponentSpec), session_options (dict; ORT
      twin only), onnx_sha256, target, builder (the builder settings, including
      ``refittable``: ``--refittable``, also readable as ``.refittable``), build_seconds``.
  :func:`select_profile` ``(entry, input_shapes) -> int``

Why verify before deserializing: TensorRT's ``deserialize_cuda_engine`` returns None (with
only a log line) for a plan from another TensorRT version or GPU architecture, and a
truncated file can crash it. So every load first checks, from the manifest alone, that
the engine was built from the current ONNX export, for this TensorRT version and GPU (or
ONNX Runtime version), and that the file's sha256 matches -- and otherwise raises a named
error whose hint is the exact ``sdxl-export build ...`` command that fixes it.

``onnx_sha256`` is the sha256 of the component's ``files`` map in the export manifest
(``model.onnx`` and any external data, by content hash), so re-exporting changed weights
marks the engine stale even when only the external data file changed.
"""

from __future__ import annotations

import logging
import platform
import shlex
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..artifacts import (
    ENGINE_DIR,
    ENGINE_MANIFEST,
    EXPORT_MANIFEST,
    FORMAT_ENGINES,
    FORMAT_EXPORT,
    read_manifest,
    sha256_file,
    sha256_json,
)
from ..errors import (
    ArtifactError,
    CorruptArtifactError,
    InputMismatchError,
    StaleEngineError,
    UnsupportedShapeError,
)
from ..specs import ComponentSpec
from ..tensorrt_env import GpuInfo, gpu_info, trt_version, version_tuple
from .planner import PlannedProfile

log = logging.getLogger(__name__)

BACKEND_TRT = "tensorrt"
BACKEND_ORT = "onnxruntime"
BACKEND_OV = "openvino"
#: The manifest section holding the OpenVINO engines, beside the main ``engines`` table (TensorRT
#: or the ONNX Runtime twin): ``{"engines": {...}, "build_command": ..., "complete": ...}``.
OV_SECTION = "openvino"
#: OpenVINO engines live in ``engines/openvino/<component>/`` (and its compile cache in
#: ``engines/openvino/cache``).
OV_DIR = "openvino"


def onnx_hash(export_component: Mapping[str, Any]) -> str:
    """The identity of an exported component (see module docstring)."""
    return sha256_json(dict(sorted(export_component.get("files", {}).items())))


def default_build_command(artifacts: Path) -> str:
    return f"sdxl-export build --out {shlex.quote(str(artifacts))}"


def _with_out(command: str | None, artifacts: Path) -> str:
    """The recorded build command, pointed at where the folder is now (it may have moved)."""
    if not command:
        return default_build_command(artifacts)
    try:
        args = shlex.split(command)
    except ValueError:
        return default_build_command(artifacts)
    if "--out" in args[:-1]:
        args[args.index("--out") + 1] = str(artifacts)
    else:
        args += ["--out", str(artifacts)]
    return shlex.join(args)


@dataclass
class EngineEntry:
    """One built engine (TensorRT plan or ONNX Runtime twin) and how it was built."""

    component: str
    backend: str
    path: Path
    files: dict[str, str]
    precision_requested: str
    precision: str
    profiles: list[PlannedProfile]
    spec: ComponentSpec
    onnx_sha256: str
    target: dict[str, Any] = field(default_factory=dict)
    builder: dict[str, Any] = field(default_factory=dict)
    session_options: dict[str, Any] = field(default_factory=dict)
    build_seconds: float = 0.0
    artifact_key: str = ""
    built_at: str = ""
    #: What the build checked: ORT twin parity with the export, TensorRT plan profile count.
    validation: dict[str, Any] = field(default_factory=dict)
    #: OpenVINO entries: the backend this component runs on when ``auto``/``openvino`` picks the
    #: OpenVINO engines -- ``"onnxruntime"`` where the build measured the ONNX Runtime twin faster at
    #: the same (fp32) precision (:mod:`.speed`), else None (this engine); ``speed`` holds the figures.
    run_on: str | None = None
    speed: dict[str, Any] = field(default_factory=dict)

    @property
    def buckets(self) -> tuple[Any, ...]:
        """Every bucket some profile serves (table order of the plan)."""
        return tuple(dict.fromkeys(b for p in self.profiles for b in p.buckets))

    @property
    def batch_sizes(self) -> tuple[int, ...]:
        return tuple(sorted({n for p in self.profiles for n in p.batch_sizes}))

    @property
    def refittable(self) -> bool:
        """Built with ``--refittable`` (recorded in ``builder``; False for manifests from before the flag)."""
        return bool(self.builder.get("refittable", False))

    def to_dict(self, root: Path) -> dict[str, Any]:
        return {
            "component": self.component,
            "backend": self.backend,
            "file": self.path.relative_to(root).as_posix(),
            "files": dict(self.files),
            "onnx_sha256": self.onnx_sha256,
            "precision_requested": self.precision_requested,
            "precision": self.precision,
            "profiles": [p.to_dict() for p in self.profiles],
            "target": dict(self.target),
            "builder": dict(self.builder),
            "session_options": dict(self.session_options),
            "spec": self.spec.to_dict(),
            "build_seconds": self.build_seconds,
            "artifact_key": self.artifact_key,
            "built_at": self.built_at,
            "validation": dict(self.validation),
            **({"run_on": self.run_on} if self.run_on else {}),
            **({"speed": dict(self.speed)} if self.speed else {}),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], root: Path) -> EngineEntry:
        return cls(
            component=d["component"],
            backend=d["backend"],
            path=(root / d["file"]).resolve(),
            files=dict(d.get("files", {})),
            precision_requested=d.get("precision_requested", d.get("precision", "fp32")),
            precision=d.get("precision", "fp32"),
            profiles=[PlannedProfile.from_dict(p) for p in d.get("profiles", [])],
            spec=ComponentSpec.from_dict(d["spec"]),
            onnx_sha256=d.get("onnx_sha256", ""),
            target=dict(d.get("target", {})),
            builder=dict(d.get("builder", {})),
            session_options=dict(d.get("session_options", {})),
            build_seconds=float(d.get("build_seconds", 0.0)),
            artifact_key=d.get("artifact_key", ""),
            built_at=d.get("built_at", ""),
            validation=dict(d.get("validation", {})),
            run_on=d.get("run_on"),
            speed=dict(d.get("speed", {})),
        )


# ---- machine identity --------------------------------------------------------------------------
def ort_target() -> dict[str, Any]:
    import onnxruntime as ort

    return {"onnxruntime": ort.__version__, "machine": platform.machine(), "system": platform.system()}


def current_trt_version() -> str | None:
    return trt_version()


def current_gpu() -> GpuInfo | None:
    return gpu_info()


def trt_compatible(target: Mapping[str, Any], builder: Mapping[str, Any], gpu: GpuInfo | None,
                   trt_ver: str | None) -> str | None:
    """Why a TensorRT plan built for ``target`` cannot run here (None when it can).

    Default plans need the exact TensorRT version and the same GPU model. A plan built
    ``version_compatible`` runs on the TensorRT it was built with or any later one, across
    major versions too (TensorRT's version-compatibility guide: "engines built with TensorRT
    8 work with TensorRT 9 and TensorRT 10 runtimes", never an older runtime); it embeds
    the lean runtime, which the loader runs with ``engine_host_code_allowed``
    (:func:`sdxl_export.tensorrt_env.deserialize_engine`). A plan built with hardware
    compatibility ``same_compute_capability`` runs on any GPU of the same compute
    capability, with ``ampere_plus`` on any GPU of compute capability >= 8.0.
    """
    built_ver = str(target.get("tensorrt", "?"))
    built_gpu = f"{target.get('gpu', '?')} (sm {target.get('compute_capability', '?')})"
    if trt_ver is None:
        return f"it is a TensorRT {built_ver} plan for {built_gpu}, and TensorRT is not usable here"
    if gpu is None:
        return f"it is a TensorRT {built_ver} plan for {built_gpu}, and this machine has no CUDA GPU"
    if builder.get("version_compatible"):
        ok = version_tuple(trt_ver) >= version_tuple(built_ver)
    else:
        ok = trt_ver == built_ver
    if not ok:
        return f"it was built with TensorRT {built_ver}, this machine has TensorRT {trt_ver}"
    here = f"{gpu.name} (sm {gpu.compute_capability})"
    hw = builder.get("hardware_compatibility", "none")
    cc_built = version_tuple(str(target.get("compute_capability", "0")))
    cc_here = version_tuple(gpu.compute_capability)
    if hw == "ampere_plus":
        ok = cc_here >= (8, 0)
    elif hw == "same_compute_capability":
        ok = cc_here == cc_built
    else:
        ok = cc_here == cc_built and gpu.name == target.get("gpu")
    if not ok:
        return f"it was built for {built_gpu} (hardware compatibility {hw}), this GPU is {here}"
    return None


# ---- the store ---------------------------------------------------------------------------------
class EngineStore:
    """The engines of one artifact folder, as its manifest describes them."""

    def __init__(self, artifacts: Path, manifest: dict[str, Any], export_manifest: dict[str, Any] | None):
        self.artifacts = artifacts
        self.manifest = manifest
        self.export_manifest = export_manifest
        self.build_command: str = _with_out(manifest.get("build_command"), artifacts)
        self.entries: dict[str, EngineEntry] = {
            name: EngineEntry.from_dict(d, artifacts) for name, d in manifest.get("engines", {}).items()
        }
        ov = manifest.get(OV_SECTION) or {}
        #: OpenVINO engines (``build --backend openvino``), kept beside :attr:`entries`.
        self.openvino_entries: dict[str, EngineEntry] = {
            name: EngineEntry.from_dict(d, artifacts) for name, d in (ov.get("engines") or {}).items()
        }
        self.openvino_build_command: str = _with_out(
            ov.get("build_command") or f"{default_build_command(artifacts)} --backend openvino", artifacts)

    def entry_for(self, component: str, backend: str) -> EngineEntry | None:
        """The engine of ``component`` built for ``backend``, or None."""
        table = self.openvino_entries if backend == BACKEND_OV else self.entries
        entry = table.get(component)
        return entry if entry is not None and entry.backend == backend else None

    def run_on(self, component: str, backend: str) -> str:
        """The backend ``component`` runs on when the pipeline runs ``backend``: ``backend`` itself,
        except an OpenVINO engine whose build measured the ONNX Runtime twin faster at the same
        precision (and the twin is still there)."""
        entry = self.entry_for(component, backend)
        other = getattr(entry, "run_on", None)
        if backend == BACKEND_OV and other and other != backend and self.entry_for(component, other) is not None:
            return str(other)
        return backend

    @property
    def complete(self) -> bool:
        return bool(self.manifest.get("complete"))

    def _fix(self) -> str:
        return f"run `{self.build_command}`"

    def verify(self, component: str, *, gpu: GpuInfo | None = None, trt_version: str | None = None,
               backend: str | None = None) -> EngineEntry:
        """Check ``component``'s engine can be loaded here; return its entry.

        ``gpu``/``trt_version`` default to this machine's (detected lazily, TensorRT
        entries only). Raises :class:`ArtifactError` (no such engine),
        :class:`StaleEngineError` (ONNX re-exported, other TensorRT/GPU/ONNX Runtime) or
        :class:`CorruptArtifactError` (file missing or hash mismatch), each with the
        build command that fixes it. ``backend="openvino"`` checks the OpenVINO engine (kept
        beside the main table) against this machine's OpenVINO version and CPU flags.
        """
        if backend == BACKEND_OV:
            return self._verify_openvino(component)
        entry = self.entries.get(component)
        if entry is None:
            raise ArtifactError(
                f"{self.artifacts / ENGINE_DIR} has no engine for {component}"
                + ("" if self.complete else " (the last build was interrupted)"),
                self._fix(),
            )
        self._check_onnx(entry)
        if entry.backend == BACKEND_TRT:
            if trt_version is None:
                trt_version = current_trt_version()
            if gpu is None and trt_version is not None:
                gpu = current_gpu()
            why = trt_compatible(entry.target, entry.builder, gpu, trt_version)
            if why:
                fix = self._fix()
                if trt_version is None or gpu is None:  # rebuild for what this machine has: the ORT twin
                    fix = fix.replace(" --backend tensorrt", "")
                raise StaleEngineError(f"the {component} engine cannot run here: {why}", fix)
        elif entry.backend == BACKEND_ORT:
            here = ort_target()
            built = {k: entry.target.get(k) for k in here}
            if built != here:
                raise StaleEngineError(
                    f"the {component} ONNX Runtime twin was optimized for {built}, this machine is {here}",
                    self._fix(),
                )
        else:
            raise ArtifactError(f"the {component} engine has unknown backend {entry.backend!r}", self._fix())
        self._check_files(entry)
        return entry

    def _verify_openvino(self, component: str) -> EngineEntry:
        from ..openvino_env import ov_incompatible

        fix = f"run `{self.openvino_build_command}`"
        entry = self.openvino_entries.get(component)
        if entry is None or entry.backend != BACKEND_OV:
            raise ArtifactError(f"{self.artifacts / ENGINE_DIR} has no OpenVINO engine for {component}", fix)
        try:
            self._check_onnx(entry)
        except ArtifactError as exc:
            raise type(exc)(exc.message, fix) from None
        why = ov_incompatible(entry.target, entry.precision)
        if why:
            raise StaleEngineError(f"the {component} OpenVINO engine cannot run here: {why}", fix)
        try:
            self._check_files(entry)
        except ArtifactError as exc:
            raise type(exc)(exc.message, fix) from None
        return entry

    def _check_onnx(self, entry: EngineEntry) -> None:
        if self.export_manifest is None:
            raise ArtifactError(
                f"{self.artifacts / EXPORT_MANIFEST} is missing: the engines have no export to check against",
                self._fix(),
            )
        comp = self.export_manifest.get("components", {}).get(entry.component)
        if comp is None:
            raise StaleEngineError(
                f"the {entry.component} engine has no exported ONNX in {self.artifacts}", self._fix()
            )
        if onnx_hash(comp) != entry.onnx_sha256:
            raise StaleEngineError(
                f"the {entry.component} engine was built from a different ONNX export (re-exported since)",
                self._fix(),
            )

    def _check_files(self, entry: EngineEntry) -> None:
        for rel, digest in entry.files.items():
            p = self.artifacts / rel
            if not p.is_file():
                raise CorruptArtifactError(f"engine file {p} is missing", self._fix())
            if sha256_file(p) != digest:
                raise CorruptArtifactError(
                    f"engine file {p} does not match its manifest hash (corrupt or modified)", self._fix()
                )


def engine_manifest_path(artifacts: str | Path) -> Path:
    return Path(artifacts) / ENGINE_DIR / ENGINE_MANIFEST


def load_engine_store(artifacts_dir: str | Path) -> EngineStore | None:
    """The engine store of ``artifacts_dir``, or None when it has no ``engines/`` folder."""
    root = Path(artifacts_dir).resolve()
    if not (root / ENGINE_DIR).is_dir():
        return None
    fix = f"run `{default_build_command(root)}` (with the options you built with)"
    manifest = read_manifest(engine_manifest_path(root), FORMAT_ENGINES, fix)
    if not isinstance(manifest.get("engines"), dict):
        raise CorruptArtifactError(f"{engine_manifest_path(root)} has no engines table", fix)
    export = None
    if (root / EXPORT_MANIFEST).is_file():
        export = read_manifest(root / EXPORT_MANIFEST, FORMAT_EXPORT, f"run `sdxl-export export --out {root}`")
    try:
        return EngineStore(root, manifest, export)
    except (KeyError, TypeError, ValueError) as exc:
        cmd = _with_out(manifest.get("build_command"), root)
        raise CorruptArtifactError(
            f"{engine_manifest_path(root)} is malformed ({type(exc).__name__}: {exc})", f"run `{cmd}`"
        ) from None


# ---- profile selection ---------------------------------------------------------------------------
def _implied_dims(spec: ComponentSpec, input_shapes: Mapping[str, Sequence[int]]) -> dict[str, int]:
    known = {t.name: t for t in spec.inputs}
    bound: dict[str, int] = {}
    for name, shape in input_shapes.items():
        t = known.get(name)
        if t is None:
            raise InputMismatchError(f"{spec.name} has no input {name!r}", f"inputs are {', '.join(known)}")
        if len(shape) != len(t.shape):
            raise InputMismatchError(f"{spec.name}.{name}: rank {len(shape)}, expected {t.shape}",
                                     "pass a tensor of the spec's rank")
        for got, d in zip(shape, t.shape):
            if isinstance(d, str):
                bound.setdefault(d, int(got))
    return bound


def select_profile(entry: EngineEntry, input_shapes: Mapping[str, Sequence[int]]) -> int:
    """Index of the profile to run ``input_shapes`` with.

    A profile planned for exactly this bucket and batch first (its ``opt`` kernels were
    tuned nearest to it), else the first profile whose min..max contains every shape.
    Raises :class:`UnsupportedShapeError` listing the buckets and batch sizes the engine
    serves.
    """
    spec = entry.spec
    dims = _implied_dims(spec, input_shapes)
    s = spec.vae_scale
    h = dims.get("height", dims.get("latent_height", 0) * s)
    w = dims.get("width", dims.get("latent_width", 0) * s)
    batch = dims.get("batch")
    if h and w:
        for i, p in enumerate(entry.profiles):
            if (any(b.height == h and b.width == w for b in p.buckets)
                    and (batch is None or batch in p.batch_sizes) and p.covers(input_shapes)):
                return i
    for i, p in enumerate(entry.profiles):
        if p.covers(input_shapes):
            return i
    size = f"{h}x{w} " if h and w else ""
    raise UnsupportedShapeError(
        f"{entry.component} ({entry.backend} engine) cannot run {size}at batch {batch}: "
        f"it serves batch sizes {list(entry.batch_sizes)}"
        + (f" and buckets {', '.join(str(b) for b in entry.buckets)}" if h and w else ""),
        "use one of those sizes, or rebuild with `sdxl-export build --buckets ... --batch-sizes ...` "
        "(or --profiles dynamic)",
    )
