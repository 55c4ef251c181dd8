"""Trees in and out of other engines' formats, checked against those engines' own buffer
builders — reimplemented here from their documented behaviour (Medusa's
`generate_medusa_buffers`; PPD's `generate_buffers` per key, PPD_REFERENCE §3.2), not
copied — and against the plans treeopt's engine builds from its one layout."""
import json
import random

import numpy as np
import pytest

from treeopt import acceptance, export
from treeopt.search import curves, exact
from treeopt.errors import BadInput
from treeopt.paths import SHIPPED
from treeopt.tree import Node, Tree

from treeopt.tiny import random_tree
from conftest import run_cli, state_plan, winner_paths, winner_slots
from test_cli import assert_bad, treeopt

TOPK = 10
PPD_105 = SHIPPED / "reference" / "ppd-authors__vicuna-7b-v1.3__105.tree.json"


# ---- the engines' builders, from their documented behaviour --------------------------------
def medusa_buffers(choices):
    """Medusa: nodes sorted by (depth, path); mask = self + root + ancestors; tree index of
    a node = 1 + TOPK·(depth−1) + rank; position = depth; one retrieve row per leaf."""
    c = sorted(choices, key=lambda x: (len(x), x))
    n = len(c) + 1
    mask = np.eye(n, dtype=bool)
    mask[:, 0] = True
    for i, p in enumerate(c):
        for d in range(1, len(p)):
            mask[i + 1, c.index(p[:d]) + 1] = True  # ValueError: not prefix-closed
    tree_indices = [0] + [1 + TOPK * (len(p) - 1) + p[-1] for p in c]
    positions = [0] + [len(p) for p in c]
    leaves = [p for p in c if not any(q[: len(p)] == p and len(q) > len(p) for q in c)]
    retrieve = sorted([[0] + [c.index(p[:d]) + 1 for d in range(1, len(p) + 1)]
                       for p in leaves])
    return mask, tree_indices, positions, retrieve, c


def ppd_buffers(key_nodes, n_tokens):
    """PPD, one key: candidates sorted; every candidate gets prompt tokens 1..n (at least
    1), the root all N; slots sorted by (length, lexicographic) with prompt marks −j;
    mask = self + root + every proper non-empty prefix; positions = path length; tree
    index: candidate 1 + 10·(d−1) + rank, prompt j → prompt_table[j−1]; special tokens =
    each node's prompt slots in order."""
    cands = sorted([list(p) for p, _ in key_nodes], key=lambda x: (len(x), x))
    ncount = {tuple(p): n for p, n in key_nodes}
    P = list(cands) + [p + [-1] for p in cands] + [[-1]]
    for i in range(2, n_tokens + 1):
        for q in list(P):
            owner = tuple(x for x in q if x >= 0)
            nq = n_tokens if not owner else min(ncount[owner], n_tokens)
            if q[-1] == -(i - 1) and i <= nq:
                P.append(q + [-i])
    P = sorted(P, key=lambda x: (len(x), x))
    T = len(P) + 1
    tidx = {(): 0, **{tuple(p): 1 + i for i, p in enumerate(P)}}
    sem = {0: ("node", ())}
    for p in P:
        base = tuple(x for x in p if x >= 0)
        sem[tidx[tuple(p)]] = ("node", base) if p[-1] >= 0 else ("slot", base, -p[-1])
    mask = np.eye(T, dtype=bool)
    mask[:, 0] = True
    for p in P:
        for d in range(1, len(p)):
            mask[tidx[tuple(p)], tidx[tuple(p[:d])]] = True
    positions = [0] + [len(p) for p in P]
    source = {0: "root"}
    for p in P:
        source[tidx[tuple(p)]] = ("row", len(p) - 1, p[-1]) if p[-1] >= 0 else ("prompt", -p[-1])
    special = {(): [tidx[tuple([-1] * 0 + [-j for j in range(1, i + 1)])]
                    for i in range(1, n_tokens + 1)]}
    for p in cands:
        special[tuple(p)] = [tidx[tuple(p + [-j for j in range(1, i + 1)])]
                             for i in range(1, min(ncount[tuple(p)], n_tokens) + 1)]
    return mask, positions, source, special, sem


def treeopt_semantics(buf, nodes, root_n):
    """treeopt's plan as a semantic id per tree position."""
    sem = {0: ("node", ())}
    for i, nd in enumerate(nodes, start=1):
        sem[i] = ("node", nd.path)
    owners = [()] + [nd.path for nd in nodes]
    for w, slots in enumerate(winner_slots(buf)):
        for j, s in enumerate(slots, start=1):
            sem[s] = ("slot", owners[w], j)
    return sem


