"""treeopt installed the way a user installs it: an sdist built offline from the working
tree, a wheel built from that sdist, the wheel installed into a fresh virtualenv (its
dependencies taken from the test environment), and `treeopt run` from outside the clone
finding the shipped tree exactly as the clone does."""
import json
import os
import pathlib
import subprocess
import sys
import sysconfig
import tarfile

import pytest

REPO = pathlib.Path(__file__).resolve().parent.parent
SHIPPED_ID = "cpu-amd-epyc-avx512bf16-2c"  # the identity of the shipped CPU trees
BUILD = "from setuptools import build_meta as b; import sys; print(b.build_{}(sys.argv[1]))"


def build(kind: str, src: pathlib.Path, out: pathlib.Path) -> pathlib.Path:
    """An sdist or wheel of `src` by setuptools' own backend: no isolation, no network."""
    p = subprocess.run([sys.executable, "-c", BUILD.format(kind), str(out)], cwd=src,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    return out / p.stdout.strip().splitlines()[-1]


def working_tree() -> list[str]:
    """The files a clone of this working tree holds (tracked and new, not ignored)."""
    p = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO,
                       capture_output=True, text=True)
    if p.returncode != 0:
        pytest.skip("not a git checkout")
    return [f for f in p.stdout.splitlines() if (REPO / f).is_file()]


def fresh_venv(where: pathlib.Path) -> pathlib.Path:
    """A virtualenv without pip whose only extra path is the test environment's
    site-packages (after its own): treeopt's dependencies, not its editable install."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(where)], check=True)
    py = where / "bin" / "python"
    purelib = subprocess.run([py, "-c", "import sysconfig; print(sysconfig.get_paths()"
                              "['purelib'])"], capture_output=True, text=True, check=True)
    (pathlib.Path(purelib.stdout.strip()) / "_test_deps.pth").write_text(
        sysconfig.get_paths()["purelib"] + "\n")
    return py


def run_json(cmd: list, cwd: pathlib.Path, home: pathlib.Path) -> dict:
    env = dict(os.environ, TREEOPT_HOME=str(home), TREEOPT_DEVICE_ID=SHIPPED_ID,
               TREEOPT_CALIBRATE="0", HF_HUB_OFFLINE="1")
    env.pop("PYTHONPATH", None)
    p = subprocess.run([*cmd, "run", "--prompt", "Hello", "--max-new-tokens", "8",
                        "--dtype", "bfloat16", "--json"], cwd=cwd, env=env,
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-2000:]
    return json.loads(p.stdout)


@pytest.mark.slow
def test_sdist_and_wheel_install_and_run_outside_the_clone(tmp_path):
    files = working_tree()
    src = tmp_path / "src"
    for f in files:
        (src / f).parent.mkdir(parents=True, exist_ok=True)
        (src / f).write_bytes((REPO / f).read_bytes())
    sdist = build("sdist", src, tmp_path / "dist")
    with tarfile.open(sdist) as tar:
        names = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
        tar.extractall(tmp_path / "unpacked", filter="data")
    wanted = {f for f in files if f.startswith(("treeopt/", "profiles/", "tests/"))
              and not f.endswith(".pyc")} | {"LICENSE", "README.md", "pyproject.toml",
                                             "setup.py"}
    assert wanted <= names, sorted(wanted - names)

    wheel = build("wheel", next((tmp_path / "unpacked").iterdir()), tmp_path / "dist")
    py = fresh_venv(tmp_path / "venv")
    subprocess.run([sys.executable, "-m", "pip", "--python", str(py), "install", "-q",
                    "--no-deps", "--no-index", str(wheel)], check=True, timeout=300)
    bin_ = py.parent
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    for cmd in ([bin_ / "treeopt", "--version"], [py, "-m", "treeopt", "--version"]):
        v = subprocess.run(cmd, cwd=outside, capture_output=True, text=True, timeout=60)
        assert v.returncode == 0 and v.stdout.strip() == "treeopt 0.1.0", v.stderr
    where = subprocess.run([py, "-c", "import treeopt.paths as p; print(p.SHIPPED)"],
                           cwd=outside, capture_output=True, text=True, check=True)
    shipped = pathlib.Path(where.stdout.strip())
    assert shipped.is_relative_to(tmp_path / "venv") and shipped.name == "profiles"

    installed = run_json([bin_ / "treeopt"], outside, tmp_path / "home-installed")
    clone = run_json([sys.executable, REPO / "cli.py"], REPO, tmp_path / "home-clone")
    tree = f"{SHIPPED_ID}__SmolLM2-135M-Instruct__bfloat16.tree.json"
    # artefact paths are stored relative to the folder holding profiles/: the package's
    # own copy there (the only one: nothing of the clone is on the installed path)
    assert installed["tree"] == clone["tree"] == f"profiles/{tree}"
    assert installed["prompt_tokens"] == clone["prompt_tokens"] == \
        "profiles/SmolLM2-135M-Instruct.prompt_tokens"
    assert (shipped / tree).is_file()
    assert installed["output_ids"] == clone["output_ids"]
    assert installed["tokens_per_step"] == clone["tokens_per_step"]
