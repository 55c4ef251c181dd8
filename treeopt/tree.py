"""The Tree value and the one layout of a state (:func:`layout_arrays`: the search's
replay and the engine's plans alike).

A PPD step starts from the root token x0 and K' ≤ K rows of top-k guesses (state m = K'
rows). A node is a path of ranks ``(r1, .., rd)``, d ≤ m: "rank r1 guess for x1, then rank
r2 guess for x2, ...". Each node v (and the root) carries ``n(v)`` prompt tokens; if v is
the deepest accepted node, its prompt tokens give the next step's guesses, so the next
state is n(v). A static tree is one state whose nodes all carry K prompt tokens.

Forward-input layout of state m (length ``L_m = 1 + |T_m| + n(root) + Σ n(v)``)::

    [root] [nodes sorted by (depth, path)] [root's prompt slots] [node 1's slots] ...

Attention: a node sees the root and its ancestors and itself; prompt slot j of v sees what
v sees, v itself and slots 1..j of v. Position offsets: depth of nodes (root 0), and
depth(v) + j for slot j of v.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Iterable, Sequence

import numpy as np

from .artefact import check_fields, check_schema, read_json, write_json
from .bounds import count, int_key
from .errors import BadInput

SCHEMA = "treeopt.tree/1"
Path = tuple[int, ...]


def size_for(sizes, live: int) -> int:
    """The batch size whose configuration serves `live` sequences: the largest of `sizes`
    ≤ live, else the smallest. The one rule single and batched decoding follow."""
    sizes = sorted(sizes)
    return max([b for b in sizes if b <= live] or sizes[:1])


def input_length(nodes, root_prompt_tokens, node_prompt_tokens):
    """The one input-length formula: root + nodes + the root's and the nodes' prompt
    slots, ``L = 1 + |T| + n(root) + Σ n(v)`` (works on numpy arrays too)."""
    return 1 + nodes + root_prompt_tokens + node_prompt_tokens


@dataclasses.dataclass(frozen=True)
class Node:
    path: Path
    prompt_tokens: int


@dataclasses.dataclass
class Tree:
    """One tree per state m (number of guess rows available), plus the root's count."""

    num_prompt_tokens: int
    root_prompt_tokens: int
    states: dict[int, list[Node]]
    topk: int = 10
    meta: dict = dataclasses.field(default_factory=dict)
    # hybrid trees: prompt lookup's chain per state (m, n = match length), see Lookup
    lookup: "Lookup | None" = None
    # batch-aware trees: batch size → the tree for that many live sequences (None = plain
    # decoding, no tree); empty = this tree at every batch size
    by_batch: dict[int, "Tree | None"] = dataclasses.field(default_factory=dict)
    # the cache source's chain per state (m, n = its match length): the same form as lookup's
    # (a chain of the model's own earlier text, :class:`treeopt.sources.SuffixCache`)
    cache: "Lookup | None" = None

    def __post_init__(self):
        self.states = {int(m): sorted(nodes, key=_node_key) for m, nodes in self.states.items()}
        self.validate()

    # ---- construction -------------------------------------------------------------
    @classmethod
    def static(cls, paths: Iterable[Sequence[int]], num_prompt_tokens: int, topk: int = 10,
               meta: dict | None = None) -> "Tree":
        """A one-state tree: every node (and the root) carries all K prompt tokens."""
        k = num_prompt_tokens
        nodes = [Node(tuple(p), k) for p in paths]
        return cls(k, k, {k: nodes}, topk, dict(meta or {}))

    @classmethod
    def chain(cls, depth: int, num_prompt_tokens: int, topk: int = 10) -> "Tree":
        """Rank-0 chain of the given depth in every state (static when depth == K)."""
        k = num_prompt_tokens
        return cls(k, k, {m: [Node((0,) * d, k) for d in range(1, min(depth, m) + 1)]
                          for m in range(1, k + 1)}, topk, {"kind": "chain"})

    # ---- facts --------------------------------------------------------------------
    @property
    def is_static(self) -> bool:
        return len(self.states) == 1

    def input_length(self, m: int) -> int:
        nodes = self.states.get(m, [])  # state 0 (hybrid trees): the root alone
        return input_length(len(nodes), self.root_prompt_tokens,
                            sum(n.prompt_tokens for n in nodes))

    @property
    def chains(self) -> list["Lookup | None"]:
        """The chain sources' policies: prompt lookup's, the cache's."""
        return [self.lookup, self.cache]

    @property
    def has_chains(self) -> bool:
        return self.lookup is not None or self.cache is not None

    def at_batch(self, live: int) -> "Tree | None":
        """The tree for `live` sequences: the per-batch table's entry for
        :func:`size_for`, None = plain decoding; the tree itself where it has no table."""
        return self.by_batch[size_for(self.by_batch, live)] if self.by_batch else self

    def ppd_part(self) -> "Tree":
        """The tree without its chain sources (and without a per-batch table)."""
        return dataclasses.replace(self, lookup=None, cache=None, by_batch={})

    @classmethod
    def of_chains(cls, num_prompt_tokens: int, lookup: "Lookup | None",
                  cache: "Lookup | None" = None, topk: int = 10, meta: dict | None = None
                  ) -> "Tree":
        """A tree of no guesses: each step verifies the root and the chains (policies from
        :meth:`Lookup.alone`). A treeopt root carries one prompt token at least: one input
        slot more than an engine drafting chains alone verifies."""
        return cls(num_prompt_tokens, 1, {1: []}, topk, meta or {}, lookup=lookup,
                   cache=cache)

    def chains_alone(self) -> "Tree | None":
        """The tree's chains without its guesses (None where it has no chains): per source,
        at every match length its policy offers, the longest chain any state takes —
        prompt lookup alone, as the serving engines draft (:meth:`of_chains`)."""
        def alone(lk: "Lookup | None") -> "Lookup | None":
            if lk is None:
                return None
            longest: dict[int, int] = {}
            for (_, n), (c, _, _) in lk.policy.items():
                longest[n] = max(longest.get(n, 0), c)
            return Lookup.alone(lk.max_ngram, lk.max_tokens, longest)
        if not self.has_chains:
            return None
        return Tree.of_chains(self.num_prompt_tokens, alone(self.lookup), alone(self.cache),
                              self.topk, {"kind": "chains alone"})

    def chains_length(self, m: int, ns: tuple[int, int]) -> int:
        """The longest input of state m with chain match lengths ns = (lookup's, cache's):
        every proposed token a new node; the guess nodes go when a chain says so."""
        keep, extra = 1, 0
        for lk, n in zip(self.chains, ns):
            c, q, k = lk.policy.get((m, n), (0, 1, 1)) if lk is not None else (0, 1, 1)
            keep, extra = keep * (k if c else 1), extra + c * (1 + q)
        return self.input_length(m if keep else 0) + extra

    @property
    def max_input_length(self) -> int:
        if self.has_chains:
            nl, nc = (lk.max_ngram if lk else 0 for lk in self.chains)
            return max(self.chains_length(m, (a, b)) for m in [0, *self.states]
                       for a in range(nl + 1) for b in range(nc + 1))
        return max(self.input_length(m) for m in self.states)

    @property
    def rank_width(self) -> int:
        """Guesses needed per row: 1 + the largest rank any node uses."""
        return 1 + max((n.path[-1] for ns in self.states.values() for n in ns), default=0)

    @property
    def max_depth(self) -> int:
        return max((len(n.path) for ns in self.states.values() for n in ns), default=0)

    # ---- validation ---------------------------------------------------------------
    def validate(self) -> None:
        """Raise BadInput naming the offending state/node."""
        k = self.num_prompt_tokens
        if not _count(k) or k < 1:
            raise BadInput(f"tree: num_prompt_tokens must be an integer ≥ 1, got {k!r}")
        if not _count(self.topk) or self.topk < 1:
            raise BadInput(f"tree: topk must be an integer ≥ 1, got {self.topk!r}")
        if not self.states:
            raise BadInput("tree: no states")
        for m in self.states:
            if not 1 <= m <= k:
                raise BadInput(f"tree: state {m} outside 1..num_prompt_tokens={k}")
        r = self.root_prompt_tokens
        if not _count(r) or not 1 <= r <= k:
            raise BadInput(f"tree: root_prompt_tokens={r!r} outside 1..{k}")
        if r not in self.states:
            raise BadInput(f"tree: root carries {r} prompt tokens but there is no state {r}")
        for m, nodes in self.states.items():
            seen: set[Path] = set()
            for node in nodes:
                p, n = node.path, node.prompt_tokens
                where = f"tree state {m} node {list(p)}"
                if not p or not all(isinstance(x, int) and not isinstance(x, bool) for x in p):
                    raise BadInput(f"{where}: path must be a non-empty list of integer ranks")
                if any(x < 0 or x >= self.topk for x in p):
                    raise BadInput(f"{where}: rank outside 0..topk-1 (topk={self.topk})")
                if len(p) > m:
                    raise BadInput(f"{where}: depth {len(p)} > {m} guess rows of state {m}")
                if p in seen:
                    raise BadInput(f"{where}: duplicate node")
                if len(p) > 1 and p[:-1] not in seen:
                    raise BadInput(f"{where}: parent {list(p[:-1])} missing (not prefix-closed)")
                if not _count(n) or not 1 <= n <= k:
                    raise BadInput(f"{where}: prompt_tokens={n!r} outside 1..{k}")
                if n not in self.states:
                    raise BadInput(f"{where}: carries {n} prompt tokens but there is no state {n}")
                seen.add(p)
        if self.lookup is not None:
            self.lookup.validate(self)
        if self.cache is not None:
            self.cache.validate(self, "cache")
        for b, t in self.by_batch.items():
            count(b, "batch", "tree by_batch")
            if t is not None and (t.by_batch or t.num_prompt_tokens != k):
                raise BadInput(f"tree by_batch {b}: a nested tree must use the same "
                               f"{k} prompt tokens and have no table of its own")

    # ---- JSON ---------------------------------------------------------------------
    def to_json(self) -> dict:
        return {
            "schema": SCHEMA,
            "num_prompt_tokens": self.num_prompt_tokens,
            "topk": self.topk,
            "root_prompt_tokens": self.root_prompt_tokens,
            "states": {str(m): [{"path": list(n.path), "prompt_tokens": n.prompt_tokens}
                                for n in nodes] for m, nodes in sorted(self.states.items())},
            "input_lengths": {str(m): self.input_length(m) for m in sorted(self.states)},
            **({"lookup": self.lookup.to_json()} if self.lookup else {}),
            **({"cache": self.cache.to_json()} if self.cache else {}),
            **({"by_batch": {str(b): t.to_json() if t else None
                             for b, t in sorted(self.by_batch.items())}}
               if self.by_batch else {}),
            **({"meta": self.meta} if self.meta else {}),
        }

    @classmethod
    def from_json(cls, obj: dict, where: str = "tree") -> "Tree":
        check_schema(obj, SCHEMA, where)
        try:
            k = obj["num_prompt_tokens"]
            states = {}
            for key, nodes in obj["states"].items():
                if int_key(key) is None:
                    raise BadInput(f"{where}: state key {key!r} is not a plain integer")
                if not isinstance(nodes, list):
                    raise BadInput(f"{where}: state {key} must be a list of nodes")
                states[int(key)] = [_node_from_json(n, f"{where} state {key}") for n in nodes]
            meta = obj.get("meta", {})
            if not isinstance(meta, dict):
                raise BadInput(f"{where}: field 'meta' must be an object")
            _check_meta(meta, where)
            lookup = Lookup.from_json(obj["lookup"], f"{where} lookup") \
                if obj.get("lookup") is not None else None
            cache = Lookup.from_json(obj["cache"], f"{where} cache") \
                if obj.get("cache") is not None else None
            table = obj.get("by_batch")
            table = {} if table is None else table
            if not isinstance(table, dict):
                raise BadInput(f"{where}: field 'by_batch' must be an object")
            by_batch = {}
            for key, sub in table.items():
                if int_key(key) is None:
                    raise BadInput(f"{where}: by_batch key {key!r} is not a plain integer")
                by_batch[int(key)] = None if sub is None else \
                    cls.from_json(sub, f"{where} by_batch {key}")
            return cls(k, obj.get("root_prompt_tokens", k), states, obj.get("topk", 10), meta,
                       lookup, by_batch, cache)
        except KeyError as e:
            raise BadInput(f"{where}: missing field {e.args[0]!r}") from e
        except (TypeError, AttributeError) as e:
            raise BadInput(f"{where}: malformed ({e})") from e

    @classmethod
    def load(cls, path) -> "Tree":
        return cls.from_json(read_json(path, "tree file"), f"tree file {path}")

    def save(self, path) -> None:
        write_json(path, self.to_json())


