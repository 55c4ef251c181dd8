"""Hybrid trees: lookup records, the replay, the per-state lookup search against brute
force, and losslessness on the real model."""
import itertools
import json
import random
import re

import numpy as np
import pytest

from treeopt import acceptance, search
from treeopt.search import hybrid
from treeopt.errors import BadInput
from treeopt.distill import Sample, lookup_offers
from treeopt.sources import PromptLookup, SuffixCache
from treeopt.tree import Lookup, Node, Tree

from conftest import SHIPPED_CPU_PROFILE, run_cli


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
    rp = hybrid.Replay.build(tree, rec)
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
    rp2 = hybrid.Replay.build(tree, rec2)
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

    got = hybrid.hybrid(tree, rec, lat, 512)
    rp = hybrid.Replay.build(tree, rec)
    tau = hybrid._tau(tree, rec, lat)
    options = [None] + [(c, q, keep) for c in range(1, 6) for q in (0, 1) for keep in (0, 1)]
    rates = []
    for a, b in itertools.product(options, options):  # entries (1, 1) and (0, 1)
        policy = {k: v for k, v in (((1, 1), a), ((0, 1), b)) if v is not None}
        t, s, _ = rp.run(policy, tau)
        rates.append(t / s)
    assert got["hybrid"]["tokens_per_second"] == pytest.approx(max(rates), rel=1e-6)
    assert max(rates) > rates[0]  # lookup pays on this instance, and the search found it


def test_ppd_sources_reproduce_the_ppd_tree(tmp_path):
    """--sources ppd writes the PPD-alone tree (no lookup): the one the shipped hybrid
    search compared its answer against (same step time; the hybrid may keep a smaller
    PPD part, since chains take input rows too)."""
    from test_cli import treeopt

    from treeopt.paths import SHIPPED

    prof = SHIPPED / "cpu-amd-epyc-avx512bf16-2c__SmolLM2-135M-Instruct__bfloat16.json"
    acc = SHIPPED / "SmolLM2-135M-Instruct.acceptance.json"
    p = treeopt("search", "--profile", prof, "--acceptance", acc, "--out", tmp_path / "a.json")
    assert p.returncode == 0, p.stderr
    a = json.loads((tmp_path / "a.json").read_text())
    shipped = json.loads((SHIPPED / "cpu-amd-epyc-avx512bf16-2c__SmolLM2-135M-Instruct__"
                          "bfloat16.tree.json").read_text())
    assert "lookup" not in a
    alone = shipped["meta"]["replayed"]["ppd_only"]
    assert a["meta"]["predicted"]["step_seconds"] == pytest.approx(alone["step_seconds"],
                                                                   rel=1e-3)
    assert a["meta"]["predicted"]["tokens_per_step"] == pytest.approx(
        alone["tokens_per_step"], abs=0.02)


def _shipped():
    from treeopt.artefact import read_json
    from treeopt.paths import SHIPPED

    return (read_json(SHIPPED / "SmolLM2-135M-Instruct.acceptance.json"),
            read_json(SHIPPED / "cpu-amd-epyc-avx512bf16-2c__SmolLM2-135M-Instruct__bfloat16.json"))


def test_lookup_chain_cap_is_a_cut_of_the_measured_chains():
    acc, _ = _shipped()
    full = acceptance.unpack_records(acc)
    cut = acceptance.unpack_records(acc, 3)
    assert cut["max_tokens"] == 3 and (cut["won"] == np.minimum(full["won"], 3)).all()
    assert (cut["match"] == full["match"]).all()
    with pytest.raises(BadInput, match=f"measured chains of 1..{full['max_tokens']} "):
        acceptance.unpack_records(acc, full["max_tokens"] + 1)


@pytest.mark.parametrize("mutate,needle", [
    (lambda lk: lk.update(max_tokens=0), "lookup chain length 0 outside 1..64"),
    (lambda lk: lk.update(max_ngram=10**9), "n-gram length 1000000000 outside 1..8"),
    (lambda lk: lk.update(max_tokens=True), "True is not an integer"),
    (lambda lk: lk["by_match"]["1"].update(share="x"), "share='x' outside [0, 1]"),
    (lambda lk: lk["by_match"]["2"].update(mean_accepted=-1), "mean_accepted must be"),
    (lambda lk: lk["by_match"]["3"]["accepted_at_least"].append(2), "accepted_at_least"),
    (lambda lk: lk["by_match"].update(x={}), "not a match length"),
    (lambda lk: lk["by_match"].update({"²": {}}), "not a match length"),
    (lambda lk: lk["by_match"].update({"9": {}}), "not a match length 0..3"),
])
def test_bad_lookup_blocks_are_refused(tmp_path, mutate, needle):
    from test_cli import assert_bad, treeopt

    acc, _ = _shipped()
    mutate(acc["lookup"])
    (tmp_path / "a.json").write_text(json.dumps(acc))
    with pytest.raises(BadInput, match=re.escape(needle)):
        acceptance.validate(acc)
    assert_bad(run_cli("report", "--acceptance", tmp_path / "a.json", "--out",
                       tmp_path / "r.html"), needle)


