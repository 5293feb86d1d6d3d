"""Hostile checkpoint FILES: truncated, corrupt, mistyped or mismatched, in every format the loader reads.

Formats: a transformers folder (one safetensors file, or shards with an index), a mistral reference folder
(params.json + consolidated.safetensors or consolidated.00.pth) and a GGUF file. Each broken file must give exactly one
`mt.CheckpointError` whose message names the file and what is wrong: never a raw KeyError, struct.error, a numpy or
torch error, and never a model with a weight that did not come from the file. Shapes are checked before any tensor is
read. Seeded fuzzing cuts files at random points and flips random header bytes. The one numeric check (GGUF linear
rope scaling) holds the loaded model to transformers' LlamaForCausalLM with the same scaling in its config.
"""

from __future__ import annotations

import json
import random
import struct
from collections.abc import Callable
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from conftest import build_pair, hf_logits, hf_model, max_abs_diff, randomize_, report, tiny_config
from safetensors.torch import load_file, save_file
from test_loading import llama_cpp_permute, write_reference_folder

import mistral_tutorial as mt
from mistral_tutorial.checkpoint import TensorSource
from mistral_tutorial.export import write_random_checkpoint

KINDS = ["hf", "hf-sharded", "ref-safetensors", "ref-pth", "gguf"]
SHARD_BYTES = 60_000                      # the tiny model (about 200 kB in fp32) in 4 shards
Tensors = dict[str, torch.Tensor]


# ---------------------------------------------------------------------------------------------------------------------
# Writing a tiny checkpoint of each kind, with a change to its tensors (file names) before it is written
def gguf_tensors(hf) -> Tensors:
    """A transformers Llama's weights under llama.cpp's names, q/k rows permuted as convert_hf_to_gguf.py does."""
    c, sd = hf.config, hf.state_dict()
    out = {"token_embd.weight": sd["model.embed_tokens.weight"]}
    for i in range(c.num_hidden_layers):
        p = f"model.layers.{i}."
        out |= {f"blk.{i}.attn_norm.weight": sd[p + "input_layernorm.weight"],
                f"blk.{i}.attn_q.weight": llama_cpp_permute(sd[p + "self_attn.q_proj.weight"], c.num_attention_heads),
                f"blk.{i}.attn_k.weight": llama_cpp_permute(sd[p + "self_attn.k_proj.weight"], c.num_key_value_heads),
                f"blk.{i}.attn_v.weight": sd[p + "self_attn.v_proj.weight"],
                f"blk.{i}.attn_output.weight": sd[p + "self_attn.o_proj.weight"],
                f"blk.{i}.ffn_norm.weight": sd[p + "post_attention_layernorm.weight"],
                f"blk.{i}.ffn_gate.weight": sd[p + "mlp.gate_proj.weight"],
                f"blk.{i}.ffn_up.weight": sd[p + "mlp.up_proj.weight"],
                f"blk.{i}.ffn_down.weight": sd[p + "mlp.down_proj.weight"]}
    out["output_norm.weight"] = sd["model.norm.weight"]
    if not c.tie_word_embeddings:
        out["output.weight"] = sd["lm_head.weight"]
    return out


