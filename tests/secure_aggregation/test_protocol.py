"""Exactness: the secure sum equals the plaintext sum within the quantization bound."""

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fl_components.secure_aggregation.protocol import (
    MaskedUpdate,
    SecAggCoordinator,
    ThresholdNotMetError,
    UnmaskRequest,
    UnmaskResponse,
)

from .federation import Federation, clipped_sum, random_updates


def test_hand_worked_three_sites():
    fed = Federation.make(3)
    ctx = fed.context(dimension=4, threshold=2, clip_range=2.0)
    updates = dict(
        zip(
            fed.sites,
            [np.array([1.0, -1.0, 0.5, 0.0]), np.full(4, 0.25), np.full(4, -3.0)],
            strict=True,
        )
    )
    result = fed.run_round(ctx, updates)
    # third update is clipped to -2.0
    np.testing.assert_allclose(result.total, [-0.75, -2.75, -1.25, -1.75], atol=result.error_bound)
    assert result.count == 3 and result.dropped == ()
    assert result.error_bound == pytest.approx(3 * 4.0 / (2**30 - 1) + 6e-9)  # bits = 30


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True
)
@given(data=st.data(), n=st.integers(2, 40), d=st.integers(1, 40), clip=st.floats(0.01, 100))
@pytest.mark.parametrize("compressed_bits", [None, 3, 8])
def test_secure_sum_equals_plain_sum_with_and_without_dropouts(compressed_bits, data, n, d, clip):
    """With ``compressed_bits`` the values are packed in Z_2^(b + ceil(log2 n))."""
    fed = Federation.make(n)
    t = data.draw(st.integers(1, n), label="threshold")
    dropped = data.draw(st.sets(st.sampled_from(fed.sites), max_size=n - t), label="dropped")
    neighbours = data.draw(st.one_of(st.none(), st.integers(1, n)), label="neighbours")
    ctx = fed.context(dimension=d, threshold=t, clip_range=clip, compressed_bits=compressed_bits)
    if neighbours is not None and ctx.group_size != n:
        # SecAgg+: t is a per-neighbourhood threshold; keep it feasible.
        ctx = fed.context(
            dimension=d,
            threshold=1,
            clip_range=clip,
            neighbours=neighbours,
            compressed_bits=compressed_bits,
        )
        t = min(t, ctx.group_size)
        ctx = fed.context(
            dimension=d,
            threshold=t,
            clip_range=clip,
            neighbours=neighbours,
            compressed_bits=compressed_bits,
        )
        dropped = set()  # dropouts with SecAgg+ are covered below with a fixed graph
    updates = random_updates(fed.sites, d, seed=n * 1000 + d, scale=2 * clip)
    result = fed.run_round(ctx, updates, drop_before_mask=dropped)
    survivors = [s for s in fed.sites if s not in dropped]
    expected = clipped_sum(updates, survivors, clip)
    assert result.count == len(survivors) and set(result.dropped) == dropped
    assert np.all(np.abs(result.total - expected) <= result.error_bound)


@pytest.mark.parametrize(("n", "k"), [(12, 4), (30, 6)])
def test_secagg_plus_with_dropouts(n, k):
    fed = Federation.make(n)
    ctx = fed.context(dimension=50, threshold=3, neighbours=k)
    assert ctx.group_size == k + 1 and not ctx.full_graph
    updates = random_updates(fed.sites, 50, seed=7)
    dropped = set(fed.sites[1:4])
    result = fed.run_round(ctx, updates, drop_before_mask=dropped)
    expected = clipped_sum(updates, [s for s in fed.sites if s not in dropped], 1.0)
    assert np.all(np.abs(result.total - expected) <= result.error_bound)
    assert result.stats.dropouts_recovered == 3


@pytest.mark.slow
@pytest.mark.parametrize("n", [100, 200])
def test_large_federations_with_ten_percent_dropouts(n):
    fed = Federation.make(n)
    ctx = fed.context(dimension=16, threshold=n // 2 + 1)
    updates = random_updates(fed.sites, 16, seed=n)
    dropped = set(fed.sites[::10])
    result = fed.run_round(ctx, updates, drop_before_mask=dropped)
    expected = clipped_sum(updates, [s for s in fed.sites if s not in dropped], 1.0)
    assert np.all(np.abs(result.total - expected) <= result.error_bound)
    assert result.stats.dropouts_recovered == len(dropped)


def test_dropout_in_stage_two_tolerated_above_threshold():
    fed = Federation.make(6)
    ctx = fed.context(dimension=20, threshold=3)
    updates = random_updates(fed.sites, 20, seed=1)
    result = fed.run_round(ctx, updates, drop_before_unmask=fed.sites[:3])
    assert np.all(np.abs(result.total - clipped_sum(updates, fed.sites, 1.0)) <= result.error_bound)
    assert result.stats.responses == 3


def test_below_threshold_of_updates_aborts_with_counts():
    fed = Federation.make(5)
    ctx = fed.context(dimension=8, threshold=4)
    with pytest.raises(
        ThresholdNotMetError, match="3 of 5 masked updates arrived, below threshold 4"
    ):
        fed.run_round(ctx, random_updates(fed.sites, 8, seed=0), drop_before_mask=fed.sites[:2])


def test_below_threshold_of_responses_aborts_and_returns_nothing():
    fed = Federation.make(5)
    ctx = fed.context(dimension=8, threshold=3)
    coordinator = SecAggCoordinator(ctx, fed.registry)
    with pytest.raises(ThresholdNotMetError, match="2 of 5 survivors sent a valid unmask response"):
        fed.run_round(
            ctx,
            random_updates(fed.sites, 8, seed=0),
            drop_before_unmask=fed.sites[:3],
            coordinator=coordinator,
        )


def test_survivor_silent_after_its_peer_dropped_aborts():
    """The 2-stage design's limit: only u can reveal s_{u,v}; if u goes silent, abort."""
    fed = Federation.make(5)
    ctx = fed.context(dimension=8, threshold=2)
    with pytest.raises(ThresholdNotMetError, match="did not return their pairwise seed"):
        fed.run_round(
            ctx,
            random_updates(fed.sites, 8, seed=0),
            drop_before_mask=[fed.sites[0]],
            drop_before_unmask=[fed.sites[1]],
        )


def test_messages_roundtrip_bytes_without_pickle():
    fed = Federation.make(3)
    ctx = fed.context(dimension=5, threshold=2)
    p = fed.participants[fed.sites[0]]
    message = p.mask_update(ctx, np.ones(5), num_examples=42)
    raw = message.to_bytes()
    assert b"pickle" not in raw and raw[:4] == b"FPSA"
    again = MaskedUpdate.from_bytes(raw)
    assert again.to_bytes() == raw and again.num_examples == 42
    coordinator = SecAggCoordinator(ctx, fed.registry)
    for s in fed.sites:
        coordinator.receive(fed.participants[s].mask_update(ctx, np.ones(5)))
    request = coordinator.unmask_requests()[fed.sites[1]]
    assert UnmaskRequest.from_bytes(request.to_bytes()).to_bytes() == request.to_bytes()
    response = fed.participants[fed.sites[1]].unmask_response(ctx, request)
    assert UnmaskResponse.from_bytes(response.to_bytes()).to_bytes() == response.to_bytes()


def test_upload_is_four_bytes_per_parameter_plus_shares():
    fed = Federation.make(10)
    d = 100_000
    ctx = fed.context(dimension=d)
    result = fed.run_round(ctx, random_updates(fed.sites, d, seed=0))
    assert 1.0 < result.stats.expansion_factor < 1.01
