"""Train the tiny Mixtral that notebook 09 routes (Mixtral §5 on a model small enough to train on a laptop CPU).

    python scripts/train_tiny_mixtral.py            # the committed checkpoint: 6-7 min on 2 CPU cores
    python scripts/train_tiny_mixtral.py --quick    # a CI-sized run (< 60 s), written to build/tiny-mixtral-quick

A Mixtral-shaped decoder (full attention, 8 SwiGLU experts, top-2 routing) is trained on the three-domain corpus of
`mistral_tutorial.corpus` (Python source, English prose, DM-Mathematics-style arithmetic), with the Mistral v0.1
tokenizer cut to the pieces the corpus uses. Loss = LM cross-entropy + alpha * the Switch/Mixtral load-balancing loss
(`mt.load_balancing_loss` at each layer, averaged over the layers; alpha = 0.02 as Mixtral's `router_aux_loss_coef`). Each batch holds the same number of
windows from every domain. Seeded: the same command on the same machine gives the same weights.

Writes to --out: params.json + consolidated.safetensors (fp16; a mistral reference folder, so
`mt.Transformer.from_pretrained(out)` loads it), vocab.json (the kept Mistral ids) and training_log.json; and the loss
curve to figures/09_training_loss.png (the full run only).
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

import mistral_tutorial as mt  # noqa: E402
from mistral_tutorial.corpus import DOMAINS, build_corpus, split_corpus  # noqa: E402
from mistral_tutorial.export import ours_to_reference  # noqa: E402
from mistral_tutorial.resolve import TINY_MIXTRAL_DIR  # noqa: E402
from mistral_tutorial.tokenizer import SubsetTokenizer  # noqa: E402

COMMAND = "python scripts/train_tiny_mixtral.py"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=None,
                        help="output folder (default mistral_tutorial/data/tiny-mixtral, the package's copy; build/tiny-mixtral-quick with --quick)")
    parser.add_argument("--quick", action="store_true", help="a CI-sized run: fewer steps, smaller batches, < 60 s")
    parser.add_argument("--steps", type=int, default=800)
    parser.add_argument("--batch-size", type=int, default=18, help="windows per step, split evenly over the domains")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--lr", type=float, default=3e-3, help="peak learning rate (linear warm-up, cosine decay)")
    parser.add_argument("--aux-coef", type=float, default=0.02, help="alpha of the load-balancing loss")
    parser.add_argument("--chars-per-domain", type=int, default=300_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (1 is fastest for a model this small on a busy 2-core machine)")
    args = parser.parse_args(argv)
    if args.quick:
        args.steps, args.batch_size, args.seq_len = 40, 6, 64
    if args.out is None:
        args.out = REPO_ROOT / "build/tiny-mixtral-quick" if args.quick else TINY_MIXTRAL_DIR
    if args.batch_size % len(DOMAINS):
        parser.error(f"--batch-size must be a multiple of {len(DOMAINS)} (one share per domain)")
    return args


def tiny_config(vocab_size: int) -> mt.ModelConfig:
    """Mixtral 8x7B's shape, shrunk: 4 layers, dim 128, GQA 4:2, experts of width 256, E = 8, k = 2, no window."""
    return mt.ModelConfig(vocab_size=vocab_size, dim=128, n_layers=4, n_heads=4, n_kv_heads=2, hidden_dim=256,
                          sliding_window=None, max_position_embeddings=1024, rope_theta=10000.0,
                          n_experts=8, experts_per_token=2)


def init_weights_(model: mt.Transformer, std: float = 0.02) -> None:
    """N(0, 0.02) everywhere (Mixtral's initializer_range), the residual outputs wo and w2 scaled by 1/sqrt(2L)
    (GPT-2), RMSNorm gains at 1."""
    residual_std = std / math.sqrt(2 * model.config.n_layers)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.fill_(1.0)
            else:
                param.normal_(0.0, residual_std if name.endswith(("wo.weight", "feed_forward.w2")) else std)


def domain_streams(documents: dict[str, list[str]], tokenizer: SubsetTokenizer) -> dict[str, torch.Tensor]:
    """{domain: one long (N,) int64 stream}: every document encoded with <s> in front, concatenated."""
    return {domain: torch.tensor([i for doc in docs for i in tokenizer.encode(doc, bos=True)], dtype=torch.long)
            for domain, docs in documents.items()}


def sample_batch(streams: dict[str, torch.Tensor], per_domain: int, seq_len: int, generator: torch.Generator
                 ) -> torch.Tensor:
    """(B, T+1) windows at random offsets, `per_domain` rows from each domain in DOMAINS order."""
    rows = []
    for domain in DOMAINS:
        stream = streams[domain]
        starts = torch.randint(0, len(stream) - seq_len - 1, (per_domain,), generator=generator)
        rows += [stream[s:s + seq_len + 1] for s in starts.tolist()]
    return torch.stack(rows)                                                       # (B, T+1)


