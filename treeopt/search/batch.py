"""Trees per batch size: in a batch the step costs t(B, L_max), so under a cap every
state's tree may as well fill it; the best cap per B (or plain decoding) from the
profile's batch points."""
from __future__ import annotations

import dataclasses

import numpy as np

from ..latency import Latency
from ..tree import Lookup, Tree
from .exact import LatencyFn, optimise
from .hybrid import Replay, Source, _tau, hybrid

HYBRID_CAPS = [*range(2, 33), 40, 48, 64]  # caps the hybrid per-batch frontier replays


# input-length caps the per-batch search tries (dense where trees are small)
BATCH_CAPS = [*range(2, 33), *range(36, 65, 4), *range(72, 129, 8), 160, 192, 256, 320, 384,
              512]


def flat_step(L) -> np.ndarray:
    """A step time of 1 at every input length: a batch pays its cap whatever it holds."""
    return np.ones(np.shape(np.atleast_1d(L)))


def frontier(acc: np.ndarray, k: int, caps: list[int], path_prob: dict | None = None
             ) -> dict[int, tuple[float, Tree | None]]:
    """Most tokens/step with every state's input ≤ F, for each cap F (F = 1: no tree).

    In a batch the step costs t(B, L_max): the longest input sets it, and the shorter ones
    are padded anyway — so under a cap F every state's tree may as well fill F, and the
    best policy maximises tokens/step alone: :func:`optimise` with a flat step time."""
    out: dict[int, tuple[float, Tree | None]] = {1: (1.0, None)}
    for cap in caps:
        if cap >= 2:
            sol = optimise(acc, flat_step, k, max_input=cap, path_prob=path_prob)
            out[cap] = (sol.tokens_per_step, sol.tree)
    return out


def fill_policy(tree: Tree, max_tokens: int, max_ngram: int, cap: int) -> dict:
    """The lookup policy that fills every state's input up to `cap` with a chain of
    prompt-lookup nodes carrying no prompt tokens (in a batch the padding up to the
    longest input is paid anyway, so these candidates are free)."""
    return {(m, n): (c, 0, 1) for m in [0, *tree.states] for n in range(1, max_ngram + 1)
            if (c := min(max_tokens, cap - tree.input_length(m))) > 0}


def hybrid_frontier(front: dict[int, tuple[float, Tree | None]], rec: dict, caps: list[int]
                    ) -> dict[int, tuple[float, Tree]]:
    """Most replayed tokens/step with every step's input ≤ F, for each cap F: the PPD
    frontier tree of some cap F' ≤ F whose lookup chains fill each state up to F
    (:func:`fill_policy`), replayed over the acceptance file's measured positions."""
    replays = {f: (Replay.build(t, rec), _tau(t, rec, flat_step, max(caps)))
               for f, (_, t) in front.items() if t is not None and f <= max(caps)}
    out, memo = {}, {}
    for cap in caps:
        best = None
        for f, (rp, tau) in replays.items():
            if f <= cap:
                policy = fill_policy(rp.tree, rec["max_tokens"], rec["max_ngram"], cap)
                key = (f, tuple(sorted(policy.items())))  # chains stop growing at C
                if key not in memo:
                    memo[key] = rp.run(policy, tau)
                tok, _, steps = memo[key]
                if steps and (best is None or tok / steps > best[0]):
                    best = (tok / steps, rp.tree, policy)
        if best is not None:
            E, tree, policy = best
            out[cap] = (E, dataclasses.replace(tree, lookup=Lookup(
                rec["max_ngram"], rec["max_tokens"], policy), meta={}))
    return out


def best_cap(front: dict[int, tuple[float, Tree | None]], latency: LatencyFn
             ) -> tuple[float, float, Tree | None, int]:
    """(tokens/step, step seconds, tree or None, cap F) maximising E(F) / t(F) over a
    :func:`frontier` (F = 1, plain decoding, wins ties)."""
    caps = sorted(front)
    ts = np.asarray(latency(np.array(caps)), dtype=float)
    i = max(range(len(caps)), key=lambda j: (front[caps[j]][0] / ts[j], -caps[j]))
    return front[caps[i]][0], float(ts[i]), front[caps[i]][1], caps[i]


# at B > 1 a tree must predict this much more throughput than plain batched decoding to
# be chosen: the margin absorbs the latency model's error where the two are close
BATCH_MIN_GAIN = 0.05


