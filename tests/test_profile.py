import json
import time

import numpy as np
import pytest
import torch

from treeopt import latency as profile
from treeopt import measure
from treeopt.errors import BadInput
from treeopt.runtime import Decoder
from treeopt.tree import Tree

from treeopt.tiny import random_prompt_tokens

from conftest import run_cli, tiny_loaded
from test_cli import assert_bad, treeopt


def synthetic(noise=0.0, seed=0):
    rng = np.random.default_rng(seed)
    pts = []
    for c in (128, 512):
        for s in profile.CPU_SIZES:
            t = 0.02 + 0.00001 * c + (0.0 if s <= 8 else 0.0004 * (s - 8))
            pts.append({"context": c, "size": s, "median_s": t * (1 + noise * rng.normal()),
                        "p10_s": t, "p90_s": t, "n": 5})
    return {"schema": profile.SCHEMA, "model": "m", "dtype": "float32", "simulated": False,
            "device": {"kind": "cpu", "name": "x"}, "points": pts,
            "overhead": {"per_step_s": 0.001, "fraction": 0.05}}


def test_fit_is_monotone_and_extrapolates():
    lat = profile.Latency(synthetic(noise=0.05))
    sizes = np.arange(1, 600)
    for c in (64, 128, 300, 512, 2048):
        t = lat(sizes, c)
        assert np.all(np.diff(t) >= -1e-12), c
    # overhead is added; without it the measured median comes back at measured points
    exact = profile.Latency(synthetic(), with_overhead=False)
    assert exact([16], 128)[0] == pytest.approx(0.02 + 0.00128 + 0.0032)
    assert lat([16], 128)[0] == pytest.approx(exact([16], 128)[0] * 1 + 0.001, rel=0.2)
    # beyond the largest size: the last segment's slope
    assert exact([256], 128)[0] == pytest.approx(0.02 + 0.00128 + 0.0004 * 248)
    # between contexts: linear in C; beyond: extrapolated, never decreasing
    mid = exact([1], 320)[0]
    assert exact([1], 128)[0] < mid < exact([1], 512)[0]
    assert exact([1], 4096)[0] >= exact([1], 512)[0]


def test_knee():
    lat = profile.Latency(synthetic(), with_overhead=False)
    # t(1) = 0.02128 at C=128; 1.1·t(1) allows 0.002128 more = 5 sizes past 8 at 0.0004
    assert lat.knee(128) == 8 + 5


def test_stable_samples_stops_early():
    calls = []
    timer = measure.Timer(torch.device("cpu"))
    s = measure.stable_samples(timer, lambda: (calls.append(1), time.sleep(0.003)),
                               repeats=100, budget=10)
    assert 10 <= len(s) < 100 and len(calls) == len(s) + 5  # burn-in of five
    st = measure.summarize([1.0, 2.0, 3.0, 4.0, 5.0])
    assert st["median_s"] == 3.0 and st["n"] == 5 and st["p10_s"] < st["p90_s"]


def test_validate_and_roundtrip(tmp_path):
    from treeopt.artefact import write_json

    prof = synthetic()
    write_json(tmp_path / "p.json", prof)
    assert profile.load(tmp_path / "p.json") == prof
    bad = dict(prof, points=[{"context": 1, "size": 0, "median_s": 1}])
    write_json(tmp_path / "b.json", bad)
    with pytest.raises(BadInput, match=r"points\[0\]"):
        profile.load(tmp_path / "b.json")
    with pytest.raises(BadInput, match="schema"):
        profile.validate({"schema": "treeopt.tree/1"})
    host = {"plain": {"outside_ops_per_step": "many", "forward_ops_per_step": 1,
                      "syncs_per_step": 1}}
    with pytest.raises(BadInput, match="host_work"):
        profile.validate(dict(prof, overhead={"per_step_s": 0.0, "host_work": host}))


def test_oom_records_largest_size_that_fit(monkeypatch):
    """The profile times the engine's step; a step that runs out of memory ends its
    context's sizes there."""
    from treeopt.engine import step as engine_step

    lm = tiny_loaded(vocab=16, dtype=torch.float32)
    dec = Decoder(lm, random_prompt_tokens(lm, 2), Tree.chain(2, 2))
    real = engine_step.forward

    def forward(st, x, pos, mask, C):
        if x.shape[1] >= 6:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB")
        return real(st, x, pos, mask, C)

    monkeypatch.setattr(engine_step, "forward", forward)
    points, max_fit = measure.measure_points(dec, [1, 2, 4, 6, 8], [16, 32], 3, 1.0,
                                             quiet=True)
    assert max_fit == {16: 4, 32: 4}
    assert sorted((p["context"], p["size"]) for p in points) == [
        (16, 1), (16, 2), (16, 4), (32, 1), (32, 2), (32, 4)]


