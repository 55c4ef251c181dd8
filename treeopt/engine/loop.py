"""The one decode loop, for one sequence or many (continuous batching), plain or PPD.

Per step, on the host: each live sequence's plan (its tree for the batch size, its state,
the chain sources' offers: :meth:`PlanBook.choose`), its chain tokens and plan id written
into the pool, one index_select of the plan rows; then the device step
(:func:`.step.step`, a graph replay on CUDA) and **one read-back**: per sequence the
winner, the token after it and the next guesses. From the winner the host knows the
accepted tokens (its plan's path over the pool it wrote) and the next state. A finished
sequence (EOS, max_new_tokens, context) leaves: the last rows move into its place, so the
batch stays rows 0..B−1 and stops paying for it. Which tree a step uses depends on how
many sequences are live (the search's per-batch table; None = plain decoding).
"""
from __future__ import annotations

import dataclasses
import functools
import time
import weakref
from typing import Callable

import torch

from ..acceptance import RECORD_TOPK
from ..adapt import CHAINS, PLAIN, Chooser
from ..device import sync
from ..errors import BadInput
from ..forward import attention_masks, logits_of
from ..models import Loaded
from ..prompt_tokens import PromptTokens
from ..sources import Proposals, SuffixCache
from ..tree import Tree, size_for
from .graphs import Graphs, blocker
from .kernels import kernels_for
from .kv import KVStore
from .plans import Bank, Layout, Plan, PlanBook, chain_room
from .results import BatchResult, Result, record_step
from .step import Standing, step

OnTokens = Callable[[list[int]], None]


@dataclasses.dataclass
class Seq:
    """One sequence: where it stands (its row is its place in the live list)."""

    index: int  # position in the caller's prompt list
    ids: list[int]
    limit: int
    ctx: int = 0
    x0: int = 0  # the token the next step starts from (already emitted)
    guesses: list[list[int]] = dataclasses.field(default_factory=list)
    prop: Proposals | None = None
    result: Result | None = None


