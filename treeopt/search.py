"""The hardware-aware tree optimizer: the dynamic tree with the most tokens per second.

Model (DESIGN.md). State m = number of guess rows available (1..K). The policy picks, per
state, a prefix-closed node set T_m (depth ≤ m) and a prompt-token count n(v) ∈ 1..K for
every node; the root carries r prompt tokens in every state. With P(v) the probability
that node v is accepted and s(v) = P(v) − Σ_children P(c) its stop probability:

    E_m     = 1 + Σ_{v∈T_m} P(v)                        expected new tokens of one step
    p_m(j)  = Σ_{w: n(w)=j} s(w)   (root: s = 1 − Σ_{depth 1} P, n = r)
    L_m     = 1 + |T_m| + r + Σ n(v),   τ_m = t(L_m)    step time from the profile
    tokens/s = Σ π_m E_m / Σ π_m τ_m                   (π stationary for p)

This is an average-reward semi-Markov decision process; :func:`optimise` solves it by
policy iteration. Evaluation: solve h_m = E_m − ρ τ_m + Σ_j p_m(j) h_j with h_K = 0 for the
gain ρ (tokens/s) and relative values h. Improvement: per state maximise

    Q_m(T, n) = 1 + h(r) + Σ_{v∈T} P(v)·(1 + h(n(v)) − h(n(parent(v)))) − ρ·t(L)

(the telescoped form of E + Σ_j p(j) h_j, with n(parent) = r at depth 1). For a fixed
budget b = Σ_v (1 + n(v)) the sum is maximised *exactly* by a tree-knapsack dynamic
programme (:func:`budget_dp`): for node v, H_v[b] = max_n P(v)(1+h(n)) + A_{v,n}[b−1−n],
where A_{v,n} is the max-plus convolution over v's children c of max(exclude, H_c −
P(c)·h(n)). One DP gives the best tree for every budget, so the improvement step is
exact over all prefix-closed trees within the candidate universe (the top paths by P,
best-first, at least twice as many as any admissible tree can hold), and policy
iteration ends at an optimal policy of that finite SMDP.
"""
from __future__ import annotations

import dataclasses
import heapq
import itertools
import logging
import math
import re
import time
from typing import Callable

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from .acceptance import search_inputs
from .artefact import mask_secrets
from .errors import BadInput, deferred_signals
from .export import ENGINE_TOPK, constraints, to_medusa, to_ppd
from .latency import Latency
from .models import cache_dir
from .tree import Lookup, Node, Tree, input_length

NEG = -np.inf
LatencyFn = Callable[[np.ndarray], np.ndarray]


# ---- probabilities -----------------------------------------------------------------
@dataclasses.dataclass
class Universe:
    """Candidate nodes of one depth bound, best-first (parents precede children)."""

    paths: list[tuple[int, ...]]
    prob: np.ndarray
    parent: np.ndarray  # index into paths, -1 for depth 1
    children: list[list[int]]

    def prefix(self, n: int) -> "Universe":
        """The best `n` candidates: still prefix-closed, since parents come first."""
        if n >= len(self.paths):
            return self
        return Universe(self.paths[:n], self.prob[:n], self.parent[:n],
                        [[c for c in ch if c < n] for ch in self.children[:n]])


def path_probability(acc: np.ndarray, path: tuple[int, ...], parent_p: float,
                     path_prob: dict | None = None) -> float:
    """P(path) from its parent's: the product model, or a measured probability where
    given, never above the parent's."""
    p = parent_p * acc[len(path) - 1, path[-1]]
    if path_prob and path in path_prob:
        p = path_prob[path]
    return min(p, parent_p)


def universe(acc: np.ndarray, depth: int, max_nodes: int,
             path_prob: dict[tuple[int, ...], float] | None = None,
             width_cap: int | None = None) -> Universe:
    """Top `max_nodes` paths by P (product model, or measured conditional path
    probabilities where given), depth ≤ `depth`, NaN ranks excluded."""
    acc = np.asarray(acc, dtype=float)
    ranks = [[r for r in range(acc.shape[1]) if not math.isnan(acc[d, r]) and acc[d, r] > 0
              and (width_cap is None or r < width_cap)] for d in range(acc.shape[0])]

    def prob(path, parent_p):
        return path_probability(acc, path, parent_p, path_prob)

    heap = [(-prob((r,), 1.0), 1, (r,)) for r in ranks[0]] if depth >= 1 else []
    heapq.heapify(heap)
    paths, probs, index = [], [], {}
    while heap and len(paths) < max_nodes:
        negp, d, path = heapq.heappop(heap)
        index[path] = len(paths)
        paths.append(path)
        probs.append(-negp)
        if d < depth:
            for r in ranks[d]:
                child = path + (r,)
                heapq.heappush(heap, (-prob(child, -negp), d + 1, child))
    parent = np.array([index.get(p[:-1], -1) for p in paths], dtype=int)
    children: list[list[int]] = [[] for _ in paths]
    for i, p in enumerate(parent):
        if p >= 0:
            children[p].append(i)
    return Universe(paths, np.array(probs), parent, children)


# ---- the exact budgeted DP -----------------------------------------------------------
def maxplus(a: np.ndarray, b: np.ndarray, limit: int) -> tuple[np.ndarray, np.ndarray]:
    """Row-wise max-plus convolution: out[i, k] = max_j a[i, k−j] + b[i, j] (k < limit),
    and the maximising j. `a` and `b` are 2-D with the same number of rows; one 3-D
    window over a padded `a` does every shift at once."""
    la, lb = a.shape[1], b.shape[1]
    n = min(la + lb - 1, limit)
    pad = np.full((a.shape[0], lb - 1), NEG)
    win = sliding_window_view(np.concatenate([pad, a, pad], 1), lb, axis=1)[:, :n]
    s = win + b[:, None, ::-1]
    i = s.argmax(2)
    return np.take_along_axis(s, i[..., None], 2)[..., 0], lb - 1 - i


