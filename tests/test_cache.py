"""The cache source: the suffix index against brute force, eviction, three sources merged
into one trie, the three-source search against brute force, corpus files refused."""
import base64
import itertools
import json
import random

import numpy as np
import pytest

from treeopt import corpus, tiny
from treeopt.paths import SHIPPED
from treeopt.runtime import Decoder
from treeopt.search import hybrid
from treeopt.sources import SuffixCache, cache_along, offers_along
from treeopt.tree import Lookup, Node, Tree

from conftest import SHIPPED_CPU_PROFILE, run_cli
from test_cli import assert_bad, treeopt


def brute_offer(docs: list[list[int]], context: list[int], lo: int, hi: int, chain: int,
                sample: int) -> tuple[int, list[int]]:
    """The cache's offer by scanning every document: the longest suffix of the context
    (lo..hi tokens) that occurs with a continuation, its `sample` most recent places,
    then the most common next token among the places still agreeing (ties: the most
    recent), token by token."""
    for n in range(min(hi, len(context)), lo - 1, -1):
        key = context[len(context) - n:]
        places = [(d, e) for d, ids in enumerate(docs) for e in range(n, len(ids))
                  if ids[e - n:e] == key]
        if not places:
            continue
        places = places[::-1][:sample]
        out: list[int] = []
        while places and len(out) < chain:
            nxt = [(d, e, docs[d][e + len(out)]) for d, e in places
                   if e + len(out) < len(docs[d])]
            if not nxt:
                break
            votes = {t: sum(1 for *_, u in nxt if u == t) for *_, t in nxt}
            tok = next(t for *_, t in nxt if votes[t] == max(votes.values()))
            out.append(tok)
            places = [(d, e) for d, e, t in nxt if t == tok]
        return n, out
    return 0, []


@pytest.mark.parametrize("seed", range(4))
def test_index_equals_brute_force(seed):
    rng = random.Random(seed)
    docs = [[rng.randrange(5) for _ in range(rng.randint(1, 60))] for _ in range(12)]
    cache = SuffixCache(10**6, 2, 5, 6, sample=4)
    for d in docs:
        cache.add(d)
    kept = [d for d in docs if len(d) >= 3]  # shorter documents have no indexed n-gram
    for _ in range(300):
        ctx = [rng.randrange(5) for _ in range(rng.randint(0, 9))]
        assert cache.offer(ctx) == brute_offer(kept, ctx, 2, 5, 6, 4), ctx


def test_eviction_keeps_the_cap_and_the_recent_text():
    rng = random.Random(7)
    cache = SuffixCache(200, 2, 4, 8)
    docs = [[rng.randrange(6) for _ in range(rng.randint(3, 70))] for _ in range(30)]
    for i, d in enumerate(docs):
        cache.add(d)
        assert cache.tokens <= 200
        kept = cache.documents()
        assert kept == docs[i + 1 - len(kept):i + 1]  # the most recent, oldest first
        fresh = SuffixCache(10**6, 2, 4, 8)
        for k in kept:
            fresh.add(k)
        for _ in range(20):  # the evicted text is gone from the index too
            ctx = [rng.randrange(6) for _ in range(rng.randint(2, 6))]
            assert cache.offer(ctx) == fresh.offer(ctx) == brute_offer(kept, ctx, 2, 4, 8, 32)
    big = list(range(500))
    cache.add(big)  # one document beyond the cap keeps its last 200 tokens
    assert cache.documents() == [big[-200:]] and cache.tokens == 200
    mem = cache.memory()
    assert mem["tokens"] == 200 and mem["bytes"] == 200 * 4 + 16 * sum(
        200 - n for n in (2, 3, 4))  # int32 tokens; per n-gram a hash and a place


def test_cache_along_walks_the_sequence():
    rng = random.Random(2)
    ids = [rng.randrange(4) for _ in range(50)]
    cache = SuffixCache(10**6, 2, 4, 5)
    cache.add([rng.randrange(4) for _ in range(80)])
    chains: list = []
    offers_along(ids, 10, 3, 5, chains)
    match, won, agree = cache_along(cache, ids, 10, chains)
    assert len(match) == len(chains) == len(ids) - 11
    for i, t in enumerate(range(9, len(ids) - 2)):
        n, chain = cache.offer(ids[:t + 2])
        truth = ids[t + 2:]
        ok = next((j for j, (a, b) in enumerate(zip(chain, truth)) if a != b),
                  min(len(chain), len(truth)))
        same = next((j for j, (a, b) in enumerate(zip(chain, chains[i])) if a != b),
                    min(len(chain), len(chains[i])))
        assert (match[i], won[i], agree[i]) == (n, ok, same)