def write_gguf_file(path: Path, cfg: mt.ModelConfig, tensors: Tensors, arch: str = "llama",
                    metadata: Callable[[gguf.GGUFWriter], None] | None = None) -> Path:
    """A GGUF as llama.cpp's converter writes a Llama: `arch`.* metadata from cfg, then the tensors (fp32 numpy,
    any integer tensor kept integer)."""
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_name("tiny-random")
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.dim)
    writer.add_block_count(cfg.n_layers)
    writer.add_feed_forward_length(cfg.hidden_dim)
    writer.add_head_count(cfg.n_heads)
    writer.add_head_count_kv(cfg.n_kv_heads)
    writer.add_rope_dimension_count(cfg.head_dim)
    writer.add_rope_freq_base(cfg.rope_theta)
    writer.add_layer_norm_rms_eps(cfg.norm_eps)
    writer.add_vocab_size(cfg.vocab_size)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    if metadata:
        metadata(writer)
    for name, tensor in tensors.items():
        array = tensor.detach().contiguous().numpy().copy()
        writer.add_tensor(name, array.astype(np.float32) if array.dtype.kind == "f" else array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _rewrite_safetensors(files: list[Path], index: Path | None, change: Callable[[Tensors], None]) -> None:
    """Apply `change` to the tensors of these files; a new tensor goes to the first file (and into the index)."""
    home = {name: f for f in files for name in load_file(str(f))}
    tensors = {name: t for f in files for name, t in load_file(str(f)).items()}
    change(tensors)
    for f in files:
        save_file({n: t.contiguous() for n, t in tensors.items() if home.get(n, files[0]) == f}, str(f))
    if index is not None:
        data = json.loads(index.read_text())
        data["weight_map"] = {n: home.get(n, files[0]).name for n in tensors}
        index.write_text(json.dumps(data))


def write_checkpoint(kind: str, folder: Path, cfg: mt.ModelConfig | None = None,
                     change: Callable[[Tensors], None] | None = None) -> Path:
    """A tiny checkpoint of `kind` (see KINDS) in `folder`, with `change` applied to its tensors; returns the path to
    load (the folder, or the .gguf file)."""
    cfg = cfg or tiny_config(sliding_window=None)
    folder.mkdir(parents=True, exist_ok=True)
    if kind.startswith("hf"):
        write_random_checkpoint(folder, cfg, dtype=torch.float32,
                                **({"shard_bytes": SHARD_BYTES} if kind == "hf-sharded" else {}))
        index = folder / "model.safetensors.index.json"
        if change:
            _rewrite_safetensors(sorted(folder.glob("*.safetensors")), index if index.exists() else None, change)
        return folder
    if kind.startswith("ref"):
        write_reference_folder(folder, randomize_(mt.Transformer(cfg)), kind.removeprefix("ref-"))
        if change and kind == "ref-pth":
            tensors = torch.load(folder / "consolidated.00.pth", weights_only=True)
            change(tensors)
            torch.save(tensors, folder / "consolidated.00.pth")
        elif change:
            _rewrite_safetensors([folder / "consolidated.safetensors"], None, change)
        return folder
    assert kind == "gguf"
    tensors = gguf_tensors(hf_model(cfg, "llama"))
    if change:
        change(tensors)
    return write_gguf_file(folder / "tiny.gguf", cfg, tensors)


def data_file(kind: str, path: Path) -> Path:
    """The file of a checkpoint that holds tensors (the last shard when sharded)."""
    if kind == "gguf":
        return path
    files = sorted(path.glob("*.safetensors")) or sorted(path.glob("*.pth"))
    return files[-1]


# file names of the same tensors in each format
W2 = {"hf": "model.layers.1.mlp.down_proj.weight", "ref": "layers.1.feed_forward.w2.weight",
      "gguf": "blk.1.ffn_down.weight"}
BIAS = {"hf": "model.layers.0.self_attn.q_proj.bias", "ref": "layers.0.attention.wq.bias",
        "gguf": "blk.0.attn_q.bias"}


def family(kind: str) -> str:
    return kind.split("-")[0]


def refused(path: Path, *words: str, names: Path | str | None = None) -> str:
    """Load `path`; it must raise one CheckpointError naming `names` (default: path) and each of `words`."""
    with pytest.raises(mt.CheckpointError) as err:
        mt.Transformer.from_pretrained(path)
    message = str(err.value)
    assert str(names or path) in message, message
    for word in words:
        assert word in message, f"{word!r} not in: {message}"
    return message


@pytest.fixture()
def reads(monkeypatch) -> list[str]:
    """The names of the tensors the loader reads from any checkpoint (to check that a refusal comes first)."""
    calls: list[str] = []
    original = TensorSource.__init__

    def init(self, infos, read, *args, **kwargs):
        def counted(name: str) -> torch.Tensor:
            calls.append(name)
            return read(name)
        original(self, infos, counted, *args, **kwargs)

    monkeypatch.setattr(TensorSource, "__init__", init)
    return calls


@pytest.mark.parametrize("kind", KINDS)
def test_each_kind_loads_when_intact(tmp_path, kind, reads):
    # the baseline the other tests break: every writer above makes a loadable checkpoint
    model = mt.Transformer.from_pretrained(write_checkpoint(kind, tmp_path / kind))
    assert model.config.dim == 64 and len(reads) > 0


# ---------------------------------------------------------------------------------------------------------------------
# Truncated files
def safetensors_cuts(path: Path) -> dict[str, int]:
    (header_len,) = struct.unpack("<Q", path.read_bytes()[:8])
    size = path.stat().st_size
    return {"length": 5, "json": 8 + header_len // 2, "data": (8 + header_len + size) // 2, "last-byte": size - 1}


def gguf_cuts(path: Path) -> dict[str, int]:
    reader = gguf.GGUFReader(str(path))
    info_start = reader.tensors[0].field.offset
    metadata_start = reader.fields["general.architecture"].offset
    return {"magic": 2, "counts": 20, "metadata": (metadata_start + info_start) // 2,
            "tensor-info": info_start + 10, "data": (reader.data_offset + path.stat().st_size) // 2,
            "last-byte": path.stat().st_size - 1}


@pytest.mark.parametrize("kind", KINDS)
def test_truncated_file_names_the_file(tmp_path, kind):
    path = write_checkpoint(kind, tmp_path / kind)
    target = data_file(kind, path)
    whole = target.read_bytes()
    if kind == "gguf":
        cuts = gguf_cuts(target)
    elif kind == "ref-pth":
        cuts = {"start": 10, "middle": len(whole) // 2, "last-byte": len(whole) - 1}
    else:
        cuts = safetensors_cuts(target)
    for where, cut in cuts.items():
        target.write_bytes(whole[:cut])
        message = refused(path, names=target)
        assert any(w in message for w in ("truncated", "not a", "corrupt", "cannot")), (where, message)


@pytest.mark.parametrize("kind", ["hf", "gguf"])
@pytest.mark.parametrize("seed", range(20))
def test_fuzz_random_truncation(tmp_path_factory, kind, seed):
    folder = tmp_path_factory.mktemp(f"{kind}-{seed}")
    path = write_checkpoint(kind, folder)
    target = data_file(kind, path)
    whole = target.read_bytes()
    cut = random.Random(seed).randrange(0, len(whole))
    target.write_bytes(whole[:cut])
    refused(path, names=target)


# ---------------------------------------------------------------------------------------------------------------------
# Corrupt safetensors headers
def _header(path: Path) -> tuple[int, bytes]:
    data = path.read_bytes()
    (header_len,) = struct.unpack("<Q", data[:8])
    return header_len, data


def _with_header(path: Path, header: bytes | dict) -> None:
    """Replace the JSON header of a safetensors file, keeping its data bytes."""
    header_len, data = _header(path)
    blob = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + data[8 + header_len:])


def _json_header(path: Path) -> dict:
    header_len, data = _header(path)
    return json.loads(data[8:8 + header_len])


def _edit_entry(name: str, **change) -> Callable[[dict], bytes]:
    def edit(header: dict) -> bytes:
        header[name] = {**header[name], **change}
        return json.dumps(header).encode()
    return edit


CORRUPT_HEADERS: dict[str, Callable[[dict], bytes]] = {
    "garbage": lambda h: bytes(random.Random(0).randrange(256) for _ in range(200)),
    "invalid-json": lambda h: json.dumps(h).encode()[:-1] + b"]",
    "not-an-object": lambda h: b"[1, 2, 3]",
    "deeply-nested": lambda h: b"[" * 100_000 + b"]" * 100_000,
    "entry-not-a-dict": lambda h: json.dumps({**h, "model.norm.weight": 5}).encode(),
    "unknown-dtype": _edit_entry("model.norm.weight", dtype="F8_E9M9"),
    "float-shape": _edit_entry("model.norm.weight", shape=[64.0]),
    "bool-shape": _edit_entry("model.norm.weight", shape=[True, 64]),
    "negative-shape": _edit_entry("model.norm.weight", shape=[-1, -64]),
    "huge-shape": _edit_entry("model.norm.weight", shape=[2 ** 70]),
    "string-offset": _edit_entry("model.norm.weight", data_offsets=["0", 256]),
    "three-offsets": _edit_entry("model.norm.weight", data_offsets=[0, 128, 256]),
    "offsets-overlap": lambda h: json.dumps({**h, "model.norm.weight": {
        **h["model.norm.weight"], "data_offsets": h["model.embed_tokens.weight"]["data_offsets"][:1] + [
            h["model.embed_tokens.weight"]["data_offsets"][0] + 256]}}).encode(),
}


@pytest.mark.parametrize("corruption", CORRUPT_HEADERS)
def test_corrupt_safetensors_header_names_the_file(tmp_path, corruption):
    path = write_checkpoint("hf", tmp_path / "hf")
    target = path / "model.safetensors"
    _with_header(target, CORRUPT_HEADERS[corruption](_json_header(target)))
    refused(path, names=target)


def test_header_length_larger_than_the_file(tmp_path):
    path = write_checkpoint("hf", tmp_path / "hf")
    target = path / "model.safetensors"
    data = target.read_bytes()
    target.write_bytes(struct.pack("<Q", len(data) * 3) + data[8:])
    refused(path, "header", names=target)


def test_a_shorter_header_length_does_not_shift_the_data(tmp_path):
    # trailing spaces of the JSON cut off by a smaller length: the JSON still parses, and every tensor would be read
    # a few bytes early if the loader did not check that the data exactly fills the rest of the file
    path = write_checkpoint("hf", tmp_path / "hf")
    target = path / "model.safetensors"
    header_len, data = _header(target)
    header = data[8:8 + header_len].rstrip(b" ") + b" " * 8
    body = data[8 + header_len:]
    target.write_bytes(struct.pack("<Q", len(header)) + header + body)
    mt.Transformer.from_pretrained(path)                                  # exact padding: fine
    target.write_bytes(struct.pack("<Q", len(header) - 4) + header + body)
    refused(path, names=target)


def _flip_bytes(path: Path, seed: int, start: int, end: int, n: int = 1) -> None:
    data = bytearray(path.read_bytes())
    rng = random.Random(seed)
    for _ in range(n):
        data[rng.randrange(start, end)] ^= rng.randrange(1, 256)
    path.write_bytes(bytes(data))


def _equal_models(a: mt.Transformer, b: mt.Transformer) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return a.config == b.config and sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("kind", ["hf", "gguf"])
@pytest.mark.parametrize("seed", range(20))
def test_fuzz_header_byte_flips(tmp_path, kind, seed):
    """A flipped byte in the header (safetensors: length and JSON; GGUF: the fixed header and the tensor infos, whose
    offsets, types and shapes decide what is read) gives a CheckpointError, or a model equal to the intact one (a
    flip in whitespace or padding). GGUF metadata values are left out: a flipped digit of context_length or of the
    norm epsilon is a different but valid model, which no check without a checksum can tell from the intended one."""
    path = write_checkpoint(kind, tmp_path / kind)
    target = data_file(kind, path)
    intact = mt.Transformer.from_pretrained(path, fast=False)
    if kind == "gguf":
        reader = gguf.GGUFReader(str(target))
        regions = [(0, 24), (reader.tensors[0].field.offset, reader.data_offset)]
        del reader
        start, end = regions[seed % 2]
    else:
        start, end = 0, 8 + _header(target)[0]
    _flip_bytes(target, seed, start, end)
    try:
        flipped = mt.Transformer.from_pretrained(path, fast=False)
    except mt.CheckpointError as err:
        assert str(target) in str(err)
        return
    assert _equal_models(flipped, intact), "a header byte flip loaded a different model without an error"


# ---------------------------------------------------------------------------------------------------------------------
# GGUF: wrong architecture, unsupported version, bad magic
def test_gguf_of_another_architecture(tmp_path):
    cfg = tiny_config(sliding_window=None)
    path = write_gguf_file(tmp_path / "gpt2.gguf", cfg, gguf_tensors(hf_model(cfg, "llama")), arch="gpt2")
    refused(path, "architecture", "'gpt2'")


@pytest.mark.parametrize("version", [1, 4, 2 ** 31])
def test_gguf_of_an_unsupported_version(tmp_path, version):
    path = write_checkpoint("gguf", tmp_path)
    data = bytearray(path.read_bytes())
    data[4:8] = struct.pack("<I", version)
    path.write_bytes(bytes(data))
    refused(path, "version")


def test_not_a_gguf_file(tmp_path):
    path = tmp_path / "model.gguf"
    path.write_bytes(b"GGML" + bytes(100))
    refused(path, "GGUF")
    path.write_bytes(b"")
    refused(path)


def test_gguf_metadata_of_the_wrong_type(tmp_path):
    cfg = tiny_config(sliding_window=None)
    tensors = gguf_tensors(hf_model(cfg, "llama"))
    path = write_gguf_file(tmp_path / "m.gguf", cfg, tensors, metadata=lambda w: w.add_string("llama.block_count", "2"))
    refused(path, "n_layers", "'2'")                      # the string replaces the writer's uint32
    path = write_gguf_file(tmp_path / "zero-key-length.gguf", cfg, tensors,
                           metadata=lambda w: w.add_uint32("llama.attention.key_length", 0))
    refused(path, "head_dim")
    path = write_gguf_file(tmp_path / "zero-heads.gguf", cfg, tensors,
                           metadata=lambda w: w.add_uint32("llama.attention.head_count", 0))
    refused(path, "head_count")


# ---------------------------------------------------------------------------------------------------------------------
# Invalid JSON and wrong types in config.json, params.json and the index
@pytest.mark.parametrize("kind, name", [("hf", "config.json"), ("ref-safetensors", "params.json"),
                                        ("hf-sharded", "model.safetensors.index.json")])
@pytest.mark.parametrize("text", ['{"dim": 64,', "[1, 2]", "\xff\xfe", "[" * 100_000])
def test_invalid_json_names_the_file(tmp_path, kind, name, text):
    path = write_checkpoint(kind, tmp_path / kind)
    (path / name).write_bytes(text.encode("latin-1"))
    refused(path, names=path / name)


@pytest.mark.parametrize("field, value", [("dim", "64"), ("n_layers", 2.0), ("n_heads", None), ("norm_eps", "1e-5"),
                                          ("vocab_size", True), ("moe", [4, 2]), ("n_kv_heads", -2)])
def test_wrong_types_in_params_json(tmp_path, field, value):
    path = write_checkpoint("ref-safetensors", tmp_path / "ref")
    params = json.loads((path / "params.json").read_text())
    (path / "params.json").write_text(json.dumps({**params, field: value}))
    refused(path, field, names=path / "params.json")


def test_config_json_errors_name_the_file(tmp_path):
    path = write_checkpoint("hf", tmp_path / "hf")
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, "hidden_size": "64"}))
    refused(path, "hidden_size", names=path / "config.json")