@torch.no_grad()
def held_out_loss(model: mt.Transformer, streams: dict[str, torch.Tensor], seq_len: int, max_windows: int = 16
                  ) -> dict[str, float]:
    """Mean LM loss per domain over up to `max_windows` consecutive held-out windows (always the same ones)."""
    model.eval()
    losses = {}
    for domain, stream in streams.items():
        n = min(max_windows, (len(stream) - 1) // seq_len)
        windows = stream[:n * seq_len + 1].unfold(0, seq_len + 1, seq_len)         # (n, T+1), consecutive
        logits = model(windows[:, :-1])                                            # (n, T, V)
        losses[domain] = float(F.cross_entropy(logits.flatten(0, 1), windows[:, 1:].flatten()))
    model.train()
    return losses


def learning_rate(step: int, total: int, peak: float, warmup: int) -> float:
    """Linear warm-up for `warmup` steps, then cosine decay to 10 % of the peak."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def save_checkpoint(model: mt.Transformer, tokenizer: SubsetTokenizer, out: Path) -> int:
    """params.json + consolidated.safetensors (fp16, reference names) + vocab.json; returns the folder's size in bytes."""
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    (out / "params.json").write_text(json.dumps(model.config.to_params(), indent=2) + "\n")
    state = ours_to_reference(model.state_dict(), model.config)
    save_file({k: v.detach().to(torch.float16).contiguous() for k, v in state.items()},
              str(out / "consolidated.safetensors"), metadata={"format": "pt", "rebuild": COMMAND})
    tokenizer.save(out / "vocab.json")
    return sum(f.stat().st_size for f in out.iterdir() if f.is_file())


def plot_losses(log: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from mistral_tutorial.viz_routing import plot_training_log

    fig = plot_training_log(log, DOMAINS)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight", metadata={"Software": None})
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    start = time.perf_counter()

    corpus = build_corpus(args.chars_per_domain, seed=args.seed)
    train_docs, held_out_docs = split_corpus(corpus, held_out_fraction=0.1, seed=args.seed)
    tokenizer = SubsetTokenizer.from_texts([doc for docs in corpus.values() for doc in docs])
    train_streams = domain_streams(train_docs, tokenizer)
    held_out_streams = domain_streams(held_out_docs, tokenizer)
    print(f"vocabulary: {tokenizer.vocab_size} of the Mistral tokenizer's 32000 pieces; training tokens: "
          + ", ".join(f"{d} {len(s):,}" for d, s in train_streams.items()), flush=True)

    model = mt.Transformer(tiny_config(tokenizer.vocab_size))
    init_weights_(model)
    model.train()
    config = model.config
    print(f"model: {model.num_parameters() / 1e6:.2f} M parameters ({model.num_parameters(active=True) / 1e6:.2f} M "
          f"active per token), {config.n_layers} layers, {config.n_experts} experts, top-{config.experts_per_token}",
          flush=True)

    decay = [p for n, p in model.named_parameters() if not n.endswith("norm.weight")]
    no_decay = [p for n, p in model.named_parameters() if n.endswith("norm.weight")]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                                  lr=args.lr, betas=(0.9, 0.95))
    generator = torch.Generator().manual_seed(args.seed)
    per_domain = args.batch_size // len(DOMAINS)
    eval_every = max(1, args.steps // 10)
    log: dict = {"command": COMMAND + (" --quick" if args.quick else ""), "args": {k: str(v) if isinstance(v, Path)
                 else v for k, v in vars(args).items()}, "config": config.to_dict(),
                 "parameters": model.num_parameters(), "vocab_size": tokenizer.vocab_size,
                 "train_tokens": {d: len(s) for d, s in train_streams.items()},
                 "torch": torch.__version__, "python": platform.python_version(), "train": [], "eval": []}

    bar = tqdm(range(args.steps), desc="training", unit="step", mininterval=2.0)
    for step in bar:
        lr = learning_rate(step, args.steps, args.lr, warmup=max(1, args.steps // 20))
        for group in optimizer.param_groups:
            group["lr"] = lr
        batch = sample_batch(train_streams, per_domain, args.seq_len, generator)   # (B, T+1)
        logits = model(batch[:, :-1])                                              # (B, T, V)
        lm_loss = F.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten())
        # Switch eq. (4), applied at every MoE layer and averaged (uniform routing gives k): router logits (N, E) kept
        # with their graph by MoeLayer in training. Passing all layers at once pools them (as transformers does); a
        # first run that way balanced the pool but left layer 2 using 5 of its 8 experts.
        router_logits = model.router_logits()                                      # L x (N, E)
        aux_loss = sum(mt.load_balancing_loss(logits, config.n_experts, config.experts_per_token)
                       for logits in router_logits) / len(router_logits)
        loss = lm_loss + args.aux_coef * aux_loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()

        log["train"].append({"step": step, "lm_loss": round(lm_loss.item(), 4), "aux_loss": round(aux_loss.item(), 4),
                             "lr": lr})
        bar.set_postfix(lm=f"{lm_loss.item():.3f}", aux=f"{aux_loss.item():.3f}", refresh=False)
        if (step + 1) % eval_every == 0 or step + 1 == args.steps:
            held_out = held_out_loss(model, held_out_streams, args.seq_len)
            log["eval"].append({"step": step, "held_out": {d: round(v, 4) for d, v in held_out.items()}})
            bar.write(f"step {step + 1}: lm {lm_loss.item():.3f}  aux {aux_loss.item():.3f}  held-out "
                      + "  ".join(f"{d} {v:.3f}" for d, v in held_out.items()))

    log["seconds"] = round(time.perf_counter() - start, 1)
    size = save_checkpoint(model.eval(), tokenizer, args.out)
    log["checkpoint_bytes"] = size
    (args.out / "training_log.json").write_text(json.dumps(log, indent=1) + "\n")
    figure = (REPO_ROOT / "figures" / "09_training_loss.png") if not args.quick else args.out / "training_loss.png"
    plot_losses(log, figure)
    final = log["train"][-1]
    print(f"done in {log['seconds']:.0f} s: lm loss {final['lm_loss']:.3f}, aux loss {final['aux_loss']:.3f}; "
          f"checkpoint {args.out} ({size / 2**20:.1f} MiB); loss curve {figure}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