def batch_context(context: int, batch: int) -> int:
    """The context a batched step's attention reads: a ragged cache is as long as its
    longest sequence. With the B contexts spread evenly up to twice their mean C, the
    longest is expected at 2·C·B / (B + 1) (C itself at B = 1)."""
    return round(2 * context * batch / (batch + 1))


def _with_cache(tree: Tree, rec: dict, E: float, cap: int) -> tuple[float, Tree]:
    """A batch size's tree with the cache's chains within its cap (the padding up to it is
    paid anyway: tokens per step alone count), its lookup policy held: (tokens/step, tree)."""
    look = tree.lookup.policy if tree.lookup else {}
    h = hybrid(tree, rec, flat_step, cap, source=Source(1, look))
    gain = h["hybrid"]["tokens_per_step"] / max(h["ppd_only"]["tokens_per_step"], 1e-9)
    if not h["policy"] or gain <= 1:
        return E, tree
    return E * gain, dataclasses.replace(tree, cache=Lookup(
        rec["cache_max_ngram"], rec["cache_max_tokens"], h["policy"]))


def per_batch(found: dict, profile: dict, batch_sizes: list[int], max_input: int,
              single: dict | None = None, rec: dict | None = None,
              sources: tuple = ("ppd", "lookup")) -> tuple[dict[int, Tree | None], list[dict]]:
    """For each batch size B the configuration with the most throughput (tokens/s over all
    sequences): B·E(F) / t(B, F, C) over the caps F of :func:`frontier` — and, with
    lookup records `rec`, of :func:`hybrid_frontier`, whose winner's policy is then
    refined by :func:`hybrid` under the cap, and with "cache" in `sources` the chosen
    tree's cache chains climbed under the same cap — or plain decoding B / t(B, 1, C) where no
    tree beats it by BATCH_MIN_GAIN; C is :func:`batch_context`. B = 1 keeps the searched
    tree (`single`: its predicted tokens_per_step and step_seconds, e.g. the hybrid
    replay), whose states need not pad. Returns {B: tree or None} and one row per B."""
    context, k = found["meta"]["context"], found["meta"]["config"]["k"]
    sol = found["solution"]
    single = single or {"tokens_per_step": sol.tokens_per_step,
                        "step_seconds": sol.step_seconds}
    front = frontier(found["acc"], k, [c for c in BATCH_CAPS if c <= max_input],
                     found["path_prob"]) if any(b > 1 for b in batch_sizes) else {}
    hyb = hybrid_frontier(front, rec, [c for c in HYBRID_CAPS if c <= max_input]) \
        if rec is not None and "lookup" in sources and front else {}
    table, rows = {}, []
    for b in batch_sizes:
        lat, ctx = Latency(profile, batch=b), batch_context(context, b)
        t_plain = float(lat([1], ctx)[0])
        if b == 1:
            E, t = single["tokens_per_step"], single["step_seconds"]
            tree = dataclasses.replace(sol.tree, by_batch={}, meta={})
            L = sol.tree.max_input_length
            if E / t <= 1.0 / t_plain:
                E, t, tree, L = 1.0, t_plain, None, 1
        else:
            E, t, tree, L = best_cap(front, lambda x: lat(x, ctx))
            if hyb:
                Eh, th, th_tree, Lh = best_cap({1: (1.0, None), **hyb}, lambda x: lat(x, ctx))
                if th_tree is not None and Eh / th > E / t:
                    h = hybrid(dataclasses.replace(th_tree, lookup=None), rec, flat_step, Lh)
                    if h["policy"] and h["hybrid"]["tokens_per_step"] > Eh:
                        Eh = h["hybrid"]["tokens_per_step"]
                        th_tree = dataclasses.replace(th_tree, lookup=Lookup(
                            rec["max_ngram"], rec["max_tokens"], h["policy"]))
                    E, t, tree, L = Eh, th, th_tree, Lh
            if tree is not None and rec is not None and "cache" in sources:
                E, tree = _with_cache(tree, rec, E, L)
            if E * t_plain / t < 1 + BATCH_MIN_GAIN:
                E, t, tree, L = 1.0, t_plain, None, 1
        table[b] = tree
        rows.append({"batch": b, "plain": tree is None, "input_length": int(L), "context": ctx,
                     "tokens_per_step": round(E, 6), "step_seconds": round(t, 8),
                     "tokens_per_second": round(b * E / t, 6),
                     "plain_tokens_per_second": round(b / t_plain, 6),
                     "speedup_vs_plain": round(E * t_plain / t, 6)})
    return table, rows