def _trim(x: np.ndarray) -> np.ndarray:
    fin = np.nonzero(np.isfinite(x))[0]
    return x[: fin[-1] + 1] if fin.size else x[:1]


@dataclasses.dataclass
class DPResult:
    """Best value G_r[b] for every root count r and budget b, with the means to rebuild
    the tree that attains it."""

    uni: Universe
    G: dict[int, np.ndarray]
    _root: dict  # r -> [(child, arg row)]
    _node: list  # v -> [(child, arg [k, budget])], row n−1 for n prompt tokens at v
    _hn: list

    def tree(self, r: int, b: int) -> list[Node]:
        out: list[Node] = []
        self._unfold(self._root[r], b, out)
        return out

    def _unfold(self, merges, budget, out):
        for child, arg in reversed(merges):
            j = int(arg[budget]) if budget < len(arg) else 0
            if j > 0:
                n = int(self._hn[child][j])
                out.append(Node(self.uni.paths[child], n))
                self._unfold([(c, a[n - 1]) for c, a in self._node[child]], j - 1 - n, out)
            budget -= j


def _merge_children(children, H, prob, hrows: np.ndarray, limit: int):
    """A[i] = max-plus over children c of max(exclude, H_c − P(c)·hrows[i]), one row per
    parent prompt-token count; returns A and the per-child argmax rows."""
    acc = np.zeros((len(hrows), 1))
    merges = []
    for c in children:
        hc = H[c]
        if len(hc) <= 1:  # the child fits in no budget ≤ limit
            continue
        opt = np.empty((len(hrows), len(hc)))
        opt[:, 0] = 0.0
        opt[:, 1:] = hc[1:] - prob[c] * hrows[:, None]
        acc, arg = maxplus(acc, opt, limit)
        merges.append((c, arg))
    return acc, merges


def budget_dp(uni: Universe, h: np.ndarray, k: int, budget: int,
              roots: list[int]) -> DPResult:
    """Exact best Σ P(v)(1 + h(n_v) − h(n_parent)) for every budget ≤ `budget`.

    `h` is indexed 1..k (h[0] unused). The k choices of n(v) are carried as rows of one
    array, so each parent–child merge is one vectorised max-plus convolution."""
    n_nodes = len(uni.paths)
    H: list[np.ndarray] = [None] * n_nodes  # type: ignore[list-item]
    hn: list[np.ndarray] = [None] * n_nodes  # type: ignore[list-item]
    merges_of: list[list] = [None] * n_nodes  # type: ignore[list-item]
    limit = budget + 1
    hk = np.asarray(h[1:k + 1], dtype=float)
    ns = np.arange(1, k + 1)
    leaf_n = np.concatenate([[0, 0], ns])[:limit]
    for v in range(n_nodes - 1, -1, -1):
        pv = uni.prob[v]
        if not uni.children[v]:  # a leaf: budget 1 + n holds exactly the choice n
            H[v] = np.concatenate([[NEG, NEG], pv * (1 + hk)])[:limit]
            hn[v], merges_of[v] = leaf_n, []
            continue
        acc, merges = _merge_children(uni.children[v], H, uni.prob, hk, limit)
        # cand[n−1, b] = P(v)(1 + h(n)) + A_n[b − 1 − n]
        width = min(limit, acc.shape[1] + 1 + k)
        cand = np.full((k, width), NEG)
        for n in ns:
            m = min(acc.shape[1], width - 1 - n)
            if m > 0:
                cand[n - 1, 1 + n:1 + n + m] = pv * (1 + hk[n - 1]) + acc[n - 1, :m]
        best_row = cand.argmax(0)
        best = cand[best_row, np.arange(width)]
        keep = max(1, len(_trim(best)))
        H[v], hn[v], merges_of[v] = best[:keep], (best_row + 1)[:keep], merges
    G, root = {}, {}
    top = [i for i in range(n_nodes) if uni.parent[i] < 0]
    acc, merges = _merge_children(top, H, uni.prob, np.array([h[r] for r in roots], float),
                                  limit)
    for i, r in enumerate(roots):
        G[r] = acc[i]
        root[r] = [(c, a[i]) for c, a in merges]
    return DPResult(uni, G, root, merges_of, hn)


# ---- policy evaluation --------------------------------------------------------------
@dataclasses.dataclass
class StateStats:
    E: float
    p: np.ndarray  # [k+1], index j = next state
    L: int


def tree_stats(nodes: list[Node], r: int, k: int, prob: dict) -> StateStats:
    """E, next-state distribution and input length of one state's tree."""
    p = np.zeros(k + 1)
    child_mass: dict[tuple, float] = {}
    for nd in nodes:
        child_mass[nd.path[:-1]] = child_mass.get(nd.path[:-1], 0.0) + prob[nd.path]
    p[r] += 1.0 - child_mass.get((), 0.0)
    for nd in nodes:
        p[nd.prompt_tokens] += prob[nd.path] - child_mass.get(nd.path, 0.0)
    E = 1.0 + sum(prob[nd.path] for nd in nodes)
    L = input_length(len(nodes), r, sum(nd.prompt_tokens for nd in nodes))
    return StateStats(E, p, L)


