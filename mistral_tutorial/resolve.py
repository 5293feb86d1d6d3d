"""Which model and which tokenizer: the tiny Mixtral that ships inside the package (`data/tiny-mixtral`, found through
the package, so a plain `pip install` runs `mistral-tutorial route`), or any checkpoint path with the tokenizer that
belongs to it. The CLI and the notebooks both resolve through here.
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
