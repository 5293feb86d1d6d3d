"""One rank of tests/test_parallel.py: started by torch.multiprocessing.spawn, joins a gloo group, runs every case.

Kept apart from the test module so the spawned processes import torch and mistral_tutorial only (not transformers,
not pytest): four of them start in a few seconds on two cores.
"""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

import mistral_tutorial as mt
from mistral_tutorial.collectives import TRAFFIC, reset_traffic
from mistral_tutorial.parallel_costs import parameter_bytes

NEW_TOKENS = 8


def inputs(vocab_size: int) -> dict:
    """The same inputs for every process: a (2, 10) batch, and three prompts of lengths 10, 6, 3 (left-padded)."""
    g = torch.Generator().manual_seed(1)
    batch = torch.randint(0, vocab_size, (2, 10), generator=g)
    prompts = [torch.randint(0, vocab_size, (n,), generator=g).tolist() for n in (10, 6, 3)]
    return {"batch": batch, "prompts": prompts}


@torch.inference_mode()
def observe(model: mt.Transformer) -> dict:
    """Everything a test compares, for one model (one process or one rank of a parallel one)."""
    data = inputs(model.config.vocab_size)
    out = {"logits": model(data["batch"]), "bytes": parameter_bytes(model)}
    prompts = data["prompts"]
    longest = max(len(p) for p in prompts)
    pad = [longest - len(p) for p in prompts]
    padded = torch.tensor([[0] * p + r for p, r in zip(pad, prompts)])
    cache = model.new_cache(len(prompts), max_len=longest + 4, pad=pad)
    out["prefill"] = model(padded, cache=cache)                                     # (3, 10, V), padding masked
    reset_traffic()
    out["step"] = model(out["prefill"][:, -1].argmax(-1)[:, None], cache=cache)     # one decoding step (3, 1, V)
    out["traffic"] = dict(TRAFFIC)
    out["cache_shape"] = tuple(cache.keys.shape)
    out["routing"] = model.chosen_experts() if model.config.is_moe else None       # of the decoding step
    out["tokens"] = mt.generate(model, prompts, max_new_tokens=NEW_TOKENS)          # packs the rank's weights
    out["sampled"] = mt.generate(model, prompts, max_new_tokens=NEW_TOKENS, temperature=1.0, seed=0)
    return out


def run(rank: int, world_size: int, cases: list[tuple[str, str, str]], folder: str) -> None:
    """Rank `rank`: load each (name, checkpoint, mode) case with parallel=mode, observe it, save to folder/rank.pt."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{folder}/rendezvous", rank=rank, world_size=world_size,
                            timeout=timedelta(seconds=120))
    results = {}
    for name, checkpoint, mode in cases:
        if name.endswith("from_hf"):                   # a transformers model in memory, copied rank by rank
            from mistral_tutorial.loading import to_hf

            hf = to_hf(mt.Transformer.from_pretrained(checkpoint, fast=False))
            model = mt.Transformer.from_hf(hf, parallel=mode)
        else:
            model = mt.Transformer.from_pretrained(checkpoint, fast=False, parallel=mode)
        results[(name, mode)] = observe(model)
    torch.save(results, Path(folder) / f"rank{rank}.pt")
    dist.barrier()
    dist.destroy_process_group()
