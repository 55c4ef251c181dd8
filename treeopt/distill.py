"""Self-distillation data and the multi-insertion forward (shared by train and accept).

Data: the base model's own greedy responses to a prompt set, plus the teacher's top-k
log-probs at every position, cached on disk keyed by model, prompt-file hash and settings.

Multi-insertion forward: G groups of the K prompt tokens are run in one forward on top of
a sequence's cached KV. Group g is inserted after sequence position t_g: its tokens see
positions 0..t_g and the group's own earlier prompt tokens, at positions t_g+1..t_g+K —
exactly what the runtime's prompt tokens see when t_g is the last accepted position.
Prompt token i (1-based) of group g predicts sequence token t_g + 1 + i.
"""
from __future__ import annotations

import dataclasses
import hashlib
import io
import json

import numpy as np
import torch

from .acceptance import cache_summary, estimate, lookup_summary, mean_context
from .artefact import write_atomic
from .models import Loaded, dtype_name
from .paths import cache_dir
from .progress import progress
from .prompts import encode
from .forward import attention_masks, model_call, new_cache
from .sources import LOOKUP_CHAIN, LOOKUP_NGRAM, SuffixCache, cache_along, offers_along


@dataclasses.dataclass
class Sample:
    ids: list[int]  # prompt + greedy response
    prompt_len: int
    top_idx: torch.Tensor  # [S, k] int32: teacher's top-k tokens at each position
    top_lp: torch.Tensor  # [S, k] float16: their log-probs (position p predicts p+1)

    @property
    def response_len(self) -> int:
        return len(self.ids) - self.prompt_len


def _key(lm: Loaded, texts: list[str], settings: dict) -> str:
    h = hashlib.sha256()
    h.update(json.dumps({"model": lm.model_id, "path": lm.path, **settings},
                        sort_keys=True).encode())
    for t in texts:
        h.update(t.encode())
        h.update(b"\0")
    return h.hexdigest()[:16]


@torch.inference_mode()
def greedy_batch(lm: Loaded, batch: list[list[int]], max_new_tokens: int) -> list[list[int]]:
    """Greedy responses for a batch of prompts (left-padded HF generate)."""
    pad = lm.eos_ids[0] if lm.eos_ids else 0
    width = max(len(x) for x in batch)
    ids = torch.full((len(batch), width), pad, dtype=torch.long)
    att = torch.zeros_like(ids)
    for i, x in enumerate(batch):
        ids[i, width - len(x):] = torch.tensor(x)
        att[i, width - len(x):] = 1
    out = lm.model.generate(input_ids=ids.to(lm.device), attention_mask=att.to(lm.device),
                            max_new_tokens=max_new_tokens, do_sample=False,
                            eos_token_id=lm.eos_ids or None, pad_token_id=pad,
                            temperature=None, top_p=None, top_k=None)
    res = []
    eos = set(lm.eos_ids)
    for row in out[:, width:].tolist():
        cut = next((i + 1 for i, t in enumerate(row) if t in eos), len(row))
        res.append(row[:cut])
    return res


@torch.inference_mode()
def prefix_pass(lm: Loaded, ids: list[int]) -> tuple[list[tuple[torch.Tensor, torch.Tensor]],
                                                     torch.Tensor]:
    """One no-grad forward over a sequence: its per-layer KV and its logits [S, V]."""
    cache = new_cache()
    x = torch.tensor(ids, device=lm.device)
    logits = model_call(lm.model, lm.model.get_input_embeddings()(x), cache,
                        torch.arange(len(ids), device=lm.device))
    return [(layer.keys, layer.values) for layer in cache.layers], logits


def greedy_responses(lm: Loaded, texts: list[str], max_new_tokens: int = 160,
                     batch_size: int = 16, raw: bool = False, quiet: bool = False,
                     tag: str = "data") -> list[tuple[list[int], list[int]]]:
    """(prompt ids, greedy response ids) per text, generated once and cached on disk (the
    model's own text: distillation data, acceptance samples, the cache source's corpus)."""
    settings = {"max_new_tokens": max_new_tokens, "raw": raw, "dtype": dtype_name(lm.dtype),
                "format": 1}
    path = cache_dir() / "distill" / f"{lm.model_id}-greedy-{_key(lm, texts, settings)}.json"
    prompts = [encode(lm.tokenizer, t, raw=raw) for t in texts]
    cached = _cached_responses(path, len(prompts), len(lm.tokenizer))
    if cached is not None:
        return list(zip(prompts, cached))
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))  # less padding
    responses: dict[int, list[int]] = {}
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    for b in progress(batches, f"{tag}: greedy responses", quiet=quiet):
        for i, r in zip(b, greedy_batch(lm, [prompts[i] for i in b], max_new_tokens)):
            responses[i] = r
    out = [responses[i] for i in range(len(prompts))]
    write_atomic(path, json.dumps({"settings": settings, "responses": out}).encode())
    return list(zip(prompts, out))


