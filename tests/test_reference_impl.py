"""Ours against Mistral AI's own reference: mistral-inference 1.6.0 (mistral-src, renamed), run as released.

Every other test compares us with transformers. Here the reference itself generates: random seeded weights are saved
in its layout (params.json + consolidated.safetensors, written from its own `Transformer`), both implementations load
that folder, and its `generate` (prefill, chunked or not, then decoding on its rolling cache) is held equal to ours:
the same greedy tokens, and every logit it computes (and every log-probability it returns) within 1e-4.

mistral-inference calls xformers' `memory_efficient_attention`, which has no CPU kernel. Its attention-bias objects
can write themselves out as a dense additive mask (`materialize`), so the few lines of `sdpa_attention` below (SDPA
over that mask) stand in for the kernel, patched into `mistral_inference.transformer_layers`; nothing else of the
reference is changed. `python3 tasks.py setup` (and `test`) install it, pinned (tasks.REFERENCE_PINS); without it the
module is skipped, saying so in one line.
"""

from __future__ import annotations

import json
import logging
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from conftest import max_abs_diff, report

import mistral_tutorial as mt

# xformers logs at import that its compiled kernels were built for another torch: true, and irrelevant, since the one
# kernel the reference calls is replaced below.
logging.getLogger("xformers").setLevel(logging.ERROR)
try:
    import safetensors.torch
    from mistral_inference import transformer_layers
    from mistral_inference.args import TransformerArgs
    from mistral_inference.generate import generate as reference_generate
    from mistral_inference.transformer import Transformer as ReferenceTransformer
    from xformers.ops.fmha.attn_bias import BlockDiagonalCausalMask
except ImportError as err:
    pytest.skip(f"mistral-inference is not installed ({err}; `python3 tasks.py setup` installs it)",
                allow_module_level=True)

LOGIT_TOL = 1e-4
BATCH = 3
PROMPT_LENGTHS = (12, 11, 12)    # unequal (ours left-pads, the reference does not); every chunk size below splits
CHUNK_SIZES = (None, 2, 5)       # all three into the same number of chunks, as the reference's `generate` requires


def sdpa_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attn_bias=None) -> torch.Tensor:
    """xformers' memory_efficient_attention(q, k, v, attn_bias) on the CPU: (1, Tq, H, D), (1, Tk, H, D) -> (1, Tq, H, D).

    Scores scaled by 1/sqrt(D) (xformers' default and SDPA's), the bias materialised as a dense (Tq, Tk) mask. A key
    that no query may see is zeroed first, as the kernel never reads one: the reference's decode hands it whole cache
    buffers (torch.empty) whose unwritten slots can hold NaN, and 0 x NaN would otherwise reach the output."""
    q, k, v = (t.transpose(1, 2) for t in (query, key, value))                          # (1, H, T, D)
    if attn_bias is None:
        return F.scaled_dot_product_attention(q, k, v).transpose(1, 2)
    mask = attn_bias.materialize((q.shape[2], k.shape[2]), dtype=q.dtype, device=q.device)    # (Tq, Tk): 0 or -inf
    unseen = torch.isinf(mask).all(dim=0)[None, None, :, None]                          # (1, 1, Tk, 1)
    k, v = k.masked_fill(unseen, 0.0), v.masked_fill(unseen, 0.0)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask).transpose(1, 2)


@pytest.fixture(autouse=True)
def _reference_attention_on_the_cpu(monkeypatch):
    monkeypatch.setattr(transformer_layers, "memory_efficient_attention", sdpa_attention)


# ---------------------------------------------------------------------------------------------------------------------
# params.json as the reference reads it. head_dim differs from dim / n_heads = 12 where it can; windows below and above
# the prompts; one key/value head and several; Mixtral's MoeArgs with top-1 and top-2.
COMMON = dict(dim=48, n_layers=2, hidden_dim=64, n_heads=4, norm_eps=1e-5, vocab_size=96)
CONFIGS = {
    "mistral-W3-below-prompt-mqa-hd16": dict(COMMON, head_dim=16, n_kv_heads=1, sliding_window=3, rope_theta=1e4),
    "mistral-W16-above-prompt-gqa-hd8": dict(COMMON, head_dim=8, n_kv_heads=2, sliding_window=16, rope_theta=1e6),
    "mixtral-top2-of-4-full-attention": dict(COMMON, head_dim=12, n_kv_heads=2, rope_theta=1e6,
                                             moe=dict(num_experts=4, num_experts_per_tok=2)),
    "mixtral-top1-of-4-W4-mqa-hd16": dict(COMMON, head_dim=16, n_kv_heads=1, sliding_window=4, rope_theta=1e4,
                                          moe=dict(num_experts=4, num_experts_per_tok=1)),
}


def new_tokens(params: dict) -> int:
    """4 W with a window (the buffer wraps four times), else 16."""
    return 4 * params["sliding_window"] if params.get("sliding_window") else 16


