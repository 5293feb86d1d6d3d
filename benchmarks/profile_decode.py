"""Where one decoding step's time goes, in each decode layout, on the default model (SmolLM2-135M).

    python benchmarks/profile_decode.py                 # fp32 (the GGUF dequantized), then the file's own Q4_1 bits
    python benchmarks/profile_decode.py --dtype bf16

For the plain PyTorch layout: torch.profiler's split of a step between the matrix products (aten::mm, aten::linear)
and everything else (the norms, RoPE, the cache write, SiLU, the residual adds, attention), and the number of operator
calls. For the fused layout: the whole step against the C call alone (kernels/decode.c), the difference being the
Python around it (the cache's plan, RoPE's angles, the embedding row, the checks). And what reading the weights alone
costs at this machine's read bandwidth (a sum over 1 GB): the floor any layout is held to. Not a test.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch.profiler import ProfilerActivity, profile


def per_step(model, tokens: torch.Tensor, steps: int = 32) -> float:
    """Median seconds of one decoding step after a prefill of `tokens` (1, T)."""
    cache = model.new_cache(1, tokens.shape[1] + steps + 1)
    times = []
    with torch.inference_mode():
        next_token = model(tokens, cache=cache, last_only=True)[:, -1].argmax(-1, keepdim=True)
        for _ in range(steps):
            start = time.perf_counter()
            next_token = model(next_token, cache=cache)[:, -1].argmax(-1, keepdim=True)
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    args = parser.parse_args()
    import mistral_tutorial as mt
    from mistral_tutorial.assets import require_default_model
    from mistral_tutorial.decode_layout import use_layout
    from mistral_tutorial.native import cpu_name

    path = require_default_model()
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    tokens = torch.randint(100, 1000, (1, 24), generator=torch.Generator().manual_seed(0))
    buffer = torch.ones(250_000_000)
    buffer.sum()
    bandwidth = 1.0 / min(timed_sum(buffer) for _ in range(5))                          # GB/s
    del buffer
    print(f"CPU: {cpu_name()}, {torch.get_num_threads()} threads, read bandwidth {bandwidth:.1f} GB/s")
    for label, model in ((args.dtype, mt.Transformer.from_pretrained(path, dtype=dtype, fast=False)),
                         ("its own Q4_1 bits", mt.Transformer.from_pretrained(path, fast=False))):
        held = {id(p): p for p in model.parameters()} | {id(m.blocks): m.blocks for m in model.modules()
                                                          if hasattr(m, "qtype")}
        weight_bytes = sum(t.numel() * t.element_size() for t in held.values())
        print(f"\nSmolLM2-135M, {label}: {weight_bytes / 1e6:.0f} MB of weights a step; reading them takes "
              f"{weight_bytes / bandwidth / 1e6:.2f} ms at {bandwidth:.1f} GB/s")
        plain = per_step(model, tokens)
        cache = model.new_cache(1, 64)
        with torch.inference_mode(), profile(activities=[ProfilerActivity.CPU]) as prof:
            next_token = model(tokens, cache=cache, last_only=True)[:, -1].argmax(-1, keepdim=True)
            prof.step()
            for _ in range(8):
                next_token = model(next_token, cache=cache)[:, -1].argmax(-1, keepdim=True)
        events = [e for e in prof.key_averages() if e.key.startswith("aten::")]
        products = sum(e.self_cpu_time_total for e in events if e.key in ("aten::mm", "aten::addmm", "aten::bmm"))
        total = sum(e.self_cpu_time_total for e in events)
        calls = sum(e.count for e in events)
        print(f"  plain layout: {plain * 1e3:.2f} ms a step; of the profiled operators' time, matrix products "
              f"{products / total:.0%}; {calls / 9:.0f} operator calls a step (prefill included once in 9)")
        use_layout(model, "fused")
        fused = per_step(model, tokens)
        decoder = model.fused_decoder
        c_call = time_c_step(model, decoder, tokens)
        print(f"  fused layout: {fused * 1e3:.2f} ms a step, of which the C call {c_call * 1e3:.2f} ms and the Python "
              f"around it {(fused - c_call) * 1e3:.2f} ms; {plain / fused:.2f}x the plain layout; the weights read "
              f"at {weight_bytes / c_call / 1e9:.1f} GB/s")


def timed_sum(buffer: torch.Tensor) -> float:
    start = time.perf_counter()
    buffer.sum()
    return (time.perf_counter() - start) / (buffer.numel() * 4 / 1e9)


def time_c_step(model, decoder, tokens: torch.Tensor, steps: int = 32) -> float:
    """Median seconds of the C call alone (mt_decode_step), timed by wrapping the library function."""
    lib, seconds = decoder.lib, []
    real = lib.mt_decode_step

    class Timed:
        def __call__(self, *args):
            start = time.perf_counter()
            real(*args)
            seconds.append(time.perf_counter() - start)

    decoder.lib = type("Lib", (), {"mt_decode_step": Timed()})()
    try:
        per_step(model, tokens, steps)
    finally:
        decoder.lib = lib
    return statistics.median(seconds)


if __name__ == "__main__":
    main()
