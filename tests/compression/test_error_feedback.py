"""Error feedback: the residual is carried, applied, persisted and reset when stale."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from fl_components.compression import encode_update, load_residual, save_residual
from fl_components.compression.codec import decode_update
from fl_components.compression.error_feedback import RESIDUAL_FILE
from fl_components.config import CompressionConfig

TOP_ONE = CompressionConfig(method="top_k", fraction=0.25)  # k = 1 of 4


def _step(update: np.ndarray, residual: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    message, residual = encode_update(
        update,
        config=TOP_ONE,
        run_id="run",
        round=1,
        residual=residual,
        rng=np.random.default_rng(0),
    )
    return decode_update(message), residual


def test_residual_is_carried_and_applied() -> None:
    # Round 1: [3, 2, 1, 0.5] sends 3, keeps [0, 2, 1, 0.5].
    sent, residual = _step(np.array([3.0, 2.0, 1.0, 0.5]), np.zeros(4))
    np.testing.assert_array_equal(sent, [3, 0, 0, 0])
    np.testing.assert_array_equal(residual, [0, 2, 1, 0.5])
    # Round 2: update [1, 0.5, 0, 0] + residual = [1, 2.5, 1, 0.5] sends 2.5.
    sent, residual = _step(np.array([1.0, 0.5, 0.0, 0.0]), residual)
    np.testing.assert_array_equal(sent, [0, 2.5, 0, 0])
    np.testing.assert_array_equal(residual, [1, 0, 1, 0.5])


def test_without_feedback_nothing_is_carried() -> None:
    config = CompressionConfig(method="top_k", fraction=0.25, error_feedback=False)
    message, residual = encode_update(
        np.array([3.0, 2.0, 1.0, 0.5]),
        config=config,
        run_id="run",
        round=1,
        residual=np.full(4, 9.0),
        rng=np.random.default_rng(0),
    )
    np.testing.assert_array_equal(decode_update(message), [3, 0, 0, 0])
    np.testing.assert_array_equal(residual, np.zeros(4))


def test_sent_plus_residual_is_everything_so_far() -> None:
    rng = np.random.default_rng(3)
    residual = np.zeros(50, dtype=np.float32)
    sent_total = np.zeros(50)
    update_total = np.zeros(50)
    for _ in range(10):
        update = rng.normal(size=50).astype(np.float32)
        sent, residual = _step(update, residual)
        sent_total += sent
        update_total += update
    np.testing.assert_allclose(sent_total + residual, update_total, atol=1e-5)


def test_persisted_residual_round_trips_and_resets_when_stale(tmp_path: Path) -> None:
    residual = np.array([1.0, -2.0, 0.5], dtype=np.float32)
    save_residual(tmp_path, run_id="run-a", round=4, residual=residual)
    assert (tmp_path / RESIDUAL_FILE).is_file()
    with np.load(tmp_path / RESIDUAL_FILE, allow_pickle=False) as stored:  # no pickle inside
        assert set(stored.files) == {"residual", "round", "run_id"}

    def load(**overrides: object) -> np.ndarray:
        args = {"run_id": "run-a", "round": 5, "dimension": 3, "max_age": 1} | overrides
        return load_residual(tmp_path, **args)  # type: ignore[arg-type]

    np.testing.assert_array_equal(load(), residual)
    np.testing.assert_array_equal(load(round=7, max_age=3), residual)
    zeros = np.zeros(3)
    np.testing.assert_array_equal(load(round=6), zeros)  # skipped round 5: stale
    np.testing.assert_array_equal(load(round=4), zeros)  # same round: not a later one
    np.testing.assert_array_equal(load(run_id="run-b"), zeros)
    np.testing.assert_array_equal(load(dimension=4), np.zeros(4))
    np.testing.assert_array_equal(
        load_residual(tmp_path / "none", run_id="run-a", round=5, dimension=3, max_age=1), zeros
    )
