import contextlib
import io
import os
import tempfile
import types
import warnings

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# every output of the suite goes to a temporary $TREEOPT_HOME, never into the repository
# or the user's own folder (subprocesses inherit it)
os.environ["TREEOPT_HOME"] = tempfile.mkdtemp(prefix="treeopt-test-home-")
# one device identity on every machine (subprocesses inherit it): no shipped profile or
# tree is "this device's" wherever the suite runs; a test that means one names it
os.environ["TREEOPT_DEVICE_ID"] = "cpu-test-machine"
# ... and no first-run calibration (seconds a command): the tests that mean it turn it on
os.environ["TREEOPT_CALIBRATE"] = "0"

from treeopt.models import Loaded  # noqa: E402
from treeopt.paths import SHIPPED, cache_dir  # noqa: E402

# derived data every test may share: converted model weights and distillation's greedy
# answers, both stored under a key of what made them (a hit is the same content)
SHARED_CACHE = {name: cache_dir() / name for name in ("models", "distill")}


@pytest.fixture(autouse=True)
def own_home_and_cache(tmp_path_factory, monkeypatch):
    """Each test its own $TREEOPT_HOME and $TREEOPT_CACHE (subprocesses inherit them):
    nothing one test writes is found by another; the cache shares only what is keyed by
    its content (:data:`SHARED_CACHE`)."""
    base = tmp_path_factory.mktemp("own")
    cache = base / "cache"
    cache.mkdir()
    for name, folder in SHARED_CACHE.items():
        folder.mkdir(parents=True, exist_ok=True)
        (cache / name).symlink_to(folder, target_is_directory=True)
    monkeypatch.setenv("TREEOPT_HOME", str(base / "home"))
    monkeypatch.setenv("TREEOPT_CACHE", str(cache))


# the shipped CPU artefacts, named where a test means them (never found as "this device's":
# the suite's device identity is pinned above)
SHIPPED_CPU_PROFILE = SHIPPED / "cpu-amd-epyc-avx512bf16-2c__SmolLM2-135M-Instruct__bfloat16.json"
SHIPPED_CPU_TREE = SHIPPED / "cpu-amd-epyc-avx512bf16-2c__SmolLM2-135M-Instruct__bfloat16.tree.json"
SHIPPED_CPU_TREE_FP32 = SHIPPED / "cpu-amd-epyc-avx512bf16-2c__SmolLM2-135M-Instruct__float32.tree.json"


def tiny_loaded(vocab: int = 24, seed: int = 0, dtype=torch.float64, layers: int = 2) -> Loaded:
    """A random-init Llama small enough for property tests (float64: no near-ties)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64,
                      num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=512, bos_token_id=None, eos_token_id=None,
                      pad_token_id=None)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg).to(dtype).eval()
    model.generation_config.eos_token_id = None
    model.requires_grad_(False)
    return Loaded(model, None, "tiny-llama", "", torch.device("cpu"), dtype)


@pytest.fixture(scope="session")
def smollm():
    """The real embedded model in float32 (converted once into the user cache)."""
    from treeopt import models

    return models.load(None, dtype="float32", device="cpu")


@pytest.fixture(scope="session")
def smollm_greedy(smollm):
    """HF generate's greedy output on the real model (`ids`, `n` new tokens), each asked
    once per session: the independent reference several lossless tests share."""
    from treeopt.runtime import Decoder

    plain, memo = Decoder(smollm), {}

    def reference(ids: list[int], n: int) -> list[int]:
        key = (tuple(ids), n)
        if key not in memo:
            memo[key] = plain.hf_generate(ids, n).output_ids
        return memo[key]
    return reference


def state_plan(tree, m: int):
    """State m's plan as the engine builds it (no chains), with the pool layout it indexes:
    arrays src/pos/parent/depth/allowed/keep/slots/grown over tree positions."""
    from treeopt.engine.plans import Layout, PlanBook

    lay = Layout(vocab=1000, rows=tree.num_prompt_tokens, width=tree.rank_width, chains=0)
    return PlanBook(tree, lay).plan((m, ())), lay


def winner_paths(plan) -> list[list[int]]:
    """Per candidate winner w (root and nodes) the tree positions on root → w."""
    a = plan.arrays
    return [a["keep"][w, :a["grown"][w]].tolist() for w in range(plan.n_nodes + 1)]


def winner_slots(plan) -> list[list[int]]:
    """Per candidate winner w the tree positions of its prompt slots."""
    return [plan.arrays["slots"][w, :plan.next_state[w]].tolist()
            for w in range(plan.n_nodes + 1)]


class RecordedGraph:
    """A CPU stand-in for a CUDA graph (`Engine(capture=record_capture)`): capture records
    every aten op the step dispatches and leaves every tensor it wrote as it was (a real
    capture runs nothing); replay runs the recorded ops again on the tensors captured —
    so inputs must be in the standing buffers before a replay, and a buffer the loop
    replaced after capture is not seen, exactly as with CUDA graphs."""

    def __init__(self):
        self.ops: list[tuple] = []
        self.replays = 0

    def replay(self) -> None:
        from torch.utils._pytree import tree_flatten, tree_map

        env: dict[int, torch.Tensor] = {}

        def sub(x):
            return env.get(id(x), x) if isinstance(x, torch.Tensor) else x

        for func, args, kwargs, out in self.ops:
            new = func(*tree_map(sub, args), **tree_map(sub, kwargs))
            for o, n in zip(tree_flatten(out)[0], tree_flatten(new)[0]):
                if isinstance(o, torch.Tensor):
                    env[id(o)] = n
        if self.static is not env.get(id(self.static), self.static):
            self.static.copy_(env[id(self.static)])  # the graph's output memory
        self.replays += 1


def record_capture(fn, pool, stream):
    """Capture `fn` into a :class:`RecordedGraph` (the `capture=` of :mod:`treeopt.engine.graphs`)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    graph = RecordedGraph()
    saved: list[tuple[torch.Tensor, torch.Tensor]] = []

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            for i, a in enumerate(func._schema.arguments):  # keep what the op writes
                t = args[i] if i < len(args) else kwargs.get(a.name)
                if a.alias_info is not None and a.alias_info.is_write and \
                        isinstance(t, torch.Tensor):
                    saved.append((t, t.clone()))
            out = func(*args, **kwargs)
            graph.ops.append((func, args, kwargs, out))
            return out

    with Record():
        static = fn()
    for t, before in reversed(saved):  # capture ran nothing
        t.copy_(before)
    graph.static = static
    return graph, static


def run_cli(*args, env: dict | None = None) -> types.SimpleNamespace:
    """`treeopt ARGS` in this process, `env` set for the call (where a subprocess adds
    nothing but seconds): returncode, stdout, stderr, as subprocess.run gives them."""
    from treeopt.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), \
            warnings.catch_warnings(), pytest.MonkeyPatch.context() as mp:
        for k, v in (env or {}).items():
            mp.setenv(k, str(v))
        warnings.simplefilter("ignore")
        try:
            code = main([str(a) for a in args])
        except SystemExit as e:  # argparse's own refusals
            code = e.code
    return types.SimpleNamespace(returncode=code, stdout=out.getvalue(), stderr=err.getvalue())
