"""The one model call: a stock transformers model driven with input embeddings, explicit
positions and 4-D masks (no forked modeling code). The engine, distillation and the
latency profile all go through it.

- :func:`attention_masks`: one additive mask, or one per layer type for models that mix
  sliding-window and full attention (a sliding layer also hides keys q_pos − k_pos ≥ window).
- :func:`model_call`: decoder body (+ LM head, softcapping, upcast to ≥ float32).
"""
from __future__ import annotations

import functools
import inspect

import torch
from transformers import DynamicCache

from .models import upcast


def new_cache():
    """A KV cache that keeps every position on every layer (sliding ones too): tree steps
    and KV compaction index all layers alike; masks apply the windows."""
    return DynamicCache()


def window_of(config, layer_type: str | None) -> int | None:
    """The sliding window of a layer type (None: the one mask for all layers), or None
    where that layer attends to everything."""
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
        return build(window_of(config, None))
    return {t: build(window_of(config, t)) for t in sorted(set(types))}


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


def logits_of(model, hidden: torch.Tensor, head=None) -> torch.Tensor:
    """Logits (≥ float32, softcapped as the model defines) of the model's LM head, or of
    `head` (the engine's kernels for it)."""
    x = upcast((head if head is not None else model.get_output_embeddings())(hidden))
    cap = getattr(model.config, "final_logit_softcapping", None)
    return torch.tanh(x / cap) * cap if cap else x


