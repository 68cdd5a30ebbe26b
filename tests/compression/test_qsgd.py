"""QSGD: unbiased, within its variance bound, exact byte counts, round trip of the frame."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from fl_components.compression import EncodedUpdate, decode_update
from fl_components.compression.encoded import FRAME_BYTES, CompressionError
from fl_components.compression.qsgd import dequantize, levels, quantize, variance_bound


def test_levels_per_bits() -> None:
    assert [levels(b) for b in (2, 4, 8)] == [1, 7, 127]


def test_byte_count_is_frame_scales_and_packed_levels() -> None:
    # d = 1000, 4 bits, buckets of 512: 28 frame + 2 * 4 scale + 1000 * 4 / 8 levels = 536.
    message = quantize(np.ones(1000), bits=4, rng=np.random.default_rng(0), bucket=512)
    assert message.nbytes == 536 == len(message.to_bytes())
    assert FRAME_BYTES == 28


def test_zero_and_extreme_values_are_exact() -> None:
    zeros = quantize(np.zeros(5), bits=4, rng=np.random.default_rng(0), bucket=4)
    np.testing.assert_array_equal(dequantize(zeros), np.zeros(5))
    # The largest |v| of a bucket sits one float32 ulp under the top level: it rounds up
    # with probability 1 - 2^-23 per draw, so the seeded draw lands on scale exactly.
    message = quantize(np.array([2.0, -2.0]), bits=4, rng=np.random.default_rng(0), bucket=2)
    np.testing.assert_allclose(dequantize(message), [2.0, -2.0], rtol=1e-6)


def test_unbiased_mean_within_its_bound() -> None:
    v = np.random.default_rng(7).normal(size=64)
    rng = np.random.default_rng(11)
    draws = 4000
    total = np.zeros(64)
    for _ in range(draws):
        total += dequantize(quantize(v, bits=3, rng=rng, bucket=16))
    mean = total / draws
    # Each draw's error has variance <= (scale/s)^2/4 per coordinate; 5 standard errors.
    bound = 5 * np.sqrt(variance_bound(v, bits=3, bucket=16) / draws)
    assert np.abs(mean - v).max() <= bound
    assert bound < 0.06  # the bound is tight enough to mean something


def test_rejects_bad_settings_and_values() -> None:
    rng = np.random.default_rng(0)
    with pytest.raises(CompressionError, match=r"compression\.bits"):
        quantize(np.ones(3), bits=1, rng=rng)
    with pytest.raises(CompressionError, match="NaN"):
        quantize(np.array([np.nan]), bits=4, rng=rng)


def test_truncated_message_is_refused() -> None:
    data = quantize(np.ones(10), bits=4, rng=np.random.default_rng(0)).to_bytes()
    with pytest.raises(CompressionError, match="truncated"):
        EncodedUpdate.from_bytes(data[:-1])


@settings(max_examples=50, deadline=None)
@given(
    values=arrays(np.float64, st.integers(1, 300), elements=st.floats(-1e3, 1e3)),
    bits=st.integers(2, 16),
    bucket=st.integers(1, 64),
)
def test_round_trip_error_is_below_one_level(values: np.ndarray, bits: int, bucket: int) -> None:
    message = quantize(values, bits=bits, rng=np.random.default_rng(1), bucket=bucket)
    decoded = decode_update(EncodedUpdate.from_bytes(message.to_bytes()))
    padded = np.zeros(-(-values.size // bucket) * bucket)
    padded[: values.size] = np.abs(values)
    step = np.repeat(padded.reshape(-1, bucket).max(axis=1), bucket)[: values.size] / levels(bits)
    assert np.all(np.abs(decoded - values) <= step * (1 + 1e-5) + 1e-30)
    assert message.nbytes == len(message.to_bytes())
