"""Hybrid trees: prompt-lookup chains beside the prompt tokens' guesses, searched by
replaying an acceptance file's measured positions (:class:`Replay`): the lookup policy per
state and match length, and the PPD part chosen jointly with it."""
from __future__ import annotations

import dataclasses
import itertools

import numpy as np

from ..tree import Lookup, Tree
from .exact import LatencyFn, Solution, optimise, prediction

# ---- hybrid trees: prompt lookup beside the prompt tokens ------------------------------------
@dataclasses.dataclass
class Replay:
    """The measured positions of an acceptance file (ranks of the true tokens among the
    guesses, lookup's match length and accepted run, per prompt in order), and a tree's
    PPD part evaluated on them once: for state m and position i, the depth of the deepest
    accepted tree node and the state it leads to. Held as Python lists: the search
    replays hundreds of policies over the same positions. A run's records are stepwise
    (:mod:`treeopt.records`): one record a step, so the walk takes the next record
    whatever the step accepted."""

    tree: Tree
    rec: dict
    depth: dict[int, list[int]]
    next_state: dict[int, list[int]]
    match: list[int]
    won: list[int]
    state: list[int]

    @classmethod
    def build(cls, tree: Tree, rec: dict) -> "Replay":
        ranks = rec["ranks"]
        depth = {0: np.zeros(len(ranks), dtype=np.int64)}  # state 0: no guesses
        nxt = {0: np.full(len(ranks), tree.root_prompt_tokens, dtype=np.int64)}
        for m, nodes in tree.states.items():
            count = {nd.path: nd.prompt_tokens for nd in nodes}
            d = np.zeros(len(ranks), dtype=np.int64)
            s = np.full(len(ranks), tree.root_prompt_tokens, dtype=np.int64)
            for i, row in enumerate(ranks.tolist()):
                path: tuple = ()
                for r in row[:m]:
                    if r < 0 or path + (r,) not in count:
                        break
                    path += (r,)
                if path:
                    d[i], s[i] = len(path), count[path]
            depth[m], nxt[m] = d, s
        return cls(tree, rec, {m: v.tolist() for m, v in depth.items()},
                   {m: v.tolist() for m, v in nxt.items()}, rec["match"].tolist(),
                   rec["won"].tolist(), rec["state"].tolist() if "state" in rec else [])

    def run(self, policy: dict, tau: np.ndarray, seen: set | None = None,
            follow: bool = False, charged: list | None = None) -> tuple[float, float, int]:
        """(tokens, seconds, steps) of greedy decoding replayed over the positions with
        this lookup policy: a step in state (m, n) accepts max(tree depth, lookup run
        within c) + 1 tokens; its input grows by (1 + q) per lookup token not already a
        tree node (the accepted ones are when the tree has them too). `seen` collects the
        states (m, n ≥ 1) the walk visits. `follow`: a stepwise record's step is in the
        state the run recorded (replaying a run's own tree over its own steps), not the
        one the walk reached. `charged` collects (record, input length) of every step."""
        rec, tree = self.rec, self.tree
        match, won, depth, nxt = self.match, self.won, self.depth, self.next_state
        stepwise = rec.get("stepwise") or [False] * len(rec["lengths"])
        base = {m: tree.input_length(m) for m in [0, *tree.states]}
        none = (0, 1, 1)
        # the policy as a table [m][n] (n = 0: no match, no chain)
        table = [[policy.get((m, n), none) if n else none for n in range(rec["max_ngram"] + 1)]
                 for m in range(tree.num_prompt_tokens + 1)]
        tokens = steps = 0
        seconds = 0.0
        start = 0
        for length, each in zip(rec["lengths"], stepwise):
            i, m = 0, tree.root_prompt_tokens
            while i < length:
                j = start + i
                if follow and each and self.state[j] in depth:
                    m = self.state[j]
                c, q, keep = table[m][match[j]]
                if seen is not None and match[j]:
                    seen.add((m, match[j]))
                dp = depth[m][j] if keep else 0
                dl = min(won[j], c)
                a = 1 + max(dp, dl)
                if not each and i + a > length:  # the data ends inside this step
                    break
                length_j = base[m if keep else 0] + (c - min(dl, dp)) * (1 + q)
                seconds += tau[length_j]
                if charged is not None:
                    charged.append((j, length_j))
                tokens, steps = tokens + a, steps + 1
                m = nxt[m][j] if dp >= dl else q
                i += 1 if each else a
            start += length
        return tokens, seconds, steps


