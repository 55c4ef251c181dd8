"""The decode engine, one module per part of a step:

- :mod:`.kv` — one static KV store for all layers, handed to stock models as a Cache;
- :mod:`.plans` — per (state, chain shape) plans, made once, banked on the device;
- :mod:`.step` — the step on the device: inputs, masks, forward, verify, keep KV;
- :mod:`.graphs` — CUDA graph capture and replay (eager elsewhere);
- :mod:`.loop` — the one decode loop, single or batched, with one read-back a step.
"""
from .loop import Engine, Seq, embedding_table
from .results import BatchResult, Result, full_steps, record_step

__all__ = ["Engine", "Seq", "embedding_table", "BatchResult", "Result", "full_steps",
           "record_step"]
