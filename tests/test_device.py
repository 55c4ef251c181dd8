"""A device's identity: CPUs of one name with different instruction sets are different
devices; trees and profiles are found for this device and dtype only, and one made for
another is never used without a line saying so."""
import json

import numpy as np
import pytest
import torch

from treeopt import calibrate, device, paths, pooled
from treeopt.export import load_tree
from treeopt.inputs import find_tree, foreign_notes, resolve_inputs, searched_for
from treeopt.runtime import Decoder
from treeopt.search import Options, add_sources, plain_if_faster, search
from treeopt.tiny import random_prompt_tokens
from treeopt.tree import Tree

from conftest import (SHIPPED_CPU_PROFILE, SHIPPED_CPU_TREE, SHIPPED_CPU_TREE_FP32, run_cli,
                      tiny_loaded)
from test_cli import repo_status, treeopt

SHIPPED_ID = "cpu-amd-epyc-avx512bf16-2c"


def test_cpus_of_one_name_differ_by_isa_class():
    base = {"fpu", "sse2", "avx", "fma"}
    classes = {
        "avx2": base | {"avx2"},
        "avx512": base | {"avx2", "avx512f", "avx512bw"},
        "avx512bf16": base | {"avx2", "avx512f", "avx512_bf16"},
        "amx": base | {"avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile"},
        "base": base,
    }
    got = {isa: device.cpu_isa(frozenset(flags), "x86_64") for isa, flags in classes.items()}
    assert got == {isa: isa for isa in classes}
    assert device.cpu_isa(frozenset({"fp", "asimd", "sve"}), "aarch64") == "sve"
    assert device.cpu_isa(frozenset({"fp", "asimd"}), "aarch64") == "neon"
    ids = {device.cpu_id("AMD EPYC", isa, 2) for isa in got.values()}
    assert len(ids) == len(classes)  # one name, five devices
    assert device.cpu_id("AMD EPYC", "avx512bf16", 2) == SHIPPED_ID
    assert device.cpu_id("AMD EPYC", "avx512bf16", 4) != SHIPPED_ID


def test_identity_is_pinned_by_the_environment(monkeypatch):
    monkeypatch.setenv("TREEOPT_DEVICE_ID", "My Box/../x")
    assert device.device_slug("cpu") == "my-box-.-x"  # slug(): a safe file-name part
    monkeypatch.delenv("TREEOPT_DEVICE_ID")
    here = device.device_slug("cpu")
    assert here.startswith("cpu-") and f"-{device.cpu_isa()}-" in here


def test_shipped_tree_is_found_for_its_device_and_dtype_only(monkeypatch):
    assert searched_for(load_tree(SHIPPED_CPU_TREE)) == (SHIPPED_ID, "bfloat16")
    assert searched_for(load_tree(SHIPPED_CPU_TREE_FP32)) == (SHIPPED_ID, "float32")
    monkeypatch.setenv("TREEOPT_DEVICE_ID", SHIPPED_ID)
    assert find_tree("SmolLM2-135M-Instruct", "cpu", "bfloat16") == SHIPPED_CPU_TREE
    assert find_tree("SmolLM2-135M-Instruct", "cpu", "float32") == SHIPPED_CPU_TREE_FP32
    default = paths.SHIPPED / paths.default_tree_name("SmolLM2-135M-Instruct")
    assert find_tree("SmolLM2-135M-Instruct", "cpu", "float16") == default  # other dtype
    monkeypatch.setenv("TREEOPT_DEVICE_ID", "cpu-arm-neoverse-sve-2c")  # no x86 class
    assert find_tree("SmolLM2-135M-Instruct", "cpu", "bfloat16") == default


def test_a_tree_of_this_cpus_class_comes_before_the_default(monkeypatch, tmp_path):
    """No tree for this CPU: one searched on a CPU of its architecture and this dtype is
    the nearest — same ISA class first, then nearest core count, yours before shipped."""
    assert device.cpu_class("cpu-amd-epyc-avx2-2c") == ("x86", "avx2", 2)
    assert device.cpu_class("cpu-test-machine") is None
    assert device.cpu_class("nvidia-h200-139gb") is None
    monkeypatch.setenv("TREEOPT_DEVICE_ID", "cpu-amd-epyc-avx2-2c")  # same name, no AVX-512
    assert find_tree("SmolLM2-135M-Instruct", "cpu", "bfloat16") == SHIPPED_CPU_TREE
    monkeypatch.setenv("TREEOPT_HOME", str(tmp_path))
    mine = paths.user_profiles() / paths.tree_name("cpu-intel-xeon-avx2-4c",
                                                   "SmolLM2-135M-Instruct", "bfloat16")
    mine.parent.mkdir(parents=True)
    mine.write_bytes(SHIPPED_CPU_TREE.read_bytes())
    assert find_tree("SmolLM2-135M-Instruct", "cpu", "bfloat16") == mine  # same ISA class
    monkeypatch.setenv("TREEOPT_DEVICE_ID", "cpu-amd-epyc-avx512bf16-8c")
    assert find_tree("SmolLM2-135M-Instruct", "cpu", "bfloat16") == SHIPPED_CPU_TREE