def _tau(tree: Tree, rec: dict, latency: LatencyFn, max_input: int = 0) -> np.ndarray:
    big = max(tree.max_input_length, max_input) + rec["max_tokens"] * (
        1 + tree.num_prompt_tokens) + 2
    tau = np.asarray(latency(np.arange(big)), dtype=float)
    tau[0] = tau[1]
    return tau


def _replay_figures(v) -> dict:
    return {"tokens_per_step": round(float(v[1] / max(v[3], 1)), 6),
            "step_seconds": round(float(v[2] / max(v[3], 1)), 8),
            "tokens_per_second": round(float(v[0]), 6), "steps": int(v[3])}


def _replay_value(tree: Tree, rec: dict, latency: LatencyFn, max_input: int):
    """policy → (tokens/s, tokens, seconds, steps) replayed over the measured positions."""
    replay = Replay.build(tree, rec)
    tau = _tau(tree, rec, latency, max_input)

    def value(policy, visits=False):
        seen: set | None = set() if visits else None
        tok, sec, steps = replay.run(policy, tau, seen)
        return (tok / sec if sec else 0.0), tok, sec, steps, seen
    return value


def uniform_start(tree: Tree, rec: dict, latency: LatencyFn, max_input: int) -> tuple:
    """The best policy with one setting (c, q, keep) for every state (m, n) — settings
    which pay only together (q = 0 and state 0's own chain) are within its reach — or
    none where no lookup is better: (the replay's value function, the figures without
    lookup, the best figures, the policy); :func:`hybrid` climbs from it."""
    value = _replay_value(tree, rec, latency, max_input)
    plain = value({})
    best, policy = plain, {}
    entries = [(m, n) for m in [*sorted(tree.states), 0] for n in range(1, rec["max_ngram"] + 1)]
    for c, q, keep in itertools.product(range(1, rec["max_tokens"] + 1),
                                        [0, *sorted(tree.states)], (1, 0)):
        trial = {(m, n): (c, q, keep) for m, n in entries
                 if tree.input_length(m if keep else 0) + c * (1 + q) <= max_input}
        v = value(trial)
        if v[0] > best[0] * (1 + 1e-9):
            best, policy = v, trial
    return value, plain, best, policy


def hybrid(tree: Tree, rec: dict, latency: LatencyFn, max_input: int,
           sweeps: int = 3, start: tuple | None = None) -> dict:
    """The lookup policy per state (m, n) for a tree's PPD part, by coordinate ascent on
    the replayed tokens per second over the measured positions (each entry tries every
    chain length c, prompt-token count q and keeping or dropping the guess nodes that fits
    max_input), started from the best uniform policy (`start`, from :func:`uniform_start`,
    where the caller has it). Returns the policy and the replayed figures with and without
    it."""
    value, plain, best, policy = start or uniform_start(tree, rec, latency, max_input)
    for _ in range(sweeps):
        changed = False
        seen = value(policy, visits=True)[4]
        for m in [*sorted(tree.states), 0]:
            for n in range(1, rec["max_ngram"] + 1):
                if (m, n) not in seen:  # no step of this walk is in (m, n): no trial moves
                    continue
                current = policy.get((m, n))
                for c in range(0, rec["max_tokens"] + 1):
                    for q, keep in (itertools.product([0, *sorted(tree.states)], (1, 0))
                                    if c else [(1, 1)]):
                        if (c and (c, q, keep) == current) or (not c and current is None):
                            continue
                        if tree.input_length(m if keep else 0) + c * (1 + q) > max_input:
                            continue
                        trial = dict(policy)
                        if c:
                            trial[(m, n)] = (c, q, keep)
                        else:
                            trial.pop((m, n), None)
                        v = value(trial)
                        if v[0] > best[0] * (1 + 1e-9):
                            best, policy, current, changed = v, trial, trial.get((m, n)), True
                            seen = value(policy, visits=True)[4]
        if not changed:
            break

    return {"policy": policy, "hybrid": _replay_figures(best), "ppd_only": _replay_figures(plain)}


