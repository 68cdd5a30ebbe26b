"""Mixed precision, loader workers and their validation (the GPU options, checked on CPU)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
from pydantic import ValidationError
from torch import nn
from torch.utils.data import Dataset, TensorDataset

from fl_components.config import FederationConfig, TrainingConfig
from fl_components.errors import ConfigError
from fl_components.parameters import get_parameters
from fl_components.site.training import (
    TrainingRun,
    local_train,
    make_loader,
    make_optimizer,
    train_epochs,
)
from fl_components.task.protocol import BoundTask, SiteContext, TaskData

CPU = torch.device("cpu")


def _data(n: int = 64) -> TensorDataset:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(n, 8, generator=generator)
    return TensorDataset(x, (x[:, 0] > 0).long())


class _DtypeTask:
    """A tiny linear task whose step records the dtype its forward pass ran in."""

    def __init__(self) -> None:
        self.dtypes: list[torch.dtype] = []

    def build_model(self, seed: int) -> nn.Module:
        return nn.Linear(8, 2)

    def load_data(self, site: SiteContext) -> TaskData:
        return TaskData(train=_data(), test=_data(8))

    def train_step(self, model: nn.Module, batch: Any, loss_fn: Any) -> torch.Tensor:
        inputs, targets = batch
        outputs = model(inputs)
        self.dtypes.append(outputs.dtype)
        return loss_fn(outputs.float(), targets)


def test_defaults_are_fp32_in_process_loading() -> None:
    config = TrainingConfig()
    assert config.precision == "fp32"
    assert config.loader_workers == 0


@pytest.mark.parametrize(
    "field,value", [("precision", "fp8"), ("precision", "half"), ("loader_workers", -1)]
)
def test_bad_gpu_options_are_refused(field: str, value: object) -> None:
    with pytest.raises(ValidationError, match=field):
        TrainingConfig.model_validate({field: value})


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_with_record_level_dp_is_refused(precision: str) -> None:
    with pytest.raises(ValidationError) as error:
        FederationConfig.model_validate(
            {
                "training": {"precision": precision},
                "privacy": {"mode": "record", "noise_multiplier": 1.0},
            }
        )
    message = str(error.value)
    assert f"training.precision is '{precision}'" in message
    assert "Opacus" in message and "training.precision: fp32" in message


def test_mixed_precision_with_participant_dp_is_allowed() -> None:
    config = FederationConfig.model_validate(
        {"training": {"precision": "bf16"}, "privacy": {"mode": "participant"}}
    )
    assert config.training.precision == "bf16"


def test_the_site_refuses_mixed_precision_under_dp_whatever_the_config_said() -> None:
    class _Wrapper:
        def wrap(self, run: TrainingRun) -> TrainingRun:  # pragma: no cover - never reached
            raise AssertionError("the site must refuse before wrapping")

    model = nn.Linear(8, 2)
    with pytest.raises(ConfigError, match=r"training\.precision is 'bf16' under record-level DP"):
        local_train(
            model,
            get_parameters(model),
            _data(),
            TrainingConfig(precision="bf16", epochs=1),
            site="s",
            round_num=1,
            seed=0,
            wrapper=_Wrapper(),
        )


@pytest.mark.parametrize("precision,dtype", [("bf16", torch.bfloat16), ("fp16", torch.float16)])
def test_autocast_runs_the_step_at_low_precision_on_cpu(precision: str, dtype: torch.dtype) -> None:
    user = _DtypeTask()
    task = BoundTask(user, spec="test:dtype")
    model = task.build_model(0)
    before = [p.detach().clone() for p in model.parameters()]
    config = TrainingConfig(epochs=2, batch_size=16, lr=0.1)
    loss = train_epochs(
        model,
        make_loader(_data(), batch_size=16, seed=0),
        make_optimizer(model, config),
        epochs=2,
        device=CPU,
        task=task,
        precision=precision,
    )
    assert np.isfinite(loss)
    assert user.dtypes and set(user.dtypes) == {dtype}
    # the weights (and so the update) stay fp32, and they moved
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))


def test_fp32_runs_without_autocast() -> None:
    user = _DtypeTask()
    task = BoundTask(user, spec="test:dtype")
    model = task.build_model(0)
    config = TrainingConfig(epochs=1, batch_size=16)
    train_epochs(
        model,
        make_loader(_data(), batch_size=16, seed=0),
        make_optimizer(model, config),
        epochs=1,
        device=CPU,
        task=task,
    )
    assert set(user.dtypes) == {torch.float32}


def test_local_train_in_bf16_is_repeatable() -> None:
    task = BoundTask(_DtypeTask(), spec="test:dtype")
    config = TrainingConfig(epochs=2, batch_size=16, precision="bf16")
    deltas = []
    for _ in range(2):
        model = task.build_model(0)
        update = local_train(
            model, get_parameters(model), _data(), config, site="s", round_num=1, seed=3, task=task
        )
        deltas.append(update.delta)
    assert all(np.array_equal(a, b) for a, b in zip(*deltas, strict=True))


class _Augmented(Dataset[tuple[torch.Tensor, torch.Tensor]]):
    """Draws from torch's and numpy's generators in __getitem__, as augmentation does."""

    def __len__(self) -> int:
        return 12

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        noise = float(torch.rand(())) + float(np.random.rand())
        return torch.tensor([float(i), noise]), torch.tensor(i % 2)


def _batches(seed: int) -> list[torch.Tensor]:
    return [x for x, _ in make_loader(_Augmented(), batch_size=4, seed=seed, workers=2)]


def test_loader_workers_repeat_from_the_seed() -> None:
    first, again, other = _batches(5), _batches(5), _batches(6)
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(first, other, strict=True))
