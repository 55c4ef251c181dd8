"""Static trees and the curves beside the optimum: the best one-state tree, the best
tokens/s under every input-length cap (the search report's table, which the report
plots) and the greedy static baseline."""
from __future__ import annotations

import numpy as np

from ..tree import Tree, input_length
from .exact import NEG, LatencyFn, Solution, StateStats, budget_dp, evaluate, \
    path_probabilities, tree_stats, universe

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
