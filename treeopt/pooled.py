"""Acceptance from per-position records, wherever they come from: a run's own steps
(:mod:`treeopt.records`), an acceptance file `treeopt accept` measured, or several pooled.
Pooling concatenates the records — each recorded position counts once — and remakes the
estimates (:func:`treeopt.acceptance.estimate`). A run JSON given as an acceptance source
is read for its records here (every block of a families or batch bench, pooled).
"""
from __future__ import annotations

import pathlib

import numpy as np

from . import runs
from .acceptance import (RECORD_TOPK, SCHEMA, cache_summary, estimate, lookup_summary, pack,
                         unpack_records, validate)
from .artefact import read_json
from .bounds import BOUNDS, count
from .errors import BadInput
from .sources import LOOKUP_CHAIN, LOOKUP_NGRAM

CACHE_KEYS = ("cache_match", "cache_won", "agree")  # the cache source's records


def as_acceptance(model: str, k: int, parts: list[dict], stepwise: list[bool],
                  ngram: int = LOOKUP_NGRAM, chain: int = LOOKUP_CHAIN,
                  cache: dict | None = None, **about) -> dict | None:
    """An acceptance object (schema ``treeopt.acceptance/1``) from per-sequence records:
    the marginals and fits :func:`treeopt.acceptance.estimate` makes, and the records
    themselves for the hybrid replay; `about` says what made them (run, prompt file,
    tree). The cache source's records are kept where `cache` (its settings) is given and
    every part has them. None when no full step was recorded."""
    keep = [(p, s) for p, s in zip(parts, stepwise) if len(p["match"])]
    if not keep:
        return None
    cat = {key: np.concatenate([p[key] for p, _ in keep])
           for key in ("ranks", "match", "won", "state", "context")}
    owner = np.concatenate([np.full(len(p["match"]), i) for i, (p, _) in enumerate(keep)])
    est = estimate(cat["ranks"], RECORD_TOPK, owner, bootstrap=200)
    lk = lookup_summary(cat["ranks"], cat["match"], cat["won"], owner, ngram, chain)
    lk["records"]["stepwise"] = [bool(s) for _, s in keep]
    lk["records"]["state"] = pack(cat["state"])
    ck = {}
    if cache and all("cache_match" in p for p, _ in keep):
        ck = {"cache": cache_summary(cat["ranks"], *(np.concatenate([p[key] for p, _ in keep])
                                                     for key in CACHE_KEYS), cache)}
    return {"schema": SCHEMA, "model": model, "source": "run", **about,
            "num_prompt_tokens": k, "topk": RECORD_TOPK, **est,
            "mean_context": int(round(float(cat["context"].mean()))),
            "prompts": len(keep), "lookup": lk, **ck}


def pool(objs: list[dict], names: list[str], max_positions: int | None = None) -> dict:
    """Several acceptance objects with records (acceptance files, runs) as one: their
    records concatenated (each recorded position counts once), the estimates remade.
    They must share the model, the prompt-token count, top-k and lookup n-gram; chains
    are cut to the shortest any of them measured. Past `max_positions`, an even sample
    of whole prompts (every s-th, s as small as keeps it within) is kept, and the object
    says so (`sampled`)."""
    recs = []
    for obj, name in zip(objs, names):
        rec = unpack_records(obj, where=name)
        if rec is None:
            raise BadInput(f"{name} has no per-position records to pool (an acceptance file "
                           "measured by `treeopt accept`, or a run JSON)")
        recs.append(rec)
    first, name0 = objs[0], names[0]
    if first["topk"] != RECORD_TOPK:
        raise BadInput(f"cannot pool {name0}: its top-k is {first['topk']}, pooled records "
                       f"rank among the top {RECORD_TOPK} (measure with `treeopt accept "
                       f"--topk {RECORD_TOPK}`)")
    for obj, rec, name in zip(objs[1:], recs[1:], names[1:]):
        for what, a, b in (("model", obj["model"], first["model"]),
                           ("num_prompt_tokens", obj["num_prompt_tokens"],
                            first["num_prompt_tokens"]),
                           ("topk", obj["topk"], first["topk"]),
                           ("lookup n-gram", rec["max_ngram"], recs[0]["max_ngram"])):
            if a != b:
                raise BadInput(f"cannot pool {name} with {name0}: {what} {a} vs {b}")
    count(sum(sum(r["lengths"]) for r in recs), "records", f"{len(objs)} pooled sources")
    chain = min(r["max_tokens"] for r in recs)
    cache = _pooled_cache(objs, recs)
    parts, stepwise = [], []
    for obj, rec in zip(objs, recs):
        ctx = obj.get("mean_context") or 0
        bounds = np.cumsum([0, *rec["lengths"]])
        for i, n in enumerate(rec["lengths"]):
            sl = slice(bounds[i], bounds[i + 1])
            parts.append({"ranks": rec["ranks"][sl], "match": rec["match"][sl],
                          "won": np.minimum(rec["won"][sl], chain), "state": rec["state"][sl],
                          "context": np.full(n, ctx)})
            if cache:
                parts[-1].update({key: np.minimum(rec[key][sl], cache["max_tokens"])
                                  if key != "cache_match" else rec[key][sl]
                                  for key in CACHE_KEYS})
            stepwise.append(rec["stepwise"][i])
    total, sampled = sum(len(p["match"]) for p in parts), {}
    if max_positions is not None and total > max_positions:
        parts, stepwise = _even_sample(parts, stepwise, max_positions)
        sampled = {"sampled": {"positions": sum(len(p["match"]) for p in parts),
                               "of": total, "prompts": len(parts)}}
    return as_acceptance(first["model"], first["num_prompt_tokens"], parts, stepwise,
                         recs[0]["max_ngram"], chain, cache, source="pooled", pooled=names,
                         **sampled)