def evaluate(stats: dict[int, StateStats], tau: dict[int, float], k: int):
    """Gain ρ (tokens/s), relative values h (h_k = 0), stationary π, tokens/step, step time."""
    states = sorted(stats)
    idx = {m: i for i, m in enumerate(states)}
    n = len(states)
    A = np.zeros((n + 1, n + 1))
    b = np.zeros(n + 1)
    for m in states:
        i = idx[m]
        A[i, i] += 1.0
        for j in states:
            A[i, idx[j]] -= stats[m].p[j]
        A[i, n] = tau[m]
        b[i] = stats[m].E
    A[n, idx[max(states)]] = 1.0
    x = np.linalg.lstsq(A, b, rcond=None)[0]
    P = np.array([[stats[m].p[j] for j in states] for m in states])
    w, v = np.linalg.eig(P.T)
    pi = np.real(v[:, np.argmin(np.abs(w - 1))])
    pi = np.abs(pi) / np.abs(pi).sum()
    h = np.zeros(k + 1)
    for m in states:
        h[m] = x[idx[m]]
    E = float(sum(pi[idx[m]] * stats[m].E for m in states))
    T = float(sum(pi[idx[m]] * tau[m] for m in states))
    return float(x[n]), h, {m: float(pi[idx[m]]) for m in states}, E, T


# ---- the optimiser ------------------------------------------------------------------
@dataclasses.dataclass
class Solution:
    tree: Tree
    tokens_per_second: float
    tokens_per_step: float
    step_seconds: float
    pi: dict[int, float]
    input_lengths: dict[int, int]
    iterations: int
    h: np.ndarray
    dp: dict[int, DPResult]


def path_probabilities(uni_by_state: dict[int, Universe]) -> dict[tuple, float]:
    out = {}
    for u in uni_by_state.values():
        out.update(zip(u.paths, u.prob.tolist()))
    return out


