"""Serving-engine exports: each release's rules (no engine installed), the engines' draft
rules replayed, the K(B) optimiser, and `search --export vllm|sglang|trtllm`."""
import json
import random

import pytest
from conftest import run_cli

from treeopt import drafts, engines, serving
from treeopt import latency as prof_mod
from treeopt.artefact import write_json
from treeopt.errors import BadInput
from treeopt.export import load_tree


# ---- the rules ------------------------------------------------------------------------
def vllm(**kw):
    return {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_min": 1,
            "prompt_lookup_max": 3, **kw}


@pytest.mark.parametrize("setting, words", [
    (vllm(speculative_tokens=3), "unknown key 'speculative_tokens'"),
    (vllm(num_speculative_tokens="4"), "must be a integer"),
    (vllm(num_speculative_tokens=0), "outside 1.."),
    (vllm(prompt_lookup_min=4), "prompt_lookup_min must be ≤"),
    (vllm(suffix_decoding_max_tree_depth=8), "does not belong to method ngram"),
    (vllm(num_speculative_tokens_per_batch_size=[[2, 4, 3]]), "must start at 1"),
    (vllm(num_speculative_tokens_per_batch_size=[[1, 4, 3], [4, 8, 1]]), "non-overlapping"),
    (vllm(num_speculative_tokens_per_batch_size=[[1, 4, 5]]), "outside 0..4"),
    (vllm(num_speculative_tokens_per_batch_size=[[1, 4]]), "is not [lo, hi, K]"),
    (vllm(num_speculative_tokens_per_batch_size=[[3, 2, 1]]), "lo ≤ hi"),
])
def test_vllm_rules_refuse_what_vllm_refuses(setting, words):
    with pytest.raises(BadInput, match=words.replace("[", r"\[").replace("(", r"\(")):
        engines.check("vllm", "0.34.0", setting)


def trt(**kw):
    return {"decoding_type": "NGram", "max_draft_len": 4, "max_matching_ngram_size": 2,
            "is_keep_all": True, "is_use_oldest": True, "is_public_pool": True, **kw}


@pytest.mark.parametrize("version, setting, words", [
    ("1.2.1", trt(draft_len_schedule={2: 4, 8: 1}), "needs key 1"),
    ("main", trt(draft_len_schedule={2: 3, 8: 1}), r"\[2\] must equal max_draft_len"),
    ("main", trt(draft_len_schedule={2: 4, 8: 5}), "outside 0..4"),
    ("1.2.1", trt(is_keep_all="yes"), "must be a boolean"),
    ("1.2.1", trt(max_concurrency=8), "unknown key"),
    ("1.2.1", trt(decoding_type="Medusa"), "decoding_type must be NGram"),
])
def test_tensorrt_llm_rules_follow_the_release(version, setting, words):
    with pytest.raises(BadInput, match=words):
        engines.check("trtllm", version, setting)
    good = trt(draft_len_schedule={1: 4, 8: 1})
    engines.check("trtllm", "1.2.1", good)
    engines.check("trtllm", "main", trt(draft_len_schedule={2: 4, 8: 1}))


def test_sglang_flags_refuse_clashes_and_unknown_names():
    ok = {"speculative-algorithm": "NGRAM", "speculative-num-draft-tokens": 4,
          "speculative-ngram-max-bfs-breadth": 4}
    engines.check("sglang", "0.5.23", ok)
    for extra, words in (({"speculative-adaptive": True}, "EAGLE with topk 1"),
                         ({"speculative-eagle-topk": 2}, "clashes with NGRAM"),
                         ({"speculative-ngram-match": "BFS"}, "unknown key"),
                         ({"speculative-ngram-match-type": "DFS"}, "BFS or PROB"),
                         ({"speculative-ngram-min-bfs-breadth": 8}, "min BFS breadth")):
        with pytest.raises(BadInput, match=words):
            engines.check("sglang", "0.5.23", {**ok, **extra})
    assert engines.flags(ok)[:2] == ["--speculative-algorithm", "NGRAM"]


def test_unknown_engines_and_versions_are_named():
    assert engines.check_version("vllm", None) == "0.34.0"
    with pytest.raises(BadInput, match="knows the rules of 0.34.0 only"):
        engines.check_version("vllm", "0.20.0")
    with pytest.raises(BadInput, match="unknown engine"):
        engines.check_version("lmdeploy", None)


