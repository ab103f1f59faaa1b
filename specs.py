"""Declarative I/O specs of the six SDXL components.

One :class:`ComponentSpec` per component is the single source of truth for
  * the exporter: input/output names and ``dynamic_axes``;
  * the engine builder: which dims an optimization profile ranges over;
  * the runtime: the buffers it allocates and the checks it makes on every call.

Specs are derived from the model's config (context dim, pooled dim, number of time ids
...) by :func:`component_specs`, serialised into the export manifest with
:meth:`ComponentSpec.to_dict`, and rebuilt by the runtime with
:meth:`ComponentSpec.from_dict` -- the runtime never imports the exporter.

Symbolic dims: ``batch`` (the UNet's batch is 2x the prompt batch under classifier-free
guidance), ``latent_height``/``latent_width`` (pixels / vae_scale) and ``height``/``width``
(pixels). Every other dim is a fixed integer.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from .errors import InputMismatchError, InvalidRequestError

MAX_TOKENS = 77

SYMBOLIC_DIMS = ("batch", "latent_height", "latent_width", "height", "width")

#: Deeper UNet levels' latent sizes (``latent_height_2`` = ceil(latent_height / 2), ...): the
#: ControlNet residuals are at every level's resolution (a stride-2 conv rounds up).
LEVEL_FACTORS = (2, 4, 8)

COMPONENTS = ("text_encoder", "text_encoder_2", "unet", "refiner_unet", "vae_decoder", "vae_encoder")

_NP_DTYPES = {"float32": np.float32, "float16": np.float16, "int32": np.int32, "int64": np.int64}

Dim = int | str


@dataclass(frozen=True)
class TensorSpec:
    """Name, dtype and shape of one input or output; str dims are symbolic."""

    name: str
    dtype: str
    shape: tuple[Dim, ...]

    def concrete(self, dims: Mapping[str, int]) -> tuple[int, ...]:
        return tuple(d if isinstance(d, int) else int(dims[d]) for d in self.shape)

    @property
    def np_dtype(self) -> np.dtype:
        return np.dtype(_NP_DTYPES[self.dtype])

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> TensorSpec:
        return cls(d["name"], d["dtype"], tuple(d["shape"]))


@dataclass(frozen=True)
class Tolerance:
    """Max abs error allowed between ONNX Runtime and PyTorch (fp32) at validation."""

    atol: float
    rtol: float = 0.0


@dataclass(frozen=True)
class ComponentSpec:
    """Everything downstream needs to know about one exported component."""

    name: str
    kind: str  # "text_encoder" | "unet" | "vae_decoder" | "vae_encoder"
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    tolerance: Tolerance
    vae_scale: int = 8
    # The config values the sizes were derived from (recorded for humans and checks).
    config: Mapping[str, Any] = field(default_factory=dict)

    # ---- shapes -------------------------------------------------------------------
    def dims_for(self, batch: int, height: int, width: int) -> dict[str, int]:
        """Symbolic dim values for a request of ``batch`` items at ``height x width`` pixels."""
        if height % self.vae_scale or width % self.vae_scale:
            raise InvalidRequestError(
                f"{height}x{width} is not a multiple of {self.vae_scale}",
                f"pass a height and width divisible by {self.vae_scale}",
            )
        dims = {
            "batch": batch,
            "height": height,
            "width": width,
            "latent_height": height // self.vae_scale,
            "latent_width": width // self.vae_scale,
        }
        return level_dims(dims)

    def input_shapes(self, batch: int, height: int, width: int) -> dict[str, tuple[int, ...]]:
        dims = self.dims_for(batch, height, width)
        return {t.name: t.concrete(dims) for t in self.inputs}

    def output_shapes(self, batch: int, height: int, width: int) -> dict[str, tuple[int, ...]]:
        dims = self.dims_for(batch, height, width)
        return {t.name: t.concrete(dims) for t in self.outputs}

    def symbolic_dims(self) -> tuple[str, ...]:
        """The symbolic dims this component actually uses, in first-seen order."""
        seen: dict[str, None] = {}
        for t in (*self.inputs, *self.outputs):
            for d in t.shape:
                if isinstance(d, str):
                    seen.setdefault(d)
        return tuple(seen)

    def dynamic_axes(self) -> dict[str, dict[int, str]]:
        """``dynamic_axes`` for ``torch.onnx.export`` (inputs and outputs)."""
        out: dict[str, dict[int, str]] = {}
        for t in (*self.inputs, *self.outputs):
            axes = {i: d for i, d in enumerate(t.shape) if isinstance(d, str)}
            if axes:
                out[t.name] = axes
        return out

    @property
    def input_names(self) -> tuple[str, ...]:
        return tuple(t.name for t in self.inputs)

    @property
    def output_names(self) -> tuple[str, ...]:
        return tuple(t.name for t in self.outputs)

    # ---- example inputs -----------------------------------------------------------
    def example_inputs(self, batch: int, height: int, width: int, seed: int = 0) -> dict[str, np.ndarray]:
        """Plausible inputs for tracing and validation (token ids in vocab range)."""
        rng = np.random.default_rng(seed)
        dims = self.dims_for(batch, height, width)
        out: dict[str, np.ndarray] = {}
        for t in self.inputs:
            shape = t.concrete(dims)
            if t.name == "input_ids":
                vocab = int(self.config.get("vocab_size", 1000))
                ids = rng.integers(1, vocab - 2, size=shape)
                ids[:, 0] = vocab - 2  # bos
                ids[:, -1] = vocab - 1  # eos (highest id: CLIP pools at argmax)
                out[t.name] = ids.astype(t.np_dtype)
            elif t.name == "timestep":
                out[t.name] = np.asarray(rng.uniform(1, 999, size=shape), dtype=t.np_dtype)
            elif t.name in ("controlnet_cond", "conditioning_scale"):  # a control map in [0, 1]; scales
                out[t.name] = np.asarray(rng.uniform(0.0 if t.name == "controlnet_cond" else 0.5, 1.0 if
                                                     t.name == "controlnet_cond" else 1.5, size=shape), dtype=t.np_dtype)
            elif t.name == "time_ids":
                # base: (orig h, orig w, crop top, crop left, target h, target w);
                # refiner: (orig h, orig w, crop top, crop left, aesthetic score).
                base: list[float] = [float(height), float(width), 0.0, 0.0]
                base += [6.0] if shape[1] == 5 else [float(height), float(width)]
                out[t.name] = np.tile(np.asarray(base, dtype=t.np_dtype), (shape[0], 1))
            else:
                out[t.name] = rng.standard_normal(shape).astype(t.np_dtype)
        return out

    # ---- checks ---------------------------------------------------------------------
    def check_inputs(self, feeds: Mapping[str, Any]) -> tuple[int, int, int]:
        """Check names, dtypes and shapes; return the (batch, height, width) they imply.

        Works for numpy arrays and torch tensors (anything with ``.shape`` and ``.dtype``).
        """
        names = set(feeds)
        want = set(self.input_names)
        if names != want:
            raise InputMismatchError(
                f"{self.name}: got inputs {sorted(names)}, expected {sorted(want)}",
                "pass exactly the inputs the component spec names",
            )
        bound: dict[str, int] = {}
        for t in self.inputs:
            arr = feeds[t.name]
            dt = str(arr.dtype).replace("torch.", "")
            if dt != t.dtype:
                raise InputMismatchError(
                    f"{self.name}.{t.name}: dtype {dt}, expected {t.dtype}",
                    f"cast the input to {t.dtype}",
                )
            shape = tuple(int(s) for s in arr.shape)
            if len(shape) != len(t.shape):
                raise InputMismatchError(
                    f"{self.name}.{t.name}: rank {len(shape)} {shape}, expected {t.shape}",
                    "pass a tensor of the spec's rank",
                )
            for got, d in zip(shape, t.shape):
                if isinstance(d, int):
                    if got != d:
                        raise InputMismatchError(
                            f"{self.name}.{t.name}: shape {shape}, expected {t.shape}",
                            "fixed dims must match the spec exactly",
                        )
                elif bound.setdefault(d, got) != got:
                    raise InputMismatchError(
                        f"{self.name}.{t.name}: dim {d}={got} disagrees with {bound[d]} from another input",
                        "all inputs must agree on batch and size",
                    )
        s = self.vae_scale
        height = bound.get("height", bound.get("latent_height", 0) * s)
        width = bound.get("width", bound.get("latent_width", 0) * s)
        return bound.get("batch", 1), height, width

    # ---- serialisation --------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "kind": self.kind,
            "inputs": [t.to_dict() for t in self.inputs],
            "outputs": [t.to_dict() for t in self.outputs],
            "tolerance": asdict(self.tolerance),
            "vae_scale": self.vae_scale,
            "config": dict(self.config),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ComponentSpec:
        return cls(
            name=d["name"],
            kind=d["kind"],
            inputs=tuple(TensorSpec.from_dict(t) for t in d["inputs"]),
            outputs=tuple(TensorSpec.from_dict(t) for t in d["outputs"]),
            tolerance=Tolerance(**d["tolerance"]),
            vae_scale=int(d.get("vae_scale", 8)),
            config=dict(d.get("config", {})),
        )


@dataclass(frozen=True)
class ModelDims:
    """The handful of numbers the specs derive from a model's configs."""

    vocab_size: int
    text_hidden: int  # text_encoder hidden size (768 in SDXL)
    text2_hidden: int  # text_encoder_2 hidden size (1280)
    pooled_dim: int  # text_encoder_2 projection dim (1280)
    unet_context: int  # base UNet cross_attention_dim (2048 = 768 + 1280)
    unet_time_ids: int  # 6
    refiner_context: int | None  # 1280, None without a refiner
    refiner_time_ids: int | None  # 5
    latent_channels: int = 4
    vae_scale: int = 8
    sample_size: int = 128  # UNet sample_size (latents); native pixels = sample_size * vae_scale
    #: The base UNet's input channels when they differ from the latent channels: 9 for an
    #: inpainting UNet (latents + mask + masked-image latents, diffusers' layout). None: 4.
    unet_in_channels: int | None = None

    @property
    def native_size(self) -> int:
        return self.sample_size * self.vae_scale

    @property
    def inpainting(self) -> bool:
        """The base UNet is an inpainting UNet (it takes mask + masked-image latents too)."""
        return self.unet_in_channels not in (None, self.latent_channels)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        if d["unet_in_channels"] is None:  # manifests of ordinary models stay as they were
            del d["unet_in_channels"]
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ModelDims:
        return cls(**d)


