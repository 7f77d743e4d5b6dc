"""Compact, exact, versioned sparse encoding of RST adapter tensors, and the integrity record of a whole file.

One RST parameter (the entries training moved away from w0) is stored as one or two plain tensors inside
`adapter_model.safetensors`, so the file needs no pickle, no JSON side file and no safetensors metadata:

- `idx` (uint8): an 18-30 byte header (version, encoding, dtype, the base weights' fingerprint, numel, count and a
  CRC-32 of everything) followed by the changed positions, in whichever encoding is smallest for this tensor;
- `val` (the parameter's float dtype, absent when nothing changed): the new values, bit for bit.

Since version 2 the file also holds one `rst_integrity` tensor (uint8): the name, dtype, shape and CRC-32 of every
other tensor in the file, so that dense tensors (a `modules_to_save` head) are covered too, and a tensor that is
missing, added, renamed or reshaped is caught as well as a flipped byte.

The byte-level specification (enough to read the file without this package) is `docs/adapter-format.md`.
"""

from __future__ import annotations

import hashlib
import json
import zlib
from dataclasses import dataclass

import numpy as np
import torch

__all__ = [
    "FORMAT_VERSION",
    "SUFFIXES",
    "ENCODINGS",
    "RSTFormatError",
    "SparseTensorData",
    "HeaderInfo",
    "read_header",
    "tensor_fingerprint",
    "encode_sparse",
    "decode_sparse",
    "encoded_nbytes",
    "INTEGRITY_KEY",
    "integrity_key",
    "integrity_record",
    "check_integrity",
    "file_format_version",
]

FORMAT_VERSION: int = 2
_READABLE_VERSIONS = (1, 2)
SUFFIXES: tuple[str, ...] = ("idx", "val")

_MAX_NUMEL = 1 << 48  # keeps every header field and position arithmetic well inside int64
_MIN_HEADER_NBYTES = 18  # 4 single bytes, 8-byte fingerprint, two 1-byte varints, 4-byte CRC
_MAX_HEADER_NBYTES = 30  # ... with two 7-byte varints (values below 2**48)
_MAX_FINGERPRINT = 1 << 63

# Encoding ids (header byte 1); `ENCODINGS` are the names `encode_sparse(..., encoding=...)` accepts to force one.
_EMPTY, _FULL, _BITMASK, _ELIAS_FANO, _GAP = 0, 1, 2, 3, 4
ENCODINGS: tuple[str, ...] = ("empty", "full", "bitmask", "elias_fano", "gap8", "gap16")
_ENCODING_NAMES = {_EMPTY: "empty", _FULL: "full", _BITMASK: "bitmask", _ELIAS_FANO: "elias_fano", _GAP: "gap"}

# Value dtype codes (header byte 2), with the integer type of the same width (for bit-level checks).
_DTYPE_CODES: dict[torch.dtype, int] = {torch.float32: 1, torch.float16: 2, torch.bfloat16: 3, torch.float64: 4}
_CODE_DTYPES = {code: dtype for dtype, code in _DTYPE_CODES.items()}
_INT_VIEWS = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}
_INT_VIEWS[torch.float64] = torch.int64
_NP_FLOATS = {torch.float32: np.float32, torch.float16: np.float16, torch.float64: np.float64}
_NP_INTS = {torch.float32: np.int32, torch.float16: np.int16, torch.bfloat16: np.int16, torch.float64: np.int64}


def _count_nonfinite(bits: np.ndarray, dtype: torch.dtype) -> int:
    """NaN/inf among values given as their integer bit view (numpy: single-threaded, no torch thread start-up)."""
    if dtype == torch.bfloat16:  # numpy has no bfloat16: non-finite = all exponent bits set
        return int(np.count_nonzero((bits & 0x7F80) == 0x7F80))
    return bits.size - int(np.count_nonzero(np.isfinite(bits.view(_NP_FLOATS[dtype]))))


class RSTFormatError(ValueError):
    """An RST adapter tensor could not be encoded or decoded; the message names the tensor and the fix."""


@dataclass(frozen=True)
class SparseTensorData:
    """The changed entries of one flattened parameter: new values at strictly increasing flat positions."""

    indices: torch.Tensor  # 1-D int64, strictly increasing, in [0, numel)
    values: torch.Tensor  # 1-D, same length as indices, the new weight values in the original float dtype
    numel: int
    base_fingerprint: int  # `tensor_fingerprint` of the base weights the adapter was trained from


# ----------------------------------------------------------------------------------------------------------------
# fingerprint

_FP_COLS = 1024  # 64-bit words per row of the 2-D view of the data


def _odd_weights(n: int, mult: int) -> np.ndarray:
    """((i + 1) * mult) | 1 modulo 2**64 for i < n: odd, so multiplying by one is invertible modulo 2**64."""
    return (np.arange(1, n + 1, dtype=np.uint64) * np.uint64(mult)) | np.uint64(1)


