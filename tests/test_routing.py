"""Routing analysis (Mixtral §5): the statistics against plain loops and closed forms, the corpus, the committed tiny
Mixtral checkpoint, and the `route` command."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest
import torch
from conftest import tiny_config
from matplotlib.patches import PathPatch, Rectangle

import mistral_tutorial as mt
from mistral_tutorial import routing
from mistral_tutorial.cli import main
from mistral_tutorial.corpus import DOMAINS, build_corpus, split_corpus
from mistral_tutorial.tokenizer import SubsetTokenizer

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def random_assignment(n_layers: int, seq_len: int, n_experts: int = 8, k: int = 2, seed: int = 0
                      ) -> list[torch.Tensor]:
    """Per layer (T, k): k distinct experts per token, uniformly at random."""
    generator = torch.Generator().manual_seed(seed)
    return [torch.stack([torch.randperm(n_experts, generator=generator)[:k] for _ in range(seq_len)])
            for _ in range(n_layers)]


# ---------------------------------------------------------------------------------------------------------------------
def test_consecutive_same_expert_matches_a_double_loop():
    documents = [random_assignment(3, 40, seed=1), random_assignment(3, 25, seed=2), random_assignment(3, 1, seed=3)]
    # a run of repeated first choices, so the counts are not all near the random rate
    documents[0][1][5:15, 0] = 7
    documents[0][1][5:15, 1] = 3
    got = routing.consecutive_same_expert(documents)
    for layer in range(3):
        pairs = same_first = shared = 0
        for document in documents:
            experts = document[layer].tolist()
            for t in range(len(experts) - 1):                       # pairs inside one document only
                pairs += 1
                same_first += experts[t][0] == experts[t + 1][0]
                shared += any(a == b for a in experts[t] for b in experts[t + 1])
        assert got["first_choice"][layer].item() == pytest.approx(same_first / pairs)
        assert got["top_k"][layer].item() == pytest.approx(shared / pairs)


def test_bootstrap_consecutive_resamples_whole_documents():
    documents = [[random_assignment(2, 30, seed=10 + d), random_assignment(2, 12, seed=20 + d)] for d in range(5)]
    documents[0][0][0][:, 0] = 4                               # one document repeats its first choice throughout
    samples = routing.bootstrap_consecutive(documents, n_resamples=200, seed=0)
    assert samples["first_choice"].shape == samples["top_k"].shape == (200, 2)
    again = routing.bootstrap_consecutive(documents, n_resamples=200, seed=0)
    assert torch.equal(samples["first_choice"], again["first_choice"])      # seeded
    # a sample that draws every document once is the pooled statistic; one document alone gives its own
    pooled = routing.consecutive_same_expert([w for windows in documents for w in windows])
    lone = routing.bootstrap_consecutive(documents[:1], n_resamples=3)
    torch.testing.assert_close(lone["top_k"][0], routing.consecutive_same_expert(documents[0])["top_k"])
    assert (samples["first_choice"].min(0).values <= pooled["first_choice"]).all()
    assert (samples["first_choice"].max(0).values >= pooled["first_choice"]).all()


# Mixtral of Experts (Jiang et al. 2024), arXiv:2401.04088v1, page 8, Table 5 "Percentage of expert assignment
# repetitions", row by row as the paper prints it: First choice at layers 0, 15, 31, then First or second choice at
# layers 0, 15, 31. Typed here from a page-by-page transcription of the v1 PDF, apart from routing.py's copy; the two
# agree on all 48 cells.
PAPER_TABLE_5 = """
ArXiv            | 14.0% | 27.9% | 22.7% | 46.5% | 62.3% | 52.9%
DM Mathematics   | 14.1% | 28.4% | 19.7% | 44.9% | 67.0% | 44.5%
Github           | 14.9% | 28.1% | 19.7% | 49.9% | 66.9% | 49.2%
Gutenberg        | 13.9% | 26.1% | 26.3% | 49.5% | 63.1% | 52.2%
PhilPapers       | 13.6% | 25.3% | 22.1% | 46.9% | 61.9% | 51.3%
PubMed Abstracts | 14.2% | 24.6% | 22.0% | 48.6% | 61.6% | 51.8%
StackExchange    | 13.6% | 27.2% | 23.6% | 48.2% | 64.6% | 53.6%
Wikipedia (en)   | 14.4% | 23.6% | 25.3% | 49.8% | 62.1% | 51.8%
"""


def test_mixtral_table_5_holds_the_papers_48_values():
    rows = [[cell.strip() for cell in line.split("|")] for line in PAPER_TABLE_5.strip().splitlines()]
    paper = {row[0]: [float(cell.rstrip("%")) for cell in row[1:]] for row in rows}
    assert list(routing.MIXTRAL_TABLE_5) == list(paper)                                  # the paper's rows, in order
    assert routing.MIXTRAL_TABLE_5_LAYERS == (0, 15, 31)
    for domain, values in paper.items():
        ours = routing.MIXTRAL_TABLE_5[domain]
        assert list(ours["first_choice"]) + list(ours["top_k"]) == values, domain
    assert sum(len(v) for v in paper.values()) == 48
    # the caption: layer 0 is close to random (1/8 = 12.5 %, 1 - 6/8 * 5/7 = 46 %), layers 15 and 31 well above it
    baselines = routing.random_baselines(8, 2)
    for values in paper.values():
        assert abs(values[0] / 100 - baselines["first_choice"]) < 0.03 and min(values[1:3]) / 100 > 0.19


def test_random_baselines_closed_form_and_simulation():
    baselines = routing.random_baselines(8, 2)
    assert baselines["first_choice"] == 0.125
    assert baselines["top_k"] == pytest.approx(1 - 15 / 28)                    # 1 - C(6,2)/C(8,2) = 46.4 %
    assert baselines["top_k"] == pytest.approx(1 - 6 / 8 * 5 / 7)              # the paper's form
    rng = random.Random(0)
    trials = 200_000
    meet = sum(bool(set(rng.sample(range(8), 2)) & set(rng.sample(range(8), 2))) for _ in range(trials))
    assert meet / trials == pytest.approx(0.4643, abs=0.005)
    # the statistic on random routing lands on the baselines
    stats = routing.consecutive_same_expert(random_assignment(1, 20_000, seed=4))
    assert stats["first_choice"].item() == pytest.approx(0.125, abs=0.01)
    assert stats["top_k"].item() == pytest.approx(baselines["top_k"], abs=0.015)


def test_expert_proportions_sum_to_one_and_count_every_choice():
    documents = [random_assignment(4, 30, seed=5), random_assignment(4, 10, seed=6)]
    for first_only in (False, True):
        proportions = routing.expert_proportions(documents, 8, first_choice_only=first_only)
        assert proportions.shape == (4, 8)
        torch.testing.assert_close(proportions.sum(dim=1), torch.ones(4))
    one = [torch.tensor([[0, 1], [0, 2], [3, 0]])]                             # 3 tokens, k = 2, one layer
    torch.testing.assert_close(routing.expert_proportions(one, 4), torch.tensor([[3, 1, 1, 1]]) / 6)
    torch.testing.assert_close(routing.expert_proportions(one, 4, first_choice_only=True),
                               torch.tensor([[2, 0, 0, 1]]) / 3)


def test_draw_routed_text_wraps_and_breaks_lines():
    tokens = ["▁def", "▁f", "(", "x", "):", "<0x0A>", "▁▁▁", "▁return", "▁x"] * 6
    ax = routing.draw_routed_text(tokens, torch.arange(len(tokens)) % 8, width=30)
    rectangles = [p for p in ax.patches if isinstance(p, Rectangle)]          # the glyphs are PathPatches
    assert len(rectangles) == len(tokens)                                      # one box a token ('↵' for newlines)
    assert max(r.get_x() + r.get_width() for r in rectangles) <= 30
    assert ax.get_ylim()[0] == 7                                               # 6 newlines -> 7 rows
    words = ["▁abcdefgh"] * 10                                                 # 9 characters each
    ax = routing.draw_routed_text(words, torch.zeros(10, dtype=torch.long), width=30)
    assert all(isinstance(p, PathPatch) for p in ax.patches if not isinstance(p, Rectangle))
    assert ax.get_ylim()[0] == 4                                               # 3 words a row: 3 + 3 + 3 + 1
    assert max(r.get_x() + r.get_width() for r in ax.patches if isinstance(r, Rectangle)) <= 30


# ---------------------------------------------------------------------------------------------------------------------
def test_corpus_is_deterministic_and_labelled():
    first, second = build_corpus(20_000, seed=0), build_corpus(20_000, seed=0)
    assert first == second
    assert tuple(first) == DOMAINS
    assert all(len(first[d]) > 0 and sum(map(len, first[d])) >= 20_000 for d in DOMAINS)
    assert all("Question:" in doc and "Answer:" in doc for doc in first["math"])
    assert any("def " in doc for doc in first["python"])
    assert not any("Question:" in doc for doc in first["prose"])
    assert build_corpus(20_000, seed=1)["math"] != first["math"]               # the seed drives the generator
    train, held_out = split_corpus(first, 0.2, seed=0)
    assert (train, held_out) == split_corpus(first, 0.2, seed=0)
    for domain in DOMAINS:
        assert sorted(train[domain] + held_out[domain]) == sorted(first[domain])
        assert len(held_out[domain]) >= 1


def test_subset_tokenizer_round_trips_the_corpus_pieces():
    texts = ["def f(x):\n    return x + 1\n", "Question: What is 3 times 7?\nAnswer: 21\n"]
    tokenizer = SubsetTokenizer.from_texts(texts)
    full = mt.MistralTokenizer()
    for text in texts:
        ids = tokenizer.encode(text)
        assert tokenizer.to_mistral(ids) == full.encode(text)
        assert tokenizer.decode(ids) == full.decode(full.encode(text))
    unseen = full.encode("Zanzibar zebras", bos=False)
    assert tokenizer.encode("Zanzibar zebras", bos=False) == [tokenizer.index.get(i, tokenizer.unk_id) for i in unseen]
    assert tokenizer.unk_id in tokenizer.encode("Zanzibar zebras", bos=False)


# ---------------------------------------------------------------------------------------------------------------------
def test_committed_checkpoint_loads_and_is_small():
    folder = routing.TINY_MIXTRAL_DIR
    size = sum(f.stat().st_size for f in folder.iterdir() if f.is_file())
    assert size <= 20 * 2**20, f"{folder} holds {size / 2**20:.1f} MiB, over the 20 MB budget"
    model, tokenizer = routing.load_tiny_mixtral()
    assert model.config.n_experts > 0 and model.config.experts_per_token == 2
    assert model.config.vocab_size == tokenizer.vocab_size
    assert json.loads((folder / "params.json").read_text())["moe"]["num_experts"] == model.config.n_experts
    assignment = routing.expert_assignments(model, tokenizer.encode("def f(x):\n    return x\n"))
    assert len(assignment) == model.config.n_layers
    assert all(a.shape == (len(tokenizer.encode("def f(x):\n    return x\n")), 2) for a in assignment)
    torch.testing.assert_close(routing.expert_proportions(assignment, 8).sum(dim=1), torch.ones(len(assignment)))


def test_expert_assignments_match_transformers_router():
    """Our chosen experts == top-2 of transformers' Mixtral router logits on the same weights (an independent check)."""
    cfg = tiny_config(n_experts=8, experts_per_token=2, sliding_window=None)
    model = mt.Transformer(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.1)
    hf = mt.loading.to_hf(model)
    ids = torch.randint(0, cfg.vocab_size, (1, 24))
    with torch.no_grad():
        out = hf(input_ids=ids, output_router_logits=True, use_cache=False)
    ours = routing.expert_assignments(model, ids)
    for layer, logits in enumerate(out.router_logits):
        theirs = torch.softmax(logits.float(), dim=-1).topk(2, dim=-1).indices    # (T, 2)
        assert torch.equal(ours[layer], theirs), f"layer {layer}"


