"""Any Hugging Face causal LM: PPD greedy == plain greedy (our loop and HF `generate`) in
float32 on tiny random models of several architectures, including sliding-window ones
(window 16, so prompts and outputs cross it) and final-logit softcapping."""
import random

import pytest
import torch
import transformers as T

from treeopt.batch import BatchDecoder
from treeopt.runtime import Decoder
from treeopt.tiny import (CONFIGS, WINDOW, lossless_check, random_lookup, random_prompt_tokens,
                          random_tree, tiny_model)

@pytest.mark.parametrize("name", list(CONFIGS))
def test_lossless_across_architectures(name):
    lm = tiny_model(name)
    rng = random.Random(3)
    pt = random_prompt_tokens(lm, 3)
    for prompt_len in (5, 3 * WINDOW):  # shorter and longer than the window
        for _ in range(3):
            tree = random_tree(rng, 3, 6, max_nodes=10)
            dec = Decoder(lm, pt, tree)
            ids = [rng.randrange(32) for _ in range(prompt_len)]
            ref = dec.hf_generate(ids, 2 * WINDOW).output_ids
            assert dec.baseline(ids, 2 * WINDOW).output_ids == ref
            assert dec.ppd(ids, 2 * WINDOW).output_ids == ref, (name, prompt_len)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_ppd_decodes_to_the_models_last_position(name):
    """Near the context limit a step shrinks (the state's tree without chains, then one
    token) instead of stopping: PPD, single and every sequence of a batch, emits what HF
    generate emits up to the model's last position (48 here; a 20-token prompt gets
    49 − 20 = 29 tokens), with trees whose inputs are far longer than what is left."""
    lm = tiny_model(name)
    limit = lm.model.config.max_position_embeddings = 48
    rng = random.Random(11)
    pt = random_prompt_tokens(lm, 3)
    prompts = [[rng.randrange(32) for _ in range(n)] for n in (20, 9, 40)]
    prompts.append((prompts[1] * 5)[:30])  # repeats: prompt lookup proposes long chains
    refs = [Decoder(lm, None, None).hf_generate(ids, limit + 1 - len(ids)).output_ids
            for ids in prompts]
    assert [len(r) for r in refs] == [limit + 1 - len(p) for p in prompts]
    for i in range(3):
        tree = random_tree(rng, 3, 6, max_nodes=10)
        if i:
            tree.lookup = random_lookup(rng, tree)
        dec = Decoder(lm, pt, tree)
        for ids, ref in zip(prompts, refs):
            res = dec.ppd(ids, 100)
            assert res.output_ids == ref, (name, i, len(ids))
            assert res.finish_reason == "context"
        batched = BatchDecoder(lm, pt, {1: tree, 2: tree}).generate(prompts, 100, max_batch=3)
        assert [r.output_ids for r in batched.results] == refs, (name, i)


def test_the_lossless_check_passes_and_counts_every_decode():
    """The check `benchmarks/gpu_check.py` runs on a GPU, here on the CPU: every
    architecture, single and batched, hybrid trees among them."""
    rows = lossless_check("cpu", names=("llama", "gemma2"), trees=2, new_tokens=12)
    assert [r["architecture"] for r in rows] == ["llama", "gemma2"]
    assert all(r["decodes_checked"] == 18 and r["mismatches"] == 0 for r in rows)
    assert all(r["explained_flips"] == 0 and r["dtype"] == "float32" for r in rows)


def test_the_bfloat16_check_classifies_every_departure():
    """gpu_check's bf16 rows: every decode is identical to HF's, or a departure counted as a
    flip the measured noise explains (margin within the noise or an ulp) or a mismatch —
    each decode counted once."""
    rows = lossless_check("cpu", names=("llama", "qwen2"), trees=2, new_tokens=12,
                          dtype=torch.bfloat16)
    assert all(r["dtype"] == "bfloat16" and r["decodes_checked"] == 18 for r in rows)
    assert all(r["mismatches"] + r["explained_flips"] <= r["decodes_checked"] for r in rows)


def test_sliding_masks_hide_what_the_window_excludes():
    """The tree step's sliding-layer mask equals a per-query recompute: key visible iff
    allowed by the tree and q_pos − k_pos < window."""
    from treeopt.runtime import attention_masks

    from treeopt.engine.step import masks

    lm = tiny_model("gemma3")
    tree = random_tree(random.Random(4), 3, 6)
    dec = Decoder(lm, random_prompt_tokens(lm, 3), tree)
    eng = dec.engine()
    st, book = eng.ensure(1, 64), eng.books[1]
    ctx = 40
    st.ctx[0] = ctx
    for m in tree.states:
        plan = book.plan((m, ()))
        n = plan.length
        v = st.views(1, n)
        v.plan.copy_(torch.from_numpy(plan.row(n, eng.layout))[None])
        q_pos = (ctx + torch.from_numpy(plan.arrays["pos"])).tolist()
        got = masks(st, v, torch.tensor([q_pos]), ctx, v.allowed.bool())
        assert set(got) == {"sliding_attention", "full_attention"}
        k_pos = list(range(ctx)) + q_pos
        for kind, window in (("full_attention", None), ("sliding_attention", WINDOW)):
            mk = got[kind][0, 0]
            assert mk.shape == (n, ctx + n)
            for i, q in enumerate(q_pos):
                for j, k in enumerate(k_pos):
                    tree_ok = j < ctx or bool(plan.arrays["allowed"][i, j - ctx])
                    want = tree_ok and (window is None or q - k < window)
                    assert (mk[i, j] == 0).item() == want, (kind, i, j)
    one = attention_masks(T.LlamaConfig(), torch.ones(2, 3, dtype=torch.bool),
                          torch.tensor([5, 6]), torch.tensor([4, 5, 6]), torch.float32)
    assert torch.is_tensor(one) and one.shape == (1, 1, 2, 3) and (one == 0).all()


def test_no_deprecation_warning_from_treeopt_calls():
    """treeopt calls transformers with today's argument names: decoding (single, batched,
    hybrid) and the distillation pass draw no FutureWarning or DeprecationWarning, and
    transformers logs no deprecation (run under the pinned and the newest 5.x release)."""
    import logging
    import warnings

    from transformers.utils import logging as hf_logging

    from treeopt.batch import BatchDecoder
    from treeopt.distill import prefix_pass
    from treeopt.tiny import random_lookup

    lm = tiny_model("gemma2")
    rng = random.Random(5)
    tree = random_tree(rng, 3, 6)
    tree.lookup = random_lookup(rng, tree)
    dec = Decoder(lm, random_prompt_tokens(lm, 3), tree)
    ids = [rng.randrange(32) for _ in range(20)]
    logged: list[str] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: logged.append(record.getMessage())
    hf_root = logging.getLogger("transformers")  # it does not propagate to the root logger
    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_warning()
    hf_root.addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            dec.ppd(ids, 12)
            dec.baseline(ids, 12)
            BatchDecoder(lm, dec.prompt_tokens, {1: tree}).generate([ids, ids[:7]], 12)
            prefix_pass(lm, ids)
    finally:
        hf_root.removeHandler(handler)
        hf_logging.set_verbosity(level)
    bad = [f"{w.category.__name__}: {w.message}" for w in caught
           if issubclass(w.category, (FutureWarning, DeprecationWarning))]
    assert not bad, bad
    assert not [m for m in logged if "deprecat" in m.lower()], logged
