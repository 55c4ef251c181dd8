"""CUDA graphs for the step: captured once per (batch, input length, context bucket) key,
lazily, and replayed; eager everywhere else (the CPU runs the very same function, so CI
exercises everything but the capture — and the tests replace the capture by a stand-in
that records at capture and replays what it recorded, `capture=`).

The first call of a key runs the step for real on a side stream of the model's device
(the warm-up CUDA graphs need, and this step's result), then captures it on a capture
stream of that device — capture records kernels without running them, so the decode's
state is untouched. What it costs (warm-up, capture, instantiation) is counted apart
(:attr:`Graphs.capture_seconds`, :attr:`Graphs.captures`) so that no caller times it as a
step.

Failures are never silent:

- out of memory during warm-up or capture reaches the caller (a profile's grid sizing
  stops growing there; a verb says "out of memory") after the capture stream is
  checked clean; the engine stays graphed;
- any other capture failure (an op that reads a value back, an unsupported kernel)
  switches the engine to eager for good with its *first* cause in :attr:`Graphs.status`
  (torch reports a failed capture as "invalidated" on the way out; the error that
  invalidated it is the one kept), and every run and profile point says how it ran;
- a capture stream still capturing after a failure is an error, not a fallback.
"""
from __future__ import annotations

import time
from typing import Callable

import torch

from ..errors import cut, is_oom

# (fn, pool, stream) → (graph with .replay(), fn's output as the graph will refresh it)
Capture = Callable[[Callable[[], torch.Tensor], object, object], tuple[object, torch.Tensor]]


def cuda_capture(fn: Callable[[], torch.Tensor], pool, stream) -> tuple[object, torch.Tensor]:
    """fn captured as one CUDA graph on `stream`, its memory from `pool`."""
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool, stream=stream):
        static = fn()
    return graph, static


def first_cause(e: BaseException) -> str:
    """The innermost error of an exception chain, as "Type: message" (one line)."""
    seen = []
    while e is not None and e not in seen:
        seen.append(e)
        e = e.__cause__ or e.__context__
    root = seen[-1]
    msg = str(root).strip().splitlines()[0] if str(root).strip() else ""
    return cut(f"{root.__class__.__name__}: {msg}", 160)


def blocker(config) -> str | None:
    """Why a model's step cannot be captured at all, known from its config (it then runs
    eagerly, saying so), else None: a "dynamic" rotary embedding compares the sequence
    length with its trained one on the host every forward."""
    for field in ("rope_parameters", "rope_scaling"):
        rope = getattr(config, field, None)
        if isinstance(rope, dict) and rope.get("rope_type", rope.get("type")) == "dynamic":
            return ("eager: rope_type 'dynamic' reads the sequence length on the host every "
                    "forward, which a CUDA graph cannot capture")
    return None


class Graphs:
    """The step's graphs of one engine. `status`: "cuda graphs" while graphs run, else
    "eager" (no CUDA), "eager (graphs turned off)" or "eager: CUDA graph capture failed
    (first cause)"."""

    def __init__(self, device: torch.device, enabled: bool = True,
                 capture: Capture | None = None, pool=None):
        self.device = device
        cuda = device.type == "cuda"
        self.enabled = enabled and (cuda or capture is not None)
        self.capture = capture or cuda_capture
        self.graphs: dict[tuple, tuple[object, torch.Tensor]] = {}
        self.pool = pool if pool is not None or not (cuda and self.enabled) else \
            torch.cuda.graph_pool_handle()
        self.stream = torch.cuda.Stream(device=device) if cuda and self.enabled else None
        self.captures, self.capture_seconds = 0, 0.0
        if self.enabled:
            self.status = "cuda graphs"
        else:
            self.status = "eager" if not cuda else "eager (graphs turned off)"

    def run(self, key: tuple, fn: Callable[[], torch.Tensor]) -> torch.Tensor:
        """fn's result: replayed from its graph, or eager (and captured for next time)."""
        if not self.enabled:
            return fn()
        if key in self.graphs:
            graph, out = self.graphs[key]
            graph.replay()
            return out
        t0 = time.perf_counter()
        try:
            out = self._warm_up(fn)
            try:
                self.graphs[key] = self.capture(fn, self.pool, self.stream)
                self.captures += 1
            except Exception as e:  # noqa: BLE001 - out of memory up, the rest → eager
                if is_oom(e):
                    self._check_clean(None)
                    raise
                why = first_cause(e)
                self._check_clean(why)
                self.disable(f"eager: CUDA graph capture failed ({why})")
        finally:
            self.capture_seconds += time.perf_counter() - t0
        return out

    def _warm_up(self, fn: Callable[[], torch.Tensor]) -> torch.Tensor:
        if self.device.type != "cuda":
            return fn()
        side = torch.cuda.Stream(device=self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            out = fn()
        torch.cuda.current_stream(self.device).wait_stream(side)
        return out

    def _check_clean(self, why: str | None) -> None:
        """After a failed capture: the capture stream must have left capture mode (torch
        ends it on the way out of `torch.cuda.graph`); if not, stop, naming the cause."""
        if self.stream is None:
            return
        with torch.cuda.stream(self.stream):
            capturing = torch.cuda.is_current_stream_capturing()
        if capturing:
            raise RuntimeError("a failed CUDA graph capture left its stream capturing "
                               f"({why or 'out of memory'}); run again with graphs off")
        torch.cuda.synchronize(self.device)

    def mode(self) -> str:
        """How the steps now run: "graphed" or the eager status."""
        return "graphed" if self.enabled else self.status

    def disable(self, why: str) -> None:
        self.enabled, self.status = False, why
        self.graphs.clear()

    def reset(self) -> None:
        """Forget every graph (the buffers they captured are about to be replaced)."""
        self.graphs.clear()
