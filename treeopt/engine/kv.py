"""One static KV store for every layer, and the `transformers` Cache that hands it to a
stock model.

The store is one allocation ``kv[2, layers, rows, kv_heads, T, head_dim]`` (keys, values),
made once per engine for its largest batch and context. Row b holds sequence b; slot j of
a row holds position j of its context (a *ragged* store: rows have their own lengths).
A forward writes its L new keys/values at slots ``w0 .. w0 + L − 1`` of the rows it runs
and attends over slots ``0 .. kv_len − 1`` (a bucket above the longest context, not the
whole allocation); the caller's 4-D masks say which of those each query sees. A tree step
writes its block at ``w0 = C`` (the context bucket, the same for every row), so the
accepted path moves to each row's context with one gather and one scatter for all layers
(:func:`treeopt.engine.step.keep`).

Every layer gets the same treatment, sliding-window ones included: the masks apply the
windows, so stock modeling code of every supported architecture runs unchanged.

Nothing the store holds points back at it (its Cache's layers hold the tensor and the
shared :class:`Window`, not the store), so a replaced store is freed the moment the last
reference goes — not whenever the garbage collector next runs: a growing store never
holds a dead one beside it.
"""
from __future__ import annotations

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from ..errors import BadInput


def kv_shape(config) -> tuple[int, int, int]:
    """(layers, kv heads, head dim) of a decoder config."""
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return (config.num_hidden_layers, getattr(config, "num_key_value_heads", None) or heads,
            head_dim)


class Window:
    """Where the next forward writes and reads: rows, write slot w0, attended length."""

    def __init__(self, rows: int):
        self.rows, self.w0, self.kv_len = slice(0, rows), 0, 0


class KVStore:
    """The one allocation, and where the next forward writes and reads (set by the
    engine before each forward: rows, write slot, attended length)."""

    def __init__(self, config, rows: int, length: int, device, dtype):
        layers, heads, dim = kv_shape(config)
        self.kv = torch.zeros(2, layers, rows, heads, length, dim, device=device, dtype=dtype)
        self.rows, self.length = rows, length
        self.window = Window(rows)
        self.cache = StoreCache(self.kv, self.window)

    def fits(self, rows: int, length: int) -> bool:
        return rows <= self.rows and length <= self.length

    def at(self, rows: slice, w0: int, kv_len: int) -> "StoreCache":
        """The Cache of one forward: rows `rows` write at slot w0.. and read 0..kv_len−1."""
        if kv_len > self.length:
            raise BadInput(f"KV store holds {self.length} positions, the step needs {kv_len}")
        win = self.window
        win.rows, win.w0, win.kv_len = rows, w0, kv_len
        return self.cache

    def move_row(self, src: int, dst: int, length: int) -> None:
        """Row src's first `length` slots into row dst (all layers, one copy)."""
        self.kv[:, :, dst, :, :length] = self.kv[:, :, src, :, :length]


class StoreLayer(CacheLayerMixin):
    """Layer i of the store as transformers sees a cache layer."""

    is_sliding = False

    def __init__(self, kv: torch.Tensor, window: Window, index: int):
        super().__init__()
        self.kv, self.window, self.index = kv, window, index
        self.is_initialized = True

    def lazy_initialization(self, key_states, value_states) -> None:  # allocated up front
        return None

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        win = self.window
        k = self.kv[0, self.index, win.rows]
        v = self.kv[1, self.index, win.rows]
        n, w0 = key_states.shape[-2], win.w0
        k[:, :, w0:w0 + n] = key_states
        v[:, :, w0:w0 + n] = value_states
        return k[:, :, :win.kv_len], v[:, :, :win.kv_len]

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.window.kv_len, 0

    def get_seq_length(self) -> int:
        return self.window.kv_len

    def get_max_length(self) -> int:
        return self.kv.shape[-2]


class StoreCache(Cache):
    """A transformers Cache over the store's tensor: what the stock decoder body is given."""

    def __init__(self, kv: torch.Tensor, window: Window):
        super().__init__(layers=[StoreLayer(kv, window, i) for i in range(kv.shape[1])])
