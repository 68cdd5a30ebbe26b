"""The boundary's serialization: model files verified by hash, payloads JSON-safe."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import save_file

from fl_components.exchange import (
    ExchangeError,
    decode_arrays,
    encode_arrays,
    metrics_from_payload,
    metrics_payload,
    read_global_model,
    update_from_payload,
    update_payload,
    write_global_model,
)
from fl_components.promotion import decide_promotion, federated_accuracy
from fl_components.round.types import LocalUpdate, Metrics


def _arrays() -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [rng.normal(size=(4, 3)).astype(np.float32), rng.normal(size=3).astype(np.float32)]


def test_global_model_round_trips_and_is_verified(tmp_path: Path) -> None:
    uri, sha = write_global_model(_arrays(), tmp_path)
    loaded = read_global_model(uri, sha256=sha)
    for a, b in zip(loaded, _arrays(), strict=True):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(ExchangeError, match="does not match"):
        read_global_model(uri, sha256="0" * 64)


def test_tampered_model_file_is_refused(tmp_path: Path) -> None:
    uri, sha = write_global_model(_arrays(), tmp_path)
    tampered = _arrays()
    tampered[0][0, 0] += 1
    save_file({f"p{i:05d}": a for i, a in enumerate(tampered)}, uri)
    with pytest.raises(ExchangeError, match="refusing to train"):
        read_global_model(uri, sha256=sha)


def test_the_global_model_travels_as_safetensors(tmp_path: Path) -> None:
    uri, sha = write_global_model(_arrays(), tmp_path)
    assert uri.endswith(f"{sha}.safetensors")
    with safe_open(uri, framework="numpy") as opened:  # any safetensors reader reads it
        np.testing.assert_array_equal(opened.get_tensor("p00001"), _arrays()[1])


def test_pickled_object_arrays_are_not_loaded(tmp_path: Path) -> None:
    path = tmp_path / "evil.npz"
    np.savez(path, np.array([{"x": 1}], dtype=object))
    with pytest.raises(ExchangeError, match=r"not a readable safetensors file"):
        read_global_model(str(path), sha256="0" * 64)


@pytest.mark.parametrize(
    "header",
    [
        {"p00000": {"dtype": "F64", "shape": [2], "data_offsets": [0, 16]}},
        {
            "p00000": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
            "p00001": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
        },
        {"p00000": {"dtype": "F32", "shape": [9], "data_offsets": [0, 36]}},
        {"weights": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}},
    ],
)
def test_a_forged_safetensors_header_is_refused_before_reading(
    tmp_path: Path, header: dict[str, object]
) -> None:
    raw = json.dumps(header).encode()
    path = tmp_path / "forged.safetensors"
    path.write_bytes(len(raw).to_bytes(8, "little") + raw + bytes(16))
    with pytest.raises(ExchangeError, match="refusing to train"):
        read_global_model(str(path), sha256="0" * 64)


def test_update_payload_is_plain_json_and_round_trips() -> None:
    update = LocalUpdate(
        site="a", round=3, delta=_arrays(), num_examples=7, train_loss=0.5, seconds=1.0
    )
    text = json.dumps(update_payload(update))
    back = update_from_payload(json.loads(text), site="a", round_num=3)
    assert back.num_examples == 7
    for x, y in zip(back.delta, update.delta, strict=True):
        np.testing.assert_array_equal(x, y)
    np.testing.assert_array_equal(decode_arrays(encode_arrays(_arrays()))[1], _arrays()[1])


def test_payload_for_another_site_or_round_is_refused() -> None:
    payload = metrics_payload(Metrics(loss=1.0, accuracy=0.5, examples=10), site="a", round_num=1)
    assert metrics_from_payload(payload, site="a", round_num=1).accuracy == 0.5
    with pytest.raises(ExchangeError, match="header"):
        metrics_from_payload(payload, site="b", round_num=1)
    with pytest.raises(ExchangeError, match="header"):
        metrics_from_payload(payload, site="a", round_num=2)


def test_promotion_rule() -> None:
    scores = {
        "a": Metrics(loss=0.0, accuracy=1.0, examples=30),
        "b": Metrics(loss=0.0, accuracy=0.0, examples=10),
    }
    assert federated_accuracy(scores) == pytest.approx(0.75)
    first = decide_promotion(challenger_accuracy=0.7, champion_accuracy=None, champion_version=None)
    assert first.alias == "champion"
    better = decide_promotion(challenger_accuracy=0.8, champion_accuracy=0.7, champion_version="1")
    assert better.alias == "champion"
    tie = decide_promotion(challenger_accuracy=0.7, champion_accuracy=0.7, champion_version="1")
    assert tie.alias == "challenger" and "does not beat" in tie.reason


def test_stack_state_never_records_the_database_password() -> None:
    from ops.stack.state import _redacted

    assert _redacted("postgresql+asyncpg://fed:s3cret@127.0.0.1:5432/prefect") == (
        "postgresql+asyncpg://fed:***@127.0.0.1:5432/prefect"
    )
    assert _redacted("postgresql+asyncpg://fed@127.0.0.1/prefect") == (
        "postgresql+asyncpg://fed@127.0.0.1/prefect"
    )