@pytest.mark.parametrize("engine, version", [("vllm", "0.34.0"), ("trtllm", "1.2.1"),
                                             ("trtllm", "main")])
def test_a_schedule_gives_each_measured_batch_size_its_k(engine, version):
    """K(B) → the release's field → the K the engine takes at each B (its own semantics:
    vLLM's dense lookup with carried gaps, lower or upper bounds): the same K(B)."""
    rng = random.Random(5)
    for _ in range(200):
        sizes = sorted(rng.sample([1, 2, 3, 4, 6, 8, 12, 16, 32, 64, 128, 256], rng.randint(1, 6)))
        top = rng.randint(1, 8)
        ks = {b: rng.randint(0, top) for b in sizes}
        ks[sizes[0]] = top  # TensorRT-LLM: the smallest key carries max_draft_len
        sched, _ = engines.schedule_from(engine, version, ks)
        setting = vllm(num_speculative_tokens=top, **sched) if engine == "vllm" else \
            trt(max_draft_len=top, **sched)
        engines.check(engine, version, setting)
        assert {b: engines.k_at(engine, version, setting, b) for b in sizes} == ks
        below = engines.k_at(engine, version, setting, 1)  # below the first measured B
        assert below == ks[sizes[0]]
    text = engines.render("trtllm", "main", trt(draft_len_schedule={4: 4, 8: 0}), ["x"])
    assert text.splitlines()[:3] == ["# x", "speculative_config:", "  decoding_type: NGram"]


def test_the_vllm_file_holds_only_what_vllm_reads():
    s = vllm(num_speculative_tokens_per_batch_size=[[1, 4, 4], [5, 8, 0]])
    assert json.loads(engines.render("vllm", "0.34.0", s, ["never in the file"])) == s


def test_optional_validation_by_the_engines_own_code():
    """Where vLLM is installed, its own schedule builder takes what treeopt writes."""
    utils = pytest.importorskip("vllm.v1.spec_decode.dynamic.utils",
                                reason="vLLM is not installed (treeopt does not need it)")
    ranges, _ = engines.schedule_from("vllm", "0.34.0", {1: 4, 2: 4, 4: 2, 8: 0})
    dense = utils.build_dynamic_sd_schedule_lookup(
        ranges["num_speculative_tokens_per_batch_size"], 16, 4)
    s = vllm(**ranges)
    assert [engines.k_at("vllm", "0.34.0", s, b) for b in range(1, 17)] == dense[1:]


# ---- the draft rules ------------------------------------------------------------------
def test_vllm_ngram_takes_the_longest_window_and_its_rightmost_match():
    p = drafts.VllmNgram(2, 3)
    p.start([1, 2, 3, 9, 1, 2, 3, 7, 8, 5, 2, 3])
    assert p.draft(3) == [7, 8, 5]  # [5 2 3] never occurred; [2 3]: its rightmost match
    p.extend([4])
    assert p.draft(2) == []  # [3 4] never occurred; a 1-gram is below min 2
    q = drafts.VllmNgram(1, 3)
    q.start([1, 2, 3, 9, 1, 2, 3, 7, 8, 5, 2, 3, 4])
    assert q.draft(2) == []  # [4] never occurred before
    q.extend([9])
    assert q.draft(2) == [1, 2]


def test_tensorrt_llm_pool_gives_the_oldest_match_and_shares_it_across_requests():
    p = drafts.TrtNgram(max_ngram=2, k=3, public=True)
    p.start([5, 6, 7, 8, 5, 6, 1, 2, 5, 6])
    assert p.draft(3) == [7, 8, 5]  # the oldest continuation of [5 6]
    p.start([9, 5, 6])  # a new request: the public pool remembers
    assert p.draft(3) == [7, 8, 5]
    private = drafts.TrtNgram(max_ngram=2, k=3, public=False)
    private.start([5, 6, 7, 5, 6])
    assert private.draft(3) == [7, 5, 6]
    private.start([9, 5, 6])
    assert private.draft(3) == []  # a private pool: the earlier request is gone


