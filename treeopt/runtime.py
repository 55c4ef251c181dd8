"""PPD decoding on a stock transformers model, plus the plain baseline loops.

One PPD step (state m = number of guess rows available)::

    tokens  = [x0] + guesses.flat[node_src]             # root + tree nodes
    embeds  = embed(tokens) ++ prompt_table[slot_token]  # + every node's prompt slots
    h       = decoder(embeds, 4-D tree mask, positions = ctx + depth)
    pred    = argmax(lm_head(h[root+nodes]))            # base model's own next tokens
    ok[v]   = tokens[v] == pred[parent(v)] for v and all its ancestors
    w       = deepest ok node (root if none)             # the one host sync
    emit tokens on root→w (without x0) + pred[w]; keep only that path's KV
    guesses = topk(lm_head(h[prompt slots of w]))        # next state = n(w)

Greedy verification is lossless: every emitted token is the base model's argmax given the
emitted prefix. With temperature > 0 a node is accepted when its probability under the
parent's distribution exceeds min(eps, alpha·exp(−entropy)) (typical acceptance, as in
Medusa/PPD); that is faster, not distribution-preserving.
"""
from __future__ import annotations

import dataclasses
import time
from typing import Callable

import torch

from .errors import BadInput
from .models import Loaded, upcast
from .prompt_tokens import PromptTokens
from .tree import Tree

OnTokens = Callable[[list[int]], None]


@dataclasses.dataclass
class Result:
    """One decode. `steps` counts forward passes, prefill included."""

    output_ids: list[int]
    steps: int
    seconds: float
    prefill_seconds: float
    step_seconds: list[float] = dataclasses.field(default_factory=list)
    forward_seconds: list[float] = dataclasses.field(default_factory=list)
    accepted: list[int] = dataclasses.field(default_factory=list)  # tokens emitted per step
    states: list[int] = dataclasses.field(default_factory=list)
    input_lengths: list[int] = dataclasses.field(default_factory=list)
    finish_reason: str = "length"

    @property
    def new_tokens(self) -> int:
        return len(self.output_ids)

    @property
    def tokens_per_step(self) -> float:
        return self.new_tokens / max(self.steps, 1)

    @property
    def tokens_per_second(self) -> float:
        return self.new_tokens / self.seconds if self.seconds > 0 else 0.0

    def add_step(self, seconds: float, accepted: int, forward: float | None = None,
                 state: int | None = None, length: int | None = None) -> None:
        self.steps += 1
        self.step_seconds.append(seconds)
        self.accepted.append(accepted)
        if forward is not None:
            self.forward_seconds.append(forward)
            self.states.append(state)
            self.input_lengths.append(length)

    def finish(self, eos: set[int], why: str | None = None) -> None:
        self.finish_reason = why or ("eos" if self.output_ids and self.output_ids[-1] in eos
                                     else "length")

    def summary(self) -> dict:
        return {"new_tokens": self.new_tokens, "steps": self.steps,
                "tokens_per_step": round(self.tokens_per_step, 4),
                "seconds": round(self.seconds, 4),
                "tokens_per_second": round(self.tokens_per_second, 3),
                "prefill_seconds": round(self.prefill_seconds, 4),
                "finish_reason": self.finish_reason, "output_ids": self.output_ids}


