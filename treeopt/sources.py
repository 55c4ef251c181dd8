"""Candidate sources for a decoding step, besides the prompt tokens' own guesses.

Prompt lookup (as HF's PromptLookupCandidateGenerator and llama.cpp's lookup decoding):
the continuation after the most recent earlier occurrence of the last n tokens of prompt +
output, for the longest n in max_ngram..1 that matches. The index is incremental: each
appended token registers the n-grams that end just before it (so every indexed n-gram has
a continuation) in O(max_ngram); a query is O(max_ngram).
"""
from __future__ import annotations

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


def offers_along(ids: list[int], prompt_len: int, max_ngram: int, max_tokens: int
                 ) -> tuple[list[int], list[int]]:
    """What prompt lookup offers along a finished sequence: at every position t from
    prompt_len − 1 to len − 3 (the step whose root is token t + 1), the match length n
    (0 = none) over tokens ..t + 1 and how many of its proposed tokens t + 2.. are the
    sequence's own (the accepted run). `accept` and recorded runs read lookup's
    acceptance from here."""
    match, won = [], []
    look = PromptLookup(max_ngram, max_tokens).reset(ids[:prompt_len + 1])
    for t in range(prompt_len - 1, len(ids) - 2):
        n, chain = look.offer()
        truth = ids[t + 2:t + 2 + len(chain)]
        ok = 0
        while ok < len(truth) and chain[ok] == truth[ok]:
            ok += 1
        match.append(n)
        won.append(ok)
        look.extend([ids[t + 2]])
    return match, won