def test_gpu_flag_without_gpu():
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    assert_bad(run_cli("profile", "--gpu"), "--gpu:")


def test_roofline_7b_a100_is_bandwidth_bound():
    """Batch-1 decoding of a 7B model on an A100 is memory-bound: t(1) ≈ weight bytes /
    bandwidth, within the memory-efficiency factor plus launch overhead (< 1.6×)."""
    prof = profile.simulate("a100-80gb", "vicuna-7b-v1.3", "float16", [1, 16, 256], [128])
    t1 = prof["points"][0]["median_s"]
    assert prof["points"][0]["bound"] == "memory"
    weights = 6.74e9 * 2  # bytes of vicuna-7b in fp16
    ideal = weights / 2039e9
    assert 1.0 < t1 / ideal < 1.6
    # batch 16 costs almost the same; 256 tokens become compute-bound
    assert prof["points"][1]["median_s"] < 1.1 * t1
    assert prof["points"][2]["bound"] == "compute"


def test_simulate_cli(tmp_path):
    out = tmp_path / "sim.json"
    p = treeopt("profile", "--simulate", "a100-80gb", "--model", "vicuna-7b-v1.3", "--json",
                "--out", str(out))
    assert p.returncode == 0, p.stderr
    summary = json.loads(p.stdout)
    assert summary["simulated"] is True and summary["model"] == "vicuna-7b-v1.3"
    assert profile.load(out)["simulated"] is True
    assert_bad(run_cli("profile", "--simulate", "b200"), "unknown GPU")


@pytest.mark.slow
def test_real_cpu_profile_two_sizes(tmp_path):
    out = tmp_path / "cpu.json"
    p = treeopt("profile", "--cpu", "--sizes", "1,64", "--contexts", "64", "--repeats", "5",
                "--no-overhead", "--json", "--out", str(out))
    assert p.returncode == 0, p.stderr
    prof = profile.load(out)
    t = {pt["size"]: pt["median_s"] for pt in prof["points"]}
    assert t[64] > t[1] > 0
    assert prof["device"]["kind"] == "cpu" and prof["device"]["threads"] >= 1
    assert prof["ceilings"]["peak_tflops"] > 0 and prof["ceilings"]["bandwidth_gbs"] > 0
    # --resume measures only the new size and keeps who measured the others
    p = treeopt("profile", "--cpu", "--sizes", "1,2,64", "--contexts", "64", "--repeats", "5",
                "--no-overhead", "--resume", "--json", "--out", str(out))
    assert p.returncode == 0, p.stderr
    again = profile.load(out)
    old = {pt["size"]: pt for pt in prof["points"]}
    assert [pt for pt in again["points"] if pt["size"] in old] == list(old.values())
    assert {pt["size"] for pt in again["points"]} == {1, 2, 64}
    assert again["command"] == prof["command"] and "--resume" in again["updated_by"]
    assert again["ceilings"] == prof["ceilings"]
    # the points say which kernels timed them; a resume under other kernels is refused
    assert prof["kernels"] in ("stock", "onednn")
    other = {"stock": "onednn", "onednn": "stock"}[prof["kernels"]]
    out.write_text(json.dumps({**again, "kernels": other}))
    p = treeopt("profile", "--cpu", "--sizes", "1,3", "--contexts", "64", "--repeats", "5",
                "--no-overhead", "--resume", "--out", str(out))
    assert p.returncode == 2 and f"timed with {other} kernels" in p.stderr


SMOL_SHAPE = {"hidden_size": 576, "num_hidden_layers": 30, "num_attention_heads": 9,
              "num_key_value_heads": 3, "intermediate_size": 1536, "vocab_size": 49152}


