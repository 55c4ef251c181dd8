"""PPD decoding on a stock transformers model, plus the plain baseline loops.

One PPD step (state m = number of guess rows available)::

    tokens  = [x0] + guesses.flat[node_src]             # root + tree nodes    (step_inputs)
    embeds  = embed(tokens) ++ prompt_table[slot_token]  # + every node's prompt slots
    h       = decoder(embeds, 4-D tree mask, positions = ctx + depth)         (tree_forward)
    pred    = argmax(lm_head(h[root+nodes]))            # base model's own next tokens
    ok[v]   = tokens[v] == pred[parent(v)] for v and all its ancestors  (verify_greedy)
    w       = deepest ok node (root if none)             # the one host sync
    emit tokens on root→w (without x0) + pred[w]; keep only that path's KV       (keep_kv)
    guesses = topk(lm_head(h[prompt slots of w]))        # next state = n(w)

Greedy verification is lossless: every emitted token is the base model's argmax given the
emitted prefix. With temperature > 0 a node is accepted when its probability under the
parent's distribution exceeds min(eps, alpha·exp(−entropy)) (typical acceptance, as in
Medusa/PPD; :func:`verify_typical`); that is faster, not distribution-preserving.

Every model call goes through :func:`model_call` (decoder body, LM head, final-logit
softcapping, upcast) and :func:`attention_masks` (one 4-D mask, or one per layer type for
models that mix sliding-window and full attention): runtime, distillation and the latency
profile share them. The KV cache keeps every position on every layer (sliding layers
included); the sliding-window layers' masks hide what their window excludes.
"""
from __future__ import annotations

import dataclasses
import functools
import inspect
import time
from typing import Callable

import torch
from transformers import DynamicCache

from . import corpus as corpora
from . import prompts
from .acceptance import RECORD_TOPK
from .device import sync
from .errors import BadInput
from .models import Loaded, dtype_name, load, upcast
from .prompt_tokens import PromptTokens
from .sources import CACHE_TOKENS, Proposals, SuffixCache
from .tree import Node, StateBuffers, Tree, build_buffers

OnTokens = Callable[[list[int]], None]


# ---- the model call (shared by runtime, distill and latency) ------------------------
def new_cache():
    """A KV cache that keeps every position on every layer (sliding ones too): tree steps
    and KV compaction index all layers alike; masks apply the windows."""
    return DynamicCache()


def _window(config, layer_type: str | None) -> int | None:
    if layer_type is None:  # one mask for every layer
        if getattr(config, "use_sliding_window", True) is False:
            return None
        return getattr(config, "sliding_window", None)
    return getattr(config, "sliding_window", None) if layer_type == "sliding_attention" \
        else None


def attention_masks(config, allowed: torch.Tensor, q_pos: torch.Tensor, k_pos: torch.Tensor,
                    dtype: torch.dtype):
    """Additive 4-D mask(s) for one forward: `allowed` [q, kv] (or [B, q, kv]) says which
    key each query may see; sliding-window layers also hide keys with q_pos − k_pos ≥
    window (as transformers' own sliding masks do). Returns one [B, 1, q, kv] tensor, or a
    dict by layer type for models whose config lists `layer_types`."""
    types = getattr(config, "layer_types", None)

    def build(window):
        ok = allowed
        if window is not None:
            ok = ok & ((q_pos[..., :, None] - k_pos[..., None, :]) < window)
        m = torch.zeros(ok.shape, dtype=dtype, device=ok.device)
        m.masked_fill_(~ok, torch.finfo(dtype).min)
        return m[None, None] if m.dim() == 2 else m[:, None]

    if not types:
        return build(_window(config, None))
    return {t: build(_window(config, t)) for t in sorted(set(types))}


