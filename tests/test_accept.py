import json

import numpy as np
import pytest

from treeopt import acceptance as accept
from treeopt.artefact import write_json
from treeopt.errors import BadInput
from treeopt.paths import SHIPPED as PROFILES

from conftest import run_cli
from test_cli import assert_bad, treeopt

PUBLISHED = PROFILES / "reference" / "ppd_published_accuracies.json"


def test_wilson_known_values():
    lo, hi = accept.wilson(np.array([8, 0, 50]), np.array([10, 10, 100]))
    assert lo[0] == pytest.approx(0.4902, abs=1e-4) and hi[0] == pytest.approx(0.9433, abs=1e-4)
    assert lo[1] == 0.0 and hi[1] == pytest.approx(0.2775, abs=1e-4)
    assert lo[2] == pytest.approx(0.4038, abs=1e-4) and hi[2] == pytest.approx(0.5962, abs=1e-4)


def test_marginal_and_paths_on_known_ranks():
    ranks = np.array([[0, 0, 1], [0, 1, 10], [1, 0, -1], [10, 0, -1], [0, 0, 0]])
    acc, hits, n = accept.marginal(ranks, 10)
    assert n.tolist() == [5, 5, 3]
    assert acc[0, 0] == pytest.approx(3 / 5) and acc[0, 1] == pytest.approx(1 / 5)
    assert acc[2, 0] == pytest.approx(1 / 3) and acc[2, 1] == pytest.approx(1 / 3)
    counts, totals = accept.path_counts(ranks, 10)
    assert counts[(0, 0)] == 2 and counts[(0, 0, 0)] == 1 and counts[(0, 0, 1)] == 1
    assert totals == {1: 5, 2: 5, 3: 3}


def test_estimate_correlation_and_ci():
    rng = np.random.default_rng(0)
    n = 4000
    d1 = rng.random(n) < 0.4
    # depth 2 is right far more often when depth 1 was right (correlated)
    d2 = np.where(d1, rng.random(n) < 0.5, rng.random(n) < 0.1)
    ranks = np.stack([np.where(d1, 0, 10), np.where(d2, 0, 10)], 1)
    est = accept.estimate(ranks, 10, prompt_of=np.arange(n) % 40, bootstrap=50)
    marg2 = est["accuracy"][1][0]
    assert est["path_probs"]["0,0"] == pytest.approx((d1 & d2).mean(), abs=1e-6)
    assert est["fit"]["correlation"][1] == pytest.approx((d1 & d2).sum() / (d1.sum() * marg2),
                                                         rel=1e-4)
    ci = est["bootstrap_top1_ci95"]
    assert ci["low"][0] < est["accuracy"][0][0] < ci["high"][0]
    lo, hi = est["ci95"]["low"][0][0], est["ci95"]["high"][0][0]
    assert lo < 0.4 < hi


def test_reference_files_match_published():
    pub = json.load(open(PUBLISHED))
    for model, entry in pub["models"].items():
        obj = accept.load(f"profiles/reference/{model}.acceptance.json")
        assert obj["source"] == "published" and obj["accuracy"] == entry["accuracy"]
    missing = accept.accuracy_array(accept.load("profiles/reference/vicuna-13b-v1.3.acceptance.json"))
    assert np.isnan(missing[2, 5:]).all()


@pytest.mark.parametrize("mutate,needle", [
    (lambda o: o.update(num_prompt_tokens=2), "accuracy has 3 rows, num_prompt_tokens is 2"),
    (lambda o: o["accuracy"][0].__setitem__(0, 1.5), "accuracy[0][0]=1.5 outside [0, 1]"),
    (lambda o: o["accuracy"][1].__setitem__(0, -0.1), "accuracy[1][0]=-0.1 outside"),
    (lambda o: o["accuracy"][0].__setitem__(1, 0.9), "sums to"),
    (lambda o: o.update(schema="x"), "schema"),
])
def test_bad_acceptance_files(tmp_path, mutate, needle):
    obj = accept.load("profiles/reference/vicuna-7b-v1.3.acceptance.json")
    mutate(obj)
    write_json(tmp_path / "a.json", obj)
    with pytest.raises(BadInput, match=needle.replace("[", r"\[").replace("]", r"\]")):
        accept.load(tmp_path / "a.json")
    assert_bad(run_cli("search", "--model", "vicuna-7b", "--acceptance",
                       str(tmp_path / "a.json")), needle)


def test_search_rejects_mixed_models(tmp_path):
    p = treeopt("profile", "--simulate", "h100-sxm", "--model", "vicuna-13b", "--out",
                str(tmp_path / "p.json"))
    assert p.returncode == 0, p.stderr
    assert_bad(run_cli("search", "--model", "vicuna-7b", "--profile", str(tmp_path / "p.json")),
               "is for vicuna-13b-v1.3, the model is vicuna-7b-v1.3")
    # two models no table knows are told apart by name too
    prof = json.loads((tmp_path / "p.json").read_text())
    write_json(tmp_path / "p2.json", dict(prof, model="my-model-a"))
    acc = json.loads((PROFILES / "reference" / "vicuna-7b-v1.3.acceptance.json").read_text())
    write_json(tmp_path / "a2.json", dict(acc, model="my-model-b"))
    assert_bad(run_cli("search", "--profile", str(tmp_path / "p2.json"), "--acceptance",
                       str(tmp_path / "a2.json")),
               "is for my-model-a, the model is my-model-b")


def test_mean_context_over_measured_positions():
    from treeopt.distill import Sample

    # prompt 4 + response 4 (ids 0..7): positions 3..5 measured, contexts 4, 5, 6
    a = Sample(list(range(8)), 4, None, None)
    # prompt 10 + response 1: nothing measured
    b = Sample(list(range(11)), 10, None, None)
    assert accept.mean_context([a, b]) == 5
    assert accept.mean_context([b]) == 0


def test_search_reads_t_at_the_acceptance_context(tmp_path):
    """Without --context, search reads t(L) at the acceptance file's mean context."""
    src = json.loads((PROFILES / "reference" / "vicuna-7b-v1.3.acceptance.json").read_text())
    for ctx in (None, 1500):
        obj = dict(src, **({"mean_context": ctx} if ctx else {}))
        path = tmp_path / f"acc{ctx}.json"
        write_json(path, obj)
        out = tmp_path / f"tree{ctx}.json"
        p = treeopt("search", "--model", "vicuna-7b", "--acceptance", str(path), "--json",
                    "--max-input", "64", "--out", str(out))
        assert p.returncode == 0, p.stderr
        assert json.loads(out.read_text())["meta"]["context"] == (ctx or 512)