class Decoder:
    """Owns a loaded model, its prompt tokens and a tree's precomputed buffers."""

    def __init__(self, loaded: Loaded, prompt_tokens: PromptTokens | None = None,
                 tree: Tree | None = None):
        self.lm = loaded
        self.model = loaded.model
        self.device, self.dtype = loaded.device, loaded.dtype
        self.body = self.model.get_decoder()
        self.head = self.model.get_output_embeddings()
        self.embed = self.model.get_input_embeddings()
        self.softcap = getattr(self.model.config, "final_logit_softcapping", None)
        self.eos = set(loaded.eos_ids)
        self.set_tree(tree, prompt_tokens)

    def set_tree(self, tree: Tree | None, prompt_tokens: PromptTokens | None) -> None:
        self.tree = tree
        self.prompt_tokens = prompt_tokens
        self.table = None
        self.buffers = {}
        if tree is None:
            return
        if prompt_tokens is None:
            raise BadInput("PPD decoding needs prompt tokens")
        prompt_tokens.check_model(self.model)
        if tree.num_prompt_tokens > prompt_tokens.num:
            raise BadInput(f"tree uses {tree.num_prompt_tokens} prompt tokens, only "
                           f"{prompt_tokens.num} are loaded")
        vocab = self.head.weight.shape[0]
        if tree.rank_width > vocab:
            raise BadInput(f"tree uses rank {tree.rank_width - 1}, the vocabulary has {vocab}")
        self.table = prompt_tokens.to(self.device, self.dtype)
        self.buffers = tree.buffers(self.device)

    # ---- model calls --------------------------------------------------------------
    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def forward(self, embeds: torch.Tensor, cache, positions: torch.Tensor,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        """Decoder body on [q, hidden] embeddings → last hidden states [q, hidden]."""
        out = self.body(inputs_embeds=embeds[None], attention_mask=mask,
                        position_ids=positions[None], past_key_values=cache, use_cache=True)
        return out.last_hidden_state[0]

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        x = upcast(self.head(hidden))
        if self.softcap:
            x = torch.tanh(x / self.softcap) * self.softcap
        return x

    def new_cache(self):
        from transformers import DynamicCache

        return DynamicCache(config=self.model.config)

    def tree_mask(self, ctx: int, buf) -> torch.Tensor:
        """[1, 1, L, ctx + L]: the cached context is visible to all, the tree block as built."""
        block = buf.additive_mask(self.dtype)
        full = torch.zeros(buf.length, ctx + buf.length, dtype=self.dtype, device=self.device)
        full[:, ctx:] = block
        return full[None, None]

    @staticmethod
    def keep_kv(cache, ctx: int, keep: torch.Tensor | None, new_len: int) -> None:
        """Move the accepted tree entries (positions ctx+keep) to ctx.. and drop the rest."""
        for layer in cache.layers:
            if keep is not None:
                layer.keys[:, :, ctx:new_len] = layer.keys[:, :, keep]
                layer.values[:, :, ctx:new_len] = layer.values[:, :, keep]
            layer.keys = layer.keys[:, :, :new_len]
            layer.values = layer.values[:, :, :new_len]

    def check_prompt(self, input_ids: list[int], max_new_tokens: int) -> None:
        if not input_ids:
            raise BadInput("empty prompt")
        if max_new_tokens < 1:
            raise BadInput(f"--max-new-tokens must be ≥ 1, got {max_new_tokens}")
        limit = self.lm.max_context
        if len(input_ids) + 1 >= limit:
            raise BadInput(f"prompt is {len(input_ids)} tokens, the model's context is {limit}")

    # ---- sampling helpers -----------------------------------------------------------
    @staticmethod
    def _pick(logits: torch.Tensor, temperature: float, gen) -> torch.Tensor:
        if temperature <= 0:
            return logits.argmax(-1)
        probs = torch.softmax(logits / temperature, -1)
        return torch.multinomial(probs, 1, generator=gen).squeeze(-1)

    def _emit(self, out: list[int], new: list[int], limit: int) -> tuple[list[int], bool]:
        """Append at most up to `limit` tokens, cutting after EOS; returns (added, done)."""
        new = new[: limit - len(out)]
        for i, t in enumerate(new):
            if t in self.eos:
                new = new[: i + 1]
                out.extend(new)
                return new, True
        out.extend(new)
        return new, len(out) >= limit

    # ---- PPD ----------------------------------------------------------------------
    @torch.inference_mode()
    def ppd(self, input_ids: list[int], max_new_tokens: int = 128, temperature: float = 0.0,
            eps: float = 0.09, alpha: float = 0.3, seed: int | None = None,
            on_tokens: OnTokens | None = None) -> Result:
        if self.tree is None:
            raise BadInput("no tree loaded")
        if temperature < 0:
            raise BadInput(f"--temperature must be ≥ 0, got {temperature}")
        self.check_prompt(input_ids, max_new_tokens)
        tree, table, bufs = self.tree, self.table, self.buffers
        topk = tree.rank_width
        gen = torch.Generator(device=self.device).manual_seed(seed) if seed is not None else None
        dev = self.device
        limit = self.lm.max_context
        self._sync()
        t_start = time.perf_counter()

        # prefill: prompt + the root's prompt tokens, causal; their KV is dropped afterwards
        ids = torch.tensor(input_ids, device=dev)
        ctx, r = len(input_ids), tree.root_prompt_tokens
        cache = self.cache = self.new_cache()  # kept for inspection (tests, tools)
        h = self.forward(torch.cat([self.embed(ids), table[:r]]), cache,
                         torch.arange(ctx + r, device=dev))
        x0 = self._pick(self.logits(h[ctx - 1]), temperature, gen)
        guesses = torch.topk(self.logits(h[ctx:ctx + r]), topk, dim=-1).indices
        self.keep_kv(cache, ctx, None, ctx)
        state = r
        out: list[int] = []
        first = [int(x0)]
        added, done = self._emit(out, first, max_new_tokens)
        if on_tokens:
            on_tokens(added)
        self._sync()
        t_prev = time.perf_counter()
        res = Result(out, 1, 0.0, t_prev - t_start)
        if done:
            res.finish(self.eos)

        while not done:
            buf = bufs[state]
            if ctx + buf.length > limit:
                res.finish(self.eos, "context")
                break
            n = buf.n_nodes
            tok = torch.cat([x0.view(1), guesses.flatten()[buf.node_src]])
            embeds = torch.cat([self.embed(tok), table[buf.slot_token]])
            mask = self.tree_mask(ctx, buf)
            self._sync()
            t_fwd = time.perf_counter()
            # all rows in one lm_head call, as a plain forward would (small-M GEMMs are slow)
            all_logits = self.logits(self.forward(embeds, cache, ctx + buf.positions, mask))
            self._sync()
            logits = all_logits[: n + 1]
            fwd = time.perf_counter() - t_fwd
            if temperature <= 0:
                pred = logits.argmax(-1)
                ok = tok[1:] == pred[buf.parent]
                acc = ((~ok).float() @ buf.anc) == 0 if n else ok
                score = torch.cat([torch.zeros(1, device=dev), acc.float() * buf.depth])
            else:
                probs = torch.softmax(logits / temperature, -1)
                ent = -(probs * torch.log(probs + 1e-10)).sum(-1)
                thr = torch.clamp(alpha * torch.exp(-ent), max=eps)
                p_tok = probs[buf.parent, tok[1:]]
                ok = p_tok > thr[buf.parent]
                acc = ((~ok).float() @ buf.anc) == 0 if n else ok
                cum = torch.log(p_tok + 1e-20) @ buf.anc.to(p_tok.dtype) if n else p_tok
                score = torch.cat([torch.zeros(1, device=dev),
                                   acc.float() * (buf.depth + 0.5 * torch.exp(cum)).float()])
                pred = torch.zeros(n + 1, dtype=torch.long, device=dev)
            packed = torch.cat([score.argmax().view(1), tok, pred]).tolist()  # one sync
            w = packed[0]
            if temperature > 0:
                x0 = self._pick(logits[w], temperature, gen)
                packed[2 + n + w] = int(x0)
            else:
                x0 = pred[w]
            path = buf.path_pos[w]
            new = [packed[1 + p] for p in path[1:]] + [packed[2 + n + w]]
            keep = None if path[-1] == len(path) - 1 else ctx + buf.retrieve[w, : len(path)]
            self.keep_kv(cache, ctx, keep, ctx + len(path))
            ctx += len(path)
            slots = buf.slots_of[w]
            guesses = torch.topk(all_logits[slots[0]:slots[-1] + 1], topk, dim=-1).indices
            state = buf.next_state[w]
            added, done = self._emit(out, new, max_new_tokens)
            if on_tokens:
                on_tokens(added)
            now = time.perf_counter()
            res.add_step(now - t_prev, len(new), fwd, buf.state, buf.length)
            t_prev = now
            if done:
                res.finish(self.eos)
        self._sync()
        res.seconds = time.perf_counter() - t_start
        return res

    # ---- baselines ------------------------------------------------------------------
    @torch.inference_mode()
    def baseline(self, input_ids: list[int], max_new_tokens: int = 128,
                 temperature: float = 0.0, seed: int | None = None,
                 on_tokens: OnTokens | None = None) -> Result:
        """Plain autoregressive decoding with the same cache and forward as PPD."""
        self.check_prompt(input_ids, max_new_tokens)
        gen = torch.Generator(device=self.device).manual_seed(seed) if seed is not None else None
        dev = self.device
        self._sync()
        t_start = time.perf_counter()
        ids = torch.tensor(input_ids, device=dev)
        cache = self.new_cache()
        ctx = len(input_ids)
        h = self.forward(self.embed(ids), cache, torch.arange(ctx, device=dev))
        x = self._pick(self.logits(h[-1]), temperature, gen)
        out: list[int] = []
        added, done = self._emit(out, [int(x)], max_new_tokens)
        if on_tokens:
            on_tokens(added)
        self._sync()
        t_prev = time.perf_counter()
        res = Result(out, 1, 0.0, t_prev - t_start)
        limit = self.lm.max_context
        while not done:
            if ctx + 1 > limit:
                res.finish(self.eos, "context")
                break
            h = self.forward(self.embed(x.view(1)), cache, torch.tensor([ctx], device=dev))
            ctx += 1
            x = self._pick(self.logits(h[-1]), temperature, gen)
            added, done = self._emit(out, [int(x)], max_new_tokens)
            if on_tokens:
                on_tokens(added)
            now = time.perf_counter()
            res.add_step(now - t_prev, 1)
            t_prev = now
        if done:
            res.finish(self.eos)
        self._sync()
        res.seconds = time.perf_counter() - t_start
        return res

    @torch.inference_mode()
    def hf_generate(self, input_ids: list[int], max_new_tokens: int = 128) -> Result:
        """HF `generate(do_sample=False)` — the reference for losslessness and speed."""
        self.check_prompt(input_ids, max_new_tokens)
        ids = torch.tensor([input_ids], device=self.device)
        eos = sorted(self.eos) or None
        pad = getattr(self.model.generation_config, "pad_token_id", None)
        if pad is None:
            pad = eos[0] if eos else 0
        self._sync()
        t0 = time.perf_counter()
        seq = self.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                  max_new_tokens=max_new_tokens, do_sample=False,
                                  eos_token_id=eos, pad_token_id=pad, temperature=None,
                                  top_p=None, top_k=None)
        self._sync()
        dt = time.perf_counter() - t0
        new = seq[0, len(input_ids):].tolist()
        res = Result(new, len(new), dt, 0.0, accepted=[1] * len(new))
        res.finish(self.eos)
        return res