def optimise(acc: np.ndarray, latency: LatencyFn, k: int | None = None, max_input: int = 512,
             path_prob: dict | None = None, width_cap: int | None = None,
             roots: list[int] | None = None, max_iter: int = 50) -> Solution:
    """Best dynamic tree (every state's L ≤ max_input) by policy iteration."""
    acc = np.asarray(acc, dtype=float)
    k = k or acc.shape[0]
    if not 1 <= k <= acc.shape[0]:
        raise BadInput(f"k={k} outside 1..{acc.shape[0]} (rows of the acceptance table)")
    if max_input < 2:
        raise BadInput(f"--max-input must be ≥ 2 (root + one prompt token), got {max_input}")
    roots = roots or [r for r in range(1, k + 1) if 1 + r <= max_input]
    max_nodes = max(1, (max_input - 2) // 2)
    unis = {m: universe(acc, m, 2 * max_nodes, path_prob, width_cap) for m in range(1, k + 1)}
    prob = path_probabilities(unis)
    best: Solution | None = None
    for r in roots:
        budget = max_input - 1 - r
        policy = {m: [] for m in range(1, k + 1)}
        stats = {m: tree_stats(policy[m], r, k, prob) for m in policy}
        rho, h, pi, E, T = evaluate(stats, {m: float(latency([stats[m].L])[0]) for m in stats}, k)
        dps = {}
        for it in range(1, max_iter + 1):
            changed = False
            for m in range(1, k + 1):
                dp = budget_dp(unis[m], h, k, budget, [r])
                dps[m] = dp
                G = dp.G[r]
                q = G - rho * latency(input_length(0, r, np.arange(len(G))))
                bstar = int(np.argmax(q))
                # the current tree's own Q (not the DP's best at its budget)
                cur = stats[m]
                cur_q = cur.E - 1 - h[r] + cur.p @ h - rho * float(latency([cur.L])[0])
                if q[bstar] > cur_q + 1e-9 * max(1.0, abs(q[bstar])):
                    policy[m] = dp.tree(r, bstar)
                    stats[m] = tree_stats(policy[m], r, k, prob)
                    changed = True
            tau = {m: float(latency([stats[m].L])[0]) for m in stats}
            rho, h, pi, E, T = evaluate(stats, tau, k)
            if not changed:
                break
        sol = Solution(Tree(k, r, dict(policy), int(acc.shape[1])), rho, E, T, pi,
                       {m: stats[m].L for m in stats}, it, h, dps)
        if best is None or sol.tokens_per_second > best.tokens_per_second:
            best = sol
    assert best is not None
    return best


def greedy_tree(acc: np.ndarray, length: int, k: int | None = None) -> Tree | None:
    """The greedy static tree: top-N paths by product, every node (and the root) with K
    prompt tokens, N = (L − 1 − K) // (K + 1). None when L < 1 + K."""
    acc = np.asarray(acc, dtype=float)
    k = k or acc.shape[0]
    n = (length - 1 - k) // (k + 1)
    if n < 0:
        return None
    uni = universe(acc, k, n)
    return Tree.static(uni.paths, k, int(acc.shape[1]))


def node_probabilities(tree: Tree, acc: np.ndarray, path_prob: dict | None = None) -> dict:
    """P(path) of every node of every state (ranks a table does not cover count as 0)."""
    acc = np.nan_to_num(np.asarray(acc, dtype=float), nan=0.0)
    if tree.num_prompt_tokens > acc.shape[0] or tree.rank_width > acc.shape[1]:
        raise BadInput(f"the tree needs {tree.num_prompt_tokens} prompt-token rows and rank "
                       f"{tree.rank_width - 1}; the acceptance table has {acc.shape[0]} rows of "
                       f"{acc.shape[1]} ranks")
    prob = {}
    for nodes in tree.states.values():
        for nd in nodes:
            p = 1.0
            for d in range(1, len(nd.path) + 1):
                p = path_probability(acc, nd.path[:d], p, path_prob)
            prob[nd.path] = p
    return prob


def predict(tree: Tree, acc: np.ndarray, latency: LatencyFn | None = None,
            path_prob: dict | None = None) -> dict:
    """Stationary tokens/step (and tokens/s, step time with a latency) of any tree."""
    k = tree.num_prompt_tokens
    prob = node_probabilities(tree, acc, path_prob)
    stats = {m: tree_stats(nodes, tree.root_prompt_tokens, k, prob)
             for m, nodes in tree.states.items()}
    tau = {m: float(latency([s.L])[0]) if latency else 1.0 for m, s in stats.items()}
    # a static or partial tree: states it never reaches are dropped by the chain itself
    rho, h, pi, E, T = evaluate(stats, tau, k)
    return {"tokens_per_step": E, "step_seconds": T if latency else None,
            "tokens_per_second": E / T if latency else None, "pi": pi,
            "input_lengths": {m: s.L for m, s in stats.items()}}


def per_input_length(sol: Solution, acc: np.ndarray, latency: LatencyFn, max_input: int,
                     path_prob: dict | None = None) -> list[dict]:
    """Best tokens/s with every state's input length ≤ L, for L = 1..max_input.

    From the optimum's own input length on, the unconstrained optimum is the answer. Below
    it, each cap is solved by policy iteration over a finite set of candidate trees: the
    DP-optimal trees for every budget at the optimum's relative values h, the greedy static
    trees, and, at anchor caps ×1.12 apart, two rounds of "solve over the candidates, then
    add the DP-optimal trees for the resulting h" (policy-iteration improvement steps, so
    the anchors' values approach their exact optimum).
    """
    k = sol.tree.num_prompt_tokens
    acc = np.asarray(acc, dtype=float)
    t1 = float(latency([1])[0])
    rows = [{"input_length": 1, "tokens_per_step": 1.0, "tokens_per_second": 1.0 / t1}]
    cands: dict[int, dict[int, list]] = {}  # r -> state -> [(L, E, p)]
    prob = path_probabilities({m: dp.uni for m, dp in sol.dp.items()})
    top_l = min(max(sol.input_lengths.values()), max_input)

    def add(h, cap):
        roots = [r for r in range(1, k + 1) if 1 + r <= cap]
        if not roots:
            return
        for m in range(1, k + 1):
            # the candidates `optimise(max_input=cap)` itself would use
            uni = sol.dp[m].uni.prefix(2 * max(1, (cap - 2) // 2))
            dp = budget_dp(uni, h, k, cap - 2, roots)
            for r in roots:
                G = dp.G[r][: cap - r]
                lst = cands.setdefault(r, {}).setdefault(m, [])
                for b in np.nonzero(np.isfinite(G))[0]:
                    st = tree_stats(dp.tree(r, int(b)), r, k, prob)
                    lst.append((st.L, st.E, st.p))

    def arrays():
        return {r: {m: (np.array([c[0] for c in lst]), np.array([c[1] for c in lst]),
                        np.array([c[2] for c in lst])) for m, lst in sm.items()}
                for r, sm in cands.items() if len(sm) == k}

    def solve(arr, cap):
        best = (1.0 / t1, 1.0, None)
        for r, sm in arr.items():
            if 1 + r <= cap:
                res = _finite_pi(sm, cap, latency, k)
                if res and res[0] > best[0]:
                    best = res
        return best

    add(sol.h, top_l)
    # greedy static trees: top-N by product, all counts K (nested, so one universe)
    _, E_g, L_g = static_curve(acc, k, top_l, path_prob)
    stay = np.zeros(k + 1)
    stay[k] = 1.0
    cands.setdefault(k, {}).setdefault(k, []).extend(
        (int(L), float(E), stay) for L, E in zip(L_g, E_g))
    a = 4.0
    while a < top_l:
        cap = int(round(a))
        prev = None
        for _ in range(2):
            val, _, h = solve(arrays(), cap)
            if h is None or (prev is not None and val <= prev * (1 + 1e-12)):
                break
            prev = val
            add(h, cap)
        a *= 1.12
    arr = arrays()
    for cap in range(2, max_input + 1):
        if cap >= top_l:
            rows.append({"input_length": cap, "tokens_per_step": round(sol.tokens_per_step, 6),
                         "tokens_per_second": round(sol.tokens_per_second, 6)})
            continue
        rho, E, _ = solve(arr, cap)
        rows.append({"input_length": cap, "tokens_per_step": round(E, 6),
                     "tokens_per_second": round(rho, 6)})
    return rows


def _finite_pi(sm: dict, cap: int, latency: LatencyFn, k: int, max_iter: int = 30):
    """Policy iteration over finite candidate actions with L ≤ cap."""
    choice = {}
    for m, (L, E, p) in sm.items():
        ok = np.nonzero(L <= cap)[0]
        if ok.size == 0:
            return None
        choice[m] = int(ok[np.argmin(L[ok])])
    tcache = {m: latency(sm[m][0]) for m in sm}
    for _ in range(max_iter):
        stats = {m: StateStats(float(sm[m][1][i]), sm[m][2][i], int(sm[m][0][i]))
                 for m, i in choice.items()}
        rho, h, pi, E, T = evaluate(stats, {m: float(tcache[m][i]) for m, i in choice.items()}, k)
        changed = False
        for m, (L, Ev, p) in sm.items():
            q = Ev + p @ h - rho * tcache[m]
            q[L > cap] = NEG
            i = int(np.argmax(q))
            if q[i] > q[choice[m]] + 1e-12 * max(1.0, abs(q[i])):
                choice[m] = i
                changed = True
        if not changed:
            break
    return rho, E, h


# ---- static trees -------------------------------------------------------------------
def static_curve(acc: np.ndarray, k: int, max_input: int, path_prob: dict | None = None,
                 width_cap: int | None = None):
    """Greedy static trees (top-N paths by P, every node and the root with K prompt
    tokens) for every N that fits: (paths best-first, E[N], L[N]) for N = 0, 1, ..."""
    n_max = max(0, (max_input - 1 - k) // (k + 1))
    top = universe(np.asarray(acc, dtype=float), k, n_max, path_prob, width_cap)
    n = np.arange(len(top.paths) + 1)
    return top.paths, 1.0 + np.concatenate([[0.0], np.cumsum(top.prob)]), \
        input_length(n, k, k * n)


def greedy_curve(acc: np.ndarray, latency: LatencyFn, k: int, max_input: int,
                 path_prob: dict | None = None) -> list[dict]:
    """Tokens/step and tokens/s of the largest greedy static tree within each input
    length L = 1 + K .. max_input (the baseline the search must beat)."""
    _, E, L = static_curve(acc, k, max_input, path_prob)
    t = latency(L)
    rows = []
    for cap in range(1 + k, max_input + 1):
        i = int(np.searchsorted(L, cap, side="right")) - 1
        rows.append({"input_length": cap, "tokens_per_step": round(float(E[i]), 6),
                     "tokens_per_second": round(float(E[i] / t[i]), 6)})
    return rows


def optimise_static(acc: np.ndarray, latency: LatencyFn, k: int | None = None,
                    max_input: int = 512, path_prob: dict | None = None,
                    width_cap: int | None = None) -> Solution:
    """Best one-state tree (every node and the root carry K prompt tokens): for a fixed
    node count the top-N paths by P maximise E, so scanning N is exact."""
    acc = np.asarray(acc, dtype=float)
    k = k or acc.shape[0]
    paths, E, L = static_curve(acc, k, max_input, path_prob, width_cap)
    t = latency(L)
    i = int(np.argmax(E / t))
    tree = Tree.static(paths[:i], k, int(acc.shape[1]))
    return Solution(tree, float(E[i] / t[i]), float(E[i]), float(t[i]), {k: 1.0},
                    {k: int(L[i])}, 1, np.zeros(k + 1), {})


DEFAULT_CONTEXT = 512  # where the acceptance file does not say what context it measured


@dataclasses.dataclass
class Options:
    """What `treeopt search` takes beside its inputs (checked here, in plain words)."""

    max_input: int = 512
    context: int | None = None  # default: the acceptance file's mean context, else 512
    static: bool = False
    product: bool = False
    trials: int = 0
    storage: str | None = None

    def __post_init__(self):
        if not 2 <= self.max_input <= 65536:
            raise BadInput(f"--max-input must be in 2..65536, got {self.max_input}")
        if self.context is not None and self.context < 1:
            raise BadInput(f"--context must be ≥ 1, got {self.context}")
        if self.trials < 0:
            raise BadInput(f"--trials must be ≥ 0, got {self.trials}")
        if self.storage is not None and not re.fullmatch(r"[a-zA-Z][a-zA-Z0-9+.-]*://.*",
                                                         self.storage):
            raise BadInput(f"--storage {mask_secrets(self.storage)}: not a database URL "
                           "(e.g. sqlite:///path/study.db)")


def search(acc_obj: dict, profile: dict, opts: Options, name: str = "search") -> dict:
    """The search behind `treeopt search`: the best tree for an acceptance file and a
    latency profile. Returns the solution, the tree (its meta: how it was chosen and
    what it predicts), and the report (per-input-length table, greedy curve)."""
    lat_model = Latency(profile)
    context = opts.context if opts.context is not None else \
        int(acc_obj.get("mean_context") or DEFAULT_CONTEXT)
    lat = lambda L: lat_model(L, context)  # noqa: E731
    t1 = float(Latency(profile, with_overhead=False)([1], context)[0])
    acc_prod, _ = search_inputs(acc_obj, conditional=False)
    acc_fit, pp = search_inputs(acc_obj, conditional=not opts.product)
    t0 = time.perf_counter()
    config = {"k": acc_prod.shape[0], "width_cap": None, "conditional": pp is not None}
    if opts.trials:
        config = tune(acc_prod, acc_fit, pp, lat, opts.max_input, opts.trials, opts.storage,
                      opts.static, name)
    acc, use_pp = (acc_fit, pp) if config["conditional"] else (acc_prod, None)
    if opts.static:
        sol = optimise_static(acc, lat, config["k"], opts.max_input, use_pp)
        rows = None
    else:
        sol = optimise(acc, lat, k=config["k"], max_input=opts.max_input, path_prob=use_pp,
                       width_cap=config["width_cap"])
        rows = per_input_length(sol, acc, lat, opts.max_input, use_pp)
    seconds = time.perf_counter() - t0
    pred = _prediction(sol, t1)
    report = {"greedy_curve": greedy_curve(acc, lat, config["k"], opts.max_input, use_pp)}
    if rows:
        report["per_input_length"] = rows
    meta = {"context": context, "max_input": opts.max_input, "config": config,
            "static": opts.static, "predicted": pred, "search_seconds": round(seconds, 3)}
    return {"solution": sol, "acc": acc, "path_prob": use_pp, "latency": lat, "t1": t1,
            "meta": meta, "report": report}


def _prediction(sol: "Solution", t1: float) -> dict:
    """What a solution predicts, as the tree file's meta holds it."""
    return {"tokens_per_step": round(sol.tokens_per_step, 6),
            "tokens_per_second": round(sol.tokens_per_second, 6),
            "step_seconds": round(sol.step_seconds, 8),
            "speedup_vs_t1": round(sol.tokens_per_second * t1, 6),
            "input_lengths": {str(m): L for m, L in sol.input_lengths.items()},
            "stationary": {str(m): round(p, 6) for m, p in sol.pi.items()}}


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


def per_batch(found: dict, profile: dict, batch_sizes: list[int], max_input: int,
              single: dict | None = None, rec: dict | None = None
              ) -> tuple[dict[int, Tree | None], list[dict]]:
    """For each batch size B the configuration with the most throughput (tokens/s over all
    sequences): B·E(F) / t(B, F, C) over the caps F of :func:`frontier` — and, with
    lookup records `rec`, of :func:`hybrid_frontier`, whose winner's policy is then
    refined by :func:`hybrid` under the cap — or plain decoding B / t(B, 1, C) where no
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
        if rec is not None and front else {}
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
            if E * t_plain / t < 1 + BATCH_MIN_GAIN:
                E, t, tree, L = 1.0, t_plain, None, 1
        table[b] = tree
        rows.append({"batch": b, "plain": tree is None, "input_length": int(L), "context": ctx,
                     "tokens_per_step": round(E, 6), "step_seconds": round(t, 8),
                     "tokens_per_second": round(b * E / t, 6),
                     "plain_tokens_per_second": round(b / t_plain, 6),
                     "speedup_vs_plain": round(E * t_plain / t, 6)})
    return table, rows


def _figures(pred: dict, tree: Tree) -> dict:
    return {"tokens_per_step": round(pred["tokens_per_step"], 6),
            "step_seconds": round(pred["step_seconds"], 8),
            "tokens_per_second": round(pred["tokens_per_second"], 6),
            "input_length": tree.max_input_length}


def for_engine(fmt: str, found: dict, max_input: int, batch_rows: list[dict] | None = None
               ) -> dict:
    """The searched tree in an engine's format (:mod:`treeopt.export`). Where the format
    cannot express it, the best tree under the format's rules is searched again and both
    predictions are stated — never a silent substitute. With `batch_rows` (from
    :func:`per_batch`) also one export per batch size (null: plain decoding)."""
    out = _export(fmt, found["solution"].tree, found, found["latency"], max_input)
    if batch_rows:
        tab = found["solution"].tree.by_batch
        out["by_batch"] = {str(r["batch"]): None if r["plain"] else _export(
            fmt, tab[r["batch"]], found, found["latency"] if r["batch"] == 1 else
            (lambda L, t=r["step_seconds"]: t * flat_step(L)),
            max_input if r["batch"] == 1 else r["input_length"]) for r in batch_rows}
    return out


def _export(fmt: str, tree: Tree, found: dict, lat: LatencyFn, max_input: int) -> dict:
    acc, pp = found["acc"], found["path_prob"]
    k = tree.num_prompt_tokens
    reasons = constraints(tree, fmt)
    out_tree = tree
    if reasons and fmt == "medusa":
        out_tree = optimise_static(acc, lat, k, max_input, pp, width_cap=ENGINE_TOPK).tree
    elif reasons:
        out_tree = optimise(acc, lat, k, max_input, pp, width_cap=ENGINE_TOPK, roots=[k]).tree
    pred = _figures(predict(out_tree, acc, lat, pp), out_tree)
    body = {"choices": to_medusa(out_tree), "heads": k} if fmt == "medusa" else \
        {"tree": to_ppd(out_tree, node_probabilities(out_tree, acc, pp))}
    out = {"format": fmt, **body, "exact": not reasons, "predicted": pred}
    if reasons:
        out["not_expressible"] = reasons
        out["chosen_tree_predicted"] = _figures(predict(tree, acc, lat, pp), tree)
    return out


def evaluate_tree(tree: Tree, acc_obj: dict, profile: dict, opts: Options) -> dict:
    """A given tree's predicted figures on this profile and acceptance, beside the best
    tree the search finds at the same input length."""
    best = search(acc_obj, profile, dataclasses.replace(opts, max_input=max(
        2, tree.max_input_length), trials=0), "evaluate")
    acc, pp, lat = best["acc"], best["path_prob"], best["latency"]
    return {"given": _figures(predict(tree, acc, lat, pp), tree),
            "best_at_same_input_length": best["meta"]["predicted"] | {
                "input_length": best["solution"].tree.max_input_length},
            "context": best["meta"]["context"]}


def _open_study(optuna, storage: str, name: str):
    for attempt in range(3):  # another process creating the same storage's tables races
        try:
            return optuna.create_study(direction="maximize", study_name=f"treeopt-{name}",
                                       storage=storage, load_if_exists=True,
                                       sampler=optuna.samplers.TPESampler(seed=0))
        except Exception as e:  # noqa: BLE001 - unknown dialect, unreachable server, bad path
            if attempt == 2 or e.__class__.__name__ not in ("IntegrityError",
                                                            "OperationalError"):
                raise BadInput(f"--storage {mask_secrets(storage)}: cannot open it "
                               f"({e.__class__.__name__})") from e
            time.sleep(0.2 * (attempt + 1))


def tune(acc_prod, acc_fit, pp, lat, max_input, trials, storage, static, name) -> dict:
    """optuna TPE over what the exact optimiser takes as given."""
    import optuna  # heavy and optional: loaded only when trials are asked for

    optuna.logging.set_verbosity(logging.ERROR)  # a failed trial is our one-line error
    if storage is None:
        cache_dir().mkdir(parents=True, exist_ok=True)
        storage = f"sqlite:///{cache_dir() / 'search.db'}"
    # a signal mid-trial would raise inside optuna's or SQLAlchemy's bookkeeping: hold it,
    # stop after the running trial, then let it through
    with deferred_signals() as stopped:
        study = _open_study(optuna, storage, name)

        def objective(trial):
            k = trial.suggest_int("k", 1, acc_prod.shape[0])
            cap = trial.suggest_int("width_cap", 1, acc_prod.shape[1])
            cond = trial.suggest_categorical("conditional", [True, False]) if pp else False
            acc, use = (acc_fit, pp) if cond else (acc_prod, None)
            if static:
                return optimise_static(acc, lat, k, max_input, use).tokens_per_second
            return optimise(acc, lat, k, max_input, use, width_cap=cap).tokens_per_second

        # the exact optimiser's own setting first: tuning can then only match or improve it
        study.enqueue_trial({"k": acc_prod.shape[0], "width_cap": acc_prod.shape[1],
                             **({"conditional": True} if pp else {})}, skip_if_exists=True)
        if not stopped:
            study.optimize(objective, n_trials=trials, catch=(),
                           callbacks=[lambda st, _: st.stop() if stopped else None])
    bp = study.best_params
    return {"k": bp["k"], "width_cap": bp["width_cap"],
            "conditional": bool(bp.get("conditional", False)), "trials": len(study.trials),
            "storage": mask_secrets(storage)}


# ---- hybrid trees: prompt lookup beside the prompt tokens ------------------------------------
@dataclasses.dataclass
class Replay:
    """The measured positions of an acceptance file (ranks of the true tokens among the
    guesses, lookup's match length and accepted run, per prompt in order), and a tree's
    PPD part evaluated on them once: for state m and position i, the depth of the deepest
    accepted tree node and the state it leads to. Held as Python lists: the search
    replays hundreds of policies over the same positions."""

    tree: Tree
    rec: dict
    depth: dict[int, list[int]]
    next_state: dict[int, list[int]]
    match: list[int]
    won: list[int]

    @classmethod
    def build(cls, tree: Tree, rec: dict) -> "Replay":
        ranks = rec["ranks"]
        depth = {0: np.zeros(len(ranks), dtype=np.int64)}  # state 0: no guesses
        nxt = {0: np.full(len(ranks), tree.root_prompt_tokens, dtype=np.int64)}
        for m, nodes in tree.states.items():
            count = {nd.path: nd.prompt_tokens for nd in nodes}
            d = np.zeros(len(ranks), dtype=np.int64)
            s = np.full(len(ranks), tree.root_prompt_tokens, dtype=np.int64)
            for i, row in enumerate(ranks.tolist()):
                path: tuple = ()
                for r in row[:m]:
                    if r < 0 or path + (r,) not in count:
                        break
                    path += (r,)
                if path:
                    d[i], s[i] = len(path), count[path]
            depth[m], nxt[m] = d, s
        return cls(tree, rec, {m: v.tolist() for m, v in depth.items()},
                   {m: v.tolist() for m, v in nxt.items()}, rec["match"].tolist(),
                   rec["won"].tolist())

    def run(self, policy: dict, tau: np.ndarray, seen: set | None = None
            ) -> tuple[float, float, int]:
        """(tokens, seconds, steps) of greedy decoding replayed over the positions with
        this lookup policy: a step in state (m, n) accepts max(tree depth, lookup run
        within c) + 1 tokens; its input grows by (1 + q) per lookup token not already a
        tree node (the accepted ones are when the tree has them too). `seen` collects the
        states (m, n ≥ 1) the walk visits."""
        rec, tree = self.rec, self.tree
        match, won, depth, nxt = self.match, self.won, self.depth, self.next_state
        base = {m: tree.input_length(m) for m in [0, *tree.states]}
        none = (0, 1, 1)
        # the policy as a table [m][n] (n = 0: no match, no chain)
        table = [[policy.get((m, n), none) if n else none for n in range(rec["max_ngram"] + 1)]
                 for m in range(tree.num_prompt_tokens + 1)]
        tokens = steps = 0
        seconds = 0.0
        start = 0
        for length in rec["lengths"]:
            i, m = 0, tree.root_prompt_tokens
            while i < length:
                j = start + i
                c, q, keep = table[m][match[j]]
                if seen is not None and match[j]:
                    seen.add((m, match[j]))
                dp = depth[m][j] if keep else 0
                dl = min(won[j], c)
                a = 1 + max(dp, dl)
                if i + a > length:  # the data ends inside this step
                    break
                seconds += tau[base[m if keep else 0] + (c - min(dl, dp)) * (1 + q)]
                tokens, steps = tokens + a, steps + 1
                m = nxt[m][j] if dp >= dl else q
                i += a
            start += length
        return tokens, seconds, steps


def hybrid(tree: Tree, rec: dict, latency: LatencyFn, max_input: int,
           sweeps: int = 3, start: tuple | None = None) -> dict:
    """The lookup policy per state (m, n) for a tree's PPD part, by coordinate ascent on
    the replayed tokens per second over the measured positions (each entry tries every
    chain length c, prompt-token count q and keeping or dropping the guess nodes that fits
    max_input), started from the best uniform policy (`start`, from :func:`uniform_start`,
    where the caller has it). Returns the policy and the replayed figures with and without
    it."""
    value, plain, best, policy = start or uniform_start(tree, rec, latency, max_input)
    for _ in range(sweeps):
        changed = False
        seen = value(policy, visits=True)[4]
        for m in [*sorted(tree.states), 0]:
            for n in range(1, rec["max_ngram"] + 1):
                if (m, n) not in seen:  # no step of this walk is in (m, n): no trial moves
                    continue
                current = policy.get((m, n))
                for c in range(0, rec["max_tokens"] + 1):
                    for q, keep in (itertools.product([0, *sorted(tree.states)], (1, 0))
                                    if c else [(1, 1)]):
                        if (c and (c, q, keep) == current) or (not c and current is None):
                            continue
                        if tree.input_length(m if keep else 0) + c * (1 + q) > max_input:
                            continue
                        trial = dict(policy)
                        if c:
                            trial[(m, n)] = (c, q, keep)
                        else:
                            trial.pop((m, n), None)
                        v = value(trial)
                        if v[0] > best[0] * (1 + 1e-9):
                            best, policy, current, changed = v, trial, trial.get((m, n)), True
                            seen = value(policy, visits=True)[4]
        if not changed:
            break

    return {"policy": policy, "hybrid": _replay_figures(best), "ppd_only": _replay_figures(plain)}


def _replay_value(tree: Tree, rec: dict, latency: LatencyFn, max_input: int):
    """policy → (tokens/s, tokens, seconds, steps) replayed over the measured positions."""
    replay = Replay.build(tree, rec)
    tau = _tau(tree, rec, latency, max_input)

    def value(policy, visits=False):
        seen: set | None = set() if visits else None
        tok, sec, steps = replay.run(policy, tau, seen)
        return (tok / sec if sec else 0.0), tok, sec, steps, seen
    return value


def uniform_start(tree: Tree, rec: dict, latency: LatencyFn, max_input: int) -> tuple:
    """The best policy with one setting (c, q, keep) for every state (m, n) — settings
    which pay only together (q = 0 and state 0's own chain) are within its reach — or
    none where no lookup is better: (the replay's value function, the figures without
    lookup, the best figures, the policy); :func:`hybrid` climbs from it."""
    value = _replay_value(tree, rec, latency, max_input)
    plain = value({})
    best, policy = plain, {}
    entries = [(m, n) for m in [*sorted(tree.states), 0] for n in range(1, rec["max_ngram"] + 1)]
    for c, q, keep in itertools.product(range(1, rec["max_tokens"] + 1),
                                        [0, *sorted(tree.states)], (1, 0)):
        trial = {(m, n): (c, q, keep) for m, n in entries
                 if tree.input_length(m if keep else 0) + c * (1 + q) <= max_input}
        v = value(trial)
        if v[0] > best[0] * (1 + 1e-9):
            best, policy = v, trial
    return value, plain, best, policy


def _tau(tree: Tree, rec: dict, latency: LatencyFn, max_input: int = 0) -> np.ndarray:
    big = max(tree.max_input_length, max_input) + rec["max_tokens"] * (
        1 + tree.num_prompt_tokens) + 2
    tau = np.asarray(latency(np.arange(big)), dtype=float)
    tau[0] = tau[1]
    return tau


def _replay_figures(v) -> dict:
    return {"tokens_per_step": round(float(v[1] / max(v[3], 1)), 6),
            "step_seconds": round(float(v[2] / max(v[3], 1)), 8),
            "tokens_per_second": round(float(v[0]), 6), "steps": int(v[3])}


def replay_predict(tree: Tree, rec: dict, latency: LatencyFn) -> dict:
    """A (hybrid) tree's tokens/step, step time and tokens/s replayed over measured
    positions (:class:`Replay`)."""
    tok, sec, steps = Replay.build(tree, rec).run(
        tree.lookup.policy if tree.lookup else {}, _tau(tree, rec, latency))
    return _replay_figures(((tok / sec) if sec else 0.0, tok, sec, steps))


def ppd_candidates(found: dict, max_input: int) -> list[Solution]:
    """PPD parts for a hybrid tree: the searched tree first, then the PPD optima under
    smaller input caps (every cap up to 8, and a quarter, half and three quarters of the
    searched tree's input): a smaller tree leaves room and time for the lookup chain.
    A static search keeps its tree."""
    sol = found["solution"]
    if found["meta"].get("static"):
        return [sol]
    top = min(sol.tree.max_input_length, max_input)
    caps = sorted({*range(2, min(top, 9)), top // 4, top // 2, 3 * top // 4} - {0, 1, top})

    def shape(t: Tree):
        return t.root_prompt_tokens, tuple((m, tuple(ns)) for m, ns in sorted(t.states.items()))
    out, seen = [sol], {shape(sol.tree)}
    for cap in caps:
        s = optimise(found["acc"], found["latency"], found["meta"]["config"]["k"], cap,
                     found["path_prob"], found["meta"]["config"]["width_cap"])
        if shape(s.tree) not in seen:
            seen.add(shape(s.tree))
            out.append(s)
    return out


def with_lookup(found: dict, rec: dict, max_input: int) -> dict:
    """Give the searched tree (`found`, from :func:`search`) a lookup policy where it
    predicts faster, choosing the PPD part jointly with the lookup: each of
    :func:`ppd_candidates` is screened by its best uniform lookup policy, and the searched
    tree and the best other candidate get the full per-state search (:func:`hybrid`).
    When another PPD part wins, found's solution and predicted figures become its.
    Returns the replayed figures (PPD alone: the searched tree without lookup)."""
    lat = found["latency"]
    sol, *others = ppd_candidates(found, max_input)
    screened = 1 + len(others)
    runs = [(sol, hybrid(sol.tree, rec, lat, max_input))]
    if others:
        starts = [(s, uniform_start(s.tree, rec, lat, max_input)) for s in others]
        s, start = max(starts, key=lambda st: st[1][2][0])  # by tokens/s; first on ties
        runs.append((s, hybrid(s.tree, rec, lat, max_input, start=start)))
    best, h = max(runs, key=lambda r: r[1]["hybrid"]["tokens_per_second"])  # first on ties
    ppd_only = runs[0][1]["ppd_only"]
    kept = bool(h["policy"]) and \
        bool(h["hybrid"]["tokens_per_second"] > ppd_only["tokens_per_second"])
    if kept:
        best.tree.lookup = Lookup(rec["max_ngram"], rec["max_tokens"], h["policy"])
        if best is not sol:
            found["solution"] = best
            found["meta"]["predicted"] = _prediction(best, found["t1"])
    return {"hybrid": h["hybrid"], "ppd_only": ppd_only, "lookup_kept": kept,
            "ppd_part": {"input_lengths": {str(m): L for m, L in
                                           found["solution"].input_lengths.items()},
                         "screened": screened, "searched": len(runs)}}
