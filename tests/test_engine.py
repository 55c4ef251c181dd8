"""The decode engine's own parts: the CUDA-graph runner (its capture/replay/fallback logic,
driven through stand-ins for torch.cuda on the CPU), padded input lengths and bucketed
contexts (what a GPU runs) kept lossless on the CPU, the store growing between calls, and
the run JSON saying how the steps ran."""
from __future__ import annotations

import contextlib
import random
import weakref

import pytest
import torch

from treeopt.batch import BatchDecoder
from treeopt.engine import Engine, graphs, kernels
from treeopt.errors import BadInput
from treeopt.measure import decode_host_work
from treeopt.runtime import Decoder
from treeopt.tiny import random_lookup, random_prompt_tokens, random_tree, tiny_model


class FakeCuda:
    """Enough of torch.cuda for the graph runner: a capture records the function (it does
    not run it), a replay runs what was recorded."""

    def __init__(self, fail: bool = False):
        self.fail, self.captures, self.replays = fail, 0, 0
        self.recording = None

    def install(self, monkeypatch):
        fake = self

        class Graph:
            def replay(self):
                fake.replays += 1
                self.fn()

        @contextlib.contextmanager
        def graph(g, pool=None):
            if fake.fail:
                raise RuntimeError("operation not permitted when stream is capturing")
            fake.captures += 1
            fake.recording = g
            yield

        @contextlib.contextmanager
        def stream(s):
            yield

        class Stream:
            def wait_stream(self, other):
                pass

        monkeypatch.setattr(torch.cuda, "graph_pool_handle", lambda: object())
        monkeypatch.setattr(torch.cuda, "CUDAGraph", Graph)
        monkeypatch.setattr(torch.cuda, "graph", graph)
        monkeypatch.setattr(torch.cuda, "stream", stream)
        monkeypatch.setattr(torch.cuda, "Stream", Stream)
        monkeypatch.setattr(torch.cuda, "current_stream", lambda: Stream())


def test_graphs_capture_once_per_key_and_replay(monkeypatch):
    fake = FakeCuda()
    fake.install(monkeypatch)
    runner = graphs.Graphs(torch.device("cuda"))
    assert runner.enabled and runner.status == "cuda graphs"
    state = {"calls": 0}
    out = torch.zeros(1)

    def step():
        state["calls"] += 1
        out.add_(1)
        return out

    first = runner.run(("B", 1), step)
    # the first call ran the step for real (the warm-up) and captured it (not run)
    assert state["calls"] == 2 and fake.captures == 1 and float(first) == 2
    runner.graphs[("B", 1)][0].fn = step  # what the stand-in replays
    again = runner.run(("B", 1), step)
    assert fake.replays == 1 and fake.captures == 1 and again is out
    runner.run(("B", 2), step)
    assert fake.captures == 2  # one graph per key


def test_a_failed_capture_falls_back_to_eager_and_says_why(monkeypatch):
    FakeCuda(fail=True).install(monkeypatch)
    runner = graphs.Graphs(torch.device("cuda"))
    calls = []
    assert runner.run((1,), lambda: calls.append(1) or torch.ones(1)) is not None
    assert not runner.enabled and runner.status.startswith("eager: CUDA graph capture failed")
    assert "not permitted" in runner.status
    runner.run((1,), lambda: calls.append(1) or torch.ones(1))
    assert len(calls) == 2  # eager from then on


def test_graphs_are_off_on_the_cpu_and_the_run_says_so():
    lm = tiny_model("llama")
    pt = random_prompt_tokens(lm, 3)
    dec = Decoder(lm, pt, random_tree(random.Random(1), 3, 6))
    res = dec.ppd([1, 2, 3], 8)
    assert res.graphs == "eager" and res.summary()["graphs"] == "eager"
    assert res.summary()["kernels"] == dec.engine().kernels.name
    assert not graphs.Graphs(torch.device("cpu")).enabled


