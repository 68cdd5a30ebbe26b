"""Stochastic uniform quantization to b bits per value, unbiased.

Alistarh, Grubic, Li, Tomioka & Vojnovic 2017, "QSGD: Communication-Efficient SGD via
Gradient Quantization and Encoding", NeurIPS (arXiv:1610.02132), Section 3.1:
Q_s(v_i) = ||v|| * sgn(v_i) * xi_i(v, s), where xi_i is l/s or (l + 1)/s with
l = floor(s |v_i| / ||v||), the upper level taken with probability s |v_i| / ||v|| - l.
Lemma 3.1: E[Q_s(v)] = v. As in the paper's experiments we quantize buckets of ``bucket``
consecutive values, each with its own scale; the scale here is the bucket's max-norm
max_i |v_i| rather than its 2-norm (the proof of unbiasedness only needs |v_i| <= scale, and
the max-norm gives finer levels). With b bits, s = 2^(b-1) - 1 levels a side, and the signed
level l in [-s, s] travels as l + s in b bits.

Payload: per bucket one float32 scale (little-endian), then the d levels packed b bits each
(:mod:`fl_components.secure_aggregation.protocol.packing`).
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from fl_components.compression.encoded import CompressionError, EncodedUpdate, Method
from fl_components.secure_aggregation.protocol.packing import pack, packed_size, unpack

MIN_BITS, MAX_BITS = 2, 16
DEFAULT_BUCKET = 512


def levels(bits: int) -> int:
    """s: quantization levels on each side of zero for ``bits`` bits, ``2^(bits-1) - 1``."""
    return (1 << (bits - 1)) - 1


def _check(bits: int, bucket: int) -> None:
    if not MIN_BITS <= bits <= MAX_BITS:
        raise CompressionError(
            f"compression.bits must be in [{MIN_BITS}, {MAX_BITS}] for QSGD (got {bits})"
        )
    if bucket < 1:
        raise CompressionError(f"compression.bucket_size must be >= 1 (got {bucket})")


def _scales(values: npt.NDArray[np.float64], bucket: int) -> npt.NDArray[np.float32]:
    padded = np.zeros(-(-values.size // bucket) * bucket)
    padded[: values.size] = np.abs(values)
    # float32 on the wire, so round the scale up: every |v_i| / scale stays <= 1.
    scales = padded.reshape(-1, bucket).max(axis=1).astype(np.float32)
    return np.nextafter(scales, np.float32(np.inf), where=scales > 0, out=scales)


def quantize(
    update: npt.NDArray[np.floating],
    *,
    bits: int,
    rng: np.random.Generator,
    bucket: int = DEFAULT_BUCKET,
) -> EncodedUpdate:
    """Quantize ``update`` (flattened) to ``bits`` bits per value, unbiasedly.

    Raises
    ------
    CompressionError
        If ``bits`` or ``bucket`` is out of range or the update holds NaN or infinity.
    """
    _check(bits, bucket)
    values = np.asarray(update, dtype=np.float64).reshape(-1)
    if not np.isfinite(values).all():
        raise CompressionError(
            "update holds NaN or infinite values; fix training (lower the learning rate) "
            "before compressing"
        )
    s = levels(bits)
    scales = _scales(values, bucket)
    per_value = np.repeat(scales.astype(np.float64), bucket)[: values.size]
    safe = np.where(per_value > 0, per_value, 1.0)
    magnitude = np.abs(values) / safe * s  # in [0, s]
    lower = np.floor(magnitude)
    upper = rng.random(values.size) < (magnitude - lower)  # P(l + 1) = s|v|/scale - l
    level = np.minimum(lower + upper, s) * np.sign(values)
    codes = (level + s).astype(np.uint32)
    payload = scales.astype("<f4").tobytes() + pack(codes, bits)
    return EncodedUpdate(
        method=Method.QSGD,
        dimension=values.size,
        count=values.size,
        bits=bits,
        bucket=bucket,
        payload=payload,
    )


def dequantize(message: EncodedUpdate) -> npt.NDArray[np.float32]:
    """Rebuild the dense float32 vector Q_s(v) from a QSGD message.

    Raises
    ------
    CompressionError
        If the message is not QSGD or its payload length does not match its frame.
    """
    if message.method != Method.QSGD:
        raise CompressionError(f"expected a QSGD message, got {message.method.name}")
    _check(message.bits, message.bucket)
    d, bits, bucket = message.dimension, message.bits, message.bucket
    n_buckets = -(-d // bucket)
    expected = 4 * n_buckets + packed_size(d, bits)
    if len(message.payload) != expected or message.count != d:
        raise CompressionError(
            f"QSGD payload holds {len(message.payload)} bytes; d={d}, bits={bits}, "
            f"bucket={bucket} need {expected}"
        )
    scales = np.frombuffer(message.payload[: 4 * n_buckets], dtype="<f4").astype(np.float64)
    codes = unpack(memoryview(message.payload)[4 * n_buckets :], count=d, bits=bits)
    s = levels(bits)
    level = codes.astype(np.float64) - s
    return (level / s * np.repeat(scales, bucket)[:d]).astype(np.float32)


def variance_bound(update: npt.NDArray[np.floating], *, bits: int, bucket: int) -> float:
    """Per-coordinate variance bound of Q_s: ``(scale / s)^2 / 4`` for the largest scale.

    Each value is rounded between two levels ``scale / s`` apart; a two-point variable on an
    interval of width w has variance at most ``w^2 / 4``.
    """
    values = np.asarray(update, dtype=np.float64).reshape(-1)
    top = float(_scales(values, bucket).max()) if values.size else 0.0
    return (top / levels(bits)) ** 2 / 4
