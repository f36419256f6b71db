#!/usr/bin/python3
"""Writes the safetensors fixtures of tests/test_io.cpp with an independent writer.

The writer below follows the public safetensors description only (8-byte little-endian header length,
JSON header, row-major little-endian data) and uses the Python standard library and numpy; it shares no
code with the C++ library. Run with Debian's /usr/bin/python3 (python3-numpy):

    /usr/bin/python3 tests/data/make_io_fixtures.py

Outputs, under tests/data/io/:
  dtypes.safetensors      the same values as F64, F32, F16 and BF16, a 1-D, a scalar, an empty and an
                          integer tensor, with extra __metadata__ and a padded header
  dtypes_expected.json    the exact decoded value of every element (float64, repr round-trips)
  bad/*.safetensors       one malformed file per rule a reader must enforce (listed in BAD below)
"""
import json
import os
import struct
from fractions import Fraction

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(HERE, "io")


def bf16_bits(values):
    """float32 -> bfloat16 bit patterns, round to nearest even (no NaN in the inputs)."""
    u = np.atleast_1d(np.asarray(values, dtype=np.float32)).view(np.uint32).astype(np.uint64)
    c16, c1, bias = np.uint64(16), np.uint64(1), np.uint64(0x7FFF)
    rounded = ((u + bias + ((u >> c16) & c1)) >> c16).reshape(np.shape(values))
    return rounded.astype(np.uint16)


def bf16_decode(bits):
    return (bits.astype(np.uint32) << 16).view(np.float32).astype(np.float64)


def nearest_even(x, bits, decode):
    """Among the candidate bit patterns, the one whose value is nearest to x (exactly); ties to even."""
    target = Fraction(x)
    best = min(bits, key=lambda b: (abs(Fraction(float(decode(b))) - target), b & 1))
    return best


def round_16bit(values, kind):
    """float64 -> F16 or BF16 bit patterns, correctly rounded from the double (no double rounding)."""
    flat = np.asarray(values, dtype=np.float64).ravel()
    out = []
    for x in flat:
        if kind == "F16":
            guess = int(np.array([x]).astype(np.float16).view(np.uint16)[0])
            decode = lambda b: np.array([b], dtype=np.uint16).view(np.float16)[0]
        else:
            guess = int(bf16_bits(np.float32(x)).ravel()[0])
            decode = lambda b: bf16_decode(np.array([b], dtype=np.uint16))[0]
        sign = guess & 0x8000
        mag = guess & 0x7FFF
        candidates = [sign | m for m in (mag - 1, mag, mag + 1) if 0 <= m < 0x7C00 or (kind == "BF16" and 0 <= m < 0x7F80)]
        out.append(nearest_even(x, candidates, decode))
    return np.array(out, dtype=np.uint16).reshape(np.shape(values))


def tensor_bytes(array, dtype):
    """Row-major little-endian bytes of `array` stored as a safetensors dtype."""
    a = np.ascontiguousarray(array)
    if dtype == "F64":
        return a.astype("<f8").tobytes()
    if dtype == "F32":
        return a.astype("<f4").tobytes()
    if dtype == "F16":
        return round_16bit(a, "F16").astype("<u2").tobytes()
    if dtype == "BF16":
        return round_16bit(a, "BF16").astype("<u2").tobytes()
    if dtype == "I64":
        return a.astype("<i8").tobytes()
    raise ValueError(dtype)


def safetensors_bytes(tensors, metadata=None, pad=True):
    """tensors: list of (name, dtype, shape, raw bytes), laid out in the given order."""
    header = {}
    if metadata is not None:
        header["__metadata__"] = metadata
    offset = 0
    for name, dtype, shape, raw in tensors:
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + len(raw)]}
        offset += len(raw)
    text = json.dumps(header).encode("utf-8")
    if pad:
        text += b" " * ((8 - len(text) % 8) % 8)
    return struct.pack("<Q", len(text)) + text + b"".join(raw for _, _, _, raw in tensors)


def write_safetensors(path, tensors, metadata=None):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(safetensors_bytes(tensors, metadata))


def raw_file(header_text, data=b"", length=None):
    """A file with a literal header (for malformed cases); `length` overrides the header length field."""
    h = header_text.encode("utf-8") if isinstance(header_text, str) else header_text
    n = len(h) if length is None else length
    return struct.pack("<Q", n) + h + data


def dtype_fixture():
    # Values chosen to exercise rounding: thirds, a half-precision subnormal, the F16 maximum, -0.0, and
    # in the last column doubles just above a 16-bit midpoint, which double -> float -> 16 bit rounds
    # the wrong way (F16 midpoint 1 + 2^-11, BF16 midpoint 1 + 2^-8).
    tiny = 2.0 ** -40
    src = np.array([[1.0, -2.5, 1.0 / 3.0, 65504.0, 1.0 + 2.0 ** -11 + tiny],
                    [6.0e-8, -0.0, 1234.5678, -7.0e-3, 1.0 + 2.0 ** -8 + tiny],
                    [0.1, 3.0e-5, -1.0e4, 2.0 ** -14, -(1.0 + 2.0 ** -11 + tiny)]], dtype=np.float64)
    f32 = src.astype(np.float32)
    tensors = [
        ("m_f64", "F64", src.shape, tensor_bytes(src, "F64")),
        ("m_f32", "F32", src.shape, tensor_bytes(f32, "F32")),
        ("m_f16", "F16", src.shape, tensor_bytes(src, "F16")),
        ("m_bf16", "BF16", src.shape, tensor_bytes(src, "BF16")),
        ("v_f32", "F32", (5,), tensor_bytes(np.arange(5, dtype=np.float32) - 2.0, "F32")),
        ("scalar", "F32", (), tensor_bytes(np.array(3.25, dtype=np.float32), "F32")),
        ("empty", "F32", (0, 3), b""),
        ("ints", "I64", (2, 2), tensor_bytes(np.array([[1, -2], [3, 4]]), "I64")),
    ]
    write_safetensors(os.path.join(OUT, "dtypes.safetensors"), tensors,
                      metadata={"format": "pt", "note": "fixture"})
    expected = {
        "m_f64": src.ravel().tolist(),
        "m_f32": f32.astype(np.float64).ravel().tolist(),
        "m_f16": round_16bit(src, "F16").view(np.float16).astype(np.float64).ravel().tolist(),
        "m_bf16": bf16_decode(round_16bit(src, "BF16")).ravel().tolist(),
        "v_f32": [-2.0, -1.0, 0.0, 1.0, 2.0],
        "scalar": [3.25],
    }
    with open(os.path.join(OUT, "dtypes_expected.json"), "w") as f:
        json.dump(expected, f, indent=1)
        f.write("\n")


