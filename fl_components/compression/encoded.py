"""The wire format of a compressed update: one typed message, an exact byte count.

Every encoder in this package returns an :class:`EncodedUpdate`; ``len(to_bytes())`` is what
crosses the wire, framing included, and is what ``bytes/up`` reports. Layout (no pickle)::

    b"FPCU" | version u8 | method u8 | bits u8 | reserved u8 | dimension u32 BE
            | count u32 BE | bucket u32 BE | payload length u64 BE | payload

``dimension`` is d (the dense length), ``count`` the number of values carried, ``bits`` the
bits per quantized value (32 for float32 values) and ``bucket`` the quantization bucket (0
when unused). What the payload holds depends on the method; each method's module documents
its payload and decodes it.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass
from typing import Self

from fl_components.errors import FedpipeError

MAGIC = b"FPCU"
VERSION = 1
_HEAD = struct.Struct(">4sBBBBIIIQ")
FRAME_BYTES = _HEAD.size  # 28


class CompressionError(FedpipeError):
    """A compressed update is malformed, or its settings are out of range."""


class Method(enum.IntEnum):
    """How an update was compressed (the byte on the wire)."""

    DENSE = 0  # float32, uncompressed
    QSGD = 1
    TOP_K = 2
    RANDOM_K = 3


@dataclass(frozen=True, eq=False)
class EncodedUpdate:
    """A compressed update as it travels.

    Attributes
    ----------
    method : Method
        The encoder that produced it.
    dimension : int
        d, the length of the dense update it stands for.
    count : int
        Values carried (d for dense and QSGD, k for the sparsifiers).
    bits : int
        Bits per carried value (32: float32).
    bucket : int
        QSGD bucket size (0 for the other methods).
    payload : bytes
        Method-specific body.
    """

    method: Method
    dimension: int
    count: int
    bits: int
    bucket: int
    payload: bytes

    @property
    def nbytes(self) -> int:
        """Exact bytes on the wire, framing included (``len(self.to_bytes())``)."""
        return FRAME_BYTES + len(self.payload)

    def to_bytes(self) -> bytes:
        """Serialize: fixed 28-byte frame, then the payload."""
        head = _HEAD.pack(
            MAGIC,
            VERSION,
            int(self.method),
            self.bits,
            0,
            self.dimension,
            self.count,
            self.bucket,
            len(self.payload),
        )
        return head + self.payload

    @classmethod
    def from_bytes(cls, data: bytes) -> Self:
        """Parse bytes written by :meth:`to_bytes`.

        Raises
        ------
        CompressionError
            On a bad magic, version, method or length.
        """
        if len(data) < FRAME_BYTES:
            raise CompressionError(
                f"compressed update has {len(data)} bytes, fewer than its {FRAME_BYTES}-byte "
                "frame; the message was truncated"
            )
        magic, version, method, bits, _, dimension, count, bucket, length = _HEAD.unpack_from(data)
        if magic != MAGIC or version != VERSION:
            raise CompressionError(
                f"not a fedpipe compressed update v{VERSION} (magic {magic!r}, version "
                f"{version}); site and coordinator run different fedpipe versions"
            )
        if method not in set(Method):
            raise CompressionError(f"unknown compression method byte {method}")
        if length != len(data) - FRAME_BYTES:
            raise CompressionError(
                f"compressed update says {length} payload bytes but carries "
                f"{len(data) - FRAME_BYTES}; the message was truncated or padded"
            )
        return cls(
            method=Method(method),
            dimension=dimension,
            count=count,
            bits=bits,
            bucket=bucket,
            payload=bytes(data[FRAME_BYTES:]),
        )