_FP_COL_WEIGHTS = _odd_weights(_FP_COLS, 0x9E3779B97F4A7C15)
_FP_ROW_MULT = 0xC2B2AE3D27D4EB4F


def _row_hashes_numpy(words: np.ndarray) -> np.ndarray:
    """sum_c words[r, c] * col_weight[c] mod 2**64 for each row of 1024 words (last row partial): one pass."""
    nrows = words.size // _FP_COLS
    body = words[: nrows * _FP_COLS].reshape(nrows, _FP_COLS)
    rest = words[nrows * _FP_COLS :]
    last = np.einsum("i,i->", rest, _FP_COL_WEIGHTS[: rest.size], dtype=np.uint64)
    return np.append(np.einsum("ij,j->i", body, _FP_COL_WEIGHTS, dtype=np.uint64), last)


def _row_hashes_torch(words: torch.Tensor) -> np.ndarray:
    """The same on any device, in int64 (whose wrap-around has the bits of uint64 arithmetic)."""
    nrows = words.numel() // _FP_COLS
    weights = torch.from_numpy(_FP_COL_WEIGHTS.view(np.int64)).to(words.device)
    body = words[: nrows * _FP_COLS].view(nrows, _FP_COLS)
    rest = words[nrows * _FP_COLS :]
    hashes = torch.cat([(body * weights).sum(1), (rest * weights[: rest.numel()]).sum().reshape(1)])
    return hashes.cpu().numpy().view(np.uint64)


def tensor_fingerprint(t: torch.Tensor) -> int:
    """A deterministic 63-bit fingerprint of a tensor's exact bits, shape and dtype.

    The bytes are read as little-endian 64-bit words w_i in rows of 1024; the fingerprint hashes (blake2b)
    shape, dtype, the trailing bytes that fill no word, and H = sum_i w_i * a_col(i) * b_row(i) mod 2**64 with
    odd weights a and b. Odd weights are invertible modulo 2**64, so changing any single word (any entry) always
    changes H; position-dependent weights catch swapped, permuted or transposed entries. One pass over the data
    (numpy on CPU, where it stays single-threaded; torch elsewhere), with integer arithmetic only: identical on
    every run, process and device.
    """
    if not isinstance(t, torch.Tensor):
        raise RSTFormatError(f"tensor_fingerprint expects a torch.Tensor, got {type(t).__name__}.")
    raw = t.detach().contiguous().reshape(-1).view(torch.uint8)
    nwords = raw.numel() // 8
    if raw.device.type == "cpu":
        data = raw.numpy()
        rows = _row_hashes_numpy(data[: nwords * 8].view(np.uint64))
        tail = data[nwords * 8 :].tobytes()
    else:
        if raw.storage_offset() % 8:
            raw = raw.clone()
        rows = _row_hashes_torch(raw[: nwords * 8].view(torch.int64))
        tail = raw[nwords * 8 :].cpu().numpy().tobytes()
    total = int(np.einsum("i,i->", rows, _odd_weights(rows.size, _FP_ROW_MULT), dtype=np.uint64))
    digest = hashlib.blake2b(f"{tuple(t.shape)}|{t.dtype}|{total}|".encode() + tail, digest_size=8).digest()
    return int.from_bytes(digest, "little") & (_MAX_FINGERPRINT - 1)


# ----------------------------------------------------------------------------------------------------------------
# position encodings (numpy, on int64 arrays of strictly increasing positions)


def _escape_nbytes(numel: int) -> int:
    """Bytes of one escaped gap: gaps are at most numel, so u32 unless the tensor has 2**32 entries or more."""
    return 4 if numel < (1 << 32) else 8


def _ef_nbits(numel: int, count: int, low_bits: int) -> tuple[int, int]:
    """(low part, upper part) bit lengths of the Elias-Fano encoding with `low_bits` low bits per position."""
    return count * low_bits, count + ((numel - 1) >> low_bits) + 1


def _ef_nbytes(numel: int, count: int, low_bits: int) -> int:
    return (sum(_ef_nbits(numel, count, low_bits)) + 7) // 8


def _ef_best_low_bits(numel: int, count: int) -> int:
    return min(range(numel.bit_length() + 1), key=lambda b: _ef_nbytes(numel, count, b))


def _uint_dtype(nbytes: int) -> str:
    return {1: "<u1", 2: "<u2", 4: "<u4", 8: "<u8"}[nbytes]


