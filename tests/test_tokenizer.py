"""MistralTokenizer against mistral-common's SentencePieceTokenizer, token for token."""

from __future__ import annotations

import pytest
from mistral_common.tokens.tokenizers.sentencepiece import SentencePieceTokenizer

import mistral_tutorial as mt

TEXTS = [
    "",
    " ",
    "Hello, world!",
    "The Mistral 7B paper introduces sliding-window attention.",
    "  leading spaces and trailing   ",
    "whitespace    runs\t\ttabs\n\nnewlines\r\nCRLF",
    "\n",
    "\t",
    "café naïve façade Ångström résumé",
    "日本語のテキスト、中文文本，한국어",
    "emoji 😀🚀👩‍💻 and flags 🇫🇷",
    "math ∑ x² ≤ ∞, arrows → ←",
    "code: def f(x):\n    return x ** 2  # square\n",
    "<s> [INST] not special when typed [/INST] </s>",
    "0123456789 3.14159 1e-5",
    "ZWJ\u200djoiner and a \x00 null byte",
]


@pytest.fixture(scope="module")
def ours():
    return mt.MistralTokenizer()


@pytest.fixture(scope="module")
def reference():
    return SentencePieceTokenizer(str(mt.tokenizer.mistral_tokenizer_path()))


def test_vocab_and_specials(ours, reference):
    assert ours.vocab_size == 32000 == reference.n_words
    assert ours.bos_id == reference.bos_id == 1
    assert ours.eos_id == reference.eos_id == 2


@pytest.mark.parametrize("text", TEXTS, ids=range(len(TEXTS)))
@pytest.mark.parametrize("bos, eos", [(True, False), (False, False), (True, True), (False, True)])
def test_encode_matches_mistral_common(ours, reference, text, bos, eos):
    assert ours.encode(text, bos=bos, eos=eos) == reference.encode(text, bos=bos, eos=eos)


def test_encode_default_adds_bos_only(ours, reference):
    assert ours.encode("Hello") == reference.encode("Hello", bos=True, eos=False)
    assert ours.encode("") == [1]


@pytest.mark.parametrize("text", TEXTS, ids=range(len(TEXTS)))
def test_decode_matches_mistral_common(ours, reference, text):
    ids = reference.encode(text, bos=True, eos=True)
    assert ours.decode(ids) == reference.decode(ids)
    without_specials = reference.encode(text, bos=False, eos=False)
    assert ours.decode(without_specials) == reference.decode(without_specials)


def test_decode_of_arbitrary_ids_matches(ours, reference):
    import random

    rng = random.Random(0)
    for _ in range(20):
        ids = [rng.randrange(3, 32000) for _ in range(rng.randrange(1, 30))]
        assert ours.decode(ids) == reference.decode(ids)


def test_pieces(ours):
    ids = ours.encode("Hello world", bos=False)
    assert "".join(ours.pieces(ids)).replace("▁", " ").strip() == "Hello world"


@pytest.mark.parametrize("bad", [[32000], [-1], [5, 40000, 7]])
def test_decode_rejects_ids_outside_the_vocabulary(ours, bad):
    with pytest.raises(ValueError, match="vocabulary"):
        ours.decode(bad)


def test_encode_rejects_non_strings(ours):
    with pytest.raises(TypeError):
        ours.encode(b"bytes")  # type: ignore[arg-type]
