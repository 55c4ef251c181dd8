"""The central property: PPD greedy output == plain greedy output, token for token."""
import random

import pytest
import torch

from treeopt.measure import decode_host_work
from treeopt.runtime import Decoder, new_cache
from treeopt.tree import Tree

from treeopt.tiny import random_lookup, random_prompt_tokens, random_tree

from conftest import tiny_loaded


@pytest.fixture(scope="module")
def tiny():
    return tiny_loaded(vocab=8)


@pytest.mark.parametrize("hybrid", [False, True])
def test_random_trees_lossless_tiny(tiny, hybrid):
    """Property test: random valid trees (with random prompt-lookup policies when hybrid)
    and prompts, small vocab (lots of acceptance): token-identical to greedy decoding."""
    rng = random.Random(11 if hybrid else 1)
    pt = random_prompt_tokens(tiny, 4)
    deep = lookup_won = 0
    merged = set()
    for trial in range(40):
        tree = random_tree(rng, rng.randint(1, 4), rng.randint(1, 8), max_nodes=20)
        if hybrid:
            tree.lookup = random_lookup(rng, tree)
            tree.validate()
        dec = Decoder(tiny, pt, tree)
        ids = [rng.randrange(8) for _ in range(rng.randint(1, 16))]
        n = rng.randint(1, 60)
        ref = dec.baseline(ids, n).output_ids
        res = dec.ppd(ids, n)
        assert res.output_ids == ref, (trial, tree.to_json())
        assert len(res.output_ids) == n  # never overshoots
        assert sum(res.accepted) + 1 >= n
        deep = max(deep, max(res.accepted, default=0))
        # a step that emitted more than the tree's depth + 1 tokens took a lookup chain
        lookup_won += sum(a > 1 + tree.max_depth for a in res.accepted)
        merged |= {k for k in dec.engine().books[1].plans if k[1]}
    assert deep >= 3  # the trials did exercise multi-token acceptance
    if hybrid:
        assert lookup_won > 0 and merged


def test_kv_cache_equals_fresh_forward(tiny):
    """After each step the static store's row holds exactly the accepted sequence's KV."""
    rng = random.Random(5)
    pt = random_prompt_tokens(tiny, 3)
    for _ in range(5):
        tree = random_tree(rng, 3, 8)
        dec = Decoder(tiny, pt, tree)
        ids = [rng.randrange(8) for _ in range(6)]
        emitted = []
        checked = []

        def check(new):
            emitted.extend(new)
            if len(emitted) >= 30:
                return  # the last step may be cut by max_new_tokens
            seq = ids + emitted[:-1]  # the last emitted token is the next root, not cached
            fresh = new_cache()
            with torch.inference_mode():
                dec.call(dec.embed(torch.tensor(seq)), fresh, torch.arange(len(seq)), head=False)
            kv = dec.engine().st.store.kv
            assert int(dec.engine().st.ctx[0]) == len(seq)
            for i, b in enumerate(fresh.layers):
                torch.testing.assert_close(kv[0, i, 0, :, :len(seq)], b.keys[0], rtol=1e-9,
                                           atol=1e-9)
                torch.testing.assert_close(kv[1, i, 0, :, :len(seq)], b.values[0], rtol=1e-9,
                                           atol=1e-9)
            checked.append(len(seq))

        dec.ppd(ids, 30, on_tokens=check)
        assert len(checked) >= 2