@pytest.mark.parametrize("seed", range(6))
def test_three_sources_merge_into_one_trie(seed):
    """The plan book's trie is the union of the tree's guess paths, lookup's chain and the
    cache's chain (each cut to its policy's c): a recompute from the tokens, with no
    token twice under one parent."""
    rng = random.Random(seed)
    lm = tiny.tiny_model("llama")
    pt = tiny.random_prompt_tokens(lm, 3)
    tree = tiny.random_tree(rng, 3, 4, 10)
    tree.lookup = Lookup(3, 6, {(m, n): (rng.randint(1, 6), rng.choice([0, *tree.states]),
                                         rng.randint(0, 1))
                                for m in [0, *tree.states] for n in (1, 2, 3)})
    tree.cache = Lookup(8, 6, {(m, n): (rng.randint(1, 6), rng.choice([0, *tree.states]), 1)
                               for m in [0, *tree.states] for n in range(1, 9)})
    eng = Decoder(lm, pt, tree).engine()
    book, lay = eng.books[1], eng.layout
    for _ in range(20):
        m = rng.choice(sorted(tree.states))
        guesses = [rng.sample(range(6), 4) for _ in range(m)]
        chains = [[rng.randrange(6) for _ in range(6)] for _ in range(2)]
        if rng.random() < 0.5:  # the cache's chain starts as lookup's
            chains[1][:3] = chains[0][:3]
        offers = [(rng.randint(1, 3), chains[0]), (rng.randint(1, 8), chains[1])]
        key, extra = book.choose(m, guesses, offers)
        plan = book.plan(key)
        pool = {lay.x0_col: -1, **{lay.chain0 + i: t for i, t in enumerate(extra)},
                **{lay.guess0 + d * lay.width + r: t for d, row in enumerate(guesses)
                   for r, t in enumerate(row)}}
        got = {tuple(pool[p] for p in path[1:]) for path in plan.path_src[1:]}
        (c, _, k), (cc, _, kc) = (tree.lookup.policy[(m, offers[0][0])],
                                  tree.cache.policy[(m, offers[1][0])])
        want = {tuple(chains[0][:i]) for i in range(1, c + 1)} | \
            {tuple(chains[1][:i]) for i in range(1, cc + 1)}
        if k and kc:
            want |= {tuple(guesses[d][r] for d, r in enumerate(nd.path))
                     for nd in tree.states[m]}
        assert got == want
        assert len(got) == plan.n_nodes  # a trie: every path once


def _records(rng, n_pos, lengths):
    ranks = rng.integers(0, 4, (n_pos, 1))
    match = rng.choice([0, 1], n_pos, p=[0.5, 0.5])
    won = np.where(match > 0, rng.integers(0, 4, n_pos), 0)
    cmatch = rng.choice([0, 2], n_pos, p=[0.3, 0.7])
    cwon = np.where(cmatch > 0, rng.integers(0, 5, n_pos), 0)
    agree = np.where((match > 0) & (cmatch > 0), rng.integers(0, 3, n_pos), 0)
    return {"ranks": ranks, "match": match, "won": won, "lengths": lengths,
            "max_ngram": 1, "max_tokens": 4, "cache_match": cmatch, "cache_won": cwon,
            "agree": agree, "cache_max_ngram": 2, "cache_max_tokens": 4}


def test_three_source_search_matches_brute_force():
    """One state, one lookup entry and one cache entry: the search's cache policy (the
    lookup policy held) is the best of every policy, by brute force over the replay."""
    rng = np.random.default_rng(1)
    tree = Tree(1, 1, {1: [Node((0,), 1), Node((1,), 1)]}, 10)
    rec = _records(rng, 500, [200, 300])

    def lat(L):
        return 1.0 + 0.1 * np.asarray(L, dtype=float)

    look = {(1, 1): (2, 1, 1)}
    got = hybrid.hybrid(tree, rec, lat, 512, source=hybrid.Source(1, look))
    rp = hybrid.Replay.build(tree, rec)
    tau = hybrid._tau(tree, rec, lat)
    options = [None] + [(c, q, 1) for c in range(1, 5) for q in (0, 1)]
    rates = []
    for a, b in itertools.product(options, options):  # cache entries (1, 2) and (0, 2)
        policy = {k: v for k, v in (((1, 2), a), ((0, 2), b)) if v is not None}
        t, s, _ = rp.run(look, tau, cache_policy=policy)
        rates.append(t / s)
    assert got["hybrid"]["tokens_per_second"] == pytest.approx(max(rates), rel=1e-6)
    assert max(rates) > rates[0]  # the cache pays here, and the search found it
    # without a cache policy the replay is the two-source replay
    assert rp.run(look, tau, cache_policy={}) == rp.run(look, tau)


