"""Batched PPD decoding: B prompts of different lengths at once, on a stock model.

One KV cache of shape [B, heads, T, dim] holds every live sequence; sequence b owns the
slots 0..ctx_b − 1 (slot j holds position j) and everything after them is padding that
its masks hide (a *ragged* cache). One batched step (gpt-fast's decode_one_token, per
sequence)::

    plan_b   = sequence b's tree for its state (+ its lookup and cache chains) (plan)
    inputs   = every plan's embeddings, right-padded to L = max_b L_b        (batch_inputs)
    mask     = [B, 1, L, T + L]: b's rows see its ctx_b cached slots and its own
               tree block; padding rows see only themselves           (batch_inputs)
    logits   = LM head on the real rows only                          (forward)
    w_b      = deepest accepted node of b (greedy, as unbatched)      (verify)
    KV       = b's accepted path moved to slots ctx_b.. , cache cut to max ctx (keep_ragged)

A finished sequence (EOS, max_new_tokens, context) leaves the batch: its cache rows are
dropped, so it stops costing compute. Which tree the step uses depends on how many
sequences are live: the schedule maps a batch size to a tree (or None: plain decoding,
one input token per sequence) — the search's per-batch table (:mod:`treeopt.search`).
Greedy only: each sequence's output is the base model's greedy output for its prompt.
"""
from __future__ import annotations

import dataclasses
import time

import torch

from .device import sync
from .errors import BadInput
from .models import Loaded
from .prompt_tokens import PromptTokens
from .runtime import RECORD_TOPK, Decoder, Result, accept, attention_masks, logits_of, \
    model_call, new_cache, next_guesses, record_step, step_inputs, verified_row, verify_greedy
from .sources import Proposals, SuffixCache
from .tree import StateBuffers, Tree, build_buffers, size_for


@dataclasses.dataclass
class Seq:
    """One sequence of the batch: where it stands and what it has emitted."""

    index: int  # position in the caller's prompt list
    ids: list[int]
    limit: int
    ctx: int = 0  # valid cache slots (= its context length)
    x0: int = 0  # the token the next step starts from (already emitted)
    guesses: torch.Tensor | None = None  # [m, width] top-k guesses of the last step
    prop: Proposals | None = None  # its chain sources (lookup, the shared cache)
    result: Result | None = None


@dataclasses.dataclass
class BatchResult:
    """One batched decode: per-sequence results (in prompt order) and the batch's decode
    steps (prefill excluded): live sequences, padded input length, seconds and tokens
    emitted over all sequences, per step."""

    results: list[Result]
    seconds: float
    prefill_seconds: float = 0.0
    live: list[int] = dataclasses.field(default_factory=list)
    lengths: list[int] = dataclasses.field(default_factory=list)
    step_seconds: list[float] = dataclasses.field(default_factory=list)
    step_tokens: list[int] = dataclasses.field(default_factory=list)
    contexts: list[int] = dataclasses.field(default_factory=list)  # cache slots read
    forward_seconds: list[float] = dataclasses.field(default_factory=list)  # when timed

    @property
    def new_tokens(self) -> int:
        return sum(r.new_tokens for r in self.results)

    @property
    def tokens_per_second(self) -> float:
        return self.new_tokens / self.seconds if self.seconds > 0 else 0.0

    @property
    def tokens_per_step(self) -> float:
        """Mean tokens per sequence per forward it took part in."""
        return self.new_tokens / max(1, sum(r.steps for r in self.results))


def schedule_of(tree: Tree | None) -> dict[int, Tree | None]:
    """The tree's per-batch table (batch size → tree, None = plain), or the one tree for
    every batch size."""
    if tree is None:
        return {1: None}
    return dict(tree.by_batch) if tree.by_batch else {1: tree}


