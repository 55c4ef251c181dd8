"""Batched PPD: every sequence of a batch decodes exactly as it would alone (greedy), over
ragged caches, per-sequence states, EOS and max_new_tokens, and schedules that switch
trees (or to no tree) as sequences finish."""
import json
import random

import pytest
import torch

from treeopt import latency, search
from treeopt.batch import BatchDecoder, hf_generate_batch, schedule_of
from treeopt.errors import BadInput
from treeopt.inputs import resolve_inputs
from treeopt.runtime import Decoder, attention_masks, new_cache
from treeopt.search import batch
from treeopt.tiny import (WINDOW, random_lookup, random_prompt_tokens, random_tree,
                          tiny_model)
from treeopt.tree import Tree

from conftest import SHIPPED, SHIPPED_CPU_PROFILE, run_cli, tiny_loaded
from test_cli import assert_bad, treeopt


@pytest.fixture(scope="module")
def tiny():
    return tiny_loaded(vocab=8)


def random_schedule(rng, k, hybrid=False):
    """Batch size → random tree (some hybrid) or None (plain)."""
    out = {}
    for b in sorted(rng.sample(range(1, 7), rng.randint(1, 3))):
        if rng.random() < 0.25:
            out[b] = None
            continue
        tree = random_tree(rng, k, rng.randint(1, 8), max_nodes=15)
        if hybrid:
            tree.lookup = random_lookup(rng, tree)
            tree.validate()
        out[b] = tree
    return out


@pytest.mark.parametrize("hybrid", [False, True])
def test_every_sequence_of_a_batch_is_lossless_tiny(tiny, hybrid):
    rng = random.Random(21 if hybrid else 20)
    pt = random_prompt_tokens(tiny, 4)
    plain = Decoder(tiny, None, None)
    switched = deep = 0
    for trial in range(25):
        bd = BatchDecoder(tiny, pt, random_schedule(rng, 4, hybrid))
        prompts = [[rng.randrange(8) for _ in range(rng.randint(1, 24))]
                   for _ in range(rng.randint(1, 6))]
        limits = [rng.choice([1, rng.randint(2, 50)]) for _ in prompts]
        res = bd.generate(prompts, limits)
        for p, n, r in zip(prompts, limits, res.results):
            assert r.output_ids == plain.hf_generate(p, n).output_ids, (trial, p, n)
            assert len(r.output_ids) == n
        switched += len(set(res.live)) > 1
        deep = max(deep, max((a for r in res.results for a in r.accepted), default=0))
    assert switched and deep >= 3


def test_continuous_batching_refills_free_slots(tiny):
    """With max_batch, waiting prompts join as others finish; outputs stay lossless and
    never more than max_batch sequences decode at once."""
    rng = random.Random(31)
    pt = random_prompt_tokens(tiny, 3)
    plain = Decoder(tiny, None, None)
    prompts = [[rng.randrange(8) for _ in range(rng.randint(1, 20))] for _ in range(9)]
    limits = [rng.randint(1, 30) for _ in prompts]
    for schedule in ({1: random_tree(rng, 3, 6, 12), 2: None, 3: random_tree(rng, 3, 4, 6)},
                     {1: None}):
        res = BatchDecoder(tiny, pt, schedule).generate(prompts, limits, max_batch=3)
        assert [r.output_ids for r in res.results] == [
            plain.hf_generate(p, n).output_ids for p, n in zip(prompts, limits)]
        assert max(res.live) == 3 and res.live.count(3) > len(res.live) // 2