def write_reference_checkpoint(folder, params: dict, seed: int = 0, std: float = 0.3) -> None:
    """The reference's own Transformer for `params`, its every tensor redrawn N(0, std) (RMSNorm gains N(1, 0.1)) from
    a seeded generator, saved as it saves: params.json + consolidated.safetensors, names and layout its own."""
    folder.mkdir(parents=True, exist_ok=True)
    args = TransformerArgs.from_dict(params)
    with torch.device("meta"):
        names_and_shapes = {k: v.shape for k, v in ReferenceTransformer(args).state_dict().items()}
    generator = torch.Generator().manual_seed(seed)
    tensors = {name: (1 + 0.1 * torch.randn(shape, generator=generator)) if "norm" in name
               else std * torch.randn(shape, generator=generator) for name, shape in names_and_shapes.items()}
    safetensors.torch.save_file(tensors, str(folder / "consolidated.safetensors"))
    (folder / "params.json").write_text(json.dumps(params))


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("reference")
    for name, params in CONFIGS.items():
        write_reference_checkpoint(root / name, params)
    return {name: root / name for name in CONFIGS}


def prompts_for(params: dict, seed: int = 1) -> list[list[int]]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(0, params["vocab_size"], (n,), generator=generator).tolist() for n in PROMPT_LENGTHS]


def last_chunk_lengths(prompts: list[list[int]], chunk: int | None) -> list[int]:
    """How many tokens of each prompt the reference's last prefill chunk holds (it chunks each prompt from its start)."""
    if chunk is None:
        return [len(p) for p in prompts]
    start = (max(len(p) for p in prompts) - 1) // chunk * chunk
    lengths = [len(p[start:start + chunk]) for p in prompts]
    assert all(lengths), f"chunk {chunk} leaves a prompt without tokens in the last chunk: pick other lengths"
    return lengths


@torch.no_grad()
def run_reference(folder, prompts: list[list[int]], n: int, chunk: int | None):
    """The reference's greedy generate: (tokens B x n, log-probabilities it returns, logits of each step (B, V))."""
    model = ReferenceTransformer.from_folder(folder, max_batch_size=BATCH, device="cpu", dtype=torch.float32)
    outputs = []
    forward = model.forward

    def recording(*args, **kwargs):
        outputs.append(forward(*args, **kwargs).clone())                          # (tokens of the call, V)
        return outputs[-1]

    model.forward = recording
    tokens, logprobs = reference_generate(prompts, model, max_tokens=n, temperature=0.0, chunk_size=chunk)
    n_chunks = 1 if chunk is None else math.ceil(max(len(p) for p in prompts) / chunk)
    assert len(outputs) == n_chunks + n                     # prefill chunks, then a forward after every new token
    last = torch.tensor(last_chunk_lengths(prompts, chunk)).cumsum(0) - 1         # each prompt's last row
    steps = [outputs[n_chunks - 1][last]] + outputs[n_chunks:n_chunks + n - 1]    # n x (B, V)
    return tokens, logprobs, steps


@torch.no_grad()
def run_ours(folder, prompts: list[list[int]], n: int, chunk: int | None, fast: bool):
    """mt.generate on the same folder: (tokens B x n, logits of each step (B, V))."""
    model = mt.loading.load_pretrained(folder, fast=fast)
    outputs = []
    hook = model.register_forward_hook(lambda module, inputs, output: outputs.append(output.clone()))
    tokens = mt.generate(model, prompts, max_new_tokens=n, prefill_chunk_size=chunk, fast=fast)
    hook.remove()
    return tokens.tolist(), [o[:, -1] for o in outputs[-n:]], model                # the last chunk, then n - 1 steps


# ---------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("fast", [True, False], ids=["packed", "plain"])
@pytest.mark.parametrize("chunk", CHUNK_SIZES, ids=lambda c: f"chunk{c}")
@pytest.mark.parametrize("name", CONFIGS)
def test_generate_equals_the_reference(checkpoints, name, chunk, fast):
    params, folder = CONFIGS[name], checkpoints[name]
    prompts, n = prompts_for(params), new_tokens(params)
    ref_tokens, ref_logprobs, ref_steps = run_reference(folder, prompts, n, chunk)
    our_tokens, our_steps, _ = run_ours(folder, prompts, n, chunk, fast)
    gaps = [float((lambda top: (top[:, 0] - top[:, 1]).min())(s.topk(2, dim=-1).values)) for s in ref_steps]
    assert our_tokens == ref_tokens, (f"{name}: greedy tokens differ from mistral-inference's\nours: {our_tokens}\n"
                                      f"ref:  {ref_tokens}\nits smallest top-2 gap per step: {gaps}")
    diff = max(max_abs_diff(a, b) for a, b in zip(our_steps, ref_steps))
    report(f"{name} chunk={chunk} {'packed' if fast else 'plain'}: logits vs mistral-inference, {n} steps", diff)
    assert diff < LOGIT_TOL
    # the log-probabilities its generate returns for the generated tokens: the last n of each row
    chosen = torch.tensor(ref_tokens)                                                 # (B, n)
    ours = torch.stack([s.log_softmax(-1).gather(1, chosen[:, i:i + 1])[:, 0] for i, s in enumerate(our_steps)], 1)
    theirs = torch.tensor([row[-n:] for row in ref_logprobs])                          # (B, n)
    assert max_abs_diff(ours, theirs) < LOGIT_TOL


