"""Quantized weights kept in their own bits (quantized.py, quantized_load.py, kernels/quants*.h).

References: gguf's own `gguf.quants.dequantize` (bit for bit), the same file loaded dequantized into fp32 (and by
transformers, which dequantizes), and llama.cpp's reference quantizer (`gguf.quants.quantize`) for quantize on load.
"""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_config

import mistral_tutorial as mt
from mistral_tutorial import native, quantized
from mistral_tutorial.decode_layout import current_layout
from mistral_tutorial.errors import CheckpointError
from mistral_tutorial.gguf_export import random_blocks, write_random_gguf
from mistral_tutorial.quantized import FORMATS, QuantEmbedding, QuantLinear

TYPES = list(FORMATS)
needs_kernels = pytest.mark.skipif(native.library() is None, reason=f"no C kernels: {native.why_unavailable()}")


def blocks_of(qtype: str, rows: int, blocks_per_row: int, seed: int = 0) -> np.ndarray:
    return random_blocks(qtype, (rows, FORMATS[qtype][0] * blocks_per_row), 0.05, np.random.default_rng(seed))


@pytest.mark.parametrize("qtype", TYPES)
@pytest.mark.parametrize("rows, blocks_per_row", [(1, 1), (7, 3), (33, 2), (130, 5)])
def test_unpacking_is_bit_exact(qtype, rows, blocks_per_row):
    """Every row count (odd, not a multiple of anything), whole rows and picked rows, against gguf's numpy code."""
    raw = blocks_of(qtype, rows, blocks_per_row, seed=rows)
    cols = FORMATS[qtype][0] * blocks_per_row
    reference = gguf.quants.dequantize(raw, gguf.GGMLQuantizationType[qtype]).astype(np.float32).reshape(rows, cols)
    ours = quantized.unpack(torch.from_numpy(raw), qtype, cols).numpy()
    assert np.array_equal(ours.view(np.uint32), reference.view(np.uint32))
    picked = torch.tensor([rows - 1, 0, rows // 2, rows - 1])
    rows_out = quantized.unpack(torch.from_numpy(raw), qtype, cols, picked).numpy()
    assert np.array_equal(rows_out.view(np.uint32), reference[picked.numpy()].view(np.uint32))


@pytest.mark.parametrize("qtype", TYPES)
@pytest.mark.parametrize("n", [1, 3, 16, 17, 40])
def test_products_equal_f_linear_on_the_unpacked_weights(qtype, n):
    """One row (a decoding step), a few (C kernels), many (unpacked in bands, then torch): fp32 round-off only."""
    raw = torch.from_numpy(blocks_of(qtype, 70, 2))
    cols = 2 * FORMATS[qtype][0]
    weight = quantized.unpack(raw, qtype, cols)
    x = torch.randn(n, cols)
    got, want = quantized.product(x, raw, qtype, cols), F.linear(x, weight)
    assert (got - want).abs().max() <= 1e-5 * want.abs().max(), (got - want).abs().max()


def test_bad_blocks_are_refused_with_the_shapes():
    raw = torch.from_numpy(blocks_of("Q4_0", 4, 2))
    with pytest.raises(CheckpointError, match=r"do not hold a \(4, 96\) matrix.*truncated or mis-typed"):
        QuantLinear(raw, "Q4_0", 96)
    with pytest.raises(CheckpointError, match="not a multiple of 32"):
        QuantLinear(raw, "Q4_0", 70)
    with pytest.raises(CheckpointError, match="IQ2_XS has no kernel"):
        QuantLinear(raw, "IQ2_XS", 64)


K_CONFIG = dict(dim=256, hidden_dim=512, n_heads=4, n_kv_heads=2, vocab_size=160, sliding_window=None)


def config_for(qtype: str, **overrides) -> mt.ModelConfig:
    """Tiny shapes that hold whole blocks of `qtype` (256 weights for the K types)."""
    return tiny_config(**(K_CONFIG if qtype in ("Q4_K", "Q6_K") else dict(sliding_window=None)), **overrides)


@needs_kernels
@pytest.mark.parametrize("qtype", TYPES)
def test_a_quantized_file_stays_quantized_and_computes_the_dequantized_model(tmp_path, qtype):
    cfg = config_for(qtype, tie_embeddings=qtype == "Q4_1")
    head = "Q6_K" if qtype == "Q4_K" else qtype                                   # as llama.cpp writes Q4_K_M
    path = write_random_gguf(tmp_path / f"{qtype}.gguf", cfg, qtype, head_type=head)
    ours = mt.Transformer.from_pretrained(path)
    assert isinstance(ours.layers[0].attention.wq, QuantLinear) and ours.layers[0].attention.wq.qtype == qtype
    assert isinstance(ours.tok_embeddings, QuantEmbedding) and current_layout(ours) == "fused"
    assert isinstance(ours.output, QuantLinear) and (ours.output.blocks is ours.tok_embeddings.blocks) == cfg.tie_embeddings
    dequantized = mt.Transformer.from_pretrained(path, dtype=torch.float32, fast=False)
    assert ours.num_parameters() == dequantized.num_parameters()
    for name, value in dequantized.state_dict().items():                          # the same weights, bit for bit
        assert torch.equal(ours.state_dict()[name], value), name
    tokens = torch.randint(0, cfg.vocab_size, (2, 20))
    with torch.no_grad():
        reference = dequantized(tokens)
        assert (ours(tokens) - reference).abs().max() <= 1e-4 * reference.abs().max()
    assert torch.equal(mt.generate(ours, tokens, max_new_tokens=24),
                       mt.generate(dequantized, tokens, max_new_tokens=24, fast=False))
    plain = mt.Transformer.from_pretrained(path, fast=False)                      # quantized, the PyTorch path
    assert current_layout(plain) == "plain"
    assert torch.equal(mt.generate(plain, tokens, max_new_tokens=24, fast=False),
                       mt.generate(dequantized, tokens, max_new_tokens=24, fast=False))


@needs_kernels
def test_transformers_reads_the_same_weights(tmp_path):
    """transformers dequantizes GGUF files itself: its logits on our Q8_0 file are the dequantized model's."""
    transformers = pytest.importorskip("transformers")
    cfg = config_for("Q8_0")
    path = write_random_gguf(tmp_path / "q8.gguf", cfg, "Q8_0", head_type="Q8_0",
                             tokenizer_model=mt.tokenizer.mistral_tokenizer_path())
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file=path.name,
                                                           dtype=torch.float32).eval()
    ours = mt.Transformer.from_pretrained(path)
    tokens = torch.randint(0, cfg.vocab_size, (1, 12))
    with torch.no_grad():
        theirs = hf(tokens).logits
        assert (ours(tokens) - theirs).abs().max() <= 1e-4 * theirs.abs().max()


def test_a_type_without_a_kernel_is_dequantized_and_said(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("MISTRAL_TUTORIAL_QUIET", raising=False)
    cfg = config_for("Q4_0")
    from mistral_tutorial.gguf_export import gguf_shapes, write_gguf

    generator = np.random.default_rng(0)
    values = {n: (np.ones(s, np.float32) if len(s) == 1 else generator.normal(0, 0.05, s).astype(np.float32))
              for n, s in gguf_shapes(cfg).items()}
    tensors = {n: (v, "F32") if v.ndim == 1 else (gguf.quants.quantize(v, gguf.GGMLQuantizationType.Q5_0), "Q5_0")
               for n, v in values.items()}
    tensors["blk.0.attn_v.weight"] = (gguf.quants.quantize(values["blk.0.attn_v.weight"],
                                                            gguf.GGMLQuantizationType.Q8_0), "Q8_0")
    path = write_gguf(tmp_path / "q5.gguf", cfg, tensors)
    ours = mt.Transformer.from_pretrained(path)
    err = capsys.readouterr().err
    assert "kept as the file holds them: 1 Q8_0" in err and "dequantized to fp32 (no kernel for them here)" in err
    assert isinstance(ours.layers[0].attention.wv, QuantLinear) and type(ours.layers[0].attention.wq) is torch.nn.Linear
    reference = mt.Transformer.from_pretrained(path, dtype=torch.float32, fast=False)
    tokens = torch.randint(0, cfg.vocab_size, (1, 9))
    with torch.no_grad():
        assert torch.allclose(ours(tokens), reference(tokens), atol=1e-5, rtol=0)


def test_a_truncated_quantized_tensor_is_refused(tmp_path):
    path = write_random_gguf(tmp_path / "q4.gguf", config_for("Q4_0"), "Q4_0", head_type="Q4_0")
    data = path.read_bytes()
    (tmp_path / "cut.gguf").write_bytes(data[:-100])
    with pytest.raises(CheckpointError, match="cut.gguf"):
        mt.Transformer.from_pretrained(tmp_path / "cut.gguf")


@needs_kernels
@pytest.mark.parametrize("scheme, projections", [("int8", "Q8_0"), ("int4", "Q4_1")])
def test_quantize_on_load_is_llama_cpps_quantizer(tmp_path, scheme, projections):
    cfg = tiny_config(sliding_window=4)
    model = mt.Transformer(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.05)
    folder = tmp_path / "hub"
    mt.loading.to_hf(model).save_pretrained(folder)
    ours = mt.Transformer.from_pretrained(folder, quantize=scheme)
    wq = ours.layers[0].attention.wq
    assert isinstance(wq, QuantLinear) and wq.qtype == projections and ours.tok_embeddings.qtype == "Q8_0"
    expected = gguf.quants.quantize(model.layers[0].attention.wq.weight.detach().numpy(),
                                    gguf.GGMLQuantizationType[projections])
    assert np.array_equal(wq.blocks.numpy(), expected)
    tokens = torch.randint(0, cfg.vocab_size, (1, 16))
    with torch.no_grad():
        reference = model(tokens)
        error = (ours(tokens) - reference).abs().max() / reference.abs().max()
    assert 0 < error < (0.05 if scheme == "int8" else 0.25), error
    with pytest.raises(ValueError, match="quantize must be one of"):
        mt.Transformer.from_pretrained(folder, quantize="int3")


@needs_kernels
def test_quantized_layers_state_dict_and_training_say_what_to_do(tmp_path):
    path = write_random_gguf(tmp_path / "q.gguf", config_for("Q4_0"), "Q4_0", head_type="Q4_0")
    ours = mt.Transformer.from_pretrained(path, fast=False)
    state = ours.state_dict()
    assert state["layers.0.attention.wq.weight"].dtype == torch.float32
    with pytest.raises(RuntimeError, match="dtype=torch.float32"):
        ours.load_state_dict(state)
    with pytest.raises(RuntimeError, match="would not change the model"):
        ours.layers[0].attention.wq.weight.mul_(2)
    x = torch.randn(2, ours.config.dim, requires_grad=True)          # gradients through the activations only
    ours.layers[0].attention.wq(x).sum().backward()
    assert torch.allclose(x.grad, ours.layers[0].attention.wq.weight.sum(0).expand(2, -1))
    assert not any(p.requires_grad for p in ours.layers[0].attention.wq.parameters())


@needs_kernels
@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_K"])
def test_a_quantized_mixtral_keeps_its_experts_in_blocks(tmp_path, qtype):
    """Stacked experts (llama.cpp's ffn_*_exps) stay quantized (quantized_moe.py): the same logits and the same
    chosen experts as the dequantized model."""
    from mistral_tutorial.quantized_moe import QuantMoeLayer

    cfg = config_for(qtype, n_experts=4, experts_per_token=2)
    path = write_random_gguf(tmp_path / "moe.gguf", cfg, qtype, head_type=qtype)
    ours = mt.Transformer.from_pretrained(path)
    moe = ours.layers[1].feed_forward
    assert isinstance(moe, QuantMoeLayer) and set(moe.quantized) == {"w1", "w2", "w3"}
    assert not any(p.is_meta for p in ours.parameters())
    dequantized = mt.Transformer.from_pretrained(path, dtype=torch.float32, fast=False)
    assert ours.num_parameters() == dequantized.num_parameters()
    assert torch.equal(ours.state_dict()["layers.1.feed_forward.w2"], dequantized.state_dict()["layers.1.feed_forward.w2"])
    tokens = torch.randint(0, cfg.vocab_size, (2, 13))
    with torch.no_grad():
        reference = dequantized(tokens)
        assert (ours(tokens) - reference).abs().max() <= 1e-4 * reference.abs().max()
        for mine, theirs in zip(ours.chosen_experts(), dequantized.chosen_experts()):
            assert torch.equal(mine, theirs)
    assert torch.equal(mt.generate(ours, tokens, max_new_tokens=12),
                       mt.generate(dequantized, tokens, max_new_tokens=12, fast=False))


@needs_kernels
def test_quantize_on_load_fills_every_expert(tmp_path):
    from mistral_tutorial.quantized_moe import QuantMoeLayer

    cfg = tiny_config(n_experts=4, experts_per_token=2, sliding_window=None)
    model = mt.Transformer(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.05)
    mt.loading.to_hf(model).save_pretrained(tmp_path / "hub")
    ours = mt.Transformer.from_pretrained(tmp_path / "hub", quantize="int8")
    moe = ours.layers[0].feed_forward
    assert isinstance(moe, QuantMoeLayer)
    for e in range(cfg.n_experts):
        expected = gguf.quants.quantize(model.layers[0].feed_forward.w3[e].detach().numpy(), gguf.GGMLQuantizationType.Q8_0)
        assert np.array_equal(moe.quantized["w3"][0][e].numpy(), expected), e
