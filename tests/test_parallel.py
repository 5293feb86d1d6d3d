"""Expert and tensor parallelism (parallel.py) on N = 2 and 4 CPU processes with gloo, held to the one-process model.

One `torch.multiprocessing.spawn` per N runs every case (tests/parallel_worker.py); the reference is the plain
single-process `Transformer.from_pretrained(folder, fast=False)` on the same checkpoint, itself held to transformers
by test_streaming.py. Checks: logits (no cache; left-padded prefill through the sharded cache; one decoding step)
within 1e-4, greedy tokens identical on every rank, the cache holding each rank's kv heads, and the accounting
(parameter bytes, bytes sent per step) against parallel_costs' formulas.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from conftest import max_abs_diff, report
from parallel_worker import observe

import mistral_tutorial as mt
from mistral_tutorial.export import write_random_checkpoint
from mistral_tutorial.parallel_costs import rank_parameter_bytes, step_traffic
from mistral_tutorial.sharding import Parallelism, check_parallel

MIXTRAL = dict(model_type="mixtral", vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, intermediate_size=96, num_local_experts=4, num_experts_per_tok=2,
               max_position_embeddings=256, rms_norm_eps=1e-5, rope_theta=10000.0)
# Mistral with a window of 4, shorter than the prompts (10 tokens): the rolling cache wraps during the prefill
MISTRAL = dict(model_type="mistral", vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, intermediate_size=96, sliding_window=4, max_position_embeddings=256,
               rms_norm_eps=1e-5, rope_theta=10000.0)
# "mixtral-from_hf": the same Mixtral as a transformers model in memory (fused gate_up experts), via from_hf
CASES = [("mixtral", "expert"), ("mixtral", "tensor"), ("mistral", "tensor"), ("mixtral-from_hf", "expert"),
         ("mixtral-from_hf", "tensor")]
TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("parallel")
    return {name: str(write_random_checkpoint(root / name, config, dtype=torch.float32, std=0.1))
            for name, config in (("mixtral", MIXTRAL), ("mistral", MISTRAL))}


@pytest.fixture(scope="module")
def reference(checkpoints) -> dict[str, dict]:
    """The single-process model's observations, per checkpoint."""
    return {name: observe(mt.Transformer.from_pretrained(path, fast=False)) for name, path in checkpoints.items()}


@pytest.fixture(scope="module", params=[2, 4], ids=lambda n: f"N={n}")
def ranks(request, checkpoints, tmp_path_factory) -> tuple[int, list[dict]]:
    """(N, each rank's observations of every case), from one spawn of N processes."""
    n = request.param
    folder = tmp_path_factory.mktemp(f"ranks{n}")
    cases = [(name, checkpoints[base(name)], mode) for name, mode in CASES]
    start = time.perf_counter()
    mp.spawn(__import__("parallel_worker").run, args=(n, cases, str(folder)), nprocs=n, join=True)
    print(f"[parallel] N={n}: {len(CASES)} cases in {time.perf_counter() - start:.1f} s")
    return n, [torch.load(folder / f"rank{r}.pt") for r in range(n)]


def base(name: str) -> str:
    """The checkpoint of a case: 'mixtral-from_hf' -> 'mixtral'."""
    return name.split("-")[0]


def config_of(name: str) -> mt.ModelConfig:
    return mt.ModelConfig.from_hf(MIXTRAL if base(name) == "mixtral" else MISTRAL)


@pytest.mark.parametrize("name,mode", CASES, ids=[f"{n}-{m}" for n, m in CASES])
def test_logits_equal_one_process(ranks, reference, name, mode):
    n, results = ranks
    for rank, result in enumerate(results):
        got = result[(name, mode)]
        for what in ("logits", "prefill", "step"):
            diff = max_abs_diff(got[what], reference[base(name)][what])
            if rank == 0:
                report(f"{name} {mode}-parallel N={n} {what}", diff)
            assert diff < TOLERANCE, f"{name} {mode} N={n} rank {rank}: {what} differ by {diff:.2e}"


