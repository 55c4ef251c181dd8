"""The one table of sizes a file or a flag may carry, and the check that enforces them
where values enter (flags, acceptance files, tree files, run files, prompt files).

A hostile or mistaken file must not ask for gigabytes or hours: every count below has an
upper bound, named in the error line. The bounds sit well above any real use (the shipped
acceptance file holds 5.8k measured positions, chains of 16, n-grams of 3).
"""
from __future__ import annotations

from .errors import BadInput, shown

BOUNDS = {
    # prompt lookup: the longest n-gram matched, the longest chain proposed
    "lookup_ngram": 8,
    "lookup_chain": 64,
    # sequences decoded together (profile, search, bench, run, tree files)
    "batch": 256,
    # tokens of context (search --context, a run's context)
    "context": 1 << 20,
    # measured positions in an acceptance file's records (each search replays them all)
    "records": 100_000,
    # prompts decoded as one batch by `run --batch-file`
    "batch_prompts": 256,
    # a row number in a prompt-set slice, NAME[START:STOP]
    "prompt_rows": 10_000_000,
    # bytes of a prompt file, after decompression
    "prompt_bytes": 64 << 20,
    # acceptance files and run JSONs pooled by one --acceptance list
    "acceptance_sources": 32,
    # tokens of a corpus file, and tokens the cache source holds (--cache-tokens): the
    # cache's index takes 112 bytes a token (2M: 224 MB), a corpus file 5.3 bytes a token
    "corpus_tokens": 2_000_000,
    "cache_tokens": 2_000_000,
    # bytes of any JSON file read (artefacts, run JSONs, corpora): read whole, parsed
    # into Python objects of ~10x its size
    "json_bytes": 64 << 20,
    # prompts (sequences) in an acceptance file's or a run's records
    "record_prompts": 20_000,
    # measured positions a search or a prediction replays: past it, an even sample of
    # whole prompts is replayed, and the verb says so (a hybrid search of the shipped
    # 5.8k positions takes about a minute on 2 cores; 12k about two)
    "search_positions": 12_000,
}

WHAT = {"lookup_ngram": "n-gram length", "lookup_chain": "lookup chain length",
        "batch": "batch size", "context": "context length",
        "records": "measured positions", "batch_prompts": "prompts in one batch",
        "prompt_rows": "prompt rows", "prompt_bytes": "bytes of prompt text", "acceptance_sources": "acceptance sources",
        "corpus_tokens": "corpus tokens", "cache_tokens": "cached tokens",
        "json_bytes": "a JSON file's size", "record_prompts": "prompts with records",
        "search_positions": "positions a search replays"}


def count(value, name: str, where: str, lo: int = 1) -> int:
    """`value` as an integer in lo..BOUNDS[name] (a JSON true is not one), else a one-line
    BadInput naming the bound."""
    hi = BOUNDS[name]
    if not isinstance(value, int) or isinstance(value, bool):
        raise BadInput(f"{where}: {shown(value)} is not an integer ({WHAT[name]})")
    if not lo <= value <= hi:
        raise BadInput(f"{where}: {WHAT[name]} {value} outside {lo}..{hi}")
    return value


def int_key(key) -> int | None:
    """A JSON object key that spells a plain decimal integer ('0', '12'; not '012', '²',
    ' 1' or '1e3'), as an int; None otherwise."""
    s = str(key)
    if not s or len(s) > 9 or not s.isascii() or not s.isdigit() or (s[0] == "0" and s != "0"):
        return None
    return int(s)