def test_foreign_tree_and_profile_get_a_line(monkeypatch):
    inp = resolve_inputs(None, str(SHIPPED_CPU_PROFILE), tree=str(SHIPPED_CPU_TREE))
    monkeypatch.setenv("TREEOPT_DEVICE_ID", SHIPPED_ID)
    assert foreign_notes(inp, "cpu", "bfloat16") == []
    notes = foreign_notes(inp, "cpu", "float32")
    assert len(notes) == 2 and all(f"{SHIPPED_ID} bfloat16" in n for n in notes)
    monkeypatch.setenv("TREEOPT_DEVICE_ID", "cpu-intel-xeon-avx512-2c")
    tree_note, prof_note = foreign_notes(inp, "cpu", "bfloat16")
    assert "searched for cpu-amd-epyc-avx512bf16-2c bfloat16, this is " \
        "cpu-intel-xeon-avx512-2c bfloat16" in tree_note and "treeopt search" in tree_note
    assert "measured on" in prof_note and "treeopt profile" in prof_note
    inp = resolve_inputs(None, want=("tree",), device="cpu", dtype="float32")
    assert inp.tree_src.endswith(SHIPPED_CPU_TREE_FP32.name)  # the x86 class's float32 tree
    assert "searched for cpu-amd-epyc-avx512bf16-2c float32, this is cpu-intel-xeon-avx512-2c " \
        "float32" in foreign_notes(inp, "cpu", "float32")[0]
    monkeypatch.setenv("TREEOPT_DEVICE_ID", "cpu-arm-neoverse-sve-2c")  # no tree of its class
    inp = resolve_inputs(None, want=("tree",), device="cpu", dtype="float32")
    assert inp.tree_src.endswith("default__SmolLM2-135M-Instruct.tree.json")
    assert "hand-made default" in foreign_notes(inp, "cpu", "float32")[0]


def test_run_says_its_tree_is_foreign_with_json_too(tmp_path):
    p = treeopt("run", "--tree", SHIPPED_CPU_TREE, "--dtype", "float32", "--prompt", "Hi",
                "--max-new-tokens", "4", "--corpus", "none", "--json")
    assert p.returncode == 0, p.stderr
    out = json.loads(p.stdout)
    assert out["new_tokens"] >= 1 and out["peak_memory"]["bytes"] > 0
    notes = [ln for ln in p.stderr.splitlines() if ln.startswith("note: tree")]
    assert len(notes) == 1 and "cpu-test-machine float32" in notes[0], p.stderr


# ---- first-run calibration and plain decoding ------------------------------------------
def test_at_batch_and_plain_decoding_through_ppd():
    tree = Tree.chain(2, 2)
    assert tree.at_batch(1) is tree
    table = Tree.chain(2, 2)
    table.by_batch = {1: None, 4: Tree.chain(1, 2)}
    assert table.at_batch(1) is None and table.at_batch(3) is None
    assert table.at_batch(9) is table.by_batch[4]
    lm = tiny_loaded(vocab=8)
    dec = Decoder(lm, random_prompt_tokens(lm, 2), table)
    assert dec.plain
    ids = [1, 2, 3, 4]
    res = dec.ppd(ids, 20)
    assert res.output_ids == dec.baseline(ids, 20).output_ids
    assert res.tokens_per_step == 1.0 and not Decoder(lm, dec.prompt_tokens, tree).plain


def _profile(t1: float, slope: float) -> dict:
    return {"schema": "treeopt.profile/1", "model": "SmolLM2-135M-Instruct",
            "dtype": "float32", "device": {"kind": "cpu", "name": "x"},
            "device_id": "cpu-x-avx2-2c", "simulated": False,
            "points": [{"batch": 1, "context": 256, "size": s, "median_s": t1 + slope * (s - 1)}
                       for s in (1, 2, 4, 8, 16, 32, 64)]}


