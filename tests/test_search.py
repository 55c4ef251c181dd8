import itertools
import random

import numpy as np
import pytest

from treeopt import acceptance as accept
from treeopt.search import batch, curves, exact
from treeopt.tree import Node


def random_acc(rng, k, topk):
    acc = np.zeros((k, topk))
    for d in range(k):
        w = np.sort(rng.random(topk))[::-1]
        acc[d] = w / w.sum() * rng.uniform(0.3, 0.9)
    return acc


def random_latency(rng):
    base, slope, knee = rng.uniform(0.01, 0.05), rng.uniform(0.0, 0.01), rng.integers(1, 9)
    jump = rng.uniform(0, 0.01)
    return lambda L: base + slope * np.maximum(np.asarray(L, float) - knee, 0) + jump * (
        np.asarray(L, float) > knee + 3)


def all_trees(depth, topk, max_nodes):
    """Every prefix-closed node set of depth ≤ depth over ranks < topk, ≤ max_nodes nodes."""
    universe = [p for d in range(1, depth + 1) for p in itertools.product(range(topk), repeat=d)]
    out = []
    for size in range(max_nodes + 1):
        for combo in itertools.combinations(universe, size):
            s = set(combo)
            if all(len(p) == 1 or p[:-1] in s for p in combo):
                out.append(list(combo))
    return out


