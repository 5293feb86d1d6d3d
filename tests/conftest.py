"""Shared helpers: tiny configs, a random transformers model with our copy of it, and transformers' greedy reference.

Every test compares the library with transformers 5.x (or a plain re-derivation) on tiny fp32 models, so the whole
suite runs on two CPU cores in a few minutes. Imported by the test modules as `from conftest import ...`.
"""

from __future__ import annotations

import os
import tempfile
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
# The decode layout is measured per CPU (kernel_choice.py): the tests fix it to the fused one, the fastest on this
# project's machines, so that every run tests the same code, and test the other layouts and the choice explicitly.
# Decisions a test makes go to a file of the test run's own.
os.environ.setdefault("MISTRAL_TUTORIAL_LAYOUT", "fused")
os.environ.setdefault("MISTRAL_TUTORIAL_DECISIONS",
                      os.path.join(tempfile.mkdtemp(prefix="mistral-tutorial-tests-"), "decisions.json"))

import pytest  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402

import mistral_tutorial as mt  # noqa: E402

# A top-2 logit gap under this is a genuine tie: fp32 round-off may pick either token.
TIE_TOLERANCE = 1e-4

# Tiny models gain nothing from threads, and on a busy 2-core machine OpenMP threads spin-wait against each other
# (a 2-layer forward went from 1 ms to 0.4 s): one thread keeps the suite fast and steady.
torch.set_num_threads(1)


# ---------------------------------------------------------------------------------------------------------------------
# Markers (registered in pyproject.toml): `network` tests download; `model` tests read the SmolLM2 GGUF that
# `mistral-tutorial fetch` downloads, so until it is fetched they count as network tests too. `pytest -m "not network"`
# then runs offline, and the summary says which tests it left out and why.
_LEFT_OUT: list[str] = []


@pytest.hookimpl(tryfirst=True)             # before -m deselects: a `model` test without the model is a network test
def pytest_collection_modifyitems(config, items):
    from mistral_tutorial.assets import default_model_path

    fetched = default_model_path().is_file()
    for item in items:
        if item.get_closest_marker("model") and not fetched:
            item.add_marker(pytest.mark.network)
    if "not network" in (config.getoption("markexpr") or ""):
        _LEFT_OUT.extend(f"{item.nodeid} ({'the unfetched model' if item.get_closest_marker('model') else 'the internet'})"
                         for item in items if item.get_closest_marker("network"))


def pytest_terminal_summary(terminalreporter):
    if _LEFT_OUT:
        terminalreporter.section("left out: they need the network (-m 'not network')")
        for line in _LEFT_OUT:
            terminalreporter.write_line(line)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def tiny_config(**overrides) -> mt.ModelConfig:
    """A Mistral-shaped config small enough for CPU tests: 2 layers, dim 64, GQA 4:2, window 4."""
    fields = dict(vocab_size=128, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=None, hidden_dim=96,
                  norm_eps=1e-5, rope_theta=10000.0, sliding_window=4, max_position_embeddings=512)
    fields.update(overrides)
    return mt.ModelConfig(**fields)


def randomize_(module: torch.nn.Module, std: float = 0.08) -> torch.nn.Module:
    """Random weights everywhere: N(0, std) for matrices, N(1, 0.1) for RMSNorm gains (so a wrong norm shows)."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.dim() == 1 and "norm" in name:
                torch.nn.init.normal_(p, 1.0, 0.1)
            else:
                torch.nn.init.normal_(p, 0.0, std)
    return module


def hf_model(cfg: mt.ModelConfig, model_type: str | None = None, attn_implementation: str = "eager",
             std: float = 0.08) -> transformers.PreTrainedModel:
    """A random transformers *ForCausalLM (Mistral, Llama or Mixtral) built from `cfg.to_hf(model_type)`, fp32, eval."""
    hf_config = cfg.to_hf(model_type)
    hf_config._attn_implementation = attn_implementation
    cls = {"mistral": transformers.MistralForCausalLM, "llama": transformers.LlamaForCausalLM,
           "mixtral": transformers.MixtralForCausalLM}[hf_config.model_type]
    model = cls(hf_config).float().eval()
    randomize_(model, std)
    if cfg.tie_embeddings:
        assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    return model


def build_pair(cfg: mt.ModelConfig, model_type: str | None = None, attn_implementation: str = "eager",
               std: float = 0.08) -> tuple[transformers.PreTrainedModel, mt.Transformer]:
    """(transformers model with random weights, our Transformer holding the same weights via `from_hf`)."""
    hf = hf_model(cfg, model_type, attn_implementation, std)
    ours = mt.Transformer.from_hf(hf).eval()
    return hf, ours


@torch.no_grad()
def hf_logits(hf: transformers.PreTrainedModel, ids: torch.Tensor) -> torch.Tensor:
    """transformers' no-cache forward: logits (B, T, vocab)."""
    return hf(input_ids=ids, use_cache=False).logits