def test_eos_and_max_new_tokens_one(tiny):
    """One sequence stops at EOS early, one has max_new_tokens 1; the rest carry on."""
    pt = random_prompt_tokens(tiny, 3)
    prompts = [[1, 2, 3], [4] * 17, [5, 6], [7, 1, 2, 0, 3, 3, 1]]
    plain = Decoder(tiny, None, None)
    ref = plain.hf_generate(prompts[0], 30).output_ids
    eos = ref[4]
    bd = BatchDecoder(tiny, pt, {1: random_tree(random.Random(3), 3, 6)})
    bd.engine.eos = {eos}
    plain.eos = {eos}
    res = bd.generate(prompts, [30, 30, 1, 30])
    for p, n, r in zip(prompts, [30, 30, 1, 30], res.results):
        assert r.output_ids == plain.hf_generate(p, n).output_ids
    assert res.results[0].finish_reason == "eos" and len(res.results[0].output_ids) <= 5
    assert len(res.results[2].output_ids) == 1
    # max_new_tokens 1 finished at the prefill; the others left the batch as they ended
    assert res.live[0] == 3 and res.live[-1] < 3
    assert len(res.step_seconds) == len(res.step_tokens) == len(res.live)
    assert sum(res.step_tokens) + 4 == res.new_tokens  # + the prefill's first tokens


@pytest.mark.parametrize("name", ["mistral", "gemma3", "gemma2", "qwen2"])
def test_batch_lossless_across_architectures(name):
    """Sliding windows (prompts and outputs cross them) and softcaps, ragged batches."""
    lm = tiny_model(name)
    rng = random.Random(8)
    pt = random_prompt_tokens(lm, 3)
    plain = Decoder(lm, None, None)
    for _ in range(2):
        bd = BatchDecoder(lm, pt, {1: random_tree(rng, 3, 6, 10), 3: random_tree(rng, 3, 6, 6)})
        prompts = [[rng.randrange(32) for _ in range(n)] for n in (3, 3 * WINDOW, 7, WINDOW)]
        res = bd.generate(prompts, 2 * WINDOW)
        for p, r in zip(prompts, res.results):
            assert r.output_ids == plain.hf_generate(p, 2 * WINDOW).output_ids, name


@torch.inference_mode()
def test_masks_positions_and_cache_against_a_per_sequence_recompute():
    """One batched engine step over a ragged store: each sequence's logits equal its own
    unbatched tree forward (its context, its plan's mask and positions); after the step
    each row's valid slots equal a fresh forward of its accepted text (float64)."""
    from treeopt.engine import Result, Seq
    from treeopt.engine.step import forward, inputs, keep, masks, verify_greedy

    lm = tiny_loaded(vocab=24, seed=2)
    rng = random.Random(9)
    pt = random_prompt_tokens(lm, 3)
    tree = random_tree(rng, 3, 6, 12)
    bd = BatchDecoder(lm, pt, {1: tree})
    dec, eng = bd.schedule[1], bd.engine
    st, book = eng.ensure(3, 80), eng.books[1]
    seqs = [Seq(i, [rng.randrange(24) for _ in range(n)], 50) for i, n in enumerate((4, 19, 9))]
    eng.prefill(seqs, book, 0, None)
    for s in seqs:
        s.result = Result([], 1, 0.0, 0.0)
    chosen = eng.plan_rows(seqs, book)
    L, C = max(p.length for _, p, _ in chosen), max(s.ctx for s in seqs)
    eng.load_plans(chosen, book, L, 3)
    v = st.views(3, L)
    tok, x, pos = inputs(st, v)
    allowed = v.allowed.bool()
    logits = forward(st, x, pos, masks(st, v, pos, C, allowed), C)
    for i, (s, (_, plan, _)) in enumerate(zip(seqs, chosen)):
        n = plan.length
        own = torch.ones(n, s.ctx + n, dtype=torch.bool)
        own[:, s.ctx:] = torch.from_numpy(plan.arrays["allowed"]).bool()
        q_pos = s.ctx + torch.from_numpy(plan.arrays["pos"])
        assert pos[i, :n].tolist() == q_pos.tolist()
        alone = new_cache()
        dec.call(dec.embed(torch.tensor(s.ids)), alone, torch.arange(s.ctx), head=False)
        mask = attention_masks(lm.model.config, own, q_pos, torch.cat([torch.arange(s.ctx),
                                                                       q_pos]), lm.dtype)
        ref = dec.call(x[i, :n], alone, q_pos, mask)
        torch.testing.assert_close(logits[i, :n], ref, rtol=1e-9, atol=1e-9)
    w, _ = verify_greedy(v, tok, logits, allowed)
    keep(st, v, w, C)
    for i, (s, (_, plan, _)) in enumerate(zip(seqs, chosen)):
        path = plan.arrays["keep"][int(w[i])][:len(plan.path_src[int(w[i])])].tolist()
        text = s.ids + tok[i, path].tolist()
        assert int(st.ctx[i]) == len(text)
        fresh = new_cache()
        dec.call(dec.embed(torch.tensor(text)), fresh, torch.arange(len(text)), head=False)
        for j, b in enumerate(fresh.layers):
            torch.testing.assert_close(st.store.kv[0, j, i, :, :len(text)], b.keys[0],
                                       rtol=1e-9, atol=1e-9)
            torch.testing.assert_close(st.store.kv[1, j, i, :, :len(text)], b.values[0],
                                       rtol=1e-9, atol=1e-9)


