"""An offline CLIP tokenizer: byte-level vocabulary plus BPE merges learned from a word list.

Reference text-to-image pipelines need a real ``CLIPTokenizer`` (the diffusers layout saves it
under ``tokenizer/``), but OpenAI's 49,408-token vocabulary cannot be downloaded here. This one
is built deterministically from code, in CLIP's own vocabulary layout:

1. the 256 byte symbols of byte-level BPE, then the same 256 with the word-final ``</w>``
   suffix. Every UTF-8 string is a sequence of these, so no caption, English or not, ever
   collapses into the unknown token;
2. merges learned by plain BPE from :data:`CAPTION_WORDS` (caption vocabulary of the demo
   corpora plus common English words) until each of those words is a single token, and the
   merged symbols appended to the vocabulary;
3. ``<|startoftext|>`` and ``<|endoftext|>`` (also used for padding, as in Stable Diffusion).

Why merges at all: a character-level tokenizer spends one position per letter, and with the
reference pipeline's 32 positions a caption such as "a close-up photo of a cup of coffee, crop
12 near the top right, in dim light" would be truncated after its first two dozen letters.
With whole-word tokens it takes 24 positions; words outside the list still tokenize (into
known sub-words and bytes), only less compactly.

``transformers`` is imported lazily, as in :mod:`diffcurate.models.text_encoder`.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from functools import lru_cache
from itertools import pairwise
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from transformers import CLIPTokenizer

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
WORD_END = "</w>"

_WORDS = """
    a an the of and or in on at to with from by for near over under into onto behind beside
    between above below top bottom left right center middle front back side corner edge
    photo photograph picture image view close up wide crop detail small large big tiny little
    black white gray grey red orange yellow green blue purple pink brown dark dim soft bright
    light shadow sun sunlight night day warm cool cold color colour tones landscape portrait
    square format tall long short round flat high low old new
    astronaut woman man person people face hand hands eye eyes suit flag helmet space shuttle
    cup coffee saucer spoon table wood cat kitten fur whiskers rocket launch pad tower smoke
    sky cameraman camera tripod coat grass field coins coin metal silver stained tissue
    microscope cells cell glands galaxies galaxy stars star deep universe retina vessels
    brick bricks wall gravel stones stone clock blurred motion dog horse bird tree trees flower
    flowers water sea river lake mountain road street city building house car boat train
    handwritten digit digits number scanned zero one two three four five six seven eight nine
    ten hundred is are this that it its his her their some many several
"""
CAPTION_WORDS: tuple[str, ...] = tuple(_WORDS.split())
"""Words that become single tokens (all lowercase letters: CLIP lowercases every caption)."""


@lru_cache(maxsize=1)
def byte_symbols() -> tuple[str, ...]:
    """The printable stand-in of each byte 0..255 used by byte-level BPE (GPT-2's table).

    Printable Latin-1 bytes stand for themselves; the others are shifted to code points
    from 256 up, so no symbol is whitespace or a control character. ``tokenizers``' ByteLevel
    pre-tokenizer uses exactly this table.
    """
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1)]
    keep += range(ord("®"), ord("ÿ") + 1)
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return tuple(table[b] for b in range(256))


def learn_merges(words: Iterable[str]) -> list[tuple[str, str]]:
    """BPE merges that turn each distinct word into one symbol (pairs of existing symbols).

    Each step merges the most frequent adjacent pair over the distinct words (ties: the
    lexicographically smallest pair), so the result depends only on the set of words.

    Args:
        words: Words; each is UTF-8 encoded and mapped to :func:`byte_symbols`, its last
            symbol carrying :data:`WORD_END`.
    """
    symbols = byte_symbols()
    seqs: list[tuple[str, ...]] = []
    for word in sorted(set(words)):
        chars = [symbols[b] for b in word.encode("utf-8")]
        if chars:
            seqs.append((*chars[:-1], chars[-1] + WORD_END))
    merges: list[tuple[str, str]] = []
    while True:
        pairs = Counter(p for seq in seqs for p in pairwise(seq))
        if not pairs:
            return merges
        best = min(pairs, key=lambda p: (-pairs[p], p))
        merges.append(best)
        seqs = [_merge(seq, best) for seq in seqs]


def _merge(seq: tuple[str, ...], pair: tuple[str, str]) -> tuple[str, ...]:
    out: list[str] = []
    i = 0
    while i < len(seq):
        if i + 1 < len(seq) and (seq[i], seq[i + 1]) == pair:
            out.append(seq[i] + seq[i + 1])
            i += 2
        else:
            out.append(seq[i])
            i += 1
    return tuple(out)


def clip_vocabulary(
    words: Iterable[str] = CAPTION_WORDS,
) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """The vocabulary (token → id) and merges of the module docstring, in CLIP's order."""
    symbols = byte_symbols()
    merges = learn_merges(words)
    tokens = [*symbols, *(s + WORD_END for s in symbols), *(a + b for a, b in merges)]
    tokens += [BOS_TOKEN, EOS_TOKEN]
    vocab: dict[str, int] = {}
    for token in tokens:  # a merge can recreate a base symbol ("a" + "</w>"): keep one id
        vocab.setdefault(token, len(vocab))
    return vocab, merges


def build_tokenizer(max_length: int = 32, words: Iterable[str] = CAPTION_WORDS) -> CLIPTokenizer:
    """A ``transformers.CLIPTokenizer`` with the vocabulary of :func:`clip_vocabulary`.

    Args:
        max_length: Token positions per caption, start and end tokens included
            (``model_max_length``; captions are padded or truncated to it).
        words: Words that become single tokens.
    """
    from transformers import CLIPTokenizer

    vocab, merges = clip_vocabulary(words)
    return CLIPTokenizer(
        vocab=vocab,
        merges=merges,
        unk_token=EOS_TOKEN,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=EOS_TOKEN,
        model_max_length=max_length,
    )
