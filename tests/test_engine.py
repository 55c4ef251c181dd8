"""The decode engine's own parts: the CUDA-graph runner (its capture/replay/fallback logic,
driven through stand-ins for torch.cuda on the CPU), padded input lengths and bucketed
contexts (what a GPU runs) kept lossless on the CPU, the store growing between calls, and
the run JSON saying how the steps ran."""
from __future__ import annotations

import random
import weakref

import pytest
import torch
import transformers
from conftest import record_capture

from treeopt.batch import BatchDecoder
from treeopt.engine import Engine, graphs, kernels
from treeopt.engine.plans import chain_room
from treeopt.errors import BadInput
from treeopt.models import Loaded
from treeopt.measure import decode_host_work
from treeopt.runtime import Decoder
from treeopt.tiny import CONFIGS, random_lookup, random_prompt_tokens, random_tree, tiny_model


def test_graphs_capture_once_per_key_and_replay():
    """Through the recording stand-in: the first call of a key runs the step (warm-up) and
    captures it without effect; later calls replay; one graph per key."""
    runner = graphs.Graphs(torch.device("cpu"), capture=record_capture)
    assert runner.enabled and runner.status == "cuda graphs" and runner.mode() == "graphed"
    out, calls = torch.zeros(1), []

    def step():
        calls.append(1)
        return out.add_(1)

    first = runner.run(("B", 1), step)
    assert len(calls) == 2 and runner.captures == 1 and float(first) == 1  # capture: no effect
    again = runner.run(("B", 1), step)
    assert float(again) == 2 and len(calls) == 2 and runner.graphs[("B", 1)][0].replays == 1
    runner.run(("B", 2), step)
    assert runner.captures == 2 and runner.capture_seconds > 0


def test_a_failed_capture_runs_eager_and_keeps_its_first_cause():
    """torch reports a failed capture as "invalidated" on its way out; the status names
    the error that invalidated it, and the steps run eagerly from then on."""
    def failing(fn, pool, stream):
        try:
            raise RuntimeError("operation not permitted when stream is capturing")
        finally:
            raise RuntimeError("CUDA error: operation failed due to a previous error "
                               "during capture (cudaErrorStreamCaptureInvalidated)")

    runner = graphs.Graphs(torch.device("cpu"), capture=failing)
    calls = []
    assert float(runner.run((1,), lambda: calls.append(1) or torch.ones(1))) == 1
    assert not runner.enabled and runner.status == (
        "eager: CUDA graph capture failed (RuntimeError: operation not permitted when stream "
        "is capturing)") == runner.mode()
    runner.run((1,), lambda: calls.append(1) or torch.ones(1))
    assert len(calls) == 2  # eager from then on
    lm = tiny_model("llama")
    dec = Decoder(lm, random_prompt_tokens(lm, 3), random_tree(random.Random(1), 3, 6))
    dec.engine_options = {"capture": failing}
    res = dec.ppd([1, 2, 3], 8)
    assert res.summary()["graphs"].startswith("eager: CUDA graph capture failed (RuntimeError: "
                                              "operation not permitted")
    assert res.output_ids == Decoder(lm).hf_generate([1, 2, 3], 8).output_ids


def test_a_dynamic_rotary_embedding_runs_eager_and_says_why():
    cfg = CONFIGS["llama"]()
    cfg.rope_parameters = {**(cfg.rope_parameters or {}), "rope_type": "dynamic", "factor": 2.0}
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg).eval().requires_grad_(False)
    model.generation_config.eos_token_id = None
    lm = Loaded(model, None, "tiny-dynamic", "", torch.device("cpu"), torch.float32)
    dec = Decoder(lm, random_prompt_tokens(lm, 3), random_tree(random.Random(2), 3, 6))
    dec.engine_options = {"capture": record_capture}
    res = dec.ppd([3, 1, 4, 1, 5], 10)
    assert res.graphs == "eager: rope_type 'dynamic' reads the sequence length on the host " \
        "every forward, which a CUDA graph cannot capture" and res.captures == 0
    assert res.output_ids == Decoder(lm).hf_generate([3, 1, 4, 1, 5], 10).output_ids


def test_out_of_memory_in_a_capture_reaches_the_caller():
    def oom(fn, pool, stream):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    runner = graphs.Graphs(torch.device("cpu"), capture=oom)
    with pytest.raises(torch.OutOfMemoryError):
        runner.run((1,), lambda: torch.ones(1))
    assert runner.enabled and runner.status == "cuda graphs"  # not silently eager


def test_the_profile_grid_stops_growing_where_a_capture_runs_out_of_memory():
    """The grid's out-of-memory sizing sees a capture's out of memory: the sizes past it
    are not timed (eagerly or at all), every timed point says it ran graphed."""
    from treeopt.measure import measure_points

    def oom_from_8_rows(fn, pool, stream):
        B, L = fn.args[1:3]
        if B * L >= 8:
            raise torch.OutOfMemoryError("CUDA out of memory (stand-in)")
        return record_capture(fn, pool, stream)

    lm = tiny_model("llama")
    dec = Decoder(lm, random_prompt_tokens(lm, 3), None)
    dec.engine_options = {"capture": oom_from_8_rows}
    points, fit = measure_points(dec, [1, 2, 4, 8, 16], [24], repeats=3, budget=0.5,
                                 quiet=True)
    assert [p["size"] for p in points] == [1, 2, 4] and fit == {24: 4}
    assert all(p["graphs"] == "graphed" for p in points)


