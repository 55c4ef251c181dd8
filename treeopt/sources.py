"""Candidate sources for a decoding step, besides the prompt tokens' own guesses.

Prompt lookup (as HF's PromptLookupCandidateGenerator and llama.cpp's lookup decoding):
the continuation after the most recent earlier occurrence of the last n tokens of prompt +
output, for the longest n in max_ngram..1 that matches. The index is incremental: each
appended token registers the n-grams that end just before it (so every indexed n-gram has
a continuation) in O(max_ngram); a query is O(max_ngram).
"""
from __future__ import annotations

import numpy as np

from .errors import BadInput


# defaults: the longest n-gram matched and the longest chain measured (the search picks
# each state's chain length up to it; `treeopt accept --lookup-ngram/--lookup-chain`)
LOOKUP_NGRAM, LOOKUP_CHAIN = 3, 16


class PromptLookup:
    """An n-gram index over one sequence. `offer()` → (n, continuation): the match length
    n (0 = none) and up to `max_tokens` tokens that followed the most recent match."""

    def __init__(self, max_ngram: int = LOOKUP_NGRAM, max_tokens: int = LOOKUP_CHAIN):
        if not isinstance(max_ngram, int) or max_ngram < 1:
            raise BadInput(f"lookup n-gram length must be an integer ≥ 1, got {max_ngram!r}")
        if not isinstance(max_tokens, int) or max_tokens < 1:
            raise BadInput(f"lookup chain length must be an integer ≥ 1, got {max_tokens!r}")
        self.max_ngram, self.max_tokens = max_ngram, max_tokens
        self.ids: list[int] = []
        self.index: list[dict[tuple, int]] = [{} for _ in range(max_ngram + 1)]

    def reset(self, ids: list[int]) -> "PromptLookup":
        self.ids = []
        self.index = [{} for _ in range(self.max_ngram + 1)]
        self.extend(ids)
        return self

    def extend(self, new: list[int]) -> None:
        ids = self.ids
        for tok in new:
            end = len(ids)  # the n-grams ending here gain a continuation: tok
            for n in range(1, min(self.max_ngram, end) + 1):
                self.index[n][tuple(ids[end - n:end])] = end
            ids.append(int(tok))

    def offer(self) -> tuple[int, list[int]]:
        ids = self.ids
        for n in range(min(self.max_ngram, len(ids)), 0, -1):
            end = self.index[n].get(tuple(ids[len(ids) - n:]))
            if end is not None:
                return n, ids[end:end + self.max_tokens]
        return 0, []


def offers_along(ids: list[int], prompt_len: int, max_ngram: int, max_tokens: int,
                 chains: list | None = None) -> tuple[list[int], list[int]]:
    """What prompt lookup offers along a finished sequence: at every position t from
    prompt_len − 1 to len − 3 (the step whose root is token t + 1), the match length n
    (0 = none) over tokens ..t + 1 and how many of its proposed tokens t + 2.. are the
    sequence's own (the accepted run); `chains`, where given, receives each proposed
    chain. `accept` and recorded runs read lookup's acceptance from here."""
    match, won = [], []
    look = PromptLookup(max_ngram, max_tokens).reset(ids[:prompt_len + 1])
    for t in range(prompt_len - 1, len(ids) - 2):
        n, chain = look.offer()
        match.append(n)
        won.append(run_length(chain, ids[t + 2:t + 2 + len(chain)]))
        if chains is not None:
            chains.append(chain)
        look.extend([ids[t + 2]])
    return match, won


# ---- the cache source: the model's own earlier text, across requests ---------------------
# defaults: matched context suffixes of CACHE_MIN_NGRAM..CACHE_MAX_NGRAM tokens, chains up to
# CACHE_CHAIN tokens, the continuation voted by the CACHE_SAMPLE most recent occurrences, and
# at most CACHE_TOKENS tokens held (`--cache-tokens`; the oldest text leaves first)
CACHE_MIN_NGRAM, CACHE_MAX_NGRAM, CACHE_CHAIN, CACHE_SAMPLE = 2, 8, 16, 32
CACHE_TOKENS = 500_000


