"""The runtime choosing tree or plain while it decodes (treeopt.adapt): to plain within a
bounded number of steps where plain truly wins, the tree kept where it wins, the
exploration share within its bound, outputs identical to HF greedy throughout. Which
configuration wins is fixed by the test (the step costs it feeds the chooser), never by
this machine's clock."""
import json
import random

import pytest
import torch

from treeopt import adapt
from treeopt.batch import BatchDecoder
from treeopt.runtime import Decoder
from treeopt.tiny import random_prompt_tokens, random_tree, tiny_model
from treeopt.tree import Tree


class Costed(adapt.Chooser):
    """The chooser, fed step costs from a cost model instead of the clock: a tree step
    costs `tree` times a plain one (what a profile 2x too fast, or a wrong t(L) shape,
    hides until the run measures it)."""

    def __init__(self, tree: float):
        super().__init__()
        self.tree = tree

    def observe(self, b, name, seconds, tokens, length=None):
        return super().observe(b, name, 0.01 * b * (self.tree if name == "tree" else 1.0),
                               tokens, length)


def decode(tree_cost: float, batch: int = 1, seed: int = 2):
    lm = tiny_model("llama", torch.float32, "cpu")
    rng = random.Random(seed)
    pt = random_prompt_tokens(lm, 3)
    tree = random_tree(rng, 3, 6, max_nodes=8)
    prompts = [[rng.randrange(32) for _ in range(n)] for n in (5, 9, 7, 6)][:max(batch, 2)]
    dec = Decoder(lm, pt, tree)
    refs = [dec.hf_generate(p, 160).output_ids for p in prompts]
    bd = BatchDecoder(lm, pt, {1: tree}, adapt=True)
    bd.engine.chooser = Costed(tree_cost)
    res = bd.generate(prompts, 160, max_batch=batch)
    assert [r.output_ids for r in res.results] == refs  # lossless, whatever it chose
    return bd.engine.chooser, res


def test_plain_is_reached_within_bounded_steps_where_it_truly_wins():
    chooser, res = decode(tree_cost=4.0)  # a tree step costs 4 plain ones: plain wins
    sw = chooser.switches
    assert sw and sw[0]["to"] == "plain" and sw[0]["step"] <= 3 * adapt.MIN_SEEN * \
        adapt.EXPLORE_EARLY, sw
    after = res.configs[sw[0]["step"]:]
    assert after.count("plain") / len(after) >= 1 - 2 / adapt.EXPLORE - 0.02
    assert chooser.summary()["by_batch"]["1"]["using"] == "plain"


def test_the_tree_is_kept_where_it_wins_and_exploring_stays_within_its_share():
    chooser, res = decode(tree_cost=1.0)  # equal cost: every accepted guess is a gain
    assert not chooser.switches
    explored = res.configs.count("plain")
    early = adapt.MIN_SEEN * adapt.EXPLORE_EARLY
    assert explored <= adapt.MIN_SEEN + (len(res.configs) - early) / adapt.EXPLORE + 1
    assert "tree*" in res.configs  # the step after an exploring plain one is set apart


def test_batched_decoding_follows_the_same_rule():
    chooser, res = decode(tree_cost=4.0, batch=2)
    assert any(s["to"] == "plain" and s["batch"] == 2 for s in chooser.switches)


@pytest.mark.parametrize("flip", [False, True])
def test_the_rule_on_synthetic_evidence(flip):
    """The chooser alone: yields and costs given outright; it switches once the other
    configuration is faster beyond the margin, and back when that reverses."""
    c = adapt.Chooser()
    costs = {"tree": (1.5, 0.02), "plain": (1.0, 0.01)}  # tree 75 tok/s, plain 100
    picks = []
    for i in range(400):
        if flip and i == 100:
            costs["tree"] = (3.0, 0.02)  # now 150 tok/s: back to the tree
        name = c.pick(1)
        picks.append(name)
        e, t = costs[name]
        c.observe(1, name, t, e)
    assert c.switches[0]["to"] == "plain"
    assert (c.current[1] == "tree") == flip
    assert c.summary()["explored"] <= 2 * adapt.MIN_SEEN + 2 * 400 / adapt.EXPLORE


