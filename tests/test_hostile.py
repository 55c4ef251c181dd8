"""Hostile-but-realistic input, through the CLI: every bad input is one line on stderr,
exit 2 (130/143 for Ctrl-C/SIGTERM), no traceback, and no file outside the command's
--out changes. One class of cause per test (numbers as in the issue that found them)."""
import base64
import gzip
import json
import os
import pathlib
import resource
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

from conftest import SHIPPED_CPU_PROFILE, SHIPPED_CPU_TREE, run_cli
from test_cli import repo_status

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


class Sandbox:
    """A working folder and a $TREEOPT_HOME; checks that nothing else changed."""

    def __init__(self, tmp_path):
        self.dir = tmp_path
        self.home = tmp_path / "home"
        self.home.mkdir()

    def cli(self, *args, timeout=300, memory_gib=None, env=None):
        """The command in its own process where a memory cap is asserted (a hostile file
        must fail within it), else in this one (seconds of start-up saved)."""
        if memory_gib is None:
            with pytest.MonkeyPatch.context() as mp:
                mp.chdir(self.dir)
                return run_cli(*args, env={"TREEOPT_HOME": self.home, **(env or {})})
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore",
               "TREEOPT_HOME": str(self.home), **(env or {})}

        def limit():  # a hostile file must fail within bounded memory
            if memory_gib:
                cap = int(memory_gib * 2**30)
                resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
        return subprocess.run([sys.executable, "-m", "treeopt.cli", *map(str, args)],
                              capture_output=True, text=True, timeout=timeout, env=env,
                              cwd=self.dir, preexec_fn=limit)

    def bad(self, *args, needle="", code=2, timeout=300, memory_gib=None, env=None):
        before, repo = snapshot(self.dir), repo_status()
        p = self.cli(*args, timeout=timeout, memory_gib=memory_gib, env=env)
        lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
        assert p.returncode == code, (args, p.stderr)
        assert len(lines) == 1 and "Traceback" not in p.stderr, (args, p.stderr)
        assert needle in lines[0], (args, lines[0])
        assert snapshot(self.dir) == before, f"{args} changed files"
        assert repo_status() == repo, f"{args} changed the repository"
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
    prof.write_text((SHIPPED / "cpu-amd-epyc-avx512bf16-2c__SmolLM2-135M-Instruct__bfloat16.json")
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
    # a slice past the end names the slice; thousands of digits are one line, exit 2
    box.bad("bench", "--prompts", "mt-bench[100:200]", needle="no rows in slice [100:200]")
    box.bad("accept", "--prompts", "mt-bench[" + "9" * 5000 + ":]", needle="is past 10000000")
    box.bad("accept", "--prompts", "mt-bench[0:" + "0" * 5000 + "12345678901]",
            needle="row '12345678901' is past")
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
    # --debug shows the traceback of the error that stopped the verb (not "NoneType")
    (box.dir / "malformed.json").write_text('{"schema": "treeopt.tree/1", ')
    p = box.cli("run", "--tree", box.dir / "malformed.json", "--debug")
    assert p.returncode == 2, p.stderr
    assert "Traceback (most recent call last)" in p.stderr and "NoneType: None" not in p.stderr
    assert "BadInput" in p.stderr and "malformed JSON" in p.stderr.splitlines()[-1]
    folder = box.dir / "model"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(
        {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 8,
         "num_hidden_layers": 1, "num_attention_heads": 1, "intermediate_size": 8,
         "vocab_size": 16}))
    box.bad("run", "--model", folder, needle="no weights here, only its shape")
    (folder / "model.safetensors").write_bytes(b"not weights")
    box.bad("run", "--model", folder, needle="no usable tokenizer files")
    box.bad("run", "--prompt", "Hi", "--max-new-tokens", "2", "--dtype", "float32",
            env={"TREEOPT_KERNELS": "fastest"}, needle="kernels 'fastest' ($TREEOPT_KERNELS")