class SuffixCache:
    """An n-gram index over documents of token ids (a corpus of the model's own answers,
    then each finished request's output): for every n in min_ngram..max_ngram, the places
    where an n-gram occurs with at least one token after it in its document.

    `offer(context)` → (n, chain): the longest suffix of the context that occurs (n = 0:
    none) and its most frequent continuation, token by token: among the `sample` most
    recent occurrences, the most common next token (ties: the most recent), keeping the
    occurrences that agree, up to `max_tokens` tokens — SuffixDecoding's and REST's idea
    on a sorted hash index. A query costs a binary search per n and at most
    sample × max_tokens comparisons, whatever the corpus size.

    Storage is numpy: the held tokens (int32) and, per n, the sorted 64-bit hashes of the
    n-grams with the place after each (int64), equal hashes in insertion order — about
    4 + 16·(max_ngram − min_ngram + 1) bytes per token (116 with the defaults), bounded by
    `cap` tokens: adding text beyond it evicts whole documents, oldest first (a document
    longer than the cap keeps its last `cap` tokens). A hash collision is checked against
    the tokens, so an offer is exact."""

    def __init__(self, cap: int = CACHE_TOKENS, min_ngram: int = CACHE_MIN_NGRAM,
                 max_ngram: int = CACHE_MAX_NGRAM, max_tokens: int = CACHE_CHAIN,
                 sample: int = CACHE_SAMPLE):
        if not isinstance(cap, int) or cap < 1:
            raise BadInput(f"cache size must be an integer ≥ 1 tokens, got {cap!r}")
        if not (isinstance(min_ngram, int) and isinstance(max_ngram, int)
                and 1 <= min_ngram <= max_ngram):
            raise BadInput(f"cache n-grams must be 1 ≤ min ≤ max, got {min_ngram}..{max_ngram}")
        if not isinstance(max_tokens, int) or max_tokens < 1:
            raise BadInput(f"cache chain length must be an integer ≥ 1, got {max_tokens!r}")
        self.cap, self.min_ngram, self.max_ngram = cap, min_ngram, max_ngram
        self.max_tokens, self.sample = max_tokens, sample
        self.ids = np.zeros(0, dtype=np.int32)  # held tokens; ids[0] is global place `base`
        self.base = 0
        self.starts = np.zeros(0, dtype=np.int64)  # the global place each document starts
        self.keys = {n: np.zeros(0, dtype=np.uint64) for n in self.orders}
        self.places = {n: np.zeros(0, dtype=np.int64) for n in self.orders}

    @property
    def orders(self) -> range:
        return range(self.min_ngram, self.max_ngram + 1)

    @property
    def tokens(self) -> int:
        return int(self.ids.size)

    def documents(self) -> list[list[int]]:
        """The documents held, oldest first."""
        bounds = [s - self.base for s in self.starts] + [self.tokens]
        return [self.ids[a:b].tolist() for a, b in zip(bounds, bounds[1:])]

    def add(self, ids: list[int]) -> None:
        """Index one document (evicting the oldest beyond the cap)."""
        self.add_many([ids])

    def add_many(self, docs: list[list[int]]) -> None:
        """Index documents in order, in one merge (evicting the oldest beyond the cap)."""
        parts, hashes, places = [], {n: [] for n in self.orders}, {n: [] for n in self.orders}
        start, starts = self.base + self.tokens, []
        for ids in docs:
            doc = np.asarray(ids, dtype=np.int32)[-self.cap:]
            if doc.size < self.min_ngram + 1:
                continue
            starts.append(start)
            parts.append(doc)
            for n in self.orders:  # the n-grams doc[e − n:e], each followed by doc[e]
                ends = np.arange(n, doc.size)
                hashes[n].append(_hashes(doc, n)[:ends.size])
                places[n].append(start + ends)
            start += doc.size
        if not parts:
            return
        self.starts = np.concatenate([self.starts, starts])
        self.ids = np.concatenate([self.ids, *parts])
        for n in self.orders:
            h, p = np.concatenate(hashes[n]), np.concatenate(places[n])
            order = np.argsort(h, kind="stable")  # equal hashes stay in place order
            at = np.searchsorted(self.keys[n], h[order], side="right")
            self.keys[n] = np.insert(self.keys[n], at, h[order])
            self.places[n] = np.insert(self.places[n], at, p[order])
        if self.tokens > self.cap:
            self._evict()

    def _evict(self) -> None:
        """Drop the oldest documents until the cap holds."""
        first = int(np.searchsorted(self.starts, self.base + self.tokens - self.cap, "left"))
        self.starts = self.starts[first:]  # the oldest documents that fit go on
        new_base = int(self.starts[0])
        self.ids = self.ids[new_base - self.base:]
        self.base = new_base
        for n in self.orders:
            keep = self.places[n] >= new_base
            self.keys[n], self.places[n] = self.keys[n][keep], self.places[n][keep]

    def offer(self, context: list[int]) -> tuple[int, list[int]]:
        for n in range(min(self.max_ngram, len(context)), self.min_ngram - 1, -1):
            gram = [int(t) for t in context[len(context) - n:]]
            key = np.uint64(_hash(gram))
            keys = self.keys[n]
            lo, hi = np.searchsorted(keys, key, "left"), np.searchsorted(keys, key, "right")
            if lo == hi:
                continue
            places = [p for p in self.places[n][max(lo, hi - self.sample):hi][::-1].tolist()
                      if self.ids[p - n - self.base:p - self.base].tolist() == gram]
            if places:
                return n, self._continuation(places)
        return 0, []

    def _continuation(self, places: list[int]) -> list[int]:
        """The most frequent continuation of the places (most recent first), within each
        one's document."""
        doc = np.searchsorted(self.starts, places, side="right")  # each place's document + 1
        stop = np.append(self.starts, self.base + self.tokens)[doc]  # where that one ends
        runs = [self.ids[p - self.base:min(p + self.max_tokens, e) - self.base].tolist()
                for p, e in zip(places, stop.tolist())]
        chain: list[int] = []
        while runs and len(chain) < self.max_tokens:
            runs = [r for r in runs if len(r) > len(chain)]
            if not runs:
                break
            votes: dict[int, int] = {}
            for r in runs:
                votes[r[len(chain)]] = votes.get(r[len(chain)], 0) + 1
            best = max(votes.values())
            tok = next(r[len(chain)] for r in runs if votes[r[len(chain)]] == best)
            chain.append(tok)
            runs = [r for r in runs if r[len(chain) - 1] == tok]
        return chain

    def memory(self) -> dict:
        """What the cache holds and the bytes of its arrays."""
        nbytes = self.ids.nbytes + sum(self.keys[n].nbytes + self.places[n].nbytes
                                       for n in self.orders)
        return {"tokens": self.tokens, "documents": len(self.starts), "bytes": int(nbytes),
                "bytes_per_token": round(nbytes / max(self.tokens, 1), 1)}

    def settings(self) -> dict:
        return {"min_ngram": self.min_ngram, "max_ngram": self.max_ngram,
                "max_tokens": self.max_tokens, "sample": self.sample, "cap": self.cap}