@pytest.mark.parametrize("name", CONFIGS)
def test_one_pass_without_a_cache_gives_the_references_log_probabilities(checkpoints, name):
    """Ours in one pass over prompt + generated tokens, no cache, against every log-probability the reference's
    generate returns: the prompt's (from its prefill) and the generated tokens' (from its rolling cache)."""
    params, folder = CONFIGS[name], checkpoints[name]
    prompts, n = prompts_for(params), new_tokens(params)
    ref_tokens, ref_logprobs, _ = run_reference(folder, prompts, n, None)
    model = mt.loading.load_pretrained(folder, fast=False)
    for prompt, generated, theirs in zip(prompts, ref_tokens, ref_logprobs):
        sequence = torch.tensor([prompt + generated])                                  # (1, T)
        with torch.no_grad():
            logprobs = model(sequence)[0, :-1].log_softmax(-1)                         # (T - 1, V)
        ours = logprobs.gather(1, sequence[0, 1:, None])[:, 0]                         # (T - 1,)
        assert len(theirs) == len(ours)
        assert max_abs_diff(ours, torch.tensor(theirs)) < LOGIT_TOL


@pytest.mark.parametrize("window", [1, 3, 8])
def test_the_references_prefill_mask_holds_w_keys(window):
    """mistral-inference's prefill mask (BlockDiagonalCausalMask.make_local_attention(W), what its cache hands the first
    chunk) lets query i see keys i - W < j <= i: W keys, like its decode and like ours. (mistral-src's one_file_ref.py
    at commit 3dc8aed let its prefill see W + 1: notebook 04.)"""
    seq_len = 12
    bias = BlockDiagonalCausalMask.from_seqlens([seq_len]).make_local_attention(window)
    allowed = bias.materialize((seq_len, seq_len)) == 0                                # (T, T), True: may attend
    assert torch.equal(allowed, mt.sliding_window_mask(seq_len, window))
    assert allowed.sum(dim=1).max() == window


def test_a_params_json_without_rope_theta(tmp_path):
    """The reference takes 1e6 when params.json has no rope_theta; we take 1e4 and say so, naming its 1e6; with 1e6
    written in the file, we generate what it generated without one."""
    params = {k: v for k, v in CONFIGS["mistral-W3-below-prompt-mqa-hd16"].items() if k != "rope_theta"}
    folder = tmp_path / "ckpt"
    write_reference_checkpoint(folder, params)
    reference = ReferenceTransformer.from_folder(folder, max_batch_size=1, device="cpu", dtype=torch.float32)
    inv_freq = 1.0 / 1e6 ** (torch.arange(0, params["head_dim"], 2).float() / params["head_dim"])   # (D/2,)
    torch.testing.assert_close(reference.freqs_cis[1].angle(), inv_freq)               # position 1: angle = inv_freq
    prompts, n = prompts_for(params), new_tokens(params)
    ref_tokens, _, ref_steps = run_reference(folder, prompts, n, None)
    with pytest.warns(mt.AssumedDefaultWarning, match="mistral-inference 1.6.0 .* 1e6"):
        _, assumed_steps, assumed = run_ours(folder, prompts, n, None, fast=False)
    assert assumed.config.rope_theta == 1e4
    assert max(max_abs_diff(a, b) for a, b in zip(assumed_steps, ref_steps)) > 1e-2    # 1e4 is another model
    (folder / "params.json").write_text(json.dumps({**params, "rope_theta": 1e6}))    # the same weights, theta said
    with warnings.catch_warnings():
        warnings.simplefilter("error")                                                 # stated: nothing to say
        our_tokens, our_steps, model = run_ours(folder, prompts, n, None, fast=False)
    assert model.config.rope_theta == 1e6 and our_tokens == ref_tokens
    assert max(max_abs_diff(a, b) for a, b in zip(our_steps, ref_steps)) < LOGIT_TOL


@pytest.mark.parametrize("config", [mt.presets.mistral_7b_v0_1(), mt.presets.mixtral_8x7b_v0_1()],
                         ids=["mistral-7b", "mixtral-8x7b"])
def test_our_params_json_reads_the_same_in_the_reference(config):
    args = TransformerArgs.from_dict(config.to_params())
    assert (args.dim, args.n_layers, args.head_dim, args.hidden_dim, args.n_heads, args.n_kv_heads, args.norm_eps,
            args.vocab_size, args.rope_theta, args.sliding_window) == (
        config.dim, config.n_layers, config.head_dim, config.hidden_dim, config.n_heads, config.n_kv_heads,
        config.norm_eps, config.vocab_size, config.rope_theta, config.sliding_window)
    moe = (args.moe.num_experts, args.moe.num_experts_per_tok) if args.moe else (0, 2)
    assert moe == (config.n_experts, config.experts_per_token)
