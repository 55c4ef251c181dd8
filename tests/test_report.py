import json
import os
import shutil
import subprocess
import tempfile

import pytest

from treeopt import report
from treeopt.artefact import write_json
from treeopt.errors import BadInput

from conftest import run_cli
from test_cli import assert_bad, treeopt

SECTIONS = ["header", "latency", "acceptance", "search", "tree", "run"]


@pytest.fixture(scope="module")
def artefacts(tmp_path_factory):
    d = tmp_path_factory.mktemp("art")
    prof, tree = d / "profile.json", d / "tree.json"
    assert treeopt("profile", "--simulate", "a100-80gb", "--model", "vicuna-7b", "--out",
                   str(prof)).returncode == 0
    p = treeopt("search", "--model", "vicuna-7b", "--profile", str(prof), "--max-input", "96",
                "--out", str(tree))
    assert p.returncode == 0, p.stderr
    run = {"schema": "treeopt.run/1", "kind": "bench", "model": "vicuna-7b-v1.3",
           "device": "cpu", "dtype": "float32", "prompts": 3, "tokens_per_step": 2.1,
           "tokens_per_second": 80.0, "hf_tokens_per_second": 40.0, "speedup_vs_hf": 2.0,
           "identical_fraction": 1.0, "unexplained_divergences": 0, "margin_tolerance": 0.0,
           "per_prompt": [{"speedup_vs_hf": s, "tokens_per_step": t, "identical": True}
                          for s, t in ((1.9, 2.0), (2.1, 2.2), (2.0, 2.1))]}
    write_json(d / "run.json", run)
    return {"profile": str(prof), "tree": str(tree), "run": str(d / "run.json"),
            "acceptance": "profiles/reference/vicuna-7b-v1.3.acceptance.json", "dir": d}


def test_bad_inputs(artefacts, tmp_path):
    with pytest.raises(BadInput, match="at least one"):
        report.build()
    assert_bad(run_cli("report"), "at least one")
    assert_bad(run_cli("report", "--profile", artefacts["tree"]), "field 'schema'")
    assert_bad(run_cli("report", "--tree", artefacts["tree"], "--acceptance",
                       "profiles/reference/vicuna-13b-v1.3.acceptance.json"), "--allow-mixed")
    p = treeopt("report", "--tree", artefacts["tree"], "--acceptance",
                "profiles/reference/vicuna-13b-v1.3.acceptance.json", "--allow-mixed",
                "--out", str(tmp_path / "m.html"))
    assert p.returncode == 0, p.stderr


def test_sections_only_for_given_inputs(artefacts, tmp_path):
    p = treeopt("report", "--acceptance", artefacts["acceptance"], "--json", "--out",
                str(tmp_path / "a.html"))
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout)["sections"] == ["acceptance"]
    text = (tmp_path / "a.html").read_text()
    assert "<script" not in text
    import re

    # no network fetches: nothing loads from a URL (namespace URIs are not fetched)
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//|url\(\s*["']?(https?:)?//""", text)


def _chromium():
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    return None


