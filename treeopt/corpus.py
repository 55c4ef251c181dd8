"""Corpus files (`treeopt.corpus/1`): token ids of text the cache source proposes from —
the model's own greedy answers to prompt sets, or a user's documents — tied to the
tokenizer that made them.

A corpus is a JSON object: the model, its tokenizer's fingerprint (a hash of its
vocabulary) and size, where the text came from (`sources`: prompt sets with their slices,
text files), the documents' lengths, and their ids as base64 of little-endian int32,
concatenated. No pickle: a corpus is read with checks only (schema, fingerprint, lengths
that add up, ids inside the vocabulary, at most BOUNDS["corpus_tokens"] tokens).
"""
from __future__ import annotations

import base64
import binascii
import hashlib
import json

import numpy as np

from .artefact import check_schema, read_json
from .bounds import count
from .errors import BadInput
from .sources import SuffixCache

SCHEMA = "treeopt.corpus/1"


def vocab_hash(tokenizer) -> str:
    """A short hash of a tokenizer's vocabulary (token → id): corpora are tied to it."""
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])
    return hashlib.sha256(json.dumps(vocab, ensure_ascii=False).encode()).hexdigest()[:16]


def vocab_size(tokenizer) -> int:
    return len(tokenizer.get_vocab())


def make(model: str, tokenizer, documents: list[list[int]], sources: list[dict],
         **about) -> dict:
    """A corpus object over documents of token ids; `sources` says what made them."""
    flat = np.asarray([t for d in documents for t in d], dtype="<i4")
    return {"schema": SCHEMA, "model": model,
            "tokenizer": {"fingerprint": vocab_hash(tokenizer),
                          "vocab_size": vocab_size(tokenizer)},
            "sources": sources, "documents": len(documents), "tokens": int(flat.size),
            **about, "lengths": [len(d) for d in documents],
            "ids": base64.b64encode(flat.tobytes()).decode()}


def documents(obj: dict, where: str = "corpus") -> list[list[int]]:
    """The documents of a corpus object, every value checked."""
    check_schema(obj, SCHEMA, where)
    lengths, tok = obj.get("lengths"), obj.get("tokenizer")
    if not isinstance(lengths, list) or not all(
            isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in lengths):
        raise BadInput(f"{where}: lengths must be a list of integers ≥ 0")
    if not isinstance(tok, dict) or not isinstance(tok.get("vocab_size"), int):
        raise BadInput(f"{where}: no tokenizer fingerprint and vocabulary size")
    total = count(sum(lengths), "corpus_tokens", where, lo=0)
    try:
        raw = base64.b64decode(obj.get("ids", ""), validate=True)
    except (ValueError, TypeError, binascii.Error) as e:
        raise BadInput(f"{where}: ids are malformed ({e})") from e
    if len(raw) != 4 * total:
        raise BadInput(f"{where}: ids hold {len(raw) // 4} tokens, lengths add up to {total}")
    ids = np.frombuffer(raw, dtype="<i4")
    bad = (ids < 0) | (ids >= tok["vocab_size"])
    if bad.any():
        raise BadInput(f"{where}: token id {int(ids[bad][0])} outside the vocabulary "
                       f"(0..{tok['vocab_size'] - 1})")
    bounds = np.cumsum([0, *lengths])
    flat = ids.tolist()
    return [flat[bounds[i]:bounds[i + 1]] for i in range(len(lengths))]


def read(path) -> tuple[dict, list[list[int]]]:
    """A corpus file: (its object, its documents), every value checked."""
    obj = read_json(path, "corpus")
    docs = documents(obj, f"corpus {path}")
    if not isinstance(obj.get("model"), str):
        raise BadInput(f"corpus {path}: no model named")
    return obj, docs


def check_tokenizer(obj: dict, tokenizer, where: str) -> None:
    """A corpus built with another tokenizer is refused (its ids mean other text)."""
    if obj["tokenizer"].get("fingerprint") != vocab_hash(tokenizer):
        raise BadInput(f"{where} was built with another tokenizer (fingerprint "
                       f"{obj['tokenizer'].get('fingerprint')!r}, this model's is "
                       f"{vocab_hash(tokenizer)!r}); rebuild it with `treeopt corpus`")


def cache_of(docs: list[list[int]], cap: int, **settings) -> SuffixCache:
    """A suffix cache holding the documents, oldest first (the last ones stay when they
    exceed the cap)."""
    cache = SuffixCache(cap, **settings)
    cache.add_many(docs)
    return cache


def prompt_hash(text: str) -> str:
    """The short hash a corpus keeps of each prompt it answered (`prompt_hashes`)."""
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def answered(obj: dict, texts: list[str]) -> int:
    """How many of these prompts the corpus holds the model's answers to (a bench on them
    would measure the cache on its own answers)."""
    held = set(obj.get("prompt_hashes") or [])
    return sum(prompt_hash(t) in held for t in texts)


def about(obj: dict, path: str) -> dict:
    """What a run or an acceptance file says of the corpus behind its cache."""
    return {"path": path, "sources": obj.get("sources"), "tokens": obj.get("tokens"),
            "documents": obj.get("documents")}