def test_plain_wins_where_no_tree_pays_and_calibration_agrees():
    """On a device where every extra input token costs a whole forward, no tree pays: the
    search says plain decoding at B = 1, and calibration picks plain among the trees at
    hand; where extra tokens are nearly free, a tree wins both."""
    acc = json.loads((paths.SHIPPED / "SmolLM2-135M-Instruct.acceptance.json").read_text())
    acc = pooled.pool([acc], ["shipped"], 1500)  # a sample keeps the test quick
    rec = pooled.unpack_records(acc)
    for slope, plain_wins in ((0.05, True), (0.0002, False)):
        prof = _profile(0.05, slope)
        found = search(acc, prof, Options(max_input=64))
        add_sources(found, rec, ["ppd", "lookup"], 64)
        got = plain_if_faster(found)
        assert (got is not None) == plain_wins
        assert (found["solution"].tree.at_batch(1) is None) == plain_wins
        pick = calibrate.choose(calibrate.candidates("SmolLM2-135M-Instruct"), acc, prof)
        assert (pick["best"]["tree"] is None) == plain_wins
        assert len(pick["rows"]) >= 4  # plain, default, the shipped trees (+ their guesses)


@pytest.mark.slow
def test_calibration_keeps_a_profile_and_tree_the_next_command_finds(tmp_path):
    env = {"TREEOPT_CALIBRATE": "1", "TREEOPT_DEVICE_ID": "cpu-calibrated-2c",
           "TREEOPT_HOME": str(tmp_path)}
    args = ("run", "--dtype", "float32", "--prompt", "Say hello.", "--max-new-tokens", "6",
            "--json")
    p = treeopt(*args, env=env)
    assert p.returncode == 0, p.stderr
    got = json.loads(p.stdout)
    assert "calibrated in" in p.stderr and got["calibrated"]["chosen"]
    prof = json.loads((tmp_path / "profiles" / "cpu-calibrated-2c__SmolLM2-135M-Instruct__"
                       "float32.json").read_text())
    assert prof["short"]["error"] >= 0.2 and prof["device_id"] == "cpu-calibrated-2c"
    tree = json.loads((tmp_path / "profiles" / "cpu-calibrated-2c__SmolLM2-135M-Instruct__"
                       "float32.tree.json").read_text())
    assert tree["meta"]["calibrated"]["candidates"][0]["candidate"] == \
        got["calibrated"]["chosen"]
    p = run_cli(*args, env=env)  # found as this device's: no calibration, no note
    assert p.returncode == 0 and "calibrating:" not in p.stderr and "note: tree" not in p.stderr
    assert json.loads(p.stdout)["tree"].endswith("cpu-calibrated-2c__SmolLM2-135M-Instruct__"
                                                 "float32.tree.json")
    p = run_cli(*args, "--no-calibrate", env={**env, "TREEOPT_DEVICE_ID": "cpu-other-2c"})
    assert p.returncode == 0 and "calibrating:" not in p.stderr and "hand-made" in p.stderr


def test_a_short_profile_states_an_error_its_full_profile_keeps_within():
    """The stated error arithmetic on synthetic timings (no wall clock in a test): each
    point's error is its samples' p10–p90 half-spread over the median, at least
    MIN_ERROR; and a machine whose speed drifts by up to 20 % between sweeps, timed the
    short way (2 sweeps of 8) and the full way (3 sweeps of 30), has every short median
    within the stated error of the full one."""
    from treeopt.measure import summarize

    assert calibrate.stated_error([{"median_s": 0.02, "p10_s": 0.018, "p90_s": 0.026}]) == \
        calibrate.MIN_ERROR
    assert calibrate.stated_error([{"median_s": 0.02, "p10_s": 0.018, "p90_s": 0.026},
                                   {"median_s": 0.01, "p10_s": 0.004, "p90_s": 0.02}]) == 0.8
    rng = np.random.default_rng(0)
    for trial in range(200):
        truth = rng.uniform(0.01, 0.05)

        def sweeps(n_sweeps, n):
            return [x for _ in range(n_sweeps) for x in truth * rng.uniform(0.9, 1.1) *
                    rng.lognormal(0, 0.08, n)]

        short, full = summarize(sweeps(2, 8)), summarize(sweeps(3, 30))
        err = calibrate.stated_error([short])
        assert abs(short["median_s"] / full["median_s"] - 1) <= err, (trial, short, full)


