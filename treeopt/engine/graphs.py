"""CUDA graphs for the step: captured once per (batch, input length, context bucket) key,
lazily, and replayed; eager everywhere else (the CPU runs the very same function, so CI
exercises everything but the capture).

The first call of a key runs the step for real on a side stream (the warm-up CUDA graphs
need, and this step's result), then captures it — capture records kernels without running
them, so the decode's state is untouched. A capture that fails (an op that reads a value
back, an unsupported kernel) switches the engine to eager for good and says why in
:attr:`Graphs.status` (a run's JSON carries it).
"""
from __future__ import annotations

from typing import Callable

import torch

from ..errors import cut


class Graphs:
    def __init__(self, device: torch.device, enabled: bool = True):
        self.enabled = enabled and device.type == "cuda"
        self.graphs: dict[tuple, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.pool = torch.cuda.graph_pool_handle() if self.enabled else None
        if self.enabled:
            self.status = "cuda graphs"
        else:
            self.status = "eager" if device.type != "cuda" else "eager (graphs turned off)"

    def run(self, key: tuple, fn: Callable[[], torch.Tensor]) -> torch.Tensor:
        """fn's result: replayed from its graph, or eager (and captured for next time)."""
        if not self.enabled:
            return fn()
        if key in self.graphs:
            graph, out = self.graphs[key]
            graph.replay()
            return out
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            out = fn()
        torch.cuda.current_stream().wait_stream(side)
        try:
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.pool):
                static = fn()
        except Exception as e:  # noqa: BLE001 - any capture failure → eager, said once
            self.disable(f"eager: CUDA graph capture failed ({cut(str(e), 120)})")
            return out
        self.graphs[key] = (graph, static)
        return out

    def disable(self, why: str) -> None:
        self.enabled, self.status = False, why
        self.graphs.clear()

    def reset(self) -> None:
        """Forget every graph (the buffers they captured are about to be replaced)."""
        self.graphs.clear()
