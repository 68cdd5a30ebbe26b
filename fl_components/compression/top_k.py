"""Top-k sparsification: send the k largest-magnitude values and their indices.

Stich, Cordonnier & Jaggi 2018, "Sparsified SGD with Memory", NeurIPS (arXiv:1809.07599),
Definition 2.1: top_k(x) keeps the k coordinates of largest |x_i| and zeroes the rest; it is
a k/d-contraction (Lemma A.1), which is what error feedback
(:mod:`fl_components.compression.error_feedback`) needs to converge at SGD's rate.

Payload: the k indices, sorted, as uint32 little-endian, then their k values as float32
little-endian (8 bytes per kept value).
"""

from __future__ import annotations

import math

import numpy as np
import numpy.typing as npt

from fl_components.compression.encoded import CompressionError, EncodedUpdate, Method


def kept_count(dimension: int, fraction: float) -> int:
    """The number of values kept, ``ceil(fraction * d)``, at least 1 and at most d.

    Raises
    ------
    CompressionError
        If ``fraction`` is not in (0, 1].
    """
    if not 0 < fraction <= 1:
        raise CompressionError(f"compression.fraction must be in (0, 1] (got {fraction})")
    return min(dimension, max(1, math.ceil(fraction * dimension)))


def sparsify(update: npt.NDArray[np.floating], *, fraction: float) -> EncodedUpdate:
    """Keep the ``ceil(fraction * d)`` values of largest magnitude (ties: lower index first)."""
    values = np.asarray(update, dtype=np.float32).reshape(-1)
    k = kept_count(values.size, fraction)
    # A stable sort on -|x| breaks ties by index, so every platform keeps the same set.
    order = np.argsort(-np.abs(values), kind="stable")[:k]
    indices = np.sort(order).astype("<u4")
    payload = indices.tobytes() + values[indices].astype("<f4").tobytes()
    return EncodedUpdate(
        method=Method.TOP_K, dimension=values.size, count=k, bits=32, bucket=0, payload=payload
    )


def densify(message: EncodedUpdate) -> npt.NDArray[np.float32]:
    """The dense float32 vector of a top-k message (zeros off the kept indices).

    Raises
    ------
    CompressionError
        If the message is not top-k, its length is wrong, or an index is out of range.
    """
    if message.method != Method.TOP_K:
        raise CompressionError(f"expected a TOP_K message, got {message.method.name}")
    k, d = message.count, message.dimension
    if len(message.payload) != 8 * k:
        raise CompressionError(
            f"top-k payload holds {len(message.payload)} bytes; k={k} needs {8 * k}"
        )
    indices = np.frombuffer(message.payload[: 4 * k], dtype="<u4")
    if k and int(indices.max()) >= d:
        raise CompressionError(f"top-k index {int(indices.max())} is out of range for d={d}")
    dense = np.zeros(d, dtype=np.float32)
    dense[indices] = np.frombuffer(message.payload[4 * k :], dtype="<f4")
    return dense
