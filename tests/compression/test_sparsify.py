"""Top-k and shared random-k: what is kept, byte counts, the same coordinates per round."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fl_components.compression import EncodedUpdate, decode_update
from fl_components.compression.encoded import CompressionError
from fl_components.compression.random_k import round_seed, shared_indices
from fl_components.compression.random_k import sparsify as random_sparsify
from fl_components.compression.top_k import kept_count
from fl_components.compression.top_k import sparsify as top_sparsify


def test_top_k_keeps_the_largest_magnitudes() -> None:
    v = np.array([0.1, -3.0, 0.5, 2.0, -0.2], dtype=np.float32)
    message = top_sparsify(v, fraction=0.4)  # ceil(0.4 * 5) = 2
    np.testing.assert_array_equal(decode_update(message), [0, -3.0, 0, 2.0, 0])
    assert message.nbytes == 28 + 2 * 8


def test_top_k_ties_keep_the_lower_index() -> None:
    message = top_sparsify(np.array([1.0, -1.0, 1.0]), fraction=0.5)
    np.testing.assert_array_equal(decode_update(message), [1.0, -1.0, 0.0])


def test_kept_count_bounds() -> None:
    assert kept_count(1000, 0.01) == 10
    assert kept_count(5, 0.01) == 1
    assert kept_count(7, 1.0) == 7
    with pytest.raises(CompressionError, match=r"compression\.fraction"):
        kept_count(10, 0.0)


def test_round_seed_is_hkdf_of_run_and_round() -> None:
    # Pinned: a change of derivation would silently desynchronise sites of mixed versions.
    assert round_seed(run_id="run-1", round=3).hex()[:16] == "b615712bd62a52cd"
    assert round_seed(run_id="run-1", round=3) != round_seed(run_id="run-1", round=4)
    assert round_seed(run_id="run-1", round=3) != round_seed(run_id="run-2", round=3)


def test_shared_random_k_identical_at_every_site_of_a_round() -> None:
    rng = np.random.default_rng(0)
    updates = [rng.normal(size=1000) for _ in range(5)]
    messages = [random_sparsify(u, fraction=0.1, run_id="run-1", round=7) for u in updates]
    supports = [np.flatnonzero(decode_update(m)) for m in messages]
    for support in supports[1:]:
        np.testing.assert_array_equal(support, supports[0])
    assert supports[0].size == 100
    assert all(m.nbytes == 28 + 32 + 100 * 4 for m in messages)
    # Summing the sparse vectors is summing the kept coordinates of the dense ones.
    total = sum(decode_update(m) for m in messages)
    np.testing.assert_allclose(total[supports[0]], sum(u[supports[0]] for u in updates), rtol=1e-5)


def test_shared_random_k_differs_across_rounds() -> None:
    first = shared_indices(round_seed(run_id="r", round=1), dimension=1000, k=100)
    second = shared_indices(round_seed(run_id="r", round=2), dimension=1000, k=100)
    assert np.intersect1d(first, second).size < 40  # expected overlap 10 of 100


@settings(max_examples=40, deadline=None)
@given(d=st.integers(1, 2000), fraction=st.floats(0.001, 1.0), round=st.integers(0, 10**6))
def test_shared_indices_are_k_distinct_sorted_in_range(d: int, fraction: float, round: int) -> None:
    k = kept_count(d, fraction)
    indices = shared_indices(round_seed(run_id="run", round=round), dimension=d, k=k)
    assert indices.size == k == np.unique(indices).size
    assert np.all(np.diff(indices) > 0) and indices[0] >= 0 and indices[-1] < d


@settings(max_examples=40, deadline=None)
@given(d=st.integers(1, 500), fraction=st.floats(0.001, 1.0), seed=st.integers(0, 1000))
def test_top_k_round_trip(d: int, fraction: float, seed: int) -> None:
    v = np.random.default_rng(seed).normal(size=d).astype(np.float32)
    message = EncodedUpdate.from_bytes(top_sparsify(v, fraction=fraction).to_bytes())
    decoded = decode_update(message)
    kept = np.flatnonzero(decoded)
    np.testing.assert_array_equal(decoded[kept], v[kept])
    dropped = np.setdiff1d(np.arange(d), kept)
    if kept.size and dropped.size:
        assert np.abs(v[dropped]).max() <= np.abs(v[kept]).min()
