"""The exact optimiser: the dynamic tree with the most tokens per second for given
accuracies and a latency curve.

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
import math
from typing import Callable

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from ..errors import BadInput
from ..tree import Node, Tree, input_length

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


def prediction(sol: "Solution", t1: float) -> dict:
    """What a solution predicts, as the tree file's meta holds it."""
    return {"tokens_per_step": round(sol.tokens_per_step, 6),
            "tokens_per_second": round(sol.tokens_per_second, 6),
            "step_seconds": round(sol.step_seconds, 8),
            "speedup_vs_t1": round(sol.tokens_per_second * t1, 6),
            "input_lengths": {str(m): L for m, L in sol.input_lengths.items()},
            "stationary": {str(m): round(p, 6) for m, p in sol.pi.items()}}


def figures(pred: dict, tree: Tree) -> dict:
    return {"tokens_per_step": round(pred["tokens_per_step"], 6),
            "step_seconds": round(pred["step_seconds"], 8),
            "tokens_per_second": round(pred["tokens_per_second"], 6),
            "input_length": tree.max_input_length}