def _edit_index(path: Path, change: Callable[[dict], None]) -> Path:
    index = path / "model.safetensors.index.json"
    data = json.loads(index.read_text())
    change(data)
    index.write_text(json.dumps(data))
    return index


def test_index_naming_a_missing_shard(tmp_path):
    path = write_checkpoint("hf-sharded", tmp_path / "hf")
    index = _edit_index(path, lambda d: d["weight_map"].update({W2["hf"]: "model-00009-of-00009.safetensors"}))
    refused(path, "model-00009-of-00009.safetensors", names=index)


def test_index_naming_a_tensor_the_shard_lacks(tmp_path):
    path = write_checkpoint("hf-sharded", tmp_path / "hf")
    shards = sorted(path.glob("*.safetensors"))
    index = _edit_index(path, lambda d: d["weight_map"].update({"model.layers.0.mlp.up_proj.bias": shards[0].name}))
    refused(path, "model.layers.0.mlp.up_proj.bias", shards[0].name, names=index)


def test_index_putting_a_tensor_in_the_wrong_shard(tmp_path):
    path = write_checkpoint("hf-sharded", tmp_path / "hf")
    shards = sorted(path.glob("*.safetensors"))
    data = json.loads((path / "model.safetensors.index.json").read_text())
    wrong = next(s.name for s in shards if s.name != data["weight_map"][W2["hf"]])
    index = _edit_index(path, lambda d: d["weight_map"].update({W2["hf"]: wrong}))
    refused(path, W2["hf"], wrong, names=index)


