"""A synthetic byte-level BPE tokenizer of a real model's vocabulary size, for benchmarks of dummy-weight models
whose costs depend on the vocabulary (structured-output masks): the GPU hosts have no network, so no real
tokenizer.

The vocabulary mimics a real one's mix: the 256 byte tokens, words with and without a leading space, digit runs,
JSON punctuation runs, and special tokens at the end. Every token of two or more characters is reachable by
left-to-right merges, so ``tokenizers`` loads it as a valid BPE model.
"""

from __future__ import annotations

import json
import os
import random

import tokenizers
from tokenizers import decoders, models, pre_tokenizers
from tokenizers.pre_tokenizers import ByteLevel

LETTERS = "abcdefghijklmnopqrstuvwxyz"
PUNCT = ['"', ",", ":", "{", "}", " ", "\n", "\t", "."]
BRACKETS = ["[", "]", "[{", "}]", "],", "]}", "[\"", "\"]", "[[", "]]", "[]"]  # few, as in real vocabularies


def _candidate(rng: random.Random) -> str:
    r = rng.random()
    if r < 0.6:  # words, most with a leading space (byte-level "Ġ")
        word = "".join(rng.choice(LETTERS) for _ in range(rng.randint(2, 10)))
        return ("Ġ" if rng.random() < 0.7 else "") + (word.capitalize() if rng.random() < 0.2 else word)
    if r < 0.75:
        return "".join(rng.choice("0123456789") for _ in range(rng.randint(2, 3)))
    if r < 0.9:  # punctuation runs: '",', '":', '},', '\n  ' ...
        return "".join(rng.choice(PUNCT) for _ in range(rng.randint(2, 4))).replace(" ", "Ġ").replace(
            "\n", "Ċ").replace("\t", "ĉ")
    return "".join(rng.choice(LETTERS + LETTERS.upper() + "0123456789_-") for _ in range(rng.randint(2, 8)))


def save_synthetic_tokenizer(path: str, vocab_size: int, eos: str = "<|eot_id|>", seed: int = 0) -> str:
    """Write ``tokenizer.json`` and ``tokenizer_config.json`` of a ``vocab_size``-token tokenizer into ``path``
    (the last ids are special tokens, as many as Llama-3 has but at most an eighth of the vocabulary; ``eos`` is
    the first of them); returns ``path``."""
    if os.path.isfile(os.path.join(path, "tokenizer.json")):
        return path
    num_special = min(256, vocab_size // 8)
    if vocab_size - num_special < 256:
        raise ValueError(f"a byte-level tokenizer needs more than 256 tokens besides its specials, got {vocab_size}")
    rng = random.Random(seed)
    alphabet = sorted(ByteLevel.alphabet())  # the 256 characters byte-level BPE writes bytes as
    vocab = {c: i for i, c in enumerate(alphabet)}
    merges: list[tuple[str, str]] = []
    target = vocab_size - num_special
    words = iter(BRACKETS)
    while len(vocab) < target:
        word = next(words, None) or _candidate(rng)
        for end in range(2, len(word) + 1):  # each prefix is a merge of the one before and one character
            piece = word[:end]
            if piece not in vocab and len(vocab) < target:
                vocab[piece] = len(vocab)
                merges.append((word[: end - 1], word[end - 1]))
    backend = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=merges))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    specials = [eos] + [f"<|reserved_special_token_{i}|>" for i in range(num_special - 1)]
    backend.add_special_tokens(specials)
    os.makedirs(path, exist_ok=True)
    backend.save(os.path.join(path, "tokenizer.json"))
    with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
        json.dump({"eos_token": eos}, f)
    return path
