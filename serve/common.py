"""What the three APIs share: field readers that name the field, seeds, PNG encoding.

Each API module (``openai_api``, ``a1111_api``, ``native_api``) turns a JSON body into a
:class:`ParsedRequest` (prompts, negatives, seeds, pipeline arguments) and results into its
own response shape. A bad field is a :class:`ParamError` naming it, which ``app.py`` renders
in that API's error shape with status 400.
"""

from __future__ import annotations

import base64
import io
import math
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..errors import InvalidRequestError

#: Seeds are 64-bit (torch.Generator.manual_seed); image i of a request uses seed + i.
SEED_LIMIT = 2**64


class ParamError(InvalidRequestError):
    """One request field is missing, of the wrong type, or has a value we cannot honour."""

    def __init__(self, param: str, message: str, hint: str | None = None, code: str = "invalid_value"):
        super().__init__(message, hint)
        self.param = param
        self.code = code
        if code in ("model_not_found", "sampler_not_found"):
            self.http_status = 404


@dataclass
class ParsedRequest:
    """One API request in the runtime's terms."""

    prompts: list[str]
    negatives: list[str] | None
    seeds: list[int]
    kwargs: dict[str, Any]
    #: Echo of the request for the response (A1111 ``parameters``, logs).
    echo: dict[str, Any] = field(default_factory=dict)
    #: img2img: the input image of each output image (PIL), else None.
    images: list[Any] | None = None
    #: What the server changed and says so (``--size-policy nearest``: the size snapped).
    notes: list[str] = field(default_factory=list)

    #: inpainting: the mask of each output image (PIL, white = repaint), else None.
    masks: list[Any] | None = None
    #: applied to each finished image before it is encoded: ``post(index, image) -> image``
    #: (A1111's paste-back of the original outside the mask), else None.
    post: Any = None


#: Deepest JSON nesting a body may have: every API's body is an object of scalars, lists and
#: small objects; deeper bodies only exercise parsers (Python's json recursion, FastAPI's encoder).
MAX_JSON_DEPTH = 32


def loads_json(raw: bytes) -> Any:
    """A request body as JSON; malformed, or nested deeper than :data:`MAX_JSON_DEPTH`, is a 400."""
    import json

    try:
        value = json.loads(raw or b"null")
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ParamError("body", f"the request body is not valid JSON ({exc})", "send a JSON object") from None
    except RecursionError:
        value = None
        depth = MAX_JSON_DEPTH + 1
    else:
        depth = json_depth(value, MAX_JSON_DEPTH)
    if depth > MAX_JSON_DEPTH:
        raise ParamError("body", f"the request body nests deeper than {MAX_JSON_DEPTH} levels",
                         "send a flat JSON object (the API's fields)")
    return value


def json_depth(value: Any, limit: int) -> int:
    """Nesting depth of a parsed JSON value, counted without recursion; stops past ``limit``."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, (dict, list)):
            deepest = max(deepest, depth)
            if deepest > limit:
                return deepest
            stack.extend((v, depth + 1) for v in (item.values() if isinstance(item, dict) else item))
    return deepest


def body_dict(body: Any) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise ParamError("body", "the request body must be a JSON object", "send a JSON object")
    return body


def _value(body: Mapping[str, Any], key: str, default: Any) -> Any:
    """A field's value; JSON ``null`` means "not given" (the default), as generated clients send it."""
    value = body.get(key)
    return default if value is None else value


def get_str(body: Mapping[str, Any], key: str, default: str | None = None, *, required: bool = False,
            allow_none: bool = True) -> str | None:
    value = _value(body, key, default)
    if value is None:
        if required or not allow_none:
            raise ParamError(key, f"'{key}' is required", f"pass '{key}' as a string", code="missing_required")
        return None
    if not isinstance(value, str):
        raise ParamError(key, f"'{key}' must be a string, got {type(value).__name__}", f"pass '{key}' as a string")
    return value