def test_schedule_picks_the_largest_batch_size_not_above_live(tiny):
    t1, t4 = Tree.chain(2, 2), Tree.chain(1, 2)
    bd = BatchDecoder(tiny, random_prompt_tokens(tiny, 2), {1: t1, 4: t4, 8: None})
    assert [bd.pick(n).tree for n in (1, 3, 4, 7, 8, 20)] == [t1, t1, t4, t4, None, None]
    assert [bd.engine.pick(n).tree for n in (1, 4, 8)] == [t1, t4, None]
    assert schedule_of(None) == {1: None}
    assert schedule_of(t1) == {1: t1}


def test_hf_batched_generate_matches(tiny):
    plain = Decoder(tiny, None, None)
    prompts = [[1, 2, 3], [4] * 9, [5]]
    res = hf_generate_batch(plain, prompts, 12)
    for p, r in zip(prompts, res.results):
        assert r.output_ids == plain.hf_generate(p, 12).output_ids


@pytest.mark.slow
def test_batched_ppd_lossless_smollm_fp32(smollm, smollm_greedy):
    """The real model, fp32: a batch of prompts of very different lengths, random trees,
    one sequence with max_new_tokens 1 and one that meets EOS early."""
    from treeopt import prompts as P
    from treeopt.inputs import resolve_inputs
    from treeopt.prompt_tokens import PromptTokens

    inp = resolve_inputs(smollm.model_id, device="cpu", dtype="float32", want=("tree",))
    pt = PromptTokens.load(inp.prompt_tokens)
    texts = list(P.BUILTIN[:3]) + ["Say only the word yes.", " ".join(P.BUILTIN) * 2]
    ids = [P.encode(smollm.tokenizer, t) for t in texts]
    limits = [64, 64, 1, 48, 40]  # the first two shared with test_runtime's references
    refs = [smollm_greedy(p, n) for p, n in zip(ids, limits)]
    assert any(len(r) < n for r, n in zip(refs, limits))  # one met EOS early
    rng = random.Random(5)
    for schedule in ({1: inp.tree, 3: random_tree(rng, 3, 4, 8), 5: None},
                     {1: random_tree(rng, 3, 10, 20)}):
        res = BatchDecoder(smollm, pt, schedule).generate(ids, limits)
        assert [r.output_ids for r in res.results] == refs


# ---- latency with a batch axis, the per-batch search and its artefacts ---------------


def test_old_profiles_read_as_batch_one_and_missing_batches_are_refused():
    shipped = resolve_inputs(None, str(SHIPPED_CPU_PROFILE), need=("profile",)).profile
    assert latency.batches(shipped) == [1, 2, 4, 8, 16]
    with pytest.raises(BadInput, match="no points at batch size 3"):
        latency.require_batches(shipped, [1, 3, 4])
    # a profile from before the batch axis: points without `batch` are B = 1
    prof = dict(shipped, points=[{k: v for k, v in p.items() if k != "batch"}
                                 for p in shipped["points"] if p["batch"] == 1])
    latency.validate(prof)
    assert latency.batches(prof) == [1]
    one = latency.Latency(prof)
    assert one([1, 8], 128).tolist() == latency.Latency(prof, batch=1)([1, 8], 128).tolist()
    with pytest.raises(BadInput, match="no points at batch size 8"):
        latency.Latency(prof, batch=8)
    bad = dict(prof, points=[dict(prof["points"][0], batch=0)])
    with pytest.raises(BadInput, match="batch must be an integer"):
        latency.validate(bad)