# ---- round 2: the surfaces hybrid trees, batches, trees in/out and families added ------
# Each test: the CLI, exit code, one stderr line, no traceback, no file changed outside
# --out, within bounded time and memory (`quick`).
SHIPPED_ACC = SHIPPED / "SmolLM2-135M-Instruct.acceptance.json"
QUICK = {}  # in this process (Sandbox.cli)
CAPPED = {"timeout": 120, "memory_gib": 3}  # hostile sizes: in a process of bounded memory


def _acc(**lookup) -> dict:
    acc = json.loads(SHIPPED_ACC.read_text())
    acc["lookup"].update(lookup)
    return acc


def _records(acc, **arrays) -> dict:
    rec = acc["lookup"]["records"]
    for key, values in arrays.items():
        rec[key] = base64.b64encode(__import__("numpy").asarray(values, dtype="int16")
                                    .tobytes()).decode() if key != "lengths" else values
    return acc


def test_r2_01_lookup_sizes_are_bounded(box):
    """max_tokens / max_ngram of 1e9 in acceptance files, tree files and trees nested in
    by_batch, named or found under $TREEOPT_HOME, are refused before any work."""
    write_json(box.dir / "a.json", _acc(max_tokens=10**9))
    box.bad("search", "--sources", "ppd,lookup", "--profile", SHIPPED_CPU_PROFILE,
            "--acceptance", box.dir / "a.json", needle="lookup chain length 1000000000 "
            "outside 1..64", **QUICK)
    tree = json.loads(SHIPPED_CPU_TREE.read_text())
    write_json(box.dir / "t.json", dict(tree, lookup=dict(tree["lookup"], max_ngram=10**9)))
    for verb in (("run", "--tree"), ("bench", "--tree"),
                 ("search", "--profile", SHIPPED_CPU_PROFILE, "--evaluate")):
        box.bad(*verb, box.dir / "t.json", needle="n-gram length 1000000000 outside 1..8",
                **QUICK)
    nested = dict(tree, by_batch={"1": dict(tree, lookup=dict(tree["lookup"],
                                                              max_tokens=10**9))})
    write_json(box.dir / "n.json", nested)
    box.bad("run", "--tree", box.dir / "n.json", needle="outside 1..64", **QUICK)
    # a user file under $TREEOPT_HOME, picked up without being named
    (box.home / "profiles").mkdir()
    write_json(box.home / "profiles" / "SmolLM2-135M-Instruct.acceptance.json",
               _acc(max_ngram=10**9))
    box.bad("search", "--sources", "ppd,lookup", "--profile", SHIPPED_CPU_PROFILE,
            needle="n-gram length 1000000000", **CAPPED)


def test_r2_02_every_input_is_protected_from_out(box):
    """Prompt files, the search report `report` reads beside --tree, and the tree that
    `accept --check-tree default` resolves are inputs: an --out naming one is refused."""
    prompts_file = box.dir / "p.jsonl"
    prompts_file.write_text(json.dumps({"prompt": "Say hi."}) + "\n")
    box.bad("bench", "--prompts", prompts_file, "--out", prompts_file, needle="also an input",
            **QUICK)
    assert prompts_file.read_text().startswith('{"prompt"')
    tree = box.dir / "t.tree.json"
    tree.write_text(SHIPPED_CPU_TREE.read_text())
    side = box.dir / json.loads(SHIPPED_CPU_TREE.read_text())["meta"]["search_report"]
    side.write_text((SHIPPED / side.name).read_text())
    box.bad("report", "--tree", tree, "--out", side, needle="also an input", **QUICK)
    from treeopt.device import device_slug
    from treeopt.paths import tree_name

    (box.home / "profiles").mkdir()
    mine = box.home / "profiles" / tree_name(device_slug("cpu"), "SmolLM2-135M-Instruct",
                                             "float32")
    mine.write_text(SHIPPED_CPU_TREE.read_text())
    box.bad("accept", "--check-tree", "default", "--device", "cpu", "--dtype", "float32",
            "--prompts", "mt-bench",
            "--limit", "2", "--out", mine,
            needle="also an input", **QUICK)


def test_r2_03_batch_file_prompts_are_capped(box):
    many = box.dir / "many.jsonl"
    many.write_text("".join(json.dumps({"prompt": f"Say {i}."}) + "\n" for i in range(300)))
    box.bad("run", "--batch-file", many, needle="300 prompts, at most 256", **CAPPED)