@torch.inference_mode()
def assert_branches_match(dec, key, guesses, chain, ctx_ids):
    """One engine tree forward (plan `key`) after a context == a plain causal forward over
    each node's and each prompt slot's own branch (context, root, ancestors, node, earlier
    slots)."""
    from treeopt.engine import Seq
    from treeopt.engine.step import forward, inputs, masks

    eng = dec.engine()
    st, lay, book = eng.ensure(1, 64), eng.layout, eng.books[1]
    eng.prefill([Seq(0, ctx_ids, 10)], book, 0, None)
    c = len(ctx_ids)
    st.pool[0, lay.x0_col] = 6
    st.pool[0, lay.guess0:lay.guess0 + guesses.numel()] = guesses.flatten()
    st.pool[0, lay.chain0:lay.chain0 + len(chain)] = chain
    plan = book.plan(key)
    L = plan.length
    v = st.views(1, L)
    v.plan.copy_(torch.from_numpy(plan.row(L, lay))[None])
    tok, x, pos = inputs(st, v)
    out = forward(st, x, pos, masks(st, v, pos, c, v.allowed.bool()), c)[0]
    tok = tok[0]
    for w in range(plan.n_nodes + 1):
        path = plan.arrays["keep"][w][:len(plan.path_src[w])].tolist()
        slots = plan.arrays["slots"][w][:plan.next_state[w]].tolist()
        branch = torch.cat([dec.embed(torch.cat([torch.tensor(ctx_ids), tok[path]])),
                            st.table[lay.vocab:lay.vocab + len(slots)]])
        ref = dec.call(branch, new_cache(), torch.arange(len(branch)))
        rows = [c + len(path) - 1] + [c + len(path) + j for j in range(len(slots))]
        torch.testing.assert_close(out[[path[-1]] + slots], ref[rows], rtol=1e-9, atol=1e-9)


def test_eos_stops_and_is_kept(tiny):
    pt = random_prompt_tokens(tiny, 2)
    dec = Decoder(tiny, pt, Tree.chain(2, 2))
    ids = [1, 2, 3]
    ref = dec.baseline(ids, 20).output_ids
    dec.eos = {ref[5]}
    out = dec.ppd(ids, 20).output_ids
    assert out == ref[: ref.index(ref[5]) + 1]
    assert dec.baseline(ids, 20).output_ids == out


def test_typical_sampling_accepts_only_above_its_threshold(tiny):
    """Temperature T: every token a step took from the tree (all of a step's tokens but
    the sampled last) had p(token | prefix, T) > min(eps, alpha·exp(−entropy)) under the
    model itself (recomputed with HF over the output); the same seed gives the same
    output; T → 0 is greedy decoding."""
    pt = random_prompt_tokens(tiny, 3)
    dec = Decoder(tiny, pt, random_tree(random.Random(2), 3, 8))
    T, eps, alpha, checked = 0.8, 0.25, 1.0, 0  # a threshold that refuses some guesses
    for seed, prompt in ((11, [1, 2, 3]), (12, [5, 0, 7, 7, 2]), (13, [4])):
        a = dec.ppd(prompt, 25, temperature=T, eps=eps, alpha=alpha, seed=seed)
        b = dec.ppd(prompt, 25, temperature=T, eps=eps, alpha=alpha, seed=seed)
        assert a.output_ids == b.output_ids and len(a.output_ids) == 25
        ids = torch.tensor([prompt + a.output_ids])
        with torch.no_grad():
            probs = torch.softmax(tiny.model(ids).logits[0] / T, -1)
        ent = -(probs * torch.log(probs + 1e-10)).sum(-1)
        thr = torch.clamp(alpha * torch.exp(-ent), max=eps)
        at = len(prompt) + 1  # output position 0 came from the prefill (sampled)
        for n in a.accepted:
            for j in range(at, min(at + n - 1, ids.shape[1])):  # the tree's tokens
                assert probs[j - 1, ids[0, j]] > thr[j - 1], (seed, j)
                checked += 1
            at += n
    assert checked >= 5  # guesses were taken, each above its threshold
    cold = dec.ppd([1, 2, 3], 25, temperature=1e-4, seed=3)
    assert cold.output_ids == Decoder(tiny).hf_generate([1, 2, 3], 25).output_ids


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["chain", "wide", "dynamic"])
def test_lossless_smollm_fp32(smollm, smollm_greedy, kind):
    """PPD greedy == HF generate(do_sample=False) on the real model, float32, 64 tokens."""
    from treeopt import prompts
    from treeopt.inputs import resolve_inputs
    from treeopt.prompt_tokens import PromptTokens

    inp = resolve_inputs(smollm.model_id, device="cpu", dtype="float32", want=("tree",))
    trees = {
        "chain": Tree.chain(3, 3),
        "wide": Tree.static([[r] for r in range(8)] + [[0, r] for r in range(4)] + [[0, 0, 0]], 3),
        "dynamic": inp.tree,
    }
    pt = PromptTokens.load(inp.prompt_tokens)
    dec = Decoder(smollm, pt, trees[kind])
    for text in prompts.BUILTIN[:5]:
        ids = prompts.encode(smollm.tokenizer, text)
        assert dec.ppd(ids, 64).output_ids == smollm_greedy(ids, 64), text