def get_int(body: Mapping[str, Any], key: str, default: int | None, *, lo: int | None = None,
            hi: int | None = None) -> int | None:
    value = _value(body, key, default)
    if value is None:
        return None
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ParamError(key, f"'{key}' must be an integer, got {value!r}", f"pass '{key}' as an integer")
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        rng = f"{lo if lo is not None else '-inf'}..{hi if hi is not None else 'inf'}"
        raise ParamError(key, f"'{key}' must be in {rng}, got {value}", f"pass '{key}' in {rng}")
    return int(value)


def get_float(body: Mapping[str, Any], key: str, default: float | None, *, lo: float | None = None,
              hi: float | None = None, lo_open: bool = False, hi_open: bool = False) -> float | None:
    value = _value(body, key, default)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ParamError(key, f"'{key}' must be a finite number, got {value!r}", f"pass '{key}' as a number")
    bad_lo = lo is not None and (value <= lo if lo_open else value < lo)
    bad_hi = hi is not None and (value >= hi if hi_open else value > hi)
    if bad_lo or bad_hi:
        rng = f"{'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}"
        raise ParamError(key, f"'{key}' must be in {rng}, got {value}", f"pass '{key}' in {rng}")
    return float(value)


def get_bool(body: Mapping[str, Any], key: str, default: bool | None) -> bool | None:
    value = _value(body, key, default)
    if value is None:
        return None
    if not isinstance(value, bool):
        raise ParamError(key, f"'{key}' must be true or false, got {value!r}", f"pass '{key}' as a boolean")
    return value


def seeds_for(seed: int | None, n: int, key: str = "seed") -> list[int]:
    """Seeds of ``n`` images: ``seed, seed + 1, ...`` (A1111's rule; each image is
    reproducible alone with its own seed). No seed (or -1): a random one."""
    if seed is None or seed == -1:
        seed = secrets.randbits(63)
    if seed < 0 or seed + n > SEED_LIMIT:
        raise ParamError(key, f"'{key}' must be in 0..2**64-{n} (or -1 for random), got {seed}",
                         "pass a non-negative seed, or -1 for a random one")
    return [seed + i for i in range(n)]


def decode_image(value: Any, key: str) -> Any:
    """An uploaded image (base64, or a ``data:image/...;base64,`` URL as webuiapi sends it) as an
    RGB PIL image; anything else is a :class:`ParamError` naming ``key``. Images over the
    request's pixel cap (``limits.MAX_IMAGE_PIXELS``) are refused from their header, undecoded."""
    from ..errors import InvalidImageError
    from ..runtime import read_image

    if not isinstance(value, str) or not value:
        raise ParamError(key, f"'{key}' must be a base64 image (or a data URL), got {type(value).__name__}",
                         f"send '{key}' as base64 PNG/JPEG/WebP")
    data = value.split(",", 1)[1] if value.startswith("data:") and "," in value else value
    try:
        raw = base64.b64decode(data, validate=True)
    except ValueError:
        raise ParamError(key, f"'{key}' is not valid base64", f"send '{key}' as base64 PNG/JPEG/WebP") from None
    from .limits import MAX_IMAGE_PIXELS

    try:
        return read_image(raw, what=key, max_pixels=MAX_IMAGE_PIXELS.get())
    except InvalidImageError as exc:
        raise ParamError(key, exc.message, exc.hint) from None


def png_b64(image: Any) -> str:
    """A PIL image as base64 PNG (no data-URL prefix, as OpenAI and A1111 send it)."""
    buf = io.BytesIO()
    image.save(buf, format="PNG", compress_level=4)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def reject_unknown(body: Mapping[str, Any], known: Sequence[str] | set[str], *, where: str) -> None:
    for key in body:
        if key not in known:
            raise ParamError(key, f"Unrecognized request argument supplied: {key}",
                             f"remove '{key}'; {where} takes: {', '.join(sorted(known))}", code="unknown_parameter")
