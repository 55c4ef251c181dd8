"""A decoding run's own acceptance: what each step was offered and what the text took,
in the record format `treeopt accept` writes — read from the steps the run already
verified, with no extra forward.

Step i of a decode starts from root token x_{t+1}, where t = prompt length + tokens
emitted before the step − 2, with the guess rows of the last step's winner: prompt token
d guessed x_{t+1+d}. Its record is the row `accept` measures at insertion point t:

- ranks[d−1]: the rank of x_{t+1+d} among guess row d's top RECORD_TOPK (RECORD_TOPK:
  not among them; −1: the step had no such row, or the text ends before);
- match, won: prompt lookup's match length over the text up to the root and how many of
  its proposed tokens the text took (:func:`treeopt.sources.offers_along`);
- state: the tree state the step ran in (the number of guess rows it used);
- cache_match, cache_won, agree (where the decoder had a cache source): the cache's
  offer as the step saw it — its match length, how many of its tokens the text took, and
  how many it shared with lookup's chain (:func:`treeopt.sources.cache_along`).

Only full steps are recorded (:func:`treeopt.runtime.full_steps`): the others were cut by
EOS or max_new_tokens. A run's records are *stepwise*, one record a step in order, where
`accept`'s hold every position of a response; the hybrid replay walks stepwise records one
record a step (:class:`treeopt.search.hybrid.Replay`) and the marginals count both alike
(:mod:`treeopt.pooled` makes the acceptance object, and pools sources).
"""
from __future__ import annotations

import numpy as np

from .acceptance import RECORD_TOPK
from .pooled import as_acceptance
from .engine.results import Result, full_steps
from .sources import LOOKUP_CHAIN, LOOKUP_NGRAM, offers_along, run_length


def of_result(prompt: list[int], res: Result, k: int, ngram: int = LOOKUP_NGRAM,
              chain: int = LOOKUP_CHAIN) -> dict[str, np.ndarray]:
    """One decode's records (arrays of its full steps): ranks [S, k], match, won, state,
    context (the KV length at the step: t + 1), live (sequences in the step) and step
    (the batched step's id; −1 unbatched)."""
    ids = list(prompt) + res.output_ids
    start = len(prompt) - 1  # offers_along's first position
    chains: list = []
    match, won = offers_along(ids, len(prompt), ngram, chain, chains)
    steps = res.offers[:full_steps(res)]
    out = {key: np.zeros(len(steps), dtype=np.int64)
           for key in ("match", "won", "state", "context", "live", "step")}
    out["ranks"] = np.full((len(steps), k), -1, dtype=np.int64)
    tops = [row[:RECORD_TOPK] for _, _, g, *_ in steps if g for row in g[:k]]
    for i, (emitted, state, guesses, *batched) in enumerate(steps):
        t = len(prompt) + emitted - 2
        out["match"][i], out["won"][i] = match[t - start], won[t - start]
        out["state"][i], out["context"][i] = state, t + 1
        out["live"][i], out["step"][i] = batched if batched else (1, -1)
        m = 0 if guesses is None else min(len(guesses), k)
        for d, top in enumerate(tops[:m]):
            if t + 2 + d < len(ids):
                tok = ids[t + 2 + d]
                out["ranks"][i, d] = top.index(tok) if tok in top else RECORD_TOPK
        tops = tops[m:]
    if len(res.cache_offers) >= len(steps):
        cm, cw, agree = (np.zeros(len(steps), dtype=np.int64) for _ in range(3))
        for i, ((emitted, *_), (n, proposed)) in enumerate(zip(steps, res.cache_offers)):
            t = len(prompt) + emitted - 2
            cm[i], agree[i] = n, run_length(proposed, chains[t - start])
            cw[i] = run_length(proposed, ids[t + 2:t + 2 + len(proposed)])
        out.update(cache_match=cm, cache_won=cw, agree=agree)
    return out


def settings(lookup) -> tuple[int, int]:
    """(n-gram, chain) a run records prompt lookup with: its tree's lookup n-gram (the
    policy's match lengths), chains at least as long as `accept` measures."""
    if lookup is None:
        return LOOKUP_NGRAM, LOOKUP_CHAIN
    return lookup.max_ngram, max(LOOKUP_CHAIN, lookup.max_tokens)


def of_run(model: str, k: int, prompts: list[list[int]], results: list[Result], lookup=None,
           cache: dict | None = None, **about) -> dict | None:
    """The acceptance object of a run's decodes (one per prompt); `lookup` is the run's
    tree's, `cache` its cache source's settings."""
    return as_block(model, k, of_results(prompts, results, k, lookup), lookup, cache=cache,
                    **about)


def of_results(prompts: list[list[int]], results: list[Result], k: int, lookup=None
               ) -> list[dict]:
    """Each decode's records (:func:`of_result`), with the run's lookup settings."""
    ngram, chain = settings(lookup)
    return [of_result(p, r, k, ngram, chain) for p, r in zip(prompts, results)]


def as_block(model: str, k: int, parts: list[dict], lookup=None, live: int | None = None,
             steps: list | None = None, cache: dict | None = None, **about) -> dict | None:
    """The acceptance object of a run's records (with `live`, only the steps with that
    many sequences in the batch). `steps`, where given, receives each record's
    batched-step id, in the records' order; `cache`: the settings of the run's cache
    source (its records are kept where every decode has them)."""
    if live is not None:
        parts = [{key: v[p["live"] == live] for key, v in p.items()} for p in parts]
    if steps is not None:
        steps += [int(x) for p in parts for x in p["step"]]
    return as_acceptance(model, k, parts, [True] * len(parts), *settings(lookup),
                         cache=cache, **about)


def replayable(parts: list[dict], lookup=None, cache: dict | None = None) -> dict | None:
    """Stepwise records as the hybrid replay reads them (what
    :func:`treeopt.acceptance.unpack_records` makes of a file), in memory: no estimates,
    no packing — for a running decode (:mod:`treeopt.online`). None without a record."""
    parts = [p for p in parts if len(p["match"])]
    if not parts:
        return None
    ngram, chain = settings(lookup)
    rec = {key: np.concatenate([p[key] for p in parts])
           for key in ("ranks", "match", "won", "state", "step")}
    rec.update(lengths=[len(p["match"]) for p in parts], stepwise=[True] * len(parts),
               max_ngram=ngram, max_tokens=chain)
    if cache and all("cache_match" in p for p in parts):
        for key in ("cache_match", "cache_won", "agree"):
            rec[key] = np.concatenate([p[key] for p in parts])
        rec["cache_max_ngram"], rec["cache_max_tokens"] = cache["max_ngram"], cache["max_tokens"]
    return rec
