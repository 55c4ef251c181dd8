import json
import random

import numpy as np
import pytest

from treeopt.errors import BadInput
from treeopt.tree import Node, Tree

from treeopt.tiny import random_tree

from conftest import state_plan, winner_paths, winner_slots


def worked_example():
    # PPD_REFERENCE §3.5's key-2 tree in treeopt's layout: [0] n=2, [1] n=1, [0,0] n=1, root 3
    return Tree(3, 3, {2: [Node((0,), 2), Node((1,), 1), Node((0, 0), 1)],
                       1: [Node((0,), 3)], 3: [Node((0,), 3)]})


def test_plan_of_the_worked_example():
    tree = worked_example()
    b, lay = state_plan(tree, 2)
    a = b.arrays
    assert b.length == 11 == tree.input_length(2) and b.n_nodes == 3
    assert a["pos"].tolist() == [0, 1, 1, 2, 1, 2, 3, 2, 3, 2, 3]
    rows = {0: {0}, 1: {0, 1}, 2: {0, 2}, 3: {0, 1, 3}, 4: {0, 4}, 5: {0, 4, 5},
            6: {0, 4, 5, 6}, 7: {0, 1, 7}, 8: {0, 1, 7, 8}, 9: {0, 2, 9}, 10: {0, 1, 3, 10}}
    for q, cols in rows.items():
        assert set(np.flatnonzero(a["allowed"][q]).tolist()) == cols, q
    assert (a["src"][1:4] - lay.guess0).tolist() == [0, 1, 2]  # rows of width rank_width = 2
    assert a["parent"][1:4].tolist() == [0, 0, 1]
    assert a["depth"][1:4].tolist() == [1, 1, 2]
    assert winner_paths(b) == [[0], [0, 1], [0, 2], [0, 1, 3]]
    assert winner_slots(b) == [[4, 5, 6], [7, 8], [9], [10]]
    assert b.next_state == [3, 2, 1, 1]
    assert (a["src"][4:] - lay.slot0).tolist() == [0, 1, 2, 0, 1, 0, 0]  # slot's prompt token


def test_chain_and_static():
    t = Tree.chain(3, 3)
    assert [len(t.states[m]) for m in (1, 2, 3)] == [1, 2, 3]
    assert t.input_length(3) == 1 + 3 + 3 + 9
    s = Tree.static([[0], [1], [0, 0]], 2)
    assert s.is_static and s.input_length(2) == 1 + 3 + 2 + 6
    assert state_plan(s, 2)[0].next_state == [2, 2, 2, 2]


def test_json_roundtrip(tmp_path):
    t = random_tree(random.Random(3), 3, 10)
    t.save(tmp_path / "t.json")
    u = Tree.load(tmp_path / "t.json")
    assert u.states == t.states and u.root_prompt_tokens == t.root_prompt_tokens
    assert json.loads((tmp_path / "t.json").read_text())["schema"] == "treeopt.tree/1"


@pytest.mark.parametrize("states,root,msg", [
    ({1: [Node((0, 0), 1)]}, 1, "depth 2 > 1"),
    ({2: [Node((0, 1), 2)]}, 2, "parent [0] missing"),
    ({1: [Node((10,), 1)]}, 1, "rank outside"),
    ({1: [Node((0,), 4)]}, 1, "prompt_tokens=4 outside 1..3"),
    ({1: [Node((0,), 0)]}, 1, "prompt_tokens=0"),
    ({1: [Node((0,), 2)]}, 1, "no state 2"),
    ({1: [Node((0,), 1)]}, 3, "root carries 3"),
    ({4: []}, 1, "state 4 outside"),
])
def test_validation_names_the_problem(states, root, msg):
    with pytest.raises(BadInput, match=msg.replace("[", r"\[").replace("]", r"\]")):
        Tree(3, root, states, 10)


def test_from_json_errors():
    with pytest.raises(BadInput, match="schema"):
        Tree.from_json({"schema": "x"})
    with pytest.raises(BadInput, match="missing field 'states'"):
        Tree.from_json({"schema": "treeopt.tree/1", "num_prompt_tokens": 3})
    with pytest.raises(BadInput, match=r"state 1 node \[0\]: duplicate"):
        Tree.from_json({"schema": "treeopt.tree/1", "num_prompt_tokens": 1,
                        "states": {"1": [{"path": [0]}, {"path": [0]}]}})


def test_random_trees_layout_invariants():
    rng = random.Random(0)
    for _ in range(50):
        t = random_tree(rng, rng.randint(1, 4), rng.randint(1, 6))
        for m in t.states:
            b, _ = state_plan(t, m)
            allowed, pos = b.arrays["allowed"].astype(bool), b.arrays["pos"]
            assert b.length == t.input_length(m)
            # every row sees the root and itself; the mask is lower-triangular in this layout
            assert allowed[:, 0].all() and allowed.diagonal().all()
            assert not np.triu(allowed, 1).any()
            for pp in winner_paths(b):
                assert pos[pp].tolist() == list(range(len(pp)))
