"""Round checkpoints: arrays and plain data round-trip exactly, nothing is pickled, a crash
while writing leaves the previous round's checkpoint, begun rounds without one are named."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from fl_components.checkpoint import (
    Checkpoint,
    CheckpointError,
    load_latest,
    mark_round_started,
    round_folder,
    save_checkpoint,
    started_rounds,
)


def _state(round_num: int) -> dict:
    """The shape of ServerState.state_dict()."""
    return {
        "round": round_num,
        "parameters": [np.arange(6, dtype=np.float32).reshape(2, 3) * round_num, np.ones(3)],
        "strategy_state": {"m": [np.full(3, 0.5, dtype=np.float32)], "v": []},
        "clip_norm": 1.25,
        "accountant_history": [[1.1, 0.5, 10]] * round_num,
        "rng_state": {"bit_generator": "PCG64", "state": {"state": 2**100 + 7, "inc": 3}},
    }


def test_a_checkpoint_round_trips_exactly(tmp_path: Path) -> None:
    saved = Checkpoint(round=3, mlflow_run_id="abc", state=_state(3), extra={"flow": "f-1"})

    save_checkpoint(tmp_path, saved)
    loaded = load_latest(tmp_path)

    assert loaded is not None and loaded.round == 3 and loaded.mlflow_run_id == "abc"
    np.testing.assert_array_equal(loaded.state["parameters"][0], [[0, 3, 6], [9, 12, 15]])
    assert loaded.state["parameters"][0].dtype == np.float32
    assert loaded.state["parameters"][1].dtype == np.float64
    np.testing.assert_array_equal(loaded.state["strategy_state"]["m"][0], [0.5, 0.5, 0.5])
    assert loaded.state["strategy_state"]["v"] == []
    assert loaded.state["clip_norm"] == 1.25
    assert loaded.state["accountant_history"] == [[1.1, 0.5, 10]] * 3
    assert loaded.state["rng_state"]["state"]["state"] == 2**100 + 7  # big ints kept exact
    assert loaded.extra == {"flow": "f-1"} and loaded.unfinished == {}
    files = sorted(p.name for p in round_folder(tmp_path, 3).iterdir())
    assert files == ["arrays.safetensors", "state.json"]  # no pickle anywhere


def test_no_checkpoint_is_none(tmp_path: Path) -> None:
    assert load_latest(tmp_path) is None


def test_an_object_is_refused_not_pickled(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match=r"rng_state is a object: only plain data"):
        save_checkpoint(
            tmp_path, Checkpoint(round=1, mlflow_run_id="a", state={"rng_state": object()})
        )
    assert load_latest(tmp_path) is None


def test_a_crash_while_writing_leaves_the_previous_round(tmp_path: Path) -> None:
    save_checkpoint(tmp_path, Checkpoint(round=1, mlflow_run_id="a", state=_state(1)))
    mark_round_started(tmp_path, 2, privacy_step=[1.1, 0.5, 10])
    # round 2's folder half-written under its temporary name, latest.json not yet moved
    staging = tmp_path / ".round-0002.tmp"
    staging.mkdir()
    (staging / "state.json").write_text('{"round": 2, "mlfl')

    loaded = load_latest(tmp_path)

    assert loaded is not None and loaded.round == 1
    np.testing.assert_array_equal(loaded.state["parameters"][0], np.arange(6).reshape(2, 3))
    assert loaded.unfinished == {2: [[1.1, 0.5, 10]]}  # begun, outcome unknown: counts as spent


def test_a_round_begun_again_lists_every_attempt(tmp_path: Path) -> None:
    save_checkpoint(tmp_path, Checkpoint(round=1, mlflow_run_id="a", state=_state(1)))
    mark_round_started(tmp_path, 2, privacy_step={"attempt": "first"})
    mark_round_started(tmp_path, 3, privacy_step={"attempt": "first-3"})
    mark_round_started(tmp_path, 2, privacy_step={"attempt": "resumed"})  # the re-run

    loaded = load_latest(tmp_path)

    assert loaded is not None
    assert loaded.unfinished == {
        2: [{"attempt": "first"}, {"attempt": "resumed"}],
        3: [{"attempt": "first-3"}],
    }
    assert started_rounds(tmp_path)[2] == [{"attempt": "first"}, {"attempt": "resumed"}]


def test_a_version_1_started_file_is_read_as_one_attempt_per_round(tmp_path: Path) -> None:
    (tmp_path / "started.json").write_text(json.dumps({"10": [1.0, 0.5, 1], "9": None}))
    assert started_rounds(tmp_path) == {9: [None], 10: [[1.0, 0.5, 1]]}


def test_a_round_written_again_replaces_it(tmp_path: Path) -> None:
    mark_round_started(tmp_path, 1)
    save_checkpoint(tmp_path, Checkpoint(round=1, mlflow_run_id="a", state=_state(1)))
    mark_round_started(tmp_path, 2)
    save_checkpoint(tmp_path, Checkpoint(round=2, mlflow_run_id="a", state=_state(2)))

    loaded = load_latest(tmp_path)

    assert loaded is not None and loaded.round == 2 and loaded.unfinished == {}
    assert json.loads((tmp_path / "latest.json").read_text()) == {"round": 2}