class BatchDecoder:
    """A loaded model with a schedule: batch size → tree or None (plain decoding)."""

    def __init__(self, loaded: Loaded, prompt_tokens: PromptTokens | None,
                 schedule: dict[int, Tree | None], cache: SuffixCache | None = None):
        if not schedule or any(not isinstance(b, int) or b < 1 for b in schedule):
            raise BadInput("batch schedule: needs batch sizes ≥ 1")
        self.lm, self.model = loaded, loaded.model
        self.device, self.dtype = loaded.device, loaded.dtype
        self.cache_source = cache  # shared by every sequence; finished outputs join it
        self.schedule = {b: Decoder(loaded, prompt_tokens if t else None, t, cache)
                         for b, t in sorted(schedule.items())}
        trees = [d.tree for d in self.schedule.values() if d.tree is not None]
        vocab = self.model.get_output_embeddings().weight.shape[0]
        self.width = max([t.rank_width for t in trees] + [min(RECORD_TOPK, vocab)])
        self.lookup = next((t.lookup for t in trees if t.lookup is not None), None)
        for d in self.schedule.values():
            if d.tree is not None:  # state 0: the root and its prompt slots only
                d.buffers.setdefault(0, build_buffers((), d.tree.root_prompt_tokens, 0,
                                                      d.tree.rank_width, self.device))
        self.plain = build_buffers((), 0, 0, 1, self.device)
        self.steps_run = 0  # batched steps so far: ids the records group by
        self.learn = True
        self.embed = self.model.get_input_embeddings()

    def pick(self, live: int) -> Decoder:
        """The configuration for `live` sequences (:func:`treeopt.tree.size_for`)."""
        return self.schedule[size_for(self.schedule, live)]

    # ---- one step, as named pieces ----------------------------------------------------
    def plan(self, dec: Decoder, s: Seq) -> tuple[StateBuffers, torch.Tensor, torch.Tensor]:
        """(buffers, tokens [1 + N], embeddings [L]) of sequence s's step under `dec`'s tree:
        the largest state of that tree its guess rows cover (a tree switched in as the
        batch shrank may want more rows than the last tree gave). What the step is offered
        goes into the sequence's Result (`offers`)."""
        x0 = torch.tensor(s.x0, device=self.device)
        offers = s.prop.offers() if s.prop is not None else None
        if self.cache_source is not None:
            s.result.cache_offers.append(offers[1])
        if dec.tree is None:
            s.result.offers.append((len(s.result.output_ids), 0, None))
            tok = x0.view(1)
            return self.plain, tok, self.embed(tok)
        rows = 0 if s.guesses is None else s.guesses.shape[0]
        m = max(b for b in dec.buffers if b <= rows)
        s.result.offers.append((len(s.result.output_ids), m, s.guesses))
        guesses = (s.guesses[:m, :dec.tree.rank_width] if m else
                   torch.empty(0, dec.tree.rank_width, dtype=torch.long, device=self.device))
        buf, pool, src = dec.step_plan(m, guesses.contiguous(), offers)
        tok, embeds = step_inputs(dec.embed, dec.table, x0, pool, src, buf)
        return buf, tok, embeds

    def batch_inputs(self, seqs: list[Seq], bufs: list[StateBuffers],
                     embeds: list[torch.Tensor], cached: int):
        """Padded embeddings [B, L], positions [B, L] and the 4-D mask(s) of one step over
        a ragged cache of `cached` slots."""
        B, L = len(seqs), max(b.length for b in bufs)
        x = embeds[0].new_zeros(B, L, embeds[0].shape[-1])
        pos = torch.zeros(B, L, dtype=torch.long, device=self.device)
        allowed = torch.zeros(B, L, cached + L, dtype=torch.bool, device=self.device)
        pad = torch.eye(L, dtype=torch.bool, device=self.device)
        for i, (s, buf, e) in enumerate(zip(seqs, bufs, embeds)):
            n = buf.length
            x[i, :n] = e
            pos[i, :n] = s.ctx + buf.positions
            pos[i, n:] = s.ctx
            allowed[i, :n, :s.ctx] = True
            allowed[i, :n, cached:cached + n] = buf.allowed
            allowed[i, n:, cached + n:] = pad[n:, n:]
        k_pos = torch.cat([torch.arange(cached, device=self.device).expand(B, cached), pos], 1)
        return x, pos, attention_masks(self.model.config, allowed, pos, k_pos, self.dtype)

    def forward(self, x, pos, mask, cache, lengths: list[int]) -> list[torch.Tensor]:
        """One batched forward; logits of each sequence's real rows (one LM-head call)."""
        h = model_call(self.model, x, cache, pos, mask, head=False)
        rows = torch.cat([h[i, :n] for i, n in enumerate(lengths)])
        return list(logits_of(self.model, rows).split(lengths))

    def commit(self, cache, seqs: list[Seq], paths: list[list[int]], cached: int) -> None:
        """Ragged KV keep: sequence b's accepted path (step slots `paths[b]`) moves to
        slots ctx_b.. ; the cache is cut to the longest sequence."""
        b_idx, src, dst = [], [], []
        for i, (s, path) in enumerate(zip(seqs, paths)):
            for j, p in enumerate(path):
                if cached + p != s.ctx + j:
                    b_idx.append(i)
                    src.append(cached + p)
                    dst.append(s.ctx + j)
        new_len = max(s.ctx + len(p) for s, p in zip(seqs, paths))
        idx = [torch.tensor(v, dtype=torch.long, device=self.device) for v in (b_idx, src, dst)]
        for layer in cache.layers:
            for name in ("keys", "values"):
                t = getattr(layer, name)
                if b_idx:
                    t[idx[0], :, idx[2]] = t[idx[0], :, idx[1]]
                setattr(layer, name, t[:, :, :new_len])

    @staticmethod
    def drop(cache, keep: list[int], new_len: int) -> None:
        """Keep only the cache rows of the sequences still live (finished ones leave)."""
        idx = torch.tensor(keep, dtype=torch.long, device=cache.layers[0].keys.device)
        for layer in cache.layers:
            layer.keys = layer.keys.index_select(0, idx)[:, :, :new_len]
            layer.values = layer.values.index_select(0, idx)[:, :, :new_len]

    # ---- prefill and the loop ---------------------------------------------------------
    def prefill(self, seqs: list[Seq], dec: Decoder):
        """Right-padded causal forward over every prompt (+ the root's prompt tokens of
        `dec`'s tree); sets each sequence's first token and guesses; returns the cache."""
        r = dec.tree.root_prompt_tokens if dec.tree is not None else 0
        embeds = []
        for s in seqs:
            e = self.embed(torch.tensor(s.ids, device=self.device))
            embeds.append(torch.cat([e, dec.table[:r]]) if r else e)
        lengths = [len(e) for e in embeds]
        bufs = [_causal(n, self.device) for n in lengths]
        for s in seqs:
            s.ctx = 0
        cache = new_cache()
        x, pos, mask = self.batch_inputs(seqs, bufs, embeds, 0)
        h = model_call(self.model, x, cache, pos, mask, head=False)
        rows = torch.cat([h[i, len(s.ids) - 1:len(s.ids) + r] for i, s in enumerate(seqs)])
        logits = logits_of(self.model, rows).view(len(seqs), 1 + r, -1)
        first = logits[:, 0].argmax(-1).tolist()
        guesses = torch.topk(logits[:, 1:], self.width, dim=-1).indices if r else None
        for i, s in enumerate(seqs):
            s.ctx, s.x0 = len(s.ids), first[i]
            s.guesses = guesses[i] if r else None
        self.drop(cache, list(range(len(seqs))), max(s.ctx for s in seqs))
        return cache

    def _emit(self, dec: Decoder, s: Seq, new: list[int]) -> bool:
        added, done = dec._emit(s.result.output_ids, new, s.limit, None)
        if s.prop is not None:
            s.prop.extend(added)
        return done

    def admit(self, live: list[Seq], cache, joiners: list[Seq], out: BatchResult,
              t_start: float):
        """Prefill `joiners` (with the tree for the batch they make with `live`), emit
        their first tokens and append their cache rows; returns (live, cache)."""
        dec = self.pick(len(live) + len(joiners))
        fresh = self.prefill(joiners, dec)
        kept = []
        for s in joiners:
            s.result = Result([], 1, 0.0, time.perf_counter() - t_start)
            if self.lookup is not None or self.cache_source is not None:
                lk = self.lookup
                s.prop = Proposals(s.ids, (lk.max_ngram, lk.max_tokens) if lk else None,
                                   self.cache_source)
            if self._emit(dec, s, [s.x0]):
                self._finish(s, out, dec, t_start, None)
            else:
                kept.append(s)
        fresh = self._keep_live(fresh, joiners, kept)
        if not live:
            return kept, fresh
        if kept:
            _append_rows(cache, fresh)
        return live + kept, cache

    def step(self, live: list[Seq], cache, out: BatchResult, t_start: float,
             timed: bool = False):
        """One batched step of every live sequence (plan, forward, verify, keep KV); the
        finished ones leave. Returns (live, cache). `timed` also records the forward's
        time (one more device sync)."""
        t0 = time.perf_counter()
        dec = self.pick(len(live))
        plans = [self.plan(dec, s) for s in live]
        self.steps_run += 1  # the step's batch size and id beside each offer (records)
        for s in live:
            s.result.offers[-1] += (len(live), self.steps_run)
        fits = [s.ctx + p[0].length <= self.lm.max_context for s, p in zip(live, plans)]
        if not all(fits):  # out of context: those stop, the rest go on
            for s, ok in zip(live, fits):
                if not ok:
                    self._finish(s, out, dec, t_start, "context")
            return self._leave(cache, live, fits)
        cached = cache.layers[0].keys.shape[2]
        bufs = [p[0] for p in plans]
        x, pos, mask = self.batch_inputs(live, bufs, [p[2] for p in plans], cached)
        t_fwd = time.perf_counter()
        logits = self.forward(x, pos, mask, cache, [b.length for b in bufs])
        if timed:
            sync(self.device)
            out.forward_seconds.append(time.perf_counter() - t_fwd)
        verified = []
        for (buf, tok, _), lg in zip(plans, logits):
            score, pred = verify_greedy(lg[: buf.n_nodes + 1], tok, buf)
            verified.append(verified_row(score, tok, pred))
        rows = torch.cat(verified).tolist()  # one sync
        paths, still, emitted, off = [], [], 0, 0
        for s, (buf, _, _), lg in zip(live, plans, logits):
            w, path, new = accept(rows[off:off + 2 * buf.n_nodes + 3], buf)
            off += 2 * buf.n_nodes + 3
            paths.append(path)
            s.guesses = next_guesses(lg, buf, w, self.width)
            s.x0 = new[-1]
            r = s.result
            had = len(r.output_ids)
            done = self._emit(dec, s, new)
            record_step(r, len(r.output_ids) - had, buf.length)
            emitted += r.accepted[-1]
            still.append(not done)
            if done:
                self._finish(s, out, dec, t_start, None)
        self.commit(cache, live, paths, cached)
        for s, path in zip(live, paths):
            s.ctx += len(path)
        out.live.append(len(live))
        out.lengths.append(x.shape[1])
        out.contexts.append(cached)
        out.step_tokens.append(emitted)
        live, cache = self._leave(cache, live, still)
        out.step_seconds.append(time.perf_counter() - t0)
        return live, cache

    @torch.inference_mode()
    def generate(self, prompts: list[list[int]], max_new_tokens: int | list[int] = 128,
                 max_batch: int | None = None, timed: bool = False,
                 learn: bool = True) -> BatchResult:
        """Greedy-decode every prompt; each result equals the unbatched greedy output.
        With `max_batch`, at most that many decode at once and a waiting prompt joins as
        soon as one finishes (continuous batching); else all start together. `learn`: a
        finished output joins the cache source (the next requests may draw on it)."""
        self.learn = learn
        if not prompts:
            raise BadInput("no prompts to decode")
        limits = max_new_tokens if isinstance(max_new_tokens, list) else \
            [max_new_tokens] * len(prompts)
        if len(limits) != len(prompts):
            raise BadInput("max_new_tokens: one per prompt")
        if max_batch is not None and max_batch < 1:
            raise BadInput(f"max_batch must be ≥ 1, got {max_batch}")
        for ids, lim in zip(prompts, limits):
            self.pick(1).check_prompt(ids, lim)
        sync(self.device)
        t_start = time.perf_counter()
        queue = [Seq(i, list(ids), lim) for i, (ids, lim) in enumerate(zip(prompts, limits))]
        out = BatchResult([None] * len(queue), 0.0)  # type: ignore[list-item]
        cap = max_batch or len(queue)
        live: list[Seq] = []
        cache = None
        while live or queue:
            if queue and len(live) < cap:
                t0 = time.perf_counter()
                room = cap - len(live)
                live, cache = self.admit(live, cache, queue[:room], out, t_start)
                queue = queue[room:]
                out.prefill_seconds += time.perf_counter() - t0
            else:
                live, cache = self.step(live, cache, out, t_start, timed)
        sync(self.device)
        out.seconds = time.perf_counter() - t_start
        return out

    def _leave(self, cache, live: list[Seq], stay: list[bool]):
        """(live, cache) without the sequences that do not stay."""
        kept = [s for s, ok in zip(live, stay) if ok]
        return kept, self._keep_live(cache, live, kept)

    def _keep_live(self, cache, before: list[Seq], live: list[Seq]):
        if len(live) == len(before):
            return cache
        if not live:
            return new_cache()
        pos = {id(s): i for i, s in enumerate(before)}
        self.drop(cache, [pos[id(s)] for s in live], max(s.ctx for s in live))
        return cache

    def _finish(self, s: Seq, out: BatchResult, dec: Decoder, t_start: float,
                why: str | None) -> None:
        """A sequence is done: its result is final, its output joins the cache."""
        out.results[s.index] = dec._finish(s.result, t_start, why)
        if self.cache_source is not None and self.learn:
            self.cache_source.add(s.result.output_ids)


