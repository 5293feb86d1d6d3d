"""How fast a batch-1 product reads a weight matrix: `F.linear` on the plain row-major matrix (what transformers runs)
against the oneDNN-packed matrix of packed.py (what our fast decode layout runs), on the same fp32 weights.

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
    with torch.inference_mode():
        diff = (F.linear(x, weight) - packed.part(x, 0)).abs().max().item()
        gigabytes = weight.numel() * weight.element_size() / 1e9
        plain, ours = [], []
        for _ in range(args.runs):                                          # alternate, so drift hits both alike
            plain.append(gigabytes / seconds_per_product(lambda v: F.linear(v, weight), x, args.repeats))
            ours.append(gigabytes / seconds_per_product(lambda v: packed.part(v, 0), x, args.repeats))
    print(f"{args.rows} x {args.cols} fp32 ({gigabytes * 1e3:.0f} MB), {torch.get_num_threads()} threads, "
          f"{args.runs} runs of the median of {args.repeats} products; max |difference| {diff:.1e}")
    print(f"F.linear, plain matrix:  {statistics.median(plain):5.1f} GB/s (range {min(plain):.1f}-{max(plain):.1f})")
    print(f"oneDNN packed matrix:    {statistics.median(ours):5.1f} GB/s (range {min(ours):.1f}-{max(ours):.1f})")


if __name__ == "__main__":
    main()