def _cached_responses(path, n: int, vocab: int) -> list[list[int]] | None:
    """A cached entry's responses where it holds n lists of token ids inside the
    vocabulary; None (regenerate) for a missing, damaged or tampered entry."""
    try:
        got = json.loads(path.read_bytes())["responses"]
    except (OSError, ValueError, KeyError, TypeError, RecursionError):
        return None
    ok = isinstance(got, list) and len(got) == n and all(
        isinstance(r, list) and all(type(t) is int and 0 <= t < vocab for t in r) for r in got)
    return got if ok else None


def load_samples(lm: Loaded, texts: list[str], max_new_tokens: int = 160, topk: int = 16,
                 batch_size: int = 16, raw: bool = False, quiet: bool = False,
                 tag: str = "data") -> list[Sample]:
    """Greedy responses (:func:`greedy_responses`) and the teacher's top-k log-probs at
    every position, cached on disk."""
    settings = {"max_new_tokens": max_new_tokens, "topk": topk, "raw": raw,
                "dtype": dtype_name(lm.dtype), "format": 1}
    path = cache_dir() / "distill" / f"{lm.model_id}-{_key(lm, texts, settings)}.pt"
    if path.is_file():
        blob = torch.load(path, weights_only=True)
        return [Sample(**s) for s in blob["samples"]]
    pairs = greedy_responses(lm, texts, max_new_tokens, batch_size, raw, quiet, tag)
    samples = []
    for prompt, response in progress(pairs, f"{tag}: teacher log-probs", quiet=quiet):
        ids = prompt + response
        _, logits = prefix_pass(lm, ids)
        lp, idx = torch.topk(torch.log_softmax(logits, -1), topk, dim=-1)
        samples.append(Sample(ids, len(prompt), idx.int().cpu(), lp.half().cpu()))
    buf = io.BytesIO()
    torch.save({"settings": settings, "samples": [dataclasses.asdict(s) for s in samples]}, buf)
    write_atomic(path, buf.getvalue())
    return samples


def group_layout(config, seq_len: int, insert_at: torch.Tensor, k: int, dtype: torch.dtype):
    """Mask(s) over [G·K, S + G·K] (see runtime.attention_masks) and positions [G·K] for
    G groups of K prompt tokens."""
    g = insert_at.numel()
    dev = insert_at.device
    rows_t = insert_at.repeat_interleave(k)  # insertion point of each row
    j = torch.arange(k, device=dev).repeat(g)  # 0-based index inside its group
    grp = torch.arange(g, device=dev).repeat_interleave(k)
    prefix_ok = torch.arange(seq_len, device=dev)[None, :] <= rows_t[:, None]
    group_ok = (grp[:, None] == grp[None, :]) & (j[None, :] <= j[:, None])
    allowed = torch.cat([prefix_ok, group_ok], dim=1)
    pos = rows_t + 1 + j
    k_pos = torch.cat([torch.arange(seq_len, device=dev), pos])
    return attention_masks(config, allowed, pos, k_pos, dtype), pos


