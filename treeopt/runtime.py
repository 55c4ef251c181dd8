"""The decoder a verb holds: a loaded model, its prompt tokens, a tree and the chain
sources, checked once; decoding itself is the engine's (:mod:`treeopt.engine`): the one
loop, one sequence or many, PPD or plain.

One PPD step (state m = number of guess rows available)::

    tokens  = [x0] + guesses / chain tokens at the tree's nodes      (the plan's sources)
    embeds  = embed(tokens) ++ prompt_table[slot_token]             (+ every node's slots)
    h       = decoder(embeds, 4-D tree mask, positions = ctx + depth)
    pred    = argmax(lm_head(h))                            (the model's own next tokens)
    w       = deepest node whose path all matches the parent's pred       (on the device)
    emit tokens on root→w (without x0) + pred[w]; keep only that path's KV
    guesses = topk(lm_head(h[prompt slots of w]))                   (next state = n(w))

Greedy verification is lossless: every emitted token is the base model's argmax given the
emitted prefix (:mod:`treeopt.engine.step`).
"""
from __future__ import annotations

import time

import torch

from . import corpus as corpora
from . import online, prompts
from .device import sync
from .engine import Engine, kernels
from .engine.loop import OnTokens
from .engine.results import Result, full_steps  # noqa: F401 - re-exported
from .errors import BadInput
from .forward import attention_masks, logits_of, model_call, new_cache  # noqa: F401
from .models import Loaded, dtype_name, load
from .prompt_tokens import PromptTokens
from .sources import CACHE_TOKENS, SuffixCache
from .tree import Tree


