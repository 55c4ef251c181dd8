"""Hostile-but-realistic input, through the CLI: every bad input is one line on stderr,
exit 2 (130/143 for Ctrl-C/SIGTERM), no traceback, and no file outside the command's
--out changes. One class of cause per test (numbers as in the issue that found them)."""
import json
import os
import pathlib
import signal
import sqlite3
import stat
import subprocess
import sys
import time

import pytest
import torch

from treeopt.artefact import stamp, write_json
from treeopt.errors import BadInput
from treeopt.paths import SHIPPED

REPO = pathlib.Path(__file__).resolve().parent.parent
REF = SHIPPED / "reference" / "vicuna-7b-v1.3.acceptance.json"
SHIPPED_RUN = REPO / "reports" / "demo.run.json"


def snapshot(*roots) -> dict:
    out = {}
    for root in roots:
        for p in pathlib.Path(root).rglob("*"):
            st = p.lstat()
            out[str(p)] = (stat.S_IFMT(st.st_mode), st.st_size, st.st_mtime_ns)
    return out


def repo_state() -> str:
    return subprocess.run(["git", "status", "--porcelain"], cwd=REPO, capture_output=True,
                          text=True).stdout


class Sandbox:
    """A working folder and a $TREEOPT_HOME; checks that nothing else changed."""

    def __init__(self, tmp_path):
        self.dir = tmp_path
        self.home = tmp_path / "home"
        self.home.mkdir()

    def cli(self, *args, timeout=300):
        env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONWARNINGS="ignore",
                   TREEOPT_HOME=str(self.home))
        return subprocess.run([sys.executable, "-m", "treeopt.cli", *map(str, args)],
                              capture_output=True, text=True, timeout=timeout, env=env,
                              cwd=self.dir)

    def bad(self, *args, needle="", code=2):
        before, repo = snapshot(self.dir), repo_state()
        p = self.cli(*args)
        lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
        assert p.returncode == code, (args, p.stderr)
        assert len(lines) == 1 and "Traceback" not in p.stderr, (args, p.stderr)
        assert needle in lines[0], (args, lines[0])
        assert snapshot(self.dir) == before, f"{args} changed files"
        assert repo_state() == repo, f"{args} changed the repository"
        return lines[0]


@pytest.fixture
def box(tmp_path):
    return Sandbox(tmp_path)


def simulated_profile(box) -> pathlib.Path:
    p = box.dir / "p.json"
    assert box.cli("profile", "--simulate", "a100-80gb", "--model", "vicuna-7b", "--out",
                   p).returncode == 0
    return p


# 1 ---------------------------------------------------------------------------------------
def test_1_out_never_replaces_devices_or_symlinks(box):
    box.bad("report", "--run", SHIPPED_RUN, "--out", "/dev/null", needle="not a regular file")
    assert stat.S_ISCHR(os.stat("/dev/null").st_mode)
    target = box.dir / "target.html"
    target.write_text("mine")
    (box.dir / "link.html").symlink_to(target)
    box.bad("report", "--acceptance", REF, "--out", box.dir / "link.html",
            needle="symbolic link")
    assert (box.dir / "link.html").is_symlink() and target.read_text() == "mine"
    box.bad("report", "--acceptance", REF, "--out", box.dir, needle="is a folder")


# 2 ---------------------------------------------------------------------------------------
class _Evil:
    def __reduce__(self):
        return (os.system, (f"touch {pathlib.Path(os.environ['TREEOPT_HOME']) / 'pwned'}",))


