"""The speculative setting a serving engine can take, tuned for a device and a load.

The engines draft one chain (vLLM, TensorRT-LLM) or one trie (SGLang) from the text
itself; what treeopt can tune is its length per batch size. With E_s(K) the tokens a step
emits when the engine's own rule s drafts K tokens (replayed over the model's greedy
answers, :mod:`treeopt.drafts`; E_s(0) = 1) and t(B, L, C) the profile's step time for B
sequences of L input tokens at context C (:class:`treeopt.latency.Latency`; C read at
:func:`treeopt.search.batch.batch_context`), the draft length at batch size B is

    K*(B) = argmax_{0 ≤ K ≤ KMAX}  B · E_s(K) / t(B, 1 + K, C_B),

kept at 0 unless it beats plain decoding by BATCH_MIN_GAIN (B > 1), as treeopt's own
per-batch trees are. The engine's rule sets the verified length to 1 + K whatever the
draft found (vLLM and SGLang pad with filler; TensorRT-LLM's graphs pad): a draft never
costs less than its budget. The engine's other knobs (vLLM's n-gram window, TensorRT-LLM's
pattern size, SGLang's BFS breadth) are chosen from a small grid by the mean speedup over
the batch sizes asked; SGLang takes one budget N = 1 + K for every batch size, chosen the
same way. Then each release's rules (:mod:`treeopt.engines`) shape the result: vLLM's
num_speculative_tokens = max K; TensorRT-LLM's smallest schedule key carries
max_draft_len, so no larger K may follow it.

t(B, L) is treeopt's engine's time (the profile's), not the target engine's: the export
says so, and docs/serving.md says how to re-measure on the engine itself.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json

import numpy as np

from . import drafts, paths, prompts
from .artefact import read_json, write_json
from .batch import BatchDecoder, schedule_of
from .engines import k_at, schedule_from
from .errors import BadInput
from .inputs import resolve_inputs
from .latency import Latency
from .progress import progress
from .runtime import open_decoder
from .search.batch import BATCH_MIN_GAIN, batch_context
from .tree import Lookup, Tree

KMAX = 8  # the longest draft searched (the brute-force benchmark runs K = 0..KMAX)
SGLANG_N = (2, 3, 4, 5, 6, 8, 10, 12, 16)  # trie budgets N (N − 1 draft nodes)
DEFAULT_SOURCE = {"vllm": "lookup", "sglang": "cache", "trtllm": "cache"}
# what each (engine, source) is called there
METHOD = {("vllm", "lookup"): "ngram", ("vllm", "cache"): "suffix",
          ("trtllm", "lookup"): "NGram, private pool", ("trtllm", "cache"): "NGram, public pool",
          ("sglang", "cache"): "NGRAM (shared trie)"}


def check_source(engine: str, source: str | None) -> str:
    source = source or DEFAULT_SOURCE[engine]
    if (engine, source) not in METHOD:
        raise BadInput(f"{engine} drafts from one source only (a shared trie of recent "
                       f"text: cache); --draft-source {source} is not offered")
    return source


def candidates(engine: str, source: str) -> list[dict]:
    """The engine's knobs besides the draft length, as a small grid."""
    if engine == "vllm" and source == "lookup":
        return [{"prompt_lookup_min": a, "prompt_lookup_max": b}
                for a, b in ((1, 2), (1, 3), (2, 3), (2, 4), (3, 5), (5, 5))]
    if engine == "vllm":
        return [{"suffix_decoding_max_tree_depth": 24}]
    if engine == "trtllm":
        return [{"max_matching_ngram_size": m} for m in (1, 2, 3, 4)]
    return [{"speculative-ngram-max-bfs-breadth": b} for b in (1, 4, 10)]


def proposer(engine: str, source: str, knobs: dict, k: int):
    if engine == "vllm" and source == "lookup":
        return drafts.VllmNgram(knobs["prompt_lookup_min"], knobs["prompt_lookup_max"])
    if engine == "vllm":
        return drafts.VllmSuffix(knobs["suffix_decoding_max_tree_depth"])
    if engine == "trtllm":
        return drafts.TrtNgram(knobs["max_matching_ngram_size"], k, public=source == "cache")
    return drafts.SglangTrie(max_breadth=knobs["speculative-ngram-max-bfs-breadth"])


def draft_lengths(engine: str) -> list[int]:
    return [n - 1 for n in SGLANG_N] if engine == "sglang" else list(range(1, KMAX + 1))


def replayed(engine: str, source: str, knobs: dict, texts) -> dict[int, float]:
    """E_s(K) for every draft length searched, the engine's rule replayed over texts."""
    out = {0: 1.0}
    for k in draft_lengths(engine):
        out[k] = drafts.replay(proposer(engine, source, knobs, k), texts, k)["tokens_per_step"]
    return out