def model_call(model, embeds: torch.Tensor, cache, positions: torch.Tensor, mask=None,
               head: bool = True) -> torch.Tensor:
    """[q, hidden] input embeddings → logits [q, V] in ≥ float32 (softcapped as the model
    defines), or the last hidden states with head=False. A batch ([B, q, hidden]
    embeddings, [B, q] positions) gives [B, q, ·]."""
    one = embeds.dim() == 2
    body = model.get_decoder()
    out = body(inputs_embeds=embeds[None] if one else embeds, attention_mask=mask,
               position_ids=positions[None] if one else positions,
               **{cache_argument(type(body)): cache}, use_cache=True)
    h = out.last_hidden_state[0] if one else out.last_hidden_state
    return logits_of(model, h) if head else h


@functools.cache
def cache_argument(body_class) -> str:
    """The name a decoder's forward takes its KV cache under: `cache` from transformers
    5.24 on (where `past_key_values` is deprecated, to be removed in 5.40), else
    `past_key_values`. Read from the signature, once per model class."""
    params = inspect.signature(body_class.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def logits_of(model, hidden: torch.Tensor) -> torch.Tensor:
    x = upcast(model.get_output_embeddings()(hidden))
    cap = getattr(model.config, "final_logit_softcapping", None)
    return torch.tanh(x / cap) * cap if cap else x


def keep_kv(cache, ctx: int, keep: torch.Tensor | None, new_len: int) -> None:
    """Move the accepted tree entries (positions ctx+keep) to ctx.. and drop the rest."""
    for layer in cache.layers:
        if keep is not None:
            layer.keys[:, :, ctx:new_len] = layer.keys[:, :, keep]
            layer.values[:, :, ctx:new_len] = layer.values[:, :, keep]
        layer.keys = layer.keys[:, :, :new_len]
        layer.values = layer.values[:, :, :new_len]


# ---- results -------------------------------------------------------------------------
@dataclasses.dataclass
class Result:
    """One decode. `steps` counts forward passes, prefill included; `accepted[i]` is the
    number of tokens decode step i emitted (after any cut by EOS or max_new_tokens);
    `offers[i]` is what step i was offered: (tokens emitted before it, its state, the guess
    rows [m, ≥ RECORD_TOPK] it started from or None; a batched step adds how many
    sequences it ran with and its id) — the run's records (:mod:`treeopt.records`)."""

    output_ids: list[int]
    steps: int
    seconds: float
    prefill_seconds: float
    step_seconds: list[float] = dataclasses.field(default_factory=list)
    forward_seconds: list[float] = dataclasses.field(default_factory=list)
    accepted: list[int] = dataclasses.field(default_factory=list)
    lengths: list[int] = dataclasses.field(default_factory=list)  # input length per step
    finish_reason: str = "length"
    offers: list[tuple] = dataclasses.field(default_factory=list, repr=False)
    # the cache source's offer (n, chain) at each step, where the decoder had a cache
    cache_offers: list[tuple] = dataclasses.field(default_factory=list, repr=False)
    propose_seconds: float = 0.0  # time spent asking the chain sources (lookup, cache)

    @property
    def new_tokens(self) -> int:
        return len(self.output_ids)

    @property
    def tokens_per_step(self) -> float:
        return self.new_tokens / max(self.steps, 1)

    @property
    def tokens_per_second(self) -> float:
        return self.new_tokens / self.seconds if self.seconds > 0 else 0.0

    def summary(self) -> dict:
        return {"new_tokens": self.new_tokens, "steps": self.steps,
                "tokens_per_step": round(self.tokens_per_step, 4),
                "seconds": round(self.seconds, 4),
                "tokens_per_second": round(self.tokens_per_second, 3),
                "prefill_seconds": round(self.prefill_seconds, 4),
                "finish_reason": self.finish_reason, "output_ids": self.output_ids}


def full_steps(res: Result) -> int:
    """How many of a decode's steps ran in full: all but the last, unless the decode
    stopped at the context limit (a last step that met EOS or max_new_tokens may have
    emitted fewer tokens than it accepted). The one rule bench and accept count by."""
    return max(0, len(res.accepted) - (res.finish_reason != "context"))


# ---- one PPD step, as named pieces -------------------------------------------------------
def step_inputs(embed, table: torch.Tensor, x0: torch.Tensor, pool: torch.Tensor,
                src: torch.Tensor, buf: StateBuffers) -> tuple[torch.Tensor, torch.Tensor]:
    """(tokens [1 + N], input embeddings [L]) of one step: root, nodes (taken from the
    candidate pool: the guesses, flattened, then any lookup tokens), prompt slots."""
    tok = torch.cat([x0.view(1), pool[src]])
    return tok, torch.cat([embed(tok), table[buf.slot_token]])


def merge_lookup(children: dict[tuple, list[tuple]], token_of: dict[tuple, int],
                 chain: list[int]) -> tuple[tuple, list[int]]:
    """Merge a chain into a tree as a trie: walk it down from the root while each proposed
    token equals a child's token; returns (the path the chain coincides with so far, the
    rest of the chain, which becomes new nodes under that path)."""
    path: tuple = ()
    for i, t in enumerate(chain):
        nxt = next((c for c in children.get(path, ()) if token_of[c] == t), None)
        if nxt is None:
            return path, chain[i:]
        path = nxt
    return path, []


def verify_greedy(logits: torch.Tensor, tok: torch.Tensor, buf: StateBuffers):
    """Score per tree position (depth where root→v all match the parent's argmax, else 0)
    and the argmax predictions."""
    n = buf.n_nodes
    pred = logits.argmax(-1)
    ok = tok[1:] == pred[buf.parent]
    acc = ((~ok).float() @ buf.anc) == 0 if n else ok
    score = torch.cat([torch.zeros(1, device=logits.device), acc.float() * buf.depth])
    return score, pred


def verify_typical(logits: torch.Tensor, tok: torch.Tensor, buf: StateBuffers,
                   temperature: float, eps: float, alpha: float):
    """Typical acceptance: p(token | parent) > min(eps, alpha·exp(−entropy(parent)));
    among accepted paths the deepest wins, ties by path probability."""
    n = buf.n_nodes
    probs = torch.softmax(logits / temperature, -1)
    ent = -(probs * torch.log(probs + 1e-10)).sum(-1)
    thr = torch.clamp(alpha * torch.exp(-ent), max=eps)
    p_tok = probs[buf.parent, tok[1:]]
    ok = p_tok > thr[buf.parent]
    acc = ((~ok).float() @ buf.anc) == 0 if n else ok
    cum = torch.log(p_tok + 1e-20) @ buf.anc.to(p_tok.dtype) if n else p_tok
    score = torch.cat([torch.zeros(1, device=logits.device),
                       acc.float() * (buf.depth + 0.5 * torch.exp(cum)).float()])
    return score, torch.zeros(n + 1, dtype=torch.long, device=logits.device)


def verified_row(score: torch.Tensor, tok: torch.Tensor, pred: torch.Tensor) -> torch.Tensor:
    """One step's verification as one row, [winner, tokens (1 + N), predictions (1 + N)]:
    the rows of a batch are read back together, in one device sync."""
    return torch.cat([score.argmax().view(1), tok, pred])


def accept(row: list[int], buf: StateBuffers) -> tuple[int, list[int], list[int]]:
    """(winner w, the tree positions of its path root→w, the new tokens: the path's
    tokens after the root, then the prediction at w) from a read-back verified row."""
    w = row[0]
    path = buf.path_pos[w]
    return w, path, [row[1 + p] for p in path[1:]] + [row[2 + buf.n_nodes + w]]


def next_guesses(logits: torch.Tensor, buf: StateBuffers, w: int, topk: int
                 ) -> torch.Tensor | None:
    """The next step's guesses: top-k of the winner's prompt-token slots (None: it has
    none, the next step is state 0)."""
    slots = buf.slots_of[w]
    return torch.topk(logits[slots[0]:slots[-1] + 1], topk, dim=-1).indices if slots else None


def record_step(res: "Result", added: int, length: int) -> None:
    """A decode step into its sequence's Result: one forward, `added` tokens emitted, the
    step's input length."""
    res.steps += 1
    res.accepted.append(added)
    res.lengths.append(length)


def accepted_path(buf: StateBuffers, ctx: int, w: int) -> torch.Tensor | None:
    """Cache positions of the accepted path root→w, or None when it is already in place."""
    path = buf.path_pos[w]
    return None if path[-1] == len(path) - 1 else ctx + buf.retrieve[w, : len(path)]


class Decoder:
    """Owns a loaded model, its prompt tokens and a tree's precomputed buffers."""

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
        self.table = None
        self.buffers = {}
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
        self.buffers = tree.buffers(self.device)
        if tree.has_chains:  # state 0: no guess rows (a q = 0 chain node won)
            self.buffers[0] = build_buffers((), tree.root_prompt_tokens, 0, tree.rank_width,
                                            self.device)
        self.children = {m: {} for m in [0, *tree.states]}
        for m, nodes in tree.states.items():
            for nd in nodes:
                self.children[m].setdefault(nd.path[:-1], []).append(nd.path)
        self._hybrid: dict[tuple, tuple[StateBuffers, torch.Tensor]] = {}

    def use_tree(self, tree: Tree, cache_tokens: int = CACHE_TOKENS) -> None:
        """Decode with another tree and the same prompt tokens; one with cache chains gets
        an empty cache source where the decoder has none (it learns this process's
        outputs alone, as :func:`open_decoder` gives such a tree)."""
        if tree.cache is not None and self.cache_source is None:
            self.cache_source = SuffixCache(cache_tokens)
        self.set_tree(tree, self.prompt_tokens)

    def hybrid_buffers(self, m: int, shape: tuple):
        """State m's tree with chain nodes (cached per shape): shape holds, per chain in
        order, (the path it hangs under, its number of new nodes, their prompt tokens q).
        Chain i's nodes have paths under + (−(i + 1), …); returns the buffers and each
        node's index into the candidate pool (m guess rows of `width`, then each chain's
        new tokens)."""
        key = (m, shape)
        if key not in self._hybrid:
            width = self.tree.rank_width
            nodes = list(self.tree.states.get(m, []))
            src = {nd.path: (len(nd.path) - 1) * width + nd.path[-1] for nd in nodes}
            offset = m * width
            for i, (under, new, q) in enumerate(shape):
                for j in range(1, new + 1):
                    nodes.append(Node(under + (-(i + 1),) * j, q))
                    src[nodes[-1].path] = offset + j - 1
                offset += new
            nodes.sort(key=lambda nd: (len(nd.path), nd.path))
            buf = build_buffers(tuple(nodes), self.tree.root_prompt_tokens, m, width,
                                self.device)
            self._hybrid[key] = buf, torch.tensor([src[nd.path] for nd in nodes],
                                                  dtype=torch.long, device=self.device)
        return self._hybrid[key]

    def step_plan(self, m: int, guesses: torch.Tensor, offers: list | None):
        """This step's buffers, candidate pool and node sources: state m's tree, plus the
        chains the policies offer for (m, match length) — prompt lookup's, then the
        cache's — merged in as a trie (a proposed token equal to a node's token at the
        same place is that node). A chain whose entry says keep = 0 drops the guess
        nodes."""
        buf = self.buffers[m]
        pool = guesses.flatten()
        chains, keep = [], 1
        for policy, (n, chain) in zip(self.tree.chains, offers or ()):
            c, q, k = policy.policy.get((m, n), (0, 1, 1)) if policy else (0, 1, 1)
            if c and chain:
                chains.append((chain[:c], q))
                keep *= k
        if not chains:
            return buf, pool, buf.node_src
        base = m if keep else 0
        children = dict(self.children[m]) if keep else {}  # chain nodes join a copy
        token_of = dict(zip((nd.path for nd in self.tree.states.get(m, [])),
                            pool[buf.node_src].tolist())) if keep else {}
        shape, extra = [], []
        for i, (chain, q) in enumerate(chains):
            under, rest = merge_lookup(children, token_of, chain)
            shape.append((under, len(rest), q))
            for j, t in enumerate(rest):  # the next chain may merge into these nodes
                path = under + (-(i + 1),) * (j + 1)
                children[path[:-1]] = [*children.get(path[:-1], ()), path]
                token_of[path] = t
            extra += rest
        if not extra:  # every chain is already in the tree
            return buf, pool, buf.node_src
        hbuf, src = self.hybrid_buffers(base, tuple(shape))
        pool = torch.cat([pool if keep else pool[:0], torch.tensor(extra, device=pool.device)])
        return hbuf, pool, src

    def proposals(self, ids: list[int]) -> Proposals | None:
        """A sequence's chain sources: lookup where the tree has a policy for it, the
        cache wherever the decoder has one (its offers are recorded even where the tree
        does not use them: the run's records learn from them)."""
        lk = self.tree.lookup
        if lk is None and self.cache_source is None:
            return None
        return Proposals(ids, (lk.max_ngram, lk.max_tokens) if lk else None, self.cache_source)

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

    def tree_mask(self, ctx: int, buf: StateBuffers):
        """Mask(s) of one tree step: the cached context is visible to all (within a
        sliding layer's window), the tree block as built."""
        allowed = torch.ones(buf.length, ctx + buf.length, dtype=torch.bool, device=self.device)
        allowed[:, ctx:] = buf.allowed
        q_pos = ctx + buf.positions
        k_pos = torch.cat([torch.arange(ctx, device=self.device), q_pos])
        return attention_masks(self.model.config, allowed, q_pos, k_pos, self.dtype)

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

    # ---- shared by PPD and the plain loop ---------------------------------------------
    def prefill(self, input_ids: list[int], extra: torch.Tensor | None = None):
        """(cache, logits) of one causal forward over the prompt (+ `extra` embeddings,
        whose KV the caller drops)."""
        embeds = self.embed(torch.tensor(input_ids, device=self.device))
        if extra is not None:
            embeds = torch.cat([embeds, extra])
        cache = new_cache()
        logits = self.call(embeds, cache, torch.arange(len(embeds), device=self.device))
        return cache, logits

    def _emit(self, out: list[int], new: list[int], limit: int,
              on_tokens: OnTokens | None) -> tuple[list[int], bool]:
        """Append at most up to `limit` tokens, cutting after EOS, and stream them;
        returns (added, done)."""
        new = new[: limit - len(out)]
        cut = next((i + 1 for i, t in enumerate(new) if t in self.eos), None)
        added = new[:cut] if cut else new
        out.extend(added)
        if on_tokens:
            on_tokens(added)
        return added, bool(cut) or len(out) >= limit

    def _first(self, token: int, limit: int, on_tokens: OnTokens | None,
               t_start: float) -> tuple[Result, bool]:
        """The prefill's token emitted: the decode's Result and whether it is done."""
        out: list[int] = []
        _, done = self._emit(out, [token], limit, on_tokens)
        return Result(out, 1, 0.0, time.perf_counter() - t_start), done

    @staticmethod
    def _log_step(res: Result, added: list[int], length: int, t_prev: float) -> float:
        now = time.perf_counter()
        record_step(res, len(added), length)
        res.step_seconds.append(now - t_prev)
        return now

    def _finish(self, res: Result, t_start: float, why: str | None) -> Result:
        sync(self.device)
        res.seconds = time.perf_counter() - t_start
        res.finish_reason = why or ("eos" if res.output_ids and res.output_ids[-1] in self.eos
                                    else "length")
        return res

    @staticmethod
    def _pick(logits: torch.Tensor, temperature: float, gen) -> torch.Tensor:
        if temperature <= 0:
            return logits.argmax(-1)
        probs = torch.softmax(logits / temperature, -1)
        return torch.multinomial(probs, 1, generator=gen).squeeze(-1)

    def _generator(self, seed: int | None):
        return torch.Generator(device=self.device).manual_seed(seed) if seed is not None \
            else None

    # ---- PPD ----------------------------------------------------------------------
    @torch.inference_mode()
    def ppd(self, input_ids: list[int], max_new_tokens: int = 128, temperature: float = 0.0,
            eps: float = 0.09, alpha: float = 0.3, seed: int | None = None,
            on_tokens: OnTokens | None = None, timed: bool = False,
            learn: bool = True) -> Result:
        """Decode with the tree. `timed` also records each step's forward time (one more
        device sync per step); `learn`: the output joins the cache source afterwards."""
        if self.tree is None:
            raise BadInput("no tree loaded")
        if temperature < 0:
            raise BadInput(f"temperature must be ≥ 0, got {temperature}")
        if self.plain:  # no tree pays for one sequence on this device
            res = self.baseline(input_ids, max_new_tokens, temperature, seed, on_tokens)
            if learn:
                self.remember(res.output_ids)
            return res
        self.check_prompt(input_ids, max_new_tokens)
        topk, gen = self.tree.rank_width, self._generator(seed)
        width = max(topk, min(RECORD_TOPK, self.model.get_output_embeddings().weight.shape[0]))
        sync(self.device)
        t_start = time.perf_counter()
        # prefill: prompt + the root's prompt tokens, causal; their KV is dropped afterwards
        ctx, r = len(input_ids), self.tree.root_prompt_tokens
        cache, logits = self.prefill(input_ids, self.table[:r])
        self.cache = cache  # kept for inspection (tests, tools)
        x0 = self._pick(logits[ctx - 1], temperature, gen)
        guesses = torch.topk(logits[ctx:ctx + r], width, dim=-1).indices
        keep_kv(cache, ctx, None, ctx)
        state = r
        res, done = self._first(int(x0), max_new_tokens, on_tokens, t_start)
        prop = self.proposals(list(input_ids) + res.output_ids)
        t_prev = t_start + res.prefill_seconds
        while not done:
            res.offers.append((len(res.output_ids), state, guesses))
            t_offer = time.perf_counter()
            offers = prop.offers() if prop is not None else None
            res.propose_seconds += time.perf_counter() - t_offer
            if self.cache_source is not None:
                res.cache_offers.append(offers[1])
            buf, pool, src = self.step_plan(state, guesses[:, :topk], offers)
            if ctx + buf.length > self.lm.max_context:
                if learn:
                    self.remember(res.output_ids)
                return self._finish(res, t_start, "context")
            tok, embeds = step_inputs(self.embed, self.table, x0, pool, src, buf)
            t_fwd = time.perf_counter()
            # all rows in one lm_head call, as a plain forward would (small-M GEMMs are slow)
            logits = self.call(embeds, cache, ctx + buf.positions, self.tree_mask(ctx, buf))
            if timed:
                sync(self.device)
                res.forward_seconds.append(time.perf_counter() - t_fwd)
            n = buf.n_nodes
            if temperature <= 0:
                score, pred = verify_greedy(logits[: n + 1], tok, buf)
            else:
                score, pred = verify_typical(logits[: n + 1], tok, buf, temperature, eps, alpha)
            row = verified_row(score, tok, pred).tolist()  # one sync
            if temperature > 0:  # the token after the winner is sampled, not the argmax
                row[2 + n + row[0]] = int(self._pick(logits[row[0]], temperature, gen))
            w, path, new = accept(row, buf)
            x0 = torch.tensor(new[-1], device=self.device)
            keep_kv(cache, ctx, accepted_path(buf, ctx, w), ctx + len(path))
            ctx += len(path)
            guesses = next_guesses(logits, buf, w, width)
            if guesses is None:
                guesses = torch.empty(0, width, dtype=torch.long, device=self.device)
            state = buf.next_state[w]
            added, done = self._emit(res.output_ids, new, max_new_tokens, on_tokens)
            if prop is not None:
                prop.extend(added)
            t_prev = self._log_step(res, added, buf.length, t_prev)
        if learn:
            self.remember(res.output_ids)
        return self._finish(res, t_start, None)

    # ---- baselines ------------------------------------------------------------------
    @torch.inference_mode()
    def baseline(self, input_ids: list[int], max_new_tokens: int = 128,
                 temperature: float = 0.0, seed: int | None = None,
                 on_tokens: OnTokens | None = None) -> Result:
        """Plain autoregressive decoding with the same cache and model call as PPD."""
        self.check_prompt(input_ids, max_new_tokens)
        gen = self._generator(seed)
        sync(self.device)
        t_start = time.perf_counter()
        cache, logits = self.prefill(input_ids)
        ctx = len(input_ids)
        x = self._pick(logits[-1], temperature, gen)
        res, done = self._first(int(x), max_new_tokens, on_tokens, t_start)
        t_prev = t_start + res.prefill_seconds
        while not done:
            if ctx + 1 > self.lm.max_context:
                return self._finish(res, t_start, "context")
            logits = self.call(self.embed(x.view(1)), cache,
                               torch.tensor([ctx], device=self.device))
            ctx += 1
            x = self._pick(logits[-1], temperature, gen)
            added, done = self._emit(res.output_ids, [int(x)], max_new_tokens, on_tokens)
            t_prev = self._log_step(res, added, 1, t_prev)
        return self._finish(res, t_start, None)

    def eos_and_pad(self) -> tuple[list[int] | None, int]:
        """(EOS ids or None, pad id) for HF `generate`: the model's pad token, else the
        first EOS, else 0."""
        eos = sorted(self.eos) or None
        pad = getattr(self.model.generation_config, "pad_token_id", None)
        return eos, pad if pad is not None else (eos[0] if eos else 0)

    @torch.inference_mode()
    def hf_generate(self, input_ids: list[int], max_new_tokens: int = 128,
                    prompt_lookup: int | None = None) -> Result:
        """HF `generate(do_sample=False)` — the reference for losslessness and speed; with
        `prompt_lookup` = k, HF's own prompt-lookup decoding (the peer users have)."""
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
                                     if prompt_lookup else {}))
        new = seq[0, len(input_ids):].tolist()
        res = Result(new, len(new), 0.0, 0.0, accepted=[1] * (len(new) - 1))
        return self._finish(res, t0, None)


def open_decoder(inputs, model: str | None = None, dtype: str = "auto", device: str = "auto",
                 threads: int | None = None, shape_only: bool = False,
                 cache_tokens: int = CACHE_TOKENS) -> tuple[Decoder, dict]:
    """Load the model and build a decoder with the resolved inputs
    (:func:`treeopt.inputs.resolve_inputs`): its prompt tokens (else untrained ones
    initialised from text, or from the first embedding rows of a shape-only model) and
    tree (else a rank-0 chain). `shape_only` allows a model without weights
    (:func:`treeopt.models.load`). With a corpus (or a tree that uses the cache source),
    the decoder holds a cache of at most `cache_tokens` tokens: the corpus, then each
    decode's output."""
    pt = PromptTokens.load(inputs.prompt_tokens) if inputs.prompt_tokens else None
    lm = load(model, dtype=dtype, device=device, threads=threads, shape_only=shape_only)
    info = {"model": lm.model_id, "device": str(lm.device), "dtype": dtype_name(lm.dtype),
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