@pytest.mark.slow
def test_demo_measures_a_short_profile_where_none_is_found(tmp_path):
    """The README's first command (`make demo`), shortened, on a device without a profile:
    the calibration's short profile (not the full grid), a search over every chain source
    the records measured, a bench; its report and run JSON land under $TREEOPT_HOME/demo
    and the repository is untouched."""
    before = repo_status()
    p = treeopt("demo", "--limit", "1", "--max-new-tokens", "8", "--dtype", "float32",
                "--json", env={"TREEOPT_DEVICE_ID": "cpu-demo-2c",
                               "TREEOPT_HOME": str(tmp_path)})
    assert p.returncode == 0, p.stderr
    out = json.loads(p.stdout)
    assert out["report"] == str(tmp_path / "demo" / "demo.html")
    assert (tmp_path / "demo" / "demo.html").is_file()
    assert json.loads((tmp_path / "demo" / "demo.run.json").read_text())["prompts"]
    assert repo_status() == before
    heads = out["headlines"]
    assert heads["profile"].startswith("measured a short one")
    assert "prompt lookup and the cache" in heads["search"] or "plain decoding" in \
        heads["search"]
    prof = json.loads((tmp_path / "profiles" / "cpu-demo-2c__SmolLM2-135M-Instruct__"
                       "float32.json").read_text())
    assert prof["short"]["sizes"] == calibrate.SIZES


# /proc/cpuinfo as each kind of machine writes it (first processor's block, trimmed)
CPUINFO = {
    "intel-amx": """processor\t: 0
vendor_id\t: GenuineIntel
cpu family\t: 6
model\t\t: 143
model name\t: Intel(R) Xeon(R) Platinum 8481C CPU @ 2.70GHz
flags\t\t: fpu vme de pse tsc msr pae mce cx8 apic sep mtrr pge mca cmov avx avx2 avx512f avx512dq avx512bw avx512vl avx512_bf16 avx512_vnni amx_bf16 amx_tile amx_int8
""",
    "amd-avx512bf16": """processor\t: 0
vendor_id\t: AuthenticAMD
cpu family\t: 25
model name\t: AMD EPYC 9B14
flags\t\t: fpu vme de pse tsc msr pae avx avx2 fma avx512f avx512dq avx512bw avx512vl avx512_bf16 avx512_vnni
""",
    "amd-avx2": """processor\t: 0
vendor_id\t: AuthenticAMD
cpu family\t: 25
model name\t: AMD EPYC 7B13
flags\t\t: fpu vme de pse tsc msr pae avx avx2 fma sha_ni vaes vpclmulqdq
""",
    "intel-avx2": """processor\t: 0
vendor_id\t: GenuineIntel
model name\t: Intel(R) Xeon(R) CPU E5-2686 v4 @ 2.30GHz
flags\t\t: fpu vme de pse tsc msr pae mce avx f16c rdrand hypervisor avx2 bmi2 erms
""",
    "neoverse-v1": """processor\t: 0
BogoMIPS\t: 2100.00
Features\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm jscvt fcma lrcpc dcpop sha3 sm3 sm4 asimddp sha512 sve asimdfhm dit uscat ilrcpc flagm ssbs paca pacg dcpodp svei8mm svebf16 i8mm bf16 dgh rng
CPU implementer\t: 0x41
CPU architecture: 8
CPU variant\t: 0x1
CPU part\t: 0xd40
CPU revision\t: 1
""",
    "ampere-altra": """processor\t: 0
BogoMIPS\t: 50.00
Features\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm lrcpc dcpop asimddp ssbs
CPU implementer\t: 0x41
CPU architecture: 8
CPU variant\t: 0x3
CPU part\t: 0xd0c
CPU revision\t: 1
""",
    "ampereone": """processor\t: 0
Features\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm jscvt fcma lrcpc dcpop sha3 sm3 sm4 asimddp sha512 asimdfhm dit uscat ilrcpc flagm ssbs sb paca pacg dcpodp flagm2 frint i8mm bf16 rng bti ecv
CPU implementer\t: 0xc0
CPU part\t: 0xac3
""",
}