def _ef_encode(pos: np.ndarray, numel: int, low_bits: int) -> np.ndarray:
    """One LSB-first bit stream: each position's low bits back to back, then the upper parts in unary."""
    count = pos.size
    low_nbits, high_nbits = _ef_nbits(numel, count, low_bits)
    bits = np.zeros(_ef_nbytes(numel, count, low_bits) * 8, np.uint8)
    if low_bits:
        width = 1 << max(0, (low_bits - 1).bit_length() - 3)  # 1, 2, 4 or 8 bytes per low part
        as_bytes = (pos & ((1 << low_bits) - 1)).astype(_uint_dtype(width)).view(np.uint8).reshape(count, width)
        bits[:low_nbits] = np.unpackbits(as_bytes, axis=1, bitorder="little")[:, :low_bits].reshape(-1)
    bits[low_nbits + (pos >> low_bits) + np.arange(count)] = 1
    return np.packbits(bits, bitorder="little")


def _ef_decode(packed: np.ndarray, numel: int, count: int, low_bits: int, where) -> np.ndarray:
    bits = np.unpackbits(packed, bitorder="little")
    low_nbits = count * low_bits
    ones = np.nonzero(bits[low_nbits:])[0]
    if ones.size != count:
        raise where(f"the Elias-Fano upper part has {ones.size} set bits, expected {count}")
    pos = (ones - np.arange(count)) << low_bits
    if low_bits:
        weights = _BIT_WEIGHTS[low_bits]
        pos |= bits[:low_nbits].reshape(count, low_bits).astype(weights.dtype) @ weights
    return pos


# 2**j for j < L, per L: numpy's integer matmul is faster in 32 bits, which hold L <= 30
_BIT_WEIGHTS = {b: 1 << np.arange(b, dtype=np.int32 if b <= 30 else np.int64) for b in range(1, 64)}