def test_a_smaller_tree_is_a_candidate_and_wins_where_it_is_fastest():
    """Three candidates on synthetic evidence: the big tree (slow), the smaller one and
    plain; the rule moves to the smaller tree, keeps both others measured, and the
    exploration share stays within its bound however many candidates there are."""
    c = adapt.Chooser()
    names = ("tree", "smaller", "plain")
    costs = {"tree": (1.6, 0.04), "smaller": (1.3, 0.011), "plain": (1.0, 0.01)}
    runs = []
    for _ in range(600):
        name = c.pick(1, names)
        runs.append(name)
        e, t = costs[name]
        c.observe(1, name, t, e)
    assert c.switches[0]["to"] == "smaller" and c.current[1] == "smaller"
    assert all(s["to"] != "plain" for s in c.switches)  # plain is 9 % slower: never chosen
    est = c.summary()["by_batch"]["1"]
    assert set(est) == {"using", *names} and est["using"] == "smaller"
    assert est["tree"]["steps"] >= adapt.MIN_SEEN and est["plain"]["steps"] >= adapt.MIN_SEEN
    tail = runs[300:]
    assert tail.count("tree") > 0 and tail.count("plain") > 0  # both kept measured
    assert (len(tail) - tail.count("smaller")) / len(tail) <= 2 / adapt.EXPLORE + 0.01


def test_a_clear_loser_is_explored_a_quarter_as_often():
    """A candidate slower than the incumbent by more than FAR is still measured, at
    1/FAR_EVERY of the exploring slots; a near one takes the others."""
    c = adapt.Chooser()
    names = ("tree", "smaller", "plain")
    costs = {"tree": (2.0, 0.02), "smaller": (1.5, 0.016), "plain": (1.0, 0.02)}  # 100, 94, 50
    runs = []
    for _ in range(1600):
        name = c.pick(1, names)
        runs.append(name)
        c.observe(1, name, costs[name][1], costs[name][0])
    tail = runs[400:]
    slots = len(tail) / adapt.EXPLORE
    assert not c.switches and c.current[1] == "tree"
    assert 0 < tail.count("plain") <= slots / adapt.FAR_EVERY + 1
    assert tail.count("smaller") >= slots * (1 - 1 / adapt.FAR_EVERY) - 1