@pytest.mark.parametrize("kind,name,isa,ident", [
    ("intel-amx", "Intel(R) Xeon(R) Platinum 8481C CPU @ 2.70GHz", "amx",
     "cpu-intel-r-xeon-r-platinum-8481c-cpu-2.70ghz-amx-8c"),
    ("amd-avx512bf16", "AMD EPYC 9B14", "avx512bf16", "cpu-amd-epyc-9b14-avx512bf16-8c"),
    ("amd-avx2", "AMD EPYC 7B13", "avx2", "cpu-amd-epyc-7b13-avx2-8c"),
    ("intel-avx2", "Intel(R) Xeon(R) CPU E5-2686 v4 @ 2.30GHz", "avx2",
     "cpu-intel-r-xeon-r-cpu-e5-2686-v4-2.30ghz-avx2-8c"),
    ("neoverse-v1", "Arm Neoverse-V1", "sve", "cpu-arm-neoverse-v1-sve-8c"),
    ("ampere-altra", "Arm Neoverse-N1", "neon", "cpu-arm-neoverse-n1-neon-8c"),
    ("ampereone", "Ampere AmpereOne", "neon", "cpu-ampere-ampereone-neon-8c"),
])
def test_device_identity_from_real_cpuinfo(kind, name, isa, ident):
    """Every machine kind's /proc/cpuinfo gives its own name and ISA class: on arm64 the
    flags are under `Features` and the name comes from implementer and part (so two Arm
    servers are not one identity and SVE is found); AVX-512 without bf16 is its own class."""
    from treeopt.device import cpu_class, cpu_id, cpu_isa, parse_cpuinfo

    got, flags = parse_cpuinfo(CPUINFO[kind])
    machine = "aarch64" if "Features" in CPUINFO[kind] else "x86_64"
    assert got == name and cpu_isa(flags, machine) == isa
    assert cpu_id(got, cpu_isa(flags, machine), 8) == ident
    assert cpu_class(ident) == ("arm" if machine == "aarch64" else "x86", isa, 8)


def test_an_unknown_arm_part_and_a_gpu_get_identities(monkeypatch):
    from treeopt.device import device_slug, parse_cpuinfo

    assert parse_cpuinfo("Features\t: fp asimd\nCPU implementer\t: 0x99\nCPU part\t: 0x123\n") \
        == ("Arm implementer 0x99 part 0x123", frozenset({"fp", "asimd"}))
    assert parse_cpuinfo("") == ("", frozenset())

    class Props:
        name, total_memory = "NVIDIA H100 80GB HBM3", 85_045_231_616

    monkeypatch.delenv("TREEOPT_DEVICE_ID")
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: Props())
    assert device_slug("cuda") == "nvidia-h100-80gb-hbm3-79gb"
    monkeypatch.setenv("TREEOPT_DEVICE_ID", "My Box/1")
    assert device_slug("cuda") == device_slug("cpu") == "my-box-1"


def test_calibration_never_replaces_what_the_user_named(monkeypatch, tmp_path):
    """First-run calibration happens only where nothing was named: a --tree or --profile
    of the user's turns it off (the rule, then end to end: the named tree runs, nothing is
    written for this device)."""
    from types import SimpleNamespace as NS

    from treeopt.verbs.calibration import wanted

    monkeypatch.setenv("TREEOPT_CALIBRATE", "1")
    dec = NS(lm=NS(tokenizer=object()))
    inp = NS(profile=None, acceptance={"lookup": {}})
    assert wanted(NS(tree=None, profile=None), inp, dec)
    assert not wanted(NS(tree="t.json", profile=None), inp, dec)
    assert not wanted(NS(tree=None, profile="p.json"), inp, dec)
    assert not wanted(NS(tree=None, profile=None, no_calibrate=True), inp, dec)
    assert not wanted(NS(tree=None, profile=None), NS(profile={}, acceptance=inp.acceptance),
                      dec)
    assert not wanted(NS(tree=None, profile=None), NS(profile=None, acceptance=None), dec)
    monkeypatch.setenv("TREEOPT_CALIBRATE", "0")
    assert not wanted(NS(tree=None, profile=None), inp, dec)
    env = {"TREEOPT_CALIBRATE": "1", "TREEOPT_DEVICE_ID": "cpu-named-2c",
           "TREEOPT_HOME": str(tmp_path)}
    p = treeopt("run", "--tree", SHIPPED_CPU_TREE_FP32, "--dtype", "float32", "--prompt",
                "Say hello.", "--max-new-tokens", "6", "--json", env=env)
    assert p.returncode == 0, p.stderr
    assert "calibrating:" not in p.stderr and "calibrated" not in json.loads(p.stdout)
    assert json.loads(p.stdout)["tree"] == paths.display_path(SHIPPED_CPU_TREE_FP32)
    # no profile or tree for this device: only the run's text for the next prediction
    assert [str(f.relative_to(tmp_path)) for f in tmp_path.rglob("*.json")] == [
        "recent/SmolLM2-135M-Instruct.acceptance.json"]
