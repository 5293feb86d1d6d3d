"""The real Mistral v0.1 tokenizer: a 32000-piece SentencePiece BPE model shipped inside the `mistral-common` wheel."""

from __future__ import annotations

import os
from pathlib import Path

TOKENIZER_FILE = "tokenizer.model.v1"


def mistral_tokenizer_path() -> Path:
    """Where `tokenizer.model.v1` lies inside the installed mistral-common package."""
    try:
        import mistral_common
    except ImportError as err:  # pragma: no cover - a dependency of the package
        raise FileNotFoundError(
            "the Mistral v0.1 tokenizer ships in the mistral-common package; install it: pip install mistral-common"
        ) from err
    path = Path(os.path.dirname(mistral_common.__file__)) / "data" / TOKENIZER_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; reinstall mistral-common: pip install --force-reinstall mistral-common")
    return path


class MistralTokenizer:
    """Encode text to Mistral v0.1 token ids and back.

    Mistral v0.1 uses SentencePiece BPE with byte fallback: any string round-trips. bos = 1 (`<s>`), eos = 2 (`</s>`).
    Chat templates (`[INST] ... [/INST]`) are not handled here; see mistral-common for those.
    """

    def __init__(self, model_file: str | Path | None = None) -> None:
        import sentencepiece

        self.model_file = Path(model_file) if model_file is not None else mistral_tokenizer_path()
        if not self.model_file.is_file():
            raise FileNotFoundError(f"tokenizer model {self.model_file} does not exist")
        self.sp = sentencepiece.SentencePieceProcessor(model_file=str(self.model_file))
        self.bos_id: int = self.sp.bos_id()
        self.eos_id: int = self.sp.eos_id()

    @property
    def vocab_size(self) -> int:
        return self.sp.get_piece_size()

    def encode(self, text: str, bos: bool = True, eos: bool = False) -> list[int]:
        """Token ids for `text`, with `<s>` in front by default (as the model saw in training)."""
        if not isinstance(text, str):
            raise TypeError(f"encode() takes a str, got {type(text).__name__}")
        ids: list[int] = self.sp.encode(text)
        return ([self.bos_id] if bos else []) + ids + ([self.eos_id] if eos else [])

    def decode(self, ids: list[int]) -> str:
        """Text for token ids; special tokens (`<s>`, `</s>`) are dropped."""
        ids = [int(i) for i in ids]
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise ValueError(f"token ids {bad[:5]} lie outside the vocabulary [0, {self.vocab_size})")
        return self.sp.decode(ids)

    def pieces(self, ids: list[int]) -> list[str]:
        """The piece (sub-word string, '▁' for a leading space) of each id: what a learner sees of tokenisation."""
        return [self.sp.id_to_piece(int(i)) for i in ids]
