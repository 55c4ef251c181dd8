"""The K trainable prompt-token embeddings: init, load/save.

Our format: a folder with ``prompt_tokens.safetensors`` (tensor ``prompt_embeddings``
[K, hidden], float32) and ``prompt_tokens.json`` (model id, K, hidden size, how it was
made, measured accuracies).

The PPD authors' layout (a PEFT prompt-tuning folder) is read and written too:
``adapter_config.json`` (``num_virtual_tokens``, ``num_special_tokens``,
``virtual_tokens_per_special_token``, ``token_dim``, ``base_model_name_or_path``) and
``adapter_model.safetensors`` or ``adapter_model.bin`` holding ``prompt_embeddings``
[num_virtual_tokens, hidden]. Only one virtual token per special token is supported.
"""
from __future__ import annotations

import dataclasses
import json
import pathlib

import torch
from safetensors.torch import load_file, save

from .artefact import write_atomic
from .errors import BadInput

WEIGHTS = "prompt_tokens.safetensors"
CONFIG = "prompt_tokens.json"
TENSOR = "prompt_embeddings"
PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = "adapter_model.safetensors"
PEFT_BIN = "adapter_model.bin"
DEFAULT_INIT_TEXT = "the next word then the word after that"


@dataclasses.dataclass
class PromptTokens:
    embeddings: torch.Tensor  # [K, hidden], float32
    meta: dict = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        e = self.embeddings
        if e.dim() != 2 or e.shape[0] < 1 or e.shape[1] < 1:
            raise BadInput(f"prompt tokens: expected a [K, hidden] tensor, got {list(e.shape)}")
        if not torch.isfinite(e).all():
            raise BadInput("prompt tokens: the embeddings hold NaN or infinite values")

    @property
    def num(self) -> int:
        return int(self.embeddings.shape[0])

    @property
    def hidden(self) -> int:
        return int(self.embeddings.shape[1])

    @classmethod
    def init_from_text(cls, model, tokenizer, num: int = 3,
                       text: str = DEFAULT_INIT_TEXT) -> "PromptTokens":
        """Copy the word embeddings of the first `num` ids of `text` (repeated if short)."""
        if num < 1:
            raise BadInput(f"number of prompt tokens must be ≥ 1, got {num}")
        ids = tokenizer(text, add_special_tokens=False)["input_ids"] or [0]
        ids = (ids * num)[:num]
        emb = model.get_input_embeddings().weight.detach()[torch.tensor(ids)]
        return cls(emb.float().cpu().clone(),
                   {"init": "text", "init_text": text, "init_ids": ids})

    @classmethod
    def from_embeddings(cls, model, num: int = 3) -> "PromptTokens":
        """The model's first `num` embedding rows: stand-ins of the right shape for a model
        without a tokenizer (a shape-only model, random weights)."""
        emb = model.get_input_embeddings().weight.detach()[:num]
        return cls(emb.float().cpu().clone(), {"init": "embedding rows", "rows": num})

    def check_model(self, model) -> None:
        hidden = model.get_input_embeddings().weight.shape[1]
        if self.hidden != hidden:
            raise BadInput(f"prompt tokens have hidden size {self.hidden}, the model has "
                           f"{hidden}")

    def to(self, device, dtype) -> torch.Tensor:
        return self.embeddings.to(device=device, dtype=dtype)

    def save(self, folder) -> pathlib.Path:
        folder = pathlib.Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        write_atomic(folder / WEIGHTS, save({TENSOR: self.embeddings.float().contiguous()}))
        meta = {"format": "treeopt.prompt_tokens/1", "num_prompt_tokens": self.num,
                "hidden_size": self.hidden, "dtype": "float32", **self.meta}
        write_atomic(folder / CONFIG, json.dumps(meta, indent=1, allow_nan=False) + "\n")
        return folder

    def save_peft(self, folder, base_model: str = "") -> pathlib.Path:
        """Write the PPD authors' PEFT prompt-tuning layout."""
        folder = pathlib.Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        write_atomic(folder / PEFT_WEIGHTS,
                     save({TENSOR: self.embeddings.float().contiguous()}))
        config = {"peft_type": "PROMPT_TUNING", "task_type": "CAUSAL_LM",
                  "num_virtual_tokens": self.num, "num_special_tokens": self.num,
                  "virtual_tokens_per_special_token": 1, "token_dim": self.hidden,
                  "base_model_name_or_path": base_model or self.meta.get("model", ""),
                  "prompt_tuning_init": "TEXT", "vt_attention_type": "ensemble",
                  "aggregation_type": "mean"}
        write_atomic(folder / PEFT_CONFIG, json.dumps(config, indent=1) + "\n")
        return folder

    @classmethod
    def _load_peft(cls, folder: pathlib.Path) -> "PromptTokens":
        where = f"prompt tokens {folder}"
        try:
            config = json.loads((folder / PEFT_CONFIG).read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise BadInput(f"{where}: unreadable {PEFT_CONFIG} ({e})") from e
        v = config.get("virtual_tokens_per_special_token", 1)
        if v != 1:
            raise BadInput(f"{where}: virtual_tokens_per_special_token={v}; only 1 is supported")
        n = config.get("num_virtual_tokens")
        if (folder / PEFT_WEIGHTS).is_file():
            tensors = load_file(str(folder / PEFT_WEIGHTS))
        elif (folder / PEFT_BIN).is_file():
            try:
                tensors = torch.load(folder / PEFT_BIN, map_location="cpu", weights_only=True)
            except Exception as e:  # noqa: BLE001 - a refused or corrupt pickle is bad input
                raise BadInput(f"{where}: unreadable {PEFT_BIN} ({e.__class__.__name__})") from e
        else:
            raise BadInput(f"{where}: no {PEFT_WEIGHTS} or {PEFT_BIN}")
        emb = tensors.get(TENSOR)
        if emb is None:
            keys = [k for k in tensors if k.endswith(TENSOR) or k.endswith("embedding.weight")]
            emb = tensors[keys[0]] if keys else None
        if emb is None or emb.dim() != 2:
            raise BadInput(f"{where}: no 2-D {TENSOR!r} tensor")
        if n is not None and emb.shape[0] != n:
            raise BadInput(f"{where}: num_virtual_tokens={n} but {TENSOR} has {emb.shape[0]} rows")
        dim = config.get("token_dim")
        if dim is not None and emb.shape[1] != dim:
            raise BadInput(f"{where}: token_dim={dim} but {TENSOR} is {emb.shape[1]} wide")
        return cls(emb.float(), {"format": "peft", "model": config.get("base_model_name_or_path"),
                                 "num_special_tokens": config.get("num_special_tokens")})

    @classmethod
    def load(cls, folder) -> "PromptTokens":
        """Load our format or the PEFT layout, whichever the folder holds."""
        folder = pathlib.Path(folder)
        if not folder.is_dir():
            raise BadInput(f"prompt tokens {folder}: no such folder")
        if not (folder / WEIGHTS).is_file() and (folder / PEFT_CONFIG).is_file():
            return cls._load_peft(folder)
        if not (folder / WEIGHTS).is_file():
            raise BadInput(f"prompt tokens {folder}: neither {WEIGHTS} nor {PEFT_CONFIG}")
        try:
            tensors = load_file(str(folder / WEIGHTS))
            meta = json.loads((folder / CONFIG).read_text()) if (folder / CONFIG).is_file() else {}
        except Exception as e:  # noqa: BLE001 - corrupt file is bad input
            raise BadInput(f"prompt tokens {folder}: unreadable ({e})") from e
        if TENSOR not in tensors or tensors[TENSOR].dim() != 2:
            raise BadInput(f"prompt tokens {folder}: expected a 2-D tensor {TENSOR!r}")
        return cls(tensors[TENSOR].float(), meta)
