"""LoRA sets switched at run time on a pipeline's components, exactly and atomically.

Exact: every weight any LoRA has touched since the pipeline was opened is rewritten on every
switch from its *base* value plus the deltas of the set now active (``W0 + sum s_i dW_i``),
so A -> B -> A is exactly A (not A plus B's leftovers, the failure of refitting only what the
new LoRA touches). Base values come from the export itself: the ``torch/<part>`` safetensors
for runners that take PyTorch names, the ONNX initializers (through the exporter's parameter
map, un-transposed) for runners that take ONNX names.

Atomic: a set is resolved first (files checked, deltas computed by diffusers' loader, every
new weight computed); only then are runners updated, and a runner failing mid-way gets the
previous set's weights back. Errors are :class:`~sdxl_export.errors.InvalidLoraError`.

Concurrency (:meth:`LoraSwitcher.session`): one set is active at a time. A call with the
active set runs at once, alongside others; a call with another set waits until the calls in
flight finish, switches, then runs; while it waits, new calls with the old set wait too (no
starvation). No call ever runs on half-switched weights.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..errors import InvalidLoraError
from .files import (
    LORA_PARTS,
    Deltas,
    LoraFile,
    check_scale,
    config_objects,
    deltas_bytes,
    dense,
    lora_deltas,
    resolve_lora,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LoraSet:
    """Resolved LoRAs with a scale each; ``key`` identifies the set (order-insensitive)."""

    items: tuple[tuple[LoraFile, float], ...] = ()

    @property
    def key(self) -> tuple[tuple[str, float], ...]:
        return tuple(sorted((f.sha256, s) for f, s in self.items))

    def describe(self) -> list[dict[str, Any]]:
        return [{"name": f.name, "file": str(f.path), "sha256": f.sha256, "scale": s} for f, s in self.items]


#: Delta cache bound: LoRA factors are small (a rank-32 SDXL LoRA is ~200 MB in fp32).
DEFAULT_CACHE_BYTES = 2 << 30

@dataclass(frozen=True)
class _UnknownSet(LoraSet):
    """No set is known to be on the runners (a failed switch whose rollback failed too): its
    key equals no real set's, so the next call of any set switches, rewriting every weight."""

    @property
    def key(self) -> tuple[tuple[str, float], ...]:
        return (("<unknown>", 0.0),)


#: ``active`` after a switch failed and the previous set could not be restored either.
UNKNOWN = _UnknownSet()


@dataclass
class _Gate:
    cond: threading.Condition = field(default_factory=threading.Condition)
    in_flight: int = 0
    switching: bool = False
    waiting_other: int = 0


#: component -> the model part whose LoRA deltas it takes: ``unet_controlnet`` (the base UNet that
#: also takes ControlNet residuals) is the base UNet's weights again, so it switches with it --
#: otherwise a ControlNet call would run without the active LoRAs.
LORA_TARGETS = {**{p: p for p in LORA_PARTS}, "unet_controlnet": "unet"}