def round_up(n: int, grain: int) -> int:
    return -(-n // grain) * grain


def candidates(books: dict[int, PlanBook], b: int, plain: PlanBook, layout: Layout
               ) -> dict[str, PlanBook]:
    """What the chooser may run at schedule entry b (treeopt.adapt): its tree, the first
    smaller tree the schedule holds for a larger batch size (the search's best at a
    smaller input-length cap), the tree's chains alone (:meth:`Tree.chains_alone`: no
    guesses) where it has chains, and plain decoding — in that order."""
    tree = books[b].tree
    out = {"tree": books[b]}
    smaller = [books[c] for c in sorted(books) if c > b and books[c].tree is not None
               and books[c].tree.max_input_length < tree.max_input_length] if tree else []
    if smaller:
        out["smaller"] = smaller[0]
    alone = tree.chains_alone() if tree else None
    if alone is not None:  # within the layout: no rank, chain or input beyond the tree's
        out[CHAINS] = PlanBook(alone, layout)
    return {**out, PLAIN: plain}


class Engine:
    """A loaded model, its prompt tokens and a schedule (batch size → tree or None),
    with one KV store, one pool and plan bank, and the step's graphs.

    `pad`: input lengths are rounded up to a power of two below it and to a multiple of
    it above (fewer graph shapes; 1 keeps exact lengths); `grain`: the attended context
    is rounded up to a multiple of it. Both default to 16 / 128 on CUDA (where graphs
    want few shapes) and 1 elsewhere;
    `room`: pool room for chain tokens beyond what the trees' policies need; `kernels`:
    which kernels run the model (:mod:`.kernels`; `auto` packs float32 on an x86 CPU);
    `capture`: a stand-in for CUDA graph capture (:mod:`.graphs`; tests record and replay
    with it on the CPU); `staged`: the host writes chain tokens and plan ids into a
    staging buffer copied into the pool before each step (default: off the CPU, where
    the host cannot write device memory in place)."""

    def __init__(self, loaded: Loaded, prompt_tokens: PromptTokens | None,
                 schedule: dict[int, Tree | None], cache: SuffixCache | None = None,
                 graphs: bool = True, pad: int | None = None, grain: int | None = None,
                 room: int = 0, kernels: str = "auto", capture=None,
                 staged: bool | None = None, adapt: bool = False):
        if not schedule or any(not isinstance(b, int) or b < 1 for b in schedule):
            raise BadInput("batch schedule: needs batch sizes ≥ 1")
        self.lm, self.model = loaded, loaded.model
        self.device, self.dtype = loaded.device, loaded.dtype
        self.eos = set(loaded.eos_ids)
        self.cache_source = cache
        trees = [t for t in schedule.values() if t is not None]
        out_vocab = self.model.get_output_embeddings().weight.shape[0]
        in_vocab = self.model.get_input_embeddings().weight.shape[0]
        width = max([t.rank_width for t in trees] + [min(RECORD_TOPK, out_vocab)])
        rows = prompt_tokens.num if trees else 0
        self.layout = Layout(max(in_vocab, out_vocab), rows, width,
                             max([chain_room(t) for t in trees] + [room]))
        self.books = {b: PlanBook(t, self.layout) for b, t in sorted(schedule.items())}
        self.plain_book = PlanBook(None, self.layout)  # the chooser's plain candidate
        self.one_token = self.plain_book.plan(("plain",))  # near the limit
        # `adapt`: the candidate chosen step by step from this run's evidence (treeopt.adapt)
        self.chooser = Chooser() if adapt and trees else None
        self.online = None  # the chooser's online model (treeopt.online.attach)
        self.candidates = {b: candidates(self.books, b, self.plain_book, self.layout)
                           for b in self.books}
        self.lookup = next((t.lookup for t in trees if t.lookup is not None), None)
        self.table = embedding_table(loaded, prompt_tokens if trees else None,
                                     self.layout.vocab)
        # after the table: a model packed in place drops its dense weights here
        self.kernels = kernels_for(self.model, self.device, self.dtype, kernels)
        self.bank = Bank(self.layout, self.device)
        cuda = self.device.type == "cuda"
        self.pad, self.grain = pad or (16 if cuda else 1), grain or (128 if cuda else 1)
        self.arena = arena_of(loaded)
        self.arena.engines.add(self)
        self.graphs = Graphs(self.device, graphs, capture, self.arena.pool)
        why = blocker(self.model.config)
        if self.graphs.enabled and why:
            self.graphs.disable(why)
        self.staged = self.device.type != "cpu" if staged is None else staged
        self.max_input = max([self.bucket(t.max_input_length) for t in trees] + [self.pad])
        # the longest path a step can accept: the root, the deepest node, every chain
        # token (chains hang under tree nodes and under each other; `room`: a profile's
        # chains) — or one token
        self.max_path = 1 + max([t.max_depth + chain_room(t) for t in trees] + [room])
        self.st: Standing | None = None
        self.stage = self.stage_np = None  # the host's side of the pool's tail (ensure)
        self.steps_run = 0
        self.captured = (0, 0.0)  # the graphs' counts when the running decode began
        self.learn = True  # a finished output joins the cache source (generate sets it)

    # ---- buffers made once ------------------------------------------------------------
    def bucket(self, length: int) -> int:
        """The input length a step of `length` runs as: a power of two up to `pad`, then a
        multiple of it — so plain decoding (and a profile's t(1)) runs one row, not `pad`."""
        if length >= self.pad:
            return round_up(length, self.pad)
        return 1 << (length - 1).bit_length()

    def context_bucket(self, longest: int, L: int) -> int:
        """The context slots a step of input length L attends: the longest context rounded
        up to the grain, within the store."""
        return min(round_up(longest, self.grain), self.st.store.length - L)

    def ensure(self, rows: int, longest: int) -> Standing:
        """The standing buffers for `rows` sequences of contexts up to `longest`; made
        again (and the graphs forgotten) only when a call needs more than they hold."""
        need = round_up(longest + 2 * self.max_input, max(self.grain, 64))
        store = self.arena.store_for(self.model.config, rows, need, self.dtype)
        if self.st is None or self.st.store is not store:
            rows = store.rows
            self.st = Standing(self.model, self.layout, store, self.table, self.kernels,
                               self.max_path)
            self.graphs.reset()
            self.stage = torch.zeros(rows, self.layout.size - self.layout.chain0,
                                     dtype=torch.long,
                                     pin_memory=self.device.type == "cuda")
            # on the CPU the host writes the pool's tail in place; elsewhere a staging copy
            tail = self.stage if self.staged else self.st.pool[:, self.layout.chain0:]
            self.stage_np = tail.numpy()
        return self.st

    def forget(self) -> None:
        """Drop the standing buffers and the graphs over them (the arena's store is being
        replaced: nothing may keep the old one alive)."""
        self.st = self.stage = self.stage_np = None
        self.graphs.reset()

    def pick(self, live: int) -> PlanBook:
        return self.books[size_for(self.books, live)]

    # ---- prefill ----------------------------------------------------------------------
    def prefill(self, seqs: list[Seq], book: PlanBook, first_row: int, sample) -> None:
        """Right-padded causal forward over the prompts (+ the root's prompt tokens) into
        rows first_row..; sets each sequence's first token, guesses and context."""
        st, lay = self.st, self.layout
        r = book.root_prompt_tokens
        J, width = len(seqs), max(len(s.ids) for s in seqs) + r
        slots = [lay.vocab + j for j in range(r)]
        tok = torch.tensor([s.ids + slots + [0] * (width - len(s.ids) - r) for s in seqs],
                           device=self.device)
        pos = torch.arange(width, device=self.device).expand(J, width)
        real = torch.tensor([len(s.ids) + r for s in seqs], device=self.device)
        allowed = torch.ones(width, width, dtype=torch.bool, device=self.device).tril() \
            & (pos[:, :, None] < real[:, None, None])
        allowed = allowed | torch.eye(width, dtype=torch.bool, device=self.device)
        mask = attention_masks(self.model.config, allowed, pos, pos, self.dtype)
        rows = slice(first_row, first_row + J)
        out = st.body(inputs_embeds=torch.nn.functional.embedding(tok, st.table),
                      attention_mask=mask, position_ids=pos,
                      **{st.cache_arg: st.store.at(rows, 0, width)}, use_cache=True)
        at = torch.tensor([[len(s.ids) - 1 + j for j in range(1 + r)] for s in seqs],
                          device=self.device)
        h = out.last_hidden_state.gather(1, at[..., None].expand(-1, -1, out.last_hidden_state
                                                                  .shape[-1]))
        logits = logits_of(self.model, h, self.kernels.head)
        first = logits[:, 0].argmax(-1) if sample is None else torch.multinomial(
            torch.softmax(logits[:, 0] / sample[0], -1), 1, generator=sample[3])[:, 0]
        guesses = logits[:, 1:].topk(lay.width, dim=-1).indices.flatten(1)
        st.pool[rows, lay.x0_col] = first
        st.pool[rows, lay.guess0:lay.guess0 + guesses.shape[1]] = guesses
        st.ctx[rows] = real - r
        back = torch.cat([first[:, None], guesses], 1).tolist()  # one sync
        for s, row in zip(seqs, back):
            s.ctx, s.x0 = len(s.ids), row[0]
            s.guesses = [row[1 + i * lay.width:1 + (i + 1) * lay.width] for i in range(r)]

    # ---- one step ---------------------------------------------------------------------
    def plan_rows(self, live: list[Seq], book: PlanBook) -> list[tuple[Plan, list[int]]]:
        """Each live sequence's plan and chain tokens; what each step was offered goes
        into its Result (the run's records)."""
        chosen = []
        for s in live:
            offers = s.prop.offers() if s.prop is not None else None
            if self.cache_source is not None:
                s.result.cache_offers.append(offers[1])
            m = book.state_for(len(s.guesses))
            s.result.offers.append((len(s.result.output_ids), m,
                                    s.guesses if book.tree is not None else None))
            key, extra = book.choose(m, s.guesses, offers)
            chosen.append((key, book.plan(key), extra))
        return chosen

    def within_context(self, s: Seq, chosen: tuple, book: PlanBook) -> tuple | None:
        """The step's plan for `s` where its input fits the model's context (positions
        ctx .. ctx + length − 1), else the largest that does: the state's own tree without
        chains, then one token (plain decoding, as plain greedy goes to the last position);
        None where not even that fits."""
        limit = self.lm.max_context
        key, plan, _ = chosen
        if s.ctx + plan.length <= limit:
            return chosen
        if key[0] != "plain" and key[1] and s.ctx + book.plan((key[0], ())).length <= limit:
            return (key[0], ()), book.plan((key[0], ())), []
        return (("limit",), self.one_token, []) if s.ctx + 1 <= limit else None

    def load_plans(self, chosen, book: PlanBook, L: int, B: int) -> None:
        """Chain tokens and plan ids into the pool's tail (in place on the CPU, one copy
        elsewhere), then the plan rows into the standing buffer (one index_select)."""
        lay, st = self.layout, self.st
        book_id = id(book)
        for b, (key, plan, extra) in enumerate(chosen):
            self.stage_np[b, :len(extra)] = extra
            self.stage_np[b, -1] = self.bank.id_of((book_id, key), plan, L)
        v = st.views(B, L)
        if self.staged:
            st.pool[:B, lay.chain0:].copy_(self.stage[:B], non_blocking=True)
        torch.index_select(self.bank.rows[L], 0, v.plan_ids, out=v.plan)

    def tokens_of(self, s: Seq, extra: list[int], p: int) -> int:
        """The pool's token at index p, from the host's own copy of what it holds."""
        lay = self.layout
        if p == lay.x0_col:
            return s.x0
        if p < lay.slot0:
            return s.guesses[(p - lay.guess0) // lay.width][(p - lay.guess0) % lay.width]
        return extra[p - lay.chain0]

    def step(self, live: list[Seq], out: BatchResult, t_start: float, timed: bool, sample,
             on_tokens: OnTokens | None) -> list[Seq]:
        """One step of every live sequence; returns those still live. A graph capture
        in it is timed apart (:attr:`Graphs.capture_seconds`), not as the step."""
        t0, cap0 = time.perf_counter(), self.graphs.capture_seconds
        book = self.pick(len(live))
        name = "plain" if book.tree is None else "tree"
        adapting = self.chooser is not None and book.tree is not None and sample is None
        if adapting:
            offered = self.candidates[size_for(self.books, len(live))]
            name = self.chooser.pick(len(live), tuple(offered))
            book = offered[name]
        chosen = self.plan_rows(live, book)
        self.steps_run += 1  # the step's batch size and id beside each offer (records)
        for s in live:
            s.result.offers[-1] += (len(live), self.steps_run)
        chosen = [self.within_context(s, c, book) for s, c in zip(live, chosen)]
        if None in chosen:  # not even one token fits: those stop, the rest go on
            for s, c in zip(live, chosen):
                if c is None:
                    self.finish(s, out, t_start, "context")
            return self.leave(live, [c is not None for c in chosen])
        B = len(live)
        L = self.bucket(max(plan.length for _, plan, _ in chosen))
        C = self.context_bucket(max(s.ctx for s in live), L)
        t_fwd = time.perf_counter()  # from here to the read-back: what the profile times
        self.load_plans(chosen, book, L, B)
        if sample is None:
            row_out = self.graphs.run((B, L, C), functools.partial(step, self.st, B, L, C))
        else:
            row_out = step(self.st, B, L, C, sample)
        if timed:
            sync(self.device)
            out.forward_seconds.append(time.perf_counter() - t_fwd -
                                       (self.graphs.capture_seconds - cap0))
            for s in live:
                s.result.forward_seconds.append(out.forward_seconds[-1])
        rows = row_out.tolist()  # the one sync
        lay, still, emitted = self.layout, [], 0
        for s, (key, plan, extra), row in zip(live, chosen, rows):
            w, last = row[0], row[1]
            path = plan.path_src[w]
            new = [self.tokens_of(s, extra, p) for p in path[1:]] + [last]
            s.ctx += len(path)
            s.x0 = last
            s.guesses = [row[lay.guess0 + i * lay.width:lay.guess0 + (i + 1) * lay.width]
                         for i in range(plan.next_state[w])]
            r = s.result
            added, done = self.emit(s, new, on_tokens)
            record_step(r, len(added), plan.length)
            emitted += len(added)
            still.append(not done)
            if done:
                self.finish(s, out, t_start, None)
        out.live.append(B)
        out.lengths.append(L)
        out.contexts.append(C)
        out.step_tokens.append(emitted)
        spent = time.perf_counter() - t0 - (self.graphs.capture_seconds - cap0)
        out.step_seconds.append(spent)
        if adapting:
            name = self.chooser.observe(B, name, spent, emitted / B, L)
            if self.online is not None and self.chooser.model_due(B):
                self.remodel(B, live, offered)
        out.configs.append(name)
        for s in live:
            s.result.step_seconds.append(spent)
            s.result.configs.append(name)
        return self.leave(live, still)

    def remodel(self, B: int, live: list[Seq], offered: dict[str, PlanBook]) -> None:
        """The online model's tokens/s of the candidates at B (:mod:`treeopt.online`: the
        live sequences' recent records at the step costs measured at B, each input
        length as the engine buckets it) and its running acceptance, for the chooser,
        which also learns what the call took (:meth:`Chooser.model_every`)."""
        t0, lat = time.perf_counter(), self.chooser.latency(B)
        recs = self.online.recent([(s.ids, s.result) for s in live], self.steps_run, B) \
            if lat is not None else {}
        if recs.get("all") is None:
            self.chooser.modelled.pop(B, None)
        else:
            self.chooser.modelled[B] = self.online.rates(
                recs, B, {n: book.tree for n, book in offered.items()},
                lambda sizes: lat([self.bucket(max(1, int(x))) for x in sizes]))
            self.chooser.records[B] = len((recs["guessing"] or recs["all"])["match"])
            self.chooser.acceptance = self.online.acceptance(recs["all"])
        self.chooser.model_seconds = time.perf_counter() - t0

    def emit(self, s: Seq, new: list[int], on_tokens: OnTokens | None
             ) -> tuple[list[int], bool]:
        """Append at most up to the limit, cutting after EOS, and stream; (added, done)."""
        out = s.result.output_ids
        new = new[: s.limit - len(out)]
        cut = next((i + 1 for i, t in enumerate(new) if t in self.eos), None)
        added = new[:cut] if cut else new
        out.extend(added)
        if on_tokens:
            on_tokens(added)
        if s.prop is not None:
            s.prop.extend(added)
        return added, bool(cut) or len(out) >= s.limit

    # ---- joining and leaving ----------------------------------------------------------
    def admit(self, live: list[Seq], joiners: list[Seq], out: BatchResult, t_start: float,
              sample, on_tokens: OnTokens | None) -> list[Seq]:
        """Prefill `joiners` into the rows after the live ones (with the tree for the batch
        they make), emit their first tokens; returns the live list."""
        book = self.pick(len(live) + len(joiners))
        self.prefill(joiners, book, len(live), sample)
        stay = []
        for s in joiners:
            s.result = Result([], 1, 0.0, time.perf_counter() - t_start)
            if self.lookup is not None or self.cache_source is not None:
                lk = self.lookup
                s.prop = Proposals(s.ids, (lk.max_ngram, lk.max_tokens) if lk else None,
                                   self.cache_source)
            _, done = self.emit(s, [s.x0], on_tokens)
            if done:
                self.finish(s, out, t_start, None)
            stay.append(not done)
        return self.leave(live + joiners, [True] * len(live) + stay)

    def leave(self, live: list[Seq], stay: list[bool]) -> list[Seq]:
        """The live list without those that do not stay; the rows after a leaver move up
        (KV up to each context, pool row, context)."""
        kept = []
        for row, (s, ok) in enumerate(zip(live, stay)):
            if not ok:
                continue
            if row != len(kept):
                st, dst = self.st, len(kept)
                st.store.move_row(row, dst, s.ctx)
                st.pool[dst] = st.pool[row]
                st.ctx[dst] = st.ctx[row]
            kept.append(s)
        return kept

    def finish(self, s: Seq, out: BatchResult, t_start: float, why: str | None) -> None:
        """A sequence is done: its result is final; its output joins the cache source."""
        res = s.result
        sync(self.device)
        res.captures = self.graphs.captures - self.captured[0]
        res.capture_seconds = self.graphs.capture_seconds - self.captured[1]
        res.seconds = time.perf_counter() - t_start - res.capture_seconds
        res.finish_reason = why or ("eos" if res.output_ids and res.output_ids[-1] in self.eos
                                    else "length")
        res.graphs, res.kernels = self.graphs.status, self.kernels.name
        out.results[s.index] = res
        if self.online is not None:
            self.online.finished(s.ids, res)
        if self.cache_source is not None and self.learn:
            self.cache_source.add(res.output_ids)

    def timed_step(self, B: int, L: int, C: int) -> Callable[[], None]:
        """One step of B sequences at context C with L inputs each, exactly as decoding
        runs it (plan rows loaded, the step — a graph replay on CUDA —, the read-back):
        what `treeopt profile` times. The plan is the root and a chain of L − 1 tokens (a
        lookup chain's shape; any tree of L inputs costs the same dense forward); the
        contexts are put back after each call."""
        with torch.inference_mode():
            st = self.ensure(B, C + L)
        book = self.books[min(self.books)]
        key = (0, (((), L - 1, 0),)) if L > 1 else ("plain",)
        chosen = [(key, book.plan(key), [0] * (L - 1))] * B
        Lb = self.bucket(L)
        Cb = self.context_bucket(C, Lb)

        @torch.inference_mode()
        def run():
            self.load_plans(chosen, book, Lb, B)
            self.graphs.run((B, Lb, Cb), functools.partial(step, st, B, Lb, Cb)).tolist()
            st.ctx[:B] = C

        with torch.inference_mode():
            st.ctx[:B] = C
        return run

    # ---- the loop ---------------------------------------------------------------------
    @torch.inference_mode()
    def generate(self, prompts: list[list[int]], max_new_tokens: int | list[int] = 128,
                 max_batch: int | None = None, timed: bool = False, learn: bool = True,
                 temperature: float = 0.0, eps: float = 0.09, alpha: float = 0.3,
                 seed: int | None = None, on_tokens: OnTokens | None = None
                 ) -> BatchResult:
        """Decode every prompt; greedy (temperature 0) results equal each prompt's plain
        greedy output. With `max_batch`, at most that many decode at once and a waiting
        prompt joins as soon as one finishes (continuous batching); else all start
        together. `timed` also records each step's device time (one more sync a step);
        `learn`: a finished output joins the cache source; `on_tokens` streams a single
        decode's tokens."""
        self.learn = learn
        if not prompts:
            raise BadInput("no prompts to decode")
        limits = max_new_tokens if isinstance(max_new_tokens, list) else \
            [max_new_tokens] * len(prompts)
        if len(limits) != len(prompts):
            raise BadInput("max_new_tokens: one per prompt")
        if max_batch is not None and max_batch < 1:
            raise BadInput(f"max_batch must be ≥ 1, got {max_batch}")
        if temperature < 0:
            raise BadInput(f"temperature must be ≥ 0, got {temperature}")
        cap = max_batch or len(prompts)
        sample = None
        if temperature > 0:
            gen = torch.Generator(device=self.device)
            gen.manual_seed(seed) if seed is not None else gen.seed()
            sample = (temperature, eps, alpha, gen)
        self.ensure(min(cap, len(prompts)), max(len(p) + n for p, n in zip(prompts, limits)))
        sync(self.device)
        t_start = time.perf_counter()
        self.captured = (self.graphs.captures, self.graphs.capture_seconds)
        queue = [Seq(i, list(ids), lim) for i, (ids, lim) in enumerate(zip(prompts, limits))]
        out = BatchResult([None] * len(queue), 0.0)  # type: ignore[list-item]
        stream = on_tokens if len(prompts) == 1 else None
        live: list[Seq] = []
        while live or queue:
            if queue and len(live) < cap:
                t0 = time.perf_counter()
                room = cap - len(live)
                live = self.admit(live, queue[:room], out, t_start, sample, stream)
                queue = queue[room:]
                out.prefill_seconds += time.perf_counter() - t0
            else:
                live = self.step(live, out, t_start, timed, sample, stream)
        sync(self.device)
        out.captures = self.graphs.captures - self.captured[0]
        out.capture_seconds = self.graphs.capture_seconds - self.captured[1]
        out.seconds = time.perf_counter() - t_start - out.capture_seconds
        return out


class Arena:
    """One KV store and one graph memory pool for every engine of a model (a decoder's
    tree, plain and "alone" engines, the batched ones, the profile's): a store grown for
    one is every engine's store, and the one it replaces is freed at once — each engine
    drops its buffers over it (:meth:`Engine.forget`) before the new one is made."""

    def __init__(self, device: torch.device):
        self.device = device
        self.store: KVStore | None = None
        self.pool = torch.cuda.graph_pool_handle() if device.type == "cuda" else None
        self.engines: "weakref.WeakSet[Engine]" = weakref.WeakSet()

    def store_for(self, config, rows: int, length: int, dtype) -> KVStore:
        """A store of at least `rows` rows and `length` slots (the current one where it
        fits, else a larger one replacing it)."""
        if self.store is None or not self.store.fits(rows, length):
            if self.store is not None:
                rows, length = max(rows, self.store.rows), max(length, self.store.length)
            for engine in list(self.engines):
                engine.forget()
            self.store = None
            self.store = KVStore(config, rows, length, self.device, dtype)
        return self.store


def arena_of(lm: Loaded) -> Arena:
    """The model's one arena (made with its first engine)."""
    return lm.__dict__.setdefault("_engine_arena", Arena(lm.device))


def embedding_table(lm: Loaded, prompt_tokens: PromptTokens | None, vocab: int
                    ) -> torch.Tensor:
    """The step's one embedding table: the model's input embedding of every id (as its
    embedding module gives it, scaling included), zero rows up to `vocab`, then the prompt
    tokens (ids vocab + j). Made once per model and prompt-token set.

    Where the embedding is a plain lookup of its weight (no scaling), the first table made
    takes the weight's place: the model's embedding (and a head tied to it) then reads
    its rows from the table, so the weight is held once (−113 MB for the embedded model
    in float32)."""
    tables = lm.__dict__.setdefault("_engine_tables", {})
    key = (id(prompt_tokens), vocab)
    if key not in tables:
        embed = lm.model.get_input_embeddings()
        n, width = embed.weight.shape
        extra = prompt_tokens.num if prompt_tokens is not None else 0
        with torch.no_grad():  # not an inference tensor: the model's weight may live here
            table = torch.zeros(vocab + extra, width, dtype=lm.dtype, device=lm.device)
            if extra:
                table[vocab:] = prompt_tokens.to(lm.device, lm.dtype)
            if type(embed) is torch.nn.Embedding and embed.weight.dtype == lm.dtype and \
                    not lm.__dict__.get("_embedding_in_table"):
                table[:n] = embed.weight
                embed.weight.data = table[:n]  # the same values, now in the table
                lm.__dict__["_embedding_in_table"] = True
            else:
                table[:n] = embed(torch.arange(n, device=lm.device))
            tables[key] = (prompt_tokens, table)
    return tables[key][1]