@dataclasses.dataclass
class Lookup:
    """Prompt lookup's share of a hybrid tree. In state (m, n) — m guess rows, a lookup
    match of n tokens (n ≥ 1) — the step adds the lookup's first `c` proposed tokens as a
    chain, merged into state m's tree as a trie (a proposed token equal to a tree node's
    guess at the same place is that node), each new node carrying `q` prompt tokens:
    policy[(m, n)] = (c, q, keep); absent = no chain; keep = 0 drops state m's guess
    nodes for that step (a long match makes them poor value). q = 0 makes lookup nodes
    cheapest (one
    input token each); when such a node is the deepest accepted, the next step is state
    0: no guesses, only the root, its prompt tokens and any lookup chain."""

    max_ngram: int
    max_tokens: int
    policy: dict[tuple[int, int], tuple[int, int, int]]

    def __post_init__(self):  # (c, q) means (c, q, keep = 1)
        bad = [v for v in self.policy.values() if not isinstance(v, tuple) or len(v) not in (2, 3)]
        if bad:
            raise BadInput(f"tree lookup: policy values must be (c, q[, keep]), got {bad[0]!r}")
        self.policy = {k: v if len(v) == 3 else (*v, 1) for k, v in self.policy.items()}

    @classmethod
    def alone(cls, max_ngram: int, max_tokens: int, chain_by_match: dict[int, int]
              ) -> "Lookup":
        """The policy of a tree of no guesses (:meth:`Tree.of_chains`): at match length n
        a chain of chain_by_match[n] tokens with no prompt tokens, from the root's state 1
        and from state 0 (a chain's node won)."""
        return cls(max_ngram, max_tokens, {(m, n): (c, 0, 0) for m in (0, 1)
                                           for n, c in chain_by_match.items() if c})

    def to_json(self) -> dict:
        return {"max_ngram": self.max_ngram, "max_tokens": self.max_tokens,
                "policy": {f"{m},{n}": list(v) for (m, n), v in sorted(self.policy.items())}}

    @classmethod
    def from_json(cls, obj, where: str = "lookup") -> "Lookup":
        if not isinstance(obj, dict) or not isinstance(obj.get("policy"), dict):
            raise BadInput(f"{where}: expected max_ngram, max_tokens and a policy object")
        policy = {}
        for key, val in obj["policy"].items():
            parts = str(key).split(",")
            if len(parts) != 2 or any(int_key(x) is None for x in parts) or not (
                    isinstance(val, list) and len(val) in (2, 3) and all(_count(v) for v in val)):
                raise BadInput(f"{where}: policy entry {key!r}: {val!r} is not 'm,n': "
                               "[c, q, keep]")
            policy[(int(parts[0]), int(parts[1]))] = (val[0], val[1],
                                                      val[2] if len(val) == 3 else 1)
        return cls(obj.get("max_ngram"), obj.get("max_tokens"), policy)

    def validate(self, tree: "Tree", name: str = "lookup") -> None:
        count(self.max_ngram, "lookup_ngram", f"tree {name}: max_ngram")
        count(self.max_tokens, "lookup_chain", f"tree {name}: max_tokens")
        for (m, n), (c, q, keep) in self.policy.items():
            where = f"tree {name} policy {m},{n}"
            if (m not in tree.states and m != 0) or not 1 <= n <= self.max_ngram:
                raise BadInput(f"{where}: no state {m} or match length outside 1..{self.max_ngram}")
            if keep not in (0, 1):
                raise BadInput(f"{where}: keep must be 0 or 1, got {keep}")
            if not 0 <= c <= self.max_tokens or (q not in tree.states and q != 0):
                raise BadInput(f"{where}: chain {c} outside 0..{self.max_tokens} or {q} prompt "
                               "tokens without a state")