@pytest.mark.parametrize("name,mode", CASES, ids=[f"{n}-{m}" for n, m in CASES])
def test_greedy_tokens_identical_on_every_rank(ranks, reference, name, mode):
    n, results = ranks
    want = reference[base(name)]["tokens"]
    assert want.shape == (3, 8)
    for rank, result in enumerate(results):
        assert torch.equal(result[(name, mode)]["tokens"], want), f"{name} {mode} N={n} rank {rank}"
    for result in results:                                  # sampling with a seed: the same token on every rank
        assert torch.equal(result[(name, mode)]["sampled"], results[0][(name, mode)]["sampled"])
    if base(name) == "mixtral":                             # the same routing too (the router is replicated)
        for result in results:
            for got, ref in zip(result[(name, mode)]["routing"], reference[base(name)]["routing"]):
                assert torch.equal(got, ref)


@pytest.mark.parametrize("name,mode", CASES, ids=[f"{n}-{m}" for n, m in CASES])
def test_cache_and_parameters_are_this_ranks_share(ranks, reference, name, mode):
    n, results = ranks
    config = config_of(name)
    kv_heads = config.n_kv_heads if mode == "expert" else max(config.n_kv_heads // n, 1)   # replicated if N > Hkv
    want = rank_parameter_bytes(config, mode, n, dtype_bytes=4)
    assert want["one_process"] == reference[base(name)]["bytes"]                       # the formula, on one process
    for result in results:
        got = result[(name, mode)]
        slots = min(config.sliding_window or 14, 14)                              # the rolling buffer: W slots
        assert got["cache_shape"] == (config.n_layers, 3, kv_heads, slots, config.head_dim)
        assert got["bytes"] == want["rank"]
    assert want["rank"] < reference[base(name)]["bytes"]
    assert want["sharded"] * n >= (want["one_process"] - want["replicated"])    # the shares cover the model


@pytest.mark.parametrize("name,mode", CASES, ids=[f"{n}-{m}" for n, m in CASES])
def test_bytes_sent_per_step_match_the_formula(ranks, reference, name, mode):
    n, results = ranks
    config = config_of(name)
    routing = reference[base(name)]["routing"]                   # the one-process routing of the decoding step
    for rank, result in enumerate(results):
        want = step_traffic(config, mode, n, n_tokens=3, dtype_bytes=4, routing=routing, rank=rank)
        assert result[(name, mode)]["traffic"] == pytest.approx(want), f"rank {rank}"
    if mode == "tensor":                                    # 2 all-reduces of (3, 64) fp32 per layer + the logits
        ring = 2 * (n - 1) / n
        assert want["all_reduce"] == config.n_layers * 2 * ring * 3 * 64 * 4


def test_uniform_routing_estimate_is_the_mean_over_ranks():
    config = config_of("mixtral")
    g = torch.Generator().manual_seed(0)
    routing = [torch.stack([torch.randperm(4, generator=g)[:2] for _ in range(4000)]) for _ in range(2)]
    exact = [step_traffic(config, "expert", 2, 4000, 4, routing, rank)["all_to_all"] for rank in range(2)]
    mean = step_traffic(config, "expert", 2, 4000, 4)["all_to_all"]
    assert sum(exact) / 2 == pytest.approx(mean, rel=0.03)


def test_mixtral_8x7b_per_rank_bytes():
    """Mixtral-8x7B in bf16: 93.4 GB on one process; 8 ranks hold ~1/8 of it each, plus what is replicated."""
    config = mt.presets.mixtral_8x7b_v0_1()
    with torch.device("meta"):
        params = mt.Transformer(config).num_parameters()
    one = rank_parameter_bytes(config, None, 1)["rank"]
    assert one == 2 * params
    experts = config.n_layers * 3 * config.dim * config.hidden_dim * config.n_experts
    for n in (2, 4, 8):
        ep = rank_parameter_bytes(config, "expert", n)
        assert ep["rank"] == 2 * (params - experts + experts // n)
        tp = rank_parameter_bytes(config, "tensor", n)
        assert one / n < tp["rank"] < one / n + 2 * 0.3e9           # the embedding (0.13 B) stays whole
    assert rank_parameter_bytes(config, "expert", 8)["rank"] / 1e9 == pytest.approx(14.5, abs=0.1)


# ---------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("config,mode,n,words", [
    (dict(n_experts=8), "expert", 3, "3 ranks cannot share 8 experts"),
    (dict(n_experts=0), "expert", 2, "needs an MoE model"),
    (dict(n_heads=6, n_kv_heads=3, hidden_dim=96), "tensor", 2, "3 kv heads"),
    (dict(n_heads=6, n_kv_heads=2, hidden_dim=96), "tensor", 4, "cannot share 6 attention heads"),
    (dict(hidden_dim=90), "tensor", 4, "FFN width 90"),
    (dict(), "pipeline", 2, "one of ('expert', 'tensor')"),
])
def test_sizes_that_do_not_divide_are_refused(config, mode, n, words):
    fields = dict(vocab_size=128, dim=48, n_layers=1, n_heads=4, n_kv_heads=2, hidden_dim=96, sliding_window=None)
    with pytest.raises(ValueError, match=words.replace("(", r"\(").replace(")", r"\)")):
        check_parallel(mt.ModelConfig(**{**fields, **config}), mode, n)


