"""Notebook 01's exercises: the embedding lookup, RMSNorm, LayerNorm, and SentencePiece pieces back to text."""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from ..embedding import TokenEmbedding, rms_norm
from ..tokenizer import MistralTokenizer
from .checker import Case, Exercise


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# -- 01.1 the embedding lookup -------------------------------------------------------------------------------------
def _embedding_reference(token_ids: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return TokenEmbedding(*table.shape, _weight=table)(token_ids)


def _embedding_cases() -> list[Case]:
    g = _generator(101)
    cases = [Case((torch.randint(0, vocab, shape, generator=g), torch.randn(vocab, dim, generator=g).to(dtype)), label)
             for shape, vocab, dim, dtype, label in [((2, 7), 50, 8, torch.float32, ""), ((1, 5), 11, 4, torch.float32, ""),
                                                     ((3, 1), 20, 6, torch.float32, "one token per row"),
                                                     ((9,), 30, 5, torch.float32, "ids (T,) without a batch"),
                                                     ((2, 4), 40, 8, torch.bfloat16, "a bf16 table")]]
    cases.append(Case((torch.tensor([[0, 9, 9, 0]]), torch.randn(10, 3, generator=g)), "the first and last rows"))
    return cases


# -- 01.2 RMSNorm --------------------------------------------------------------------------------------------------
def _norm_cases() -> list[Case]:
    g = _generator(102)
    cases = []
    for shape, scale, eps, dtype, label in [((2, 5, 16), 3.0, 1e-5, torch.float32, ""),
                                            ((4, 8), 0.01, 1e-5, torch.float32, "small activations: eps matters"),
                                            ((3, 64), 1.0, 1.0, torch.float32, "a large eps"),
                                            ((1, 2, 64), 4.0, 1e-6, torch.bfloat16, "bf16 in, bf16 out")]:
        x = (scale * torch.randn(shape, generator=g) + 0.5).to(dtype)
        cases.append(Case((x, (1.0 + 0.1 * torch.randn(shape[-1], generator=g)).to(dtype), eps), label))
    x = torch.randn(3, 8, generator=g)
    x[1] = 0.0
    cases.append(Case((x, torch.ones(8), 1e-5), "a row of zeros"))
    return cases


def _layer_norm_reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float) -> torch.Tensor:
    return F.layer_norm(x, (x.shape[-1],), weight, bias, eps)


def _layer_norm_cases() -> list[Case]:
    g = _generator(103)
    cases = []
    for shape, eps, label in [((2, 5, 16), 1e-5, ""), ((6, 4), 1e-5, "a short vector: n - 1 or n shows"),
                              ((3, 32), 0.5, "a large eps")]:
        x = 2.0 * torch.randn(shape, generator=g) + torch.randn(shape[:-1] + (1,), generator=g)
        cases.append(Case((x, 1.0 + 0.1 * torch.randn(shape[-1], generator=g), 0.1 * torch.randn(shape[-1], generator=g),
                           eps), label))
    return cases


# -- 01.4 pieces to text -------------------------------------------------------------------------------------------
TEXTS = ["Mistral 7B outperforms Llama 2 13B.", "  two  spaces\nnewline", "naïve café 🙂!", "A llama 🦙 and a planet 🪐",
         " a leading space", "\ttab", "日本語のテキスト", "x", "def square(x):\n    return x**2", "a\n\n b"]


@functools.lru_cache(maxsize=1)
def _tokenizer() -> MistralTokenizer:
    return MistralTokenizer()


def _pieces_reference(pieces: list[str]) -> str:
    tokenizer = _tokenizer()
    return tokenizer.decode([tokenizer.sp.piece_to_id(piece) for piece in pieces])


def _pieces_cases() -> list[Case]:
    tokenizer = _tokenizer()
    labels = {1: "a text that starts with two spaces", 2: "accents and an emoji in the vocabulary",
              3: "emojis as UTF-8 bytes", 4: "a text that starts with a space", 6: "no spaces at all"}
    return [Case((tokenizer.pieces(tokenizer.encode(text, bos=False)),), labels.get(i, "")) for i, text in enumerate(TEXTS)]


def _bytes_one_by_one(pieces: list[str]) -> str:
    text = "".join(chr(int(p[3:5], 16)) if p.startswith("<0x") else p.replace("▁", " ") for p in pieces)
    return text[1:] if text.startswith(" ") else text