def test_merge_chain_is_a_trie_walk():
    from treeopt.engine.plans import merge_chain

    children = {(): [(0,), (1,)], (0,): [(0, 0)], (0, 0): [(0, 0, 2)]}
    token_of = {(0,): 5, (1,): 7, (0, 0): 9, (0, 0, 2): 4}
    assert merge_chain(children, token_of, [5, 9, 4]) == ((0, 0, 2), [])  # all inside
    assert merge_chain(children, token_of, [5, 9, 1, 2]) == ((0, 0), [1, 2])
    assert merge_chain(children, token_of, [7, 7]) == ((1,), [7])
    assert merge_chain(children, token_of, [3]) == ((), [3])  # conflicts at once


def test_tree_forward_matches_branch_recompute(tiny):
    """Every node of each state's tree — alone, merged with a lookup chain under some
    node, and with a cache chain too, under a node or inside lookup's chain — and every
    prompt slot gets the logits of a plain causal forward over its own branch (context,
    root, ancestors, the node, its earlier prompt tokens)."""
    rng = random.Random(8)
    pt = random_prompt_tokens(tiny, 3)
    tree = random_tree(rng, 3, 6, max_nodes=8)
    dec = Decoder(tiny, pt, tree)
    dec.engine_options = {"room": 6}
    ctx_ids = [3, 1, 4, 1, 5]
    for m in tree.states:
        unders = [()] + [nd.path for nd in tree.states[m]]
        qs = [0, *sorted(tree.states)]
        shapes = [()]  # the tree alone
        for u in rng.sample(unders, min(3, len(unders))):
            first = (u, rng.randint(1, 3), rng.choice(qs))
            shapes.append((first,))
            # a second chain under a tree node or under one of the first chain's nodes
            hang = rng.choice([rng.choice(unders), u + (-1,) * rng.randint(1, first[1])])
            shapes.append((first, (hang, rng.randint(1, 3), rng.choice(qs))))
        for shape in shapes:
            guesses = torch.randint(0, 8, (m, dec.engine().layout.width))
            assert_branches_match(dec, (m, tuple(shape)), guesses, torch.randint(0, 8, (6,)),
                                  ctx_ids)


def test_host_work_is_counted_per_step(tiny):
    """The counter behind benchmarks/host_work.py (no GPU needed): one device→host read a
    step for the plain loop and for a tree without chain sources, at most 40 ops outside
    the forward for either; the forward's ops are counted apart (the model's decoder and
    LM head)."""
    pt = random_prompt_tokens(tiny, 3)
    dec = Decoder(tiny, pt, Tree.chain(3, 3))
    ids = [1, 2, 3, 4, 5]
    plain, tree = decode_host_work(dec, ids, 24)
    assert plain["syncs_per_step"] == 1.0 and tree["syncs_per_step"] == 1.0
    # the engine's target: ≤ 40 ops outside the forward a step, plain or tree alike
    assert 0 < plain["outside_ops_per_step"] <= 40 and 0 < tree["outside_ops_per_step"] <= 40
    assert plain["forward_ops_per_step"] > plain["outside_ops_per_step"]