def test_parallel_without_torch_distributed_says_how_to_launch(checkpoints):
    start = time.perf_counter()
    with pytest.raises(RuntimeError, match="--nproc-per-node N"):
        mt.Transformer.from_pretrained(checkpoints["mixtral"], parallel="expert")
    with pytest.raises(ValueError, match="parallel must be one of"):
        Parallelism.current("data")
    assert time.perf_counter() - start < 1


def test_sampling_on_a_parallel_model_needs_a_seed(checkpoints):
    model = mt.Transformer.from_pretrained(checkpoints["mistral"], fast=False)
    model.parallelism = Parallelism("tensor", 0, 2)          # as sharding.py marks a rank's share
    with pytest.raises(ValueError, match="needs a seed"):
        mt.generate(model, [[1, 2, 3]], max_new_tokens=2, temperature=0.7)


@pytest.mark.parametrize("mode,rank", [("expert", 1), ("tensor", 1)])
def test_a_rank_reads_only_its_own_slices(checkpoints, mode, rank):
    """One rank's share built in this process (no process group is needed to load): every weight is the right block
    of the one-process weight, another rank's experts are never read, and a block of rows stays in the mapped file."""
    from mistral_tutorial.assemble import assemble
    from mistral_tutorial.checkpoint import TensorSource
    from mistral_tutorial.formats import _safetensors_files

    folder = Path(checkpoints["mixtral"])
    config = config_of("mixtral")
    source = TensorSource.from_safetensors(_safetensors_files(folder)[0], "test")
    read, plain_read = [], source.read
    source.read = lambda name: read.append(name) or plain_read(name)
    share = Parallelism(mode, rank, 2)
    model = assemble(source, "hf", config, torch.float32, "cpu", False, share)
    whole = mt.Transformer.from_pretrained(folder, fast=False).state_dict()
    got = model.state_dict()
    if mode == "tensor":   # rank 1 of 2: heads 2-3 (rows 32:64), kv head 1 (rows 16:32), hidden units 48:96, vocab 64:128
        blocks = {"attention.wq.weight": (slice(32, 64),), "attention.wk.weight": (slice(16, 32),),
                  "attention.wo.weight": (slice(None), slice(32, 64)), "feed_forward.w1": (slice(None), slice(48, 96)),
                  "feed_forward.w2": (slice(None), slice(None), slice(48, 96))}
        assert torch.equal(got["output.weight"], whole["output.weight"][64:])
    else:                  # rank 1 of 2: experts 2 and 3
        blocks = {"attention.wq.weight": (slice(None),), "feed_forward.w1": (slice(2, 4),),
                  "feed_forward.w2": (slice(2, 4),)}
        assert torch.equal(got["output.weight"], whole["output.weight"])
    for layer in range(config.n_layers):
        for name, block in blocks.items():
            key = f"layers.{layer}.{name}"
            assert torch.equal(got[key], whole[key][block]), key
        assert torch.equal(got[f"layers.{layer}.feed_forward.gate.weight"], whole[f"layers.{layer}.feed_forward.gate.weight"])
    experts_read = {int(name.split(".experts.")[1].split(".")[0]) for name in read if ".experts." in name}
    assert experts_read == ({2, 3} if mode == "expert" else {0, 1, 2, 3})
    wq = model.layers[0].attention.wq.weight                    # tensor: rows 32..63 of (64, 64); expert: all
    assert wq.shape == ((32 if mode == "tensor" else 64), 64)
    assert wq.untyped_storage().nbytes() == 64 * 64 * 4                        # a view of the mapped tensor
