"""``ServeConfig``: every knob of ``sdxl-export serve``, checked once at start.

One frozen dataclass, built by the CLI (``serve/cli.py``) or by a user's own code (Ray Serve
config files pass the same fields as keyword arguments to ``sdxl_export.serve:app``).
Immutable, so the event loop, the worker thread and Ray replicas may all read it freely.
"""

from __future__ import annotations

import base64
import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..artifacts import DEFAULT_ARTIFACTS
from ..errors import SDXLExportError


class ServeConfigError(SDXLExportError):
    """A serve option is invalid (size list, auth string, limits)."""


def parse_size(text: str, what: str = "size") -> tuple[int, int]:
    """``"WxH"`` (OpenAI's order: width first) -> ``(height, width)``."""
    m = re.fullmatch(r"\s*(\d{1,5})\s*[xX*]\s*(\d{1,5})\s*", str(text))
    if not m:
        raise ServeConfigError(f"invalid {what} {text!r}", "write sizes as WIDTHxHEIGHT, e.g. 1024x1024")
    w, h = int(m.group(1)), int(m.group(2))
    return h, w


def parse_sizes(text: str | None) -> tuple[tuple[int, int], ...]:
    """``--warmup``: ``"1024x1024,1216x832"`` -> ((1024, 1024), (832, 1216)); ``native``/empty allowed."""
    if not text:
        return ()
    out = []
    for part in str(text).split(","):
        part = part.strip()
        if part:
            out.append((0, 0) if part == "native" else parse_size(part, "--warmup size"))
    return tuple(out)


def parse_basic_auth(text: str) -> tuple[str, str]:
    user, sep, password = str(text).partition(":")
    if not sep or not user or not password:
        raise ServeConfigError("--api-auth must be USER:PASSWORD", "pass e.g. --api-auth alice:s3cret")
    return user, password


@dataclass(frozen=True)
class ServeConfig:
    """Options of one serving replica (embedded or on Ray)."""

    artifacts: Path = DEFAULT_ARTIFACTS
    backend: str = "auto"
    device: str = "auto"
    backend_options: dict[str, Any] = field(default_factory=dict)
    host: str = "127.0.0.1"
    port: int = 8000
    #: Largest pipeline call (images); None: the largest batch the engines serve, capped at 8.
    max_batch_size: int | None = None
    batch_wait_ms: float = 20.0
    #: Images waiting for a batch (not counting the batch running); beyond it: 429.
    max_queue: int = 32
    #: Seconds from arrival to response; beyond it: 504.
    timeout_s: float = 600.0
    api_key: str | None = field(default=None, repr=False)
    basic_auth: tuple[str, str] | None = field(default=None, repr=False)
    #: Sizes (height, width) run once before the replica reports ready; (0, 0) = native.
    warmup: tuple[tuple[int, int], ...] = ((0, 0),)
    warmup_steps: int = 2
    #: Request body cap: img2img uploads a base64 image (a 1024x1024 PNG is 1-4 MiB in base64).
    max_body_bytes: int = 32 << 20
    max_prompt_chars: int = 4000
    #: Images per request (OpenAI ``n``, A1111 ``batch_size * n_iter``).
    max_images_per_request: int = 8
    max_steps: int = 150
    cors_origins: tuple[str, ...] = ()
    #: Seconds SIGTERM waits for accepted requests to finish before exiting.
    grace_s: float = 60.0
    #: Model id reported by /v1/models and /sdapi/v1/sd-models (default: the artifact folder's name).
    model_name: str | None = None
    load_refiner: bool = True
    #: LoRA files requests may name (``{"loras": {name: scale}}``, A1111 ``<lora:name:scale>``).
    lora_dir: Path | None = None
    #: Pixels (h x w) of one output image; None: the largest served size.
    max_pixels: int | None = None
    #: Pixels of one uploaded image (init image, mask, control image), checked from its header
    #: before decoding; uploads are resized to the output size, so they may be larger than it.
    max_upload_pixels: int = 4096 * 4096
    #: ``exact``: a size the engines do not serve is a 400; ``nearest``: it runs at the nearest
    #: served size and the response says so.
    size_policy: str = "exact"
    #: Other model ids clients may send (OpenAI ``model``: e.g. dall-e-3), all this model.
    model_aliases: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        checks = [
            (self.max_batch_size is None or self.max_batch_size >= 1, "--max-batch-size must be >= 1"),
            (self.batch_wait_ms >= 0, "--batch-wait-ms must be >= 0"),
            (self.max_queue >= 1, "--max-queue must be >= 1"),
            (self.timeout_s > 0, "--timeout must be > 0"),
            (1 <= self.max_images_per_request <= self.max_queue,
             ("the images-per-request cap must be between 1 and --max-queue (a larger request could never "
              "be admitted)")),
            (self.max_body_bytes >= 1024, "--max-body-mb must be >= 1 KiB (0.001)"),
            (0 < self.port < 65536, "--port must be 1..65535"),
            (self.grace_s >= 0, "the grace period must be >= 0"),
            (self.api_key is None or len(self.api_key) >= 8, "--api-key must be at least 8 characters"),
            (self.max_pixels is None or self.max_pixels >= 64 * 64, "--max-pixels must be >= 4096"),
            (self.max_upload_pixels >= 64 * 64, "--max-upload-pixels must be >= 4096"),
            (self.size_policy in ("exact", "nearest"), "--size-policy must be exact or nearest"),
            (self.max_steps >= 1, "the steps cap must be >= 1"),
        ]
        for ok, what in checks:
            if not ok:
                raise ServeConfigError(what, "fix the option and start again")

    @property
    def auth_required(self) -> bool:
        return self.api_key is not None or self.basic_auth is not None

    def basic_token(self) -> str | None:
        if self.basic_auth is None:
            return None
        return base64.b64encode(f"{self.basic_auth[0]}:{self.basic_auth[1]}".encode()).decode()

    def replace(self, **changes: Any) -> ServeConfig:
        return dataclasses.replace(self, **changes)

    @property
    def served_model_name(self) -> str:
        return self.model_name or Path(self.artifacts).resolve().name or "sdxl"

    @property
    def model_ids(self) -> list[str]:
        """The served model id, then its aliases (each listed by ``/v1/models``)."""
        return [self.served_model_name, *(a for a in self.model_aliases if a != self.served_model_name)]

    @classmethod
    def from_strings(cls, values: dict[str, Any]) -> ServeConfig:
        """A config from ``key=value`` strings (``serve run sdxl_export.serve:app k=v``, Ray
        config files), each converted to its field's type: booleans from true/false/1/0/yes/no,
        tuples from comma-separated text, paths, numbers, JSON objects. Values already of the
        right type pass unchanged. An unknown key or a value that does not convert is a
        :class:`ServeConfigError` naming it."""
        import typing

        hints = typing.get_type_hints(cls)
        out: dict[str, Any] = {}
        for key, value in values.items():
            if key not in hints:
                raise ServeConfigError(f"unknown serve option {key!r}",
                                       f"use one of: {', '.join(sorted(hints))}")
            try:
                out[key] = _convert(value, hints[key])
            except (TypeError, ValueError) as exc:
                raise ServeConfigError(f"serve option {key}={value!r}: {exc}",
                                       f"pass a value of type {hints[key]}") from None
        return cls(**out)


