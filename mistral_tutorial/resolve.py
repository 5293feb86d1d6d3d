"""Which model and which tokenizer: the tiny Mixtral that ships inside the package (`data/tiny-mixtral`, found through
the package, so a plain `pip install` runs `mistral-tutorial route`), or any checkpoint path with the tokenizer that
belongs to it, and (`ChatTokenizer`) that tokenizer with a chat template for `generate`. The CLI and the notebooks
both resolve through here; the tokenizers themselves are in tokenizer.py (ours) and transformers.
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path
from typing import Any

import torch

from .model import Transformer
from .tokenizer import MistralTokenizer, SubsetTokenizer

# the package's own copy (package data); scripts/train_tiny_mixtral.py writes it
TINY_MIXTRAL_DIR = Path(str(files("mistral_tutorial") / "data" / "tiny-mixtral"))
REBUILD_COMMAND = "python scripts/train_tiny_mixtral.py"


def load_tiny_mixtral(path: str | Path | None = None, dtype: torch.dtype = torch.float32
                      ) -> tuple[Transformer, SubsetTokenizer]:
    """(model, tokenizer) of the committed tiny Mixtral (a reference folder with a vocab.json of kept Mistral ids)."""
    folder = Path(path) if path is not None else TINY_MIXTRAL_DIR
    if not all((folder / name).is_file() for name in ("params.json", "consolidated.safetensors", "vocab.json")):
        raise FileNotFoundError(f"no tiny Mixtral checkpoint at {folder} (params.json, consolidated.safetensors, "
                                f"vocab.json). Rebuild it (6-7 minutes on 2 CPU cores) with:\n    {REBUILD_COMMAND}")
    return Transformer.from_pretrained(folder, dtype=dtype), SubsetTokenizer.load(folder / "vocab.json")


def tokenizer_for(path: Path) -> Any:
    """The tokenizer of the checkpoint at `path`: a vocab.json subset (the tiny Mixtral's), the Mistral v0.1 tokenizer
    for a reference folder (its own tokenizer.model if it has one), else transformers' (from the folder, or the GGUF)."""
    path = Path(path).expanduser()
    if (path / "vocab.json").is_file():
        return SubsetTokenizer.load(path / "vocab.json")
    if (path / "params.json").is_file():
        return MistralTokenizer(path / "tokenizer.model" if (path / "tokenizer.model").is_file() else None)
    import transformers

    gguf = {"gguf_file": path.name} if path.suffix == ".gguf" else {}
    return transformers.AutoTokenizer.from_pretrained(str(path.parent if gguf else path), **gguf)


def load_model_and_tokenizer(model_path: str | None, dtype: torch.dtype = torch.float32, device: str = "cpu"
          ) -> tuple[Transformer, Any, str]:
    """(model, tokenizer, name): the packaged tiny Mixtral for None, else any checkpoint from_pretrained reads."""
    if model_path is None:
        model, tokenizer = load_tiny_mixtral()
        return model, tokenizer, "tiny Mixtral"
    path = Path(model_path).expanduser()
    model = Transformer.from_pretrained(path, dtype=dtype, device=device)
    return model, tokenizer_for(path), path.name


class ChatTokenizer:
    """Text <-> ids for whichever checkpoint was loaded, with a chat template where the model has one.

    One face over two kinds of tokenizer: ours (tokenizer.py; the Mistral-7B-Instruct v0.1 `[INST] ... [/INST]` format)
    and transformers' (its own chat template, if the checkpoint ships one). Chat is one user turn; no history.
    """

    def __init__(self, path: Path) -> None:
        tokenizer = tokenizer_for(path)                   # the one resolver, shared with `route`
        ours = isinstance(tokenizer, (MistralTokenizer, SubsetTokenizer))
        self.hf = None if ours else tokenizer
        self.mistral = tokenizer if ours else None

    def encode_prompt(self, prompt: str, chat: bool) -> list[int]:
        """Token ids of `prompt`, wrapped in the model's chat template for one user turn when `chat`."""
        if self.hf is not None:
            if chat and self.hf.chat_template:
                ids = self.hf.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                                  tokenize=True)
                ids = ids["input_ids"] if not isinstance(ids, list) else ids
                return list(ids)
            return self.hf.encode(prompt)
        assert self.mistral is not None
        # Mistral-7B-Instruct v0.1 format: <s>[INST] prompt [/INST]
        return self.mistral.encode(f"[INST] {prompt} [/INST]" if chat else prompt, bos=True)

    def decode(self, ids: list[int]) -> str:
        """Text of `ids`, special tokens dropped."""
        if self.hf is not None:
            return self.hf.decode(ids, skip_special_tokens=True)
        assert self.mistral is not None
        return self.mistral.decode(ids)

    @property
    def stop_ids(self) -> list[int]:
        """The end-of-sequence id(s) generation stops at."""
        if self.hf is not None:
            eos = self.hf.eos_token_id
            return [eos] if isinstance(eos, int) else list(eos or [])
        assert self.mistral is not None
        return [self.mistral.eos_id]
