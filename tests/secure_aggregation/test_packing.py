"""Packed masked updates in Z_2^m: exact sums, exact byte counts, default format unchanged."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fl_components.compression.secure import scatter_secure_sum, secure_shape, select_for_secure
from fl_components.config import CompressionConfig
from fl_components.secure_aggregation.protocol import MaskedUpdate, SecAggCoordinator
from fl_components.secure_aggregation.protocol.errors import ContextMismatchError
from fl_components.secure_aggregation.protocol.packing import pack, packed_size, unpack

from .federation import Federation, random_updates


def test_hand_worked_packing_of_three_bit_values() -> None:
    # 5, 3, 7 as bit streams LSB first: 1,0,1 | 1,1,0 | 1,1,1. Byte 0 holds bits 0..7
    # (bit 0 first): 0b11011101; byte 1 holds the last bit, zero-padded: 0b00000001.
    assert pack(np.array([5, 3, 7]), 3) == bytes([0b11011101, 0b00000001])
    np.testing.assert_array_equal(unpack(bytes([0b11011101, 1]), count=3, bits=3), [5, 3, 7])
    assert packed_size(1_000_000, 11) == 1_375_000
    with pytest.raises(ValueError, match="does not fit"):
        pack(np.array([8]), 3)


@settings(max_examples=60, deadline=None)
@given(bits=st.integers(1, 32), count=st.integers(0, 200), seed=st.integers(0, 100))
def test_pack_round_trip(bits: int, count: int, seed: int) -> None:
    values = np.random.default_rng(seed).integers(0, 2**bits, size=count, dtype=np.uint64)
    data = pack(values.astype(np.uint32), bits)
    assert len(data) == packed_size(count, bits)
    np.testing.assert_array_equal(unpack(data, count=count, bits=bits), values)


@pytest.mark.parametrize(("bits", "dropped"), [(4, ()), (8, ("site-002", "site-005"))])
def test_packed_sum_is_exactly_the_sum_of_the_quantized_values(
    bits: int, dropped: tuple[str, ...]
) -> None:
    fed = Federation.make(8, seed=40)
    ctx = fed.context(dimension=300, threshold=5, compressed_bits=bits)
    assert ctx.field_bits == bits + 3
    updates = random_updates(fed.sites, 300, seed=1, scale=1.5)
    result = fed.run_round(ctx, updates, drop_before_mask=dropped)
    # The participants' rounding noise is seeded (seed + index): redo their quantization.
    survivors = [s for s in fed.sites if s not in dropped]
    quantized = sum(
        ctx.quantizer.quantize(
            updates[s], rng=np.random.default_rng(40 + fed.sites.index(s))
        ).astype(np.int64)
        for s in survivors
    )
    expected = ctx.quantizer.dequantize_sum(quantized.astype(np.uint32), count=len(survivors))
    np.testing.assert_array_equal(result.total, expected)


def test_packed_upload_costs_b_plus_log2_n_bits_per_value() -> None:
    fed = Federation.make(10)
    d = 100_000
    ctx = fed.context(dimension=d, compressed_bits=8)  # m = 8 + 4 = 12 bits
    message = fed.participants[fed.sites[0]].mask_update(ctx, np.zeros(d))
    raw = message.to_bytes()
    assert len(raw) - packed_size(d, 12) < 3000  # header: shares and commitments
    again = MaskedUpdate.from_bytes(raw)
    np.testing.assert_array_equal(again.masked, message.masked)
    assert again.field_bits == 12 and again.to_bytes() == raw
    result = fed.run_round(ctx, random_updates(fed.sites, d, seed=0))
    assert result.stats.bytes_up / (d * 10) == pytest.approx(1.5, abs=0.02)  # 12 bits


def test_uncompressed_wire_format_has_no_field_bits() -> None:
    fed = Federation.make(3)
    message = fed.participants[fed.sites[0]].mask_update(fed.context(dimension=4), np.ones(4))
    raw = message.to_bytes()
    assert b"field_bits" not in raw and message.field_bits == 32
    header_end = 9 + int.from_bytes(raw[5:9], "big")
    array_len = int.from_bytes(raw[header_end : header_end + 8], "big")
    assert array_len == 16  # four raw uint32 words, as before compression existed
    assert raw[header_end + 8 : header_end + 24] == message.masked.astype("<u4").tobytes()


def test_coordinator_refuses_an_update_in_another_group() -> None:
    fed = Federation.make(4)
    packed = fed.context(dimension=10, compressed_bits=4)
    plain = fed.context(dimension=10)
    message = fed.participants[fed.sites[0]].mask_update(plain, np.ones(10))
    with pytest.raises(ContextMismatchError, match="Z_2\\^32"):
        SecAggCoordinator(packed, fed.registry).receive(message.to_bytes())


def test_shared_random_k_under_secure_aggregation_masks_only_k_values() -> None:
    config = CompressionConfig(method="random_k", fraction=0.1, bits=8, error_feedback=False)
    fed = Federation.make(6)
    d = 1000
    shape = secure_shape(config, n=6, dimension=d)
    assert (shape.dimension, shape.bits, shape.field_bits) == (100, 8, 11)
    ctx = fed.context(dimension=shape.dimension, threshold=4, compressed_bits=8)
    updates = random_updates(fed.sites, d, seed=3, scale=0.9)
    selected = {
        s: select_for_secure(u, config=config, run_id=ctx.run_id, round=1, residual=np.zeros(d))[0]
        for s, u in updates.items()
    }
    result = fed.run_round(ctx, selected, drop_before_mask=[fed.sites[4]])
    dense = scatter_secure_sum(result.total, config=config, run_id=ctx.run_id, round=1, dimension=d)
    kept = np.flatnonzero(dense)
    assert kept.size == 100
    survivors = [s for s in fed.sites if s != fed.sites[4]]
    expected = sum(updates[s] for s in survivors)
    assert np.all(np.abs(dense[kept] - expected[kept]) <= result.error_bound)
    assert result.stats.bytes_up < 5 * (100 * 11 // 8 + 3000)
