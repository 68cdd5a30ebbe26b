import numpy as np
import pytest

from fl_components.errors import RoundError
from fl_components.parameters import flatten, unflatten
from fl_components.strategies import AggregatedUpdate, FedAvg, ServerState
from fl_components.strategies.robust import weighted_mean


def test_weighted_average_hand_worked() -> None:
    # site A: 1 example, delta [1, 2]; site B: 3 examples, delta [5, -2]
    # (1*[1,2] + 3*[5,-2]) / 4 = [16, -4] / 4 = [4, -1]
    a = [np.array([1.0, 2.0], dtype=np.float32), np.array([[0.0]], dtype=np.float32)]
    b = [np.array([5.0, -2.0], dtype=np.float32), np.array([[4.0]], dtype=np.float32)]

    mean = unflatten(weighted_mean([flatten(a), flatten(b)], [1, 3]), like=a)

    np.testing.assert_allclose(mean[0], [4.0, -1.0])
    np.testing.assert_allclose(mean[1], [[3.0]])
    assert mean[0].dtype == np.float32


def test_weighted_average_of_nothing_is_an_error() -> None:
    with pytest.raises(RoundError, match="zero updates"):
        weighted_mean([], [])


def test_weighted_average_rejects_zero_weight() -> None:
    with pytest.raises(RoundError, match="sum to > 0"):
        weighted_mean([np.zeros(2, dtype=np.float32)], [0])


def test_fedavg_steps_by_server_lr() -> None:
    state = ServerState(round=3, parameters=[np.array([1.0, 1.0], dtype=np.float32)])

    update = AggregatedUpdate(delta=[np.array([2.0, -4.0], dtype=np.float32)], participants=2)

    new = FedAvg(server_lr=0.5).apply(state, update)

    np.testing.assert_allclose(new.parameters[0], [2.0, -1.0])
    assert new.round == 4
    np.testing.assert_allclose(state.parameters[0], [1.0, 1.0])  # input untouched
