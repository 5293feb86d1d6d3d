"""Mixtral §5, routing analysis: which experts the tokens of each domain pick (Fig 7), how often consecutive tokens pick
the same expert (Table 5), and the choices to colour text by (Fig 8, drawn by viz_routing.draw_routed_text).

Model-agnostic: every function takes any `Transformer` with n_experts > 0: the tiny Mixtral trained by
scripts/train_tiny_mixtral.py (`load_tiny_mixtral`), an upcycled dense model, or Mixtral 8x7B itself. An `assignment`
is what `expert_assignments` returns for one sequence: per layer, the (T, k) chosen experts, best first.
Left out: the router's weights (only which experts are chosen is counted, as in the paper).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from .model import Transformer
from .resolve import TINY_MIXTRAL_DIR, load_tiny_mixtral  # noqa: F401  (the notebooks' routing.TINY_MIXTRAL_DIR)
from .tokenizer import token_strings  # noqa: F401  (routing.token_strings, as before)
from .viz_routing import draw_routed_text  # noqa: F401  (drawn in viz_routing.py; routing.draw_routed_text)

Assignment = list[torch.Tensor]                        # per layer: (T, k) expert ids, first choice in column 0


def _require_experts(model: Transformer) -> None:
    if not model.config.is_moe:
        raise ValueError("this is a dense model (n_experts = 0): it has no experts to route. Make an MoE copy first, "
                         "e.g. mt.upcycle(model, n_experts=8) (its router is random until trained), or load a Mixtral")


@torch.no_grad()
def expert_assignments(model: Transformer, token_ids: Any) -> Assignment:
    """One forward pass (no cache, eval mode) over one sequence (T,) or (1, T); per layer the chosen experts (T, k)."""
    _require_experts(model)
    ids = torch.as_tensor(token_ids, dtype=torch.long).to(model.device)
    ids = ids[None] if ids.dim() == 1 else ids                                     # (1, T)
    if ids.dim() != 2 or ids.shape[0] != 1:
        raise ValueError(f"expert_assignments takes one sequence, (T,) or (1, T); got shape {tuple(ids.shape)}")
    was_training = model.training
    model.eval()
    for layer in model.layers:
        layer.feed_forward.record_routing = True
    model(ids)
    model.train(was_training)
    return [experts.cpu() for experts in model.chosen_experts()]                  # L x (T, k)


def _as_documents(assignments: Assignment | list[Assignment]) -> list[Assignment]:
    """One sequence's assignment, or a list of them -> a list of them."""
    return [assignments] if isinstance(assignments[0], torch.Tensor) else list(assignments)


def expert_proportions(assignments: Assignment | list[Assignment], n_experts: int, first_choice_only: bool = False
                       ) -> torch.Tensor:
    """Fig 7: (L, E), row l = the share of layer l's token-expert assignments that went to each expert; rows sum to 1.

    Every token counts k times, once per chosen expert (the paper counts experts "selected as a first or second
    choice"), so uniform routing gives 1/E everywhere. first_choice_only=True counts only each token's first choice.
    """
    documents = _as_documents(assignments)
    n_layers = len(documents[0])
    counts = torch.zeros(n_layers, n_experts)
    for document in documents:
        for layer, experts in enumerate(document):
            chosen = experts[:, :1] if first_choice_only else experts                 # (T, 1) or (T, k)
            counts[layer] += torch.bincount(chosen.reshape(-1), minlength=n_experts).float()
    return counts / counts.sum(dim=1, keepdim=True)


def consecutive_counts(assignment: Assignment) -> tuple[torch.Tensor, torch.Tensor, int]:
    """One sequence's Table 5 counts: per layer, the pairs (t, t+1) with the same first choice (L,), with a shared
    expert among the k (L,), and the number of pairs. Pooled (summed) by `consecutive_same_expert` and resampled by
    `bootstrap_consecutive`."""
    n_layers = len(assignment)
    same_first, shared = torch.zeros(n_layers), torch.zeros(n_layers)
    for layer, experts in enumerate(assignment):
        current, following = experts[:-1], experts[1:]                                # (T-1, k) each
        same_first[layer] = (current[:, 0] == following[:, 0]).sum()
        shared[layer] = (current[:, :, None] == following[:, None, :]).any(dim=(1, 2)).sum()   # (T-1,) -> count
    return same_first, shared, max(0, assignment[0].shape[0] - 1)


