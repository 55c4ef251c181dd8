"""The bench's decode-phase figures and its predicted-vs-measured block (no model)."""
import pytest

from treeopt import acceptance as accept
from treeopt import evaluation as bench
from treeopt import latency as prof_mod
from treeopt import paths as shipped
from treeopt.search import exact
from treeopt.artefact import write_json
from treeopt.drift import speed_line
from treeopt.errors import BadInput
from treeopt.inputs import resolve_inputs
from treeopt.runtime import Result, full_steps
from treeopt.tree import Tree

from conftest import run_cli

shipped.PROFILES = shipped.SHIPPED


def result(accepted, seconds, finish="length", prefill=0.5, lengths=None):
    r = Result([0] * sum(accepted), 1 + len(accepted), 0.0, prefill, list(seconds),
               accepted=list(accepted), lengths=list(lengths or [1] * len(accepted)))
    r.finish_reason = finish
    return r


def test_full_steps_rule():
    assert full_steps(result([1, 2, 3], [0.1] * 3)) == 2
    assert full_steps(result([1, 2, 3], [0.1] * 3, finish="eos")) == 2
    assert full_steps(result([1, 2, 3], [0.1] * 3, finish="context")) == 3
    assert full_steps(result([], [])) == 0


def test_speed_vs_profile_and_warning():
    prof = synthetic_profile()
    lat = prof_mod.Latency(prof)
    # steps that took exactly the profile's time at their length and context, then 1.5x
    lengths, acc = [4, 8, 8, 4], [1, 2, 2, 1]
    ctx, secs = 64, []
    for a, L in zip(acc, lengths):
        secs.append(float(lat([L], ctx)[0]))
        ctx += a
    exact = result(acc, secs, finish="context", lengths=lengths)
    assert bench.speed_vs_profile([(64, exact)], prof) == pytest.approx(1.0)
    assert speed_line(1.0, "p.json") is None
    slow = result(acc, [1.5 * s for s in secs], finish="context", lengths=lengths)
    speed = bench.speed_vs_profile([(64, slow)], prof)
    assert speed == pytest.approx(1.5)
    msg = speed_line(speed, "p.json", " --model m")
    assert "p.json" in msg and "treeopt profile --model m" in msg and "\n" not in msg


def test_decode_phase_drops_prefill_and_a_cut_last_step():
    runs = [(10, result([1, 2, 3, 1], [0.1, 0.1, 0.2, 0.1])),  # last step (cut) dropped
            (20, result([2, 2, 3], [0.1, 0.1, 0.3], finish="eos")),  # so is an EOS step
            (30, result([1, 1], [0.1, 0.1], finish="context"))]  # nothing cut here
    d = bench.decode_phase(runs)
    assert d["steps"] == 7
    assert d["tokens_per_step"] == pytest.approx((1 + 2 + 3 + 2 + 2 + 1 + 1) / 7, abs=1e-4)
    assert d["step_seconds"] == pytest.approx(0.8 / 7, abs=1e-6)
    assert d["tokens_per_second"] == pytest.approx(12 / 0.8, rel=1e-4)
    # contexts: 10, 11, 13 (first prompt), 20, 22 (second), 30, 31 (third)
    assert d["context"] == round((10 + 11 + 13 + 20 + 22 + 30 + 31) / 7)
    assert bench.decode_phase([(5, result([1], [0.1]))]) == {"steps": 0}


def synthetic_profile():
    pts = [{"context": c, "size": s, "median_s": 0.01 + 0.001 * s + 1e-5 * c,
            "p10_s": 0.0, "p90_s": 0.0, "n": 3} for c in (64, 128) for s in (1, 4, 8, 16)]
    return {"schema": prof_mod.SCHEMA, "model": "vicuna-7b-v1.3", "dtype": "float16",
            "simulated": False, "device": {"kind": "cpu", "name": "x"}, "points": pts,
            "overhead": {"per_step_s": 0.0005, "fraction": 0.05}}


def test_predicted_vs_measured(tmp_path):
    prof_path, acc_path = tmp_path / "p.json", shipped.PROFILES / "reference" / \
        "vicuna-7b-v1.3.acceptance.json"
    write_json(prof_path, synthetic_profile())
    tree = Tree.static([[0], [1], [0, 0]], 3, 10)
    acc = accept.search_inputs(accept.load(acc_path), conditional=False)[0]
    lat = prof_mod.Latency(synthetic_profile())
    want = exact.predict(tree, acc, lambda L: lat(L, 96))
    # a run that matches the prediction exactly, on a machine whose steps take 1.1x the
    # profile's time (speed_vs_profile)
    res = {"decode": {"steps": 50, "tokens_per_step": want["tokens_per_step"],
                      "step_seconds": want["step_seconds"],
                      "tokens_per_second": want["tokens_per_second"], "context": 96}}
    tree.meta = {"config": {"conditional": False}}
    inputs = resolve_inputs("vicuna-7b-v1.3", str(prof_path), str(acc_path))
    out = bench.predicted_vs_measured(tree, res, inputs.profile, inputs.profile_src,
                                      inputs.acceptance, inputs.acceptance_src, 1.1)
    assert out["context"] == 96
    assert all(abs(e) < 1e-3 for k, e in out["error"].items()
               if k != "tokens_per_second_at_run_speed")
    assert out["speed_vs_profile"] == pytest.approx(1.1, rel=1e-3)
    assert out["error"]["tokens_per_second_at_run_speed"] == pytest.approx(1 / 1.1 - 1, abs=1e-3)
    assert out["acceptance"] == "profiles/reference/vicuna-7b-v1.3.acceptance.json"
    # without a profile to read there is nothing to predict
    tree.meta = {}
    none = resolve_inputs(str(tmp_path / "no-such-model"), want=("profile", "acceptance"))
    assert none.profile is None and none.acceptance is None
    assert bench.predicted_vs_measured(tree, res, None, None, None, None) is None
    # a given profile for another model is bad input
    with pytest.raises(BadInput, match="--profile .* is for vicuna-7b-v1.3"):
        resolve_inputs("SmolLM2-135M-Instruct", str(prof_path))