def test_2_checkpoints_run_no_code(tmp_path):
    """train resumes with weights_only=True: a crafted checkpoint is refused, unrun.
    (Library level: the train verb needs the model and its data before it gets here.)"""
    from treeopt.training import load_checkpoint

    marker = pathlib.Path(os.environ["TREEOPT_HOME"]) / "pwned"
    ckpt = tmp_path / "checkpoint.pt"
    torch.save({"table": torch.zeros(3, 4), "evil": _Evil()}, ckpt)
    with pytest.raises(BadInput, match="not a treeopt checkpoint"):
        load_checkpoint(ckpt, (3, 4))
    assert not marker.exists()
    torch.save({"table": torch.full((3, 4), float("nan"))}, ckpt)
    with pytest.raises(BadInput, match="non-finite"):
        load_checkpoint(ckpt, (3, 4))


# 3 ---------------------------------------------------------------------------------------
def _poison(obj, keep=("schema",)):
    if isinstance(obj, dict):
        return {k: v if k in keep else _poison(v, keep) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_poison(v, keep) for v in obj]
    return "<script>alert(1)</script>" if isinstance(obj, str) else obj


def test_3_report_escapes_every_string(box):
    prof = simulated_profile(box)
    tree = box.dir / "t.json"
    assert box.cli("search", "--model", "vicuna-7b", "--profile", prof, "--max-input", "64",
                   "--out", tree).returncode == 0
    files = {}
    for name, src in (("profile", prof), ("tree", tree), ("run", SHIPPED_RUN),
                      ("acceptance", REF)):
        obj = json.loads(pathlib.Path(src).read_text())
        bad = _poison(obj, keep=("schema", "dtype", "path_probs"))
        if name == "tree":  # the states must stay a tree; all its other strings are poisoned
            bad["states"] = obj["states"]
        if name == "run":
            bad["margin_tolerance"] = "<script>alert(1)</script>"
        files[name] = box.dir / f"bad-{name}.json"
        write_json(files[name], bad)
    out = box.dir / "r.html"
    p = box.cli("report", "--profile", files["profile"], "--acceptance", files["acceptance"],
                "--tree", files["tree"], "--run", files["run"], "--allow-mixed", "--out", out)
    assert p.returncode == 0, p.stderr
    text = out.read_text()
    assert "<script" not in text and "&lt;script&gt;" in text


# 4 ---------------------------------------------------------------------------------------
def test_4_no_path_from_artefact_content(box):
    prof = json.loads(simulated_profile(box).read_text())
    prof["device_id"] = "../../../../tmp/x"
    write_json(box.dir / "evil.json", prof)
    before = set(os.listdir("/tmp"))
    p = box.cli("search", "--model", "vicuna-7b", "--profile", box.dir / "evil.json",
                "--max-input", "32")
    assert p.returncode == 0, p.stderr
    made = [q for q in box.home.rglob("*") if q.is_file()]
    assert made and all(q.parent == box.home / "profiles" for q in made), made
    assert not [n for n in set(os.listdir("/tmp")) - before if n.startswith("x__")]
    p = box.cli("profile", "--simulate", "../../x", "--peak-tflops", "100", "--bandwidth-gbs",
                "1000", "--model", "vicuna-7b")
    assert p.returncode == 0, p.stderr
    assert all(q.parent == box.home / "profiles" for q in box.home.rglob("*") if q.is_file())


# 5 ---------------------------------------------------------------------------------------
def test_5_non_finite_prompt_tokens(box):
    from safetensors.torch import save_file

    folder = box.dir / "pt"
    folder.mkdir()
    table = torch.zeros(3, 576)
    table[1, 7] = float("nan")
    save_file({"prompt_embeddings": table}, str(folder / "prompt_tokens.safetensors"))
    box.bad("run", "--prompt-tokens", folder, needle="NaN or infinite")
    box.bad("accept", "--prompt-tokens", folder, needle="NaN or infinite")