class Decoder:
    """Owns a loaded model, its prompt tokens and a tree's precomputed buffers."""

    engine_options: dict = {}  # Engine keywords (graphs, pad, grain) for every engine made

    def __init__(self, loaded: Loaded, prompt_tokens: PromptTokens | None = None,
                 tree: Tree | None = None, cache: SuffixCache | None = None):
        self.lm = loaded
        self.cache_source = cache  # the model's earlier text; each PPD decode's output joins it
        self.model = loaded.model
        self.device, self.dtype = loaded.device, loaded.dtype
        self.embed = self.model.get_input_embeddings()
        self.eos = set(loaded.eos_ids)
        self.set_tree(tree, prompt_tokens)

    def set_tree(self, tree: Tree | None, prompt_tokens: PromptTokens | None) -> None:
        self.tree = tree
        self.prompt_tokens = prompt_tokens
        self._engines: dict[str, Engine] = {}
        self.table = None  # the prompt tokens' embeddings (accept and distill read them)
        # a tree whose per-batch table says plain decoding for one sequence (no tree pays
        # there): `ppd` then decodes with the plain loop
        self.plain = tree is not None and tree.at_batch(1) is None
        if tree is None:
            return
        if prompt_tokens is None:
            raise BadInput("PPD decoding needs prompt tokens")
        prompt_tokens.check_model(self.model)
        if tree.num_prompt_tokens > prompt_tokens.num:
            raise BadInput(f"tree uses {tree.num_prompt_tokens} prompt tokens, only "
                           f"{prompt_tokens.num} are loaded")
        vocab = self.model.get_output_embeddings().weight.shape[0]
        if tree.rank_width > vocab:
            raise BadInput(f"tree uses rank {tree.rank_width - 1}, the vocabulary has {vocab}")
        self.check_length(tree.max_input_length)
        self.table = prompt_tokens.to(self.device, self.dtype)

    def use_tree(self, tree: Tree, cache_tokens: int = CACHE_TOKENS) -> None:
        """Decode with another tree and the same prompt tokens; one with cache chains gets
        an empty cache source where the decoder has none (it learns this process's
        outputs alone, as :func:`open_decoder` gives such a tree)."""
        if tree.cache is not None and self.cache_source is None:
            self.cache_source = SuffixCache(cache_tokens)
        self.set_tree(tree, self.prompt_tokens)

    @property
    def cache_settings(self) -> dict | None:
        """The cache source's settings (what a run's records say of it), or None."""
        return self.cache_source.settings() if self.cache_source is not None else None

    def remember(self, output_ids: list[int]) -> None:
        """A finished request's output joins the cache for the next ones."""
        if self.cache_source is not None:
            self.cache_source.add(output_ids)

    # ---- model calls --------------------------------------------------------------
    def call(self, embeds: torch.Tensor, cache, positions: torch.Tensor, mask=None,
             head: bool = True) -> torch.Tensor:
        return model_call(self.model, embeds, cache, positions, mask, head)

    def check_length(self, length: int) -> None:
        limit = self.lm.max_context
        if length >= limit:
            raise BadInput(f"the tree's forward input is {length} tokens, the model's context "
                           f"is {limit}")

    def check_prompt(self, input_ids: list[int], max_new_tokens: int) -> None:
        if not input_ids:
            raise BadInput("empty prompt")
        if max_new_tokens < 1:
            raise BadInput(f"max_new_tokens must be ≥ 1, got {max_new_tokens}")
        limit = self.lm.max_context
        if len(input_ids) + 1 >= limit:
            raise BadInput(f"prompt is {len(input_ids)} tokens, the model's context is {limit}")

    def encode_prompts(self, texts: list[str], max_new_tokens: int, raw: bool = False,
                       label: str = "prompt") -> list[list[int]]:
        """Encode every text (chat template unless raw) and check it fits; the error names
        the prompt."""
        out = []
        for i, text in enumerate(texts):
            ids = prompts.encode(self.lm.tokenizer, text, raw=raw)
            try:
                self.check_prompt(ids, max_new_tokens)
            except BadInput as e:
                raise BadInput(f"{label} {i}: {e}") from e
            out.append(ids)
        return out

    def prefill(self, input_ids: list[int], extra: torch.Tensor | None = None):
        """(cache, logits) of one causal forward over the prompt (+ `extra` embeddings,
        whose KV the caller drops)."""
        embeds = self.embed(torch.tensor(input_ids, device=self.device))
        if extra is not None:
            embeds = torch.cat([embeds, extra])
        cache = new_cache()
        logits = self.call(embeds, cache, torch.arange(len(embeds), device=self.device))
        return cache, logits

    # ---- decoding: the engine's one loop ----------------------------------------------
    def engine(self, plain: bool = False) -> Engine:
        """The engine of this decoder's tree (or of plain decoding), made on first use."""
        kind = "plain" if plain or self.tree is None or self.plain else "tree"
        if kind not in self._engines:
            tree = None if kind == "plain" else self.tree
            self._engines[kind] = Engine(self.lm, self.prompt_tokens if tree else None,
                                         {1: tree}, self.cache_source if tree else None,
                                         **self.engine_options)
            online.attach(self._engines[kind])
        return self._engines[kind]

    def _one(self, engine: Engine, input_ids: list[int], max_new_tokens: int, **kw) -> Result:
        self.check_prompt(input_ids, max_new_tokens)
        engine.eos = self.eos
        return engine.generate([input_ids], max_new_tokens, **kw).results[0]

    def ppd(self, input_ids: list[int], max_new_tokens: int = 128, temperature: float = 0.0,
            eps: float = 0.09, alpha: float = 0.3, seed: int | None = None,
            on_tokens: OnTokens | None = None, timed: bool = False,
            learn: bool = True) -> Result:
        """Decode with the tree (plain where its table says no tree pays for one
        sequence). `timed` also records each step's device time (one more sync a step);
        `learn`: the output joins the cache source afterwards."""
        if self.tree is None:
            raise BadInput("no tree loaded")
        res = self._one(self.engine(), input_ids, max_new_tokens, temperature=temperature,
                        eps=eps, alpha=alpha, seed=seed, on_tokens=on_tokens, timed=timed,
                        learn=learn)
        if self.plain and learn:
            self.remember(res.output_ids)
        return res

    def baseline(self, input_ids: list[int], max_new_tokens: int = 128,
                 temperature: float = 0.0, seed: int | None = None,
                 on_tokens: OnTokens | None = None, timed: bool = False) -> Result:
        """Plain autoregressive decoding: the same engine, one token a step."""
        return self._one(self.engine(plain=True), input_ids, max_new_tokens,
                         temperature=temperature, seed=seed, on_tokens=on_tokens,
                         timed=timed, learn=False)

    def eos_and_pad(self) -> tuple[list[int] | None, int]:
        """(EOS ids or None, pad id) for HF `generate`: the model's pad token, else the
        first EOS, else 0."""
        eos = sorted(self.eos) or None
        pad = getattr(self.model.generation_config, "pad_token_id", None)
        return eos, pad if pad is not None else (eos[0] if eos else 0)

    @torch.inference_mode()
    def hf_generate(self, input_ids: list[int], max_new_tokens: int = 128,
                    prompt_lookup: int | None = None, static: bool = False) -> Result:
        """HF `generate(do_sample=False)` — the reference for losslessness and speed; with
        `prompt_lookup` = k, HF's own prompt-lookup decoding (the peer users have); with
        `static`, its static KV cache, which HF compiles on a GPU (the fastest HF loop)."""
        self.check_prompt(input_ids, max_new_tokens)
        ids = torch.tensor([input_ids], device=self.device)
        eos, pad = self.eos_and_pad()
        sync(self.device)
        t0 = time.perf_counter()
        seq = self.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                  max_new_tokens=max_new_tokens, do_sample=False,
                                  eos_token_id=eos, pad_token_id=pad, temperature=None,
                                  top_p=None, top_k=None,
                                  **({"prompt_lookup_num_tokens": prompt_lookup}
                                     if prompt_lookup else {}),
                                  **({"cache_implementation": "static"} if static else {}))
        new = seq[0, len(input_ids):].tolist()
        sync(self.device)
        res = Result(new, len(new), time.perf_counter() - t0, 0.0,
                     accepted=[1] * (len(new) - 1))
        res.finish_reason = "eos" if new and new[-1] in self.eos else "length"
        return res


