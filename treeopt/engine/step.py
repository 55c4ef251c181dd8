"""One decode step on the device, for B sequences at once (B = 1 for a single decode):
standing buffers in, one small integer row per sequence out. Nothing here reads a value
back, so on CUDA the whole function is captured as one graph (:mod:`.graphs`)::

    tok    = pool[src]                  x = E[tok]   (E: the embeddings, then the prompt tokens)
    mask   = context slots < ctx_b  ++  the plan's tree block          (masks)
    logits = lm_head(decoder(x, mask, positions ctx_b + pos))         (KV written at slots C..;
                                                     the engine's kernels: :mod:`.kernels`)
    bad[v] = tok[v] ≠ argmax(logits[parent(v)])          for nodes v
    score  = depth[v] unless a node on root → v is bad;  w = argmax score        (verify)
    KV     slots C + keep[w] → ctx_b + 0..   (one gather + one scatter, all layers)  (keep)
    ctx_b += grown[w];  pool ← w, x0 = argmax(logits[w]), guesses = top-k(logits[slots[w]])
    out    = the pool's head [w, x0, guesses…]  (a view: what the host reads back)

Greedy verification is lossless: every emitted token is the base model's argmax given the
emitted prefix. With temperature > 0 a node is accepted when its probability under its
parent's distribution exceeds min(eps, alpha·exp(−entropy)) (typical acceptance, as in
Medusa/PPD; :func:`verify_typical`) and the token after the winner is sampled: faster,
not distribution-preserving, and run eagerly (its sampling draws from a generator).
"""
from __future__ import annotations

import dataclasses

import torch

from ..forward import cache_argument, logits_of, window_of
from .kernels import Kernels
from .kv import KVStore
from .plans import FIELDS, Layout


@dataclasses.dataclass
class Views:
    """The standing buffers as one (B, L) step reads them (made once per shape: slicing is
    host work too)."""

    src: torch.Tensor
    pos: torch.Tensor
    parent: torch.Tensor
    depth: torch.Tensor
    node: torch.Tensor
    grown: torch.Tensor
    allowed: torch.Tensor
    keep: torch.Tensor
    slots: torch.Tensor
    plan: torch.Tensor  # the standing plan rows [B, R(L)]
    pool: torch.Tensor
    head: torch.Tensor  # [winner, x0, guesses]: the step's result
    win: torch.Tensor
    x0: torch.Tensor
    guesses: torch.Tensor
    plan_ids: torch.Tensor
    ctx: torch.Tensor
    ctx_col: torch.Tensor
    ctx_col3: torch.Tensor
    ar_b: torch.Tensor
    ar_b_col: torch.Tensor
    ar_p: torch.Tensor  # 0 .. P−1: the slots an accepted path can fill (P ≤ L)


class Standing:
    """Buffers made once per engine: the pool, the contexts, the plan rows per input
    length, the embedding table, aranges; and the views steps read them through."""

    def __init__(self, model, layout: Layout, store: KVStore, table: torch.Tensor,
                 kernels: Kernels, max_path: int):
        self.model, self.layout, self.store, self.table = model, layout, store, table
        self.max_path = max_path  # the longest path a step can accept (root included)
        self.kernels = kernels
        rows, device = store.rows, store.kv.device
        self.pool = torch.zeros(rows, layout.size, dtype=torch.long, device=device)
        self.pool[:, layout.slot0:layout.chain0] = layout.vocab + torch.arange(
            layout.rows, device=device)
        self.ctx = torch.zeros(rows, dtype=torch.long, device=device)
        self.ar = torch.arange(store.length, device=device)
        self.plans: dict[int, torch.Tensor] = {}
        self._views: dict[tuple[int, int], Views] = {}
        self._ar_c: dict[int, torch.Tensor] = {}
        dtype = store.kv.dtype
        self.zero = torch.zeros((), dtype=dtype, device=device)
        self.neg = torch.full((), torch.finfo(dtype).min, dtype=dtype, device=device)
        config = model.config
        types = getattr(config, "layer_types", None)
        self.windows = ({t: window_of(config, t) for t in sorted(set(types))} if types
                        else {None: window_of(config, None)})
        self.body = kernels.body
        self.cache_arg = cache_argument(type(self.body))

    def views(self, B: int, L: int) -> Views:
        if (B, L) not in self._views:
            lay = self.layout
            if L not in self.plans:
                self.plans[L] = torch.zeros(self.store.rows, lay.row_size(L), dtype=torch.long,
                                            device=self.pool.device)
            plan = self.plans[L][:B]
            cut = [L] * len(FIELDS) + [L * L, L * L, L * lay.rows]
            parts = list(plan.split(cut, dim=1))
            P = min(L, self.max_path)  # keep moves P slots, not every padded one
            parts[-3:] = [parts[-3].view(B, L, L), parts[-2].view(B, L, L)[:, :, :P],
                          parts[-1].view(B, L, lay.rows)]
            pool = self.pool[:B]
            ar_b = torch.arange(B, device=self.pool.device)
            self._views[(B, L)] = Views(
                *parts, plan=plan, pool=pool, head=pool[:, :lay.slot0],
                win=pool[:, lay.win_col], x0=pool[:, lay.x0_col],
                guesses=pool[:, lay.guess0:lay.slot0], plan_ids=pool[:, lay.plan_col],
                ctx=self.ctx[:B], ctx_col=self.ctx[:B, None], ctx_col3=self.ctx[:B, None, None],
                ar_b=ar_b, ar_b_col=ar_b[:, None], ar_p=self.ar[:P])
        return self._views[(B, L)]

    def ar_c(self, C: int) -> torch.Tensor:
        if C not in self._ar_c:
            self._ar_c[C] = self.ar[:C]
        return self._ar_c[C]