def test_index_leaving_out_a_tensor_of_a_shard(tmp_path):
    path = write_checkpoint("hf-sharded", tmp_path / "hf")
    index = _edit_index(path, lambda d: d["weight_map"].pop(W2["hf"]))
    refused(path, W2["hf"], names=index)


@pytest.mark.parametrize("weight_map", [[1, 2], {"model.norm.weight": 3}, {"model.norm.weight": "../../etc/x"}])
def test_index_of_the_wrong_shape(tmp_path, weight_map):
    path = write_checkpoint("hf-sharded", tmp_path / "hf")
    index = _edit_index(path, lambda d: d.update(weight_map=weight_map))
    refused(path, names=index)


# ---------------------------------------------------------------------------------------------------------------------
# Tensors: missing, extra, mis-shaped, of an integer dtype, in every format
@pytest.mark.parametrize("kind", KINDS)
def test_missing_tensor_is_an_error_never_random_weights(tmp_path, kind, reads):
    path = write_checkpoint(kind, tmp_path / kind, change=lambda t: t.pop(W2[family(kind)]))
    refused(path, "missing", "layers.1.feed_forward.w2.weight")
    assert reads == []


@pytest.mark.parametrize("kind", KINDS)
def test_extra_tensor_is_reported(tmp_path, kind, reads):
    path = write_checkpoint(kind, tmp_path / kind, change=lambda t: t.update({BIAS[family(kind)]: torch.zeros(64)}))
    refused(path, "unexpected", BIAS[family(kind)])
    assert reads == []


