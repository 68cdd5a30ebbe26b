from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from fl_components.config import PrivacyConfig, TrainingConfig
from fl_components.data.types import Split
from fl_components.errors import ConfigError
from fl_components.parameters import get_parameters, subtract
from fl_components.privacy.dp_fedavg import global_norm
from fl_components.site.dpsgd import (
    RecordPlan,
    choose_grad_sample_mode,
    dp_train,
    plan_round,
    validate_model,
)


def _outlier_split(n: int) -> Split:
    features = np.zeros((n, 4), dtype=np.float32)
    features[:, 0] = 0.1
    features[-1] = 1e4  # one record far outside the rest
    return Split(features=features, labels=np.zeros(n, dtype=np.int64))


@pytest.mark.parametrize("mode", ["ew", "hooks"])
def test_per_sample_clipping_bounds_an_outlier_records_contribution(mode: str) -> None:
    torch.manual_seed(0)
    model = nn.Linear(4, 2)
    before = get_parameters(model)
    split = _outlier_split(1)  # the outlier alone: its update is its clipped gradient
    training = TrainingConfig(epochs=1, batch_size=1, lr=1.0, momentum=0.0)
    # q = 1 and sigma ~ 0: one deterministic step of lr * clip(g) / 1
    plan = RecordPlan(
        noise_multiplier=1e-9, sample_rate=1.0, steps=1, delta=1e-5, max_grad_norm=0.5
    )
    dp_train(model, split, training, plan=plan, grad_sample_mode=mode, device=torch.device("cpu"))
    dp_norm = global_norm(subtract(get_parameters(model), before))

    plain = nn.Linear(4, 2)
    plain.load_state_dict(dict(zip(plain.state_dict(), map(torch.from_numpy, before), strict=True)))
    loss = nn.functional.cross_entropy(
        plain(torch.from_numpy(split.features)), torch.zeros(1, dtype=torch.long)
    )
    loss.backward()
    plain_norm = float(torch.sqrt(sum((p.grad**2).sum() for p in plain.parameters())))

    assert plain_norm > 100  # unclipped, the outlier would move the model this far
    assert dp_norm <= 0.5 + 1e-6
    assert dp_norm == pytest.approx(0.5, rel=1e-3)


def test_model_opacus_cannot_handle_is_rejected_with_opacus_reason() -> None:
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 2))
    with pytest.raises(ConfigError, match="BatchNorm"):
        validate_model(model)


def test_auto_picks_expanded_weights_for_an_mlp() -> None:
    mlp = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    assert choose_grad_sample_mode(mlp, "auto") == "ew"
    assert choose_grad_sample_mode(mlp, "hooks") == "hooks"


def test_target_epsilon_spreads_over_all_rounds() -> None:
    privacy = PrivacyConfig(mode="record", target_epsilon=3.0, delta=1e-5)
    training = TrainingConfig(epochs=2, batch_size=32)
    plan = plan_round(examples=320, privacy=privacy, training=training, rounds=5)
    from fl_components.privacy.ledger import epsilon_of

    spent = epsilon_of(
        [(plan.noise_multiplier, plan.sample_rate, plan.steps * 5)], delta=1e-5, accountant="rdp"
    )
    assert plan.sample_rate == pytest.approx(0.1)
    assert plan.steps == 20
    assert 2.9 < spent <= 3.0


def test_dp_sgd_accounts_the_local_steps_not_the_epochs() -> None:
    privacy = PrivacyConfig(mode="record", noise_multiplier=1.0, delta=1e-5)
    training = TrainingConfig(local_steps=25, batch_size=32)

    plan = plan_round(examples=320, privacy=privacy, training=training, rounds=5)

    assert plan.steps == 25 and plan.sample_rate == pytest.approx(0.1)