class LoraSwitcher:
    """The LoRA state of one pipeline's runners (text encoders, base UNet, and the ControlNet UNet).

    Internally keyed by *component* (:data:`LORA_TARGETS`); a LoRA's deltas are per model part.
    """

    def __init__(self, artifacts: Any, runners: Mapping[str, Any], lora_dir: str | Path | None = None):
        self.artifacts = artifacts
        self.runners = {c: runners[c] for c in LORA_TARGETS if c in runners}
        self.lora_dir = lora_dir
        #: False on servers: requests name LoRAs in ``lora_dir``, never file paths
        self.allow_paths = True
        self.active = LoraSet()
        self.last_switch: dict[str, Any] | None = None
        #: sha256 -> deltas (low-rank factors where the layer allows), least recently used first;
        #: bounded by :attr:`max_cached_bytes` (a set in use is re-read if it was evicted)
        self._deltas: OrderedDict[str, Deltas] = OrderedDict()
        self.max_cached_bytes = DEFAULT_CACHE_BYTES
        self._cache_lock = threading.Lock()  # resolve() may run on several threads
        self._base: dict[str, dict[str, torch.Tensor]] = {p: {} for p in self.runners}
        self._gate = _Gate()
        self._configs: dict[str, Any] | None = None

    # ---- resolving ------------------------------------------------------------------------------
    def resolve(self, loras: Mapping[str | Path, float] | None) -> LoraSet:
        """Check files and scales, compute (or reuse) each LoRA's deltas; changes nothing."""
        if not loras:
            return LoraSet()
        if not isinstance(loras, Mapping):
            raise InvalidLoraError(f"loras must be a mapping of file or name -> scale, not {type(loras).__name__}",
                                   "pass e.g. {'style.safetensors': 0.8}")
        items = []
        for name, scale in loras.items():
            lora = resolve_lora(name, self.lora_dir, allow_paths=self.allow_paths)
            value = check_scale(scale, str(name))
            self._cached(lora)
            items.append((lora, value))
        return LoraSet(tuple(items))

    def _cached(self, lora: LoraFile) -> Deltas:
        """The deltas of ``lora`` from the bounded cache, computed (diffusers' loader) on a miss."""
        with self._cache_lock:
            got = self._deltas.get(lora.sha256)
            if got is not None:
                self._deltas.move_to_end(lora.sha256)
                return got
        deltas = lora_deltas(lora, self._model_configs())
        with self._cache_lock:
            self._deltas[lora.sha256] = deltas
            self._deltas.move_to_end(lora.sha256)
            while len(self._deltas) > 1 and sum(map(deltas_bytes, self._deltas.values())) > self.max_cached_bytes:
                evicted, _ = self._deltas.popitem(last=False)
                log.info("LoRA cache: evicted %s (over %d MiB)", evicted[:12], self.max_cached_bytes >> 20)
        return deltas

    @property
    def cached_bytes(self) -> int:
        with self._cache_lock:
            return sum(map(deltas_bytes, self._deltas.values()))

    def _model_configs(self) -> dict[str, Any]:
        if self._configs is None:
            assets = self.artifacts.manifest.get("assets", {})
            configs: dict[str, Any] = {}
            for part in LORA_PARTS:
                cfg = _read_config(self.artifacts.root, assets.get(f"torch/{part}"))
                if cfg is None:
                    raise InvalidLoraError(f"{self.artifacts.root} records no config of {part} (torch/{part})",
                                           "re-export without --no-torch-weights to switch LoRAs at run time")
                configs[part] = cfg
            self._configs = config_objects(configs)
        return self._configs

    # ---- switching ------------------------------------------------------------------------------
    def _weights_for(self, lset: LoraSet, names: dict[str, set[str]]) -> dict[str, dict[str, torch.Tensor]]:
        """Per part: every name in ``names`` at base + the set's deltas (torch layout)."""
        out: dict[str, dict[str, torch.Tensor]] = {}
        for part, params in names.items():
            base = self._base_values(part, params)
            full = {n: base[n].clone() for n in params if base[n].numel()}  # empty: unused by the graph
            for lora, scale in lset.items:
                for n, d in self._cached(lora).get(LORA_TARGETS[part], {}).items():
                    if n in full:
                        full[n].add_(dense(d) * scale)
            out[part] = full
        return out

    def apply(self, lset: LoraSet) -> dict[str, Any]:
        """Make ``lset`` active on every runner (no call may be in flight: see :meth:`session`)."""
        t0 = time.perf_counter()
        touched = {p: set(self._base[p]) for p in self.runners}
        for lora, _ in lset.items:
            for part, d in self._cached(lora).items():
                components = [c for c, p in LORA_TARGETS.items() if p == part and c in self.runners]
                if not components:
                    raise InvalidLoraError(f"LoRA {lora.name} touches {part}, which this pipeline did not load",
                                           "open the pipeline with every component")
                for c in components:
                    touched[c] |= set(d)
        touched = {p: n for p, n in touched.items() if n}
        new = self._weights_for(lset, touched)
        per_runner: dict[str, float] = {}
        started: list[str] = []  # parts whose runner was asked to change (the failing one too:
        try:                      # a failed TensorRT refit may have replaced some of its weights)
            for part, weights in new.items():
                t1 = time.perf_counter()
                started.append(part)
                self._set(part, weights)
                per_runner[part] = round((time.perf_counter() - t1) * 1000, 2)
        except BaseException:
            self._roll_back(started, touched)
            raise
        self.active = lset
        ms = round((time.perf_counter() - t0) * 1000, 2)
        backend = next((r.backend for r in self.runners.values()), "?")
        self.last_switch = {"backend": backend, "switch_ms": ms, "components": per_runner,
                            "weights": sum(len(w) for w in new.values()), "loras": lset.describe()}
        log.info("LoRA switch on %s: %s in %.1f ms (%d weights rewritten)", backend,
                 ", ".join(f"{f.name}:{s:g}" for f, s in lset.items) or "base", ms, self.last_switch["weights"])
        return self.last_switch

    def _roll_back(self, parts: list[str], touched: Mapping[str, set[str]]) -> None:
        """Give ``parts`` the active set's weights again; when that fails too, no set is known to
        be on the runners: ``active`` becomes :data:`UNKNOWN`, so the next call rewrites them."""
        try:
            back = self._weights_for(self.active, {p: set(self._base[p]) & touched[p] for p in parts})
            for part in parts:
                self._set(part, back[part])
        except Exception as exc:  # noqa: BLE001 - the original error is what the caller sees
            log.error("LoRA switch: restoring the previous set failed too (%s); the next call rewrites "
                      "every LoRA weight", exc)
            self.active = UNKNOWN

    def _set(self, part: str, weights: Mapping[str, torch.Tensor]) -> None:
        runner = self.runners[part]
        if runner.weight_keys == "torch":
            runner.set_weights(weights)
            return
        mapping = self._param_map(part)["map"]
        graph: dict[str, torch.Tensor] = {}
        for name, value in weights.items():
            if name not in mapping:  # unused by the graph (checked in _base_values)
                continue
            init, transposed = mapping[name]
            graph[init] = value.t().contiguous() if transposed else value
        runner.set_weights(graph)

    def _param_map(self, part: str) -> dict[str, Any]:
        params = self.artifacts.component(part).get("parameters")
        if not isinstance(params, dict):
            raise InvalidLoraError(f"{self.artifacts.root}: the {part} export records no parameter map",
                                   f"re-export with this sdxl-export (sdxl-export export --out {self.artifacts.root})")
        return params

    def _base_values(self, part: str, names: set[str]) -> dict[str, torch.Tensor]:
        """Base values of ``names`` (read once, kept: they are what every later switch starts from)."""
        cache = self._base[part]
        missing = sorted(names - set(cache))
        if missing:
            if self.runners[part].weight_keys == "torch":
                cache.update(_read_torch_weights(self.artifacts, LORA_TARGETS[part], missing))
            else:
                params = self._param_map(part)
                mapping, shared = params["map"], set(params.get("shared", ()))
                bad = [n for n in missing if n in shared]
                if bad:
                    raise InvalidLoraError(
                        f"{part}: the LoRA changes {bad[0]}, which the exported graph shares with other weights",
                        "fuse this LoRA at export time instead (sdxl-export export --lora FILE:SCALE)")
                # Parameters the graph does not compute with (recorded as unused) keep a base of
                # their own: they are tracked, never sent.
                cache.update(_read_onnx_weights(self.artifacts, part, {n: mapping[n] for n in missing if n in mapping}))
                cache.update({n: torch.zeros(0) for n in missing if n not in mapping})
        return {n: cache[n] for n in names}

    # ---- the gate -------------------------------------------------------------------------------
    @contextlib.contextmanager
    def session(self, lset: LoraSet, *, hold: bool = True) -> Iterator[dict[str, Any] | None]:
        """Run one call with ``lset`` active (``hold=False``: only make it active, as ``set_loras``).

        Yields the switch record when this call switched, else None.
        """
        g = self._gate
        switched = None
        mine = False
        with g.cond:
            other = self.active.key != lset.key
            if other:
                g.waiting_other += 1
            try:
                while True:
                    if not g.switching and self.active.key == lset.key and (not g.waiting_other or other):
                        break
                    if not g.switching and g.in_flight == 0 and self.active.key != lset.key:
                        g.switching = mine = True
                        break
                    g.cond.wait()
                if hold and not mine:
                    g.in_flight += 1  # in the same critical section as the check: no switch between
            finally:
                if other:
                    g.waiting_other -= 1
        if mine:
            try:
                switched = self.apply(lset)
            finally:
                with g.cond:
                    g.switching = False
                    if hold and self.active.key == lset.key:
                        g.in_flight += 1  # before any other thread may see switching=False
                    g.cond.notify_all()
        if not hold:
            yield switched
            return
        try:
            yield switched
        finally:
            with g.cond:
                g.in_flight -= 1
                g.cond.notify_all()