def entry(dtype, shape, begin, end):
    return {"dtype": dtype, "shape": shape, "data_offsets": [begin, end]}


def bad_fixtures():
    good = safetensors_bytes([("a", "F32", (2, 2), tensor_bytes(np.ones((2, 2)), "F32")),
                              ("b", "F32", (3,), tensor_bytes(np.arange(3), "F32"))], {"format": "pt"})
    d16 = bytes(16)
    bad = {
        # name: (bytes, what is wrong)
        "short": (b"\x10\x00\x00\x00\x00", "fewer than 8 bytes"),
        "truncated": (good[:-5], "data section shorter than the offsets"),
        "header_past_end": (raw_file('{"a":' + json.dumps(entry("F32", [2], 0, 8)) + "}", bytes(8), length=500),
                            "header length larger than the file"),
        "header_huge": (raw_file("{}", length=1 << 63), "header length 2^63"),
        "not_json": (raw_file("{not json}      "), "header is not JSON"),
        "not_object": (raw_file("[1, 2, 3]       "), "header is not an object"),
        "bad_utf8": (raw_file(b'{"\xff\xfe":' + json.dumps(entry("F32", [0], 0, 0)).encode() + b"}"),
                     "invalid UTF-8 in a name"),
        "unknown_dtype": (raw_file(json.dumps({"a": entry("F7", [2], 0, 8)}), bytes(8)), "unknown dtype"),
        "size_mismatch": (raw_file(json.dumps({"a": entry("F32", [2, 3], 0, 16)}), d16),
                          "shape x dtype size != data_offsets span"),
        "overlap": (raw_file(json.dumps({"a": entry("F32", [4], 0, 16), "b": entry("F32", [2], 8, 16)}), d16),
                    "overlapping offsets"),
        "hole": (raw_file(json.dumps({"a": entry("F32", [2], 0, 8), "b": entry("F32", [1], 12, 16)}), d16),
                 "a hole between tensors"),
        "trailing": (raw_file(json.dumps({"a": entry("F32", [2], 0, 8)}), d16), "bytes after the last tensor"),
        "past_data": (raw_file(json.dumps({"a": entry("F32", [4], 0, 16), "b": entry("F32", [2], 16, 24)}), d16),
                      "offsets past the data section"),
        "reversed": (raw_file(json.dumps({"a": entry("F32", [0], 8, 0)}), bytes(8)), "end before begin"),
        "duplicate": (raw_file('{"a":' + json.dumps(entry("F32", [2], 0, 8)) + ',"a":' +
                               json.dumps(entry("F32", [2], 8, 16)) + "}", d16), "a name twice"),
        "negative_dim": (raw_file(json.dumps({"a": entry("F32", [-1, 2], 0, 8)}), bytes(8)), "negative dimension"),
        "float_dim": (raw_file(json.dumps({"a": entry("F32", [2.0], 0, 8)}), bytes(8)), "non-integer dimension"),
        "overflow": (raw_file(json.dumps({"a": entry("F32", [1 << 40, 1 << 40, 1 << 40], 0, 8)}), bytes(8)),
                     "element count overflows"),
        "missing_field": (raw_file(json.dumps({"a": {"dtype": "F32", "shape": [2]}}), bytes(8)),
                          "no data_offsets"),
        "extra_field": (raw_file(json.dumps({"a": dict(entry("F32", [2], 0, 8), extra=1)}), bytes(8)),
                        "an unknown field"),
        "three_offsets": (raw_file(json.dumps({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8, 8]}}),
                                   bytes(8)), "data_offsets with 3 entries"),
        "metadata_not_string": (raw_file(json.dumps({"__metadata__": {"format": 1}})), "metadata value not a string"),
        "nan": (safetensors_bytes([("a", "F32", (2,), tensor_bytes(np.array([1.0, np.nan]), "F32"))]),
                "a NaN value (valid file, refused on conversion)"),
    }
    os.makedirs(os.path.join(OUT, "bad"), exist_ok=True)
    for name, (data, _) in bad.items():
        with open(os.path.join(OUT, "bad", name + ".safetensors"), "wb") as f:
            f.write(data)
    with open(os.path.join(OUT, "bad", "README"), "w") as f:
        f.write("Malformed safetensors files written by tests/data/make_io_fixtures.py; one fault each:\n")
        for name, (_, why) in bad.items():
            f.write("  %-20s %s\n" % (name + ".safetensors", why))


if __name__ == "__main__":
    dtype_fixture()
    bad_fixtures()
