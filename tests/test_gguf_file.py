"""The lean GGUF header reader (gguf_file.py) against gguf's own GGUFReader, on the real SmolLM2 file and on files
written here, and its refusal of corrupt counts."""

from __future__ import annotations

import struct

import gguf
import numpy as np
import pytest
from conftest import tiny_config

from mistral_tutorial.assets import default_model_path
from mistral_tutorial.gguf_export import write_random_gguf
from mistral_tutorial.gguf_file import GGML_TYPES, GGUFFile


def same_as_gguf(path) -> None:
    ours, theirs = GGUFFile(path), gguf.GGUFReader(str(path))
    expected = {k: f.contents() for k, f in theirs.fields.items()
                if not k.startswith(("tokenizer.ggml.", "GGUF."))}
    assert ours.metadata == expected
    assert ours.data_offset == theirs.data_offset and ours.alignment == theirs.alignment
    assert len(ours.tensors) == len(theirs.tensors)
    for a, b in zip(ours.tensors, theirs.tensors):
        assert (a.name, a.type_name, a.data_offset, a.n_bytes) == (b.name, b.tensor_type.name, b.data_offset, b.n_bytes)
        assert a.shape == tuple(int(n) for n in reversed(b.shape.tolist()))
        assert np.array_equal(a.data, b.data) and a.data.shape == b.data.shape


def test_the_type_table_is_gguf_s():
    for type_id, (name, block, nbytes) in GGML_TYPES.items():
        kind = gguf.GGMLQuantizationType(type_id)
        assert kind.name == name and gguf.GGML_QUANT_SIZES[kind] == (block, nbytes)


@pytest.mark.model
def test_reads_the_real_file_as_gguf_does():
    same_as_gguf(default_model_path())


@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_0", "Q4_1"])
def test_reads_written_files_as_gguf_does(tmp_path, qtype):
    same_as_gguf(write_random_gguf(tmp_path / "m.gguf", tiny_config(), qtype, head_type=qtype))


def test_a_corrupt_count_is_a_value_error_not_a_loop(tmp_path):
    path = write_random_gguf(tmp_path / "m.gguf", tiny_config(), "Q8_0", head_type="Q8_0")
    data = bytearray(path.read_bytes())
    data[16:24] = struct.pack("<Q", 2 ** 62)                      # the key-value count
    (tmp_path / "bad.gguf").write_bytes(bytes(data))
    with pytest.raises(ValueError, match="runs past the end of the file"):
        GGUFFile(tmp_path / "bad.gguf")
