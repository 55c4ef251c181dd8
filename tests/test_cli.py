"""CLI contract: --json schema, exit 2 with one line on bad input."""
import json
import os
import subprocess
import sys

import pytest

from conftest import run_cli

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def treeopt(*args, timeout=600, env=None):
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONWARNINGS="ignore", **(env or {}))
    return subprocess.run([sys.executable, os.path.join(REPO, "cli.py"), *args],
                          capture_output=True, text=True, timeout=timeout, env=env, cwd=REPO)


def repo_status() -> str:
    """`git status --porcelain` of the repository (what a command must leave as it was)."""
    return subprocess.run(["git", "status", "--porcelain"], cwd=REPO, capture_output=True,
                          text=True).stdout


def assert_bad(proc, needle):
    assert proc.returncode == 2, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, proc.stderr
    assert needle in lines[0], lines[0]
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("args,needle", [
    (["run", "--max-new-tokens", "0"], "--max-new-tokens: must be ≥ 1"),
    (["run", "--max-new-tokens", "-3"], "--max-new-tokens: must be ≥ 1"),
    (["run", "--temperature", "-1"], "--temperature: must be ≥ 0"),
    (["run", "--prompt", "   "], "empty prompt"),
    (["run", "--model", "/nonexistent/model"], "no such folder"),
    (["run", "--prompt-file", "/nonexistent.txt"], "--prompt-file"),
    (["bench", "--prompts", "/nonexistent.jsonl"], "no such file"),
    (["bench", "--limit", "0"], "must be ≥ 1"),
    (["run", "--dtype", "int8"], "invalid choice"),
])
def test_bad_input_fast(args, needle):
    assert_bad(run_cli(*args), needle)


def test_bad_tree_files(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    assert_bad(run_cli("run", "--tree", str(bad)), "malformed JSON")
    bad.write_text(json.dumps({"schema": "treeopt.tree/1", "num_prompt_tokens": 3,
                               "states": {"3": [{"path": [0, 1], "prompt_tokens": 3}]}}))
    assert_bad(run_cli("run", "--tree", str(bad)), "parent [0] missing")


def test_not_a_causal_lm(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(
        {"model_type": "bert", "architectures": ["BertModel"], "hidden_size": 8,
         "num_hidden_layers": 1, "num_attention_heads": 1, "intermediate_size": 8}))
    assert_bad(run_cli("run", "--model", str(tmp_path)), "not a causal LM")
    (tmp_path / "config.json").unlink()
    assert_bad(run_cli("run", "--model", str(tmp_path)), "no config.json")


def test_bad_prompt_file(tmp_path):
    p = tmp_path / "p.jsonl"
    p.write_text('{"text": "no known field"}\n')
    assert_bad(run_cli("bench", "--prompts", str(p)), "no prompt field")


def test_prompt_offset_and_stride(tmp_path):
    from treeopt import prompts
    from treeopt.errors import BadInput

    p = tmp_path / "p.jsonl"
    p.write_text("".join(json.dumps({"prompt": f"q{i}"}) + "\n" for i in range(10)))
    assert prompts.load(str(p), 3, 1, 4) == ["q1", "q5", "q9"]
    assert prompts.load(str(p), None, 0, 4) == ["q0", "q4", "q8"]
    assert prompts.load(str(p), 2) == ["q0", "q1"]
    assert prompts.load(None, 2, 0, 3) == [prompts.BUILTIN[0], prompts.BUILTIN[3]]
    with pytest.raises(BadInput, match="--stride"):
        prompts.load(str(p), 2, 0, 0)
    with pytest.raises(BadInput, match="--offset"):
        prompts.load(str(p), 2, -1)


@pytest.mark.slow
def test_prompt_longer_than_context():
    assert_bad(run_cli("run", "--raw", "--prompt", "word " * 9000), "the model's context is")


@pytest.mark.slow
def test_run_json_schema(tmp_path):
    p = treeopt("run", "--json", "--baseline", "--max-new-tokens", "16", "--dtype", "float32",
                "--out", tmp_path / "r.json")
    assert p.returncode == 0, p.stderr
    out = json.loads(p.stdout)
    assert json.loads((tmp_path / "r.json").read_text()) == out
    # the records of its steps, and the tree replayed over them is what ran
    assert out["acceptance"]["source"] == "run" and out["acceptance"]["prompts"] == 1
    assert abs(out["drift"]["model"]["tokens_per_step"]) < 1e-3
    assert out["schema"] == "treeopt.run/1"
    for key in ["model", "device", "dtype", "tree", "new_tokens", "steps", "tokens_per_step",
                "seconds", "tokens_per_second", "output_ids", "text", "baseline", "hf_generate",
                "speedup_vs_hf", "identical"]:
        assert key in out, key
    for key in ["new_tokens", "tokens_per_second", "output_ids"]:
        assert key in out["baseline"] and key in out["hf_generate"]
    assert out["dtype"] == "float32" and out["identical"] is True
    # HF ran beside the engine: the stock model kept, so the peak held the loaded weights
    assert out["peak_memory"]["measure"] == "peak RSS"
    assert out["peak_memory"]["bytes"] > 135e6 * 4
    assert out["new_tokens"] == len(out["output_ids"]) <= 16
    assert out["tokens_per_step"] >= 1.0


@pytest.mark.slow
def test_bench_json(tmp_path):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"turns": ["Name two colours."]}\n{"instruction": "Say hi."}\n')
    p = treeopt("bench", "--json", "--prompts", str(prompts), "--max-new-tokens", "12",
                "--out", str(tmp_path / "run.json"))
    assert p.returncode == 0, p.stderr
    out = json.loads(p.stdout)
    for key in ["prompts", "new_tokens", "tokens_per_step", "tokens_per_second",
                "hf_tokens_per_second", "speedup_vs_hf", "identical_fraction",
                "unexplained_divergences", "step_overhead_fraction", "per_prompt"]:
        assert key in out, key
    assert out["prompts"] == 2 and out["unexplained_divergences"] == 0
    assert json.loads((tmp_path / "run.json").read_text()) == out