def test_calibrate_recovers_factors():
    """Points generated by the roofline with known factors are fitted back exactly."""
    truth = {"memory_efficiency": 0.6, "compute_efficiency": 0.3, "attention_efficiency": 0.1,
             "kernel_overhead_s_per_layer": 2e-5, "overlap": 0.4}
    pts = [{"size": s, "context": c,
            "median_s": profile.roofline(SMOL_SHAPE, s, c, 2, 0.5, 20.0, **truth)["seconds"]}
           for c in (128, 512, 2048) for s in (1, 2, 4, 8, 16, 32, 64, 128, 256)]
    fit = profile.calibrate(pts, SMOL_SHAPE, 2, 0.5, 20.0)
    assert fit["max_rel_error"] < 1e-3
    for k, v in truth.items():
        assert fit["factors"][k] == pytest.approx(v, rel=0.05)


def test_simulate_with_calibration(tmp_path):
    measured = synthetic()
    bare = tmp_path / "bare.json"
    bare.write_text(json.dumps(measured))
    assert_bad(run_cli("profile", "--simulate", "a100-80gb", "--model", "vicuna-7b-v1.3",
                       "--calibration", str(bare), "--out", str(tmp_path / "x.json")),
               "no fitted roofline")
    assert_bad(run_cli("profile", "--calibration", str(bare)), "--simulate")
    measured["roofline"] = {"factors": {"memory_efficiency": 0.5, "compute_efficiency": 0.4,
                                        "kernel_overhead_s_per_layer": 1e-5}}
    cal = tmp_path / "cal.json"
    cal.write_text(json.dumps(measured))
    out = tmp_path / "sim.json"
    p = treeopt("profile", "--simulate", "a100-80gb", "--model", "vicuna-7b-v1.3",
                "--calibration", str(cal), "--json", "--out", str(out))
    assert p.returncode == 0, p.stderr
    a = profile.load(out)["assumptions"]
    assert a["memory_efficiency"] == 0.5 and a["factors_source"] == str(cal)
    default = profile.simulate("a100-80gb", "vicuna-7b-v1.3", "float16", [1], [128])
    # a lower fitted memory efficiency → a slower simulated t(1)
    t1 = [p["median_s"] for p in profile.load(out)["points"] if p["size"] == 1][0]
    assert t1 > default["points"][0]["median_s"]


def test_rounds_sweep_the_whole_grid_in_turn(monkeypatch):
    """rounds=2: every point is timed in both sweeps (size 1, size 3, size 1, size 3), and
    its median is over the samples of both."""
    from treeopt.engine import step as engine_step

    lm = tiny_loaded(layers=1)
    dec = Decoder(lm, random_prompt_tokens(lm, 2), Tree.chain(2, 2))
    real, calls = engine_step.forward, []

    def forward(st, x, pos, mask, C):
        calls.append(x.shape[1])
        return real(st, x, pos, mask, C)

    monkeypatch.setattr(engine_step, "forward", forward)
    points, _ = measure.measure_points(dec, [1, 3], [16], 4, 10.0, quiet=True, rounds=2)
    runs = [s for i, s in enumerate(calls) if i == 0 or calls[i - 1] != s]
    assert runs == [1, 3, 1, 3]
    assert [(p["size"], p["n"], p["rounds"], len(p["round_medians_s"])) for p in points] == \
        [(1, 4, 2, 2), (3, 4, 2, 2)]
    assert profile.sweep_spread(points) >= 0


def test_bad_rounds():
    assert_bad(run_cli("profile", "--cpu", "--rounds", "0"), "--rounds")


@pytest.mark.slow
def test_real_cpu_batch_profile(tmp_path):
    """--batch measures every size at every batch size (B = 1 always) and the batched
    runtime's per-sequence overhead; the fit reads each batch size."""
    out = tmp_path / "b.json"
    p = treeopt("profile", "--cpu", "--batch", "2", "--sizes", "1,3", "--contexts", "16",
                "--repeats", "3", "--json", "--out", str(out))
    assert p.returncode == 0, p.stderr
    prof = profile.load(out)
    assert {(pt["batch"], pt["size"]) for pt in prof["points"]} == {(1, 1), (1, 3), (2, 1),
                                                                    (2, 3)}
    assert set(prof["overhead"]["batched"]["per_sequence_s"]) == {"plain", "tree"}
    assert profile.Latency(prof, batch=2)([3], 16)[0] > 0
    assert json.loads(p.stdout)["batches"] == [1, 2]
    # the host work of the engine's plain and tree steps, counted: one read-back a step
    host = json.loads(p.stdout)["host_work"]
    assert "plain" in host and len(host) == 2
    assert all(h["syncs_per_step"] <= 1 and 0 < h["outside_ops_per_step"] <= 40
               for h in host.values())