def _text_encoder(name: str, hidden: int, pooled: int | None, dims: ModelDims) -> ComponentSpec:
    outputs = [TensorSpec("hidden_states", "float32", ("batch", MAX_TOKENS, hidden))]
    if pooled is not None:
        outputs.append(TensorSpec("text_embeds", "float32", ("batch", pooled)))
    return ComponentSpec(
        name=name,
        kind="text_encoder",
        inputs=(TensorSpec("input_ids", "int32", ("batch", MAX_TOKENS)),),
        outputs=tuple(outputs),
        tolerance=Tolerance(atol=1e-4, rtol=1e-4),
        vae_scale=dims.vae_scale,
        config={"vocab_size": dims.vocab_size, "hidden_size": hidden, "pooled_dim": pooled},
    )


def _unet(name: str, context: int, n_time_ids: int, dims: ModelDims, in_channels: int | None = None) -> ComponentSpec:
    """A UNet's spec; ``in_channels`` (9 for an inpainting UNet) widens ``sample`` only: the
    runtime concatenates latents, mask and masked-image latents into it, as diffusers does."""
    c = dims.latent_channels
    c_in = in_channels or c
    config: dict[str, Any] = {"context_dim": context, "pooled_dim": dims.pooled_dim, "time_ids": n_time_ids}
    if c_in != c:
        config["in_channels"] = c_in
    return ComponentSpec(
        name=name,
        kind="unet",
        inputs=(
            TensorSpec("sample", "float32", ("batch", c_in, "latent_height", "latent_width")),
            TensorSpec("timestep", "float32", (1,)),
            TensorSpec("encoder_hidden_states", "float32", ("batch", MAX_TOKENS, context)),
            TensorSpec("text_embeds", "float32", ("batch", dims.pooled_dim)),
            TensorSpec("time_ids", "float32", ("batch", n_time_ids)),
        ),
        outputs=(TensorSpec("noise_pred", "float32", ("batch", c, "latent_height", "latent_width")),),
        tolerance=Tolerance(atol=2e-4, rtol=1e-4),
        vae_scale=dims.vae_scale,
        config=config,
    )


