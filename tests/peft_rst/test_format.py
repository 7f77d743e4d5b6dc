"""Tests of `peft_rst.format` against a reference reader written from the byte-level spec (docs/adapter-format.md)."""

import json
import math
import os
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import peft_rst.format
from peft_rst.format import (
    FORMAT_VERSION,
    INTEGRITY_KEY,
    SUFFIXES,
    RSTFormatError,
    SparseTensorData,
    check_integrity,
    decode_sparse,
    encode_sparse,
    encoded_nbytes,
    integrity_record,
    read_header,
    tensor_fingerprint,
)

FORCED = ["bitmask", "elias_fano", "gap8", "gap16"]
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
ENCODING_IDS = {"empty": 0, "full": 1, "bitmask": 2, "elias_fano": 3, "gap8": 4, "gap16": 4}


# ---------------------------------------------------------------------------------------------------------------
# helpers written from the spec, independent of the code under test


def read_uvarint(h: bytes, i: int) -> tuple[int, int]:
    value, shift = 0, 0
    while True:
        value |= (h[i] & 0x7F) << shift
        shift += 7
        i += 1
        if h[i - 1] < 0x80:
            return value, i


def uvarint(x: int) -> bytes:
    out = []
    while True:
        out.append((x & 0x7F) | (0x80 if x >= 0x80 else 0))
        x >>= 7
        if not x:
            return bytes(out)


def header_length(idx: bytes) -> int:
    _, i = read_uvarint(idx, 12)
    _, i = read_uvarint(idx, i)
    return i + 4


def reference_decode(parts: dict[str, torch.Tensor]) -> tuple[list[int], bytes, dict]:
    """Pure-Python reader of the documented layout: (positions, raw value bytes, header fields)."""
    raw = parts["idx"].numpy().tobytes()
    numel, i = read_uvarint(raw, 12)
    count, i = read_uvarint(raw, i)
    h, pos = raw[: i + 4], raw[i + 4 :]
    fields = {
        "version": h[0],
        "encoding": h[1],
        "dtype": h[2],
        "param": h[3],
        "fingerprint": int.from_bytes(h[4:12], "little"),
        "numel": numel,
        "count": count,
    }
    val = parts["val"].view(torch.uint8).numpy().tobytes() if "val" in parts else b""
    assert zlib.crc32(h[:-4] + pos + val) == int.from_bytes(h[-4:], "little")
    n, k, enc, param = numel, count, fields["encoding"], fields["param"]
    if enc == 0:
        idx = []
    elif enc == 1:
        idx = list(range(n))
    elif enc == 2:
        bits = np.unpackbits(np.frombuffer(pos, np.uint8), bitorder="little")
        idx = [int(i) for i in np.nonzero(bits)[0]]
    elif enc == 3:
        stream = int.from_bytes(pos, "little")  # bit j of the stream = bit j % 8 of byte j // 8
        assert len(pos) == (k * param + k + ((n - 1) >> param) + 1 + 7) // 8
        idx, bit = [], k * param
        while len(idx) < k:
            if stream >> bit & 1:
                i = len(idx)
                upper = bit - k * param - i
                idx.append((upper << param) | (stream >> (i * param) & ((1 << param) - 1)))
            bit += 1
    else:
        w, e = param // 8, 4 if n < 2**32 else 8
        words = [int.from_bytes(pos[i * w : (i + 1) * w], "little") for i in range(k)]
        escapes = iter(int.from_bytes(pos[j : j + e], "little") for j in range(k * w, len(pos), e))
        idx, p = [], -1
        for g in words:
            p += g if g else next(escapes)
            idx.append(p)
    return idx, val, fields


def u8(data) -> torch.Tensor:
    return torch.tensor(list(data), dtype=torch.uint8)


