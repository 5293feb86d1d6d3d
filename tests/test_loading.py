"""Checkpoint formats, each written by the test from a tiny random transformers model, then loaded with
`Transformer.from_pretrained` and compared with transformers' logits; and the loader's errors."""

from __future__ import annotations

import json
import os

import gguf
import pytest
import torch
import transformers
from conftest import (
    assert_greedy_matches,
    build_pair,
    hf_greedy_no_cache,
    hf_logits,
    hf_model,
    max_abs_diff,
    report,
    tiny_config,
)
from safetensors.torch import load_file, save_file

import mistral_tutorial as mt
from mistral_tutorial.assets import default_model_path

ATOL = 1e-5


@pytest.fixture(scope="module")
def ids():
    return torch.randint(0, 128, (2, 21), generator=torch.Generator().manual_seed(5))


# ---------------------------------------------------------------------------------------------------------------------
# transformers directory
@pytest.mark.parametrize("cfg, model_type", [
    (tiny_config(sliding_window=4), None),
    (tiny_config(sliding_window=3, tie_embeddings=True, n_kv_heads=1), None),
    (tiny_config(sliding_window=None, n_kv_heads=4, head_dim=24), "llama"),
], ids=["mistral", "mistral-tied-mqa", "llama"])
@torch.no_grad()
def test_transformers_directory(tmp_path, ids, cfg, model_type):
    hf = hf_model(cfg, model_type)
    hf.save_pretrained(tmp_path)
    assert (tmp_path / "config.json").is_file() and list(tmp_path.glob("*.safetensors"))
    ours = mt.Transformer.from_pretrained(tmp_path)
    assert ours.config == cfg
    assert not ours.training
    diff = max_abs_diff(ours(ids), hf_logits(hf, ids))
    report(f"from_pretrained transformers dir {model_type or 'mistral'} tied={cfg.tie_embeddings}", diff)
    assert diff <= ATOL


@torch.no_grad()
def test_from_pretrained_overrides_and_dtype(tmp_path, ids):
    hf = hf_model(tiny_config(sliding_window=4))
    hf.save_pretrained(tmp_path)
    ours = mt.Transformer.from_pretrained(tmp_path, sliding_window=2)
    assert ours.config.sliding_window == 2
    hf.config.sliding_window = 2
    assert max_abs_diff(ours(ids), hf_logits(hf, ids)) <= ATOL
    half = mt.Transformer.from_pretrained(tmp_path, dtype=torch.bfloat16)
    assert half.dtype == torch.bfloat16 and half(ids).dtype == torch.bfloat16           # a long chunk: as plain bf16
    assert half(ids[:1, :4]).dtype == half.activation_dtype == torch.float32          # a short one: fp32 (fused)
    plain = mt.Transformer.from_pretrained(tmp_path, dtype=torch.bfloat16, fast=False)
    assert plain.activation_dtype == torch.bfloat16 and plain(ids).dtype == torch.bfloat16


