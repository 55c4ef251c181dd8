"""Tiny random models of several architectures, random trees and lookup policies, and the
losslessness check over them: PPD greedy output (single and batched) token-identical to
HF `generate`. The tests use them on the CPU; `benchmarks/gpu_check.py` runs the
same check on a GPU, where no weights are at hand.
"""
from __future__ import annotations

import random

import torch
import transformers as T

from .batch import BatchDecoder
from .evaluation import logit_margin
from .models import Loaded
from .prompt_tokens import PromptTokens
from .runtime import Decoder
from .sources import CACHE_MAX_NGRAM, SuffixCache
from .tree import Lookup, Node, Tree

SMALL = dict(vocab_size=32, hidden_size=32, intermediate_size=64, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=512, bos_token_id=None,
             eos_token_id=None, pad_token_id=None)
WINDOW = 16  # sliding windows small enough for prompts and outputs to cross them
CONFIGS = {
    "llama": lambda: T.LlamaConfig(num_hidden_layers=2, **SMALL),
    "qwen2": lambda: T.Qwen2Config(num_hidden_layers=2, **SMALL),
    "mistral": lambda: T.MistralConfig(num_hidden_layers=2, sliding_window=WINDOW, **SMALL),
    "gemma3": lambda: T.Gemma3TextConfig(
        num_hidden_layers=4, head_dim=8, sliding_window=WINDOW,
        layer_types=["sliding_attention", "full_attention"] * 2, **SMALL),
    "gemma2": lambda: T.Gemma2Config(num_hidden_layers=2, head_dim=8, sliding_window=WINDOW,
                                     final_logit_softcapping=5.0, **SMALL),
    "phi3": lambda: T.Phi3Config(num_hidden_layers=2, **SMALL),
}


def tiny_model(name: str, dtype=torch.float32, device: str = "cpu", seed: int = 0) -> Loaded:
    """A random-init model of architecture `name` (CONFIGS), no tokenizer, EOS off."""
    torch.manual_seed(seed)
    model = T.AutoModelForCausalLM.from_config(CONFIGS[name]()).to(dtype).to(device).eval()
    model.generation_config.eos_token_id = None
    model.requires_grad_(False)
    return Loaded(model, None, f"tiny-{name}", "", torch.device(device), dtype)


def random_prompt_tokens(lm: Loaded, k: int, seed: int = 0) -> PromptTokens:
    g = torch.Generator().manual_seed(seed)
    hidden = lm.model.config.hidden_size
    return PromptTokens(torch.randn(k, hidden, generator=g) * 0.5)


def random_tree(rng: random.Random, k: int, topk: int, max_nodes: int = 12) -> Tree:
    """A random valid dynamic tree: every state 1..k, prefix-closed, random counts."""
    states = {}
    for m in range(1, k + 1):
        paths = set()
        for _ in range(rng.randint(0, max_nodes)):
            parents = [()] + [p for p in paths if len(p) < m]
            parent = rng.choice(parents)
            used = {p[-1] for p in paths if len(p) == len(parent) + 1 and p[:-1] == parent}
            free = [r for r in range(topk) if r not in used]
            if free:
                paths.add(parent + (rng.choice(free),))
        states[m] = [Node(p, rng.randint(1, k)) for p in paths]
    return Tree(k, rng.randint(1, k), states, topk)


def random_lookup(rng: random.Random, tree: Tree, max_ngram: int = 3,
                  max_tokens: int = 6) -> Lookup:
    """A random chain policy for `tree` (prompt lookup's or the cache's; most (state,
    match) entries set)."""
    policy = {(m, n): (rng.randint(0, max_tokens), rng.choice([0, *sorted(tree.states)]),
                       rng.randint(0, 1))
              for m in [0, *tree.states] for n in range(1, max_ngram + 1)
              if rng.random() < 0.8}
    return Lookup(max_ngram, max_tokens, policy)


def lossless_check(device: str = "cpu", names=tuple(CONFIGS), trees: int = 3,
                   new_tokens: int = 2 * WINDOW, seed: int = 3, graphs: bool = True,
                   dtype: torch.dtype = torch.float32) -> list[dict]:
    """For each architecture, in `dtype` on `device`: random trees (half of them hybrid:
    prompt lookup on prompts that repeat, and a cache holding each reference output with
    every 7th token wrong, then the outputs themselves), prompts shorter and longer than
    the window; PPD single, every sequence of one batch, and the engine's plain loop,
    against HF `generate` (a reference sharing nothing with the engine: its own cache,
    masks and kernels). `graphs=False` runs the engine eagerly on a GPU (graphed vs eager).
    A decode that departs from HF's is *explained* when HF's logit margin at the first
    difference is within twice the reduction-order noise measured there
    (:func:`evaluation.logit_margin`, the bench's rule without a dtype floor: the floors
    were measured on a real model's logit scale), else a mismatch. Returns a row per architecture with the mismatches
    (none is the pass), the explained flips and how the engine ran its steps."""
    label = str(dtype).removeprefix("torch.")
    rows = []
    for name in names:
        lm = tiny_model(name, dtype, device)
        rng = random.Random(seed)
        pt = random_prompt_tokens(lm, 3)
        vocab = lm.model.config.vocab_size
        checked = mismatches = explained = 0
        status = set()
        for i in range(trees):
            tree = random_tree(rng, 3, 6, max_nodes=10)
            cache = None
            if i % 2:  # hybrid: lookup, and a cache that proposes right and wrong chains
                tree.lookup = random_lookup(rng, tree)
                tree.cache = random_lookup(rng, tree, CACHE_MAX_NGRAM)
                cache = SuffixCache(4000)
            dec = Decoder(lm, pt, tree, cache)
            dec.engine_options = {"graphs": graphs}
            prompts = [[rng.randrange(vocab) for _ in range(n)] for n in (5, 3 * WINDOW)]
            prompts.append((prompts[0] * 4)[:12])  # a repeating prompt: lookup proposes
            refs = [dec.hf_generate(ids, new_tokens).output_ids for ids in prompts]
            plain = [dec.baseline(ids, new_tokens).output_ids for ids in prompts]
            for ref in refs if cache else []:  # each reference, with every 7th token wrong
                cache.add([(t + (j % 7 == 6)) % vocab for j, t in enumerate(ref)])
            singles = [dec.ppd(ids, new_tokens).output_ids for ids in prompts]
            batched = BatchDecoder(lm, pt, {1: tree}, cache, graphs=graphs).generate(
                prompts, new_tokens).results
            status |= {r.graphs for r in batched} | {dec.engine().graphs.status}
            for ids, ref, base, one, many in zip(prompts, refs, plain, singles, batched):
                for out in (base, one, many.output_ids):
                    checked += 1
                    if out != ref:
                        div = logit_margin(dec, ids, ref, out)
                        ok = div is not None and div["explained"]
                        explained, mismatches = explained + ok, mismatches + (not ok)
        rows.append({"architecture": name, "device": device, "dtype": label,
                     "decodes_checked": checked, "mismatches": mismatches,
                     "explained_flips": explained,
                     "graphs": sorted(status)})
    return rows