def open_decoder(inputs, model: str | None = None, dtype: str = "auto", device: str = "auto",
                 threads: int | None = None, shape_only: bool = False,
                 cache_tokens: int = CACHE_TOKENS, hf_beside: bool = False
                 ) -> tuple[Decoder, dict]:
    """Load the model and build a decoder with the resolved inputs
    (:func:`treeopt.inputs.resolve_inputs`): its prompt tokens (else untrained ones
    initialised from text, or from the first embedding rows of a shape-only model) and
    tree (else a rank-0 chain). `shape_only` allows a model without weights
    (:func:`treeopt.models.load`). With a corpus (or a tree that uses the cache source),
    the decoder holds a cache of at most `cache_tokens` tokens: the corpus, then each
    decode's output. Where the engine's kernels are packed (:mod:`treeopt.engine.kernels`)
    the model's own linears are packed in place, unless `hf_beside`: the caller runs HF
    `generate` beside the engine, which must keep the stock kernels (a packed copy then)."""
    pt = PromptTokens.load(inputs.prompt_tokens) if inputs.prompt_tokens else None
    lm = load(model, dtype=dtype, device=device, threads=threads, shape_only=shape_only)
    info = {"model": lm.model_id, "device": str(lm.device), "dtype": dtype_name(lm.dtype),
            # ($TREEOPT_KERNELS checked here)
            "kernels": kernels.choose(lm.device, lm.dtype) if hf_beside else
            kernels.in_place(lm.model, lm.device, lm.dtype),
            "tree": inputs.tree_src, "prompt_tokens": inputs.prompt_tokens_src,
            **({"weights": lm.weights} if lm.weights != "loaded" else {})}
    if pt is None and lm.tokenizer is None:
        pt = PromptTokens.from_embeddings(lm.model, 3)
        info["prompt_tokens"] = "random (shape-only model)"
    elif pt is None:
        pt = PromptTokens.init_from_text(lm.model, lm.tokenizer, 3)
        info["prompt_tokens"] = "untrained (initialised from text)"
    tree = inputs.tree
    if tree is None:
        tree = Tree.chain(pt.num, pt.num)
        info["tree"] = f"chain of depth {pt.num}"
    cache = None
    if inputs.corpus is not None and lm.tokenizer is not None:
        corpora.check_tokenizer(inputs.corpus, inputs.corpus_docs, lm,
                                f"corpus {inputs.corpus_src}")
        cache = corpora.cache_of(inputs.corpus_docs, cache_tokens)
        info["corpus"] = corpora.about(inputs.corpus, inputs.corpus_docs, inputs.corpus_src)
    elif tree.cache is not None:
        cache = SuffixCache(cache_tokens)
        info["corpus"] = None  # the cache holds this process's outputs alone
    if cache is not None:
        info["cache"] = cache.settings()
    dec = Decoder(lm, pt, tree, cache)
    if dec.plain:
        info["plain"] = True  # the tree's table: plain decoding for one sequence
    return dec, info