# 6 ---------------------------------------------------------------------------------------
def test_6_nan_and_inf_never_pass(box):
    prof = simulated_profile(box)
    text = prof.read_text()
    (box.dir / "nan.json").write_text(text.replace('"median_s": ', '"median_s": NaN, "x": ', 1))
    box.bad("search", "--model", "vicuna-7b", "--profile", box.dir / "nan.json",
            needle="malformed JSON")
    acc = json.loads(REF.read_text())
    acc["fit"] = {"correlation": [1.0, -2.0, 1.0]}
    write_json(box.dir / "a.json", acc)
    box.bad("search", "--model", "vicuna-7b", "--acceptance", box.dir / "a.json",
            needle="correlation")
    box.bad("profile", "--simulate", "a100-80gb", "--peak-tflops", "nan",
            needle="finite number")
    box.bad("run", "--temperature", "inf", needle="finite number")
    box.bad("train", "--minutes", "nan", "--prompts", "mt-bench", "--out", box.dir / "o",
            needle="finite number")


# 7 ---------------------------------------------------------------------------------------
def test_7_out_is_never_an_input(box):
    acc = box.dir / "a.json"
    acc.write_text(REF.read_text())
    box.bad("search", "--model", "vicuna-7b", "--acceptance", acc, "--out", acc,
            needle="also an input")
    run = box.dir / "r.json"
    run.write_text(SHIPPED_RUN.read_text())
    box.bad("report", "--run", run, "--out", run, needle="also an input")
    prof = box.dir / "measured.json"
    prof.write_text((SHIPPED / "cpu-amd-epyc-2c__SmolLM2-135M-Instruct__bfloat16.json")
                    .read_text())
    box.bad("profile", "--simulate", "a100-80gb", "--model", "vicuna-7b", "--calibration",
            prof, "--out", prof, needle="also an input")
    tree = box.dir / "t.json"
    tree.write_text((SHIPPED / "default__SmolLM2-135M-Instruct.tree.json").read_text())
    box.bad("bench", "--tree", tree, "--out", tree, needle="also an input")


# 8 ---------------------------------------------------------------------------------------
def test_8_tree_longer_than_the_context(box):
    states = {"1": [{"path": [r], "prompt_tokens": 1} for r in range(5000)]}
    write_json(box.dir / "big.json", {"schema": "treeopt.tree/1", "num_prompt_tokens": 1,
                                      "topk": 5000, "root_prompt_tokens": 1, "states": states})
    box.bad("run", "--tree", box.dir / "big.json", needle="the model's context is 8192")


# 9 ---------------------------------------------------------------------------------------
def test_9_bad_values_and_files_are_exit_2(box):
    (box.dir / "bin.jsonl").write_bytes(b"\x00\xff\xfe\x01binary")
    (box.dir / "bad.txt").write_bytes(b"caf\xe9 \xff")
    (box.dir / "deep.json").write_text("[" * 100000 + "]" * 100000)
    box.bad("bench", "--prompts", box.dir / "bin.jsonl", needle="not UTF-8")
    box.bad("run", "--prompt-file", box.dir / "bad.txt", needle="not UTF-8")
    box.bad("run", "--threads", "-3", needle="must be ≥ 1")
    box.bad("run", "--device", "nonsense", needle="auto, cpu or cuda")
    box.bad("run", "--temperature", "nan", needle="finite")
    box.bad("run", "--seed", "1e23", needle="not an integer")
    box.bad("accept", "--max-new-tokens", "1", needle="must be in 2..")
    box.bad("bench", "--offset", "1000", needle="no prompts at --offset 1000")
    box.bad("run", "--tree", box.dir / "deep.json", needle="malformed JSON")
    box.bad("report", "--acceptance", REF, "--out", box.dir, needle="is a folder")
    box.bad("search", "--model", "vicuna-7b", "--trials", "1", "--storage", "notaurl",
            needle="not a database URL")
    write_json(box.dir / "p.json", {"schema": "treeopt.profile/1", "model": "m"})
    box.bad("search", "--profile", box.dir / "p.json", needle="missing field")
    write_json(box.dir / "t.json", {"schema": "treeopt.tree/1", "num_prompt_tokens": 3,
                                    "states": {"3": "nope"}})
    box.bad("run", "--tree", box.dir / "t.json", needle="must be a list")


