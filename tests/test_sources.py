"""Prompt lookup against a brute-force search."""
import random

import pytest

from treeopt.errors import BadInput
from treeopt.sources import PromptLookup


def brute(ids, max_ngram, max_tokens):
    for n in range(min(max_ngram, len(ids)), 0, -1):
        suffix = ids[len(ids) - n:]
        for end in range(len(ids) - 1, n - 1, -1):  # most recent earlier occurrence
            if ids[end - n:end] == suffix:
                return n, ids[end:end + max_tokens]
    return 0, []


def test_lookup_matches_brute_force():
    rng = random.Random(0)
    for trial in range(200):
        vocab = rng.choice([2, 3, 5, 20])
        ids = [rng.randrange(vocab) for _ in range(rng.randint(0, 60))]
        n, k = rng.randint(1, 4), rng.randint(1, 8)
        look = PromptLookup(n, k).reset(ids[:5])
        for i in range(5, len(ids) + 1):
            if i > 5:
                look.extend(ids[i - 1:i])
            assert look.offer() == brute(ids[:i], n, k), (trial, i)


def test_lookup_settings_are_checked():
    with pytest.raises(BadInput, match="n-gram length"):
        PromptLookup(0, 4)
    with pytest.raises(BadInput, match="chain length"):
        PromptLookup(2, 0)
    assert PromptLookup(2, 3).reset([]).offer() == (0, [])
