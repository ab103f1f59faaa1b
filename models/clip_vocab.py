"""Offline CLIP-style BPE tokenizers for the embedded presets.

SDXL's tokenizers are CLIP BPE with 49408 tokens. The embedded presets cannot download
them, so we build a small vocabulary with the *same structure* in code: CLIP's
byte-to-unicode alphabet (so ``"!"`` is id 0, as in CLIP, and tokenizer 2 pads with it),
every character with an end-of-word marker, a few hundred merges learned from a
fixed prompt-like corpus, then ``<|startoftext|>`` and ``<|endoftext|>`` as the two
highest ids (CLIP's text model pools at the argmax id, i.e. the first EOS).

The vocabulary is a pure function of the code below: the same on every machine.
"""

from __future__ import annotations

import collections
import functools
import itertools
from typing import Any

BOS = "<|startoftext|>"
EOS = "<|endoftext|>"

_CORPUS = """
a photo of a cat sitting on a chair in the sun, highly detailed, sharp focus
an astronaut riding a horse on the moon, digital art, trending on artstation
portrait of a woman with red hair, studio lighting, 85mm, bokeh, photorealistic
a painting of a mountain landscape at sunset by a river, oil on canvas
cinematic shot of a city street at night with neon lights and rain
a cute dog playing in the grass with a ball, golden hour photography
the quick brown fox jumps over the lazy dog while the birds sing
a bowl of fruit on a wooden table, still life, soft light, masterpiece
futuristic car in a desert, concept art, wide angle, dramatic clouds
close up of a flower with water drops, macro, vibrant colors, high quality
blurry, low quality, watermark, text, deformed, ugly, bad anatomy
a castle on a hill surrounded by forest and fog, fantasy illustration
an old man reading a book by the window, warm light, film grain
"""

_N_MERGES = 400


def bytes_to_unicode() -> dict[int, str]:
    """CLIP/GPT-2's reversible byte -> printable unicode map (256 entries)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(
        range(ord("®"), ord("ÿ") + 1)
    )
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


@functools.lru_cache(maxsize=1)
def build_vocab() -> tuple[dict[str, int], tuple[tuple[str, str], ...]]:
    """(vocab, merges) of the embedded tokenizer; deterministic."""
    alphabet = list(bytes_to_unicode().values())
    tokens = alphabet + [c + "</w>" for c in alphabet]
    words = collections.Counter(
        w for line in _CORPUS.strip().splitlines() for w in line.lower().replace(",", " ").split()
    )
    # Each word as a tuple of symbols, last with </w>.
    splits = {w: tuple(w[:-1]) + (w[-1] + "</w>",) for w in words}
    merges: list[tuple[str, str]] = []
    seen = set(tokens)
    for _ in range(_N_MERGES):
        pairs: collections.Counter[tuple[str, str]] = collections.Counter()
        for w, syms in splits.items():
            for a, b in itertools.pairwise(syms):
                pairs[(a, b)] += words[w]
        if not pairs:
            break
        # Most frequent pair; ties broken lexicographically for determinism.
        (a, b), _count = min(pairs.items(), key=lambda kv: (-kv[1], kv[0]))
        merges.append((a, b))
        new = a + b
        if new not in seen:
            tokens.append(new)
            seen.add(new)
        for w, syms in splits.items():
            out: list[str] = []
            i = 0
            while i < len(syms):
                if i + 1 < len(syms) and syms[i] == a and syms[i + 1] == b:
                    out.append(new)
                    i += 2
                else:
                    out.append(syms[i])
                    i += 1
            splits[w] = tuple(out)
    tokens += [BOS, EOS]
    return {t: i for i, t in enumerate(tokens)}, tuple(merges)


def make_tokenizers(max_length: int = 77) -> tuple[Any, Any]:
    """(tokenizer, tokenizer_2) as SDXL has them: the second pads with ``"!"`` (id 0).

    transformers is imported here, not at module level: the vocabulary alone (a preset's
    vocab size, its fingerprint) needs no ML library.
    """
    from transformers import CLIPTokenizer

    vocab, pairs = build_vocab()
    merges: Any = list(pairs)  # the BPE backend takes (a, b) tuples; the stubs say list[str]
    tok1 = CLIPTokenizer(vocab=dict(vocab), merges=merges, pad_token=EOS, model_max_length=max_length)
    tok2 = CLIPTokenizer(vocab=dict(vocab), merges=merges, pad_token="!", model_max_length=max_length)
    return tok1, tok2