@pytest.mark.parametrize("kind", KINDS)
def test_mis_shaped_tensor_names_file_key_and_both_shapes_before_reading(tmp_path, kind, reads):
    name = W2[family(kind)]
    path = write_checkpoint(kind, tmp_path / kind, change=lambda t: t.update({name: torch.zeros(64, 95)}))
    message = refused(path, name, "(64, 96)", "(64, 95)")
    holder = path if kind == "gguf" else next(f for f in path.iterdir() if f.suffix in (".safetensors", ".pth")
                                             and name in _names_in(f))
    assert str(holder) in message
    assert reads == []


def _names_in(file: Path) -> set[str]:
    if file.suffix == ".pth":
        return set(torch.load(file, weights_only=True))
    return set(load_file(str(file)))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", [torch.int32, torch.int8])
def test_integer_tensor_where_weights_belong(tmp_path, kind, dtype, reads):
    name = W2[family(kind)]
    path = write_checkpoint(kind, tmp_path / kind, change=lambda t: t.update({name: t[name].mul(100).to(dtype)}))
    refused(path, name, "int")
    assert reads == []


# ---------------------------------------------------------------------------------------------------------------------
# Mixtral experts
MOE = tiny_config(n_experts=4, sliding_window=None)
EXPERT = "model.layers.1.block_sparse_moe.experts.{e}.{w}.weight"