BATCH_ROW = {"batch": "batch", "plain": "bool", "input_length": "count",
             "tokens_per_step": "num", "tokens_per_second": "num", "step_seconds": "num"}


def _check_meta(meta: dict, where: str) -> None:
    """The search's figures a tree carries (read by bench and report): per-batch rows and
    the predicted input lengths."""
    rows = meta.get("batch")
    if rows is not None:
        if not isinstance(rows, list):
            raise BadInput(f"{where}: meta.batch must be a list of rows")
        for i, row in enumerate(rows):
            check_fields(row, BATCH_ROW, f"{where}: meta.batch[{i}]")
    pred = meta.get("predicted")
    if pred is not None:
        lengths = pred.get("input_lengths", {}) if isinstance(pred, dict) else None
        if not isinstance(lengths, dict) or not all(
                _count(v) and v >= 0 for v in lengths.values()):
            raise BadInput(f"{where}: meta.predicted.input_lengths must map states to "
                           "integers ≥ 0")


def _count(x) -> bool:
    """An integer (a JSON true/false is not one)."""
    return isinstance(x, int) and not isinstance(x, bool)


def _node_key(n: Node):
    return (len(n.path), n.path)


def _node_from_json(n, where) -> Node:
    if not isinstance(n, dict) or "path" not in n:
        raise BadInput(f"{where}: each node needs a 'path' (got {n!r})")
    path = n["path"]
    if not isinstance(path, list):
        raise BadInput(f"{where}: node path {path!r} is not a list")
    return Node(tuple(path), n.get("prompt_tokens", 1))