@pytest.mark.parametrize("name", ["llama", "gemma3", "mistral"])
def test_padded_lengths_and_bucketed_contexts_stay_lossless(name):
    """What a GPU runs (input lengths padded to a multiple of 8, contexts bucketed to 16)
    on the CPU: padding rows are never accepted, their KV never kept; single and batched
    (continuous, with a plain entry in the schedule) equal HF generate."""
    lm = tiny_model(name)
    rng = random.Random(7)
    pt = random_prompt_tokens(lm, 3)
    tree = random_tree(rng, 3, 6, 10)
    tree.lookup = random_lookup(rng, tree)
    prompts = [[rng.randrange(32) for _ in range(n)] for n in (5, 40, 9)]
    prompts.append((prompts[0] * 4)[:12])
    plain = Decoder(lm, None, None)
    refs = [plain.hf_generate(ids, 24).output_ids for ids in prompts]
    dec = Decoder(lm, pt, tree)
    dec.engine_options = {"pad": 8, "grain": 16}
    for ids, ref in zip(prompts, refs):
        res = dec.ppd(ids, 24)
        assert res.output_ids == ref
        assert all(L % 8 == 0 for _, L in dec.engine().st._views)
    bd = BatchDecoder(lm, pt, {1: tree, 2: None, 3: tree}, pad=8, grain=16)
    out = bd.generate(prompts, 24, max_batch=3)
    assert [r.output_ids for r in out.results] == refs
    assert all(L % 8 == 0 for L in out.lengths) and all(C % 16 == 0 for C in out.contexts)


def test_the_store_grows_for_a_longer_call_and_forgets_its_graphs():
    lm = tiny_model("qwen2")
    pt = random_prompt_tokens(lm, 3)
    eng = Engine(lm, pt, {1: random_tree(random.Random(2), 3, 6)})
    eng.generate([[1, 2, 3]], 8)
    small = eng.st.store.length
    eng.graphs.graphs[("stale",)] = None
    eng.generate([[1] * 100], 40)
    assert eng.st.store.length > small and not eng.graphs.graphs
    kept = eng.st
    eng.generate([[4, 5]], 8)
    assert eng.st is kept  # big enough: made once


# ---- the engine's kernels -------------------------------------------------------------
def test_kernels_rule_packs_float32_on_an_x86_cpu_only(monkeypatch):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    monkeypatch.setattr(kernels.platform, "machine", lambda: "x86_64")
    assert kernels.choose(cpu, torch.float32) == ("onednn" if torch.backends.mkldnn.is_available()
                                                  else "stock")
    assert kernels.choose(cpu, torch.bfloat16) == "stock"
    assert kernels.choose(cuda, torch.float32) == "stock"
    assert kernels.choose(cpu, torch.float32, "stock") == "stock"
    monkeypatch.setattr(kernels.platform, "machine", lambda: "aarch64")
    assert kernels.choose(cpu, torch.float32) == "stock"
    with pytest.raises(BadInput, match="kernels 'fast' .* is not one of"):
        kernels.choose(cpu, torch.float32, "fast")
    monkeypatch.setenv("TREEOPT_KERNELS", "stock")  # the user's switch for `auto`
    monkeypatch.setattr(kernels.platform, "machine", lambda: "x86_64")
    assert kernels.choose(cpu, torch.float32) == "stock"
    monkeypatch.setenv("TREEOPT_KERNELS", "gpu")
    with pytest.raises(BadInput, match=r"kernels 'gpu' \(\$TREEOPT_KERNELS"):
        kernels.choose(cpu, torch.float32)
    with pytest.raises(BadInput, match="float32 on a CPU, not bfloat16 on cpu"):
        kernels.choose(cpu, torch.bfloat16, "onednn")


needs_onednn = pytest.mark.skipif(not torch.backends.mkldnn.is_available(),
                                  reason="PyTorch built without oneDNN")