@pytest.mark.parametrize("kind", ["hf", "hf-sharded"])
def test_one_mis_shaped_expert(tmp_path, kind, reads):
    name = EXPERT.format(e=2, w="w1")
    path = write_checkpoint(kind, tmp_path / kind, MOE, change=lambda t: t.update({name: torch.zeros(95, 64)}))
    message = refused(path, name, "(96, 64)", "(95, 64)", "expert 2")
    assert "stack" not in message
    assert reads == []


@pytest.mark.parametrize("expert", [4, 7, 100])
def test_extra_expert_is_reported_not_dropped(tmp_path, expert, reads):
    name = EXPERT.format(e=expert, w="w3")
    path = write_checkpoint("hf", tmp_path / "hf", MOE,
                            change=lambda t: t.update({name: t[EXPERT.format(e=0, w="w3")].clone()}))
    refused(path, "unexpected", name)
    assert reads == []


def test_missing_expert_is_named(tmp_path, reads):
    path = write_checkpoint("hf", tmp_path / "hf", MOE, change=lambda t: t.pop(EXPERT.format(e=3, w="w2")))
    refused(path, "missing", "layers.1.feed_forward.w2", "experts [3]")
    assert reads == []


def test_intact_mixtral_loads(tmp_path):
    model = mt.Transformer.from_pretrained(write_checkpoint("hf", tmp_path / "hf", MOE))
    assert model.config.n_experts == 4


# ---------------------------------------------------------------------------------------------------------------------
# torch .pth
@pytest.mark.parametrize("content", [b"", b"PK\x03\x04" + bytes(50), b"garbage" * 10])
def test_corrupt_pth_names_the_file(tmp_path, content):
    path = write_checkpoint("ref-pth", tmp_path / "ref")
    (path / "consolidated.00.pth").write_bytes(content)
    refused(path, names=path / "consolidated.00.pth")


@pytest.mark.parametrize("seed", range(8))
def test_fuzz_truncated_pth(tmp_path, seed):
    path = write_checkpoint("ref-pth", tmp_path / "ref")
    target = path / "consolidated.00.pth"
    whole = target.read_bytes()
    target.write_bytes(whole[:random.Random(seed).randrange(len(whole))])
    refused(path, names=target)


