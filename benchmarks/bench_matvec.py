"""How fast a batch-1 product reads a weight matrix: `F.linear` on the plain row-major matrix (what transformers runs),
the oneDNN-packed matrix of packed.py, and the C row products of the fused layout (native.py: fp32, and the same
matrix stored in bf16, widened in registers), on the same weights.

    python benchmarks/bench_matvec.py                    # 14336 x 4096 fp32 (Mistral 7B's w1: 235 MB), 5 runs

Decoding one token multiplies one vector by every matrix, so it is bound by how fast the matrix streams from memory:
GB/s = the matrix's bytes / the seconds of one product. The matrix is far larger than the caches, and each timed run
is the median of many products. Not a test: nothing here asserts a speed.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from mistral_tutorial import native
from mistral_tutorial.packed import PackedMatrix


def seconds_per_product(product, x: torch.Tensor, repeats: int) -> float:
    for _ in range(3):
        product(x)                                                         # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        product(x)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=14336)
    parser.add_argument("--cols", type=int, default=4096)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=50, help="products per run (the run's time is their median)")
    args = parser.parse_args()
    torch.manual_seed(0)
    weight = torch.randn(args.rows, args.cols) / args.cols ** 0.5           # (out, in) fp32
    packed = PackedMatrix(weight, [args.rows])
    x = torch.randn(1, args.cols)                                           # (1, in): one token
    half = weight.bfloat16()
    candidates = {"F.linear, plain matrix": (lambda v: F.linear(v, weight), 1.0),
                  "oneDNN packed matrix": (lambda v: packed.part(v, 0), 1.0)}
    if native.library() is not None:
        candidates["C row products, fp32"] = (lambda v: native.matvec(weight, v), 1.0)
        candidates["C row products, bf16 weights"] = (lambda v: native.matvec(half, v), 0.5)
    with torch.inference_mode():
        gigabytes = weight.numel() * weight.element_size() / 1e9
        reference = F.linear(x, weight)
        speeds: dict[str, list[float]] = {name: [] for name in candidates}
        for _ in range(args.runs):                                          # alternate, so drift hits all alike
            for name, (product, share) in candidates.items():
                speeds[name].append(gigabytes * share / seconds_per_product(product, x, args.repeats))
        diff = max((candidates[n][0](x) - reference).abs().max().item() for n in candidates if "bf16" not in n)
    print(f"{args.rows} x {args.cols} ({gigabytes * 1e3:.0f} MB in fp32), {torch.get_num_threads()} threads, "
          f"{args.runs} runs of the median of {args.repeats} products; CPU {native.cpu_name()}; max |difference| "
          f"of the fp32 ones {diff:.1e}")
    for name, values in speeds.items():
        print(f"{name + ':':32s} {statistics.median(values):5.1f} GB/s (range {min(values):.1f}-{max(values):.1f})")


if __name__ == "__main__":
    main()