def test_sglang_trie_grows_after_steps_and_drafts_breadth_first():
    p = drafts.SglangTrie(depth=4, min_breadth=1, max_breadth=4)
    p.start([1, 2, 3])
    assert p.draft(3) == {}  # the prompt is never inserted
    p.extend([1, 2, 4])  # inserted: the last 4 tokens, [3 1 2 4] and its suffixes
    p.extend([1, 2])  # ... [2 4 1 2]
    tree = p.draft(3)
    assert 4 in tree and drafts.accepted(tree, [4, 1]) >= 1
    assert sum(1 for _ in _nodes(tree)) <= 3


def _nodes(tree):
    for tok, sub in tree.items():
        yield tok
        yield from _nodes(sub)


def test_a_replay_counts_full_steps_and_accepted_drafts():
    text = [(list(range(10)), [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 0, 1, 2])]
    got = drafts.replay(drafts.VllmNgram(1, 2), text, 3)
    # after a[0] = 0: [0] occurred at 0 → drafts 1 2 3, all right: 4 a step
    assert got["tokens_per_step"] == 4.0 and got["steps"] == 3
    assert drafts.replay(drafts.VllmNgram(1, 2), text, 0)["tokens_per_step"] == 1.0


# ---- the optimiser --------------------------------------------------------------------
def batch_profile(growth: float):
    """t(B, L) = 10 ms · (1 + growth · B · L / 64): the bigger B·L, the dearer a token."""
    pts = [{"context": c, "size": s, "batch": b, "median_s": 0.01 * (1 + growth * b * s / 64),
            "p10_s": 0.0, "p90_s": 0.0, "n": 3}
           for c in (64, 1024) for s in (1, 2, 4, 8, 16) for b in (1, 2, 4, 8, 16, 32)]
    return {"schema": prof_mod.SCHEMA, "model": "m", "dtype": "float16", "simulated": True,
            "device": {"kind": "gpu", "name": "x"}, "points": pts}


def test_k_falls_with_the_batch_size_where_the_profile_says_so():
    table = {0: 1.0, **{k: 1 + 0.6 * (1 - 0.5 ** k) / 0.5 for k in range(1, 9)}}
    sizes = [1, 2, 4, 8, 16, 32]
    flat = serving.tune("vllm", "0.34.0", "lookup", {"a": table}, {"a": {
        "prompt_lookup_min": 1, "prompt_lookup_max": 3}}, batch_profile(0.0), sizes, 256)
    assert set(flat["draft_tokens"].values()) == {8}  # free tokens: the longest draft
    steep = serving.tune("vllm", "0.34.0", "lookup", {"a": table}, {"a": {
        "prompt_lookup_min": 1, "prompt_lookup_max": 3}}, batch_profile(4.0), sizes, 256)
    ks = [steep["draft_tokens"][b] for b in sizes]
    assert ks == sorted(ks, reverse=True) and ks[0] > ks[-1] == 0, ks
    engines.check("vllm", "0.34.0", steep["setting"])
    # brute force: each K is the best of 0..8 at its batch size
    for row in steep["rows"]:
        b = row["batch"]
        lat = prof_mod.Latency(batch_profile(4.0), batch=b)
        ctx = serving.batch_context(256, b)
        speed = {k: table[k] / float(lat([1 + k], ctx)[0]) for k in table}
        best = max(speed, key=speed.get)
        assert speed[row["draft_tokens"]] >= speed[best] / (1 + serving.BATCH_MIN_GAIN) - 1e-12
    trt = serving.tune("trtllm", "main", "cache", {"a": table}, {"a": {
        "max_matching_ngram_size": 2}}, batch_profile(4.0), sizes, 256)
    engines.check("trtllm", "main", trt["setting"])
    assert trt["setting"]["max_draft_len"] == trt["draft_tokens"][1]
    sgl = serving.tune("sglang", "0.5.23", "cache", {"a": {0: 1.0, 3: 1.5, 7: 1.7}}, {"a": {
        "speculative-ngram-max-bfs-breadth": 4}}, batch_profile(0.0), sizes, 256)
    assert sgl["setting"]["speculative-num-draft-tokens"] == 8
    none = serving.tune("vllm", "0.34.0", "lookup", {"a": {0: 1.0, 1: 1.01}}, {"a": {
        "prompt_lookup_min": 1, "prompt_lookup_max": 3}}, batch_profile(2.0), sizes, 256)
    assert none["setting"] is None and set(none["draft_tokens"].values()) == {0}