def test_stored_paths_are_repo_relative(tmp_path, monkeypatch):
    p = shipped.PROFILES / "reference" / "vicuna-7b-v1.3.acceptance.json"
    text = shipped.display_path(p)
    assert text == "profiles/reference/vicuna-7b-v1.3.acceptance.json"
    assert shipped.stored_path(text).resolve() == p.resolve()
    assert shipped.display_path(tmp_path / "x.json") == str((tmp_path / "x.json").resolve())
    assert shipped.stored_path("profiles/none.json") is None and shipped.stored_path(None) is None
    # from another working directory too: stored paths resolve against the folder holding
    # profiles/, not the current directory
    monkeypatch.chdir(tmp_path)
    assert shipped.stored_path(text).resolve() == p.resolve()


def test_bench_bad_profile_fails_before_benching(tmp_path):
    from test_cli import assert_bad

    assert_bad(run_cli("bench", "--profile", str(tmp_path / "none.json"), "--limit", "1"),
               "no such file")


def test_batch_speed_reads_each_full_step_at_its_own_length_and_context():
    """The batch bench's speed drift: the full-batch steps' time over the profile's at
    each step's own input length and cache length (other steps left out)."""
    from treeopt.batch import BatchResult

    prof = synthetic_profile()
    lat = prof_mod.Latency(prof)
    steps = [(1, 4, 64), (1, 8, 70), (2, 8, 80)]  # (live, padded input, cache length)
    secs = [1.5 * float(lat([L], c)[0]) if live == 1 else 9.0 for live, L, c in steps]
    r = BatchResult([], 0.0, live=[s[0] for s in steps], lengths=[s[1] for s in steps],
                    contexts=[s[2] for s in steps], step_seconds=secs)
    assert bench._full_speed([r], 1, prof) == pytest.approx(1.5)


def test_a_flip_is_explained_only_by_the_noise_measured_where_it_happened():
    """float32 has no floor: a flip between HF's token and the runner-up is explained only
    when a many-row forward and a one-token forward differ there by at least half the
    margin — as a GPU's 1-row and many-row GEMMs do. Simulated by nudging many-row
    forwards by a known amount."""
    import torch
    from treeopt.runtime import Decoder
    from treeopt.tiny import tiny_model

    lm = tiny_model("llama", torch.float32, "cpu")
    dec = Decoder(lm, None, None)
    ids = [5, 9, 13, 2, 7]
    ref = dec.hf_generate(ids, 6).output_ids
    _, logits = dec.prefill(ids + ref[:3])
    runner_up = int(logits[-1].topk(2).indices[1])
    other = ref[:3] + [runner_up]
    stock = bench.logit_margin(dec, ids, ref, other)
    margin = float(logits[-1, ref[3]] - logits[-1, runner_up])
    assert stock["position"] == 3 and stock["margin"] == pytest.approx(margin, abs=1e-5)
    assert stock["noise"] < 1e-3 and stock["tolerance"] < 1e-3
    assert stock["tolerance"] >= 2 * stock["noise"]
    assert stock["explained"] == (margin <= stock["tolerance"])

    call = dec.call

    def nudged(embeds, cache, positions, mask=None, head=True):
        out = call(embeds, cache, positions, mask, head)
        return out + margin if head and embeds.shape[0] > 1 else out

    dec.call = nudged
    gpu_like = bench.logit_margin(dec, ids, ref, other)
    assert gpu_like["noise"] == pytest.approx(margin, rel=1e-3)
    assert gpu_like["explained"] and gpu_like["tolerance"] >= 2 * margin * 0.999
    # a bfloat16 floor explains a flip below it without any measured noise
    dec.call = call
    floor = bench.MARGIN_TOLERANCE["bfloat16"]
    assert bench.logit_margin(dec, ids, ref, other, floor)["explained"] == (margin <= floor)


def test_a_batch_bench_states_one_speed_for_the_correction():
    """The batch bench's correction rests on every batch size's measured speed, weighted by
    its full-batch steps, compounding as ratios do; rows without a speed add nothing."""
    rows = [{"predicted": {"speed_vs_profile": 2.0}, "chosen_full_batch": {"steps": 300}},
            {"predicted": {"speed_vs_profile": 0.5}, "chosen_full_batch": {"steps": 100}},
            {"predicted": None, "chosen_full_batch": {"steps": 50}},
            {"predicted": {"speed_vs_profile": 3.0}, "chosen_full_batch": {"steps": 0}}]
    speed, steps = bench.batch_speed(rows)
    assert steps == 400 and speed == pytest.approx(2.0 ** 0.75 * 0.5 ** 0.25)
    assert bench.batch_speed(rows[2:]) == (None, 0)