@torch.no_grad()
def hf_greedy_no_cache(hf: transformers.PreTrainedModel, ids: torch.Tensor | list[int], n: int
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy decoding with transformers' full no-cache forward at every step.

    ids: (B, T) or a list of ints (one prompt). Returns (tokens (B, n), gaps (B, n)) where gaps[b, s] is the difference
    between the two largest logits at step s: under TIE_TOLERANCE, the choice of step s is a genuine tie.
    """
    if not isinstance(ids, torch.Tensor):
        ids = torch.tensor([list(ids)])
    seq = ids.clone()
    tokens, gaps = [], []
    for _ in range(n):
        last = hf(input_ids=seq, use_cache=False).logits[:, -1].float()        # (B, vocab)
        top2 = last.topk(2, dim=-1).values                                     # (B, 2)
        nxt = last.argmax(dim=-1)                                              # (B,)
        tokens.append(nxt)
        gaps.append(top2[:, 0] - top2[:, 1])
        seq = torch.cat([seq, nxt[:, None]], dim=1)
    return torch.stack(tokens, dim=1), torch.stack(gaps, dim=1)


def assert_greedy_matches(ours: torch.Tensor, ref: torch.Tensor, gaps: torch.Tensor, what: str = "") -> int:
    """Token-identical greedy outputs, except after a step where transformers' own top-2 logits tie.

    A divergence at a step whose reference top-2 gap is < TIE_TOLERANCE is reported with a warning and accepted (the
    continuations then differ legitimately); any other divergence fails. Returns the number of tie divergences.
    """
    ours, ref = torch.as_tensor(ours).reshape(ref.shape[0], -1), ref
    assert ours.shape == ref.shape, f"{what}: shape {tuple(ours.shape)} != reference {tuple(ref.shape)}"
    ties = 0
    for b in range(ref.shape[0]):
        differ = (ours[b] != ref[b]).nonzero()
        if differ.numel() == 0:
            continue
        step = int(differ[0])
        accept_tie(float(gaps[b, step]), f"{what} row {b}", step, int(ours[b, step]), int(ref[b, step]),
                   f"\nours: {ours[b].tolist()}\nref:  {ref[b].tolist()}")
        ties += 1
    return ties


def accept_tie(gap: float, what: str, step: int, ours: int | None = None, theirs: int | None = None,
               detail: str = "") -> None:
    """The one tie rule: greedy tokens that differ from transformers' at `step` are accepted only where transformers'
    own top-2 logits there are closer than TIE_TOLERANCE (fp32 round-off may pick either); reported, else a failure."""
    if gap >= TIE_TOLERANCE:
        picked = f" (ours {ours}, transformers {theirs})" if ours is not None else ""
        raise AssertionError(f"{what}: greedy tokens diverge from transformers at step {step}{picked} where "
                             f"transformers' top-2 gap is {gap:.3e}, not a tie.{detail}")
    warnings.warn(f"{what}: diverged from transformers at step {step}, a genuine tie "
                  f"(transformers' top-2 logits differ by {gap:.2e} < {TIE_TOLERANCE})", stacklevel=3)
    print(f"[tie] {what} step {step}: top-2 gap {gap:.2e}")


def max_abs_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.detach().double() - b.detach().double()).abs().max())


def report(name: str, diff: float) -> None:
    """Print an observed parity gap (visible with `pytest -s`)."""
    print(f"[parity] {name}: max|diff| = {diff:.3e}")
