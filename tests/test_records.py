"""Runs record their own acceptance (treeopt.records), searches learn from them
(treeopt.pooled), and drift is separated and reported (treeopt.drift)."""
import copy
import json
import random

import numpy as np
import pytest
from conftest import SHIPPED_CPU_PROFILE, run_cli
from test_cli import assert_bad, treeopt

from treeopt import distill, pooled, records, tiny
from treeopt.acceptance import RECORD_TOPK, unpack_records
from treeopt.batch import BatchDecoder
from treeopt.drift import drift, lines
from treeopt.evaluation import decode_phase
from treeopt.paths import SHIPPED
from treeopt.runtime import Decoder
from treeopt.search.batch import flat_step
from treeopt.search.hybrid import replay_predict
from treeopt.sources import CACHE_MAX_NGRAM, SuffixCache
from treeopt.tree import Node, Tree

MODEL = "SmolLM2-135M-Instruct"


@pytest.mark.parametrize("name", ["llama", "qwen2"])
def test_run_records_equal_accept_records(name):
    """A greedy run's records at its steps are the rows `accept` measures at the same
    positions (teacher-forced ranks, lookup match and run, the cache's match, run and
    agreement with lookup, the prompts in the same order); batched runs record the
    same; and the tree replayed over its own steps makes exactly the measured
    tokens/step."""
    lm = tiny.tiny_model(name)
    rng = random.Random(1)
    pt = tiny.random_prompt_tokens(lm, 3)
    for i in range(4):
        tree = tiny.random_tree(rng, 3, 6, 10)
        prompts = [[rng.randrange(32) for _ in range(n)] for n in (5, 20)]
        prompts.append((prompts[0] * 4)[:12])  # lookup proposes
        cache = None
        if i % 2:
            tree.lookup = tiny.random_lookup(rng, tree)
            tree.cache = tiny.random_lookup(rng, tree, CACHE_MAX_NGRAM)
            cache = SuffixCache(10**5)  # the references, every 5th token wrong
            for p in prompts:
                ref = Decoder(lm).hf_generate(p, 40).output_ids
                cache.add([(t + (j % 5 == 4)) % 32 for j, t in enumerate(ref)])
        before = copy.deepcopy(cache)
        dec = Decoder(lm, pt, tree, cache)
        results = [dec.ppd(p, 40) for p in prompts]
        if cache is not None:  # the cache's records, as `accept` measures them
            samples = [distill.Sample(p + r.output_ids, len(p), None, None)
                       for p, r in zip(prompts, results)]
            offered = distill.cache_offers(samples, copy.deepcopy(before),
                                           *records.settings(tree.lookup))
            bounds = np.cumsum([0] + [len(x.ids) - x.prompt_len - 1 for x in samples])
        compared = 0
        for p, r in zip(prompts, results):
            sample = distill.Sample(p + r.output_ids, len(p), None, None)
            ranks, _ = distill.measure_ranks(lm, [sample], dec.table, RECORD_TOPK, quiet=True)
            match, won = distill.lookup_offers([sample], *records.settings(tree.lookup))
            part = records.of_result(p, r, 3, *records.settings(tree.lookup))
            rows = part["context"] - len(p)  # the step's insertion point t, from t = P − 1
            assert len(rows) == len(r.accepted) - 1  # every full step
            assert (match[rows] == part["match"]).all() and (won[rows] == part["won"]).all()
            seen = part["ranks"] >= 0
            assert (ranks.numpy()[rows][seen] == part["ranks"][seen]).all()
            compared += int(seen.sum())
            if cache is not None:
                at = bounds[prompts.index(p)] + rows
                for key, got in zip(("cache_match", "cache_won", "agree"), offered):
                    assert (got[at] == part[key]).all(), key
        assert compared > 20
        settings = cache.settings() if cache is not None else None
        block = records.of_run(lm.model_id, 3, prompts, results, tree.lookup, settings)
        rec = unpack_records(block)
        assert all(rec["stepwise"]) and block["source"] == "run"
        rep = replay_predict(tree, rec, flat_step, follow=True)
        phase = decode_phase([(len(p), r) for p, r in zip(prompts, results)])
        assert rep["steps"] == phase["steps"]
        assert rep["tokens_per_step"] == pytest.approx(phase["tokens_per_step"], abs=1e-4)
        batched = BatchDecoder(lm, pt, {1: tree}, copy.deepcopy(before)).generate(
            prompts, 40, max_batch=1).results
        brec = unpack_records(records.of_run(lm.model_id, 3, prompts, batched, tree.lookup,
                                             settings))
        for key in ("ranks", "match", "won", "state") + (
                ("cache_match", "cache_won", "agree") if cache is not None else ()):
            assert np.array_equal(brec[key], rec[key]), key