def _read_config(root: Path, asset: Any) -> dict[str, Any] | None:
    import json

    if not isinstance(asset, dict):
        return None
    path = root / asset.get("dir", "") / "config.json"
    return json.loads(path.read_text()) if path.is_file() else None


def _read_torch_weights(artifacts: Any, part: str, names: list[str]) -> dict[str, torch.Tensor]:
    from safetensors import safe_open

    asset = artifacts.manifest.get("assets", {}).get(f"torch/{part}") or {}
    folder = artifacts.root / asset.get("dir", f"torch/{part}")
    out: dict[str, torch.Tensor] = {}
    wanted = set(names)
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            for key in wanted & set(f.keys()):
                out[key] = f.get_tensor(key).to(torch.float32)
    lost = wanted - set(out)
    if lost:
        raise InvalidLoraError(f"{folder} lacks {len(lost)} weight(s) the LoRA changes (e.g. {min(lost)})",
                               "re-export the model (its torch/ weights are incomplete)")
    return out


def _read_onnx_weights(artifacts: Any, part: str, where: Mapping[str, list[Any]]) -> dict[str, torch.Tensor]:
    import onnx
    from onnx import numpy_helper

    path = artifacts.root / artifacts.component(part)["file"]
    model = onnx.load(str(path), load_external_data=False)
    inits = {i.name: i for i in model.graph.initializer}
    out = {}
    for name, (init, transposed) in where.items():
        t = torch.from_numpy(numpy_helper.to_array(inits[init], base_dir=str(path.parent)).copy())
        out[name] = t.t().contiguous() if transposed else t
    return out


__all__ = ["LoraSet", "LoraSwitcher"]