# 10 --------------------------------------------------------------------------------------
@pytest.mark.parametrize("sig,code,word", [(signal.SIGTERM, 143, "terminated"),
                                           (signal.SIGINT, 130, "interrupted")])
def test_10_interrupts_are_one_line_and_leave_no_running_trial(box, sig, code, word):
    import optuna

    db = f"sqlite:///{box.dir / 's.db'}"
    env = dict(os.environ, HF_HUB_OFFLINE="1", TREEOPT_HOME=str(box.home))
    proc = subprocess.Popen([sys.executable, "-m", "treeopt.cli", "search", "--model",
                             "vicuna-7b", "--trials", "500", "--storage", db],
                            stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env,
                            cwd=box.dir)
    deadline = time.time() + 60
    while time.time() < deadline:  # wait until a trial has started (read-only: optuna
        time.sleep(0.5)             # itself would race treeopt to create the tables)
        try:
            with sqlite3.connect(f"file:{box.dir / 's.db'}?mode=ro", uri=True) as con:
                if con.execute("SELECT count(*) FROM trials").fetchone()[0]:
                    break
        except sqlite3.Error:  # the database or its tables do not exist yet
            continue
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert proc.returncode == code, err
    assert lines == [f"treeopt search: {word}"], err
    study = optuna.load_study(study_name=optuna.study.get_all_study_names(db)[0], storage=db)
    assert not [t for t in study.trials if t.state == optuna.trial.TrialState.RUNNING]
    assert not list(box.home.rglob("*.json"))  # nothing half-written


def test_10_signals_are_held_inside_library_calls_then_delivered():
    from treeopt.errors import deferred_signals

    def outside(signum, frame):  # the CLI's handler (other tests may have changed it)
        raise KeyboardInterrupt

    reached, before = False, signal.signal(signal.SIGINT, outside)
    try:
        with pytest.raises(KeyboardInterrupt):
            with deferred_signals() as stopped:
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(0.05)  # a raising handler would have raised by now
                reached = True
                assert stopped == [signal.SIGINT]
        assert reached and signal.getsignal(signal.SIGINT) is outside
    finally:
        signal.signal(signal.SIGINT, before)


# 11 --------------------------------------------------------------------------------------
def test_11_secrets_are_masked(box, monkeypatch):
    line = box.bad("search", "--model", "vicuna-7b", "--trials", "1", "--storage",
                   "postgresql://alice:hunter2@127.0.0.1:1/db", needle="cannot open")
    assert "hunter2" not in line and "alice:***@" in line
    monkeypatch.setattr(sys, "argv", ["treeopt", "search", "--storage",
                                      "mysql://bob:s3cret@db.example/x"])
    assert "s3cret" not in stamp()["command"]


# 12 --------------------------------------------------------------------------------------
def test_12_minor_causes(box):
    box.bad("run", "--threads", "0", needle="must be ≥ 1")
    box.bad("search", "--model", "vicuna-7b", "--max-input", "100000",
            needle="the model's context is 2048")
    tree = json.loads((SHIPPED / "default__SmolLM2-135M-Instruct.tree.json").read_text())
    write_json(box.dir / "bool.json", dict(tree, topk=True))
    box.bad("run", "--tree", box.dir / "bool.json", needle="topk must be an integer")
    states = dict(tree["states"])
    states["01"] = states[next(iter(states))]
    write_json(box.dir / "keys.json", dict(tree, states=states))
    box.bad("run", "--tree", box.dir / "keys.json", needle="not a plain integer")
    p = box.cli("run", "--threads", "0", "--debug")
    assert p.returncode == 2
    folder = box.dir / "model"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(
        {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 8,
         "num_hidden_layers": 1, "num_attention_heads": 1, "intermediate_size": 8,
         "vocab_size": 16}))
    box.bad("run", "--model", folder, needle="no usable tokenizer files")
