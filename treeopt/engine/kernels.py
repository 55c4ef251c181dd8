"""The kernels the engine runs a stock model with: the model's own, or — float32 on an
x86 CPU — its linear layers through oneDNN with the weights packed once.

Why: PyTorch sends a dense float32 linear to MKL's sgemm, whose few-row products are far
from the memory bound a one-row product (a gemv) reaches; a tree step's forward of L
rows then costs much more than one of 1. One engine step on a 2-core AMD EPYC
(SmolLM2-135M, context 192, ms; `treeopt profile --cpu --dtype float32 --sizes
1,2,4,8,16,32 --contexts 192 --rounds 2`)::

    rows L            1      2      4      8     16     32
    MKL (stock)    41.3   65.7   64.7   77.2   83.7  115.1
    oneDNN, packed 32.3   37.1   37.7   42.6   47.4   61.4

oneDNN's jit kernels follow the ISA (AVX2, AVX-512), not the vendor. In bfloat16 PyTorch
already runs linears through oneDNN and packing them again measured slower, so only
float32 is packed; on a GPU the stock kernels run (in CUDA graphs).

The packed kernels live in a structural copy of the decoder body and the LM head: each
module on the path to a linear is copied shallowly (parameters, buffers and hooks shared),
each `nn.Linear` replaced by a :class:`PackedLinear`. The caller's model is
untouched — HF `generate`, the bench's baseline, keeps the stock kernels — and the copy
is made once per model, at its first engine (the packed weights are a second copy of the
linears' weights, taken then: weights loaded into the model afterwards are not seen).
"""
from __future__ import annotations

import copy
import dataclasses
import os
import platform
import weakref

import torch

from ..errors import BadInput

KINDS = ("auto", "stock", "onednn")


@dataclasses.dataclass
class Kernels:
    name: str  # "stock" or "onednn"
    body: torch.nn.Module  # the decoder body the engine calls
    head: torch.nn.Module  # the LM head


_packed: "weakref.WeakKeyDictionary[torch.nn.Module, Kernels]" = weakref.WeakKeyDictionary()


class PackedLinear(torch.nn.Module):
    """y = x·Wᵀ + b by oneDNN, W packed into its blocked layout once (the dense input
    is converted in and the output back per call)."""

    def __init__(self, linear: torch.nn.Linear, dtype: torch.dtype):
        super().__init__()
        w = linear.weight.detach().to(dtype)
        b = linear.bias.detach() if linear.bias is not None else \
            torch.zeros(w.shape[0], dtype=dtype)
        self.weight, self.bias = w.to_mkldnn(), b.to(dtype).to_mkldnn()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.aten.mkldnn_linear(x.to_mkldnn(), self.weight, self.bias).to_dense()


def choose(device: torch.device, dtype: torch.dtype, kind: str = "auto") -> str:
    """The kernels for a device and dtype: `auto` packs float32 on an x86 CPU with
    oneDNN; `onednn` asks for the packed ones (refused where they cannot run). An `auto`
    caller follows ``$TREEOPT_KERNELS`` where set (``stock`` turns packing off)."""
    if kind == "auto":
        kind = os.environ.get("TREEOPT_KERNELS", "").strip() or "auto"
    if kind not in KINDS:
        raise BadInput(f"kernels {kind!r} ($TREEOPT_KERNELS or Engine(kernels=)) is not one "
                       f"of {', '.join(KINDS)}")
    can = (device.type == "cpu" and dtype == torch.float32
           and torch.backends.mkldnn.is_available())
    if kind == "onednn" and not can:
        raise BadInput(f"kernels onednn: oneDNN packing runs float32 on a CPU, not "
                       f"{str(dtype).removeprefix('torch.')} on {device.type}")
    if kind == "auto":
        x86 = platform.machine().lower() in ("x86_64", "amd64", "i686", "x86")
        return "onednn" if can and x86 else "stock"
    return kind


def kernels_for(model, device: torch.device, dtype: torch.dtype, kind: str = "auto"
                ) -> Kernels:
    """The body and head the engine calls for `model` (the packed copy made once)."""
    if choose(device, dtype, kind) == "stock":
        return Kernels("stock", model.get_decoder(), model.get_output_embeddings())
    if model not in _packed:
        _packed[model] = Kernels("onednn", _packed_copy(model.get_decoder(), dtype),
                                 PackedLinear(model.get_output_embeddings(), dtype))
    return _packed[model]


def forward_modules(model) -> list[torch.nn.Module]:
    """The modules whose calls are the model's forward: its decoder body and LM head,
    and their packed copies where made (host-work counting marks them)."""
    mods = [model.get_decoder(), model.get_output_embeddings()]
    if model in _packed:
        mods += [_packed[model].body, _packed[model].head]
    return mods


def _packed_copy(module: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    if isinstance(module, torch.nn.Linear):
        return PackedLinear(module, dtype)
    if not any(isinstance(m, torch.nn.Linear) for m in module.modules()):
        return module  # nothing below to pack: shared as is
    new = copy.copy(module)
    new._modules = {name: _packed_copy(child, dtype) if child is not None else None
                    for name, child in module._modules.items()}
    return new