def _part(n, hits, ctx, state=1):
    """n records of one prompt: depth-1 guess right in the first `hits`, lookup silent."""
    ranks = np.full((n, 1), RECORD_TOPK)
    ranks[:hits, 0] = 0
    z = np.zeros(n, dtype=np.int64)
    return {"ranks": ranks, "match": z, "won": z, "state": np.full(n, state),
            "context": np.full(n, ctx)}


def _chain_tree():
    return Tree(1, 1, {1: [Node((0,), 1)]}, 1)


def test_pooling_weights_by_positions():
    """Pooled: every recorded position counts once (marginals, mean context), and the
    replay over the pool is the sum of the replays over its parts."""
    a = pooled.as_acceptance(MODEL, 1, [_part(100, 80, 100)], [False], prompt_file="a")
    b = pooled.as_acceptance(MODEL, 1, [_part(200, 40, 500), _part(100, 20, 500)],
                             [True, True], run="bench")
    both = pooled.pool([a, b], ["a.json", "b.run.json"])
    assert both["positions"] == [400]
    assert both["accuracy"][0][0] == pytest.approx((80 + 40 + 20) / 400)
    assert both["mean_context"] == (100 * 100 + 300 * 500) // 400
    assert both["pooled"] == ["a.json", "b.run.json"]
    tree = _chain_tree()
    parts = [replay_predict(tree, unpack_records(x), flat_step) for x in (a, b)]
    whole = replay_predict(tree, unpack_records(both), flat_step)
    assert whole["steps"] == sum(p["steps"] for p in parts)
    tokens = sum(p["tokens_per_step"] * p["steps"] for p in parts)
    assert whole["tokens_per_step"] == pytest.approx(tokens / whole["steps"], abs=1e-5)
    # stepwise: one record a step, whatever it accepted; contiguous: a hit skips a position
    assert parts[1]["steps"] == 300 and parts[0]["steps"] == 100 - 40


def test_pool_refuses_mismatched_sources():
    a = pooled.as_acceptance(MODEL, 1, [_part(10, 5, 10)], [True])
    b = pooled.as_acceptance("vicuna-7b-v1.3", 1, [_part(10, 5, 10)], [True])
    with pytest.raises(Exception, match="model"):
        pooled.pool([a, b], ["a", "b"])
    c = dict(a)
    c.pop("lookup")
    with pytest.raises(Exception, match="no per-position records"):
        pooled.pool([a, c], ["a", "c"])


@pytest.mark.parametrize("text,speed,model,expect", [
    (0.149, 1.249, 0.049, []),
    (0.151, 1.0, 0.0, ["text drift"]),
    (-0.151, 1.0, 0.0, ["text drift"]),
    (0.0, 1.251, 0.0, ["speed drift"]),
    (0.0, 0.749, 0.0, ["speed drift"]),
    (0.0, 0.751, 0.0, []),
    (0.0, 1.0, 0.051, ["model error"]),
    (0.2, 1.3, -0.06, ["text drift", "model error", "speed drift"]),
])
def test_drift_lines_exactly_beyond_their_thresholds(text, speed, model, expect):
    """Hand-made records: the chain tree takes 2 tokens on a hit, 1 on a miss; half hit,
    so the replay makes 1.5 tokens/step. The prediction, the measured figure and the
    speed are set to land each drift just inside or just beyond its threshold."""
    block = pooled.as_acceptance(MODEL, 1, [_part(40, 20, 64)], [True])
    measured = {"tokens_per_step": 1.5 * (1 + model), "tokens_per_second": 1.0,
                "steps": 40}
    d = drift(_chain_tree(), block, measured, {"tokens_per_step": 1.5 / (1 + text)}, None,
              speed)
    assert d["replayed"]["tokens_per_step"] == pytest.approx(1.5)
    assert d["text"] == pytest.approx(text, abs=1e-4)
    assert d["model"]["tokens_per_step"] == pytest.approx(model, abs=1e-4)
    assert d["speed"] == pytest.approx(speed - 1, abs=1e-4)
    got = lines(d, "r.run.json", "acc.json", "prof.json", " --model m")
    assert [ln.split(":")[0] for ln in got] == expect
    for ln in got:
        assert "\n" not in ln
        if ln.startswith("text drift"):
            assert "`treeopt search --model m --acceptance r.run.json --sources ppd,lookup`" in ln
            assert "acc.json" in ln
        if ln.startswith("speed drift"):
            assert "prof.json" in ln and "`treeopt profile --model m`" in ln


def test_drift_model_error_at_run_speed_with_a_profile():
    """With a profile, tokens/s at the run's speed: a run measured at exactly the
    replay's step times scaled by its speed has no model error."""
    from test_bench import synthetic_profile

    prof = synthetic_profile()
    prof["model"] = MODEL
    block = pooled.as_acceptance(MODEL, 1, [_part(40, 20, 64)], [True])
    tree = _chain_tree()
    rep = drift(tree, block, {"tokens_per_step": 1.5, "tokens_per_second": 1.0,
                              "context": 64, "steps": 40}, None, prof, 1.0)["replayed"]
    d = drift(tree, block, {"tokens_per_step": 1.5, "context": 64, "steps": 40,
                            "tokens_per_second": rep["tokens_per_second"] / 1.6},
              None, prof, 1.6)
    assert d["model"]["tokens_per_second_at_run_speed"] == pytest.approx(0, abs=1e-3)
    assert "text" not in d