@functools.lru_cache(maxsize=256)
def _layout(nodes: tuple[Node, ...], root_n: int):
    """Pure-Python layout of one state (cached: search calls it for many trees)."""
    index = {(): 0}
    for i, node in enumerate(nodes, start=1):
        index[node.path] = i
    n = len(nodes)
    owners = [((), root_n)] + [(node.path, node.prompt_tokens) for node in nodes]
    slot_owner, slot_j = [], []
    slots_of = []
    pos = n + 1
    for w, (_, cnt) in enumerate(owners):
        slots_of.append(list(range(pos, pos + cnt)))
        slot_owner += [w] * cnt
        slot_j += list(range(1, cnt + 1))
        pos += cnt
    length = pos
    path_pos = [[index[p[:i]] for i in range(len(p) + 1)] for p, _ in owners]
    allowed = [[False] * length for _ in range(length)]
    for w, (p, _) in enumerate(owners):
        for a in path_pos[w]:
            allowed[w][a] = True
    for s, (w, j) in enumerate(zip(slot_owner, slot_j)):
        q = n + 1 + s
        allowed[q] = list(allowed[w])
        allowed[q][w] = True
        for s2 in slots_of[w][:j]:
            allowed[q][s2] = True
    depth = [len(p) for p, _ in owners]
    positions = depth + [depth[w] + j for w, j in zip(slot_owner, slot_j)]
    return dict(length=length, index=index, path_pos=path_pos, slots_of=slots_of,
                allowed=allowed, positions=positions, slot_j=slot_j,
                next_state=[cnt for _, cnt in owners])


def layout_arrays(nodes: tuple[Node, ...], root_n: int) -> dict:
    """One state's layout as numpy arrays (no tensor made): ``allowed`` bool [L, L],
    ``positions``/``parent``/``depth``/``slot_token`` int64 (parent and depth per node),
    and the per-winner lists ``path_pos``, ``slots_of``, ``next_state``."""
    lay = _layout(nodes, root_n)
    return dict(length=lay["length"], n_nodes=len(nodes),
                allowed=np.asarray(lay["allowed"], dtype=bool),
                positions=np.asarray(lay["positions"], dtype=np.int64),
                parent=np.asarray([lay["index"][x.path[:-1]] for x in nodes], dtype=np.int64),
                depth=np.asarray([len(x.path) for x in nodes], dtype=np.int64),
                slot_token=np.asarray([j - 1 for j in lay["slot_j"]], dtype=np.int64),
                path_pos=lay["path_pos"], slots_of=lay["slots_of"],
                next_state=lay["next_state"])