def consecutive_same_expert(assignments: Assignment | list[Assignment]) -> dict[str, torch.Tensor]:
    """Table 5: per layer, the fraction of consecutive token pairs (t, t+1) whose routing repeats.

    "first_choice": token t+1's first-choice expert is token t's first-choice expert.
    "top_k": the two tokens' sets of k chosen experts share at least one expert (for k = 2 the paper's "first or second
    choice": some expert is a first or second choice of both tokens).
    Pairs never straddle two sequences; pairs of all sequences are pooled. Returns {name: (L,) fractions}.
    """
    counts = [consecutive_counts(document) for document in _as_documents(assignments)]
    pairs = sum(n for _, _, n in counts)
    if pairs == 0:
        raise ValueError("no consecutive token pairs: every sequence has fewer than 2 tokens")
    return {"first_choice": sum(c[0] for c in counts) / pairs, "top_k": sum(c[1] for c in counts) / pairs}


def bootstrap_consecutive(documents: list[list[Assignment]], n_resamples: int = 1000, seed: int = 0
                          ) -> dict[str, torch.Tensor]:
    """Table 5's fractions on `n_resamples` bootstrap samples of the documents: {name: (n_resamples, L)}.

    documents: one list of sequence assignments (windows) per document. A bootstrap sample draws as many documents as
    there are, with replacement (a seeded torch.Generator), and pools the pairs of all their windows, so the spread
    measures how much the statistic depends on which documents happened to be held out; pairs inside one document,
    which are far from independent, stay together. Left out: any uncertainty from the model's training itself.
    """
    if not documents:
        raise ValueError("no documents to resample")
    per_document = []                                                            # (3, L) per document
    for windows in documents:
        counts = [consecutive_counts(window) for window in windows]
        per_document.append(torch.stack([sum(c[0] for c in counts), sum(c[1] for c in counts),
                                         torch.full_like(counts[0][0], float(sum(c[2] for c in counts)))]))
    table = torch.stack(per_document)                                            # (D, 3, L)
    generator = torch.Generator().manual_seed(seed)
    picks = torch.randint(0, len(documents), (n_resamples, len(documents)), generator=generator)   # (R, D)
    totals = table[picks].sum(dim=1)                                             # (R, 3, L)
    return {"first_choice": totals[:, 0] / totals[:, 2], "top_k": totals[:, 1] / totals[:, 2]}


# Mixtral (Jiang et al. 2024, arXiv:2401.04088), Table 5: percentage of consecutive tokens of The Pile's validation
# subsets assigned to the same expert, at layers 0, 15 and 31 (v1, page 8; all 48 values checked against the paper
# by tests/test_routing.py). "top_k" is the paper's "First or second choice" columns.
MIXTRAL_TABLE_5_LAYERS = (0, 15, 31)
MIXTRAL_TABLE_5 = {   # domain: {statistic: (layer 0, layer 15, layer 31) in %}
    "ArXiv": {"first_choice": (14.0, 27.9, 22.7), "top_k": (46.5, 62.3, 52.9)},
    "DM Mathematics": {"first_choice": (14.1, 28.4, 19.7), "top_k": (44.9, 67.0, 44.5)},
    "Github": {"first_choice": (14.9, 28.1, 19.7), "top_k": (49.9, 66.9, 49.2)},
    "Gutenberg": {"first_choice": (13.9, 26.1, 26.3), "top_k": (49.5, 63.1, 52.2)},
    "PhilPapers": {"first_choice": (13.6, 25.3, 22.1), "top_k": (46.9, 61.9, 51.3)},
    "PubMed Abstracts": {"first_choice": (14.2, 24.6, 22.0), "top_k": (48.6, 61.6, 51.8)},
    "StackExchange": {"first_choice": (13.6, 27.2, 23.6), "top_k": (48.2, 64.6, 53.6)},
    "Wikipedia (en)": {"first_choice": (14.4, 23.6, 25.3), "top_k": (49.8, 62.1, 51.8)},
}


def random_baselines(n_experts: int = 8, experts_per_token: int = 2) -> dict[str, float]:
    """The same fractions if every token drew its k experts uniformly at random, independently.

    first choice: P(same) = 1/E (12.5 % for E = 8). top-k: P(two random k-subsets of E meet)
    = 1 - C(E-k, k) / C(E, k) (1 - 15/28 = 46.4 % for E = 8, k = 2; the paper's 1 - 6/8 * 5/7).
    """
    return {"first_choice": 1.0 / n_experts,
            "top_k": 1.0 - math.comb(n_experts - experts_per_token, experts_per_token) / math.comb(n_experts,
                                                                                                  experts_per_token)}


# ---------------------------------------------------------------------------------------------------------------------
