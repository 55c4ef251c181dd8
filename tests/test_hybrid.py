"""Hybrid trees: lookup records, the replay, the per-state lookup search against brute
force, and losslessness on the real model."""
import itertools
import json
import random

import numpy as np
import pytest

from treeopt import acceptance, search
from treeopt.distill import Sample, lookup_offers
from treeopt.sources import PromptLookup
from treeopt.tree import Lookup, Node, Tree


def test_lookup_offers_match_a_direct_walk():
    rng = random.Random(3)
    ids = [rng.randrange(4) for _ in range(40)]
    s = Sample(ids, 10, None, None)
    match, won = lookup_offers([s], 2, 5)
    assert len(match) == len(ids) - 2 - 9
    for i, t in enumerate(range(9, len(ids) - 2)):
        n, chain = PromptLookup(2, 5).reset(ids[: t + 2]).offer()
        truth = ids[t + 2: t + 2 + len(chain)]
        ok = next((j for j, (a, b) in enumerate(zip(chain, truth)) if a != b), len(truth))
        assert (match[i], won[i]) == (n, ok)


def records(ranks, match, won, lengths, n=2, c=4):
    return {"ranks": np.array(ranks), "match": np.array(match), "won": np.array(won),
            "lengths": lengths, "max_ngram": n, "max_tokens": c}


def test_replay_by_hand():
    tree = Tree(2, 2, {1: [Node((0,), 2)], 2: [Node((0,), 2), Node((0, 0), 1)]}, 10)
    # positions of one prompt: (ranks of the true tokens, match length, lookup run)
    rec = records([[0, 0], [5, 0], [0, 5], [0, 0], [9, 9], [0, 0], [1, 1], [0, 0]],
                  [0, 2, 1, 0, 2, 0, 0, 0], [0, 3, 0, 0, 1, 0, 0, 0], [8])
    rp = search.Replay.build(tree, rec)
    tau = np.ones(64)
    # no lookup: i=0 state 2 → [0,0] accepted, 3 tokens, next n=1 → i=3 state 1 → [0]: 2
    # tokens, next 2 → i=5 state 2: 3 tokens → i=8 end
    assert rp.run({}, tau) == (8, 3.0, 3)
    # lookup in state (2, 2), chain 4 with 1 prompt token: i=0 as before (n=0) → i=3 state 1
    # (n=0) → i=5 ... the policy only fires at i=1 or i=4 — never reached
    assert rp.run({(2, 2): (4, 1, 1)}, tau)[0] == 8
    # in state (1, 2): start at i=1? Build a second prompt where it fires
    rec2 = records([[5, 5], [0, 0], [0, 0], [0, 0], [0, 0], [0, 0]],
                   [2, 0, 0, 0, 0, 0], [4, 0, 0, 0, 0, 0], [6])
    rp2 = search.Replay.build(tree, rec2)
    # state 2 at i=0: tree accepts nothing (rank 5), lookup run 4 within chain 4 → 5 tokens,
    # next state q=1 → i=5: state 1, [0] accepted → 2 tokens, but 5 + 2 > 6: cut, not counted
    tok, sec, steps = rp2.run({(2, 2): (4, 1, 1)}, tau)
    assert (tok, steps) == (5, 1)
    # dropping the guess nodes costs less: input 1 + 2 root slots + 4 × 2 instead of 2 + 3 + 8
    tau2 = np.arange(64, dtype=float)
    assert rp2.run({(2, 2): (4, 1, 0)}, tau2)[1] == 11 and \
        rp2.run({(2, 2): (4, 1, 1)}, tau2)[1] == tree.input_length(2) + 8
    tok, sec, steps = rp2.run({}, tau)  # without: 1 token, then [0,0] from i=1: 3, i=4: 2
    assert (tok, steps) == (6, 3)


def test_hybrid_search_matches_brute_force_on_one_entry():
    rng = np.random.default_rng(0)
    tree = Tree(1, 1, {1: [Node((0,), 1), Node((1,), 1)]}, 10)
    n_pos = 400
    ranks = rng.integers(0, 4, (n_pos, 1))
    match = rng.choice([0, 1], n_pos, p=[0.4, 0.6])
    won = np.where(match > 0, rng.integers(0, 6, n_pos), 0)
    rec = records(ranks, match, won, [100, 150, 150], n=1, c=5)

    def lat(L):
        return 1.0 + 0.08 * np.asarray(L, dtype=float)

    got = search.hybrid(tree, rec, lat, 512)
    rp = search.Replay.build(tree, rec)
    tau = search._tau(tree, rec, lat)
    options = [None] + [(c, q, keep) for c in range(1, 6) for q in (0, 1) for keep in (0, 1)]
    rates = []
    for a, b in itertools.product(options, options):  # entries (1, 1) and (0, 1)
        policy = {k: v for k, v in (((1, 1), a), ((0, 1), b)) if v is not None}
        t, s, _ = rp.run(policy, tau)
        rates.append(t / s)
    assert got["hybrid"]["tokens_per_second"] == pytest.approx(max(rates), rel=1e-6)
    assert max(rates) > rates[0]  # lookup pays on this instance, and the search found it


def test_ppd_sources_reproduce_the_ppd_tree(tmp_path):
    """--sources ppd writes today's tree (no lookup), and with lookup the PPD part is the
    same tree."""
    from test_cli import treeopt

    from treeopt.paths import SHIPPED

    prof = SHIPPED / "cpu-amd-epyc-2c__SmolLM2-135M-Instruct__bfloat16.json"
    acc = SHIPPED / "SmolLM2-135M-Instruct.acceptance.json"
    p = treeopt("search", "--profile", prof, "--acceptance", acc, "--out", tmp_path / "a.json")
    assert p.returncode == 0, p.stderr
    a = json.loads((tmp_path / "a.json").read_text())
    shipped = json.loads((SHIPPED / "cpu-amd-epyc-2c__SmolLM2-135M-Instruct.tree.json")
                         .read_text())
    assert a["states"] == shipped["states"] and "lookup" not in a


@pytest.mark.slow
def test_hybrid_lossless_on_the_real_model(smollm):
    """Real model, float32: long lookup chains on input-grounded and chat prompts (where
    lookup and the guesses propose conflicting paths) stay token-identical to HF greedy."""
    from treeopt import prompts
    from treeopt.inputs import resolve_inputs
    from treeopt.prompt_tokens import PromptTokens
    from treeopt.runtime import Decoder

    inp = resolve_inputs(smollm.model_id, device="cpu", dtype="float32", want=("tree",))
    base = inp.tree
    # long chains, some without prompt tokens (state 0 follows), some without guess nodes
    policy = {(m, n): (8, (0, base.root_prompt_tokens)[n % 2], int(n != 3))
              for m in [0, *base.states] for n in (1, 2, 3)}
    tree = Tree(base.num_prompt_tokens, base.root_prompt_tokens, base.states, base.topk,
                lookup=Lookup(3, 8, policy))
    dec = Decoder(smollm, PromptTokens.load(inp.prompt_tokens), tree)
    texts = prompts.load("input-grounded", 6) + prompts.load("mt-bench", 3, 40)
    long_steps = 0
    for text in texts:
        ids = prompts.encode(smollm.tokenizer, text)
        ref = dec.hf_generate(ids, 48).output_ids
        res = dec.ppd(ids, 48)
        assert res.output_ids == ref, text[:40]
        long_steps += sum(a > 1 + tree.max_depth for a in res.accepted)
    assert long_steps > 0 and dec._hybrid