@needs_onednn
def test_packed_kernels_leave_the_model_alone_and_are_made_once():
    lm = tiny_model("llama")
    before = {k: v.clone() for k, v in lm.model.state_dict().items()}
    linears = [m for m in lm.model.modules() if isinstance(m, torch.nn.Linear)]
    packed = kernels.kernels_for(lm.model, lm.device, lm.dtype, "onednn")
    assert kernels.kernels_for(lm.model, lm.device, lm.dtype, "onednn") is packed
    assert [m for m in lm.model.modules() if isinstance(m, torch.nn.Linear)] == linears
    assert all(torch.equal(v, before[k]) for k, v in lm.model.state_dict().items())
    assert not any(isinstance(m, torch.nn.Linear) for m in packed.body.modules())
    # what holds no linear is shared, not copied (norms, rotary tables, embeddings)
    assert packed.body.norm is lm.model.get_decoder().norm
    assert packed.body.layers[0].input_layernorm is lm.model.get_decoder().layers[0].input_layernorm
    x = torch.randn(2, 5, lm.config.hidden_size)
    assert torch.allclose(packed.head(x), lm.model.get_output_embeddings()(x), atol=1e-5)


@needs_onednn
@pytest.mark.parametrize("tied", [False, True])
def test_in_place_packing_holds_one_copy_and_decodes_as_hf(tied):
    """A model marked for packing in place (what `run` does) is packed at its first engine:
    every linear replaced and its dense weight freed at once, a head tied to the input
    embedding run by oneDNN on that one dense weight; the decode equals HF generate (run
    before the packing, stock kernels); the stock kernels are refused afterwards."""
    lm = tiny_model("llama", seed=1)
    if tied:
        lm.model.lm_head.weight = lm.model.get_input_embeddings().weight
    rng = random.Random(5)
    pt, tree = random_prompt_tokens(lm, 3), random_tree(rng, 3, 6, 10)
    prompts = [[rng.randrange(32) for _ in range(n)] for n in (5, 21)]
    refs = [Decoder(lm, None, None).hf_generate(ids, 16).output_ids for ids in prompts]
    assert kernels.in_place(lm.model, lm.device, lm.dtype) == "onednn"
    dense = [weakref.ref(m.weight) for m in lm.model.get_decoder().modules()
             if isinstance(m, torch.nn.Linear)]
    assert dense and all(r() is not None for r in dense)  # not packed before an engine
    dec = Decoder(lm, pt, tree)
    assert dec.engine().kernels.name == "onednn"
    assert all(r() is None for r in dense)  # freed without the garbage collector
    assert not any(isinstance(m, torch.nn.Linear) for m in lm.model.modules())
    head = lm.model.get_output_embeddings()
    assert isinstance(head, kernels.OneDNNLinear if tied else kernels.PackedLinear)
    assert (head.weight is lm.model.get_input_embeddings().weight) == tied
    for ids, ref in zip(prompts, refs):
        assert dec.ppd(ids, 16).output_ids == ref
    with pytest.raises(BadInput, match="packed in place"):
        kernels.kernels_for(lm.model, lm.device, lm.dtype, "stock")


@needs_onednn
@pytest.mark.parametrize("name", ["llama", "qwen2"])
def test_packed_and_stock_kernels_decode_alike(name):
    """The same prompts, tree and lookup through both kernel sets: each PPD decode equals
    HF generate (stock kernels) and the engine's own plain loop; the step's outside host
    work does not change with the kernels."""
    lm = tiny_model(name)
    rng = random.Random(3)
    pt = random_prompt_tokens(lm, 3)
    tree = random_tree(rng, 3, 6, 10)
    tree.lookup = random_lookup(rng, tree)
    prompts = [[rng.randrange(32) for _ in range(n)] for n in (6, 30)]
    refs = [Decoder(lm, None, None).hf_generate(ids, 20).output_ids for ids in prompts]
    outside = {}
    for kind in ("stock", "onednn"):
        dec, plain = Decoder(lm, pt, tree), Decoder(lm, None, None)
        dec.engine_options = plain.engine_options = {"kernels": kind}
        assert dec.engine().kernels.name == kind
        for ids, ref in zip(prompts, refs):
            assert dec.ppd(ids, 20).output_ids == ref
            assert plain.baseline(ids, 20).output_ids == ref
        host = decode_host_work(dec, prompts[1], 12)[1]
        assert host["forward_ops_per_step"] > 0
        outside[kind] = host["outside_ops_per_step"]
    assert outside["onednn"] == outside["stock"]