def test_joint_ppd_part_is_the_best_of_the_searched_candidates():
    """with_lookup screens smaller PPD parts and searches the lookup policy of the searched
    tree and the best other one: its choice is the better of those two full searches, never
    worse than the searched tree's own hybrid, and the solution it leaves is consistent."""
    acc, prof = _shipped()
    rec = acceptance.unpack_records(acc, 4)
    found = search.search(acc, prof, search.Options(), "t")
    cands = hybrid.ppd_candidates(found, 512)
    assert cands[0] is found["solution"] and len(cands) > 1
    assert all(max(c.input_lengths.values()) < max(cands[0].input_lengths.values())
               for c in cands[1:])
    lat = found["latency"]
    alone = hybrid.hybrid(cands[0].tree, rec, lat, 512)
    got = hybrid.with_lookup(found, rec, 512)
    assert got["ppd_part"]["screened"] == len(cands) and got["ppd_part"]["searched"] == 2
    assert got["hybrid"]["tokens_per_second"] >= alone["hybrid"]["tokens_per_second"]
    assert got["ppd_only"] == alone["ppd_only"]
    sol = found["solution"]
    assert {str(m): L for m, L in sol.input_lengths.items()} == \
        got["ppd_part"]["input_lengths"] == found["meta"]["predicted"]["input_lengths"]
    assert sol.tree.lookup is not None and sol.tree.lookup.max_tokens == 4
    again = hybrid.replay_predict(sol.tree, rec, lat)
    assert again["tokens_per_second"] == pytest.approx(got["hybrid"]["tokens_per_second"])
    best_other = max((hybrid.hybrid(c.tree, rec, lat, 512)["hybrid"]["tokens_per_second"]
                      for c in cands[1:]))
    assert got["hybrid"]["tokens_per_second"] >= 0.97 * best_other


def test_lookup_flags_are_checked():
    from test_cli import assert_bad, treeopt

    assert_bad(run_cli("search", "--lookup-chain", "4"), "--lookup-chain needs --sources")
    assert_bad(run_cli("search", "--sources", "ppd,lookup", "--lookup-chain", "32",
                       "--profile", SHIPPED_CPU_PROFILE), "measured chains of 1..")
    assert_bad(run_cli("search", "--sources", "ppd,lookup", "--lookup-chain", "99"),
               "must be in 1..64")
    assert_bad(run_cli("accept", "--lookup-chain", "0"), "--lookup-chain")
    assert_bad(run_cli("accept", "--lookup-ngram", "9"), "--lookup-ngram")


@pytest.mark.slow
def test_hybrid_lossless_on_the_real_model(smollm):
    """Real model, float32: long lookup and cache chains on input-grounded and chat
    prompts (where lookup, the cache and the guesses propose conflicting paths: the cache
    holds each reference answer with every 6th token wrong, then the answers themselves)
    stay token-identical to HF greedy."""
    from treeopt import prompts
    from treeopt.inputs import resolve_inputs
    from treeopt.prompt_tokens import PromptTokens
    from treeopt.runtime import Decoder

    inp = resolve_inputs(smollm.model_id, device="cpu", dtype="float32", want=("tree",))
    base = inp.tree
    # long chains, some without prompt tokens (state 0 follows), some without guess nodes
    policy = {(m, n): (8, (0, base.root_prompt_tokens)[n % 2], int(n != 3))
              for m in [0, *base.states] for n in (1, 2, 3)}
    cached = {(m, n): (6, (0, base.root_prompt_tokens)[n % 2], 1)
              for m in [0, *base.states] for n in range(2, 9)}
    tree = Tree(base.num_prompt_tokens, base.root_prompt_tokens, base.states, base.topk,
                lookup=Lookup(3, 8, policy), cache=Lookup(8, 6, cached))
    cache = SuffixCache()
    dec = Decoder(smollm, PromptTokens.load(inp.prompt_tokens), tree, cache)
    texts = prompts.load("input-grounded", 6) + prompts.load("mt-bench", 3, 40)
    encoded = [prompts.encode(smollm.tokenizer, t) for t in texts]
    refs = [dec.hf_generate(ids, 48).output_ids for ids in encoded]
    for ref in refs:
        cache.add([t + (i % 6 == 5) for i, t in enumerate(ref)])
    long_steps = 0
    for text, ids, ref in zip(texts, encoded, refs):
        res = dec.ppd(ids, 48)
        assert res.output_ids == ref, text[:40]
        long_steps += sum(a > 1 + tree.max_depth for a in res.accepted)
    two_chains = sum(len(k[1]) == 2 for k in dec.engine().books[1].plans)
    assert long_steps > 0 and two_chains > 0


