"""Plans: everything one sequence's step needs, made once per (state, chain shape) and
kept, padded per input length, in a bank on the device (Medusa's buffers, per state).

The *pool* is one row of token ids per sequence, the same layout for every tree an engine
runs (:class:`Layout`)::

    [winner | x0 | guesses: rows × width | prompt-slot ids: V + j | chain tokens | plan id]

A step's input row i takes token ``pool[src[i]]``: the root x0, a guess node of depth d
and rank r (``guess0 + (d − 1)·width + r``), a chain node (its chain's token), or a prompt
slot (id V + j: the engine's embedding table is the model's, then the prompt tokens). So
a step creates no tensor: the device writes the winner, x0 and the guesses (the row's head,
which is what the host reads back), the host only the chain tokens and the plan id.

A plan row packs, for input length L (rows past the plan's own length are padding: they
see only themselves, are never accepted, and their KV is never kept)::

    src[L] pos[L] parent[L] depth[L] node[L] grown[L] allowed[L·L] keep[L·L] slots[L·S]

``grown[w]`` is the path's length, ``keep[w]`` the path root → w as input rows (then j past its end: writes that change
nothing the next step reads), ``slots[w]`` the prompt-slot rows of w (its next guesses).
The host keeps each plan's path lengths and next states: with the winner it reads back,
it knows the accepted tokens and the next state without asking the device.
"""
from __future__ import annotations

import dataclasses

import numpy as np
import torch

from ..tree import Node, Tree, layout_arrays

FIELDS = ("src", "pos", "parent", "depth", "node", "grown")  # [L] each; allowed, keep, slots


@dataclasses.dataclass(frozen=True)
class Layout:
    """The pool row's layout: guess rows × width, prompt slots, chain room."""

    vocab: int
    rows: int  # guess rows (= prompt tokens: the most slots a node has)
    width: int  # guesses per row (≥ every tree's rank width, ≥ what records keep)
    chains: int  # chain tokens a step may add

    win_col, x0_col = 0, 1

    @property
    def guess0(self) -> int:
        return 2

    @property
    def slot0(self) -> int:
        return self.guess0 + self.rows * self.width

    @property
    def chain0(self) -> int:
        return self.slot0 + self.rows

    @property
    def plan_col(self) -> int:
        return self.chain0 + self.chains

    @property
    def size(self) -> int:
        return self.plan_col + 1

    def row_size(self, length: int) -> int:
        return len(FIELDS) * length + 2 * length * length + length * self.rows


@dataclasses.dataclass
class Plan:
    """One (state, chain shape) of one tree: its input length, per candidate winner w the
    path's tokens as pool indices and length, and the next state; the packed arrays."""

    length: int
    n_nodes: int
    path_src: list[list[int]]  # pool index of each token on root → w
    next_state: list[int]
    arrays: dict[str, np.ndarray]

    def row(self, length: int, layout: Layout) -> np.ndarray:
        """The plan packed for input length `length` (≥ its own), padded."""
        n, L, S = self.length, length, layout.rows
        a = self.arrays
        out = [np.pad(a[f], (0, L - n)) for f in FIELDS]
        allowed = np.eye(L, dtype=np.int64)
        allowed[:n, :n] = a["allowed"]
        keep = np.tile(np.arange(L, dtype=np.int64), (L, 1))
        keep[:n, :n] = a["keep"]
        slots = np.zeros((L, S), dtype=np.int64)
        slots[:n] = a["slots"]
        return np.concatenate(out + [allowed.ravel(), keep.ravel(), slots.ravel()])