# ---------------------------------------------------------------------------------------------------------------------
# GGUF linear rope scaling: read, not refused, and held to transformers with the same scaling in its config
def _linear(factor: float) -> Callable[[gguf.GGUFWriter], None]:
    def add(writer: gguf.GGUFWriter) -> None:
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(factor)
    return add


@torch.no_grad()
def test_gguf_linear_rope_scaling_matches_transformers(tmp_path):
    # transformers' GGUF reader drops llama.rope.scaling.* (it reads them only for gpt-oss), so the reference is a
    # LlamaForCausalLM built with rope_scaling linear in its config, holding the weights written to the GGUF
    cfg = tiny_config(sliding_window=None, rope_scaling={"rope_type": "linear", "factor": 4.0})
    hf, _ = build_pair(cfg, "llama")
    ids = torch.randint(0, 128, (2, 21), generator=torch.Generator().manual_seed(5))
    path = write_gguf_file(tmp_path / "linear.gguf", cfg, gguf_tensors(hf), metadata=_linear(4.0))
    ours = mt.Transformer.from_pretrained(path)
    assert ours.config.rope_scaling == {"rope_type": "linear", "factor": 4.0}
    diff = max_abs_diff(ours(ids), hf_logits(hf, ids))
    report("GGUF linear rope scaling vs transformers", diff)
    assert diff <= 1e-5
    plain = mt.Transformer.from_pretrained(write_gguf_file(tmp_path / "plain.gguf", cfg, gguf_tensors(hf)))
    assert plain.config.rope_scaling is None
    assert max_abs_diff(plain(ids), hf_logits(hf, ids)) > 1e-3                 # the scaling is not a no-op here


def test_gguf_old_scale_linear_key_is_linear_scaling(tmp_path):
    cfg = tiny_config(sliding_window=None)
    path = write_gguf_file(tmp_path / "old.gguf", cfg, gguf_tensors(hf_model(cfg, "llama")),
                           metadata=lambda w: w.add_float32("llama.rope.scale_linear", 2.0))
    assert mt.Transformer.from_pretrained(path).config.rope_scaling == {"rope_type": "linear", "factor": 2.0}


@pytest.mark.parametrize("scaling", ["yarn", "none-with-factor", "linear-without-factor", "linear-bad-factor"])
def test_gguf_rope_scaling_refusals_name_the_field(tmp_path, scaling):
    def add(writer: gguf.GGUFWriter) -> None:
        if scaling == "yarn":
            writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
            writer.add_rope_scaling_factor(4.0)
        elif scaling == "none-with-factor":
            writer.add_rope_scaling_type(gguf.RopeScalingType.NONE)
            writer.add_rope_scaling_factor(4.0)
        elif scaling == "linear-without-factor":
            writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        else:
            writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
            writer.add_rope_scaling_factor(-1.0)

    cfg = tiny_config(sliding_window=None)
    path = write_gguf_file(tmp_path / f"{scaling}.gguf", cfg, gguf_tensors(hf_model(cfg, "llama")), metadata=add)
    refused(path, "llama.rope.scaling")


class NotATensor:
    """A class torch.load(weights_only=True) must refuse to build: a .pth may not run code."""

    def __reduce__(self):
        return (print, ("a checkpoint ran code",))


@pytest.mark.parametrize("content", ["pickle", "list", "nested"])
def test_pth_that_is_not_a_dict_of_tensors(tmp_path, content, capsys):
    path = write_checkpoint("ref-pth", tmp_path / "ref")
    target = path / "consolidated.00.pth"
    tensors = torch.load(target, weights_only=True)
    value = {"pickle": {**tensors, "x": NotATensor()}, "list": list(tensors.values()), "nested": {"model": tensors}}
    torch.save(value[content], target)
    refused(path, names=target)
    assert "ran code" not in capsys.readouterr().out


def test_duplicate_key_in_a_safetensors_header(tmp_path):
    # JSON keeps the last of two equal keys: the first tensor's bytes then belong to nothing, which the loader sees
    path = write_checkpoint("hf", tmp_path / "hf")
    target = path / "model.safetensors"
    header = _json_header(target)
    first, second = list(header)[1:3]
    text = json.dumps(header).replace(f'"{second}"', f'"{first}"', 1).encode()
    _with_header(target, text)
    refused(path, names=target)
