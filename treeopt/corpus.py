"""Corpus files (`treeopt.corpus/1`): token ids of text the cache source proposes from —
the model's own greedy answers to prompt sets, or a user's documents — tied to the
tokenizer that made them.

A corpus is a JSON object: the model, its tokenizer's fingerprint (a hash of its
vocabulary) and size, where the text came from (`sources`: prompt sets with their slices,
text files), the documents' lengths, and their ids as base64 of little-endian int32,
concatenated. No pickle: a corpus is read with checks only (schema, every field's kind,
lengths that add up, at most BOUNDS["corpus_tokens"] tokens), and checked against the
loaded model before use (its tokenizer's fingerprint, ids inside the model's vocabulary).
"""
from __future__ import annotations

import base64
import binascii
import hashlib
import json

import numpy as np

from .artefact import check_fields, check_schema, read_json
from .bounds import BOUNDS, count
from .errors import BadInput, shown
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


def _check_about(obj: dict, where: str, n_docs: int, n_tokens: int) -> None:
    """What a corpus says of itself, each field's kind checked at the read (it is copied
    into run JSONs): the model, the tokenizer's fingerprint, its counts (equal to what
    its ids hold), its sources (a short list of flat objects), its prompt hashes."""
    check_fields(obj, {"model": "str", "tokenizer": "obj", "?tokens": "count",
                       "?documents": "count", "?dtype": "str", "?max_new_tokens": "count"},
                 where)
    check_fields(obj["tokenizer"], {"fingerprint": "str"}, f"{where}: tokenizer")
    for key, real in (("tokens", n_tokens), ("documents", n_docs)):
        if obj.get(key) is not None and obj[key] != real:
            raise BadInput(f"{where}: field {key!r} says {obj[key]}, its ids hold {real}")
    for key, bound in (("sources", 1000), ("prompt_hashes", BOUNDS["corpus_tokens"])):
        v = obj.get(key)
        if v is not None and (not isinstance(v, list) or len(v) > bound):
            raise BadInput(f"{where}: field {key!r} must be a list of at most {bound} entries")
    for i, src in enumerate(obj.get("sources") or []):
        if not isinstance(src, dict) or len(src) > 16 or not all(
                isinstance(k, str) and len(k) <= 64 and (
                    v is None or isinstance(v, (bool, int, float)) or
                    (isinstance(v, str) and len(v) <= 4096)) for k, v in src.items()):
            raise BadInput(f"{where}: sources[{i}] must be an object of at most 16 plain "
                           "values (strings, numbers)")
    if not all(isinstance(h, str) and len(h) <= 64 for h in obj.get("prompt_hashes") or []):
        raise BadInput(f"{where}: prompt_hashes must be short strings")


def documents(obj: dict, where: str = "corpus") -> list[np.ndarray]:
    """The documents of a corpus object (int32 arrays), every value checked but the ids'
    range, which only the model's vocabulary bounds (:func:`check_tokenizer`)."""
    check_schema(obj, SCHEMA, where)
    lengths = obj.get("lengths")
    if not isinstance(lengths, list) or not all(
            isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in lengths):
        raise BadInput(f"{where}: lengths must be a list of integers ≥ 0")
    total = count(sum(lengths), "corpus_tokens", where, lo=0)
    try:
        raw = base64.b64decode(obj.get("ids", ""), validate=True)
    except (ValueError, TypeError, binascii.Error) as e:
        raise BadInput(f"{where}: ids are malformed ({e})") from e
    if len(raw) != 4 * total:
        raise BadInput(f"{where}: ids hold {len(raw) // 4} tokens, lengths add up to {total}")
    _check_about(obj, where, len(lengths), total)
    ids = np.frombuffer(raw, dtype="<i4").astype(np.int32)
    if ids.size and ids.min() < 0:
        raise BadInput(f"{where}: token id {int(ids[ids < 0][0])} is negative")
    return np.split(ids, np.cumsum(lengths)[:-1]) if lengths else []


def read(path) -> tuple[dict, list[np.ndarray]]:
    """A corpus file: (its object, its documents), every value checked."""
    obj = read_json(path, "corpus")
    return obj, documents(obj, f"corpus {path}")


def check_tokenizer(obj: dict, docs: list[np.ndarray], lm, where: str) -> None:
    """A corpus built with another tokenizer is refused (its ids mean other text), and so
    is one whose ids fall outside the loaded model's vocabulary — never a size the file
    states about itself."""
    tokenizer = lm.tokenizer
    if obj["tokenizer"].get("fingerprint") != vocab_hash(tokenizer):
        raise BadInput(f"{where} was built with another tokenizer (fingerprint "
                       f"{shown(obj['tokenizer'].get('fingerprint'))}, this model's is "
                       f"{vocab_hash(tokenizer)!r}); rebuild it with `treeopt corpus`")
    vocab = min(len(tokenizer), lm.model.get_input_embeddings().num_embeddings)
    top = max((int(d.max()) for d in docs if d.size), default=-1)
    if top >= vocab:
        raise BadInput(f"{where}: token id {top} outside the model's vocabulary "
                       f"(0..{vocab - 1})")


def cache_of(docs: list, cap: int, **settings) -> SuffixCache:
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


def about(obj: dict, docs: list[np.ndarray], path: str) -> dict:
    """What a run or an acceptance file says of the corpus behind its cache (its counts
    from its ids, not from what the file declares)."""
    return {"path": path, "sources": obj.get("sources"), "tokens": int(sum(map(len, docs))),
            "documents": len(docs)}