def open_decoder(model: str | None = None, dtype: str = "auto", device: str = "auto",
                 tree: str | None = None, prompt_tokens: str | None = None,
                 threads: int | None = None) -> tuple[Decoder, dict]:
    """Load model, prompt tokens and tree (shipped defaults where not given)."""
    from . import models, shipped

    # read the user's files first: bad input fails before the model loads
    tree_obj = Tree.load(tree) if tree else None
    pt_obj = PromptTokens.load(prompt_tokens) if prompt_tokens else None
    lm = models.load(model, dtype=dtype, device=device, threads=threads)
    info = {"model": lm.model_id, "device": str(lm.device), "dtype": models.dtype_name(lm.dtype),
            "tree": shipped.display_path(tree) if tree else "default",
            "prompt_tokens": shipped.display_path(prompt_tokens) if prompt_tokens else "default"}
    if pt_obj is None:
        shipped_dir = shipped.prompt_tokens_dir(lm.model_id)
        if (shipped_dir / "prompt_tokens.safetensors").is_file():
            pt_obj = PromptTokens.load(shipped_dir)
            info["prompt_tokens"] = shipped.display_path(shipped_dir)
        else:
            pt_obj = PromptTokens.init_from_text(lm.model, lm.tokenizer, 3)
            info["prompt_tokens"] = "untrained (initialised from text)"
    if tree_obj is None:
        path = shipped.tree_path(lm.model_id, lm.device.type)
        if path.is_file():
            tree_obj = Tree.load(path)
            info["tree"] = shipped.display_path(path)
        else:
            tree_obj = Tree.chain(pt_obj.num, pt_obj.num)
            info["tree"] = f"chain of depth {pt_obj.num}"
    return Decoder(lm, pt_obj, tree_obj), info