def test_roofline_batches_share_the_weights():
    shape = latency.model_shape("vicuna-7b")[1]
    t = {b: latency.roofline(shape, 1, 512, 2.0, 312, 2039, 0.75, 0.55, 4e-5, batch=b)["seconds"]
         for b in (1, 8, 64)}
    assert t[1] < t[8] < t[64] and t[8] < 2 * t[1]  # memory-bound: batching is nearly free
    sim = latency.simulate("a100-80gb", "vicuna-7b", "float16", [1, 8], [512],
                           batch_sizes=[1, 4])
    assert {(p["batch"], p["size"]) for p in sim["points"]} == {(1, 1), (1, 8), (4, 1), (4, 8)}
    assert latency.Latency(sim, batch=4)([8], 512)[0] > latency.Latency(sim, batch=1)([8], 512)[0]


def test_per_batch_search_b1_is_todays_search_and_trees_shrink_with_b():
    inp = resolve_inputs("vicuna-7b", need=("profile", "acceptance"), simulate=True,
                         batch=[1, 2, 8, 32, 128])
    found = search.search(inp.acceptance, inp.profile, search.Options(max_input=256))
    table, rows = batch.per_batch(found, inp.profile, [1, 2, 8, 32, 128], 256)
    sol = found["solution"]
    assert table[1].states == sol.tree.states and not table[1].by_batch
    assert rows[0]["tokens_per_second"] == pytest.approx(sol.tokens_per_second, rel=1e-6)
    lengths = [r["input_length"] for r in rows]
    assert lengths == sorted(lengths, reverse=True) and lengths[-1] < lengths[0]
    assert all(r["speedup_vs_plain"] >= 1.0 for r in rows)
    for r in rows[1:]:
        t = table[r["batch"]]
        assert (t is None) == r["plain"]
        if t is not None:
            assert t.max_input_length <= r["input_length"]
    # the tree artefact carries one entry per B (None = plain) and reads back
    tree = sol.tree
    tree.by_batch = table
    back = Tree.from_json(json.loads(json.dumps(tree.to_json())))
    assert set(back.by_batch) == set(table)
    assert all((back.by_batch[b] is None) == (table[b] is None) for b in table)
    with pytest.raises(BadInput, match="by_batch key"):
        Tree.from_json({**tree.to_json(), "by_batch": {"x": None}})


def test_search_batch_cli(tmp_path):
    out = tmp_path / "v13.tree.json"
    p = treeopt("search", "--model", "vicuna-13b", "--batch", "1,8,32,64", "--export", "ppd",
                "--json", "--out", str(out))
    assert p.returncode == 0, p.stderr
    res = json.loads(p.stdout)
    assert [r["batch"] for r in res["batch"]] == [1, 8, 32, 64]
    tree = Tree.load(out)
    assert set(tree.by_batch) == {1, 8, 32, 64}
    assert set(res["export"]["by_batch"]) == {"1", "8", "32", "64"}
    # the PPD files' end probabilities, against the published accuracies read directly
    acc = json.loads((SHIPPED / "reference" / "vicuna-13b-v1.3.acceptance.json").read_text())
    exports = [res["export"]] + [e for e in res["export"]["by_batch"].values() if e]
    assert len(exports) >= 2
    for exp in exports:
        for m, rows in exp["tree"].items():
            assert_end_probabilities(rows, acc["accuracy"])
    # a profile without the asked batch points: a clear error, never a silent guess
    assert_bad(run_cli("search", "--batch", "1,3", "--profile", SHIPPED_CPU_PROFILE,
                       "--out", str(tmp_path / "t.json")),
               "no points at batch size 3")