def test_replay_charges_each_chain_its_new_nodes():
    """By hand: a cache chain sharing two tokens with lookup's adds only the rest."""
    tree = Tree(1, 1, {1: [Node((0,), 1)]}, 10)
    rec = {"ranks": np.array([[5]]), "match": np.array([1]), "won": np.array([1]),
           "lengths": [1], "stepwise": [True], "max_ngram": 1, "max_tokens": 4,
           "cache_match": np.array([2]), "cache_won": np.array([3]), "agree": np.array([2]),
           "cache_max_ngram": 2, "cache_max_tokens": 4, "state": np.array([1])}
    rp = hybrid.Replay.build(tree, rec)
    tau = np.arange(64, dtype=float)
    charged: list = []
    tok, sec, steps = rp.run({(1, 1): (3, 0, 1)}, tau, charged=charged,
                             cache_policy={(1, 2): (4, 0, 1)})
    # tree input 1 + 1 node + 2 slots = 4; lookup: 3 new (no tree overlap); cache: 4 − 2
    assert tok == 4 and charged == [(0, tree.input_length(1) + 3 + 2)]


def _corpus_file(tmp_path, **change):
    from treeopt.models import load

    lm = load(None, "float32", "cpu")
    obj = corpus.make(lm.model_id, lm.tokenizer, [[1, 2, 3, 4], [5, 6, 7]], [{"text": "t"}])
    obj.update(change)
    path = tmp_path / "c.corpus.json"
    path.write_text(json.dumps(obj))
    return path, obj


@pytest.mark.parametrize("change,needle", [
    ({"ids": "!!"}, "ids are malformed"),
    ({"lengths": [4, 4]}, "ids hold 7 tokens, lengths add up to 8"),
    ({"ids": base64.b64encode(np.array([1, 2, 3, 4, 5, 6, 10**7], "<i4").tobytes()).decode()},
     "outside the model's vocabulary"),
    ({"schema": "treeopt.tree/1"}, "schema"),
    ({"model": "vicuna-7b"}, "is for vicuna-7b"),
    ({"tokenizer": {"fingerprint": "0" * 16, "vocab_size": 49152}}, "another tokenizer"),
])
def test_bad_corpus_is_refused_in_one_line(tmp_path, change, needle):
    path, _ = _corpus_file(tmp_path, **change)
    assert_bad(run_cli("run", "--corpus", str(path), "--max-new-tokens", "2"), needle)


@pytest.mark.slow
def test_corpus_verb_builds_and_run_uses_it(tmp_path):
    """`treeopt corpus --text` → a checked corpus; `run --corpus` decodes with it and
    records the cache's offers; bad slices are one line."""
    doc = tmp_path / "doc.txt"
    doc.write_text("The quick brown fox jumps over the lazy dog. " * 20)
    out = tmp_path / "mine.corpus.json"
    p = treeopt("corpus", "--text", str(doc), "--out", str(out), "--json")
    assert p.returncode == 0, p.stderr
    got = json.loads(p.stdout)
    assert got["documents"] == 1 and got["tokens"] > 100
    obj, docs = corpus.read(out)
    assert obj["sources"][0]["text"].endswith("doc.txt") and len(docs[0]) == got["tokens"]
    p = treeopt("run", "--corpus", str(out), "--prompt", "Repeat: the quick brown fox",
                "--max-new-tokens", "24", "--json", "--out", str(tmp_path / "r.json"))
    assert p.returncode == 0, p.stderr
    run = json.loads((tmp_path / "r.json").read_text())
    assert run["corpus"]["tokens"] == got["tokens"]
    assert "cache" in run["acceptance"]  # the cache's offers at every step
    assert_bad(run_cli("corpus", "--prompts", "mt-bench[5:2]"), "empty slice")
    assert_bad(run_cli("corpus"), "nothing to build from")
    # the tree pinned: one with cache chains (found as this device's after another test
    # searched one) would record the cache's offers even without a corpus
    p = treeopt("run", "--corpus", "none", "--prompt", "Hi", "--max-new-tokens", "12",
                "--tree", str(SHIPPED / "default__SmolLM2-135M-Instruct.tree.json"),
                "--json", "--out", str(tmp_path / "plain.json"))
    assert p.returncode == 0, p.stderr
    assert_bad(run_cli("search", "--sources", "ppd,cache", "--profile", SHIPPED_CPU_PROFILE,
                       "--acceptance", str(tmp_path / "plain.json"), "--out",
                       str(tmp_path / "t.json")), "has no cache records")
    assert_bad(run_cli("search", "--sources", "lookup,cache"), "give ppd and any of")


@pytest.mark.parametrize("args,needle", [
    (["run", "--cache-tokens", "0"], "--cache-tokens"),
    (["bench", "--cache-tokens", str(10**8)], "must be in 1..2000000"),
    (["accept", "--corpus", "/nonexistent.json"], "no such file"),
    (["corpus", "--prompts", "mt-bench", "--exclude", "nope.jsonl"], "no such file"),
])
def test_cache_flags_are_checked(args, needle):
    assert_bad(run_cli(*args), needle)