# ---- the step, as named pieces --------------------------------------------------------
def inputs(st: Standing, v: Views):
    """(tokens [B, L], input embeddings [B, L, H], positions [B, L])."""
    tok = v.pool.gather(1, v.src)
    return tok, torch.nn.functional.embedding(tok, st.table), v.pos + v.ctx_col


def masks(st: Standing, v: Views, pos: torch.Tensor, C: int, allowed: torch.Tensor):
    """Additive mask(s) [B, 1, L, C + L]: row b's queries see its context slots (< ctx_b)
    and its plan's tree block (`allowed`, written at slots C..C+L−1); a sliding layer also
    hides keys q_pos − k_pos ≥ window. One mask, or a dict by layer type."""
    B, L = pos.shape
    ok = torch.cat([(st.ar_c(C) < v.ctx_col3).expand(B, L, C), allowed], 2)
    out = {}
    for kind, window in st.windows.items():
        allowed = ok
        if window is not None:
            k_pos = torch.cat([st.ar_c(C).expand(B, C), pos], 1)
            allowed = ok & ((pos[:, :, None] - k_pos[:, None, :]) < window)
        out[kind] = torch.where(allowed, st.zero, st.neg)[:, None]
    return out[None] if None in out else out


def forward(st: Standing, x: torch.Tensor, pos: torch.Tensor, mask, C: int) -> torch.Tensor:
    """The stock decoder body over the store (rows 0..B−1 write at slot C, read 0..C+L−1),
    then the LM head on every row: logits [B, L, V] (≥ float32)."""
    B, L = pos.shape
    cache = st.store.at(slice(0, B), C, C + L)
    out = st.body(inputs_embeds=x, attention_mask=mask, position_ids=pos,
                  **{st.cache_arg: cache}, use_cache=True)
    return logits_of(st.model, out.last_hidden_state, st.kernels.head)


def verify_greedy(v: Views, tok: torch.Tensor, logits: torch.Tensor, allowed: torch.Tensor):
    """(winner w [B], the argmax after w [B]): the deepest node whose path root → w all
    matches the parent's argmax (root when none)."""
    pred = logits.argmax(-1)
    bad = (tok != pred.gather(1, v.parent)) & v.node
    hit = (allowed & bad[:, None, :]).any(-1)
    w = v.depth.masked_fill(hit, 0).argmax(-1)
    return w, pred[v.ar_b, w]


def verify_typical(v: Views, tok: torch.Tensor, logits: torch.Tensor, allowed: torch.Tensor,
                   temperature: float, eps: float, alpha: float, gen):
    """Typical acceptance: p(token | parent) > min(eps, alpha·exp(−entropy(parent)));
    among accepted paths the deepest wins, ties by path probability; the token after the
    winner is sampled."""
    probs = torch.softmax(logits / temperature, -1)
    ent = -(probs * torch.log(probs + 1e-10)).sum(-1)
    thr = torch.clamp(alpha * torch.exp(-ent), max=eps)
    vocab = probs.shape[-1]
    p_tok = probs.gather(1, v.parent[..., None].expand(-1, -1, vocab)).gather(
        2, tok.clamp(max=vocab - 1)[..., None])[..., 0]
    bad = (p_tok <= thr.gather(1, v.parent)) & v.node.bool()
    allowed = allowed.to(probs.dtype) * v.node[:, None, :]  # the nodes on root → v
    hit = (allowed.bool() & bad[:, None, :]).any(-1)
    cum = torch.bmm(allowed, torch.log(p_tok + 1e-20)[..., None])[..., 0]
    score = (v.depth + 0.5 * torch.exp(cum)) * v.node * ~hit
    w = score.argmax(-1)
    last = torch.multinomial(probs[v.ar_b, w], 1, generator=gen)[:, 0]
    return w, last


def keep(st: Standing, v: Views, w: torch.Tensor, C: int) -> None:
    """The accepted path's KV (slots C + keep[w]) to each row's context, all layers in one
    gather and one scatter of the P slots a path can fill (not all L padded ones);
    contexts advance by the path's length."""
    path = v.keep[v.ar_b, w]
    kv = st.store.kv
    kv[:, :, v.ar_b_col, :, v.ctx_col + v.ar_p] = kv[:, :, v.ar_b_col, :, path + C]
    v.ctx.add_(v.grown[v.ar_b, w])


def next_guesses(st: Standing, v: Views, logits: torch.Tensor, w: torch.Tensor):
    """Top-k of the winner's prompt-slot rows: the next step's guesses [B, rows, width]."""
    rows = logits[v.ar_b_col, v.slots[v.ar_b, w]]
    return rows.topk(st.layout.width, dim=-1).indices


def step(st: Standing, B: int, L: int, C: int, sample=None) -> torch.Tensor:
    """One step of rows 0..B−1 with plans of input length L over context bucket C:
    returns the pool's head [B, 2 + rows·width] = (winner, the token after it, the next
    guesses), the pool and contexts left ready for the next step. `sample` =
    (temperature, eps, alpha, generator) verifies typically instead of greedily."""
    v = st.views(B, L)
    tok, x, pos = inputs(st, v)
    allowed = v.allowed.bool()
    logits = forward(st, x, pos, masks(st, v, pos, C, allowed), C)
    w, last = verify_greedy(v, tok, logits, allowed) if sample is None else \
        verify_typical(v, tok, logits, allowed, *sample)
    keep(st, v, w, C)
    v.guesses.copy_(next_guesses(st, v, logits, w).flatten(1))
    v.x0.copy_(last)
    v.win.copy_(w)
    return v.head