def test_artefacts_are_written_whole_and_readable(tmp_path):
    import stat

    from treeopt.artefact import write_json

    mask = os.umask(0o022)
    try:
        path = write_json(tmp_path / "sub" / "a.json", {"x": 1})
    finally:
        os.umask(mask)
    assert json.loads(path.read_text()) == {"x": 1}
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    assert [p.name for p in path.parent.iterdir()] == ["a.json"]  # no temp file left


@pytest.mark.slow
def test_batch_run_and_bench(tmp_path):
    """`run --batch-file` and `bench --batch` on the embedded model (tiny settings)."""
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("\n".join(json.dumps({"prompt": t}) for t in
                                 ("Name a colour.", "Count from one to ten.", "Hi")))
    p = treeopt("run", "--batch-file", str(prompts), "--max-new-tokens", "12", "--json")
    assert p.returncode == 0, p.stderr
    out = json.loads(p.stdout)
    assert out["kind"] == "batch-run" and out["prompts"] == 3
    assert out["acceptance"]["run"] == "batch-run"  # the records of every sequence's steps
    assert all(1 <= r["new_tokens"] <= 12 and r["text"] for r in out["results"])
    p = treeopt("bench", "--batch", "1,2", "--prompts", str(prompts), "--max-new-tokens", "8",
                "--json", "--out", str(tmp_path / "b.json"))
    assert p.returncode == 0, p.stderr
    rows = json.loads(p.stdout)["batch"]
    assert [r["batch"] for r in rows] == [1, 2]
    assert all(r["chosen_tokens_per_second"] > 0 and r["plain_tokens_per_second"] > 0
               for r in rows)
    assert all(r["acceptance"]["batch"] == r["batch"] for r in rows)
    assert_bad(run_cli("run", "--batch-file", str(prompts), "--temperature", "0.5"),
               "decodes greedily")
