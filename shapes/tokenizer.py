"""A tiny CLIP BPE tokenizer for the ShapesWorld captions, built from vocab/merges files written here.

The vocabulary follows CLIP's layout: ids 0–255 are the GPT-2 byte-to-unicode characters, 256–511 the
same characters with the end-of-word marker ``</w>``, then one token per BPE merge, then
``<|startoftext|>`` and ``<|endoftext|>`` (also the padding token, as in Stable Diffusion). The merges
are learnt by plain BPE on the caption words (most frequent adjacent pair first, ties broken
lexicographically), so each caption word encodes to a single token.

transformers 5 traps (docs/environment.md §2): the keyword names are ``vocab=`` / ``merges=``
(``vocab_file=`` is silently ignored and yields a 2-token tokenizer); in-memory merges must be tuples;
a hub id offline silently returns an empty tokenizer. :func:`build_tokenizer` checks the result.
"""
from __future__ import annotations

from collections import Counter
from pathlib import Path

from transformers import CLIPTokenizer

from shapes.world import COLOURS, SHAPES

WORDS = ("a", *COLOURS, *SHAPES)
BOS, EOS = "<|startoftext|>", "<|endoftext|>"
END_OF_WORD = "</w>"
MAX_LENGTH = 8  # BOS + 3 caption words + EOS, padded: the text encoder's max_position_embeddings


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible map from the 256 byte values to printable unicode characters."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    codes = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            codes.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(code) for code in codes)))


def learn_merges(words: tuple[str, ...] = WORDS) -> list[tuple[str, str]]:
    """BPE merges that turn every word (with ``</w>`` on its last symbol) into one symbol."""
    byte_map = bytes_to_unicode()
    corpus = [[byte_map[b] for b in word.encode("utf-8")] for word in words]
    for symbols in corpus:
        symbols[-1] += END_OF_WORD
    merges: list[tuple[str, str]] = []
    while True:
        pairs = Counter(pair for symbols in corpus for pair in zip(symbols, symbols[1:]))
        if not pairs:
            return merges
        best = min(pairs, key=lambda pair: (-pairs[pair], pair))
        merges.append(best)
        for k, symbols in enumerate(corpus):
            merged, i = [], 0
            while i < len(symbols):
                if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == best:
                    merged.append(symbols[i] + symbols[i + 1])
                    i += 2
                else:
                    merged.append(symbols[i])
                    i += 1
            corpus[k] = merged


def vocab_and_merges(words: tuple[str, ...] = WORDS) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """CLIP-layout vocabulary (token → id) and the merge list for ``words``."""
    base = list(bytes_to_unicode().values())
    merges = learn_merges(words)
    tokens = base + [char + END_OF_WORD for char in base] + ["".join(pair) for pair in merges] + [BOS, EOS]
    vocab: dict[str, int] = {}
    for token in tokens:
        vocab.setdefault(token, len(vocab))
    return vocab, merges


def build_tokenizer(words: tuple[str, ...] = WORDS, max_length: int = MAX_LENGTH) -> CLIPTokenizer:
    """A ``CLIPTokenizer`` over ``words`` built in memory (vocab dict + merge tuples), checked."""
    vocab, merges = vocab_and_merges(words)
    tokenizer = CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=max_length,
                              bos_token=BOS, eos_token=EOS, pad_token=EOS, unk_token=EOS)
    check_tokenizer(tokenizer, words)
    return tokenizer


def load_tokenizer_files(directory: str | Path, max_length: int = MAX_LENGTH) -> CLIPTokenizer:
    """A ``CLIPTokenizer`` from ``vocab.json`` + ``merges.txt`` in ``directory`` (files, not a hub id)."""
    directory = Path(directory)
    tokenizer = CLIPTokenizer(vocab=str(directory / "vocab.json"), merges=str(directory / "merges.txt"),
                              model_max_length=max_length, bos_token=BOS, eos_token=EOS, pad_token=EOS,
                              unk_token=EOS)
    check_tokenizer(tokenizer)
    return tokenizer


def check_tokenizer(tokenizer: CLIPTokenizer, words: tuple[str, ...] = WORDS) -> None:
    """Fail loudly on the silent transformers-5 failures: every word must be one known, non-special token."""
    if len(tokenizer) <= 2:
        raise RuntimeError(f"tokenizer has only {len(tokenizer)} tokens: vocab/merges were not loaded")
    special = {tokenizer.convert_tokens_to_ids(BOS), tokenizer.convert_tokens_to_ids(EOS)}
    for word in words:
        ids = tokenizer(word, add_special_tokens=False)["input_ids"]
        if len(ids) != 1 or ids[0] in special:
            raise RuntimeError(f"word {word!r} tokenizes to {ids} ({tokenizer.convert_ids_to_tokens(ids)}), "
                               "expected one in-vocabulary token")