def _strip_all(pieces: list[str]) -> str:
    out = bytearray()
    for p in pieces:
        out += bytes([int(p[3:5], 16)]) if p.startswith("<0x") and p.endswith(">") else p.replace("▁", " ").encode()
    return out.decode("utf-8").lstrip(" ")


EXERCISES = [
    Exercise(
        "01.1-embedding-lookup", "embed", _embedding_reference, "mt.TokenEmbedding", _embedding_cases,
        hint="a lookup, not a product: token id i is row i of the (V, d) table; the output has the ids' shape "
             "followed by d, and the table's dtype.",
        more="`table[token_ids]` indexes rows with a whole tensor of ids at once (so does F.embedding). The one-hot "
             "product of the notebook gives the same numbers, but in the one-hot's dtype unless you convert it.",
        mistakes={"the rows are shifted by one: ids are 0-based, id i is row i (not i - 1).":
                  lambda ids, table: table[ids - 1],
                  "a one-hot product in fp32: the output must keep the table's dtype (bf16 here).":
                  lambda ids, table: F.one_hot(ids, table.shape[0]).float() @ table.float()}),
    Exercise(
        "01.2-rms-norm", "rms_norm", rms_norm, "mt.rms_norm", _norm_cases,
        hint="RMS(x) = sqrt(mean of x² over the last dimension + eps): eps inside the square root, no mean subtracted, "
             "then times the gain; bf16 in gives bf16 out.",
        more="Compute in fp32 as transformers does: `x32 = x.float()`, `x32 * torch.rsqrt(x32.pow(2).mean(-1, "
             "keepdim=True) + eps)`, cast that back to x.dtype, and only then multiply by `weight`.",
        mistakes={"eps is missing: a row of zeros then gives 0/0 = nan, and small rows blow up.":
                  lambda x, w, eps: w * (x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True))).to(x.dtype),
                  "eps is added outside the square root: it belongs inside, sqrt(mean(x²) + eps).":
                  lambda x, w, eps: w * (x.float() / (x.float().pow(2).mean(-1, keepdim=True).sqrt() + eps)).to(x.dtype),
                  "the mean is subtracted first: that is LayerNorm; RMSNorm only rescales.":
                  lambda x, w, eps: w * F.layer_norm(x.float(), (x.shape[-1],), eps=eps).to(x.dtype),
                  "the result is fp32: cast the normalised x back to the input's dtype before the gain.":
                  lambda x, w, eps: w.float() * (x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + eps))}),
    Exercise(
        "01.3-layer-norm", "layer_norm", _layer_norm_reference, "F.layer_norm", _layer_norm_cases,
        hint="sigma² is the mean of (x - mu)², dividing by n, not n - 1 (torch.var's default divides by n - 1); eps "
             "inside the square root; then gain and bias.",
        more="`mu = x.mean(-1, keepdim=True)`, `var = (x - mu).pow(2).mean(-1, keepdim=True)`, then "
             "`(x - mu) / torch.sqrt(var + eps) * weight + bias`.",
        mistakes={"the variance divides by n - 1 (torch.var's default, unbiased): LayerNorm divides by n.":
                  lambda x, w, b, eps: (x - x.mean(-1, keepdim=True)) / torch.sqrt(x.var(-1, keepdim=True) + eps) * w + b,
                  "the bias is missing.": lambda x, w, b, eps: F.layer_norm(x, (x.shape[-1],), w, None, eps)}),
    Exercise(
        "01.4-pieces-to-text", "pieces_to_text", _pieces_reference, "MistralTokenizer.decode", _pieces_cases,
        hint="'▁' is a space, and SentencePiece put one in front of the text when encoding: drop that one leading "
             "space only. Consecutive `<0xNN>` pieces are the UTF-8 bytes of one character: decode them together.",
        more="Collect bytes: a `<0xNN>` piece adds `int(NN, 16)`, any other piece adds `piece.replace('▁', ' ')"
             ".encode()`; then `bytes(...).decode('utf-8')`, and remove the first character if it is a space.",
        mistakes={"each byte piece became a character of its own (chr(0xF0) ...): the bytes of one character must be "
                  "decoded together, as UTF-8.": _bytes_one_by_one,
                  "every leading space was stripped: only the one SentencePiece added goes; the text's own stay.":
                  _strip_all}),
]
