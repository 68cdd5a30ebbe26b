"""Site-side math of FedProx and SCAFFOLD (torch), and c_i kept in the site's folder."""

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from fl_components.errors import DataError, RoundError
from fl_components.site.objective import (
    CONTROL_FILE,
    load_client_control,
    proximal_penalty,
    save_client_control,
    scaffold_client_control,
    scaffold_correct_gradients,
)


def linear(weight: list[float], bias: float) -> nn.Linear:
    model = nn.Linear(len(weight), 1)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([weight]))
        model.bias.copy_(torch.tensor([bias]))
    return model


def test_proximal_penalty_value_and_gradient_by_hand() -> None:
    # θ = ([1, 2], 3), θ_t = ([0, 0], 1): ‖θ − θ_t‖² = 1 + 4 + 4 = 9; μ = 0.5 -> 0.25 * 9
    model = linear([1.0, 2.0], 3.0)
    anchor = [torch.zeros(1, 2), torch.tensor([1.0])]
    penalty = proximal_penalty(model, anchor, 0.5)
    assert float(penalty) == pytest.approx(2.25)
    penalty.backward()
    # ∇ = μ (θ − θ_t) = 0.5 * ([1, 2], 2)
    np.testing.assert_allclose(model.weight.grad.numpy(), [[0.5, 1.0]])
    np.testing.assert_allclose(model.bias.grad.numpy(), [1.0])


def test_proximal_penalty_refuses_mismatched_anchor() -> None:
    with pytest.raises(RoundError, match="1 global tensors for a model with 2"):
        proximal_penalty(linear([1.0], 0.0), [torch.zeros(1, 1)], 0.1)


def test_scaffold_correct_gradients_adds_c_minus_ci() -> None:
    model = linear([1.0, 1.0], 0.0)
    model.weight.grad = torch.tensor([[1.0, 2.0]])
    model.bias.grad = torch.tensor([0.5])
    c = [np.array([[0.5, 0.5]], np.float32), np.array([1.0], np.float32)]
    c_i = [np.array([[0.25, 1.0]], np.float32), np.array([0.0], np.float32)]
    scaffold_correct_gradients(model, c, c_i)
    # g − c_i + c = [1 − 0.25 + 0.5, 2 − 1 + 0.5], 0.5 − 0 + 1
    np.testing.assert_allclose(model.weight.grad.numpy(), [[1.25, 1.5]])
    np.testing.assert_allclose(model.bias.grad.numpy(), [1.5])
    with pytest.raises(RoundError, match="1 server and 2 site control"):
        scaffold_correct_gradients(model, c[:1], c_i)


def test_scaffold_client_control_option_two_by_hand() -> None:
    # c_i⁺ = c_i − c + (x − y)/(K η) = 0.5 − 1 + (2 − 1)/(10 * 0.1) = 0.5
    new = scaffold_client_control(
        [np.array([0.5], np.float32)],
        [np.array([1.0], np.float32)],
        [np.array([2.0], np.float32)],
        [np.array([1.0], np.float32)],
        steps=10,
        lr=0.1,
    )
    np.testing.assert_allclose(new[0], [0.5], rtol=1e-6)
    with pytest.raises(RoundError, match="steps >= 1"):
        scaffold_client_control([], [], [], [], steps=0, lr=0.1)


def test_scaffold_local_sgd_with_correction_recovers_option_two() -> None:
    # with plain SGD, (x − y)/(Kη) is the mean corrected gradient, so c_i⁺ − c_i + c is
    # the mean raw gradient: check on a one-parameter quadratic
    model = nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        model.weight.fill_(2.0)
    x = [model.weight.detach().numpy().copy()]
    c, c_i = [np.array([[0.3]], np.float32)], [np.array([[0.1]], np.float32)]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    grads = []
    for _ in range(3):
        optimizer.zero_grad()
        (model.weight**2).sum().backward()  # g = 2w
        grads.append(float(model.weight.grad))
        scaffold_correct_gradients(model, c, c_i)
        optimizer.step()
    y = [model.weight.detach().numpy().copy()]
    new = scaffold_client_control(c_i, c, x, y, steps=3, lr=0.1)
    assert new[0].item() == pytest.approx(np.mean(grads), rel=1e-5)


def test_client_control_round_trips_through_the_site_folder(tmp_path: Path) -> None:
    like = [np.zeros((2, 2), np.float32), np.zeros(3, np.float32)]
    first = load_client_control(tmp_path, like)
    assert all(np.array_equal(a, b) for a, b in zip(first, like, strict=True))
    control = [np.arange(4, dtype=np.float32).reshape(2, 2), np.array([1, 2, 3], np.float32)]
    path = save_client_control(tmp_path, control)
    assert path == tmp_path / CONTROL_FILE
    loaded = load_client_control(tmp_path, like)
    for a, b in zip(loaded, control, strict=True):
        np.testing.assert_array_equal(a, b)
    with np.load(path, allow_pickle=False) as archive:  # plain arrays, no pickle
        assert sorted(archive.files) == ["c0", "c1"]
    with pytest.raises(DataError, match=r"delete .* to start c_i at 0"):
        load_client_control(tmp_path, [np.zeros(5, np.float32)])