@pytest.mark.slow
def test_bench_per_family_and_the_families_panel(tmp_path):
    """`bench --prompts A --prompts B` benches each set as a family in one run (hybrid, PPD
    alone, HF generate, HF prompt lookup); `report` shows them with the acceptance per
    source of each family's acceptance file."""
    from test_cli import treeopt

    from treeopt.paths import SHIPPED

    a, b = tmp_path / "copy.jsonl", tmp_path / "chat.jsonl"
    a.write_text(json.dumps({"prompt": "Repeat exactly: the red fox ran far, the red fox "
                                       "ran far, the red fox ran far."}) + "\n")
    b.write_text(json.dumps({"turns": ["Name two colours."]}) + "\n")
    run = tmp_path / "fam.run.json"
    p = treeopt("bench", "--json", "--prompts", str(a), "--prompts", str(b),
                "--tree", SHIPPED / "cpu-amd-epyc-avx512bf16-2c__SmolLM2-135M-Instruct__bfloat16.tree.json",
                "--profile", SHIPPED / "cpu-amd-epyc-avx512bf16-2c__SmolLM2-135M-Instruct__bfloat16.json",
                "--max-new-tokens", "12", "--hf-lookup", "4", "--no-baseline", "--out", run)
    assert p.returncode == 0, p.stderr
    out = json.loads(p.stdout)
    assert out["kind"] == "bench-families" and json.loads(run.read_text()) == out
    assert [r["family"] for r in out["families"]] == ["copy", "chat"]
    for r in out["families"]:
        assert r["prompts"] == 1 and r["unexplained_divergences"] == 0
        for key in ("tokens_per_step", "ppd_alone_tokens_per_step", "speedup_vs_hf",
                    "speedup_vs_hf_lookup", "speedup_vs_ppd_alone", "predicted"):
            assert key in r, key
        # the family's own records: the tree replayed over them is what was measured
        assert r["acceptance"]["source"] == "run" and r["acceptance"]["prompt_file"] == \
            str(a if r["family"] == "copy" else b)
        assert abs(r["drift"]["model"]["tokens_per_step"]) < 1e-3
    # a search learns from the run (both families pooled); a bench of that tree predicts
    # from the run it was searched with
    tree = tmp_path / "mine.tree.json"
    p = treeopt("search", "--json", "--acceptance", run, "--sources", "ppd,lookup",
                "--profile", SHIPPED / "cpu-amd-epyc-avx512bf16-2c__SmolLM2-135M-Instruct__bfloat16.json",
                "--out", tree)
    assert p.returncode == 0, p.stderr
    p = treeopt("bench", "--json", "--prompts", str(b), "--tree", tree, "--no-baseline",
                "--profile", SHIPPED / "cpu-amd-epyc-avx512bf16-2c__SmolLM2-135M-Instruct__bfloat16.json",
                "--max-new-tokens", "12", "--out", tmp_path / "other.run.json")
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout)["predicted"]["acceptance"].endswith("fam.run.json")
    acc = SHIPPED / "SmolLM2-135M-Instruct.acceptance.json"
    other = json.loads(acc.read_text())
    other["prompt_file"] = "<b>other-family</b>"
    (tmp_path / "other.json").write_text(json.dumps(other))
    html = tmp_path / "fam.html"
    p = treeopt("report", "--json", "--run", run, "--acceptance", acc, "--acceptance",
                tmp_path / "other.json", "--out", html)
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout)["sections"] == ["acceptance", "families", "drift"]
    text = html.read_text()
    assert "id='fig-families'" in text and "Acceptance per source" in text
    assert "&lt;b&gt;other-family&lt;/b&gt;" in text and "<b>other" not in text
    assert f"n ≤ 3, chain ≤ {other['lookup']['max_tokens']}" in text
    assert ">copy<" in text and ">chat<" in text


def test_bench_families_refuse_batch():
    from test_cli import assert_bad, treeopt

    assert_bad(run_cli("bench", "--prompts", "mt-bench", "--prompts", "gsm8k-train",
                       "--batch", "2"), "--batch benches one prompt set")
    assert_bad(run_cli("bench", "--prompts", "mt-bench", "--prompts", "mt-bench"),
               "given twice")
