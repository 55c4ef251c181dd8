"""The K trainable prompt-token embeddings: init, load/save.

Our format: a folder with ``prompt_tokens.safetensors`` (tensor ``prompt_embeddings``
[K, hidden], float32) and ``prompt_tokens.json`` (model id, K, hidden size, how it was
made, measured accuracies).
"""
from __future__ import annotations

import dataclasses
import json
import pathlib

import torch

from .artefact import write_atomic
from .errors import BadInput

WEIGHTS = "prompt_tokens.safetensors"
CONFIG = "prompt_tokens.json"
TENSOR = "prompt_embeddings"
DEFAULT_INIT_TEXT = "the next word then the word after that"


@dataclasses.dataclass
class PromptTokens:
    embeddings: torch.Tensor  # [K, hidden], float32
    meta: dict = dataclasses.field(default_factory=dict)

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

    def check_model(self, model) -> None:
        hidden = model.get_input_embeddings().weight.shape[1]
        if self.hidden != hidden:
            raise BadInput(f"prompt tokens have hidden size {self.hidden}, the model has "
                           f"{hidden}")

    def to(self, device, dtype) -> torch.Tensor:
        return self.embeddings.to(device=device, dtype=dtype)

    def save(self, folder) -> pathlib.Path:
        from safetensors.torch import save

        folder = pathlib.Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        write_atomic(folder / WEIGHTS, save({TENSOR: self.embeddings.float().contiguous()}))
        meta = {"format": "treeopt.prompt_tokens/1", "num_prompt_tokens": self.num,
                "hidden_size": self.hidden, "dtype": "float32", **self.meta}
        write_atomic(folder / CONFIG, json.dumps(meta, indent=1) + "\n")
        return folder

    @classmethod
    def load(cls, folder) -> "PromptTokens":
        from safetensors.torch import load_file

        folder = pathlib.Path(folder)
        if not (folder / WEIGHTS).is_file():
            raise BadInput(f"prompt tokens {folder}: no {WEIGHTS}")
        try:
            tensors = load_file(str(folder / WEIGHTS))
            meta = json.loads((folder / CONFIG).read_text()) if (folder / CONFIG).is_file() else {}
        except Exception as e:  # noqa: BLE001 - corrupt file is bad input
            raise BadInput(f"prompt tokens {folder}: unreadable ({e})") from e
        if TENSOR not in tensors or tensors[TENSOR].dim() != 2:
            raise BadInput(f"prompt tokens {folder}: expected a 2-D tensor {TENSOR!r}")
        return cls(tensors[TENSOR].float(), meta)
