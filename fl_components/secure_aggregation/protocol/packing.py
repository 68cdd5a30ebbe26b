"""Bit packing of m-bit integers: a masked value in Z_2^m costs m bits on the wire, not 32.

Bonawitz et al. 2017, "Practical Secure Aggregation for Privacy-Preserving Machine
Learning", CCS (arXiv:1611.04482), Section 3 works in Z_R for any R; with R = 2^m the low m
bits of a uniform uint32 mask are uniform in Z_2^m, so a masked value reduced mod 2^m is
still a one-time pad of its input and can be sent in m bits. Values are packed
little-endian at the bit level: bit j of value i is bit ``i * m + j`` of the stream, and
the stream is cut into bytes least significant bit first (``numpy.packbits(...,
bitorder="little")``); the last byte is padded with zeros.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

MAX_BITS = 32


def packed_size(count: int, bits: int) -> int:
    """Bytes needed for ``count`` values of ``bits`` bits: ``ceil(count * bits / 8)``."""
    return (count * bits + 7) // 8


def _check_bits(bits: int) -> None:
    if not 1 <= bits <= MAX_BITS:
        raise ValueError(f"bits per packed value must be in [1, {MAX_BITS}] (got {bits})")


def pack(values: npt.NDArray[np.unsignedinteger], bits: int) -> bytes:
    """Pack unsigned integers below ``2^bits`` into ``packed_size(len(values), bits)`` bytes.

    Raises
    ------
    ValueError
        If ``bits`` is outside [1, 32] or a value needs more than ``bits`` bits.
    """
    _check_bits(bits)
    words = np.ascontiguousarray(values, dtype=np.uint32).reshape(-1)
    if words.size and bits < MAX_BITS and int(words.max()) >> bits:
        raise ValueError(f"a value ({int(words.max())}) does not fit in {bits} bits")
    if bits in (8, 16, 32):  # byte-aligned: a little-endian cast is the packing
        return words.astype(f"<u{bits // 8}").tobytes()
    shifts = np.arange(bits, dtype=np.uint32)
    stream = ((words[:, None] >> shifts) & 1).astype(np.uint8)
    return np.packbits(stream.reshape(-1), bitorder="little").tobytes()


def unpack(data: bytes | memoryview, *, count: int, bits: int) -> npt.NDArray[np.uint32]:
    """Inverse of :func:`pack`: ``count`` values of ``bits`` bits as uint32.

    Raises
    ------
    ValueError
        If ``data`` is not exactly ``packed_size(count, bits)`` bytes.
    """
    _check_bits(bits)
    expected = packed_size(count, bits)
    if len(data) != expected:
        raise ValueError(
            f"packed data holds {len(data)} bytes; {count} values of {bits} bits need {expected}"
        )
    raw = np.frombuffer(data, dtype=np.uint8)
    if bits in (8, 16, 32):
        return np.frombuffer(data, dtype=f"<u{bits // 8}").astype(np.uint32)
    stream = np.unpackbits(raw, count=count * bits, bitorder="little").reshape(count, bits)
    weights = (np.uint32(1) << np.arange(bits, dtype=np.uint32)).astype(np.uint32)
    return (stream.astype(np.uint32) * weights).sum(axis=1, dtype=np.uint32)