# ---- the verb -------------------------------------------------------------------------
@pytest.fixture
def small_acceptance(tmp_path):
    """The shipped acceptance file, its sample cut to 2 prompts × 24 tokens (the answers
    the export replays over)."""
    from treeopt import paths

    obj = json.loads((paths.SHIPPED / "SmolLM2-135M-Instruct.acceptance.json").read_text())
    obj.update(prompts=2, max_new_tokens=24)
    write_json(tmp_path / "acc.json", obj)
    return tmp_path / "acc.json"


@pytest.mark.slow
def test_search_exports_each_engine_and_its_chain(tmp_path, small_acceptance, monkeypatch):
    monkeypatch.setenv("TREEOPT_DEVICE_ID", "cpu-amd-epyc-avx512bf16-2c")
    out = tmp_path / "t.tree.json"
    for engine, suffix in (("vllm", "json"), ("trtllm", "yaml"), ("sglang", "yaml")):
        r = run_cli("search", "--export", engine, "--acceptance", small_acceptance,
                    "--batch", "1,2,4", "--out", out, "--json")
        assert r.returncode == 0, r.stderr[-2000:]
        res = json.loads(r.stdout)["export"]
        assert [row["batch"] for row in res["per_batch"]] == [1, 2, 4]
        assert "own rule, replayed" in res["tuned_on"]["answers"]["method"]
        assert "not in" in res["tuned_on"]["timing"] and res["cannot_carry"]
        about = json.loads((tmp_path / f"t.{engine}.about.json").read_text())
        assert about["tuned_on"]["device_id"] == "cpu-amd-epyc-avx512bf16-2c"
        text = (tmp_path / f"t.{engine}.{suffix}").read_text()
        if res["setting"] is not None:
            engines.check(engine, res["version"], res["setting"])
        if engine == "vllm" and res["setting"] is not None:
            assert json.loads(text) == res["setting"]
            chain = load_tree(tmp_path / "t.vllm.chain.tree.json")
            assert set(chain.by_batch) == {1, 2, 4}
        if engine != "vllm":
            import yaml
            assert text.startswith("# treeopt") and isinstance(yaml.safe_load(text), dict)


def test_bad_export_input_is_one_line_and_writes_nothing(tmp_path, small_acceptance,
                                                         monkeypatch):
    monkeypatch.setenv("TREEOPT_DEVICE_ID", "cpu-amd-epyc-avx512bf16-2c")
    out = tmp_path / "t.tree.json"
    cases = [
        (["--export", "vllm", "--engine-version", "0.20"], "knows the rules of"),
        (["--engine-version", "0.34.0"], "go with --export"),
        (["--export", "sglang", "--draft-source", "lookup"], "one source only"),
        (["--export", "vllm", "--batch", "3"], "no points at batch size 3"),
        (["--export", "trtllm", "--static"], "drop --static"),
        (["--export", "vllm", "--model", "vicuna-7b", "--acceptance",
          small_acceptance], "is for SmolLM2"),
        (["--export", "vllm", "--model", "vicuna-7b"], "no lookup records"),
    ]
    for args, words in cases:
        r = run_cli("search", *args, *(["--out", out] if "--out" not in args else []))
        assert r.returncode == 2, (args, r.stderr)
        assert words in r.stderr and len(r.stderr.strip().splitlines()) == 1, (args, r.stderr)
        assert not list(tmp_path.glob("t.*")), args
    # an export's file that is one of the inputs (here its about file is the acceptance)
    clash = tmp_path / "u.vllm.about.json"
    clash.write_bytes(small_acceptance.read_bytes())
    r = run_cli("search", "--export", "vllm", "--acceptance", clash, "--out",
                tmp_path / "u.tree.json")
    assert r.returncode == 2 and "also an input" in r.stderr, r.stderr
    assert sorted(f.name for f in tmp_path.glob("u.*")) == ["u.vllm.about.json"]