def replay_predict(tree: Tree, rec: dict, latency: LatencyFn, follow: bool = False) -> dict:
    """A (hybrid) tree's tokens/step, step time and tokens/s replayed over measured
    positions (:class:`Replay`; `follow` as there)."""
    tok, sec, steps = Replay.build(tree, rec).run(
        tree.lookup.policy if tree.lookup else {}, _tau(tree, rec, latency), follow=follow)
    return _replay_figures(((tok / sec) if sec else 0.0, tok, sec, steps))


def replay_batch(tree: Tree, rec: dict, latency: LatencyFn, groups: list[int]) -> dict:
    """A run's own tree replayed over its stepwise records at a batch size B > 1, each step
    in its recorded state: the records that shared a batched forward (`groups`, one id
    per record) pay that step's time at the longest input among them, as the batched
    runtime pads to it. Seconds are sequence-seconds (a shared step counts once per
    sequence in it): tokens/s per sequence, as the search's per-batch figures."""
    tau = _tau(tree, rec, latency)
    charged: list = []
    tok, _, steps = Replay.build(tree, rec).run(tree.lookup.policy if tree.lookup else {},
                                                tau, follow=True, charged=charged)
    longest: dict[int, int] = {}
    size: dict[int, int] = {}
    for j, length in charged:
        longest[groups[j]] = max(longest.get(groups[j], 0), length)
        size[groups[j]] = size.get(groups[j], 0) + 1
    sec = float(sum(tau[longest[g]] * size[g] for g in longest))
    return _replay_figures(((tok / sec) if sec else 0.0, tok, sec, steps))


def ppd_candidates(found: dict, max_input: int) -> list[Solution]:
    """PPD parts for a hybrid tree: the searched tree first, then the PPD optima under
    smaller input caps (every cap up to 8, and a quarter, half and three quarters of the
    searched tree's input): a smaller tree leaves room and time for the lookup chain.
    A static search keeps its tree."""
    sol = found["solution"]
    if found["meta"].get("static"):
        return [sol]
    top = min(sol.tree.max_input_length, max_input)
    caps = sorted({*range(2, min(top, 9)), top // 4, top // 2, 3 * top // 4} - {0, 1, top})

    def shape(t: Tree):
        return t.root_prompt_tokens, tuple((m, tuple(ns)) for m, ns in sorted(t.states.items()))
    out, seen = [sol], {shape(sol.tree)}
    for cap in caps:
        s = optimise(found["acc"], found["latency"], found["meta"]["config"]["k"], cap,
                     found["path_prob"], found["meta"]["config"]["width_cap"])
        if shape(s.tree) not in seen:
            seen.add(shape(s.tree))
            out.append(s)
    return out


def with_lookup(found: dict, rec: dict, max_input: int) -> dict:
    """Give the searched tree (`found`, from :func:`search`) a lookup policy where it
    predicts faster, choosing the PPD part jointly with the lookup: each of
    :func:`ppd_candidates` is screened by its best uniform lookup policy, and the searched
    tree and the best other candidate get the full per-state search (:func:`hybrid`).
    When another PPD part wins, found's solution and predicted figures become its.
    Returns the replayed figures (PPD alone: the searched tree without lookup)."""
    lat = found["latency"]
    sol, *others = ppd_candidates(found, max_input)
    screened = 1 + len(others)
    runs = [(sol, hybrid(sol.tree, rec, lat, max_input))]
    if others:
        starts = [(s, uniform_start(s.tree, rec, lat, max_input)) for s in others]
        s, start = max(starts, key=lambda st: st[1][2][0])  # by tokens/s; first on ties
        runs.append((s, hybrid(s.tree, rec, lat, max_input, start=start)))
    best, h = max(runs, key=lambda r: r[1]["hybrid"]["tokens_per_second"])  # first on ties
    ppd_only = runs[0][1]["ppd_only"]
    kept = bool(h["policy"]) and \
        bool(h["hybrid"]["tokens_per_second"] > ppd_only["tokens_per_second"])
    if kept:
        best.tree.lookup = Lookup(rec["max_ngram"], rec["max_tokens"], h["policy"])
        if best is not sol:
            found["solution"] = best
            found["meta"]["predicted"] = prediction(best, found["t1"])
    return {"hybrid": h["hybrid"], "ppd_only": ppd_only, "lookup_kept": kept,
            "ppd_part": {"input_lengths": {str(m): L for m, L in
                                           found["solution"].input_lengths.items()},
                         "screened": screened, "searched": len(runs)}}