@pytest.mark.parametrize("name", ["llama", "gemma3"])
def test_the_loop_under_a_recording_graph_decodes_as_eager_and_hf(name):
    """The decode loop with graphs that replay only what they recorded and a staging copy
    (as on a GPU): inputs must be copied into the standing buffers before each replay and
    outputs read before the next, or the steps differ from the eager engine's. Every
    sequence, single and batched, equals HF generate and takes the eager steps."""
    lm = tiny_model(name)
    rng = random.Random(7)
    pt = random_prompt_tokens(lm, 3)
    options = {"capture": record_capture, "staged": True, "pad": 8, "grain": 32}
    prompts = [[rng.randrange(32) for _ in range(n)] for n in (5, 21, 12)]
    prompts.append((prompts[0] * 4)[:14])  # repeats: prompt lookup proposes
    refs = [Decoder(lm).hf_generate(ids, 24).output_ids for ids in prompts]
    deep = 0
    for i in range(2):
        tree = random_tree(rng, 3, 6, 10)
        tree.lookup = random_lookup(rng, tree) if i else None
        graphed, eager = Decoder(lm, pt, tree), Decoder(lm, pt, tree)
        graphed.engine_options = options
        for ids, ref in zip(prompts, refs):
            g, e = graphed.ppd(ids, 24), eager.ppd(ids, 24)
            assert g.output_ids == e.output_ids == ref
            assert g.accepted == e.accepted  # step for step, not only the same text
            deep = max(deep, max(g.accepted))
        runner = graphed.engine().graphs
        assert runner.status == "cuda graphs" and runner.captures >= 1
        assert sum(gr.replays for gr, _ in runner.graphs.values()) > runner.captures
        bd = BatchDecoder(lm, pt, {1: tree, 3: tree}, **options)
        res = bd.generate(prompts, 24, max_batch=3)
        assert [r.output_ids for r in res.results] == refs
        assert res.captures >= 1 and res.results[0].graphs == "cuda graphs"
    assert deep >= 2  # guesses were accepted: the plans the device ran were the host's


def test_a_replaced_kv_store_is_freed_without_the_collector():
    """Nothing in a store points back at it: the engine's growth frees the old one at
    once (a GPU would otherwise hold both until the collector ran)."""
    import gc

    from treeopt.engine.kv import KVStore

    lm = tiny_model("llama")
    eng = Engine(lm, None, {1: None})
    gc.disable()
    try:
        with torch.inference_mode():
            eng.ensure(1, 40)
            old = weakref.ref(eng.st.store.kv)
            eng.st.store.at(slice(0, 1), 0, 8)  # used as a step uses it
            eng.ensure(3, 400)
        assert old() is None
        store = KVStore(lm.config, 2, 64, lm.device, lm.dtype)
        kv = weakref.ref(store.kv)
        del store
        assert kv() is None
        # a decoder's engines share one store: the tree's growth replaces the plain one's
        other = tiny_model("qwen2")
        dec = Decoder(other, random_prompt_tokens(other, 3), random_tree(random.Random(4), 3, 6))
        dec.baseline([1, 2, 3], 4)
        plain = weakref.ref(dec.engine(plain=True).st.store.kv)
        dec.ppd([1] * 300, 4)
        assert plain() is None and dec.engine(plain=True).st is None
        dec.baseline([1, 2, 3], 4)
        assert dec.engine(plain=True).st.store is dec.engine().st.store
    finally:
        gc.enable()


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
    """What a GPU runs (input lengths padded to a power of two below 8 and a multiple of 8
    above — plain steps one row —, contexts bucketed to 16) on the CPU: padding rows are
    never accepted, their KV never kept; single and batched (continuous, with a plain
    entry in the schedule) equal HF generate."""
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
        assert all(L in (1, 2, 4) or L % 8 == 0 for _, L in dec.engine().st._views)
    eng = dec.engine()
    assert [eng.bucket(n) for n in (1, 2, 3, 5, 8, 9, 17)] == [1, 2, 4, 8, 8, 16, 24]
    # keep moves the slots a path can fill (root, deepest node, every chain token), not L
    assert eng.max_path == 1 + tree.max_depth + chain_room(tree)
    assert all(v.keep.shape[-1] == v.ar_p.shape[0] == min(L, eng.max_path)
               for (_, L), v in eng.st._views.items())
    bd = BatchDecoder(lm, pt, {1: tree, 2: None, 3: tree}, pad=8, grain=16)
    out = bd.generate(prompts, 24, max_batch=3)
    assert [r.output_ids for r in out.results] == refs
    assert all(L in (1, 2, 4) or L % 8 == 0 for L in out.lengths)
    base = dec.baseline(prompts[0], 24)  # plain steps run one row, not eight
    assert base.output_ids == refs[0] and {L for _, L in dec.engine(plain=True).st._views} == {1}
    assert all(C % 16 == 0 for C in out.contexts)


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
