"""The real Mistral v0.1 tokenizer (a 32000-piece SentencePiece BPE model shipped inside the `mistral-common` wheel),
its vocabulary cut to the pieces a corpus uses (`SubsetTokenizer`, the tiny Mixtral's), and each token's text."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

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


class SubsetTokenizer:
    """The Mistral v0.1 tokenizer with its vocabulary cut to the pieces a corpus uses: model id i <-> Mistral id kept[i].

    A tiny model then needs an embedding table of a few thousand rows instead of 32000. Text splits into exactly the
    pieces the full tokenizer gives; a piece the corpus never used becomes `<unk>` (model id of Mistral id 0).
    """

    def __init__(self, kept_mistral_ids: list[int], base: Any = None) -> None:
        self.base = base if base is not None else MistralTokenizer()
        self.kept = sorted(set(int(i) for i in kept_mistral_ids) | {0, 1, 2})      # <unk>, <s>, </s> always kept
        self.index = {mistral_id: i for i, mistral_id in enumerate(self.kept)}
        self.unk_id, self.bos_id, self.eos_id = self.index[0], self.index[1], self.index[2]

    @classmethod
    def from_texts(cls, texts: list[str]) -> SubsetTokenizer:
        """Keep every piece the Mistral tokenizer uses on `texts`."""
        base = MistralTokenizer()
        return cls(sorted({i for text in texts for i in base.encode(text, bos=False)}), base)

    @property
    def vocab_size(self) -> int:
        return len(self.kept)

    def encode(self, text: str, bos: bool = True, eos: bool = False) -> list[int]:
        """Model ids for `text` (pieces outside the kept vocabulary -> unk_id)."""
        return [self.index.get(i, self.unk_id) for i in self.base.encode(text, bos=bos, eos=eos)]

    def to_mistral(self, ids: list[int]) -> list[int]:
        return [self.kept[int(i)] for i in ids]

    def decode(self, ids: list[int]) -> str:
        return self.base.decode(self.to_mistral(ids))

    def pieces(self, ids: list[int]) -> list[str]:
        """The Mistral piece of each model id ('▁' for a leading space, '<0x0A>' for a newline)."""
        return self.base.pieces(self.to_mistral(ids))

    def save(self, path: str | Path) -> None:
        """Write `{"base": ..., "kept_mistral_ids": [...]}` as JSON (the vocab.json of a checkpoint folder)."""
        payload = {"base": "Mistral v0.1 SentencePiece (mistral-common tokenizer.model.v1)", "kept_mistral_ids": self.kept}
        Path(path).write_text(json.dumps(payload) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> SubsetTokenizer:
        return cls(json.loads(Path(path).read_text())["kept_mistral_ids"])


def token_strings(tokenizer: Any, ids: list[int]) -> list[str]:
    """Each token's text: the piece for our SentencePiece tokenizers, else (transformers) the text it adds on decode."""
    if hasattr(tokenizer, "pieces"):
        return tokenizer.pieces(ids)
    texts = [tokenizer.decode(ids[:i], skip_special_tokens=True) for i in range(len(ids) + 1)]
    return [after[len(before):] for before, after in zip(texts, texts[1:])]