# ---------------------------------------------------------------------------------------------------------------------
# mistral reference folder: params.json + consolidated.safetensors, q/k rows in the interleaved layout
def to_interleaved_by_index(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """rotate-half -> interleaved, from the formula: interleaved row h*D + 2j is rotate-half row h*D + j (real part of
    pair j), interleaved row h*D + 2j + 1 is rotate-half row h*D + D/2 + j (imaginary part)."""
    head_dim = weight.shape[0] // n_heads
    rows = []
    for h in range(n_heads):
        for j in range(head_dim // 2):
            rows += [h * head_dim + j, h * head_dim + head_dim // 2 + j]
    return weight[rows].clone()


def write_reference_folder(folder, ours: mt.Transformer, fmt: str = "safetensors") -> None:
    cfg = ours.config
    folder.mkdir(exist_ok=True)
    (folder / "params.json").write_text(json.dumps(cfg.to_params()))
    tensors = {}
    for key, tensor in ours.state_dict().items():
        if key == "output.weight" and cfg.tie_embeddings:
            continue                                            # tied: stored once
        if key.endswith("attention.wq.weight"):
            tensor = to_interleaved_by_index(tensor, cfg.n_heads)
            assert torch.equal(tensor, mt.rope.half_to_interleaved(ours.state_dict()[key], cfg.n_heads))
        elif key.endswith("attention.wk.weight"):
            tensor = to_interleaved_by_index(tensor, cfg.n_kv_heads)
        tensors[key] = tensor.contiguous().clone()
    if fmt == "safetensors":
        save_file(tensors, str(folder / "consolidated.safetensors"))
    else:
        torch.save(tensors, folder / "consolidated.00.pth")


@pytest.mark.parametrize("cfg", [tiny_config(sliding_window=4), tiny_config(sliding_window=2, n_kv_heads=1,
                                                                           head_dim=24, tie_embeddings=True)],
                         ids=["gqa", "mqa-tied"])
@pytest.mark.parametrize("fmt", ["safetensors", "pth"])
@torch.no_grad()
def test_reference_folder(tmp_path, ids, cfg, fmt):
    hf, ours = build_pair(cfg)
    write_reference_folder(tmp_path / "ref", ours, fmt)
    loaded = mt.Transformer.from_pretrained(tmp_path / "ref")
    assert loaded.config == cfg
    diff = max_abs_diff(loaded(ids), hf_logits(hf, ids))
    report(f"from_pretrained reference folder {fmt} {cfg.n_kv_heads=}", diff)
    assert diff <= ATOL


@torch.no_grad()
def test_reference_folder_without_the_permutation_is_wrong(tmp_path, ids):
    # the layout matters: rotate-half weights stored as if they were interleaved give other logits
    hf, ours = build_pair(tiny_config())
    (tmp_path / "params.json").write_text(json.dumps(ours.config.to_params()))
    save_file({k: v.clone() for k, v in ours.state_dict().items()}, str(tmp_path / "consolidated.safetensors"))
    assert max_abs_diff(mt.Transformer.from_pretrained(tmp_path)(ids), hf_logits(hf, ids)) > 1e-3


# ---------------------------------------------------------------------------------------------------------------------
# GGUF written with the gguf package, arch "llama", q/k rows permuted as llama.cpp's convert_hf_to_gguf.py does
def llama_cpp_permute(weight: torch.Tensor, n_head: int) -> torch.Tensor:
    """convert_hf_to_gguf.py, LlamaModel.permute: rotate-half rows -> llama.cpp's interleaved rows."""
    return (weight.reshape(n_head, 2, weight.shape[0] // n_head // 2, *weight.shape[1:])
            .swapaxes(1, 2).reshape(weight.shape))


def write_gguf(path, hf, permute: bool = True) -> None:
    c = hf.config
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("tiny-random-llama")
    writer.add_context_length(c.max_position_embeddings)
    writer.add_embedding_length(c.hidden_size)
    writer.add_block_count(c.num_hidden_layers)
    writer.add_feed_forward_length(c.intermediate_size)
    writer.add_head_count(c.num_attention_heads)
    writer.add_head_count_kv(c.num_key_value_heads)
    writer.add_rope_dimension_count(c.head_dim)
    writer.add_rope_freq_base(c.rope_parameters["rope_theta"])
    writer.add_layer_norm_rms_eps(c.rms_norm_eps)
    writer.add_vocab_size(c.vocab_size)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    sd = hf.state_dict()
    perm = llama_cpp_permute if permute else (lambda w, n: w)

    def add(name, tensor):
        writer.add_tensor(name, tensor.detach().float().contiguous().numpy().copy())

    add("token_embd.weight", sd["model.embed_tokens.weight"])
    for i in range(c.num_hidden_layers):
        p = f"model.layers.{i}."
        add(f"blk.{i}.attn_norm.weight", sd[p + "input_layernorm.weight"])
        add(f"blk.{i}.attn_q.weight", perm(sd[p + "self_attn.q_proj.weight"], c.num_attention_heads))
        add(f"blk.{i}.attn_k.weight", perm(sd[p + "self_attn.k_proj.weight"], c.num_key_value_heads))
        add(f"blk.{i}.attn_v.weight", sd[p + "self_attn.v_proj.weight"])
        add(f"blk.{i}.attn_output.weight", sd[p + "self_attn.o_proj.weight"])
        add(f"blk.{i}.ffn_norm.weight", sd[p + "post_attention_layernorm.weight"])
        add(f"blk.{i}.ffn_gate.weight", sd[p + "mlp.gate_proj.weight"])
        add(f"blk.{i}.ffn_up.weight", sd[p + "mlp.up_proj.weight"])
        add(f"blk.{i}.ffn_down.weight", sd[p + "mlp.down_proj.weight"])
    add("output_norm.weight", sd["model.norm.weight"])
    if not c.tie_word_embeddings:
        add("output.weight", sd["lm_head.weight"])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.mark.parametrize("cfg", [tiny_config(sliding_window=None),
                                 tiny_config(sliding_window=None, n_kv_heads=1, tie_embeddings=True)],
                         ids=["gqa", "mqa-tied"])
@torch.no_grad()
def test_gguf_written_with_the_gguf_package(tmp_path, ids, cfg):
    hf = hf_model(cfg, "llama")
    write_gguf(tmp_path / "tiny.gguf", hf)
    ours = mt.Transformer.from_pretrained(tmp_path / "tiny.gguf")
    assert (ours.config.dim, ours.config.n_layers, ours.config.n_heads, ours.config.n_kv_heads) == \
        (cfg.dim, cfg.n_layers, cfg.n_heads, cfg.n_kv_heads)
    assert ours.config.tie_embeddings == cfg.tie_embeddings and ours.config.sliding_window is None
    diff = max_abs_diff(ours(ids), hf_logits(hf, ids))
    report(f"from_pretrained GGUF tied={cfg.tie_embeddings}", diff)
    assert diff <= ATOL


@torch.no_grad()
def test_gguf_without_llama_cpp_permutation_is_wrong(tmp_path, ids):
    hf = hf_model(tiny_config(sliding_window=None), "llama")
    write_gguf(tmp_path / "unpermuted.gguf", hf, permute=False)
    ours = mt.Transformer.from_pretrained(tmp_path / "unpermuted.gguf")
    assert max_abs_diff(ours(ids), hf_logits(hf, ids)) > 1e-3


# ---------------------------------------------------------------------------------------------------------------------
# Errors
@pytest.fixture()
def reference_folder(tmp_path):
    _, ours = build_pair(tiny_config())
    write_reference_folder(tmp_path / "ref", ours)
    return tmp_path / "ref"


def _rewrite(folder, change):
    path = folder / "consolidated.safetensors"
    tensors = load_file(str(path))
    change(tensors)
    save_file(tensors, str(path))


def test_missing_key_is_named(reference_folder):
    _rewrite(reference_folder, lambda t: t.pop("layers.1.feed_forward.w2.weight"))
    with pytest.raises(mt.CheckpointError, match=r"missing.*layers\.1\.feed_forward\.w2\.weight"):
        mt.Transformer.from_pretrained(reference_folder)


def test_unexpected_key_is_named(reference_folder):
    _rewrite(reference_folder, lambda t: t.update({"layers.0.attention.bias": torch.zeros(3)}))
    with pytest.raises(mt.CheckpointError, match=r"unexpected.*layers\.0\.attention\.bias"):
        mt.Transformer.from_pretrained(reference_folder)


def test_shape_mismatch_names_key_and_both_shapes(reference_folder):
    _rewrite(reference_folder, lambda t: t.update({"layers.0.feed_forward.w1.weight": torch.zeros(95, 64)}))
    with pytest.raises(mt.CheckpointError) as err:
        mt.Transformer.from_pretrained(reference_folder)
    message = str(err.value)
    assert "layers.0.feed_forward.w1.weight" in message
    assert "(96, 64)" in message and "(95, 64)" in message


def test_transformers_directory_shape_mismatch(tmp_path):
    hf = hf_model(tiny_config())
    hf.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["intermediate_size"] = 80                              # the config no longer fits the weights
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(mt.CheckpointError) as err:
        mt.Transformer.from_pretrained(tmp_path)
    assert "feed_forward.w1.weight" in str(err.value)
    assert "(80, 64)" in str(err.value) and "(96, 64)" in str(err.value)


def test_unknown_formats(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(mt.CheckpointError, match="unknown checkpoint format"):
        mt.Transformer.from_pretrained(tmp_path / "empty")
    (tmp_path / "weights.txt").write_text("not a checkpoint")
    with pytest.raises(mt.CheckpointError, match="unknown checkpoint format"):
        mt.Transformer.from_pretrained(tmp_path / "weights.txt")
    (tmp_path / "params_only").mkdir()
    (tmp_path / "params_only" / "params.json").write_text(json.dumps(tiny_config().to_params()))
    with pytest.raises(mt.CheckpointError, match="consolidated"):
        mt.Transformer.from_pretrained(tmp_path / "params_only")


def test_nonexistent_path(tmp_path):
    with pytest.raises(FileNotFoundError):
        mt.Transformer.from_pretrained(tmp_path / "no" / "such" / "model")


def test_checkpoint_error_is_a_value_error():
    assert issubclass(mt.CheckpointError, ValueError)


# ---------------------------------------------------------------------------------------------------------------------
# The real GGUF the tutorial uses (SmolLM2-135M-Instruct, Q4_1). Opt-in: loading it twice takes 30-60 s on 2 cores,
# and the tiny GGUFs above already cover the format; run with MISTRAL_TUTORIAL_REAL_GGUF=1.
@pytest.mark.model
@pytest.mark.skipif(not os.environ.get("MISTRAL_TUTORIAL_REAL_GGUF"),
                    reason="opt-in (slow): set MISTRAL_TUTORIAL_REAL_GGUF=1")
@torch.no_grad()
def test_real_gguf_matches_transformers():
    path = default_model_path()
    if not path.is_file():
        pytest.skip(f"{path} not fetched yet (mistral-tutorial fetch)")
    ours = mt.Transformer.from_pretrained(path, fast=False)      # exact: the fast layout sums in another order
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                           dtype=torch.float32).eval()
    assert ours.config == mt.ModelConfig.from_hf(hf.config)
    tokens = torch.tensor([[1, 504, 3458, 282, 4649, 314, 253, 1345, 30, 378, 2701, 314]])
    diff = max_abs_diff(ours(tokens), hf_logits(hf, tokens))
    report("from_pretrained real SmolLM2 GGUF", diff)
    assert diff <= ATOL
    ref, gaps = hf_greedy_no_cache(hf, tokens, 8)
    assert_greedy_matches(mt.generate(ours, tokens, max_new_tokens=8), ref, gaps, "SmolLM2 greedy")