_TRUE, _FALSE = {"true", "1", "yes", "on"}, {"false", "0", "no", "off", ""}


def _convert(value: Any, hint: Any) -> Any:
    """``value`` (often a string) as an instance of the type ``hint``."""
    import json
    import types
    import typing

    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if (value is None or (isinstance(value, str) and value.lower() in ("none", "null"))) and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _convert(value, inner[0])
    if hint is bool:
        if isinstance(value, bool):
            return value
        text = str(value).strip().lower()
        if text in _TRUE:
            return True
        if text in _FALSE:
            return False
        raise ValueError("not a boolean (true/false)")
    if hint in (int, float):
        if isinstance(value, bool):
            raise ValueError("not a number")
        return hint(value)
    if hint is str:
        return str(value)
    if hint is Path:
        return Path(value)
    if origin is tuple:
        items = value if isinstance(value, (list, tuple)) else [v for v in str(value).split(",") if v.strip()]
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_convert(v.strip() if isinstance(v, str) else v, args[0]) for v in items)
        if args and all(a is int for a in args):  # a (w, h)-like pair
            return tuple(int(v) for v in items)
        return tuple(items)
    if origin is dict or hint is dict:
        return dict(json.loads(value) if isinstance(value, str) else value)
    return value


def config_from_args(args: dict[str, Any]) -> ServeConfig:
    """``key=value`` arguments (strings from ``serve run``, typed values from a config file) ->
    :class:`ServeConfig`, each value converted to its field's type (``load_refiner=false`` is
    False, ``cors_origins=a,b`` two origins); ``api_auth`` is ``USER:PASS``, ``warmup``
    ``WxH,...``, ``model_aliases`` comma-separated."""
    kwargs: dict[str, Any] = {}
    for key, value in args.items():
        if key == "api_auth":
            kwargs["basic_auth"] = parse_basic_auth(value)
        elif key == "warmup":
            kwargs[key] = parse_sizes(value) if isinstance(value, str) else value
        else:
            kwargs[key] = value
    special = {k: kwargs.pop(k) for k in ("basic_auth", "warmup") if k in kwargs}
    return ServeConfig.from_strings(kwargs).replace(**special) if special else ServeConfig.from_strings(kwargs)
