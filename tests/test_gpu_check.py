"""Shape-only models (profile a model before its weights are here) and the prepared GPU
check, run on the CPU with a tiny shape so that CI keeps it working."""
import json
import os
import pathlib
import subprocess
import sys

import pytest
import torch

from treeopt import latency
from treeopt.errors import BadInput
from treeopt.models import load

from conftest import run_cli
from test_cli import assert_bad, treeopt

REPO = pathlib.Path(__file__).resolve().parent.parent
TINY = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 32,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "intermediate_size": 64, "vocab_size": 64, "max_position_embeddings": 256,
        "torch_dtype": "float32"}


@pytest.fixture
def shape_folder(tmp_path) -> pathlib.Path:
    folder = tmp_path / "tiny-shape"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(TINY))
    return folder


def test_shape_only_models_are_random_weights_of_the_right_shape(shape_folder):
    lm = load(str(shape_folder), "float32", "cpu", shape_only=True)
    assert lm.weights == "random" and lm.tokenizer is None
    assert lm.config.hidden_size == 32 and lm.model.lm_head.weight.shape == (64, 32)
    known = load("vicuna-68m", "bfloat16", "cpu", shape_only=True)
    assert known.model_id == "vicuna-68m" and known.dtype.is_floating_point
    assert known.config.num_hidden_layers == 2 and known.config.vocab_size == 32000
    assert next(known.model.parameters()).dtype == known.dtype
    with pytest.raises(BadInput, match="no weights here, only its shape"):
        load(str(shape_folder), "float32", "cpu")


def test_profile_runs_on_a_shape_and_says_so(tmp_path, shape_folder):
    out = tmp_path / "p.json"
    p = treeopt("profile", "--cpu", "--model", shape_folder, "--dtype", "float32", "--sizes",
                "1,4", "--contexts", "16", "--repeats", "2", "--budget-seconds", "0.1",
                "--no-overhead", "--json", "--out", out)
    assert p.returncode == 0, p.stderr
    prof = latency.load(out)
    assert prof["weights"] == "random" and prof["model"] == "tiny-shape"
    assert {q["size"] for q in prof["points"]} == {1, 4}


def test_verbs_that_need_weights_refuse_a_shape(tmp_path, shape_folder):
    needle = "no weights here, only its shape"
    assert_bad(run_cli("run", "--model", shape_folder), needle)
    assert_bad(run_cli("accept", "--model", "vicuna-7b"), needle)
    assert_bad(run_cli("bench", "--model", "vicuna-13b"), needle)
    assert_bad(run_cli("train", "--model", shape_folder, "--prompts", "alpaca-seed", "--out",
                       tmp_path / "pt"), needle)


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is here: the check would run")
def test_gpu_check_without_a_gpu_says_why_in_one_line(tmp_path):
    p = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_check.py"), "--out",
                        str(tmp_path / "x"), "--device", "cuda"], capture_output=True,
                       text=True, timeout=300, env=dict(os.environ, HF_HUB_OFFLINE="1"))
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert p.returncode == 2 and len(lines) == 1, p.stderr
    assert "Traceback" not in p.stderr and ("pynvml" in lines[0] or "CUDA" in lines[0])
    assert not (tmp_path / "x").exists()


@pytest.mark.slow
def test_gpu_check_runs_its_cpu_stand_in(tmp_path):
    """`benchmarks/gpu_check.py --out DIR` without a GPU: the same path on the CPU with a
    tiny shape; every file in DIR, the summary complete, lossless."""
    out = tmp_path / "check"
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    p = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_check.py"), "--out",
                        str(out), "--device", "cpu"], capture_output=True, text=True,
                       timeout=900, env=env, cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    s = json.loads((out / "summary.json").read_text())
    assert s["device"] == "cpu" and s["weights"] == "random" and s["lossless"]
    assert set(s["trees"]) == {"measured", "this-device", "a100-80gb"}
    assert all([r["batch"] for r in t["per_batch"]] == [1, 2] for t in s["trees"].values())
    assert s["roofline_vs_measured"]["points"] and s["step_time"]["steps"] > 0
    assert {r["architecture"] for r in s["lossless_fp32"]} >= {"llama", "gemma2", "mistral"}
    assert [r["dtype"] for r in s["lossless_bf16"]] == ["bfloat16"] * 2
    assert all(r["mismatches"] == 0 for r in s["lossless_fp32"])
    assert s["bf16_unexplained"] == sum(r["mismatches"] for r in s["lossless_bf16"])
    assert json.loads(p.stdout.strip().splitlines()[-1])["lossless"] is True
    # how every row ran is said (on the CPU: eager, which is no failure there)
    assert s["graphed"] is True and set(s["graph_status"]) >= {
        "profile_points", "engine_vs_eager", "loops", "attention_backends"}
    assert all(g == ["eager"] for g in s["graph_status"].values()), s["graph_status"]
    emb = s["embedded_fp32"]  # installed here: graphed, eager, plain and HF agree
    assert emb["identical"] is True and emb["prompts"] == 2 and emb["graphs"] == ["eager"]
    assert all(r["ppd_graphed"] and r["ppd_eager"] and r["plain_loop"] for r in emb["rows"])
    by = s["attention"]["by_backend"]
    assert "step_ms" in by["default"] and "step_ms" in by["MATH"]
    assert all(("step_ms" in r) != ("error" in r) for r in by.values())
    for name in ("facts.json", "profile.json", "measured.tree.json", "sim-a100-80gb.json"):
        assert (out / name).is_file(), name
    assert not (out / "home").exists() or not any((out / "home").rglob("*.json"))