def test_r2_04_and_11_gzip_is_bounded_and_checked(box):
    bomb = box.dir / "bomb.jsonl.gz"
    with gzip.open(bomb, "wb", compresslevel=9) as f:
        chunk = b" " * (1 << 20)
        for _ in range(200):  # 200 MiB of text in ~200 KB
            f.write(chunk)
    assert bomb.stat().st_size < 1 << 20
    box.bad("bench", "--prompts", bomb, needle="more than 64 MiB", **CAPPED)
    (box.dir / "bad.jsonl.gz").write_bytes(b"\x1f\x8b\x08\x00" + b"garbage" * 50)
    box.bad("bench", "--prompts", box.dir / "bad.jsonl.gz", needle="corrupt gzip", **CAPPED)
    whole = gzip.compress(b'{"prompt": "hi"}\n' * 50)
    (box.dir / "cut.jsonl.gz").write_bytes(whole[:len(whole) // 2])
    box.bad("bench", "--prompts", box.dir / "cut.jsonl.gz", needle="gzip", **CAPPED)


@pytest.mark.parametrize("arrays,needle", [
    ({"match": "9"}, "a match value 9 outside 0..3"),
    ({"won": "-1"}, "a won value -1 outside 0..16"),
    ({"won": "17"}, "a won value 17 outside 0..16"),
    ({"lengths": "true"}, "lengths must be a list of integers"),
    ({"lengths": "2000000"}, "measured positions"),
])
def test_r2_05_and_12_lookup_record_values_are_checked(box, arrays, needle):
    acc = json.loads(SHIPPED_ACC.read_text())
    rec = acc["lookup"]["records"]
    n = sum(rec["lengths"])
    for key, v in arrays.items():
        if key == "lengths":
            rec["lengths"] = [True] * len(rec["lengths"]) if v == "true" else [int(v)]
            if v != "true":  # 2M positions of zeros: refused by count, never replayed
                for k, width in (("match", 1), ("won", 1), ("ranks", 3)):
                    rec[k] = base64.b64encode(bytes(2 * width * int(v))).decode()
        else:
            arr = __import__("numpy").frombuffer(base64.b64decode(rec[key]), dtype="int16")
            arr = arr.copy()
            arr[n // 2] = int(v)
            rec[key] = base64.b64encode(arr.tobytes()).decode()
    write_json(box.dir / "a.json", acc)
    box.bad("search", "--sources", "ppd,lookup", "--profile", SHIPPED_CPU_PROFILE,
            "--acceptance", box.dir / "a.json", needle=needle, **QUICK)
    box.bad("bench", "--acceptance", box.dir / "a.json", needle=needle, **QUICK)


def test_r2_06_integer_keys_are_plain_digits(box):
    tree = json.loads(SHIPPED_CPU_TREE.read_text())
    states = dict(tree["states"])
    states["²"] = states.pop("3")
    cases = {"state": dict(tree, states=states),
             "by_batch": dict(tree, by_batch={"²": None}),
             "policy": dict(tree, lookup=dict(tree["lookup"], policy={"3,²": [1, 0, 1]}))}
    for name, obj in cases.items():
        write_json(box.dir / f"{name}.json", obj)
        box.bad("run", "--tree", box.dir / f"{name}.json", needle="not", **QUICK)
    acc = json.loads(SHIPPED_ACC.read_text())
    acc["path_probs"] = {"0,²": 0.1}
    write_json(box.dir / "pp.json", acc)
    box.bad("search", "--profile", SHIPPED_CPU_PROFILE, "--acceptance", box.dir / "pp.json",
            needle="path_probs", **QUICK)
    write_json(box.dir / "ppd.json", {"¹": [[[0], 0.1, 1]]})
    box.bad("search", "--profile", SHIPPED_CPU_PROFILE, "--evaluate", box.dir / "ppd.json",
            needle="not a treeopt tree", **QUICK)


def test_r2_07_and_14_run_rows_and_tree_tables_are_validated(box):
    run = json.loads((REPO / "reports" / "batch.run.json").read_text())
    for row, needle in ((dict(run["batch"][0], batch=0), "batch size 0 outside 1..256"),
                        (dict(run["batch"][0], batch=-3), "batch size -3"),
                        ({k: v for k, v in run["batch"][0].items()
                          if k != "plain_tokens_per_second"}, "plain_tokens_per_second"),
                        (dict(run["batch"][0], tokens_per_step="2"), "finite number")):
        write_json(box.dir / "r.json", dict(run, batch=[row]))
        box.bad("report", "--run", box.dir / "r.json", "--out", box.dir / "r.html",
                needle=needle, **QUICK)
    fam = json.loads((REPO / "reports" / "families.run.json").read_text())
    write_json(box.dir / "f.json", dict(fam, families=[dict(fam["families"][0], prompts="3")]))
    box.bad("report", "--run", box.dir / "f.json", needle="'prompts'", **QUICK)
    tree = json.loads(SHIPPED_CPU_TREE.read_text())
    for bad, needle in ((dict(tree, by_batch=0), "by_batch' must be an object"),
                        (dict(tree, meta=dict(tree["meta"], batch=[{"batch": 2}])), "plain"),
                        (dict(tree, meta=dict(tree["meta"], batch=[
                            dict(tree["meta"]["batch"][0], input_length="8")])), "input_length")):
        write_json(box.dir / "t.json", bad)
        box.bad("report", "--tree", box.dir / "t.json", needle=needle, **QUICK)
        box.bad("bench", "--batch", "2", "--tree", box.dir / "t.json", needle=needle, **QUICK)
    write_json(box.dir / "ppd.json", {"format": "ppd", "tree": {"1": [[[0], "x", 1]]}})
    box.bad("run", "--tree", box.dir / "ppd.json", needle="p_end in [0, 1]", **QUICK)


def test_r2_08_dollar_signs_are_text_in_report_figures(box):
    fam = json.loads((REPO / "reports" / "families.run.json").read_text())
    fam["families"][0]["family"] = "$\\frac{1}{0"
    fam["device"] = "cost $5 and $"
    write_json(box.dir / "f.json", fam)
    tree = json.loads((SHIPPED / "sim-a100-80gb__SmolLM2-135M-Instruct__float16.tree.json").read_text())
    tree["meta"]["device"] = "$\\sqrt{x$"
    write_json(box.dir / "t.json", tree)
    p = box.cli("report", "--run", box.dir / "f.json", "--compare-tree", box.dir / "t.json",
                "--out", box.dir / "r.html", "--allow-mixed", **QUICK)
    assert p.returncode == 0, p.stderr
    html = (box.dir / "r.html").read_text()
    assert "frac{1}{0" in html
    assert "mathdefault" not in html  # tick labels plain, not raw maths text


def test_r2_09_hybrid_trees_keep_their_lookup_in_evaluate_and_export(box):
    p = box.cli("search", "--profile", SHIPPED_CPU_PROFILE, "--evaluate", SHIPPED_CPU_TREE,
                "--json", **QUICK)
    assert p.returncode == 0, p.stderr
    res = json.loads(p.stdout)
    meta = json.loads(SHIPPED_CPU_TREE.read_text())["meta"]
    assert res["given"]["method"] == "replay"
    assert abs(res["given"]["tokens_per_step"] - meta["replayed"]["hybrid"]["tokens_per_step"]) \
        < 1e-6
    assert res["given_ppd_only"]["tokens_per_step"] < res["given"]["tokens_per_step"]
    out = box.dir / "s.json"
    p = box.cli("search", "--profile", SHIPPED_CPU_PROFILE, "--static", "--sources",
                "ppd,lookup", "--export", "ppd", "--out", out, "--json", **QUICK)
    assert p.returncode == 0, p.stderr
    exp = json.loads((box.dir / "s.ppd.json").read_text())
    assert exp["exact"] is False and "prompt-lookup" in exp["not_expressible"][-1]
    assert exp["chosen_tree_predicted"]["tokens_per_step"] > exp["predicted"]["tokens_per_step"]
    # a hybrid tree with an acceptance file that has no lookup records: refused
    write_json(box.dir / "a.json", {k: v for k, v in json.loads(SHIPPED_ACC.read_text()).items()
                                    if k != "lookup"})
    box.bad("search", "--profile", SHIPPED_CPU_PROFILE, "--acceptance", box.dir / "a.json",
            "--evaluate", SHIPPED_CPU_TREE, needle="no lookup records", **QUICK)


def test_r2_10_batch_sizes_are_bounded(box):
    box.bad("profile", "--batch", "9" * 400, needle="values must be integers in 1..256",
            **QUICK)
    box.bad("profile", "--batch", "100000", needle="1..256", **QUICK)
    box.bad("search", "--batch", "1,100000", needle="1..256", **QUICK)
    box.bad("bench", "--batch", "0", needle="1..256", **QUICK)
    from treeopt.errors import is_oom

    assert is_oom(RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: "
                               "can't allocate memory: you tried to allocate 9 bytes"))
    assert is_oom(MemoryError()) and not is_oom(RuntimeError("shape mismatch"))


def test_r2_13_no_output_is_written_before_every_output_is_checked(box):
    (box.dir / "t.ppd.json").mkdir()
    box.bad("search", "--profile", SHIPPED_CPU_PROFILE, "--export", "ppd", "--out",
            box.dir / "t.json", needle="export", **QUICK)
    assert not (box.dir / "t.json").exists() and not (box.dir / "t.search.json").exists()


def test_r2_15_environment_folders(box):
    (box.dir / "file").write_text("x")
    box.bad("search", "--model", "vicuna-7b", "--trials", "1",
            env={"TREEOPT_CACHE": str(box.dir / "file")}, needle="is not a folder", **QUICK)
    box.bad("search", "--model", "vicuna-7b", "--trials", "1",
            env={"TREEOPT_CACHE": str(box.dir / "file" / "sub")}, needle="cannot create folder",
            **QUICK)
    box.bad("search", "--model", "vicuna-7b",
            env={"TREEOPT_HOME": "~nosuchuser-treeopt/x"}, needle="no such user", **QUICK)


def test_r2_16_flags_that_cannot_apply_are_refused(box):
    box.bad("search", "--model", "vicuna-7b", "--context", "99999999999999",
            needle="must be in 1..1048576", **QUICK)
    for extra in (("--batch", "1,2"), ("--export", "ppd"), ("--out", box.dir / "x.json")):
        box.bad("search", "--profile", SHIPPED_CPU_PROFILE, "--evaluate", SHIPPED_CPU_TREE,
                *extra, needle="--evaluate predicts one tree and writes nothing", **QUICK)
    p = box.dir / "p.jsonl"
    p.write_text(json.dumps({"prompt": "Hi."}) + "\n")
    (box.dir / "sub").mkdir()
    box.bad("bench", "--prompts", p, "--prompts", box.dir / "sub" / ".." / "p.jsonl",
            needle="given twice", **QUICK)


def test_r2_17_human_output_is_on_stdout(box):
    p = box.cli("search", "--model", "vicuna-7b", "--out", box.dir / "t.json", **QUICK)
    assert p.returncode == 0 and p.stderr == "", p.stderr
    assert "predicted" in p.stdout and "wrote" in p.stdout


# ---- round 3: corpus files, runs fed back as acceptance, --text, the bounds' sizes -------
SHIPPED_CORPUS = SHIPPED / "SmolLM2-135M-Instruct.corpus.json"


def _corpus(ids=None, **fields) -> dict:
    """The shipped corpus, its ids replaced (one document) and fields changed."""
    obj = json.loads(SHIPPED_CORPUS.read_text())
    if ids is not None:
        obj.update(lengths=[len(ids)], tokens=len(ids), documents=1, prompt_hashes=[],
                   ids=base64.b64encode(__import__("numpy").asarray(ids, dtype="<i4")
                                        .tobytes()).decode())
    obj.update(fields)
    return obj


def test_r3_01_every_file_read_is_an_input_before_outputs_are_checked(box):
    text = box.dir / "t.txt"
    text.write_text("The quick brown fox. " * 50)
    box.bad("corpus", "--text", text, "--out", text, needle="also an input", **QUICK)
    assert text.read_text() == "The quick brown fox. " * 50


def test_r3_02_ids_are_checked_against_the_model_not_the_file(box):
    """A corpus stating its own vocabulary size (2^31) with ids of 2e9; counts it states
    that its ids do not hold."""
    bad = box.dir / "c.json"
    bad.write_text(json.dumps(_corpus([5, 2_000_000_000, 7], tokenizer={
        **json.loads(SHIPPED_CORPUS.read_text())["tokenizer"], "vocab_size": 2**31 - 1})))
    box.bad("run", "--corpus", bad, "--prompt", "Hi", "--max-new-tokens", "4",
            needle="token id 2000000000 outside the model's vocabulary (0..49151)", **CAPPED)
    bad.write_text(json.dumps(_corpus([5, 6, 7], tokens=10**9)))
    box.bad("run", "--corpus", bad, "--prompt", "Hi", needle="'tokens' says 1000000000",
            **CAPPED)


def test_r3_03_bounds_are_ones_the_program_survives(box):
    """A 60 MB --text (under the 64 MiB prompt-text bound) under a 4 GB cap: tokenized in
    pieces, refused at the corpus bound; a corpus at the bound, with the cache at its
    bound, decodes under the same cap."""
    big = box.dir / "big.txt"
    big.write_text("All work and no play makes a dull model. " * 1_450_000)
    assert 55 << 20 < big.stat().st_size < 64 << 20
    box.bad("corpus", "--text", big, "--out", box.dir / "c.json",
            needle="more than 2000000 tokens", timeout=300, memory_gib=4)
    shipped = json.loads(SHIPPED_CORPUS.read_text())
    ids = __import__("numpy").frombuffer(base64.b64decode(shipped["ids"]), dtype="<i4")
    ids = __import__("numpy").resize(ids, 2_000_000)
    at_bound = box.dir / "bound.json"
    at_bound.write_text(json.dumps(_corpus(ids.tolist())))
    p = box.cli("run", "--corpus", at_bound, "--cache-tokens", "2000000", "--prompt", "Hi",
                "--max-new-tokens", "4", "--json", "--dtype", "float32", timeout=300,
                memory_gib=4)
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout)["corpus"]["tokens"] == 2_000_000


def test_r3_04_what_costs_time_is_bounded(box):
    """Prompts with records are bounded (2M empty ones in a run JSON); a search over more
    positions than it replays in bounded time replays an even sample and says so."""
    from treeopt import pooled

    acc = json.loads(SHIPPED_ACC.read_text())
    acc["lookup"]["records"]["lengths"] += [0] * 2_000_000
    (box.dir / "a.json").write_text(json.dumps(acc))
    box.bad("search", "--sources", "ppd,lookup", "--acceptance", box.dir / "a.json",
            needle="prompts with records 2000", **CAPPED)
    run = json.loads(SHIPPED_RUN.read_text())
    run["per_prompt"] = [{}] * 2_000_000
    (box.dir / "r.json").write_text(json.dumps(run))
    box.bad("report", "--run", box.dir / "r.json", "--out", box.dir / "r.html",
            needle="prompts with records 2000000", **CAPPED)
    acc = json.loads(SHIPPED_ACC.read_text())
    big = pooled.pool([acc] * 3, ["a", "b", "c"])  # 17k positions
    sample, note = pooled.capped(big, "big.json")
    n = sum(pooled.unpack_records(sample)["lengths"])
    assert n <= 12_000 and sample["sampled"]["of"] > 12_000 and "even sample" in note
    assert pooled.capped(acc, "shipped") == (acc, None)


@pytest.mark.parametrize("kind,edit,needle", [
    ("acceptance", {"model": 123}, "field 'model' is 123, expected a string"),
    ("acceptance", {"mean_context": "1" + "0" * 400}, "has 401 digits"),
    ("acceptance", {"mean_context": 2**62}, "context length 4611686018427387904 outside"),
    ("corpus", {"prompt_hashes": 5}, "prompt_hashes"),
    ("corpus", {"model": 123}, "field 'model' is 123"),
    ("corpus", {"tokens": "1e999"}, "out of range"),
    ("corpus", {"sources": "[" * 700 + "]" * 700}, "nested deeper than 32 levels"),
    ("corpus", {"sources": [{"a": {"b": 1}}]}, "sources[0] must be an object of at most"),
    ("profile", {"model": 123}, "field 'model' is 123"),
])
def test_r3_05_types_and_magnitudes_are_checked_at_the_read(box, kind, edit, needle):
    src = {"acceptance": SHIPPED_ACC, "corpus": SHIPPED_CORPUS,
           "profile": SHIPPED_CPU_PROFILE}[kind]
    obj = json.loads(src.read_text())
    raw = {k: v for k, v in edit.items() if isinstance(v, str) and v[:1] in "1[" and k != "model"}
    obj.update({k: (f"@@{k}@@" if k in raw else v) for k, v in edit.items()})
    text = json.dumps(obj)
    for k, v in raw.items():  # numbers and nesting Python's json would not write
        text = text.replace(f'"@@{k}@@"', v)
    f = box.dir / f"bad.{kind}.json"
    f.write_text(text)
    flag = {"acceptance": ["search", "--acceptance", f, "--profile", SHIPPED_CPU_PROFILE],
            "corpus": ["run", "--corpus", f, "--prompt", "Hi"],
            "profile": ["search", "--profile", f, "--acceptance", SHIPPED_ACC]}[kind]
    box.bad(*flag, needle=needle, **QUICK)


def test_r3_06_file_system_edges_and_bounded_lines(box, tmp_path):
    from treeopt import distill

    long = "x" * 300 + ".json"
    box.bad("search", "--acceptance", long, needle="cannot be opened", **QUICK)
    box.bad("search", "--acceptance", box.dir, needle="is a folder", **QUICK)
    box.bad("search", "--acceptance", "/dev/zero", needle="not a regular file", **CAPPED)
    fifo = box.dir / "fifo.json"
    os.mkfifo(fifo)
    box.bad("search", "--acceptance", fifo, needle="not a regular file", **CAPPED)
    box.bad("run", "--corpus", fifo, needle="not a regular file", **CAPPED)
    box.bad("search", "--profile", SHIPPED_CPU_PROFILE, "--out", box.dir / long,
            needle="over 255 bytes", **QUICK)
    huge = box.dir / "huge.json"
    with open(huge, "wb") as f:
        f.truncate((64 << 20) + 10)  # sparse: no 64 MiB written
    box.bad("run", "--corpus", huge, needle="larger than 64 MiB", **CAPPED)
    line = box.bad("search", "--acceptance", _write(box, {**json.loads(
        SHIPPED_ACC.read_text()), "model": ["x" * 10_000]}), needle="field 'model'", **QUICK)
    assert len(line) < 300
    # a poisoned greedy-answer cache entry is regenerated, not trusted
    entry = tmp_path / "entry.json"
    entry.write_text(json.dumps({"responses": [[1, 2], [3, 10**12]]}))
    assert distill._cached_responses(entry, 2, 49152) is None
    entry.write_text(json.dumps({"responses": [[1, 2], [3, 4]]}))
    assert distill._cached_responses(entry, 2, 49152) == [[1, 2], [3, 4]]
    assert distill._cached_responses(entry, 3, 49152) is None


def _write(box, obj) -> pathlib.Path:
    p = box.dir / "w.json"
    p.write_text(json.dumps(obj))
    return p


def test_r3_07_quiet_surprises_are_said(box):
    box.bad("search", "--acceptance", SHIPPED_ACC, "--acceptance", SHIPPED_ACC,
            "--profile", SHIPPED_CPU_PROFILE, needle="given twice", **QUICK)
    box.bad("bench", "--prompts", "mt-bench[٣:٥]", needle="no such file", **QUICK)
    empty = box.dir / "empty.txt"
    empty.write_text("  \n\n")
    t0 = time.perf_counter()
    box.bad("corpus", "--text", empty, "--model", box.dir / "no-such-model",
            needle="no text in it", **QUICK)  # checked before any model is looked for
    assert time.perf_counter() - t0 < 60