def from_records(rec: dict, source: str, min_n: int) -> dict[int, float]:
    """E(K) from an acceptance file's per-position records (treeopt's own lookup or cache
    source: the nearest to an engine's rule where the model's answers are not at hand):
    the walk of :func:`treeopt.drafts.replay` over each prompt's records."""
    match = rec["match" if source == "lookup" else "cache_match"]
    won = rec["won" if source == "lookup" else "cache_won"]
    out = {0: 1.0}
    for k in range(1, KMAX + 1):
        steps = tokens = start = 0
        for n, flag in zip(rec["lengths"], rec["stepwise"]):
            m, w, i = match[start:start + n], won[start:start + n], 0
            start += n
            while not flag and i + k <= n - 1:
                got = min(k, int(w[i])) if m[i] >= min_n else 0
                steps, tokens, i = steps + 1, tokens + 1 + got, i + 1 + got
        out[k] = tokens / steps if steps else 1.0
    return out


def best_k(table: dict[int, float], lat: Latency, ctx: int, batch: int,
           cap: int | None = None) -> tuple[int, float]:
    """K*(B) (module docstring) within cap, and its speedup over plain decoding."""
    t_plain = float(lat([1], ctx)[0])
    best, gain = 0, 1.0
    for k, e in table.items():
        if 0 < k <= (KMAX if cap is None else cap):
            g = e * t_plain / float(lat([1 + k], ctx)[0])
            if g > gain:
                best, gain = k, g
    if best and gain < (1 + BATCH_MIN_GAIN if batch > 1 else 1.0):
        best, gain = 0, 1.0
    return best, gain


def _at(profile: dict, batches: list[int], context: int) -> dict[int, tuple]:
    """Per batch size, the profile's t(L) there and the context it is read at (made once
    per search: every knob set and schedule rule reads them)."""
    return {b: (Latency(profile, batch=b), batch_context(context, b)) for b in batches}


def _rows(table, at: dict[int, tuple], ks) -> list[dict]:
    rows = []
    for b, (lat, ctx) in at.items():
        k, t_plain = ks[b], float(lat([1], ctx)[0])
        t = float(lat([1 + k], ctx)[0])
        e = table.get(k, 1.0)
        rows.append({"batch": b, "draft_tokens": k, "tokens_per_step": round(e, 4),
                     "step_seconds": round(t, 8), "tokens_per_second": round(b * e / t, 4),
                     "plain_tokens_per_second": round(b / t_plain, 4),
                     "speedup_vs_plain": round(e * t_plain / t, 4)})
    return rows


def tune(engine: str, version: str, source: str, tables: dict[str, dict[int, float]],
         knobs_of: dict[str, dict], profile: dict, batches: list[int], context: int) -> dict:
    """The best setting for the batch sizes: `tables` maps a knob set's name to its E(K)
    (`knobs_of` to the knobs). Returns the setting (None: no drafting pays), the knobs, K
    per batch size and a row per batch size under the release's own semantics."""
    best, at = None, _at(profile, batches, context)
    for name, table in tables.items():
        if engine == "sglang":
            ks_all = {}
            for k in table:  # one N for every batch size
                rows = _rows(table, at, {b: k for b in batches})
                ks_all[k] = float(np.mean([r["speedup_vs_plain"] for r in rows]))
            k = max(ks_all, key=lambda x: (ks_all[x], -x))
            ks = {b: k for b in batches}
        else:
            ks = {b: best_k(table, lat, ctx, b)[0] for b, (lat, ctx) in at.items()}
            if engine == "trtllm":  # the smallest key carries max_draft_len: none above it
                first = ks[min(batches)]
                ks = {b: best_k(table, lat, ctx, b, cap=first)[0] if first else 0
                      for b, (lat, ctx) in at.items()}
        score = float(np.mean([r["speedup_vs_plain"] for r in _rows(table, at, ks)]))
        if best is None or score > best[0] + 1e-9:
            best = (score, name, ks)
    _, name, ks = best
    setting, notes = assemble(engine, version, source, knobs_of[name], ks)
    used = {b: k_at(engine, version, setting, b) for b in batches}
    return {"setting": setting, "knobs": knobs_of[name], "draft_tokens": used,
            "rows": _rows(tables[name], at, used), "notes": notes,
            "replayed": {str(k): round(v, 4) for k, v in tables[name].items()}}


def assemble(engine: str, version: str, source: str, knobs: dict, ks: dict[int, int]
             ) -> tuple[dict | None, list[str]]:
    """The engine's fields for knobs and K(B); None where no batch size drafts."""
    top = max(ks.values())
    if top == 0:
        return None, ["no draft length pays at any batch size asked: serve without "
                      "speculative decoding"]
    if engine == "sglang":
        return {"speculative-algorithm": "NGRAM", "speculative-num-draft-tokens": top + 1,
                "speculative-ngram-min-bfs-breadth": 1, **knobs,
                "speculative-ngram-match-type": "BFS",
                "speculative-ngram-max-trie-depth": 18}, [
            "one trie budget for every batch size (SGLang takes no per-batch setting)"]
    sched, notes = schedule_from(engine, version, ks)
    if engine == "vllm":
        method = "ngram" if source == "lookup" else "suffix"
        return {"method": method, "num_speculative_tokens": top, **knobs, **sched}, notes + [
            "vLLM drops the per-batch schedule when data parallelism > 1"]
    first = ks[min(ks)]
    return {"decoding_type": "NGram", "max_draft_len": first, **knobs, "is_keep_all": True,
            "is_use_oldest": True, "is_public_pool": source == "cache", **sched}, notes


