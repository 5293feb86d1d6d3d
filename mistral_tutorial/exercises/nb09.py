"""Notebook 09's exercises: Mixtral §5's statistics from one sequence's routing: the proportion of assignments per
expert (Fig 7), consecutive tokens with the same first choice and with a shared expert (Table 5), and their rates
under random routing."""

from __future__ import annotations

import torch

from ..routing import consecutive_same_expert, expert_proportions, random_baselines
from .checker import Case, Exercise


def random_assignment(n_layers: int, seq_len: int, n_experts: int, k: int, g: torch.Generator,
                      sticky: float = 0.0) -> list[torch.Tensor]:
    """Per layer a (T, k) int64 tensor of distinct experts per token, best first; `sticky` repeats the previous row."""
    layers = []
    for _ in range(n_layers):
        rows = [torch.randperm(n_experts, generator=g)[:k] for _ in range(seq_len)]
        for t in range(1, seq_len):
            if torch.rand(1, generator=g).item() < sticky:
                rows[t] = rows[t - 1][torch.randperm(k, generator=g)]           # the same experts, maybe reordered
        layers.append(torch.stack(rows))
    return layers


def _assignment_cases(seed: int, with_experts: bool) -> list[Case]:
    g = torch.Generator().manual_seed(seed)
    cases = []
    for n_layers, seq_len, n_experts, k, sticky, label in [(3, 12, 8, 2, 0.0, "Mixtral's E = 8, k = 2"),
                                                           (2, 20, 4, 2, 0.5, "consecutive tokens often agree"),
                                                           (1, 9, 6, 1, 0.3, "k = 1"), (2, 2, 8, 2, 0.0, "two tokens"),
                                                           (4, 6, 3, 3, 0.0, "k = E")]:
        assignment = random_assignment(n_layers, seq_len, n_experts, k, g, sticky)
        cases.append(Case((assignment, n_experts) if with_experts else (assignment,), label))
    return cases


def _first_reference(assignment: list[torch.Tensor]) -> torch.Tensor:
    return consecutive_same_expert(assignment)["first_choice"]


def _shared_reference(assignment: list[torch.Tensor]) -> torch.Tensor:
    return consecutive_same_expert(assignment)["top_k"]


def _baseline_reference(n_experts: int, k: int) -> tuple[float, float]:
    rates = random_baselines(n_experts, k)
    return rates["first_choice"], rates["top_k"]


def _slot_by_slot(assignment: list[torch.Tensor]) -> torch.Tensor:
    return torch.stack([(a[1:] == a[:-1]).any(dim=1).float().mean() for a in assignment])


def _same_set(assignment: list[torch.Tensor]) -> torch.Tensor:
    return torch.stack([(a[1:].sort(-1).values == a[:-1].sort(-1).values).all(dim=1).float().mean()
                        for a in assignment])


EXERCISES = [
    Exercise(
        "09.1-expert-proportions", "expert_proportions", expert_proportions, "mt.routing.expert_proportions",
        lambda: _assignment_cases(901, True),
        hint="Fig 7 counts every one of a token's k choices (first or second), per layer, and divides by that layer's "
             "total count, so each row sums to 1 (uniform routing: 1/E).",
        more="Per layer: `torch.bincount(experts.reshape(-1), minlength=n_experts).float()`, then divide by its sum; "
             "stack the rows into (L, E).",
        mistakes={"only the first choices were counted: Fig 7 counts an expert chosen first or second.":
                  lambda a, e: expert_proportions(a, e, first_choice_only=True),
                  "the counts were divided by the number of tokens T: each token counts k times, so divide by T k "
                  "(the row sums to 1).":
                  lambda a, e: expert_proportions(a, e) * a[0].shape[1]}),
    Exercise(
        "09.2-same-first-choice", "same_first_choice", _first_reference,
        "mt.routing.consecutive_same_expert(...)['first_choice']", lambda: _assignment_cases(902, False),
        hint="compare column 0 (the first choice) of token t with token t + 1's, over the T - 1 consecutive pairs, "
             "per layer: an (L,) tensor of fractions.",
        more="`(experts[1:, 0] == experts[:-1, 0]).float().mean()` for each layer, stacked.",
        mistakes={"the fraction was taken over T tokens: there are T - 1 consecutive pairs.":
                  lambda a: torch.stack([(x[1:, 0] == x[:-1, 0]).sum() / x.shape[0] for x in a]),
                  "the whole rows were compared: only the first choice has to repeat.":
                  lambda a: torch.stack([(x[1:] == x[:-1]).all(dim=1).float().mean() for x in a])}),
    Exercise(
        "09.3-shared-expert", "share_an_expert", _shared_reference, "mt.routing.consecutive_same_expert(...)['top_k']",
        lambda: _assignment_cases(903, False),
        hint="two consecutive tokens share an expert when some expert is among the k of both, in any slots: one "
             "token's first choice may be the other's second.",
        more="Compare every slot with every slot: `(current[:, :, None] == following[:, None, :]).any(dim=(1, 2))`, "
             "with current = experts[:-1], following = experts[1:]; then the mean per layer.",
        mistakes={"the slots were compared one by one (first with first, second with second): an expert that is one "
                  "token's first choice and the next token's second is shared too.": _slot_by_slot,
                  "both tokens were required to have the same set of experts: one expert in common is enough.":
                  _same_set}),
    Exercise(
        "09.4-random-baseline", "random_baseline", _baseline_reference, "mt.routing.random_baselines",
        lambda: [Case((8, 2), "Mixtral"), Case((4, 1), "k = 1"), Case((16, 4)), Case((6, 3)), Case((5, 5), "k = E")],
        hint="first choice: 1/E. Top k: one minus the chance that two independent random k-subsets of the E experts "
             "are disjoint, which is C(E - k, k) / C(E, k).",
        more="`math.comb(n_experts - k, k) / math.comb(n_experts, k)` counts the subsets that avoid a given one "
             "(math.comb returns 0 when E - k < k). Return the two rates as floats.",
        mistakes={"k/E is the chance that one given expert is chosen; two tokens may meet on any of the experts: "
                  "1 - C(E - k, k) / C(E, k).": lambda e, k: (1 / e, k / e),
                  "the experts were drawn with replacement: the k experts of a token are distinct.":
                  lambda e, k: (1 / e, 1 - (1 - k / e) ** k)}),
]
