"""Prompt encoding for base and refiner, exactly as diffusers' SDXL ``encode_prompt``.

Base (``StableDiffusionXLPipeline``, ``force_zeros_for_empty_prompt=True``):
  context = concat(text_encoder penultimate hidden, text_encoder_2 penultimate hidden),
  pooled = text_encoder_2 ``text_embeds``; with guidance and ``negative_prompt=None`` the
  negative context and pooled are zeros, otherwise the negatives are encoded the same way.
Refiner (``StableDiffusionXLImg2ImgPipeline`` with ``text_encoder=None``,
``force_zeros_for_empty_prompt=False``):
  context = text_encoder_2 penultimate hidden, pooled = its ``text_embeds``; the negative is
  always encoded (``""`` when none is given).

The refiner shares text_encoder_2 with the base (diffusers' documented example passes
``text_encoder_2=base.text_encoder_2``), so its positive conditioning *is* the base's
text_encoder_2 output: it is reused, not recomputed. Encodings of the empty negative are
cached per batch size (the same every call), so a call with ``negative_prompt=None`` runs
the text encoders on the prompts only.

Tokenizers: CLIP's, from the artifact folder, padded to 77 and truncated with a logged
warning (as diffusers does). HF fast tokenizers are not safe to call from several
threads at once (their padding/truncation state is mutable), so calls are serialised.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from typing import Any

import torch

from ..specs import MAX_TOKENS
from .backends.base import ComponentRunner
from .timing import StageTimings

log = logging.getLogger(__name__)


@dataclass
class EncodedPrompts:
    """Conditioning of one call, at prompt batch B (not yet repeated per image)."""

    base_embeds: torch.Tensor  # (B, 77, C1 + C2)
    base_pooled: torch.Tensor  # (B, P)
    base_neg_embeds: torch.Tensor | None
    base_neg_pooled: torch.Tensor | None
    refiner_embeds: torch.Tensor | None = None  # (B, 77, C2)
    refiner_pooled: torch.Tensor | None = None
    refiner_neg_embeds: torch.Tensor | None = None
    refiner_neg_pooled: torch.Tensor | None = None


class PromptEncoder:
    """Tokenizers + the two text-encoder runners, with the empty-negative cache."""

    def __init__(self, tokenizer: Any, tokenizer_2: Any, text_encoder: ComponentRunner,
                 text_encoder_2: ComponentRunner):
        self.tokenizers = (tokenizer, tokenizer_2)
        self.text_encoder = text_encoder
        self.text_encoder_2 = text_encoder_2
        self._tok_lock = threading.Lock()
        self._cache_lock = threading.Lock()
        self._empty: dict[tuple[str, int], tuple[torch.Tensor, ...]] = {}

    # ---- tokens --------------------------------------------------------------------------------
    def tokenize(self, index: int, prompts: list[str]) -> torch.Tensor:
        """``(B, 77)`` int32 ids; warns (log) about any text cut at 77 tokens."""
        tok = self.tokenizers[index]
        with self._tok_lock:
            ids = tok(prompts, padding="max_length", max_length=MAX_TOKENS, truncation=True,
                      return_tensors="pt").input_ids
            full = tok(prompts, padding="longest", return_tensors="pt").input_ids
            if full.shape[-1] >= ids.shape[-1] and not torch.equal(ids, full):
                removed = tok.batch_decode(full[:, MAX_TOKENS - 1: -1])
                log.warning("the following part of your input was truncated because CLIP can only handle "
                            "sequences up to %d tokens: %s", MAX_TOKENS, removed)
        return ids.to(torch.int32)

    # ---- encoders ------------------------------------------------------------------------------
    def _encode_1(self, prompts: list[str], timings: StageTimings) -> torch.Tensor:
        ids = self.tokenize(0, prompts)
        with timings.measure("text_encoder"):
            return self.text_encoder({"input_ids": ids})["hidden_states"]

    def _encode_2(self, prompts: list[str], timings: StageTimings,
                  stage: str = "text_encoder_2") -> tuple[torch.Tensor, torch.Tensor]:
        ids = self.tokenize(1, prompts)
        with timings.measure(stage):
            out = self.text_encoder_2({"input_ids": ids})
        return out["hidden_states"], out["text_embeds"]

    def _cached(self, key: tuple[str, int], compute: Any) -> tuple[torch.Tensor, ...]:
        with self._cache_lock:
            hit = self._empty.get(key)
        if hit is None:
            hit = compute()
            with self._cache_lock:
                hit = self._empty.setdefault(key, hit)
        return hit

    def _negative_1(self, negatives: list[str], timings: StageTimings) -> torch.Tensor:
        if all(n == "" for n in negatives):
            return self._cached(("te1", len(negatives)), lambda: (self._encode_1(negatives, timings),))[0]
        return self._encode_1(negatives, timings)

    def _negative_2(self, negatives: list[str], timings: StageTimings,
                    stage: str = "text_encoder_2") -> tuple[torch.Tensor, torch.Tensor]:
        if all(n == "" for n in negatives):
            h, p = self._cached(("te2", len(negatives)), lambda: self._encode_2(negatives, timings, stage))
            return h, p
        return self._encode_2(negatives, timings, stage)

    def encode(self, prompts: list[str], negatives: list[str] | None, *, guidance: bool, refiner: bool,
               timings: StageTimings, base: bool = True) -> EncodedPrompts:
        """Encode ``prompts`` (and ``negatives``; None = SDXL's default) for base and refiner.

        ``base=False`` (the refiner alone) skips the first text encoder: the refiner only reads
        the second one, and its base fields are then left as the refiner's."""
        h1 = self._encode_1(prompts, timings) if base else None
        h2, pooled = self._encode_2(prompts, timings)
        out = EncodedPrompts(h2 if h1 is None else torch.cat([h1, h2], dim=-1), pooled, None, None)
        neg2: tuple[torch.Tensor, torch.Tensor] | None = None
        if guidance and base:
            if negatives is None:  # force_zeros_for_empty_prompt
                out.base_neg_embeds = torch.zeros_like(out.base_embeds)
                out.base_neg_pooled = torch.zeros_like(pooled)
            else:
                n1 = self._negative_1(negatives, timings)
                neg2 = self._negative_2(negatives, timings)
                out.base_neg_embeds = torch.cat([n1, neg2[0]], dim=-1)
                out.base_neg_pooled = neg2[1]
        if refiner:
            out.refiner_embeds, out.refiner_pooled = h2, pooled
            if guidance:
                if neg2 is None:
                    neg2 = self._negative_2(negatives or [""] * len(prompts), timings, "refiner_text_encoder_2")
                out.refiner_neg_embeds, out.refiner_neg_pooled = neg2
        return out