def merge_chain(children: dict[tuple, list[tuple]], token_of: dict[tuple, int],
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


def chain_room(tree: Tree | None) -> int:
    """The most chain tokens one step of `tree` adds (its policies' longest chains)."""
    if tree is None:
        return 0
    return sum(max((c for c, _, _ in lk.policy.values()), default=0)
               for lk in tree.chains if lk is not None)


class PlanBook:
    """One tree's plans (None: plain decoding, the root alone), made on first use and kept;
    :meth:`choose` is the one step rule: state m's tree plus the chains the policies offer
    for (m, match length) — prompt lookup's, then the cache's — merged in as a trie."""

    def __init__(self, tree: Tree | None, layout: Layout):
        self.tree, self.layout = tree, layout
        self.plans: dict[tuple, Plan] = {}
        self.children: dict[int, dict[tuple, list[tuple]]] = {0: {}}
        for m, nodes in (tree.states.items() if tree else ()):
            self.children[m] = {}
            for nd in nodes:
                self.children[m].setdefault(nd.path[:-1], []).append(nd.path)
        self.root_prompt_tokens = tree.root_prompt_tokens if tree else 0
        for m in ([0, *tree.states] if tree else ()):  # every state's own plan, at load
            self.plan((m, ()))
        if tree is None:
            self.plan(("plain",))

    def state_for(self, rows: int) -> int:
        """The largest state whose guess rows `rows` cover (a tree switched in as a batch
        shrank may want more rows than the last tree gave)."""
        if self.tree is None:
            return 0
        return max((m for m in self.tree.states if m <= rows), default=0)

    def choose(self, m: int, guesses: list[list[int]], offers) -> tuple[tuple, list[int]]:
        """(plan key, chain tokens) of state m's step given its guess rows and the chain
        sources' offers [(n, chain) of lookup, of the cache]. A chain whose policy entry says
        keep = 0 drops the guess nodes."""
        if self.tree is None:
            return ("plain",), []
        chains, keep = [], 1
        for policy, (n, chain) in zip(self.tree.chains, offers or ()):
            c, q, k = policy.policy.get((m, n), (0, 1, 1)) if policy else (0, 1, 1)
            if c and chain:
                chains.append((chain[:c], q))
                keep *= k
        if not chains:
            return (m, ()), []
        nodes = self.tree.states.get(m, []) if keep else []
        children = dict(self.children.get(m, {})) if keep else {}  # chain nodes join a copy
        token_of = {nd.path: guesses[len(nd.path) - 1][nd.path[-1]] for nd in nodes}
        shape, extra = [], []
        for i, (chain, q) in enumerate(chains):
            under, rest = merge_chain(children, token_of, chain)
            shape.append((under, len(rest), q))
            for j, t in enumerate(rest):  # the next chain may merge into these nodes
                path = under + (-(i + 1),) * (j + 1)
                children[path[:-1]] = [*children.get(path[:-1], ()), path]
                token_of[path] = t
            extra += rest
        if not extra:  # every chain is already in the tree
            return (m, ()), []
        return (m if keep else 0, tuple(shape)), extra

    def plan(self, key: tuple) -> Plan:
        if key not in self.plans:
            self.plans[key] = self._build(key)
        return self.plans[key]

    def _build(self, key: tuple) -> Plan:
        """State m's nodes and each chain's new nodes (chain i's under path + (−(i+1), …)),
        laid out by the one layout (:func:`treeopt.tree.layout_arrays`)."""
        lay = self.layout
        m, shape = (0, ()) if key == ("plain",) else key
        nodes = list(self.tree.states.get(m, [])) if self.tree else []
        src = {nd.path: lay.guess0 + (len(nd.path) - 1) * lay.width + nd.path[-1]
               for nd in nodes}
        offset = lay.chain0
        for i, (under, new, q) in enumerate(shape):
            for j in range(1, new + 1):
                nodes.append(Node(under + (-(i + 1),) * j, q))
                src[nodes[-1].path] = offset + j - 1
            offset += new
        nodes.sort(key=lambda nd: (len(nd.path), nd.path))
        lay_ = layout_arrays(tuple(nodes), self.root_prompt_tokens)
        n, N = lay_["length"], lay_["n_nodes"]
        pool_of = [lay.x0_col] + [src[nd.path] for nd in nodes] + \
            [lay.slot0 + int(j) for j in lay_["slot_token"]]
        keep = np.tile(np.arange(n, dtype=np.int64), (n, 1))
        slots = np.zeros((n, lay.rows), dtype=np.int64)
        for w in range(N + 1):
            keep[w, :len(lay_["path_pos"][w])] = lay_["path_pos"][w]
            slots[w, :len(lay_["slots_of"][w])] = lay_["slots_of"][w]
        depth, parent = np.zeros(n, dtype=np.int64), np.zeros(n, dtype=np.int64)
        depth[1:N + 1], parent[1:N + 1] = lay_["depth"], lay_["parent"]
        arrays = {"src": np.asarray(pool_of, dtype=np.int64), "pos": lay_["positions"],
                  "parent": parent, "depth": depth, "node": (depth > 0).astype(np.int64),
                  "grown": np.asarray([len(p) for p in lay_["path_pos"]] + [1] * (n - N - 1),
                                      dtype=np.int64),
                  "allowed": lay_["allowed"].astype(np.int64), "keep": keep, "slots": slots}
        return Plan(n, N, [[pool_of[p] for p in path] for path in lay_["path_pos"][:N + 1]],
                    list(lay_["next_state"][:N + 1]), arrays)


class Bank:
    """Padded plan rows on the device, per input length: a step selects its rows by id
    (one index_select into a standing buffer); a new plan is written into the next free
    row when first seen (the bank doubles when full)."""

    def __init__(self, layout: Layout, device):
        self.layout, self.device = layout, device
        self.rows: dict[int, torch.Tensor] = {}
        self.used: dict[int, int] = {}
        self.ids: dict[tuple, int] = {}

    def id_of(self, key: tuple, plan: Plan, length: int) -> int:
        """The bank row of a plan (any hashable key naming it) padded to `length`."""
        full = (length, key)
        if full not in self.ids:
            bank, used = self.rows.get(length), self.used.get(length, 0)
            if bank is None or used == bank.shape[0]:
                grown = torch.zeros(max(16, 2 * used), self.layout.row_size(length),
                                    dtype=torch.long, device=self.device)
                if bank is not None:
                    grown[:used] = bank
                self.rows[length] = bank = grown
            bank[used] = torch.from_numpy(plan.row(length, self.layout))
            self.ids[full], self.used[length] = used, used + 1
        return self.ids[full]
