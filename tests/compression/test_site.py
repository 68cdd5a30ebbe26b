"""The site's compression step: residual persisted across rounds, instruction round trip."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from fl_components.compression import decode_update
from fl_components.compression.error_feedback import RESIDUAL_FILE
from fl_components.compression.instruction import CompressionInstruction
from fl_components.compression.site import (
    compress_for_upload,
    select_for_masking,
)
from fl_components.config import CompressionConfig


def _instruction(round: int, **settings: object) -> CompressionInstruction:
    return CompressionInstruction(
        config=CompressionConfig.model_validate(settings), run_id="run", round=round
    )


def test_instruction_round_trips_through_json_form() -> None:
    instruction = _instruction(3, method="random_k", fraction=0.2)
    assert CompressionInstruction.from_dict(instruction.to_dict()) == instruction


def test_residual_carries_across_rounds_and_resets_after_a_skipped_round(tmp_path: Path) -> None:
    settings = {"method": "top_k", "fraction": 0.25}
    rng = np.random.default_rng(0)
    first = compress_for_upload(
        np.array([3.0, 2.0, 1.0, 0.5]),
        instruction=_instruction(1, **settings),
        site_dir=tmp_path,
        rng=rng,
    )
    np.testing.assert_array_equal(decode_update(first), [3, 0, 0, 0])
    second = compress_for_upload(
        np.zeros(4), instruction=_instruction(2, **settings), site_dir=tmp_path, rng=rng
    )
    np.testing.assert_array_equal(decode_update(second), [0, 2, 0, 0])  # from the residual
    skipped = compress_for_upload(
        np.array([0.0, 0.0, 0.0, 0.125]),
        instruction=_instruction(4, **settings),
        site_dir=tmp_path,
        rng=rng,
    )
    np.testing.assert_array_equal(decode_update(skipped), [0, 0, 0, 0.125])  # residual reset


def test_masking_selects_the_shared_coordinates_and_keeps_the_rest(tmp_path: Path) -> None:
    instruction = _instruction(1, method="random_k", fraction=0.5)
    delta = np.arange(1.0, 9.0)
    values = select_for_masking(delta, instruction=instruction, site_dir=tmp_path)
    assert values.size == 4
    with np.load(tmp_path / RESIDUAL_FILE, allow_pickle=False) as stored:
        residual = stored["residual"]
    assert np.count_nonzero(residual) == 4
    assert sorted(values.tolist() + residual[residual != 0].tolist()) == delta.tolist()


def test_no_residual_file_without_error_feedback(tmp_path: Path) -> None:
    compress_for_upload(
        np.ones(8),
        instruction=_instruction(1, method="qsgd"),
        site_dir=tmp_path,
        rng=np.random.default_rng(0),
    )
    assert not (tmp_path / RESIDUAL_FILE).exists()