def _append_rows(cache, more) -> None:
    """Append `more`'s sequences to `cache` (batch rows), padding the shorter one's slots."""
    for la, lb in zip(cache.layers, more.layers):
        for name in ("keys", "values"):
            x, y = getattr(la, name), getattr(lb, name)
            T = max(x.shape[2], y.shape[2])
            x = torch.nn.functional.pad(x, (0, 0, 0, T - x.shape[2]))
            y = torch.nn.functional.pad(y, (0, 0, 0, T - y.shape[2]))
            setattr(la, name, torch.cat([x, y]))


def _causal(n: int, device) -> StateBuffers:
    """A causal block of n inputs at positions 0..n−1 (the prefill's shape)."""
    return _Causal(n, torch.ones(n, n, dtype=torch.bool, device=device).tril(),
                   torch.arange(n, device=device))


@dataclasses.dataclass
class _Causal:
    length: int
    allowed: torch.Tensor
    positions: torch.Tensor


@torch.inference_mode()
def hf_generate_batch(dec: Decoder, prompts: list[list[int]], max_new_tokens: int
                      ) -> BatchResult:
    """HF `generate(do_sample=False)` on the batch, left-padded (the peer baseline)."""
    eos, pad = dec.eos_and_pad()
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], device=dec.device)
    att = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts],
                       device=dec.device)
    sync(dec.device)
    t0 = time.perf_counter()
    seq = dec.model.generate(input_ids=ids, attention_mask=att, max_new_tokens=max_new_tokens,
                             do_sample=False, eos_token_id=eos, pad_token_id=pad,
                             temperature=None, top_p=None, top_k=None)
    sync(dec.device)
    seconds = time.perf_counter() - t0
    results = []
    for row in seq[:, width:].tolist():
        cut = next((i + 1 for i, t in enumerate(row) if t in dec.eos), len(row))
        results.append(Result(row[:cut], cut, seconds, 0.0))
    return BatchResult(results, seconds)