def test_missing_checkpoint_names_the_rebuild_command(tmp_path):
    with pytest.raises(FileNotFoundError, match="scripts/train_tiny_mixtral.py"):
        routing.load_tiny_mixtral(tmp_path)


# ---------------------------------------------------------------------------------------------------------------------
def test_route_writes_a_png(tmp_path, capsys):
    out = tmp_path / "r.png"
    assert main(["route", "def f(x): return x", "--out", str(out)]) == 0
    assert out.read_bytes()[:8] == PNG_SIGNATURE
    assert "wrote" in capsys.readouterr().out


def test_route_on_a_dense_model_says_it_has_no_experts(tmp_path, capsys):
    from safetensors.torch import save_file

    model = mt.Transformer(tiny_config(vocab_size=32000, sliding_window=None))
    (tmp_path / "params.json").write_text(json.dumps(model.config.to_params()))
    state = mt.loading.ours_to_reference(model.state_dict(), model.config)
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "consolidated.safetensors"))
    code = main(["route", "hello", "--out", str(tmp_path / "r.png"), "--model", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 2
    assert "no experts" in err and "upcycle" in err
    assert not (tmp_path / "r.png").exists()


def test_route_rejects_a_layer_out_of_range(tmp_path, capsys):
    assert main(["route", "x = 1", "--out", str(tmp_path / "r.png"), "--layer", "99"]) == 2
    assert "layers 0.." in capsys.readouterr().err


def test_random_baseline_formula_for_other_shapes():
    for n_experts, k in ((8, 1), (16, 2), (64, 6)):
        value = routing.random_baselines(n_experts, k)["top_k"]
        assert value == pytest.approx(1 - math.comb(n_experts - k, k) / math.comb(n_experts, k))
    assert routing.random_baselines(8, 1)["top_k"] == pytest.approx(1 / 8)    # k = 1: top-k is the first choice


def test_trainer_quick_run_writes_a_loadable_checkpoint(tmp_path):
    """`scripts/train_tiny_mixtral.py --quick`: the CI-sized run trains, lowers the loss and saves what routing loads."""
    import subprocess
    import sys

    repo = Path(__file__).resolve().parents[1]                  # the checkout this test file lives in
    result = subprocess.run([sys.executable, str(repo / "scripts" / "train_tiny_mixtral.py"), "--quick",
                             "--out", str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    log = json.loads((tmp_path / "training_log.json").read_text())
    assert log["train"][-1]["lm_loss"] < log["train"][0]["lm_loss"] - 1.0
    model, tokenizer = routing.load_tiny_mixtral(tmp_path)
    assert model.config.n_experts == 8 and model.config.vocab_size == tokenizer.vocab_size