def split(parts: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """{"hdr": header bytes incl. CRC, "pos": position bytes, "val": values} for tampering with one piece."""
    raw = parts["idx"].numpy().tobytes()
    h = header_length(raw)
    return {"hdr": u8(raw[:h]), "pos": u8(raw[h:]), **({"val": parts["val"]} if "val" in parts else {})}


def join(pieces: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The parts `decode_sparse` takes, from split pieces (the CRC is left as it is)."""
    out = {k: v for k, v in pieces.items() if k not in ("hdr", "pos")}
    return {"idx": torch.cat([pieces["hdr"], pieces["pos"]]), **out}


def reseal(pieces: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Recompute the CRC after tampering, so that the decoder's semantic checks are what is tested."""
    h = pieces["hdr"].numpy().tobytes()[:-4]
    pos = pieces["pos"].numpy().tobytes()
    val = pieces["val"].view(torch.uint8).numpy().tobytes() if "val" in pieces else b""
    return {**pieces, "hdr": u8(h + zlib.crc32(h + pos + val).to_bytes(4, "little"))}


def make_header(pieces, *, numel: int, count: int) -> dict[str, torch.Tensor]:
    """The same header with other numel/count fields (which are variable-length), resealed."""
    h = pieces["hdr"].numpy().tobytes()[:12] + uvarint(numel) + uvarint(count) + bytes(4)
    return reseal({**pieces, "hdr": u8(h)})


def with_header_byte(pieces, offset, value):
    h = pieces["hdr"].clone()
    h[offset] = value
    return {**pieces, "hdr": h}


def random_positions(n: int, k: int, gen: torch.Generator) -> torch.Tensor:
    return torch.randperm(n, generator=gen)[:k].sort().values


def assert_roundtrip(idx, val, n, fp=12345, encoding=None):
    parts = encode_sparse(idx, val, n, fp, encoding=encoding)
    assert set(parts) <= set(SUFFIXES)
    data = decode_sparse(parts, n, "layer.weight")
    assert isinstance(data, SparseTensorData)
    assert data.indices.dtype == torch.int64 and torch.equal(data.indices, idx.to(torch.int64))
    assert data.values.dtype == val.dtype
    assert data.values.view(torch.uint8).numpy().tobytes() == val.view(torch.uint8).numpy().tobytes()
    assert (data.numel, data.base_fingerprint) == (n, fp)
    ref_idx, ref_val, fields = reference_decode(parts)
    assert ref_idx == idx.tolist() and ref_val == val.view(torch.uint8).numpy().tobytes()
    assert (fields["version"], fields["numel"], fields["count"], fields["fingerprint"]) == (2, n, idx.numel(), fp)
    if encoding is not None:
        assert fields["encoding"] == ENCODING_IDS[encoding]
    return parts


def bound_bits(n: int, k: int, value_bits: int) -> float:
    log2_binom = (math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1)) / math.log(2)
    return log2_binom + k * value_bits


# ---------------------------------------------------------------------------------------------------------------
# round trips


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("encoding", [None, *FORCED])
def test_roundtrip_every_encoding_and_dtype(encoding, dtype):
    gen = torch.Generator().manual_seed(0)
    for n, k in [(3000, 1), (3000, 30), (3000, 1500), (70_000, 200), (5, 5)]:
        idx = random_positions(n, k, gen)
        val = torch.randn(k, generator=gen).to(dtype)
        assert_roundtrip(idx, val, n, encoding=encoding)


@pytest.mark.parametrize("encoding", [None, "empty", *FORCED])
def test_zero_changed_entries(encoding):
    parts = assert_roundtrip(torch.zeros(0, dtype=torch.int64), torch.zeros(0, dtype=torch.bfloat16), 768, 7, encoding)
    data = decode_sparse(parts, 768, "bias")
    assert data.values.dtype == torch.bfloat16 and data.values.numel() == 0
    if encoding in (None, "empty"):
        assert set(parts) == {"idx"} and encoded_nbytes(parts) == 4 + 8 + 2 + 1 + 4  # 768 takes 2 varint bytes


@pytest.mark.parametrize("encoding", [None, "full", *FORCED])
def test_every_entry_changed(encoding):
    n = 777
    val = torch.randn(n, dtype=torch.float64)
    parts = assert_roundtrip(torch.arange(n), val, n, encoding=encoding)
    if encoding in (None, "full"):
        assert set(parts) == {"idx", "val"} and header_length(parts["idx"].numpy().tobytes()) == parts["idx"].numel()


def test_empty_tensor_and_single_entry_tensor():
    assert_roundtrip(torch.zeros(0, dtype=torch.int64), torch.zeros(0), 0)
    assert_roundtrip(torch.tensor([0]), torch.tensor([2.5]), 1)
    assert_roundtrip(torch.zeros(0, dtype=torch.int64), torch.zeros(0), 1)


@pytest.mark.parametrize("encoding", [None, *FORCED])
def test_gaps_at_type_boundaries(encoding):
    # gaps (position - previous position, the first counted from -1) at every word-size boundary, plus huge ones
    gaps = [1, 254, 255, 256, 257, 1, 65534, 65535, 65536, 65537, 1, 1, 2**20, 3, 255, 65535, 256, 65536]
    for first in (0, 254, 255, 256, 65535, 65536):
        pos = np.cumsum([first, *gaps])
        n = int(pos[-1]) + 1  # last entry is the tensor's last position
        idx = torch.from_numpy(pos)
        assert_roundtrip(idx, torch.randn(idx.numel()), n, encoding=encoding)
        assert_roundtrip(idx, torch.randn(idx.numel()), n + 2**21, encoding=encoding)


@pytest.mark.parametrize("encoding", [None, "elias_fano", "gap8", "gap16"])
def test_tensor_with_more_than_2_to_the_32_entries(encoding):
    for n in (2**33 + 5, 2**40 + 3):  # escaped gaps take 8 bytes; Elias-Fano low parts above 30 bits
        idx = torch.tensor([0, 2**32 - 1, 2**32, 2**32 + 70_000, n - 1])
        parts = assert_roundtrip(idx, torch.randn(5), n, encoding=encoding)
        assert encoded_nbytes(parts) < 100


@pytest.mark.parametrize("encoding", [None, *FORCED])
def test_adversarial_patterns(encoding):
    gen = torch.Generator().manual_seed(1)
    n = 200_000
    patterns = {
        "runs": torch.cat([torch.arange(s, s + 40) for s in (0, 1000, 70_000, 199_960)]),
        "every_256th": torch.arange(255, n, 256),
        "every_65536th": torch.arange(65535, n, 65536),
        "ends": torch.tensor([0, n - 1]),
        "mixed": torch.cat([torch.arange(0, 300), torch.tensor([70_000, 140_000]), torch.arange(190_000, 190_500, 3)]),
    }
    for idx in patterns.values():
        assert_roundtrip(idx, torch.randn(idx.numel(), generator=gen), n, encoding=encoding)


def test_automatic_choice_is_the_smallest_encoding():
    gen = torch.Generator().manual_seed(2)
    n = 50_000
    patterns = [random_positions(n, k, gen) for k in (3, 60, 600, 6000, 30_000)]
    patterns.append(torch.cat([torch.arange(s, s + 50) for s in range(0, n, 5000)]))  # clustered
    for idx in patterns:
        val = torch.randn(idx.numel(), generator=gen)
        chosen = encoded_nbytes(encode_sparse(idx, val, n, 1))
        assert chosen == min(encoded_nbytes(encode_sparse(idx, val, n, 1, encoding=e)) for e in FORCED)


def test_read_header_without_the_model():
    values = torch.randn(2, dtype=torch.float16)
    parts = encode_sparse(torch.tensor([3, 70_000]), values, 100_000, 77, encoding="gap16")
    info = read_header(parts["idx"], "w")
    assert (info.version, info.encoding, info.dtype) == (2, "gap16", torch.float16)
    assert (info.numel, info.count, info.base_fingerprint) == (100_000, 2, 77)
    assert read_header(encode_sparse(torch.zeros(0, dtype=torch.int64), torch.zeros(0), 5, 1)["idx"], "w").count == 0
    with pytest.raises(RSTFormatError, match="w.idx"):
        read_header(parts["idx"][:5], "w")
    with pytest.raises(RSTFormatError, match="upgrade"):
        read_header(torch.cat([torch.tensor([3], dtype=torch.uint8), parts["idx"][1:]]), "w")
    with pytest.raises(
        RSTFormatError, match=r"w\.idx.*non-empty 1-D uint8 tensor, got torch\.uint8 of shape \(2, 2\)"
    ):
        read_header(torch.zeros(2, 2, dtype=torch.uint8), "w")


def test_does_not_keep_callers_storage():
    big = torch.randn(1000)
    parts = encode_sparse(torch.tensor([3, 9]), big[3:5], 1000, 0)
    assert parts["val"].untyped_storage().nbytes() == 2 * 4
    big.zero_()
    assert decode_sparse(parts, 1000, "w").values.abs().sum() > 0


# ---------------------------------------------------------------------------------------------------------------
# size against the information bound


def test_size_within_115_percent_of_information_bound():
    gen = torch.Generator().manual_seed(3)
    for shape in [(768, 768), (3072, 768), (768, 3, 16, 16)]:
        n = math.prod(shape)
        for density in (0.001, 0.01, 0.05):
            k = round(n * density)
            idx = random_positions(n, k, gen)
            for dtype, bits in [(torch.float32, 32), (torch.bfloat16, 16)]:
                nbytes = encoded_nbytes(encode_sparse(idx, torch.randn(k, generator=gen).to(dtype), n, 1))
                assert 8 * nbytes <= 1.15 * bound_bits(n, k, bits), (shape, density, dtype, nbytes)


def test_clustered_positions_are_cheaper_than_the_uniform_bound():
    gen = torch.Generator().manual_seed(4)
    n, rows = 768 * 768, torch.randperm(768, generator=gen)[:8].sort().values
    idx = (rows[:, None] * 768 + torch.arange(0, 768, 2)).reshape(-1)  # half of 8 rows changed
    nbytes = encoded_nbytes(encode_sparse(idx, torch.randn(idx.numel()), n, 1))
    assert 8 * nbytes <= bound_bits(n, idx.numel(), 32)


def test_header_is_the_only_cost_of_an_unchanged_tensor():
    parts = encode_sparse(torch.zeros(0, dtype=torch.int64), torch.zeros(0), 3072 * 768, 1)
    assert encoded_nbytes(parts) == 4 + 8 + 4 + 1 + 4 == parts["idx"].numel()  # 3072 * 768 takes 4 varint bytes


# ---------------------------------------------------------------------------------------------------------------
# files


def test_safetensors_file_roundtrip(tmp_path):
    gen = torch.Generator().manual_seed(5)
    n = 100_000
    cases = {
        "a": ("gap16", 30),
        "b": ("gap8", 3000),
        "c": ("elias_fano", 500),
        "d": ("bitmask", 40_000),
        "e": (None, 0),
    }
    state, truth = {}, {}
    for name, (encoding, k) in cases.items():
        idx, val = random_positions(n, k, gen), torch.randn(k, generator=gen).to(torch.bfloat16)
        truth[name] = (idx, val)
        for suffix, t in encode_sparse(idx, val, n, 99, encoding=encoding).items():
            state[f"model.{name}.weight.{suffix}"] = t
    path = tmp_path / "adapter_model.safetensors"
    save_file(state, str(path))
    loaded = load_file(str(path))
    assert loaded.keys() == state.keys()
    for name, (idx, val) in truth.items():
        parts = {s: loaded[f"model.{name}.weight.{s}"] for s in SUFFIXES if f"model.{name}.weight.{s}" in loaded}
        data = decode_sparse(parts, n, f"model.{name}.weight")
        assert torch.equal(data.indices, idx) and torch.equal(data.values.view(torch.int16), val.view(torch.int16))


def test_reader_in_the_docs_decodes_every_encoding(tmp_path):
    doc = (Path(__file__).resolve().parents[2] / "docs" / "adapter-format.md").read_text()
    code = doc.split("<!-- reader -->", 1)[1].split("```python", 1)[1].split("```", 1)[0]
    namespace: dict = {}
    exec(compile(code, "adapter-format.md", "exec"), namespace)
    gen = torch.Generator().manual_seed(10)
    cases = [(1000, 0, None), (1000, 1000, None), (1000, 400, "bitmask"), (70_000, 300, "elias_fano")]
    cases += [(70_000, 300, "gap8"), (70_000, 3, "gap16"), (300, 299, "elias_fano")]
    state, truth = {}, {}
    for i, (n, k, encoding) in enumerate(cases):
        idx, val = random_positions(n, k, gen), torch.randn(k, generator=gen).to(DTYPES[i % 4])
        truth[i] = (idx, val)
        state.update({f"m.{i}.{s}": t for s, t in encode_sparse(idx, val, n, 3, encoding=encoding).items()})
    save_file(state, str(tmp_path / "a.safetensors"))
    loaded = load_file(str(tmp_path / "a.safetensors"))
    for i, (idx, val) in truth.items():
        positions, values = namespace["read_rst"](loaded[f"m.{i}.idx"], loaded.get(f"m.{i}.val"))
        assert torch.equal(positions, idx)
        assert (values is None and val.numel() == 0) or torch.equal(values.view(torch.uint8), val.view(torch.uint8))


# ---------------------------------------------------------------------------------------------------------------
# decoding errors


@pytest.fixture
def pieces():
    parts = encode_sparse(torch.tensor([5, 300, 70_000, 70_001]), torch.randn(4), 100_000, 42, encoding="gap8")
    return split(parts)


def decode_error(pieces_or_parts, numel=100_000) -> str:
    parts = join(pieces_or_parts) if "hdr" in pieces_or_parts else pieces_or_parts
    with pytest.raises(RSTFormatError) as info:
        decode_sparse(parts, numel, "enc.layers.0.fc1.weight")
    assert "enc.layers.0.fc1.weight" in str(info.value)
    return str(info.value)


def test_tampering_helpers_are_faithful(pieces):
    data = decode_sparse(join(reseal(pieces)), 100_000, "w")
    assert data.indices.tolist() == [5, 300, 70_000, 70_001] and data.base_fingerprint == 42


def test_version_1_records_still_decode(pieces):
    """Files written before the integrity record (version 1, e.g. the committed fixture) keep loading."""
    data = decode_sparse(join(reseal(with_header_byte(pieces, 0, 1))), 100_000, "w")
    assert data.indices.tolist() == [5, 300, 70_000, 70_001] and data.base_fingerprint == 42
    assert read_header(join(reseal(with_header_byte(pieces, 0, 1)))["idx"], "w").version == 1


def test_unknown_version_asks_for_an_upgrade(pieces):
    msg = decode_error(reseal(with_header_byte(pieces, 0, FORMAT_VERSION + 1)))
    assert "upgrade peft_rst" in msg and f"version {FORMAT_VERSION + 1}" in msg
    assert "upgrade" in decode_error(with_header_byte(pieces, 0, 200))  # even before the checksum is looked at
    assert "corrupted" in decode_error(with_header_byte(pieces, 0, 0))


def test_truncated_or_extended_positions(pieces):
    assert "truncated" in decode_error({**pieces, "pos": pieces["pos"][:-1]})
    assert "truncated" in decode_error(reseal({**pieces, "pos": pieces["pos"][:-1]}))
    longer = torch.cat([pieces["pos"], pieces["pos"][:1]])
    assert "checksum" in decode_error({**pieces, "pos": longer})
    assert "expected" in decode_error(reseal({**pieces, "pos": longer}))
    assert "truncated" in decode_error({**pieces, "pos": pieces["pos"][:2]})
    assert "fewer than" in decode_error(reseal({**pieces, "pos": pieces["pos"][:2]}))
    ef = split(encode_sparse(torch.tensor([5, 300, 70_000]), torch.randn(3), 100_000, 42, encoding="elias_fano"))
    assert "truncated" in decode_error({**ef, "pos": ef["pos"][:-1]})
    assert "truncated" in decode_error(reseal({**ef, "pos": ef["pos"][:-1]}))
    g16 = split(encode_sparse(torch.tensor([5, 300, 70_000]), torch.randn(3), 100_000, 42, encoding="gap16"))
    assert "truncated" in decode_error(reseal({**g16, "pos": g16["pos"][:-1]}))  # odd number of bytes


def test_corrupted_header(pieces):
    assert "checksum" in decode_error(with_header_byte(pieces, 7, pieces["hdr"][7] ^ 1))  # fingerprint bit
    assert "checksum" in decode_error(with_header_byte(pieces, 12, pieces["hdr"][12] ^ 1))  # numel: corruption
    assert "checksum" in decode_error({**pieces, "val": pieces["val"] * 2})  # values changed, header not
    assert "encoding" in decode_error(reseal(with_header_byte(pieces, 1, 9)))
    assert "dtype" in decode_error(reseal(with_header_byte(pieces, 2, 77)))
    assert "inconsistent" in decode_error(reseal(with_header_byte(pieces, 3, 12)))  # gap words of 12 bits
    assert "truncated" in decode_error({"idx": pieces["hdr"][:10], "val": pieces["val"]})
    assert "truncated" in decode_error({"idx": pieces["hdr"][:-1], "val": pieces["val"]})
    never_ends = torch.cat([pieces["hdr"][:12], torch.full((30,), 0x80, dtype=torch.uint8)])
    assert "do not parse" in decode_error({"idx": never_ends, "val": pieces["val"]})
    assert "uint8" in decode_error({**join(pieces), "idx": join(pieces)["idx"].to(torch.int64)})


def test_count_larger_than_numel(pieces):
    assert "corrupted" in decode_error(make_header(pieces, numel=100_000, count=200_000))
    assert decode_sparse(join(make_header(pieces, numel=100_000, count=4)), 100_000, "w").indices.numel() == 4


def test_numel_mismatch(pieces):
    msg = decode_error(pieces, numel=99_999)
    assert "100000" in msg and "99999" in msg and "base model" in msg


def craft_elias_fano(numel: int, values: torch.Tensor, low_bits: int, pos_bytes: list[int]) -> dict:
    """Hand-made Elias-Fano pieces (header parameter = low_bits), with a valid checksum."""
    p = split(encode_sparse(torch.arange(values.numel()), values, numel, 0, encoding="elias_fano"))
    return reseal({**with_header_byte(p, 3, low_bits), "pos": u8(pos_bytes)})


def test_out_of_range_positions():
    with pytest.raises(RSTFormatError, match="lie in"):
        encode_sparse(torch.tensor([1, 10]), torch.randn(2), 10, 0)
    with pytest.raises(RSTFormatError, match="lie in"):
        encode_sparse(torch.tensor([-1, 3]), torch.randn(2), 10, 0)
    # gaps that run past the end, with a valid checksum
    p = split(encode_sparse(torch.tensor([1, 8]), torch.randn(2), 10, 0, encoding="gap8"))
    assert "past" in decode_error(reseal({**p, "pos": u8([2, 9])}), numel=10)
    # escaped gaps must be too big for a word (canonical) and at most numel
    p = split(encode_sparse(torch.tensor([1, 300]), torch.randn(2), 1000, 0, encoding="gap8"))
    assert p["pos"].tolist() == [2, 0, 43, 1, 0, 0]  # gap 299 = 0x12B escaped as little-endian u32
    for escaped in ([7, 0, 0, 0], [0x88, 0x13, 0, 0]):  # 7 < 256, 5000 > numel
        assert "escaped gap" in decode_error(reseal({**p, "pos": u8([2, 0, *escaped])}), numel=1000)
    # Elias-Fano, numel 10, 2 low bits: 4 low bits then 2 + (9 >> 2) + 1 = 5 upper bits, one stream, LSB first.
    # positions 1 = (upper 0, low 01) and 10 = (upper 2, low 10): low bits 1001, upper bits set at 4 + 0, 4 + 2 + 1
    assert "strictly increasing" in decode_error(craft_elias_fano(10, torch.randn(2), 2, [0b10011001, 0]), 10)


def test_non_increasing_positions():
    with pytest.raises(RSTFormatError, match="strictly increasing"):
        encode_sparse(torch.tensor([1, 5, 5]), torch.randn(3), 10, 0)
    with pytest.raises(RSTFormatError, match="strictly increasing"):
        encode_sparse(torch.tensor([1, 5, 3]), torch.randn(3), 10, 0)
    # positions 1 = (0, 01) and 1 = (0, 01) again: low bits 0101, upper bits set at 4 + 0 + 0 and 4 + 0 + 1
    assert "strictly increasing" in decode_error(craft_elias_fano(10, torch.randn(2), 2, [0b00110101, 0]), 10)
    # the same layout with distinct positions decodes: 1 = (0, 01) and 3 = (0, 11)
    good = join(craft_elias_fano(10, torch.randn(2), 2, [0b00111101, 0]))
    assert decode_sparse(good, 10, "w").indices.tolist() == [1, 3]
    with pytest.raises(RSTFormatError, match="set bits"):  # a padding bit set: 3 ones in the upper part
        decode_sparse(join(craft_elias_fano(10, torch.randn(2), 2, [0b00111101, 0b10])), 10, "w")


def test_bitmask_count_mismatch():
    p = split(encode_sparse(torch.tensor([1, 6]), torch.randn(2), 10, 0, encoding="bitmask"))
    assert "bitmask" in decode_error(reseal({**p, "pos": u8([0b01000011, 0])}), numel=10)


def test_nan_or_inf_values():
    with pytest.raises(RSTFormatError, match="NaN"):
        encode_sparse(torch.tensor([1, 2]), torch.tensor([1.0, float("nan")]), 10, 0)
    with pytest.raises(RSTFormatError, match="NaN"):
        encode_sparse(torch.tensor([1, 2]), torch.tensor([float("-inf"), 1.0], dtype=torch.bfloat16), 10, 0)
    for dtype in DTYPES:
        p = split(encode_sparse(torch.tensor([1, 2]), torch.tensor([1.0, 2.0], dtype=dtype), 10, 0))
        for bad in (float("nan"), float("inf")):
            assert "NaN" in decode_error(reseal({**p, "val": torch.tensor([1.0, bad], dtype=dtype)}), numel=10)


def test_missing_unexpected_and_mistyped_parts(pieces):
    parts = join(pieces)
    assert "missing" in decode_error({"val": parts["val"]})
    assert "missing" in decode_error({"idx": parts["idx"]})
    assert "unknown part" in decode_error({**parts, "pos": parts["idx"]})
    assert "float32" in decode_error(reseal({**pieces, "val": pieces["val"].to(torch.float16)}))
    assert "float" in decode_error({**parts, "val": parts["val"].to(torch.int32)})
    assert "4 torch.float32" in decode_error(reseal({**pieces, "val": pieces["val"][:3]}))
    assert "truncated" in decode_error({**parts, "val": parts["val"][:3]})
    empty = encode_sparse(torch.zeros(0, dtype=torch.int64), torch.zeros(0), 100_000, 0)
    assert "present" in decode_error({**empty, "val": parts["val"]})
    assert "expected 0" in decode_error(reseal({**split(empty), "pos": u8([1])}))


def test_encode_input_validation():
    idx, val = torch.tensor([1, 2]), torch.randn(2)
    for kwargs, match in [
        (dict(values=torch.randn(3)), "pair up"),
        (dict(indices=torch.tensor([1.0, 2.0])), "integer"),
        (dict(indices=idx.reshape(1, 2), values=val.reshape(1, 2)), "1-D"),
        (dict(values=val.to(torch.int32)), "not supported"),
        (dict(numel=-1), "numel"),
        (dict(numel=2**48), "numel"),
        (dict(numel=10.0), "int"),
        (dict(base_fingerprint=-1), "base_fingerprint"),
        (dict(base_fingerprint=2**63), "base_fingerprint"),
        (dict(encoding="zip"), "unknown encoding"),
        (dict(encoding="full"), "full"),
        (dict(encoding="empty"), "empty"),
    ]:
        args = dict(indices=idx, values=val, numel=10, base_fingerprint=0) | kwargs
        encoding = args.pop("encoding", None)
        with pytest.raises(RSTFormatError, match=match):
            encode_sparse(**args, encoding=encoding)
    assert issubclass(RSTFormatError, ValueError)


# ---------------------------------------------------------------------------------------------------------------
# fingerprint


@pytest.mark.parametrize("dtype", [*DTYPES, torch.int64, torch.uint8, torch.bool])
def test_fingerprint_detects_any_single_bit_flip(dtype):
    gen = torch.Generator().manual_seed(6)
    t = (torch.randn(1037, 3, generator=gen) * 10).to(dtype)  # odd size: exercises the tail past whole words
    fp = tensor_fingerprint(t)
    assert fp == tensor_fingerprint(t.clone()) and 0 <= fp < 2**63
    raw = t.reshape(-1).view(torch.uint8)
    positions = set(torch.randperm(raw.numel(), generator=gen)[:40].tolist()) | {0, raw.numel() - 1}
    seen = {fp}
    for byte in positions:
        bit = int(torch.randint(0, 8, (1,), generator=gen)) if dtype != torch.bool else 0
        flipped = raw.clone()
        flipped[byte] ^= 1 << bit
        seen.add(tensor_fingerprint(flipped.view(dtype).reshape(t.shape)))
    assert len(seen) == len(positions) + 1


def test_fingerprint_sees_position_shape_and_dtype():
    gen = torch.Generator().manual_seed(7)
    w = torch.randn(768, 768, generator=gen)
    fp = tensor_fingerprint(w)
    swapped = w.clone().reshape(-1)
    swapped[[10, 11]] = swapped[[11, 10]]
    assert tensor_fingerprint(swapped.reshape(w.shape)) != fp
    far = w.clone().reshape(-1)
    far[[0, 5000]] = far[[5000, 0]]
    assert tensor_fingerprint(far.reshape(w.shape)) != fp
    assert tensor_fingerprint(w.t().contiguous()) != fp
    assert tensor_fingerprint(w.t()) == tensor_fingerprint(w.t().contiguous())  # layout does not matter
    assert tensor_fingerprint(w.reshape(-1)) != fp
    assert tensor_fingerprint(w.view(torch.int32)) != fp
    assert tensor_fingerprint(torch.zeros(4)) != tensor_fingerprint(torch.zeros(4, dtype=torch.float64)[:2])
    buffer = torch.randn(1001, generator=gen)
    assert tensor_fingerprint(buffer[1:]) == tensor_fingerprint(buffer[1:].clone())  # unaligned view


def test_fingerprint_non_cpu_path_computes_the_same_hashes():
    # GPUs take the torch implementation; on this CPU-only machine run it on CPU tensors against the numpy one
    from peft_rst.format import _row_hashes_numpy, _row_hashes_torch

    gen = torch.Generator().manual_seed(9)
    for t in [torch.randn(3000, 7, generator=gen), torch.randn(1024 * 8, generator=gen).to(torch.bfloat16)]:
        raw = t.reshape(-1).view(torch.uint8)
        n = raw.numel() // 8
        numpy_rows = _row_hashes_numpy(raw.numpy()[: n * 8].view(np.uint64))
        torch_rows = _row_hashes_torch(raw[: n * 8].view(torch.int64))
        assert numpy_rows.dtype == torch_rows.dtype == np.uint64 and np.array_equal(numpy_rows, torch_rows)
        # reference: the first row's hash by Python integers
        weights = [((c + 1) * 0x9E3779B97F4A7C15 | 1) % 2**64 for c in range(1024)]
        words = np.frombuffer(raw.numpy().tobytes()[: 8 * min(n, 1024)], "<u8").tolist()
        assert int(numpy_rows[0]) == sum(w * a for w, a in zip(words, weights)) % 2**64


@pytest.mark.slow  # a fresh interpreter importing torch: a few seconds
def test_fingerprint_is_the_same_in_another_process():
    # load the module file alone (it needs only torch and numpy), so the child does not import peft
    code = (
        "import importlib.util, sys, torch; spec = importlib.util.spec_from_file_location('fmt', sys.argv[1]);"
        "fmt = sys.modules['fmt'] = importlib.util.module_from_spec(spec); spec.loader.exec_module(fmt);"
        "g = torch.Generator().manual_seed(8);"
        "print(fmt.tensor_fingerprint(torch.randn(300, 50, generator=g).to(torch.bfloat16)))"
    )
    env = {**os.environ, "PYTHONHASHSEED": "123"}
    path = peft_rst.format.__file__
    out = subprocess.run([sys.executable, "-c", code, path], capture_output=True, text=True, check=True, env=env)
    gen = torch.Generator().manual_seed(8)
    assert int(out.stdout.strip()) == tensor_fingerprint(torch.randn(300, 50, generator=gen).to(torch.bfloat16))


# ---------------------------------------------------------------------------------------------------------------
# integrity record of a whole file (version 2)


def _file_tensors() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(3)
    parts = encode_sparse(torch.tensor([1, 7]), torch.randn(2, generator=gen), 10, 5)
    return {
        "enc.fc1.rst_weight.weight.idx": parts["idx"],
        "enc.fc1.rst_weight.weight.val": parts["val"],
        "head.weight": torch.randn(3, 4, generator=gen),
        "head.bias": torch.randn(3, generator=gen).to(torch.bfloat16),
    }


def _with_record(tensors):
    return {**tensors, INTEGRITY_KEY: integrity_record(tensors)}


def _record_json(record: torch.Tensor) -> dict:
    raw = record.numpy().tobytes()
    assert raw[:4] == b"RSTI" and raw[4] == FORMAT_VERSION
    assert zlib.crc32(raw[:-4]) == int.from_bytes(raw[-4:], "little")
    return json.loads(raw[5:-4])


def test_integrity_record_lists_every_tensor_with_an_independent_crc():
    tensors = _file_tensors()
    entries = _record_json(integrity_record(tensors))
    assert sorted(entries) == sorted(tensors)
    for key, t in tensors.items():
        dtype, shape, crc = entries[key]
        assert (dtype, shape) == (str(t.dtype).removeprefix("torch."), list(t.shape))
        assert crc == zlib.crc32(t.contiguous().view(torch.uint8).numpy().tobytes())
    check_integrity(_with_record(tensors), "f")  # an intact file passes


def _flip(t: torch.Tensor, byte: int) -> torch.Tensor:
    raw = t.contiguous().view(torch.uint8).reshape(-1).clone()
    raw[byte % raw.numel()] ^= 0x10
    return raw.view(t.dtype).reshape(t.shape)


@pytest.mark.parametrize(
    "edit, pattern",
    [
        (lambda f: f.update({"head.weight": _flip(f["head.weight"], 0)}), r"'head\.weight' fails its checksum"),
        (lambda f: f.update({"head.bias": _flip(f["head.bias"], 1)}), r"'head\.bias' fails its checksum"),
        (lambda f: f.update({"head.weight": f["head.weight"].reshape(4, 3)}), r"'head\.weight' is .* shape \(4, 3\)"),
        (lambda f: f.update({"head.weight": f["head.weight"].double()}), r"'head\.weight' is torch\.float64"),
        (lambda f: f.pop("head.bias"), r"missing from the file \(first: head\.bias\)"),
        (lambda f: f.update({"extra.weight": torch.zeros(2)}), r"not covered .*extra\.weight"),
        (lambda f: f.update({"head.w": f.pop("head.weight")}), r"missing|not covered"),
        (lambda f: f.update({INTEGRITY_KEY: f[INTEGRITY_KEY][:-1]}), r"rst_integrity.*checksum"),
        (lambda f: f.update({INTEGRITY_KEY: _flip(f[INTEGRITY_KEY], 9)}), r"rst_integrity.*checksum"),
        (lambda f: f.pop(INTEGRITY_KEY), r"format version 2 but has no 'rst_integrity'"),
    ],
    ids=[
        "flip-f32",
        "flip-bf16",
        "reshaped",
        "retyped",
        "missing",
        "added",
        "renamed",
        "record-cut",
        "record-flip",
        "record-gone",
    ],
)
def test_integrity_record_refuses_every_change(edit, pattern):
    tensors = _with_record(_file_tensors())
    edit(tensors)
    with pytest.raises(RSTFormatError, match=pattern):
        check_integrity(tensors, "f")


def test_a_record_moved_under_the_prefix_of_every_key_covers_the_keys_under_that_prefix():
    """transformers' save_pretrained prepends `base_model.model.` to every key of an adapter, the record's too."""
    moved = {f"base_model.model.{k}": t for k, t in _with_record(_file_tensors()).items()}
    check_integrity(moved, "f")
    one_left_behind = dict(moved)
    one_left_behind["head.bias"] = one_left_behind.pop("base_model.model.head.bias")
    with pytest.raises(RSTFormatError, match=r"missing from the file \(first: base_model\.model\.head\.bias\)"):
        check_integrity(one_left_behind, "f")
    moved["base_model.model.head.weight"] = _flip(moved["base_model.model.head.weight"], 2)
    with pytest.raises(RSTFormatError, match=r"'base_model\.model\.head\.weight' fails its checksum"):
        check_integrity(moved, "f")
    with pytest.raises(RSTFormatError, match="2 integrity records"):
        check_integrity({**_with_record(_file_tensors()), f"x.{INTEGRITY_KEY}": integrity_record({})}, "f")


def test_non_finite_dense_tensors_are_refused_when_saving_and_loading():
    tensors = _file_tensors()
    tensors["head.weight"][0, 0] = float("nan")
    with pytest.raises(RSTFormatError, match=r"'head\.weight' holds 1 NaN/inf"):
        integrity_record(tensors)
    version_1 = {k: v for k, v in tensors.items() if not k.endswith(".idx")}  # no header says version 2
    with pytest.raises(RSTFormatError, match=r"'head\.weight' contains NaN"):
        check_integrity(version_1, "f")


def test_records_of_a_newer_format_ask_for_an_upgrade():
    record = integrity_record(_file_tensors()).clone()
    raw = bytearray(record.numpy().tobytes())
    raw[4] = FORMAT_VERSION + 1
    raw[-4:] = zlib.crc32(bytes(raw[:-4])).to_bytes(4, "little")
    with pytest.raises(RSTFormatError, match="upgrade peft_rst"):
        check_integrity({**_file_tensors(), INTEGRITY_KEY: torch.frombuffer(raw, dtype=torch.uint8)}, "f")


def test_record_check_in_the_docs_accepts_intact_files_and_refuses_changed_ones(tmp_path):
    doc = (Path(__file__).resolve().parents[2] / "docs" / "adapter-format.md").read_text()
    code = doc.split("<!-- reader -->", 1)[1].split("```python", 1)[1].split("```", 1)[0]
    namespace: dict = {}
    exec(compile(code, "adapter-format.md", "exec"), namespace)
    save_file(_with_record(_file_tensors()), str(tmp_path / "a.safetensors"))
    state = load_file(str(tmp_path / "a.safetensors"))
    namespace["check_file"](state)
    namespace["check_file"]({k: v for k, v in state.items() if k != INTEGRITY_KEY})  # version 1: nothing to check
    moved = {f"base_model.model.{k}": v for k, v in state.items()}  # as transformers' save_pretrained writes it
    namespace["check_file"](moved)
    with pytest.raises(AssertionError):
        namespace["check_file"]({**moved, "base_model.model.head.bias": _flip(moved["base_model.model.head.bias"], 0)})
    for edit in (
        lambda s: s.update({"head.weight": _flip(s["head.weight"], 5)}),
        lambda s: s.pop("head.bias"),
        lambda s: s.update({"head.weight": torch.full((3, 4), float("nan"))}),
    ):
        changed = dict(state)
        edit(changed)
        with pytest.raises(AssertionError):
            namespace["check_file"](changed)