def _run_file(path, block=None, **extra):
    run = {"schema": "treeopt.run/1", "kind": "bench", **extra}
    if block is not None:
        run["acceptance"] = block
    path.write_text(json.dumps(run))
    return path


def _hand_made_run(tmp_path, n=60):
    """A run block of the embedded model: three prompt-token depths, lookup runs."""
    rng = np.random.default_rng(0)
    parts = []
    for _ in range(4):
        ranks = rng.choice([0, 1, RECORD_TOPK], size=(n, 3), p=[0.4, 0.1, 0.5])
        match = rng.integers(0, 4, n)
        won = np.where(match > 0, rng.integers(0, 8, n), 0)
        parts.append({"ranks": ranks, "match": match, "won": won, "state": np.full(n, 3),
                      "context": np.full(n, 200)})
    return pooled.as_acceptance(MODEL, 3, parts, [True] * 4, run="bench",
                                prompt_file="mine.jsonl")


def test_search_learns_from_a_run_and_refuses_bad_ones(tmp_path):
    """`search --acceptance RUN` searches on the run's records (alone or pooled with the
    shipped acceptance file); a corrupt run, one of another model or one without records
    is one line, exit 2."""
    block = _hand_made_run(tmp_path)
    run = _run_file(tmp_path / "mine.run.json", block)
    out = tmp_path / "t.tree.json"
    p = treeopt("search", "--json", "--acceptance", run, "--profile", SHIPPED_CPU_PROFILE,
                "--sources", "ppd,lookup", "--out", out)
    assert p.returncode == 0, p.stderr
    meta = json.loads(out.read_text())["meta"]
    assert meta["acceptance"].endswith("mine.run.json") and "replayed" in meta
    shipped = SHIPPED / f"{MODEL}.acceptance.json"
    p = treeopt("search", "--json", "--acceptance", shipped, "--acceptance", run, "--profile",
                SHIPPED_CPU_PROFILE, "--out", tmp_path / "pooled.tree.json")
    assert p.returncode == 0, p.stderr
    assert " + " in json.loads(p.stdout)["acceptance"]
    foreign = dict(block, model="vicuna-7b-v1.3")
    assert_bad(run_cli("search", "--acceptance", _run_file(tmp_path / "f.json", foreign),
                       "--profile", SHIPPED_CPU_PROFILE), "vicuna-7b-v1.3")
    bad = json.loads(json.dumps(block))
    bad["lookup"]["records"]["ranks"] = "!!not base64!!"
    assert_bad(run_cli("search", "--acceptance", _run_file(tmp_path / "c.json", bad)),
               "malformed")
    bad = json.loads(json.dumps(block))
    bad["lookup"]["records"]["stepwise"] = "yes"
    assert_bad(run_cli("search", "--acceptance", _run_file(tmp_path / "s.json", bad)),
               "stepwise")
    assert_bad(run_cli("search", "--acceptance", _run_file(tmp_path / "e.json")),
               "holds no records")
    many = ["--acceptance", str(run)] * 33
    assert_bad(run_cli("search", *many), "acceptance sources 33 outside 1..32")


def test_batched_replay_charges_a_shared_step_its_longest_input():
    """At B > 1 the records that shared a batched forward pay one step time at the
    longest input among them (the runtime pads to it)."""
    from treeopt.search.hybrid import replay_batch
    from treeopt.tree import Lookup

    tree = _chain_tree()
    tree.lookup = Lookup(3, 16, {(1, 1): (2, 1, 1)})  # a 2-token chain where n = 1
    part = _part(4, 0, 64)
    part["match"] = np.array([1, 0, 1, 0])
    block = pooled.as_acceptance(MODEL, 1, [part], [True])
    rec = unpack_records(block)
    base = tree.input_length(1)
    lat = lambda L: np.maximum(np.asarray(L, dtype=float), 1.0)  # noqa: E731  t(L) = L
    alone = replay_batch(tree, rec, lat, [0, 1, 2, 3])
    assert alone["step_seconds"] == pytest.approx((2 * (base + 4) + 2 * base) / 4)
    assert alone == replay_predict(tree, rec, lat, follow=True)
    paired = replay_batch(tree, rec, lat, [0, 0, 1, 1])  # each pair: one long, one short
    assert paired["step_seconds"] == pytest.approx(base + 4)
    assert paired["tokens_per_step"] == alone["tokens_per_step"] == 1.0