def assert_end_probabilities(rows: list, accuracy: list) -> None:
    """A PPD state's [path, p_end, n] rows: p_end(n) = P(n) − Σ P(children), with P the
    product of the published accuracies along the path (the reference has no measured
    path probabilities); the ends and the root's sum to 1; Σ depth·p_end = Σ P."""
    prob = {}
    for path, _, _ in rows:
        p = 1.0
        for d, r in enumerate(path):
            p *= accuracy[d][r]
        prob[tuple(path)] = p
    ends = {tuple(path): p_end for path, p_end, _ in rows}
    for path, p in prob.items():
        kids = sum(q for c, q in prob.items() if len(c) == len(path) + 1 and c[:-1] == path)
        assert ends[path] == pytest.approx(p - kids, abs=2e-8), path
        assert ends[path] >= -1e-8
    root_end = 1 - sum(p for c, p in prob.items() if len(c) == 1)
    assert root_end + sum(ends.values()) == pytest.approx(1, abs=1e-6)
    assert sum(len(c) * e for c, e in ends.items()) == pytest.approx(sum(prob.values()),
                                                                      abs=1e-6)


def test_report_batch_panel():
    from treeopt import report

    inp = resolve_inputs("vicuna-7b", need=("profile", "acceptance"), simulate=True,
                         batch=[1, 4])
    found = search.search(inp.acceptance, inp.profile, search.Options(max_input=128))
    table, rows = batch.per_batch(found, inp.profile, [1, 4], 128)
    tree = found["solution"].tree
    tree.by_batch, tree.meta = table, {"batch": rows, "model": "vicuna-7b-v1.3",
                                       "device": "<script>x</script>"}
    row = {"batch": 4, "groups": 1, **{f"{k}_tokens_per_second": 10.0 for k in
                                       ("chosen", "plain", "hf", "single")},
           "speedup_vs_plain": 1.0, "speedup_vs_hf": 1.0, "speedup_vs_single": 1.0,
           "tokens_per_step": 1.5, "identical_to_plain_fraction": 1.0,
           "predicted": {"tokens_per_second": 11.0, "error": 0.1}}
    run = {"schema": "treeopt.run/1", "kind": "batch-bench", "model": "vicuna-7b-v1.3",
           "batch": [row]}
    text = report.build(tree=tree.to_json(), run=run)
    assert "<section id='batch'>" in text and "<section id='run'>" not in text
    assert "<script>" not in text and "fig-batch" in text


def test_batch_assess_replays_the_steps_all_sequences_shared(tiny):
    """A batch bench row gains the records of its chosen configuration's decodes (every
    prompt, the steps all B sequences shared tagged by their step) and a model drift of
    about zero: the tree replayed over those records takes the tokens per step the
    decodes took (within the steps a token limit cut); with a prediction, the text drift
    is measured against it."""
    from treeopt.drift import batch_assess
    from treeopt.evaluation import _full

    rng = random.Random(9)
    pt = random_prompt_tokens(tiny, 3)
    tree = random_tree(rng, 3, 6, 12)
    prompts = [[rng.randrange(8) for _ in range(rng.randint(2, 12))] for _ in range(6)]
    res = BatchDecoder(tiny, pt, {1: tree}).generate(prompts, 30, max_batch=3)
    tok, sec, n = _full([res], 3)
    assert n > 0
    full = {"steps": n, "tokens_per_step": tok / n / 3, "tokens_per_second": tok / sec}
    row = {"batch": 3, "chosen_full_batch": full, "predicted": {"tokens_per_step": 2.0}}
    batch_assess(row, tree, 3, "tiny", prompts, res.results, None, None, None)
    acc = row["acceptance"]
    assert acc["source"] == "run" and acc["prompts"] == 6 and acc["batch"] == 3
    d = row["drift"]
    # (the last steps of a decode may be cut by its token limit: within 1 %)
    assert set(d["model"]) == {"tokens_per_step"} and abs(d["model"]["tokens_per_step"]) < 0.01
    assert d["replayed"]["tokens_per_step"] == pytest.approx(full["tokens_per_step"], rel=0.01)
    assert d["text"] == round(d["replayed"]["tokens_per_step"] / 2.0 - 1, 4)
    assert "speed" not in d  # no profile at this batch size: no speed drift claimed
    plain_row = {"batch": 3}  # a plain configuration: records, no drift
    batch_assess(plain_row, None, 3, "tiny", prompts, res.results, None, None, None)
    assert "drift" not in plain_row and plain_row["acceptance"]["prompts"] == 6