def lost(engine: str, source: str) -> list[str]:
    """What the engine's format cannot carry of treeopt's tree."""
    out = ["the tree: one chain per step" if engine != "sglang" else
           "the tree: SGLang's trie comes from recent text, not from searched guesses",
           "the prompt tokens (PPD's trained guesses): no engine takes them"]
    if (engine, source) in (("vllm", "lookup"), ("trtllm", "lookup")):
        out.append("a cache across requests (this source matches the request's own text)")
    return out


def sample_of(acceptance: dict) -> tuple[list[str], int, str]:
    """The prompts an acceptance file measured (its prompt set, slice and count), the
    answer length, and the set's name; BadInput where the file does not say (pooled)."""
    try:
        name, n = acceptance["prompt_file"], acceptance["prompts"]
        offset, stride = acceptance.get("offset", 0), acceptance.get("stride", 1)
        max_new = acceptance["max_new_tokens"]
    except (KeyError, TypeError):
        raise BadInput("the acceptance file does not name the prompts it measured") from None
    return prompts.load(name, n, offset, stride), max_new, f"{name} (offset {offset}, " \
        f"stride {stride}, {n} prompts)"


def answers(model: str | None, acceptance: dict, dtype: str, device: str = "auto",
            quiet: bool = False) -> tuple[list[tuple[list[int], list[int]]], dict]:
    """(prompt ids, greedy answer ids) for the acceptance file's prompts: the model's own
    greedy answers, decoded once (treeopt's engine, lossless against HF greedy) and kept
    in the user cache. BadInput where the model or the prompts are not at hand."""
    texts, max_new, sample = sample_of(acceptance)
    dec, info = open_decoder(resolve_inputs(model, dtype=dtype, device=device, want=("tree",)),
                             model, dtype, device)
    encoded = dec.encode_prompts(texts, max_new)
    key = hashlib.sha256(json.dumps([info["model"], info["dtype"], max_new, encoded])
                         .encode()).hexdigest()[:24]
    path = paths.cache_dir() / "answers" / f"{key}.json"
    about = {"prompts": sample, "max_new_tokens": max_new, "model": info["model"],
             "dtype": info["dtype"]}
    if path.is_file():
        got = read_json(path, "cached answers").get("answers")
        if isinstance(got, list) and len(got) == len(encoded) and all(
                isinstance(a, list) and all(isinstance(t, int) for t in a) for a in got):
            return list(zip(encoded, got)), {**about, "cached": str(path)}
    bd = BatchDecoder(dec.lm, dec.prompt_tokens, schedule_of(dec.tree), None)
    out = []
    for i in progress(range(0, len(encoded), 8), "answers", quiet=quiet):
        res = bd.generate(encoded[i:i + 8], max_new, learn=False).results
        out += [r.output_ids for r in res]
    write_json(paths.make_folder(path.parent) / path.name, {**about, "answers": out})
    return list(zip(encoded, out)), about


def chain_trees(engine: str, source: str, knobs: dict, used: dict[int, int],
                num_prompt_tokens: int):
    """The exported chain per batch size as a treeopt tree (`treeopt bench` runs it): the
    engine's own-text n-gram rule as treeopt's prompt lookup (vLLM ngram: exact; vLLM
    suffix and TensorRT-LLM: the nearest, treeopt's lookup of the same n-gram reach)."""
    if engine == "sglang":
        return None
    table = {b: chain_tree(k, *window(engine, source, knobs), num_prompt_tokens) if k
             else None for b, k in used.items()}
    top = next((t for t in table.values() if t is not None), None)
    return None if top is None else dataclasses.replace(top, by_batch=table)


def window(engine: str, source: str, knobs: dict) -> tuple[int, int]:
    """The match lengths (min, max) of treeopt's lookup that stand for the engine's rule."""
    if engine == "vllm" and source == "lookup":
        return knobs["prompt_lookup_min"], knobs["prompt_lookup_max"]
    return (1, 8) if engine == "vllm" else (1, knobs["max_matching_ngram_size"])


def chain_tree(k: int, min_n: int, max_n: int, num_prompt_tokens: int) -> Tree:
    """A tree of no guesses (:meth:`Tree.of_chains`): each step verifies the root and prompt
    lookup's chain of up to k tokens wherever the match is min_n..max_n tokens long."""
    return Tree.of_chains(num_prompt_tokens, Lookup.alone(
        max_n, k, {n: k for n in range(min_n, max_n + 1)}), meta={"kind": "engine chain"})