def _gap_encode(pos: np.ndarray, numel: int, word_bits: int) -> np.ndarray:
    gaps = np.diff(pos, prepend=-1)
    big = gaps >= (1 << word_bits)
    word = np.dtype(_uint_dtype(word_bits // 8))
    escapes = gaps[big].astype(_uint_dtype(_escape_nbytes(numel))).view(word)
    words = np.where(big, 0, gaps).astype(word)
    return np.concatenate([words, escapes])


def _gap_escape_count(pos: np.ndarray, word_bits: int) -> int:
    if pos.size == 0:
        return 0
    return int(pos[0] + 1 >= (1 << word_bits)) + int(np.count_nonzero(np.diff(pos) >= (1 << word_bits)))


# ----------------------------------------------------------------------------------------------------------------
# encode


def _as_int(x, what: str) -> int:
    if isinstance(x, bool) or not isinstance(x, (int, np.integer)):
        raise RSTFormatError(f"encode_sparse: {what} must be an int, got {type(x).__name__}.")
    return int(x)


def _choose(pos: np.ndarray, numel: int, encoding: str | None) -> tuple[int, int]:
    """(encoding id, parameter) of the requested encoding, or of the smallest one (ties: earliest listed)."""
    count = pos.size
    if encoding is None:
        if count == 0:
            return _EMPTY, 0
        if count == numel:
            return _FULL, 0
        low_bits = _ef_best_low_bits(numel, count)
        esc = _escape_nbytes(numel)
        candidates = [
            ((numel + 7) // 8, _BITMASK, 0),
            (_ef_nbytes(numel, count, low_bits), _ELIAS_FANO, low_bits),
            (count + _gap_escape_count(pos, 8) * esc, _GAP, 8),
            (2 * count + _gap_escape_count(pos, 16) * esc, _GAP, 16),
        ]
        return min(candidates, key=lambda c: c[0])[1:]
    if encoding not in ENCODINGS:
        raise RSTFormatError(f"encode_sparse: unknown encoding {encoding!r}; use one of {list(ENCODINGS)} or None.")
    if encoding == "empty" and count != 0:
        raise RSTFormatError(f"encode_sparse: encoding 'empty' needs 0 entries, got {count}.")
    if encoding == "full" and count != numel:
        raise RSTFormatError(f"encode_sparse: encoding 'full' needs all {numel} entries, got {count}.")
    if encoding == "elias_fano":
        return _ELIAS_FANO, _ef_best_low_bits(numel, count)
    if encoding in ("gap8", "gap16"):
        return _GAP, int(encoding[3:])
    return {"empty": _EMPTY, "full": _FULL, "bitmask": _BITMASK}[encoding], 0


def _crc(header_fields: bytes, *arrays: np.ndarray | None) -> int:
    """CRC-32 of the header bytes before the CRC, then the position bytes, then the raw (little-endian) values."""
    crc = zlib.crc32(header_fields)
    for a in arrays:
        if a is not None:
            crc = zlib.crc32(a, crc)
    return crc


def _uvarint(x: int) -> bytes:
    """LEB128: 7 bits per byte, least significant group first, high bit set on every byte but the last."""
    out = bytearray()
    while x >= 0x80:
        out.append(x & 0x7F | 0x80)
        x >>= 7
    out.append(x)
    return bytes(out)


def _read_uvarint(raw: bytes, i: int, end: int) -> tuple[int, int]:
    """(value, next offset) of the LEB128 integer at raw[i:], which must end before `end`; -1 if it does not."""
    value = shift = 0
    while i < end and shift < 56:
        byte = raw[i]
        value |= (byte & 0x7F) << shift
        i, shift = i + 1, shift + 7
        if byte < 0x80:
            return value, i
    return -1, i


def _header(enc: int, dtype_code: int, param: int, numel: int, count: int, fingerprint: int) -> bytes:
    """Every header byte but the trailing CRC-32."""
    fixed = bytes([FORMAT_VERSION, enc, dtype_code, param]) + fingerprint.to_bytes(8, "little")
    return fixed + _uvarint(numel) + _uvarint(count)


def encode_sparse(
    indices: torch.Tensor,
    values: torch.Tensor,
    numel: int,
    base_fingerprint: int,
    *,
    encoding: str | None = None,
) -> dict[str, torch.Tensor]:
    """Encode the changed entries of one parameter as `{suffix: tensor}` (suffixes from `SUFFIXES`).

    `indices` are strictly increasing flat positions in [0, numel); `values` the new (finite) weight values there.
    The position encoding is the smallest for this tensor unless `encoding` forces one (see `ENCODINGS`).
    """
    numel = _as_int(numel, "numel")
    base_fingerprint = _as_int(base_fingerprint, "base_fingerprint")
    if not 0 <= numel < _MAX_NUMEL:
        raise RSTFormatError(f"encode_sparse: numel must be in [0, 2**48), got {numel}.")
    if not 0 <= base_fingerprint < _MAX_FINGERPRINT:
        raise RSTFormatError(
            f"encode_sparse: base_fingerprint must be in [0, 2**63) (from `tensor_fingerprint`), "
            f"got {base_fingerprint}."
        )
    if not isinstance(indices, torch.Tensor) or not isinstance(values, torch.Tensor):
        raise RSTFormatError("encode_sparse: indices and values must be torch tensors.")
    if indices.dim() != 1 or values.dim() != 1:
        raise RSTFormatError(
            f"encode_sparse: indices and values must be 1-D, got shapes {tuple(indices.shape)} and "
            f"{tuple(values.shape)}; flatten the parameter first."
        )
    if indices.dtype.is_floating_point or indices.dtype.is_complex or indices.dtype == torch.bool:
        raise RSTFormatError(f"encode_sparse: indices must be an integer tensor (int64), got {indices.dtype}.")
    if values.dtype not in _DTYPE_CODES:
        raise RSTFormatError(
            f"encode_sparse: values dtype {values.dtype} is not supported; use one of "
            f"{[str(d) for d in _DTYPE_CODES]} (the parameter's own dtype)."
        )
    count = indices.numel()
    if values.numel() != count:
        raise RSTFormatError(f"encode_sparse: {count} indices but {values.numel()} values; they must pair up.")
    pos = indices.detach().cpu().numpy().astype(np.int64, copy=False)
    if count:
        if pos[0] < 0 or pos[-1] >= numel:
            raise RSTFormatError(
                f"encode_sparse: indices must lie in [0, {numel}), got min {pos.min()} and max {pos.max()}."
            )
        steps = np.diff(pos)
        if steps.size and not (steps > 0).all():
            i = int(np.argmax(steps <= 0))
            raise RSTFormatError(
                f"encode_sparse: indices must be strictly increasing (sorted, no duplicates); "
                f"indices[{i}] = {pos[i]} is followed by {pos[i + 1]}."
            )
    val = values.detach().cpu().contiguous()
    if val.untyped_storage().nbytes() != val.nbytes:  # a view into a larger buffer: store only our entries
        val = val.clone()
    bits = val.view(_INT_VIEWS[val.dtype]).numpy()
    bad = _count_nonfinite(bits, val.dtype)
    if bad:
        raise RSTFormatError(
            f"encode_sparse: values contain {bad} NaN/inf entries; the weights diverged, so there is nothing valid "
            "to save (lower the learning rate or resume from a checkpoint)."
        )

    enc, param = _choose(pos, numel, encoding)
    if enc == _BITMASK:
        mask = np.zeros((numel + 7) // 8 * 8, np.uint8)
        mask[pos] = 1
        packed = np.packbits(mask, bitorder="little")
    elif enc == _ELIAS_FANO:
        packed = _ef_encode(pos, numel, param)
    elif enc == _GAP:
        packed = _gap_encode(pos, numel, param).view(np.uint8)
    else:
        packed = np.zeros(0, np.uint8)
    fields = _header(enc, _DTYPE_CODES[val.dtype], param, numel, count, base_fingerprint)
    crc = _crc(fields, packed, bits if count else None)
    idx = np.concatenate([np.frombuffer(fields + crc.to_bytes(4, "little"), np.uint8), packed])
    parts = {"idx": torch.from_numpy(idx)}
    if count:
        parts["val"] = val
    return parts


# ----------------------------------------------------------------------------------------------------------------
# decode

_REDO = "re-save the adapter from the trained model, or re-download the file if it was copied"


def _decode_positions(enc: int, param: int, packed: np.ndarray, numel: int, count: int, where) -> np.ndarray:
    """Positions as int64, checked to be strictly increasing within [0, numel) (by construction or explicitly)."""
    if enc == _EMPTY:
        return np.zeros(0, np.int64)
    if enc == _FULL:
        return np.arange(numel, dtype=np.int64)
    if enc == _BITMASK:  # increasing by construction
        pos = np.nonzero(np.unpackbits(packed, bitorder="little"))[0]
        if pos.size != count or (count and pos[-1] >= numel):
            raise where(f"the bitmask marks {pos.size} positions, not {count} below {numel}")
        return pos
    if enc == _ELIAS_FANO:  # non-decreasing by construction
        pos = _ef_decode(packed, numel, count, param, where)
        if count and (pos[-1] >= numel or not (pos[1:] > pos[:-1]).all()):
            raise where(f"positions are not strictly increasing within [0, {numel})")
        return pos
    words = packed.view(_uint_dtype(param // 8))
    gaps = words[:count].astype(np.int64)  # every gap >= 1, so increasing unless the int64 sum could overflow
    escapes = words[count:].view(_uint_dtype(_escape_nbytes(numel)))
    if escapes.size:
        if escapes.max() > numel or escapes.min() < (1 << param):
            raise where(f"an escaped gap is outside [2**{param}, {numel}]")
        gaps[gaps == 0] = escapes
    pos = np.cumsum(gaps) - 1
    overflow_possible = count * max(numel, 1 << param) >= 1 << 63
    if count and (pos[-1] >= numel or (overflow_possible and not (pos[1:] > pos[:-1]).all())):
        raise where(f"positions run past the tensor's {numel} entries")
    return pos


def _expected_pos_nbytes(enc: int, param: int, packed: np.ndarray, numel: int, count: int, where) -> int:
    if enc in (_EMPTY, _FULL):
        return 0
    if enc == _BITMASK:
        return (numel + 7) // 8
    if enc == _ELIAS_FANO:
        return _ef_nbytes(numel, count, param)
    word = param // 8
    if packed.nbytes < word * count:
        raise where(f"holds {packed.nbytes // word} gaps, fewer than the {count} entries: it is truncated")
    zeros = np.count_nonzero(packed[: word * count].view(_uint_dtype(word)) == 0)
    return word * count + int(zeros) * _escape_nbytes(numel)


def _host_array(t: torch.Tensor) -> np.ndarray:
    """A contiguous numpy view of a 1-D tensor (a copy only if it lives elsewhere or is strided)."""
    if t.is_cpu and t.is_contiguous():
        return t.numpy()
    return t.detach().cpu().contiguous().numpy()


def _parse_header(raw: bytes, name: str, where) -> tuple[int, int, int, int, int, int, int]:
    """(encoding, dtype code, parameter, fingerprint, numel, count, header length) of the bytes starting `idx`."""
    if raw[0] > FORMAT_VERSION:
        raise RSTFormatError(
            f"RST adapter tensor '{name}.idx' uses format version {raw[0]}, but this peft_rst reads versions up to "
            f"{FORMAT_VERSION}: upgrade peft_rst (pip install -U rst-cmkd) to load this adapter."
        )
    if raw[0] not in _READABLE_VERSIONS:
        raise where(f"format version {raw[0]} does not exist: the header is corrupted")
    if len(raw) < _MIN_HEADER_NBYTES:
        raise where(f"has {len(raw)} bytes, fewer than any version-{FORMAT_VERSION} header: it is truncated")
    numel, i = _read_uvarint(raw, 12, len(raw) - 4)
    count, i = _read_uvarint(raw, i, len(raw) - 4)
    if min(numel, count) < 0:
        raise where("the header's sizes do not parse (truncated or corrupted)")
    return raw[1], raw[2], raw[3], int.from_bytes(raw[4:12], "little"), numel, count, i + 4


@dataclass(frozen=True)
class HeaderInfo:
    """What the header at the start of `<key>.idx` says, readable without the base model (e.g. for reports)."""

    version: int
    encoding: str
    dtype: torch.dtype
    numel: int
    count: int
    base_fingerprint: int


def read_header(idx: torch.Tensor, name: str) -> HeaderInfo:
    """Parse the header of an `idx` part alone (no checksum or position checks: `decode_sparse` does those)."""

    def where_idx(problem: str) -> RSTFormatError:
        return RSTFormatError(f"RST adapter tensor '{name}.idx': {problem}; {_REDO}.")

    if not isinstance(idx, torch.Tensor):
        raise where_idx(f"expected a 1-D uint8 tensor, got a {type(idx).__name__}")
    if idx.dtype != torch.uint8 or idx.dim() != 1 or idx.numel() == 0:
        raise where_idx(f"expected a non-empty 1-D uint8 tensor, got {idx.dtype} of shape {tuple(idx.shape)}")
    raw = _host_array(idx)[:_MAX_HEADER_NBYTES].tobytes()
    enc, dtype_code, param, fingerprint, numel, count, _ = _parse_header(raw, name, where_idx)
    if enc not in _ENCODING_NAMES or dtype_code not in _CODE_DTYPES:
        raise where_idx(f"unknown encoding id {enc} or dtype code {dtype_code}: the header is corrupted")
    encoding = f"gap{param}" if enc == _GAP else _ENCODING_NAMES[enc]
    return HeaderInfo(raw[0], encoding, _CODE_DTYPES[dtype_code], numel, count, fingerprint)


def decode_sparse(parts: dict[str, torch.Tensor], numel: int, name: str) -> SparseTensorData:
    """Decode and fully validate what `encode_sparse` produced for the parameter `name` with `numel` entries."""

    def where_idx(problem: str) -> RSTFormatError:
        return RSTFormatError(f"RST adapter tensor '{name}.idx': {problem}; {_REDO}.")

    def where_val(problem: str) -> RSTFormatError:
        return RSTFormatError(f"RST adapter tensor '{name}.val': {problem}; {_REDO}.")

    unknown = sorted(set(parts) - set(SUFFIXES))
    if unknown:
        raise RSTFormatError(
            f"RST adapter tensor '{name}.{unknown[0]}': unknown part (known: {list(SUFFIXES)}); it was written by "
            "another tool or a newer peft_rst: upgrade peft_rst."
        )
    idx, val = parts.get("idx"), parts.get("val")
    if idx is None:
        raise where_idx("missing (every RST parameter has one)")
    if idx.dtype != torch.uint8 or idx.dim() != 1 or idx.numel() == 0:
        raise where_idx(f"expected a 1-D uint8 tensor, got {idx.dtype} of shape {tuple(idx.shape)}")
    arr = _host_array(idx)
    raw = arr[:_MAX_HEADER_NBYTES].tobytes()
    enc, dtype_code, param, fingerprint, saved_numel, count, hlen = _parse_header(raw, name, where_idx)
    packed = arr[hlen:]

    # Presence and types first, then the checksum: once it matches, what the header says is what the encoder
    # wrote, so any disagreement left is a real mismatch (wrong model) rather than corruption.
    if (val is None) != (count == 0):
        raise where_val(
            f"missing (the header records {count} changed entries)"
            if val is None
            else "present although the header records no changed entries"
        )
    bits = None
    if val is not None:
        if val.dtype not in _DTYPE_CODES or val.dim() != 1:
            raise where_val(f"expected a 1-D float tensor, got {val.dtype} of shape {tuple(val.shape)}")
        val = val if val.is_cpu and val.is_contiguous() else val.detach().cpu().contiguous()
        bits = val.view(_INT_VIEWS[val.dtype]).numpy()
    if _crc(raw[: hlen - 4], packed, bits) != int.from_bytes(raw[hlen - 4 : hlen], "little"):
        raise where_idx("checksum mismatch: the header, positions or values are truncated or corrupted")

    if saved_numel != numel:
        raise RSTFormatError(
            f"RST adapter tensor '{name}' was saved for a parameter with {saved_numel} entries, but the model's has "
            f"{numel}: load the adapter onto the base model architecture it was trained on."
        )
    if count > numel:
        raise where_idx(f"claims {count} changed entries in a tensor of {numel}: the header is corrupted")
    if enc not in _ENCODING_NAMES:
        raise where_idx(f"unknown position encoding id {enc}: the header is corrupted")
    if dtype_code not in _CODE_DTYPES:
        raise where_idx(f"unknown value dtype code {dtype_code}: the header is corrupted")
    ok_param = {_ELIAS_FANO: param <= 48, _GAP: param in (8, 16)}.get(enc, param == 0)
    ok_count = {_EMPTY: count == 0, _FULL: count == numel}.get(enc, True)
    if not (ok_param and ok_count and fingerprint < _MAX_FINGERPRINT):
        raise where_idx(f"inconsistent fields ({_ENCODING_NAMES[enc]}, parameter {param}, count {count})")
    dtype = _CODE_DTYPES[dtype_code]
    if val is not None and (val.dtype != dtype or val.numel() != count):
        raise where_val(f"expected {count} {dtype} values, got {val.numel()} {val.dtype} values")
    expected = _expected_pos_nbytes(enc, param, packed, numel, count, where_idx)
    if packed.nbytes != expected:
        raise where_idx(
            f"holds {packed.nbytes} bytes of positions, expected {expected}: the tensor is truncated or corrupted"
        )

    indices = _decode_positions(enc, param, packed, numel, count, where_idx)
    if val is None:
        val = torch.empty(0, dtype=dtype)
    elif _count_nonfinite(bits, dtype):
        raise where_val("contains NaN or inf values")
    return SparseTensorData(torch.from_numpy(indices), val, numel, fingerprint)


def encoded_nbytes(parts: dict[str, torch.Tensor]) -> int:
    """Bytes of tensor data in an encoded parameter (excluding the safetensors per-key JSON header)."""
    return sum(t.numel() * t.element_size() for t in parts.values())


# ----------------------------------------------------------------------------------------------------------------
# integrity record of a whole adapter file (format version 2)

INTEGRITY_KEY = "rst_integrity"  # no dot: peft's adapter-name handling leaves such a key alone
_RECORD_MAGIC = b"RSTI"
_NP_VIEWABLE = {torch.float32, torch.float16, torch.float64, torch.uint8, torch.int8, torch.int16, torch.int32}
_NP_VIEWABLE |= {torch.int64, torch.bool}
_DTYPE_NAMES = {
    torch.float32: "float32",
    torch.float16: "float16",
    torch.bfloat16: "bfloat16",
    torch.float64: "float64",
    torch.uint8: "uint8",
    torch.int8: "int8",
    torch.int16: "int16",
    torch.int32: "int32",
    torch.int64: "int64",
    torch.bool: "bool",
}


def _raw_bytes(t: torch.Tensor) -> np.ndarray:
    """The tensor's bytes in row-major order, as safetensors stores them (little-endian)."""
    if t.is_cpu and t.is_contiguous() and not t.requires_grad:
        return (
            t.numpy().reshape(-1).view(np.uint8) if t.dtype in _NP_VIEWABLE else t.view(-1).view(torch.uint8).numpy()
        )
    return t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()


def _nonfinite(t: torch.Tensor) -> int:
    """NaN/inf entries of a float tensor (numpy on the bit view: no per-call torch overhead for small tensors)."""
    if t.dtype not in _INT_VIEWS:
        return 0 if not t.dtype.is_floating_point else int(t.numel() - torch.isfinite(t.detach()).sum().item())
    bits = t.detach().cpu().contiguous().reshape(-1).view(_INT_VIEWS[t.dtype]).numpy()
    return _count_nonfinite(bits, t.dtype)


def integrity_record(tensors: dict[str, torch.Tensor]) -> torch.Tensor:
    """The `rst_integrity` tensor of a file holding `tensors` (keys as written to the file).

    Layout: b"RSTI", the format version byte, UTF-8 JSON `{key: [dtype, shape, crc32]}` (sorted keys, no spaces),
    then a CRC-32 of all bytes before it. The CRC-32 of a tensor is zlib's over its raw little-endian bytes.
    Non-finite float values are refused: they would make the adapter unusable.
    """
    entries = {}
    for key in sorted(tensors):
        t = tensors[key]
        if t.dtype not in _DTYPE_NAMES:
            raise RSTFormatError(f"Adapter tensor '{key}' has dtype {t.dtype}, which the RST format does not store.")
        bad = _nonfinite(t)
        if bad:
            raise RSTFormatError(
                f"Adapter tensor '{key}' holds {bad} NaN/inf values: the weights diverged, so there is nothing valid "
                "to save (lower the learning rate or resume from a checkpoint)."
            )
        entries[key] = [_DTYPE_NAMES[t.dtype], list(t.shape), zlib.crc32(_raw_bytes(t))]
    body = _RECORD_MAGIC + bytes([FORMAT_VERSION]) + json.dumps(entries, separators=(",", ":")).encode()
    body += zlib.crc32(body).to_bytes(4, "little")
    return torch.frombuffer(bytearray(body), dtype=torch.uint8)


def file_format_version(tensors: dict[str, torch.Tensor]) -> int:
    """Newest RST format version among the `idx` headers in a file's tensors (0 if there are none)."""
    versions = [
        int(t.numpy()[0]) if t.is_cpu else int(t[0])
        for key, t in tensors.items()
        if key.endswith(".idx")
        and isinstance(t, torch.Tensor)
        and t.dtype == torch.uint8
        and t.dim() == 1
        and t.numel()
    ]
    return max(versions, default=0)


def _parse_record(record: torch.Tensor, source: str) -> dict[str, list]:
    def bad(problem: str) -> RSTFormatError:
        return RSTFormatError(f"{source}: the '{INTEGRITY_KEY}' tensor {problem}; {_REDO}.")

    if not isinstance(record, torch.Tensor) or record.dtype != torch.uint8 or record.dim() != 1:
        raise bad(
            f"must be a 1-D uint8 tensor, got {getattr(record, 'dtype', type(record).__name__)} of shape "
            f"{tuple(getattr(record, 'shape', ()))}"
        )
    raw = _raw_bytes(record).tobytes()
    if len(raw) < 9 or raw[:4] != _RECORD_MAGIC:
        raise bad("does not start with the record marker b'RSTI'")
    if raw[4] > FORMAT_VERSION:
        raise RSTFormatError(
            f"{source}: the adapter file uses format version {raw[4]}, but this peft_rst reads versions up to "
            f"{FORMAT_VERSION}: upgrade peft_rst (pip install -U rst-cmkd) to load this adapter."
        )
    if zlib.crc32(raw[:-4]) != int.from_bytes(raw[-4:], "little"):
        raise bad("fails its checksum: it is truncated or corrupted")
    try:
        entries = json.loads(raw[5:-4].decode())
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise bad(f"does not parse ({err})") from err
    if not isinstance(entries, dict):
        raise bad("does not hold a JSON object")
    return entries


def integrity_key(tensors: dict, source: str) -> str | None:
    """The key of the file's `rst_integrity` record: `INTEGRITY_KEY`, or it under the prefix of every key (see
    `check_integrity`); None if the file has none."""
    found = [k for k in tensors if k == INTEGRITY_KEY or k.endswith(f".{INTEGRITY_KEY}")]
    if len(found) > 1:
        raise RSTFormatError(f"{source}: the adapter file holds {len(found)} integrity records {found[:3]}; {_REDO}.")
    return found[0] if found else None


def check_integrity(tensors: dict[str, torch.Tensor], source: str, *, rename=None) -> None:
    """Check every tensor of an adapter file against its `rst_integrity` record (and that floats are finite).

    `tensors` are the file's tensors, the record included under `INTEGRITY_KEY`. `rename` maps a key as written to
    the key it has in `tensors` (loaders move some keys, e.g. peft's `modules_to_save`). A writer that puts every key
    of the file under one prefix moves the record too (transformers' `save_pretrained` prepends `base_model.model.`
    to each key of an adapter): a record stored as `<prefix>rst_integrity` covers the tensors `<prefix><name>`.
    Files of format version 1 have no record: only the finite check applies to them. Raises `RSTFormatError` naming
    the tensor.
    """
    record_key = integrity_key(tensors, source)
    prefix = (record_key or INTEGRITY_KEY).removesuffix(INTEGRITY_KEY)
    rename = rename or (lambda key: key)
    record = tensors.get(record_key) if record_key is not None else None
    others = {k: t for k, t in tensors.items() if k != record_key}
    if record is None:
        version = file_format_version(others)
        if version >= 2:
            raise RSTFormatError(
                f"{source}: the adapter file is format version {version} but has no '{INTEGRITY_KEY}' tensor, which "
                f"covers every tensor of the file with a checksum; {_REDO}."
            )
        for key, t in others.items():
            if _nonfinite(t):
                raise RSTFormatError(f"{source}: adapter tensor '{key}' contains NaN or inf values; {_REDO}.")
        return
    entries = {prefix + k: entry for k, entry in _parse_record(record, source).items()}  # keys as in the file
    expected = {rename(k): k for k in entries}
    missing = sorted(expected.keys() - others.keys())
    if missing:
        raise RSTFormatError(
            f"{source}: {len(missing)} tensors listed in '{INTEGRITY_KEY}' are missing from the file (first: "
            f"{expected[missing[0]]}); {_REDO}."
        )
    extra = sorted(others.keys() - expected.keys())
    if extra:
        raise RSTFormatError(
            f"{source}: {len(extra)} tensors are not covered by the file's '{INTEGRITY_KEY}' checksums (first: "
            f"{extra[0]}): they were added or renamed after saving; {_REDO}."
        )
    for key, saved_key in expected.items():
        t = others[key]
        entry = entries[saved_key]
        if not (isinstance(entry, list) and len(entry) == 3):
            raise RSTFormatError(f"{source}: the '{INTEGRITY_KEY}' entry of '{saved_key}' is malformed; {_REDO}.")
        dtype, shape, crc = entry
        if _DTYPE_NAMES.get(t.dtype) != dtype or list(t.shape) != shape:
            raise RSTFormatError(
                f"{source}: adapter tensor '{saved_key}' is {t.dtype} of shape {tuple(t.shape)}, but was saved as "
                f"{dtype} of shape {tuple(shape) if isinstance(shape, list) else shape}; {_REDO}."
            )
        raw = _raw_bytes(t)
        if zlib.crc32(raw) != crc:
            raise RSTFormatError(
                f"{source}: adapter tensor '{saved_key}' fails its checksum: it is corrupted; {_REDO}."
            )
        if t.dtype in _INT_VIEWS and _count_nonfinite(raw.view(_NP_INTS[t.dtype]), t.dtype):
            raise RSTFormatError(f"{source}: adapter tensor '{saved_key}' contains NaN or inf values; {_REDO}.")
