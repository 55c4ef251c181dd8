"""Host work counted on any device, the CPU included: the aten ops a decode dispatches,
those inside the model's forward (decoder body and LM head) apart, and the reads that
wait for the device (device→host syncs on a GPU).

On a GPU an eager step's time is mostly its host work: every dispatched op is a kernel
launch from Python, and every sync drains the queue; a CUDA graph replays the forward's
ops as one launch. Counting them needs no GPU::

    ops outside the forward per step = (ops(N tokens) − ops(1 token)) / (steps(N) − steps(1))

(the prefill and the first token cancel out). A sync is an op that must read a value
back: ``item`` / ``_local_scalar_dense`` (``.item()``, ``int(t)``, ``bool(t)``; the first
under inference mode), ops whose output
shape depends on values (``nonzero``, ``masked_select``, ``unique``…), and
``Tensor.tolist`` (counted by wrapping it: one sync, whatever it dispatches inside — on
a GPU that is the device→host copy, on the CPU conjugate/negative-bit checks).
"""
from __future__ import annotations

import contextlib
import dataclasses

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from .engine.kernels import forward_modules

# ops whose result needs the device's values on the host
SYNC_OPS = ("aten._local_scalar_dense", "aten.item", "aten.nonzero", "aten.masked_select",
            "aten.unique", "aten._unique", "aten.repeat_interleave.Tensor")


@dataclasses.dataclass
class Counts:
    ops: int = 0  # every aten op dispatched
    forward_ops: int = 0  # those inside the model's forward
    syncs: int = 0  # device→host reads outside the forward
    forward_syncs: int = 0

    @property
    def outside(self) -> int:
        return self.ops - self.forward_ops

    def __sub__(self, other: "Counts") -> "Counts":
        return Counts(*(a - b for a, b in zip(dataclasses.astuple(self),
                                              dataclasses.astuple(other))))

    def tally(self, inside: bool, op: bool, sync: bool) -> None:
        """One dispatched op (`op`) and/or device→host read (`sync`), inside the forward
        or outside it."""
        self.ops += op
        if inside:
            self.forward_ops += op
            self.forward_syncs += sync
        else:
            self.syncs += sync


class _Counter(TorchDispatchMode):
    def __init__(self, counts: Counts, inside: list[int], reading: list[bool]):
        super().__init__()
        self.counts, self.inside, self.reading = counts, inside, reading

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not self.reading[0]:  # a read-back's own ops are its one sync
            self.counts.tally(bool(self.inside[0]), True, str(func).startswith(SYNC_OPS))
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def counting(model):
    """Count host work while active: yields a :class:`Counts` filled as ops dispatch.
    The model's decoder body and LM head (and the engine's packed copies of them) mark
    what is inside its forward."""
    counts, inside, reading = Counts(), [0], [False]

    def enter(*_):
        inside[0] += 1

    def leave(*_):
        inside[0] -= 1

    hooks = []
    for mod in forward_modules(model):
        hooks += [mod.register_forward_pre_hook(enter), mod.register_forward_hook(leave)]
    tolist = torch.Tensor.tolist

    def counted_tolist(t):
        counts.tally(bool(inside[0]), False, True)
        reading[0] = True
        try:
            return tolist(t)
        finally:
            reading[0] = False

    torch.Tensor.tolist = counted_tolist
    try:
        with _Counter(counts, inside, reading):
            yield counts
    finally:
        torch.Tensor.tolist = tolist
        for h in hooks:
            h.remove()


def per_step(model, decode, tokens: int) -> dict:
    """Host work per decode step of `decode(max_new_tokens) -> steps taken`: the counts
    of a decode of `tokens` new tokens less those of one of a single token, over the
    steps between (prefill and first token cancel out). A first, uncounted decode warms
    up what is made once per shape (plans, standing buffers and their views): the
    figures are the steady state a serving process runs in."""
    decode(tokens)
    with counting(model) as short:
        s1 = decode(1)
    with counting(model) as long:
        sn = decode(tokens)
    d, steps = long - short, max(1, sn - s1)
    return {"steps": steps, "ops_per_step": d.ops / steps,
            "outside_ops_per_step": d.outside / steps,
            "forward_ops_per_step": d.forward_ops / steps,
            "syncs_per_step": d.syncs / steps,
            "forward_syncs_per_step": d.forward_syncs / steps}
