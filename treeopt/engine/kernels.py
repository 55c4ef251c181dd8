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

Two ways to hold them, made once per model at its first engine:

- **in place** (a model marked by :func:`in_place`, as `run`, `accept` and `profile`
  mark theirs; packed at its first engine, after the engine's embedding table is made):
  each `nn.Linear` of the model is replaced by a :class:`PackedLinear` and its dense
  weight dropped, so the packed weights are the only copy. The model's own forward then
  runs the packed kernels. An LM head tied to the input embedding is not packed: oneDNN
  runs it on the dense weight the embedding keeps (:class:`OneDNNLinear`).
- **a structural copy** (where a verb runs HF `generate` beside the engine — `bench`,
  `demo`, `run --baseline` — and HF must keep the stock kernels): each module on the path
  to a linear is copied shallowly (parameters, buffers and hooks shared), each linear
  replaced in the copy only. The packed weights are then a second copy of the linears'
  weights (+430 MB for the embedded model in float32, its tied head not copied), taken
  then: weights loaded into the model afterwards are not seen.
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
_in_place: "weakref.WeakSet[torch.nn.Module]" = weakref.WeakSet()


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


class OneDNNLinear(torch.nn.Module):
    """y = x·Wᵀ + b by oneDNN on the dense weight as it is (no packed copy): for an LM
    head tied to the input embedding, whose weight the embedding (and the engine's
    table) must keep dense anyway. It holds the linear's own Parameter, so it reads
    whatever tensor that Parameter holds. For the head's shape (576 → 49152) oneDNN runs
    the plain layout as fast as the packed one (2-core Xeon, ms, L = 1..32: 5.5/5.6,
    7.1/7.6, 8.4/8.7, 8.9/9.0, 11.4/11.4, 15.1/15.0; `benchmarks/memory.py` for the
    memory it saves)."""

    def __init__(self, linear: torch.nn.Linear):
        super().__init__()
        self.weight, self.bias = linear.weight, linear.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "none", [], "")


def head_kernel(model, dtype: torch.dtype) -> torch.nn.Module:
    """The LM head under the oneDNN kernels: on the dense weight where it is tied to the
    input embedding (held once), else packed."""
    head = model.get_output_embeddings()
    if head.weight is model.get_input_embeddings().weight and head.weight.dtype == dtype:
        return OneDNNLinear(head)
    return PackedLinear(head, dtype)


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


def in_place(model, device: torch.device, dtype: torch.dtype) -> str:
    """Let the engine pack this model's own linears (its first engine does, where
    :func:`choose` packs): the caller runs no stock kernels on it. The kernels' name."""
    name = choose(device, dtype)
    if name == "onednn":
        _in_place.add(model)
    return name


def _pack_in_place(model, dtype: torch.dtype) -> Kernels:
    head = head_kernel(model, dtype)
    _pack_children(model.get_decoder(), dtype)
    model.set_output_embeddings(head)
    return Kernels("onednn", model.get_decoder(), head)


def _pack_children(module: torch.nn.Module, dtype: torch.dtype) -> None:
    for name, child in module.named_children():
        if isinstance(child, torch.nn.Linear):
            setattr(module, name, PackedLinear(child, dtype))
        elif child is not None:
            _pack_children(child, dtype)


def kernels_for(model, device: torch.device, dtype: torch.dtype, kind: str = "auto"
                ) -> Kernels:
    """The body and head the engine calls for `model`: packed in place, else the packed
    copy (made once), else the stock modules."""
    if choose(device, dtype, kind) == "stock":
        if model in _packed and _packed[model].body is model.get_decoder():
            raise BadInput("kernels stock: this model's linears were packed in place")
        return Kernels("stock", model.get_decoder(), model.get_output_embeddings())
    if model not in _packed:
        _packed[model] = _pack_in_place(model, dtype) if model in _in_place else \
            Kernels("onednn", _packed_copy(model.get_decoder(), dtype),
                    head_kernel(model, dtype))
    return _packed[model]


def forward_modules(model) -> list[torch.nn.Module]:
    """The modules whose calls are the model's forward: its decoder body and LM head,
    and their packed copies where made (host-work counting marks them)."""
    mods = [model.get_decoder(), model.get_output_embeddings()]
    if model in _packed and _packed[model].body is not mods[0]:
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
