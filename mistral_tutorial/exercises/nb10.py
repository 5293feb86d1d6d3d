"""Notebook 10's exercises: the top-k and top-p (nucleus) filters, sampling with a temperature and a seed, and the
greedy generation loop without a cache. The filters are checked against transformers' own logits warpers."""

from __future__ import annotations

import functools

import torch

from ..config import ModelConfig
from ..generation import generate, sample_next
from ..model import Transformer
from .checker import Case, Exercise, Fresh


def _top_k_reference(logits: torch.Tensor, top_k: int) -> torch.Tensor:
    from transformers.generation.logits_process import TopKLogitsWarper  # imported only when checked

    return TopKLogitsWarper(top_k)(None, logits)


def _top_p_reference(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    from transformers.generation.logits_process import TopPLogitsWarper

    return TopPLogitsWarper(top_p)(None, logits)


def _logits(batch: int, vocab: int, seed: int, scale: float = 2.0) -> torch.Tensor:
    return scale * torch.randn(batch, vocab, generator=torch.Generator().manual_seed(seed))


def _top_k_cases() -> list[Case]:
    ties = torch.tensor([[1.0, 2.0, 2.0, 3.0, 0.0, -1.0]])
    return [Case((_logits(3, 10, 1), 3)), Case((_logits(2, 50, 2), 1), "k = 1"), Case((_logits(1, 8, 3), 8), "k = V"),
            Case((_logits(2, 6, 4), 10), "k larger than the vocabulary"), Case((ties, 2), "a tie at the k-th logit")]


def _top_p_cases() -> list[Case]:
    peaked = _logits(2, 12, 5)
    peaked[:, 3] += 8.0
    return [Case((_logits(4, 20, 6), 0.9)), Case((_logits(2, 30, 7), 0.5)), Case((_logits(3, 10, 8, 1.0), 0.1)),
            Case((peaked, 0.5), "one token above p on its own"), Case((_logits(2, 9, 9), 1.0), "p = 1: nothing cut")]


def _sample_cases() -> list[Case]:
    settings = [(0.0, None, None, "temperature 0: greedy"), (0.7, None, None, ""), (1.0, 5, None, "top-k"),
                (1.0, None, 0.8, "top-p"), (1.3, 10, 0.9, "top-k and top-p together"),
                (0.5, 0, 1.0, "top_k = 0 and top_p = 1: both off"), (1.0, 1, None, "top_k = 1: greedy again")]
    cases = []
    for seed, (temperature, top_k, top_p, label) in enumerate(settings):
        for repeat in range(2):
            generator = Fresh(functools.partial(lambda s: torch.Generator().manual_seed(s), 100 * seed + repeat))
            cases.append(Case((_logits(8, 40, 20 + seed), temperature, top_k, top_p, generator), label))
    return cases


@functools.lru_cache(maxsize=1)
def tiny_model() -> Transformer:
    """A tiny random Mistral (W = 4), seeded, for 10.4: a model call costs nothing."""
    with torch.random.fork_rng():
        torch.manual_seed(1004)
        config = ModelConfig(vocab_size=32, dim=16, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=32,
                             sliding_window=4, max_position_embeddings=64)
        model = Transformer(config).eval()
        with torch.no_grad():
            model.output.weight.mul_(8.0)                       # sharper logits: no near-ties between top tokens
    return model


def _greedy_reference(model: Transformer, prompt_ids: torch.Tensor, max_new_tokens: int) -> torch.Tensor:
    return generate(model, prompt_ids, max_new_tokens=max_new_tokens, fast=False)


def _greedy_cases() -> list[Case]:
    g = torch.Generator().manual_seed(1005)
    return [Case((tiny_model(), torch.randint(0, 32, (1, t), generator=g), n), label)
            for t, n, label in [(5, 6, ""), (1, 4, "a one-token prompt"), (3, 1, "one new token"),
                                (6, 9, "past the window W = 4")]]


def _filtered(logits, temperature, top_k, top_p):
    logits = logits.float() / temperature
    if top_k:
        logits = _top_k_reference(logits, top_k)
    if top_p is not None and top_p < 1:
        logits = _top_p_reference(logits, top_p)
    return logits


def _top_p_first(logits, temperature, top_k, top_p, generator):
    if temperature == 0:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if top_p is not None and top_p < 1:
        logits = _top_p_reference(logits, top_p)
    if top_k:
        logits = _top_k_reference(logits, top_k)
    return torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(-1)


def _drops_crossing(logits, top_p):
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    outside = sorted_logits.softmax(-1).cumsum(-1) > top_p
    outside[:, 0] = False
    return logits.masked_fill(outside.scatter(-1, order, outside), float("-inf"))


def _greedy_loop(model, prompt_ids, max_new_tokens, position=-1, keep_prompt=False):
    ids = prompt_ids
    with torch.no_grad():
        for _ in range(max_new_tokens):
            ids = torch.cat([ids, model(ids)[:, position].argmax(-1, keepdim=True)], dim=1)
    return ids if keep_prompt else ids[:, prompt_ids.shape[1]:]


EXERCISES = [
    Exercise(
        "10.1-top-k-filter", "top_k_filter", _top_k_reference, "transformers' TopKLogitsWarper", _top_k_cases,
        hint="keep every logit >= the k-th largest of its row (ties with it stay), set the others to -inf; "
             "k larger than the vocabulary keeps everything.",
        more="`kth = logits.topk(min(top_k, V), dim=-1).values[:, -1:]` (B, 1); "
             "`logits.masked_fill(logits < kth, float('-inf'))`.",
        mistakes={"the k-th logit itself was dropped (<= kth): only logits *below* the k-th go.":
                  lambda z, k: z.masked_fill(z <= z.topk(min(k, z.shape[-1]), -1).values[:, -1:], float("-inf")),
                  "the filtered logits were set to 0: a logit of 0 still has probability; use -inf.":
                  lambda z, k: z.masked_fill(z < z.topk(min(k, z.shape[-1]), -1).values[:, -1:], 0.0)}),
    Exercise(
        "10.2-top-p-filter", "top_p_filter", _top_p_reference, "transformers' TopPLogitsWarper", _top_p_cases,
        hint="the nucleus is the smallest set of most probable tokens whose probability reaches p: the token that "
             "crosses p is *in* it, and the top token always is.",
        more="Sort descending, probs = softmax of the sorted logits; a token is outside when the mass *before* it "
             "already reaches p: `probs.cumsum(-1) - probs >= top_p`; scatter that back to vocabulary order.",
        mistakes={"the token that crosses p was dropped (cumsum > p): the nucleus must reach p, so it keeps that token.":
                  _drops_crossing,
                  "the cumulative sum ran in vocabulary order: sort by probability first, largest first.":
                  lambda z, p: z.masked_fill(z.softmax(-1).cumsum(-1) - z.softmax(-1) >= p, float("-inf"))}),
    Exercise(
        "10.3-sample-next", "sample_next", sample_next, "mt.sample_next", _sample_cases,
        hint="temperature 0: argmax. Otherwise divide the logits by the temperature (in fp32), then top-k, then top-p "
             "(top_k None or 0 and top_p None or 1 are off), softmax, and draw every row with one "
             "torch.multinomial(probs, 1, generator=generator) call.",
        more="The order is the library's and transformers': temperature, top-k, top-p. Your filters of 10.1 and 10.2 "
             "do the middle part. The generator makes the draw reproducible: the same seed, the same tokens.",
        mistakes={"top-p ran before top-k: the library and transformers apply temperature, then top-k, then top-p "
                  "(top-p renormalises what top-k left).": _top_p_first,
                  "the temperature was ignored: divide the logits by it before the filters and the softmax.":
                  lambda z, t, k, p, g: z.argmax(-1) if t == 0 else torch.multinomial(
                      _filtered(z, 1.0, k, p).softmax(-1), 1, generator=g).squeeze(-1)}),
    Exercise(
        "10.4-greedy-generate", "greedy_generate", _greedy_reference, "mt.generate(..., fast=False)", _greedy_cases,
        hint="each step runs the model on the whole sequence so far (no cache), takes the argmax of the *last* "
             "position's logits, and appends it; return only the new tokens, (1, max_new_tokens).",
        more="`ids = prompt_ids`; repeat max_new_tokens times: `next_id = model(ids)[:, -1].argmax(-1, keepdim=True)`; "
             "`ids = torch.cat([ids, next_id], dim=1)`; finally `ids[:, prompt_ids.shape[1]:]`.",
        mistakes={"the argmax was taken at the first position: the next token comes from the last position's logits.":
                  lambda m, p, n: _greedy_loop(m, p, n, position=0),
                  "the prompt was returned with the new tokens: return only the max_new_tokens new ones.":
                  lambda m, p, n: _greedy_loop(m, p, n, keep_prompt=True)}),
]