def brute_force(acc, latency, k, max_input):
    """Max tokens/s over every dynamic tree (all states, all allocations, every root count)."""
    topk = acc.shape[1]
    prob = {p: float(np.prod([acc[i, r] for i, r in enumerate(p)]))
            for d in range(1, k + 1) for p in itertools.product(range(topk), repeat=d)}
    best = 0.0
    for r in range(1, k + 1):
        options = {}
        for m in range(1, k + 1):
            opts = []
            for nodes in all_trees(m, topk, (max_input - 2) // 2):
                for alloc in itertools.product(range(1, k + 1), repeat=len(nodes)):
                    tree = [Node(p, n) for p, n in zip(nodes, alloc)]
                    st = exact.tree_stats(tree, r, k, prob)
                    if st.L <= max_input:
                        opts.append((st.E, st.p, float(latency([st.L])[0])))
            options[m] = opts
        if k == 1:
            best = max(best, max(E / t for E, _, t in options[1]))
            continue
        E1, p12, t1 = (np.array([o[0] for o in options[1]]), np.array([o[1][2] for o in options[1]]),
                       np.array([o[2] for o in options[1]]))
        E2, p21, t2 = (np.array([o[0] for o in options[2]]), np.array([o[1][1] for o in options[2]]),
                       np.array([o[2] for o in options[2]]))
        a, b = p12[:, None], p21[None, :]
        pi1 = b / (a + b)
        tps = (pi1 * E1[:, None] + (1 - pi1) * E2[None, :]) / (pi1 * t1[:, None] + (1 - pi1) * t2[None, :])
        best = max(best, float(tps.max()))
    return best


@pytest.mark.parametrize("seed", range(6))
def test_matches_brute_force(seed):
    rng = np.random.default_rng(seed)
    k = 1 + seed % 2
    acc = random_acc(rng, k, 3)
    lat = random_latency(rng)
    max_input = int(rng.integers(6, 11))
    sol = exact.optimise(acc, lat, k=k, max_input=max_input)
    bf = brute_force(acc, lat, k, max_input)
    assert sol.tokens_per_second == pytest.approx(bf, rel=1e-9)
    assert max(sol.input_lengths.values()) <= max_input
    # the reported prediction is the tree's own
    pred = exact.predict(sol.tree, acc, lat)
    assert pred["tokens_per_second"] == pytest.approx(sol.tokens_per_second, rel=1e-9)


def test_expected_tokens_formula_against_monte_carlo():
    """Stationary tokens/step of random dynamic trees vs simulating the Markov chain."""
    from treeopt.tiny import random_tree

    rng = np.random.default_rng(0)
    prng = random.Random(0)
    for _ in range(4):
        k = prng.randint(1, 3)
        acc = random_acc(rng, k, 4)
        tree = random_tree(prng, k, 4, max_nodes=8)
        pred = exact.predict(tree, acc)["tokens_per_step"]
        # simulate: each depth's true rank drawn from acc (miss with the rest)
        state, total, steps = tree.root_prompt_tokens, 0, 20000
        for _ in range(steps):
            nodes = {n.path: n.prompt_tokens for n in tree.states[state]}
            ranks = [rng.choice(5, p=np.append(acc[d], 1 - acc[d].sum())) for d in range(k)]
            path, nxt = (), tree.root_prompt_tokens
            for d in range(k):
                cand = path + (int(ranks[d]),)
                if cand in nodes:
                    path, nxt = cand, nodes[cand]
                else:
                    break
            total += 1 + len(path)
            state = nxt
        assert total / steps == pytest.approx(pred, rel=0.03)


def test_faster_profile_never_worse():
    rng = np.random.default_rng(3)
    acc = random_acc(rng, 3, 6)
    slow = lambda L: 0.02 + 0.001 * np.asarray(L, float)  # noqa: E731
    fast = lambda L: 0.02 + 0.0005 * np.asarray(L, float)  # noqa: E731
    a = exact.optimise(acc, slow, max_input=64)
    b = exact.optimise(acc, fast, max_input=64)
    assert b.tokens_per_second >= a.tokens_per_second - 1e-12


def test_one_state_case_is_greedy_top_n():
    """A static tree (all counts K, flat latency, fixed length) scores like greedy top-N."""
    acc = accept.accuracy_array(accept.load("profiles/reference/vicuna-7b-v1.3.acceptance.json"))
    for L in (4, 20, 60):
        g = exact.greedy_tree(acc, L)
        n = len(g.states[3])
        assert n == (L - 4) // 4
        # greedy's nodes are the n most probable paths of depth ≤ 3
        allp = sorted((float(np.prod([acc[i, r] for i, r in enumerate(p)])))
                      for d in (1, 2, 3) for p in itertools.product(range(10), repeat=d))[::-1]
        got = sorted((float(np.prod([acc[i, r] for i, r in enumerate(nd.path)]))
                      for nd in g.states[3]), reverse=True)
        assert got == pytest.approx(allp[:n])


def test_never_worse_than_greedy_per_length():
    acc = accept.accuracy_array(accept.load("profiles/reference/MobileLLaMA-1.4B-Chat.acceptance.json"))
    lat = lambda L: 0.01 + 0.0002 * np.asarray(L, float)  # noqa: E731
    sol = exact.optimise(acc, lat, max_input=48)
    rows = curves.per_input_length(sol, acc, lat, 48)
    assert [r["input_length"] for r in rows] == list(range(1, 49))
    for row in rows:
        g = exact.greedy_tree(acc, row["input_length"])
        if g is not None:
            assert row["tokens_per_second"] >= \
                exact.predict(g, acc, lat)["tokens_per_second"] - 1e-6
    assert rows[-1]["tokens_per_second"] == pytest.approx(sol.tokens_per_second, rel=1e-6)
    assert all(b["tokens_per_second"] >= a["tokens_per_second"] - 1e-9
               for a, b in zip(rows, rows[1:]))


def test_missing_ranks_are_never_used():
    acc = accept.accuracy_array(accept.load("profiles/reference/vicuna-13b-v1.3.acceptance.json"))
    flat = lambda L: np.ones_like(np.asarray(L, float))  # noqa: E731
    sol = exact.optimise(acc, flat, max_input=200)
    for nodes in sol.tree.states.values():
        for nd in nodes:
            if len(nd.path) == 3:
                assert nd.path[2] < 5  # the published 13B table stops at rank 4 for depth 3


def test_static_search_is_best_greedy():
    acc = accept.accuracy_array(accept.load("profiles/reference/vicuna-7b-v1.3.acceptance.json"))
    lat = lambda L: 0.01 + 0.0004 * np.asarray(L, float)  # noqa: E731
    sol = curves.optimise_static(acc, lat, max_input=100)
    best = max(exact.predict(g, acc, lat)["tokens_per_second"]
               for g in (exact.greedy_tree(acc, L) for L in range(4, 101)) if g is not None)
    assert sol.tokens_per_second == pytest.approx(best, rel=1e-12)
    assert sol.tree.is_static


def brute_force_batch(acc, latency, k, max_input):
    """Max B-sequence throughput per step-time unit over every dynamic tree when a batched
    step costs t(longest input): max over policies of E / t(max_m L_m), plain (E = 1, L = 1)
    included. (B multiplies both sides alike, so it is left out.)"""
    topk = acc.shape[1]
    prob = {p: float(np.prod([acc[i, r] for i, r in enumerate(p)]))
            for d in range(1, k + 1) for p in itertools.product(range(topk), repeat=d)}
    best = 1.0 / float(latency([1])[0])
    for r in range(1, k + 1):
        options = {}
        for m in range(1, k + 1):
            options[m] = []
            for nodes in all_trees(m, topk, (max_input - 2) // 2):
                for alloc in itertools.product(range(1, k + 1), repeat=len(nodes)):
                    st = exact.tree_stats([Node(p, n) for p, n in zip(nodes, alloc)], r, k,
                                           prob)
                    if st.L <= max_input:
                        options[m].append((st.E, st.p, st.L))
        if k == 1:
            best = max(best, max(E / float(latency([L])[0]) for E, _, L in options[1]))
            continue
        for E1, p1, L1 in options[1]:
            for E2, p2, L2 in options[2]:
                a, b = p1[2], p2[1]
                pi1 = b / (a + b) if a + b > 0 else (1.0 if a == 0 and b == 0 else 0.0)
                if a + b == 0:  # both absorbing: the root's state decides
                    pi1 = 1.0 if r == 1 else 0.0
                E = pi1 * E1 + (1 - pi1) * E2
                best = max(best, E / float(latency([max(L1, L2)])[0]))
    return best


@pytest.mark.parametrize("seed", range(5))
def test_per_batch_optimum_matches_brute_force(seed):
    """Per batch size: the best cap of the frontier (every state padded to the batch's
    longest input) equals a brute force over every policy, plain decoding included."""
    rng = np.random.default_rng(100 + seed)
    k = 1 + seed % 2
    acc = random_acc(rng, k, 3)
    max_input = int(rng.integers(6, 10))
    front = batch.frontier(acc, k, list(range(2, max_input + 1)))
    for b in (1, 2, 8, 32):  # t(B, L) of a batched step: weights once, rows ∝ B·L
        lat = lambda L, b=b: 0.02 + 0.0004 * np.maximum(b * np.asarray(L, float) - 16, 0)  # noqa
        E, t, tree, F = batch.best_cap(front, lat)
        assert E / t == pytest.approx(brute_force_batch(acc, lat, k, max_input), rel=1e-9)
        assert (tree is None) == (F == 1)
        if tree is not None:
            assert tree.max_input_length <= F
            assert exact.predict(tree, acc)["tokens_per_step"] == pytest.approx(E, rel=1e-9)


def test_tuning_studies_are_keyed_by_their_objective(tmp_path, monkeypatch, capsys):
    """`--trials` resumes a study only for the same objective: another input cap (or
    profile, acceptance, static) starts its own, so its best settings were all scored under
    its own objective."""
    import json

    from treeopt.cli import main

    monkeypatch.setenv("TREEOPT_HOME", str(tmp_path / "home"))
    db = f"sqlite:///{tmp_path / 's.db'}"

    def search(max_input: int, *extra) -> dict:
        assert main(["search", "--model", "vicuna-7b", "--max-input", str(max_input),
                     "--trials", "3", "--storage", db, "--json", "--out",
                     str(tmp_path / f"t{max_input}.tree.json"), *extra]) == 0
        return json.loads(capsys.readouterr().out)["config"]

    wide, narrow = search(512), search(16)
    assert wide["trials"] == narrow["trials"] == 3 and wide["study"] != narrow["study"]
    static = search(16, "--static")
    assert static["trials"] == 3 and static["study"] not in (wide["study"], narrow["study"])
    again = search(512)  # the same objective resumes its own study
    assert again["study"] == wide["study"] and again["trials"] == 6