def test_report_in_headless_chromium(artefacts):
    chrome = _chromium()
    if chrome is None:
        pytest.skip("Chromium is not installed and could not be installed here "
                    "(make test installs the Debian package `chromium`)")
    out = artefacts["dir"] / "full.html"
    p = treeopt("report", "--profile", artefacts["profile"], "--acceptance",
                artefacts["acceptance"], "--tree", artefacts["tree"], "--run", artefacts["run"],
                "--out", str(out))
    assert p.returncode == 0, p.stderr
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             "--enable-logging=stderr", "--v=0"]
    with tempfile.TemporaryDirectory() as profile_dir:
        dom = subprocess.run([chrome, *flags, f"--user-data-dir={profile_dir}", "--dump-dom",
                              out.as_uri()], capture_output=True, text=True, timeout=120)
    assert dom.returncode == 0, dom.stderr[-2000:]
    console = [ln for ln in dom.stderr.splitlines() if "CONSOLE" in ln]
    assert not console, console
    for sec in SECTIONS:
        assert f'<section id="{sec}">' in dom.stdout, sec
    for fig in ("fig-latency", "fig-accept", "fig-search", "fig-tree", "fig-run"):
        assert f'id="{fig}"' in dom.stdout, fig
    assert dom.stdout.count("<svg") >= 5
    shot = artefacts["dir"] / "shot.png"
    with tempfile.TemporaryDirectory() as profile_dir:
        s = subprocess.run([chrome, *flags, f"--user-data-dir={profile_dir}",
                            f"--screenshot={shot}", "--window-size=1100,2400", out.as_uri()],
                           capture_output=True, text=True, timeout=120)
    assert s.returncode == 0 and shot.is_file(), s.stderr[-2000:]
    import matplotlib.image

    img = matplotlib.image.imread(str(shot))
    assert img.std() > 0.05  # not blank
    assert (img[..., :3].mean(-1) < 0.5).mean() > 0.005  # some dark ink: text and lines
    if os.environ.get("TREEOPT_KEEP_SCREENSHOT"):
        shutil.copy(shot, os.environ["TREEOPT_KEEP_SCREENSHOT"])


def test_report_numbers_are_the_artefacts_numbers(artefacts):
    """Every figure the report's tables print is the artefact's own, as stored or rounded
    as shown: the run's speeds, the search's prediction, the acceptance file's counts and
    its check of trees (measured and predicted tokens per step)."""
    import html
    import re

    from treeopt.paths import SHIPPED, search_report_path

    acc = json.loads((SHIPPED / "SmolLM2-135M-Instruct.acceptance.json").read_text())
    acc["check"] = {"trees": [  # what `accept --check-trees` adds
        {"tree": "chain <3>", "measured_tokens_per_step": 1.23456, "predicted_product": 1.3,
         "error_product": 0.053, "predicted_fitted": 1.25, "error_fitted": 0.0125},
        {"tree": "wide & deep", "measured_tokens_per_step": 2.0, "predicted_product": 1.9,
         "error_product": -0.05, "predicted_fitted": 2.01, "error_fitted": 0.005}]}
    tree = json.loads(open(artefacts["tree"]).read())
    run = json.loads(open(artefacts["run"]).read())
    searched = json.loads(search_report_path(artefacts["tree"]).read_text())
    text = report.build(acceptance=acc, tree=tree, run=run, allow_mixed=True,
                        search_report=searched)
    def section(name: str) -> str:
        return text.split(f"<section id='{name}'>")[1].split("</section>")[0]

    def kv(name: str) -> dict:
        return {html.unescape(k): html.unescape(v) for k, v in
                re.findall(r"<tr><th>(.*?)</th><td>(.*?)</td></tr>", section(name))}

    ran = kv("run")
    assert ran["tokens/s PPD"] == str(run["tokens_per_second"]) == "80.0"
    assert ran["tokens/s HF generate"] == "40.0" and ran["speedup vs HF generate"] == "2.0"
    assert ran["tokens/step (measured)"] == str(run["tokens_per_step"])
    assert ran["prompts"] == "3"
    pred = tree["meta"]["predicted"]
    assert kv("search")["predicted tokens/step"] == str(pred["tokens_per_step"])
    assert kv("search")["predicted tokens/s"] == str(pred["tokens_per_second"])
    accepted = kv("acceptance")
    assert accepted["positions"] == str(acc["positions"])
    assert accepted["prompts"] == str(acc["prompts"]) == "40"
    rows = re.findall(r"<tr><td>(.*?)</td><td>(.*?)</td><td>(.*?)</td><td>(.*?)</td></tr>",
                      section("acceptance"))
    check = acc["check"]["trees"]
    assert len(rows) == len(check) > 0
    for (name, measured, product, fitted), c in zip(rows, check):
        assert html.unescape(name) == c["tree"]
        assert measured == f"{c['measured_tokens_per_step']:.3f}"
        assert product == f"{c['predicted_product']:.3f} ({100 * c['error_product']:+.1f}%)"
        assert fitted == f"{c['predicted_fitted']:.3f} ({100 * c['error_fitted']:+.1f}%)"