_MUL = 0x9E3779B97F4A7C15  # a 64-bit odd multiplier (the golden ratio's)
_MASK = (1 << 64) - 1


def _hash(gram: list[int]) -> int:
    """The 64-bit hash of one n-gram: h = (h·M + t + 1) mod 2⁶⁴ over its tokens."""
    h = 0
    for t in gram:
        h = (h * _MUL + t + 1) & _MASK
    return h


def _hashes(ids: np.ndarray, n: int) -> np.ndarray:
    """:func:`_hash` of every n-gram ids[i:i + n], vectorised (uint64 wraps mod 2⁶⁴)."""
    m = ids.size - n + 1
    if m <= 0:
        return np.zeros(0, dtype=np.uint64)
    h = np.zeros(m, dtype=np.uint64)
    with np.errstate(over="ignore"):
        for j in range(n):
            h = h * np.uint64(_MUL) + ids[j:j + m].astype(np.uint64) + np.uint64(1)
    return h


def cache_along(cache: SuffixCache, ids: list[int], prompt_len: int,
                lookup_chains: list[list[int]]) -> tuple[list[int], list[int], list[int]]:
    """What the cache offers along a finished sequence, at the positions of
    :func:`offers_along` (the cache as it stands: this request's own text is not in it):
    the match length, the accepted run, and how many leading tokens the chain shares with
    lookup's chain there (`lookup_chains`, from offers_along)."""
    match, won, agree = [], [], []
    for t, look in zip(range(prompt_len - 1, len(ids) - 2), lookup_chains):
        n, chain = cache.offer(ids[max(0, t + 2 - cache.max_ngram):t + 2])
        match.append(n)
        won.append(run_length(chain, ids[t + 2:t + 2 + len(chain)]))
        agree.append(run_length(chain, look))
    return match, won, agree


def run_length(chain: list[int], truth: list[int]) -> int:
    """How many leading tokens of `chain` equal `truth`'s."""
    ok = 0
    while ok < len(chain) and ok < len(truth) and chain[ok] == truth[ok]:
        ok += 1
    return ok


class Proposals:
    """One sequence's chain sources at each step: prompt lookup over its own text (where
    `lookup` = (n-gram, chain) is given) and the cache shared across requests (where one
    is given). `offers()` → [(n, chain) of lookup, (n, chain) of the cache]; (0, []) for a
    source that is absent or has no match."""

    def __init__(self, ids: list[int], lookup: tuple[int, int] | None = None,
                 cache: SuffixCache | None = None):
        self.ids = [int(t) for t in ids]
        self.look = PromptLookup(*lookup).reset(self.ids) if lookup else None
        self.cache = cache

    def extend(self, added: list[int]) -> None:
        self.ids += added
        if self.look is not None:
            self.look.extend(added)

    def offers(self) -> list[tuple[int, list[int]]]:
        look = self.look.offer() if self.look is not None else (0, [])
        cache = self.cache.offer(self.ids[-self.cache.max_ngram:]) \
            if self.cache is not None else (0, [])
        return [look, cache]