def level_dims(dims: dict[str, int]) -> dict[str, int]:
    """``dims`` with every deeper level's latent size (``latent_height_F``) filled in."""
    for f in LEVEL_FACTORS:
        for side in ("height", "width"):
            if f"latent_{side}" in dims:
                dims.setdefault(f"latent_{side}_{f}", -(-dims[f"latent_{side}"] // f))
    return dims


def residual_specs(levels: Sequence[tuple[int, int]], mid_channels: int) -> tuple[TensorSpec, ...]:
    """The ControlNet residuals a base UNet adds: ``down_residual_K`` (channels, level) + ``mid_residual``.

    ``levels``: per down residual its channel count and level (0 = latent resolution), in the
    order diffusers' ``down_block_res_samples`` lists them; the mid residual is at the last level.
    """
    def spatial(level: int) -> tuple[str, str]:
        return ("latent_height", "latent_width") if level == 0 else (
            f"latent_height_{2 ** level}", f"latent_width_{2 ** level}")

    out = [TensorSpec(f"down_residual_{k}", "float32", ("batch", c, *spatial(lv)))
           for k, (c, lv) in enumerate(levels)]
    last = max(lv for _, lv in levels)
    out.append(TensorSpec("mid_residual", "float32", ("batch", mid_channels, *spatial(last))))
    return tuple(out)


def unet_controlnet_spec(dims: ModelDims, levels: Sequence[tuple[int, int]], mid_channels: int) -> ComponentSpec:
    """The base UNet that also takes ControlNet residuals (``unet_controlnet``): exported only
    when a ControlNet is, so the plain ``unet`` graph stays what it was."""
    plain = _unet("unet_controlnet", dims.unet_context, dims.unet_time_ids, dims)
    return ComponentSpec(
        name="unet_controlnet", kind="unet_controlnet",
        inputs=plain.inputs + residual_specs(levels, mid_channels), outputs=plain.outputs,
        tolerance=plain.tolerance, vae_scale=dims.vae_scale,
        config={**plain.config, "residual_levels": [list(x) for x in levels], "mid_channels": mid_channels},
    )


def controlnet_spec(name: str, dims: ModelDims, levels: Sequence[tuple[int, int]], mid_channels: int,
                    cond_channels: int = 3, config: Mapping[str, Any] | None = None) -> ComponentSpec:
    """One ControlNet (component ``controlnet_<name>``): the base UNet's inputs, the control image
    at pixel resolution, and ``conditioning_scale`` -- one scale per residual (guess mode's
    logspace times the scale, or the scale repeated), a tensor so that scales and windows need no
    rebuild -- to the scaled residuals."""
    plain = _unet(name, dims.unet_context, dims.unet_time_ids, dims)
    residuals = residual_specs(levels, mid_channels)
    return ComponentSpec(
        name=name, kind="controlnet",
        inputs=plain.inputs + (
            TensorSpec("controlnet_cond", "float32", ("batch", cond_channels, "height", "width")),
            TensorSpec("conditioning_scale", "float32", (len(residuals),)),
        ),
        outputs=residuals,
        tolerance=Tolerance(atol=5e-4, rtol=1e-4), vae_scale=dims.vae_scale,
        config={**plain.config, "residual_levels": [list(x) for x in levels], "mid_channels": mid_channels,
                **dict(config or {})},
    )


def component_specs(dims: ModelDims, with_refiner: bool = True) -> dict[str, ComponentSpec]:
    """The specs of every component of a model with these dims, keyed by name."""
    c = dims.latent_channels
    specs = {
        "text_encoder": _text_encoder("text_encoder", dims.text_hidden, None, dims),
        "text_encoder_2": _text_encoder("text_encoder_2", dims.text2_hidden, dims.pooled_dim, dims),
        "unet": _unet("unet", dims.unet_context, dims.unet_time_ids, dims, dims.unet_in_channels),
        "vae_decoder": ComponentSpec(
            name="vae_decoder",
            kind="vae_decoder",
            inputs=(TensorSpec("latent", "float32", ("batch", c, "latent_height", "latent_width")),),
            outputs=(TensorSpec("images", "float32", ("batch", 3, "height", "width")),),
            tolerance=Tolerance(atol=2e-3, rtol=1e-3),
            vae_scale=dims.vae_scale,
            config={"latent_channels": c},
        ),
        "vae_encoder": ComponentSpec(
            name="vae_encoder",
            kind="vae_encoder",
            inputs=(TensorSpec("images", "float32", ("batch", 3, "height", "width")),),
            # Posterior parameters (mean, logvar) of the latent Gaussian: 2 x latent channels.
            outputs=(TensorSpec("moments", "float32", ("batch", 2 * c, "latent_height", "latent_width")),),
            tolerance=Tolerance(atol=2e-3, rtol=1e-3),
            vae_scale=dims.vae_scale,
            config={"latent_channels": c},
        ),
    }
    if with_refiner and dims.refiner_context is not None:
        assert dims.refiner_time_ids is not None
        specs["refiner_unet"] = _unet("refiner_unet", dims.refiner_context, dims.refiner_time_ids, dims)
    return {k: specs[k] for k in COMPONENTS if k in specs}


def specs_from_dicts(items: Iterable[Mapping[str, Any]]) -> dict[str, ComponentSpec]:
    return {d["name"]: ComponentSpec.from_dict(d) for d in items}