def test_candidates_are_judged_beside_the_incumbents_own_steps():
    """Pairs, not windows: a candidate explored while the text is easy is compared with
    the incumbent's steps on that same text. A tree step after one that left no guesses
    (plain, chains alone) is set apart; the step after an explored one is no pair."""
    c = adapt.Chooser()
    names = ("tree", "chains", "plain")
    assert c.observe(1, "plain", 0.01, 1.0) == "plain"
    assert c.observe(1, "tree", 0.02, 1.0) == "tree*"  # from its root alone
    assert c.observe(1, "chains", 0.01, 1.0) == "chains"
    assert c.observe(1, "tree", 0.02, 1.0) == "tree*"
    c = adapt.Chooser()
    easy = True
    for i in range(800):  # stretches of easy and hard text: the tree wins on both, but its
        easy = (i // 50) % 2 == 0  # window on hard text is slower than chains on easy text
        name = c.pick(1, names)
        e = {"tree": 4.0 if easy else 1.0, "chains": 3.0 if easy else 1.0, "plain": 1.0}[name]
        t = {"tree": 0.02, "chains": 0.02 if easy else 0.025, "plain": 0.02}[name]
        c.observe(1, name, t, e)
    assert c.current[1] == "tree" and not c.switches  # tokens/s 200 vs 150, 50 vs 40
    assert c.summary()["by_batch"]["1"]["chains"]["vs_incumbent"] < 0


def test_the_engine_offers_the_schedules_smaller_tree():
    """A schedule {1: big tree, 4: small tree}: at B = 1 the engine offers the big tree,
    the small one and plain; with the big tree's steps made costly, the run moves to the
    small tree and its output stays HF generate's."""
    lm = tiny_model("llama", torch.float32, "cpu")
    rng = random.Random(4)
    pt = random_prompt_tokens(lm, 3)
    big, small = random_tree(rng, 3, 6, max_nodes=12), random_tree(rng, 3, 3, max_nodes=3)
    assert small.max_input_length < big.max_input_length
    prompt = [rng.randrange(32) for _ in range(7)]
    ref = Decoder(lm, pt, big).hf_generate(prompt, 200).output_ids
    bd = BatchDecoder(lm, pt, {1: big, 4: small}, adapt=True)
    assert list(bd.engine.candidates[1]) == ["tree", "smaller", "plain"]
    assert list(bd.engine.candidates[4]) == ["tree", "plain"]

    class Costly(adapt.Chooser):  # a big-tree step costs 5 plain ones; the small one 1
        def observe(self, b, name, seconds, tokens, length=None):
            return super().observe(b, name, 0.01 * (5.0 if name == "tree" else 1.0), tokens,
                                   length)

    bd.engine.chooser = Costly()
    res = bd.generate([prompt], 200)
    assert res.results[0].output_ids == ref
    assert {"tree", "smaller", "plain"} <= set(res.configs)
    assert bd.engine.chooser.current[1] in ("smaller", "plain")
    assert any(s["from"] == "tree" for s in bd.engine.chooser.switches)


def test_a_hybrid_trees_chains_alone_are_a_candidate():
    """A tree with prompt-lookup chains: the engine also offers its chains alone (no
    guesses, :meth:`Tree.chains_alone`); with the guesses' steps made costly the run moves
    to them or to plain, and every sequence of a batch stays HF generate's."""
    from treeopt.tiny import random_lookup

    lm = tiny_model("llama", torch.float32, "cpu")
    rng = random.Random(6)
    pt = random_prompt_tokens(lm, 3)
    tree = random_tree(rng, 3, 6, max_nodes=10)
    tree.lookup = random_lookup(rng, tree)
    alone = tree.chains_alone()
    assert alone.max_depth == 0 and alone.root_prompt_tokens == 1
    assert {n for _, n in alone.lookup.policy} == {n for _, n in tree.lookup.policy}
    base = [rng.randrange(32) for _ in range(6)]
    prompts = [(base * 4)[:14], (base * 3)[:11]]  # repeating: lookup proposes
    dec = Decoder(lm, pt, tree)
    refs = [dec.hf_generate(p, 120).output_ids for p in prompts]
    bd = BatchDecoder(lm, pt, {1: tree}, adapt=True)
    assert list(bd.engine.candidates[1]) == ["tree", "chains", "plain"]

    class Costly(adapt.Chooser):  # a step with guesses costs 5 plain ones
        def observe(self, b, name, seconds, tokens, length=None):
            return super().observe(b, name, 0.01 * (5.0 if name == "tree" else 1.0), tokens,
                                   length)

    bd.engine.chooser = Costly()
    res = bd.generate(prompts, 120, max_batch=2)
    assert [r.output_ids for r in res.results] == refs
    assert "chains" in set(res.configs)
    assert bd.engine.chooser.current[2] in ("chains", "plain")
    assert Tree.static([[0]], 3).chains_alone() is None


def test_a_runs_correction_is_found_by_the_next_run(monkeypatch):
    """A run that measures this machine 2x slower than the shipped profile keeps a
    corrected copy under $TREEOPT_HOME; the next run resolves it, predicts with it, and
    finds nothing more to correct; a second drift compounds on the first; your own
    measured profile is never overwritten."""
    import types

    from treeopt import paths
    from treeopt.inputs import resolve_inputs
    from treeopt.latency import Latency
    from treeopt.verbs.calibration import keep_correction

    monkeypatch.setenv("TREEOPT_DEVICE_ID", "cpu-amd-epyc-avx512bf16-2c")
    args = types.SimpleNamespace(profile=None)

    def found():
        return resolve_inputs(None, need=("profile",), dtype="bfloat16")

    first = found()
    assert first.profile_path.parent == paths.SHIPPED
    assert keep_correction(args, first, 2.0, 20, "run") is None  # too few steps
    assert keep_correction(args, first, 1.2, 64, "run") is None  # within the threshold
    assert "x2.00" in keep_correction(args, first, 2.0, 64, "run")
    second = found()
    assert second.profile_path.parent == paths.user_profiles()
    assert second.profile["corrected"]["ratio"] == 2.0
    assert Latency(second.profile)([8], 256)[0] == pytest.approx(
        2 * Latency(first.profile)([8], 256)[0])
    assert keep_correction(args, second, 1.1, 64, "run") is None
    keep_correction(args, second, 1.5, 64, "bench")
    third = found()
    assert third.profile["corrected"]["ratio"] == 3.0
    assert third.profile["corrected"]["from"] == first.profile_src
    # your own measured profile stays yours: the drift line says re-profile instead
    own = dict(first.profile)
    from treeopt.artefact import write_json
    write_json(third.profile_path, own)
    assert keep_correction(args, found(), 2.0, 64, "run") is None
    assert keep_correction(types.SimpleNamespace(profile="given.json"), first, 2.0, 64,
                           "run") is None  # a profile you gave is used as given


def test_a_correction_mends_a_wrong_t_of_L_shape():
    """Where a run measured two input lengths or more (the tree's steps and the adapting
    runtime's plain ones), the kept profile scales each point by its input length's
    ratio, interpolated over log L and the nearest one beyond the ends; one length
    measured, or too few steps at one, gives one ratio for the grid. A shape off beyond the
    threshold is corrected even where the run's overall ratio is within it."""
    from treeopt import calibrate

    prof = {"points": [{"batch": 1, "context": 256, "size": s, "median_s": 0.01 * s}
                       for s in (1, 2, 4, 8, 16, 32)], "overhead": {"per_step_s": 0.001}}
    by = {1: (1.0, 40), 16: (2.0, 20), 4: (5.0, 3)}  # L = 4: too few steps for its own
    new = calibrate.corrected(prof, "p.json", 1.2, 63, 0.25, "run", by)
    got = {p["size"]: p["median_s"] / (0.01 * p["size"]) for p in new["points"]}
    assert got[1] == pytest.approx(1.0) and got[16] == pytest.approx(2.0)
    assert got[32] == pytest.approx(2.0)  # beyond the last measured length: its ratio
    assert got[4] == pytest.approx(1.5)  # halfway in log L between 1 and 16
    assert new["overhead"]["per_step_s"] == pytest.approx(0.0012)  # the overall ratio
    assert new["corrected"]["by_input_length"] == {"1": 1.0, "16": 2.0}
    one = calibrate.corrected(prof, "p.json", 2.0, 63, 0.25, "run", {16: (2.0, 63)})
    assert all(p["median_s"] == pytest.approx(0.02 * p["size"]) for p in one["points"])
    assert "by_input_length" not in one["corrected"]
    flat = {1: (1.0, 40), 16: (1.1, 20)}
    assert calibrate.corrected(prof, "p.json", 1.05, 60, 0.25, "run", flat) is None
    assert calibrate.corrected(prof, "p.json", 1.05, 20, 0.25, "run", by) is None  # < 32


def test_speed_by_length_sums_to_the_runs_speed():
    """The per-length ratios rest on the same steps as the run's one ratio: their
    measured and profiled seconds add up to it."""
    from treeopt.evaluation import speed_by_length, speed_vs_profile, steps_vs_profile
    from treeopt.runtime import Result

    prof = {"schema": "treeopt.profile/1", "device": "cpu", "model": "m", "dtype": "float32",
            "points": [{"batch": 1, "context": c, "size": s, "median_s": 0.01 * s + 1e-5 * c}
                       for c in (0, 512) for s in (1, 4, 16)]}
    r = Result(output_ids=list(range(12)), steps=6, seconds=0.39, prefill_seconds=0.0,
               accepted=[1, 3, 1, 2, 1, 4], step_seconds=[0.02, 0.1, 0.02, 0.1, 0.03, 0.12],
               lengths=[1, 16, 1, 16, 1, 16], finish_reason="context")  # all 6 steps full
    by = steps_vs_profile([(10, r)], prof)
    assert set(by) == {1, 16} and sum(n for _, _, n in by.values()) == 6
    m, p = sum(v[0] for v in by.values()), sum(v[1] for v in by.values())
    assert speed_vs_profile([(10, r)], prof) == pytest.approx(m / p)
    assert speed_by_length([(10, r)], prof)[16][0] == pytest.approx(by[16][0] / by[16][1])


@pytest.mark.slow
def test_the_next_run_predicts_on_the_last_runs_text(tmp_path):
    """A greedy run keeps its records as the user's recent text (outside `profiles/`:
    the search never reads them); the next run also predicts on that text — the same
    prompt, so the same text: its tokens/step exactly — and a recent file that does not
    read is passed over, never an error."""
    import json

    from treeopt import paths
    from treeopt.inputs import resolve_inputs

    from conftest import run_cli

    env = {"TREEOPT_HOME": tmp_path, "TREEOPT_DEVICE_ID": "cpu-amd-epyc-avx512bf16-2c",
           "TREEOPT_CALIBRATE": "0"}
    args = ("run", "--dtype", "float32", "--max-new-tokens", "24", "--json")
    first = run_cli(*args, env=env)
    assert first.returncode == 0, first.stderr
    assert "predicted_on_recent_text" not in json.loads(first.stdout)
    kept = tmp_path / "recent" / "SmolLM2-135M-Instruct.acceptance.json"
    assert json.loads(kept.read_text())["source"] == "run"
    second = run_cli(*args, env=env)
    out = json.loads(second.stdout)
    recent = out["predicted_on_recent_text"]
    assert recent["acceptance"] == paths.display_path(kept)
    assert recent["error"]["tokens_per_step"] == pytest.approx(0, abs=1e-3)  # full steps
    assert abs(out["predicted"]["error"]["tokens_per_step"]) > 0.05  # the sample's: drift
    assert "on your last run's text" in second.stderr
    with pytest.MonkeyPatch.context() as mp:  # the search's acceptance is not the run's
        mp.setenv("TREEOPT_HOME", str(tmp_path))
        assert resolve_inputs(None, need=("acceptance",)).acceptance_src.startswith("profiles/")
    kept.write_text("{not json")
    third = run_cli(*args, env=env)
    assert third.returncode == 0 and "predicted_on_recent_text" not in json.loads(third.stdout)


def _grid(t, sizes=(1, 2, 4, 8, 16, 32), batches=(1, 2)):
    return [{"batch": b, "context": 256, "size": s, "median_s": b * t(s)}
            for b in batches for s in sizes]


def test_the_next_run_measures_the_lengths_its_correction_never_visited():
    """A correction rests on the input lengths its run visited; the next run measures the
    short profile's lengths outside them (and the visited end beside them), once. The
    machine may run at another speed now (1.5x here): the visited lengths keep the run's
    level, and the new ones get the shape measured against their anchor — a t(L) twice
    as steep beyond L = 8 doubles the points beyond it, every batch size alike. A run that
    recorded no lengths gets every size's shape against their median ratio."""
    from treeopt import calibrate

    prof = {"points": _grid(lambda s: 0.01 * s), "overhead": {"per_step_s": 0.001}}
    new = calibrate.corrected(prof, "p.json", 2.0, 64, 0.25, "run", {1: (1.0, 40), 8: (2.0, 20),
                                                                    4: (3.0, 2)})
    assert new["corrected"]["input_lengths"] == [1, 8]  # L = 4: too few steps
    assert calibrate.needs_points(new) == ([8], [16, 32])
    base = {p["size"]: p["median_s"] for p in new["points"] if p["batch"] == 1}

    def measured(s):  # now 1.5x the run's speed, and twice as steep beyond L = 8
        return 1.5 * base[s] * (2.0 if s > 8 else 1.0)

    pts = [{"size": s, "median_s": measured(s)} for s in (8, 16, 32)]
    got = calibrate.recalibrated(new, pts, 3.0)
    for p, q in zip(new["points"], got["points"]):
        assert q["median_s"] == pytest.approx(p["median_s"] * (2.0 if p["size"] > 8 else 1.0))
    assert got["corrected"]["recalibrated"]["by_input_length"] == \
        {"1": 1.0, "8": 1.0, "16": 2.0, "32": 2.0}
    assert calibrate.needs_points(got) is None  # once
    assert calibrate.needs_points(prof) is None  # not a correction
    wide = calibrate.corrected(prof, "p.json", 2.0, 64, 0.25, "run",
                               {1: (2.0, 40), 32: (2.0, 20)})
    assert calibrate.needs_points(wide) is None  # nothing outside 1..32
    # no lengths recorded (a batched bench's one ratio): every size, against their median
    flat = calibrate.corrected(prof, "p.json", 2.0, 64, 0.25, "bench --batch")
    assert calibrate.needs_points(flat) == ([], calibrate.SIZES)
    pts = [{"size": s, "median_s": 3 * 0.02 * s * (2.0 if s > 4 else 1.0)} for s in calibrate.SIZES]
    got = calibrate.recalibrated(flat, pts, 3.0)
    by = got["corrected"]["recalibrated"]["by_input_length"]
    assert by["1"] == pytest.approx(2 / 3, abs=1e-3) and by["32"] == pytest.approx(4 / 3, abs=1e-3)


def test_a_run_re_calibrates_a_correction_once_and_never_when_switched_off(monkeypatch):
    """Through the verbs' calibration step on a tiny model: a correction in
    $TREEOPT_HOME whose run visited L = 1..4 gets L = 8, 16, 32 (and 4 beside them)
    measured and kept in place; the next run finds nothing to do; TREEOPT_CALIBRATE=0 and
    a profile you gave are left alone."""
    import types

    from treeopt import calibrate, paths
    from treeopt.artefact import write_json
    from treeopt.verbs.calibration import maybe_calibrate

    lm = tiny_model("llama", torch.float32, "cpu")
    dec = Decoder(lm, random_prompt_tokens(lm, 3), Tree.static([[0], [0, 0]], 3))
    prof = {"model": lm.model_id, "points": _grid(lambda s: 1e-4 * s, batches=(1,))}
    prof = calibrate.corrected(prof, "shipped.json", 2.0, 64, 0.25, "run",
                               {1: (2.0, 30), 4: (2.0, 30)})
    path = paths.make_folder(paths.user_profiles()) / "cpu-test__tiny__float32.json"
    write_json(path, prof)

    def inp():
        return types.SimpleNamespace(profile=prof, profile_path=path, profile_src="mine.json")

    args = types.SimpleNamespace(profile=None, no_calibrate=False)
    monkeypatch.setenv("TREEOPT_CALIBRATE", "0")
    assert maybe_calibrate(args, inp(), dec, {}, False) is None
    monkeypatch.setenv("TREEOPT_CALIBRATE", "1")
    given = types.SimpleNamespace(profile="given.json", no_calibrate=False)
    assert maybe_calibrate(given, inp(), dec, {}, False) is None
    info, found = {}, inp()
    done = maybe_calibrate(args, found, dec, info, False)
    assert set(done["by_input_length"]) == {"1", "4", "8", "16", "32"}
    assert info["recalibrated"]["profile"] == "mine.json"
    kept = json.loads(path.read_text())
    assert kept["corrected"]["recalibrated"] == done and found.profile == kept
    assert [p["median_s"] for p in kept["points"] if p["size"] <= 4] == \
        [p["median_s"] for p in prof["points"] if p["size"] <= 4]
    again = types.SimpleNamespace(profile=kept, profile_path=path, profile_src="mine.json")
    assert maybe_calibrate(args, again, dec, {}, False) is None


def test_the_online_model_replays_the_runs_own_steps_exactly(monkeypatch):
    """The model's records are the run's steps as they ran: the tree replayed over them in
    the recorded states accepts exactly the tokens the steps emitted (the plain and
    exploring steps included), and the running acceptance and each candidate's modelled
    tokens/s reach the run JSON's adapt block."""
    from treeopt.search.hybrid import replay_predict

    lm = tiny_model("llama", torch.float32, "cpu")
    rng = random.Random(5)
    pt = random_prompt_tokens(lm, 3)
    tree = random_tree(rng, 3, 6, max_nodes=8)
    prompt = [rng.randrange(32) for _ in range(7)]
    bd = BatchDecoder(lm, pt, {1: tree}, adapt=True)
    bd.engine.chooser = Costed(1.0)  # costs from the test, not the clock: the tree wins
    monkeypatch.setattr(adapt, "MODEL_SHARE", 1e9)  # every MODEL_EVERY steps, however slow
    res = bd.generate([prompt], 90).results[0]
    eng = bd.engine
    rec = eng.online.recent([], eng.steps_run)["guessing"]  # the finished one's steps
    ran = {o[-1]: a for o, a in zip(res.offers, res.accepted)}
    kept = rec["step"].tolist()
    assert 32 <= len(kept) <= 64 and set(kept) <= set(ran)
    got = replay_predict(tree, rec, lambda sizes: [1.0] * len(sizes), follow=True)
    assert got["steps"] == len(kept)
    assert got["tokens_per_step"] * got["steps"] == pytest.approx(sum(ran[s] for s in kept))
    summary = eng.chooser.summary()
    assert summary["acceptance"]["records"] > 0
    assert len(summary["acceptance"]["guesses_top1_by_depth"]) == 3
    est = summary["by_batch"]["1"]
    assert est["tree"]["modelled_tokens_per_second"] > 0
    assert est["plain"]["modelled_tokens_per_second"] > 0


def test_the_model_switches_sooner_where_the_pairs_agree():
    """Plain 27 % faster than a tree whose steps yield 1 or 4 tokens (1.75 on average):
    the pairs alone do not see it through the yields' noise in 160 steps; the model (both
    read on the same 64 records, costs measured without noise here) switches once MIN_SEEN
    pairs and plain's own window are not against it. A model the steps contradict is not
    followed, nor one whose switch the pairs undid; one within the margin switches nothing."""
    def run(model: dict | None, plain_t: float = 0.009, steps: int = 160):
        c = adapt.Chooser()
        rng = random.Random(0)
        for _ in range(steps):
            if model is not None:
                c.modelled[1], c.records[1] = model, 64
            name = c.pick(1)
            e, t = (1.0, plain_t) if name == "plain" else (rng.choice([1, 1, 1, 4]), 0.02)
            c.observe(1, name, t, e, 1 if name == "plain" else 7)
        return c

    truth = {"tree": 1.75 / 0.02, "plain": 1 / 0.009}
    assert not run(None).switches
    modelled = run(truth)
    sw = modelled.switches
    assert len(sw) == 1 and sw[0]["to"] == "plain" and "the model" in sw[0]["why"]
    assert sw[0]["step"] <= 3 * adapt.EXPLORE_EARLY * adapt.MIN_SEEN, sw
    assert modelled.current[1] == "plain"
    assert not run(truth, plain_t=0.04).switches  # plain's own steps: far slower
    c = adapt.Chooser()  # where the pairs undo a model's switch, the model is not followed
    c.names[1], c.current[1] = ("tree", "plain"), "tree"
    c.pairs[(1, "plain")] = adapt._Pair()
    c._switch(1, 10, "tree", "plain", 0.3, 0.2, by="the model")
    c._switch(1, 20, "plain", "tree", 2.0, 0.5)
    assert (1, "plain") in c.distrust
    c.modelled[1], c.records[1] = truth, 64
    assert c._model_win(1, "tree", ["plain"]) is None
    assert not run({"tree": 87.5, "plain": 87.5 * 1.03}).switches  # within the margin


def test_the_models_host_work_stays_within_its_share():
    """Every MODEL_EVERY steps where the model is cheap beside a step; where a call takes
    as long as a few short steps (a GPU's), it runs so seldom that it takes at most
    MODEL_SHARE of them."""
    c = adapt.Chooser()
    for _ in range(20):
        c.observe(1, "tree", 0.04, 1.5, 8)
    c.model_seconds = 0.002
    assert c.model_every(1) == adapt.MODEL_EVERY
    c.model_seconds = 0.004
    for _ in range(200):
        c.observe(1, "tree", 0.008, 1.5, 8)
    every = c.model_every(1)
    assert every >= 50 and c.model_seconds / (every * c.step_seconds[1]) <= adapt.MODEL_SHARE