# ---- Medusa ----------------------------------------------------------------------------------
def test_medusa_export_builds_the_same_buffers():
    acc = acceptance.accuracy_array(acceptance.load(
        SHIPPED / "reference" / "vicuna-7b-v1.3.acceptance.json"))
    for L in (8, 24, 64, 120):
        sol = curves.optimise_static(acc, lambda x: np.ones_like(np.asarray(x, float)), 3, L,
                                     width_cap=TOPK)
        tree = sol.tree
        choices = export.to_medusa(tree)
        mask, tidx, pos, retrieve, c = medusa_buffers(choices)
        (m,) = tree.states
        buf, lay = state_plan(tree, m)
        a, n = buf.arrays, buf.n_nodes + 1
        assert [tuple(p) for p in c] == [nd.path for nd in tree.states[m]]  # same order
        assert (a["allowed"][:n, :n].astype(bool) == mask).all()
        assert a["pos"][:n].tolist() == pos
        width = tree.rank_width
        ours = [0] + [1 + TOPK * (s // width) + s % width
                      for s in (a["src"][1:n] - lay.guess0).tolist()]
        assert ours == tidx
        parents = set(a["parent"][1:n].tolist())
        leaves = sorted(path for w, path in enumerate(winner_paths(buf))
                        if w > 0 and w not in parents)
        assert leaves == retrieve
        back = export.parse_tree(json.loads(json.dumps(
            {"format": "medusa", "choices": choices, "heads": 3})))
        assert back.states == tree.states and back.root_prompt_tokens == tree.root_prompt_tokens


def test_medusa_rules_are_enforced():
    with pytest.raises(BadInput, match="rank outside 0..9"):
        export.from_medusa([[0], [10]])  # Medusa would alias it to the next head's rank 0
    with pytest.raises(BadInput, match="parent"):
        export.from_medusa([[0, 1]])
    with pytest.raises(BadInput, match="duplicate"):
        export.from_medusa([[0], [0]])
    with pytest.raises(BadInput, match="integer ranks"):
        export.from_medusa([[0], [True]])
    with pytest.raises(BadInput, match="2 deep"):
        export.parse_tree({"format": "medusa", "choices": [[0], [0, 0]], "heads": 1})
    dynamic = random_tree(random.Random(1), 3, 6)
    assert any("dynamic" in r for r in export.constraints(dynamic, "medusa"))
    with pytest.raises(BadInput, match="cannot write this tree as medusa"):
        export.to_medusa(dynamic)
    light = Tree(3, 3, {3: [Node((0,), 1)], 1: []}, 10)
    assert export.constraints(light, "medusa")
    wide = Tree.static([[0], [12]], 3, 20)
    assert any("top-10" in r for r in export.constraints(wide, "medusa"))


# ---- PPD -------------------------------------------------------------------------------------
def test_ppd_export_builds_the_same_buffers():
    rng = random.Random(2)
    for trial in range(30):
        tree = random_tree(rng, 3, 10, max_nodes=12)
        tree = Tree(3, 3, tree.states, 10)  # PPD's root always carries N
        obj = export.to_ppd(tree)
        back = export.parse_tree(json.loads(json.dumps(obj)))
        assert back.states == tree.states and back.root_prompt_tokens == 3
        for m, nodes in tree.states.items():
            buf, lay = state_plan(tree, m)
            a, n_nodes = buf.arrays, buf.n_nodes
            ours = treeopt_semantics(buf, nodes, tree.root_prompt_tokens)
            key_nodes = [(e[0], e[2]) for e in obj[str(m)]]
            mask, pos, source, special, sem = ppd_buffers(key_nodes, 3)
            assert len(sem) == buf.length, trial
            to_ours = {v: k for k, v in ours.items()}
            order = [to_ours[sem[i]] for i in range(len(sem))]  # PPD slot → treeopt position
            assert (a["allowed"].astype(bool)[np.ix_(order, order)] == mask).all(), trial
            assert [int(a["pos"][o]) for o in order] == pos
            width = tree.rank_width
            for i, o in enumerate(order):
                if source[i] == "root":
                    assert o == 0
                elif source[i][0] == "row":
                    s = int(a["src"][o]) - lay.guess0
                    assert (s // width, s % width) == source[i][1:]
                else:
                    assert o > n_nodes and int(a["src"][o]) - lay.slot0 == source[i][1] - 1
            owners = [()] + [nd.path for nd in nodes]
            for w, slots in enumerate(winner_slots(buf)):
                assert [order.index(s) for s in slots] == special[owners[w]]


def test_ppd_rules_are_enforced():
    with pytest.raises(BadInput, match="keys must be the states 1..N"):
        export.from_ppd({"1": [], "3": []})
    with pytest.raises(BadInput, match="rank outside"):
        export.from_ppd({"1": [[[10], 0.1, 1]]})
    with pytest.raises(BadInput, match="parent"):
        export.from_ppd({"1": [], "2": [[[0, 1], 0.1, 1]]})
    light_root = Tree(3, 1, {1: [Node((0,), 1)], 2: [], 3: []}, 10)
    assert any("root" in r for r in export.constraints(light_root, "ppd"))
    with pytest.raises(BadInput, match="cannot write this tree as ppd"):
        export.to_ppd(light_root)
    assert export.from_ppd({"1": [[[0], 0.1, 7]]}).states[1][0].prompt_tokens == 1  # n > N → N
    with pytest.raises(BadInput, match="not a treeopt tree, a Medusa choices list or a PPD"):
        export.parse_tree({"something": 1})


def test_ppd_authors_105_tree_scores_2_367():
    tree = export.load_tree(PPD_105)
    assert {m: len(v) for m, v in tree.states.items()} == {1: 10, 2: 33, 3: 34}
    assert {m: tree.input_length(m) for m in tree.states} == {1: 44, 2: 109, 3: 109}
    acc = acceptance.accuracy_array(acceptance.load(
        SHIPPED / "reference" / "vicuna-7b-v1.3.acceptance.json"))
    assert exact.predict(tree, acc)["tokens_per_step"] == pytest.approx(2.367, abs=5e-4)


# ---- the CLI ---------------------------------------------------------------------------------
def test_search_exports_and_evaluates(tmp_path):
    out = tmp_path / "t.json"
    p = treeopt("search", "--model", "vicuna-7b", "--export", "medusa", "--max-input", "96",
                "--out", out, "--json")
    assert p.returncode == 0, p.stderr
    med = json.loads((tmp_path / "t.medusa.json").read_text())
    assert med["format"] == "medusa" and med["exact"] is False  # the chosen tree is dynamic
    assert "dynamic" in med["not_expressible"][0] and "cannot be written as medusa" in p.stderr
    assert med["predicted"]["tokens_per_step"] <= med["chosen_tree_predicted"]["tokens_per_step"]
    back = export.load_tree(tmp_path / "t.medusa.json")
    assert back.is_static and max(back.rank_width, 1) <= 10
    p = treeopt("search", "--model", "vicuna-7b", "--export", "ppd", "--max-input", "96",
                "--out", out, "--json")
    assert p.returncode == 0, p.stderr
    ppd = json.loads((tmp_path / "t.ppd.json").read_text())
    tree = export.load_tree(out)
    assert ppd["exact"] is True and export.load_tree(tmp_path / "t.ppd.json").states == tree.states
    assert ppd["predicted"]["tokens_per_step"] == pytest.approx(
        json.loads(out.read_text())["meta"]["predicted"]["tokens_per_step"], abs=1e-6)
    p = treeopt("search", "--model", "vicuna-7b", "--evaluate", PPD_105, "--json")
    assert p.returncode == 0, p.stderr
    ev = json.loads(p.stdout)
    assert ev["given"]["tokens_per_step"] == pytest.approx(2.367, abs=5e-4)
    assert ev["given"]["input_length"] == 109
    assert ev["best_at_same_input_length"]["tokens_per_second"] >= \
        ev["given"]["tokens_per_second"] * (1 - 1e-9)
    (tmp_path / "bad.json").write_text('{"x": 1}')
    assert_bad(run_cli("search", "--model", "vicuna-7b", "--evaluate", tmp_path / "bad.json"),
               "not a treeopt tree, a Medusa choices list or a PPD dynamic-tree dict")


@pytest.mark.slow
def test_engine_trees_run_lossless(tmp_path):
    """`bench --tree medusa.json` runs, and `run --tree` with the PPD authors' tree is
    token-identical to greedy decoding (float32, real model)."""
    (tmp_path / "medusa.json").write_text("[[0], [1], [0, 0], [0, 1], [0, 0, 0]]")
    p = treeopt("bench", "--tree", tmp_path / "medusa.json", "--limit", "2",
                "--max-new-tokens", "24", "--dtype", "float32", "--out", tmp_path / "b.json",
                "--json")
    assert p.returncode == 0, p.stderr
    b = json.loads(p.stdout)
    assert b["identical_fraction"] == 1.0 and b["tree"].endswith("medusa.json")
    p = treeopt("run", "--tree", PPD_105, "--baseline", "--dtype", "float32",
                "--max-new-tokens", "32", "--json")
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout)["identical"] is True
