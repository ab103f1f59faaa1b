"""Per-request LoRA sets: names from the server's LoRA folder, never paths.

A request names LoRAs by the file name (without ``.safetensors``) of a file in
``--lora-dir``: the native and OpenAI APIs take ``"loras": {"name": scale}``, the A1111 API
takes the web UI's ``<lora:name:scale>`` prompt tags, which are parsed and removed from the
prompt (never passed to the text encoders). The set is part of the batch key, so queued
requests are grouped by LoRA set; the pipeline switches sets between calls (waiting for the
calls in flight) and every call runs on exactly the set it names.

Checked at admission (cheap): the name exists in the folder, the scale is a finite number in
range. Reading the file and fitting it to the model happens on the worker, once per file
content (the pipeline caches the deltas); a file that does not fit is a 400 naming it.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .common import ParamError

#: ``<lora:name>`` or ``<lora:name:scale>`` (the web UI's extra-network syntax).
LORA_TAG = re.compile(r"<lora:([^:<>]+)(?::([^:<>]*))?(?::[^<>]*)?>", re.IGNORECASE)
MAX_LORAS = 8

LoraKey = tuple[tuple[str, float], ...]


def available(lora_dir: Path | None) -> list[str]:
    """Names of the LoRA files in the folder (sorted), ``[]`` when there is none."""
    from ..lora.files import available_loras

    return available_loras(lora_dir)


def check(loras: Any, lora_dir: Path | None, param: str = "loras") -> LoraKey:
    """``{name: scale}`` from a request -> the sorted batch key; every problem names ``param``."""
    from ..errors import InvalidLoraError
    from ..lora.files import check_scale, is_lora_name

    if loras is None or loras == {}:
        return ()
    if not isinstance(loras, Mapping):
        raise ParamError(param, f"'{param}' must be an object of LoRA name -> scale", "pass e.g. {\"style\": 0.8}")
    if lora_dir is None:
        raise ParamError(param, "this server has no LoRA folder", "start it with --lora-dir DIR")
    if len(loras) > MAX_LORAS:
        raise ParamError(param, f"{len(loras)} LoRAs requested, at most {MAX_LORAS}", "ask for fewer LoRAs")
    names = available(lora_dir)
    out: dict[str, float] = {}
    for name, scale in loras.items():
        if not isinstance(name, str) or not is_lora_name(name) or name not in names:
            shown = ", ".join(names) or "none"
            raise ParamError(param, f"LoRA {name!r} is not in this server's LoRA folder",
                             f"use one of: {shown} (GET /sdapi/v1/loras)")
        try:
            out[name] = check_scale(scale, name)
        except InvalidLoraError as exc:  # restated for this field
            raise ParamError(param, exc.message, "pass a scale such as 0.8") from None
    return tuple(sorted(out.items()))


def split_prompt_tags(prompt: str) -> tuple[str, dict[str, Any]]:
    """The web UI's ``<lora:name:scale>`` tags out of a prompt: (prompt without them, {name: scale}).

    A tag without a scale means 1.0; the same LoRA twice adds up (as the web UI's multiplier).
    """
    found: dict[str, Any] = {}

    def take(m: re.Match[str]) -> str:
        name, scale = m.group(1).strip(), (m.group(2) or "").strip()
        try:
            value = float(scale) if scale else 1.0
        except ValueError:
            raise ParamError("prompt", f"LoRA tag {m.group(0)!r} has no numeric scale",
                             "write it as <lora:name:0.8>") from None
        found[name] = found.get(name, 0.0) + value
        return ""

    return LORA_TAG.sub(take, prompt), found  # the web UI removes the tag and nothing else
