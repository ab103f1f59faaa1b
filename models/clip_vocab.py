"""Offline CLIP BPE tokenizers: SDXL's real ones, and small ones for the tiny presets.

SDXL's tokenizers are CLIP's BPE tokenizer with 49408 tokens (tokenizer 2 pads with
``"!"``, id 0). :func:`clip_tokenizers` builds them offline from CLIP's own merge list,
``data/bpe_simple_vocab_16e6.txt.gz`` (OpenAI CLIP's file, MIT licence, the same file
open_clip ships): the ``sdxl`` preset and single-file checkpoints use them, since a
checkpoint carries no tokenizer.

The ``tiny`` and ``small`` presets keep a small vocabulary with the *same structure*,
built in code (changing it would change every test's weights): CLIP's
byte-to-unicode alphabet (so ``"!"`` is id 0, as in CLIP, and tokenizer 2 pads with it),
every character with an end-of-word marker, a few hundred merges learned from a
fixed prompt-like corpus, then ``<|startoftext|>`` and ``<|endoftext|>`` as the two
highest ids (CLIP's text model pools at the argmax id, i.e. the first EOS).

The vocabulary is a pure function of the code below: the same on every machine.
"""

from __future__ import annotations

import collections
import functools
import gzip
import hashlib
import itertools
from pathlib import Path
from typing import Any

BOS = "<|startoftext|>"
EOS = "<|endoftext|>"
#: CLIP's merge list (first line a header), shipped with this package.
CLIP_BPE_FILE = Path(__file__).resolve().parent.parent / "data" / "bpe_simple_vocab_16e6.txt.gz"
#: CLIP's vocabulary size: 256 bytes, 256 bytes + ``</w>``, 48894 merges, BOS, EOS.
CLIP_VOCAB_SIZE = 49408

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


@functools.lru_cache(maxsize=1)
def clip_vocab() -> tuple[dict[str, int], tuple[tuple[str, str], ...]]:
    """(vocab, merges) of CLIP's tokenizer, read from the shipped merge list.

    CLIP's vocabulary is not stored as such: it is the byte alphabet, the alphabet with
    ``</w>``, the first 48894 merges joined, then BOS and EOS -- the construction
    OpenAI's ``SimpleTokenizer`` (and open_clip's copy of it) uses.
    """
    lines = gzip.decompress(CLIP_BPE_FILE.read_bytes()).decode("utf-8").split("\n")
    n_merges = CLIP_VOCAB_SIZE - 2 * 256 - 2
    merges = tuple((a, b) for a, b in (ln.split() for ln in lines[1:1 + n_merges]))
    alphabet = list(bytes_to_unicode().values())
    tokens = alphabet + [c + "</w>" for c in alphabet] + [a + b for a, b in merges] + [BOS, EOS]
    vocab = {t: i for i, t in enumerate(tokens)}
    if len(vocab) != CLIP_VOCAB_SIZE:
        raise RuntimeError(f"{CLIP_BPE_FILE} gives {len(vocab)} tokens, not {CLIP_VOCAB_SIZE}: a damaged install")
    return vocab, merges


@functools.lru_cache(maxsize=1)
def clip_vocab_sha() -> str:
    """sha256 of the shipped merge list: the CLIP tokenizers' identity in fingerprints."""
    return hashlib.sha256(CLIP_BPE_FILE.read_bytes()).hexdigest()


def _tokenizer_pair(vocab: dict[str, int], pairs: tuple[tuple[str, str], ...], max_length: int) -> tuple[Any, Any]:
    from transformers import CLIPTokenizer

    merges: Any = list(pairs)  # the BPE backend takes (a, b) tuples; the stubs say list[str]
    tok1 = CLIPTokenizer(vocab=dict(vocab), merges=merges, pad_token=EOS, model_max_length=max_length)
    tok2 = CLIPTokenizer(vocab=dict(vocab), merges=merges, pad_token="!", model_max_length=max_length)
    return tok1, tok2


def clip_tokenizers(max_length: int = 77) -> tuple[Any, Any]:
    """SDXL's (tokenizer, tokenizer_2): CLIP's BPE, the second padding with ``"!"``.

    transformers' ``CLIPTokenizer`` over CLIP's vocabulary and merges: the class (and so
    the normalisation: NFC, whitespace, lower case) diffusers uses for SDXL's tokenizer
    folders. Its ids equal open_clip's ``tokenize`` on any text that CLIP's ftfy/HTML
    clean-up leaves unchanged (the tests check a corpus); like transformers, it does not
    run ftfy.
    """
    vocab, pairs = clip_vocab()
    return _tokenizer_pair(vocab, pairs, max_length)


def tokenizers_for_vocab(vocab_size: int, max_length: int = 77) -> tuple[Any, Any] | None:
    """The offline tokenizer pair whose vocabulary has ``vocab_size`` tokens, or None."""
    if vocab_size == CLIP_VOCAB_SIZE:
        return clip_tokenizers(max_length)
    if vocab_size == len(build_vocab()[0]):
        return make_tokenizers(max_length)
    return None


def make_tokenizers(max_length: int = 77) -> tuple[Any, Any]:
    """(tokenizer, tokenizer_2) of the tiny/small presets: the second pads with ``"!"`` (id 0).

    transformers is imported here, not at module level: the vocabulary alone (a preset's
    vocab size, its fingerprint) needs no ML library.
    """
    vocab, pairs = build_vocab()
    return _tokenizer_pair(vocab, pairs, max_length)