def group_logits(lm: Loaded, kv: list[tuple[torch.Tensor, torch.Tensor]], seq_len: int,
                 insert_at: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """Logits [G, K, V] of K prompt tokens inserted after each position in `insert_at`.

    `kv` is the sequence's cached KV (no grad); `table` [K, hidden] may require grad, in
    which case only the prompt-token computations carry a graph. Logits come from the
    same model call as the runtime's (softcapping included).
    """
    k = table.shape[0]
    cache = new_cache()
    for i, (key, val) in enumerate(kv):
        cache.update(key, val, i)
    mask, pos = group_layout(lm.model.config, seq_len, insert_at, k, lm.dtype)
    embeds = table.to(lm.dtype).repeat(insert_at.numel(), 1)
    logits = model_call(lm.model, embeds, cache, pos, mask)
    return logits.view(insert_at.numel(), k, -1)


def true_ranks(logits: torch.Tensor, ids: torch.Tensor, insert_at: torch.Tensor,
               topk: int) -> torch.Tensor:
    """Rank of the true token x_{t+1+i} among prompt token i's top-k (topk = miss; -1 =
    beyond the sequence). logits [G, K, V] → ranks [G, K]."""
    g, k, _ = logits.shape
    target_pos = insert_at[:, None] + 1 + torch.arange(1, k + 1, device=logits.device)[None]
    valid = target_pos < ids.numel()
    target = ids[target_pos.clamp(max=ids.numel() - 1)]
    top = torch.topk(logits, topk, dim=-1).indices  # [G, K, topk]
    hit = top == target[..., None]
    rank = torch.where(hit.any(-1), hit.float().argmax(-1), torch.full_like(target, topk))
    return torch.where(valid, rank, torch.full_like(rank, -1))


@torch.no_grad()
def measure_ranks(lm: Loaded, samples: list[Sample], table: torch.Tensor, topk: int = 10,
                  chunk: int = 64, quiet: bool = False,
                  tag: str = "eval") -> tuple[torch.Tensor, torch.Tensor]:
    """Ranks [N, K] over every response position of every sample (teacher-forced), and
    the sample index of each row."""
    out, owner = [], []
    for n, s in enumerate(progress(samples, f"{tag}: ranks", quiet=quiet)):
        kv, _ = prefix_pass(lm, s.ids)
        ids = torch.tensor(s.ids, device=lm.device)
        points = torch.arange(s.prompt_len - 1, len(s.ids) - 2, device=lm.device)
        for c in range(0, points.numel(), chunk):
            at = points[c:c + chunk]
            r = true_ranks(group_logits(lm, kv, len(s.ids), at, table), ids, at, topk)
            out.append(r.cpu())
            owner.append(torch.full((r.shape[0],), n))
    if not out:
        return torch.zeros(0, table.shape[0], dtype=torch.long), torch.zeros(0, dtype=torch.long)
    return torch.cat(out), torch.cat(owner)


def measure_acceptance(lm: Loaded, table: torch.Tensor, texts: list[str], topk: int = 10,
                       max_new_tokens: int = 160, min_support: int = 40,
                       quiet: bool = False,
                       lookup: tuple[int, int] | None = (LOOKUP_NGRAM, LOOKUP_CHAIN),
                       cache: SuffixCache | None = None, corpus: dict | None = None) -> dict:
    """Teacher-forced acceptance over the model's own greedy continuations: the rank of
    the true token x_{t+1+i} among prompt token i's top-k at every position, and every
    estimate the acceptance file holds (:func:`acceptance.estimate`); with `lookup`,
    prompt lookup's records, and with `cache` (holding a corpus, `corpus` says which) the
    cache source's, the prompts answered in order, each answer joining the cache after
    its own positions are measured."""
    samples = load_samples(lm, texts, max_new_tokens, quiet=quiet, tag="accept data")
    ranks, owner = measure_ranks(lm, samples, table, topk, quiet=quiet, tag="accept")
    est = estimate(ranks.numpy(), topk, owner.numpy(), min_support)
    est["mean_context"] = mean_context(samples)
    est["prompts"] = len(samples)
    if lookup is not None:
        match, won = lookup_offers(samples, *lookup)
        est["lookup"] = lookup_summary(ranks.numpy(), match, won, owner.numpy(), *lookup)
        if cache is not None:
            cm, cw, agree = cache_offers(samples, cache, *lookup)
            est["cache"] = cache_summary(ranks.numpy(), cm, cw, agree, cache.settings(),
                                         **({"corpus": corpus} if corpus else {}))
    return est


def cache_offers(samples: list[Sample], cache: SuffixCache, max_ngram: int, max_tokens: int):
    """At every measured position, what the cache offers (:func:`sources.cache_along`),
    in request order: a sample sees the cache and the answers of the samples before it."""
    out: list[list[int]] = [[], [], []]
    for s in samples:
        chains: list = []
        offers_along(s.ids, s.prompt_len, max_ngram, max_tokens, chains)
        for acc, got in zip(out, cache_along(cache, s.ids, s.prompt_len, chains)):
            acc += got
        cache.add(s.ids[s.prompt_len:])
    return tuple(np.array(a, dtype=np.int64) for a in out)


def lookup_offers(samples: list[Sample], max_ngram: int, max_tokens: int):
    """At every measured position t (the prompt tokens' insertion points), what prompt
    lookup offers the step whose root is token t+1 (:func:`sources.offers_along`)."""
    match, won = [], []
    for s in samples:
        m, w = offers_along(s.ids, s.prompt_len, max_ngram, max_tokens)
        match += m
        won += w
    return np.array(match, dtype=np.int64), np.array(won, dtype=np.int64)