def _even_sample(parts: list[dict], stepwise: list[bool], cap: int):
    """Every s-th prompt's records, with the smallest stride s that keeps ≤ cap positions
    (a single prompt longer than cap is kept alone, cut to cap)."""
    for s in range(2, len(parts) + 1):
        keep = list(range(0, len(parts), s))
        if sum(len(parts[i]["match"]) for i in keep) <= cap:
            return [parts[i] for i in keep], [stepwise[i] for i in keep]
    one = {k: v[:cap] for k, v in parts[0].items()}
    return [one], stepwise[:1]


def capped(obj: dict, name: str) -> tuple[dict, str | None]:
    """An acceptance object whose records a search replays in bounded time: itself when
    it holds at most BOUNDS["search_positions"] positions, else an even sample of its
    prompts (:func:`pool`), with the line that says so."""
    lengths = ((obj.get("lookup") or {}).get("records") or {}).get("lengths") or []
    cap = BOUNDS["search_positions"]  # the lengths were checked when the object was read
    if sum(lengths) <= cap:
        return obj, None
    out = pool([obj], [name], cap)
    s = out["sampled"]
    return out, (f"note: {name} holds {s['of']} measured positions; replaying an even "
                 f"sample of {s['prompts']} prompts ({s['positions']} positions, the bound "
                 "on positions a search replays)")


def _pooled_cache(objs: list[dict], recs: list[dict]) -> dict | None:
    """The cache settings of a pool: kept where every source has cache records with the
    same n-grams (chains cut to the shortest); else the pool has none."""
    if not all("cache_match" in r for r in recs):
        return None
    settings = [o["cache"] for o in objs]
    if len({(s["min_ngram"], s["max_ngram"]) if "min_ngram" in s else None
            for s in settings}) != 1:
        return None
    keys = ("min_ngram", "max_ngram", "sample", "cap")
    return {**{k: settings[0][k] for k in keys if k in settings[0]},
            "max_tokens": min(s["max_tokens"] for s in settings)}


def load(paths: list) -> dict:
    """One acceptance object from acceptance files and run JSONs, pooled when there are
    several (or a run holds several blocks: a families or batch bench)."""
    count(len(paths), "acceptance_sources", "--acceptance")
    seen = set()
    for p in paths:
        real = pathlib.Path(p).resolve()
        if real in seen:
            raise BadInput(f"--acceptance {p}: given twice (each source counts once)")
        seen.add(real)
    objs, names = [], []
    for p in paths:
        obj = read_json(p, "acceptance file")
        if obj.get("schema") == runs.SCHEMA:
            runs.validate(obj, f"run file {p}")
            blocks = runs.acceptance_blocks(obj)
            if not blocks:
                raise BadInput(f"run file {p} holds no records of its steps (no full decode "
                               "step, or it was written before runs recorded them)")
            for where, block in blocks:
                validate(block, f"run file {p}: {where}")
                objs.append(block)
                names.append(f"{p} ({where})" if len(blocks) > 1 else str(p))
        else:
            validate(obj, f"acceptance file {p}")
            objs.append(obj)
            names.append(str(p))
    if not objs:
        raise BadInput("no acceptance source given")
    return objs[0] if len(objs) == 1 else pool(objs, names)
