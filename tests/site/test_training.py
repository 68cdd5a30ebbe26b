import numpy as np
import pytest

from fl_components.config import ModelConfig, TrainingConfig
from fl_components.data.site_files import load_bundled
from fl_components.data.types import DatasetInfo
from fl_components.errors import ConfigError, FedpipeError
from fl_components.parameters import digest, flatten, get_parameters, set_parameters, unflatten
from fl_components.site.models import build_model
from fl_components.site.training import evaluate, local_train

INFO = DatasetInfo(n_features=64, n_classes=10)


@pytest.mark.parametrize("kind", ["logreg", "mlp", "cnn"])
def test_local_training_improves_the_model(kind: str) -> None:
    data = load_bundled("digits")
    model = build_model(ModelConfig(kind=kind), INFO, seed=0)
    start = get_parameters(model)
    before = evaluate(model, start, data)

    update = local_train(
        model,
        start,
        data,
        TrainingConfig(epochs=2, optimizer="adam", lr=0.01),
        site="s",
        round_num=1,
        seed=0,
    )
    after = evaluate(model, [p + d for p, d in zip(start, update.delta, strict=True)], data)

    assert update.num_examples == len(data)
    assert after.accuracy > before.accuracy + 0.3


def test_training_is_reproducible_from_seed() -> None:
    data = load_bundled("digits")
    model = build_model(ModelConfig(), INFO, seed=0)
    start = get_parameters(model)

    a = local_train(model, start, data, TrainingConfig(epochs=1), site="s", round_num=1, seed=5)
    b = local_train(model, start, data, TrainingConfig(epochs=1), site="s", round_num=1, seed=5)

    assert digest(a.delta) == digest(b.delta)


def test_flatten_round_trip_and_shape_errors() -> None:
    model = build_model(ModelConfig(hidden=(8,)), INFO, seed=0)
    params = get_parameters(model)

    back = unflatten(flatten(params), params)

    assert all(np.array_equal(a, b) for a, b in zip(params, back, strict=True))
    with pytest.raises(FedpipeError, match="shape"):
        set_parameters(model, [np.zeros((1, 1), np.float32), *params[1:]])


def test_cnn_rejects_non_square_input() -> None:
    with pytest.raises(ConfigError, match="square"):
        build_model(ModelConfig(kind="cnn"), DatasetInfo(n_features=30, n_classes=2), seed=0)


def test_share_cores_gives_each_simulated_site_its_share_of_the_cores() -> None:
    import os

    import torch

    from fl_components.config import TrainingConfig
    from fl_components.site.training import share_cores

    before = torch.get_num_threads()
    cores = os.cpu_count() or 1
    try:
        assert share_cores(TrainingConfig(), sites=cores * 10) == 1
        assert torch.get_num_threads() == 1
        assert share_cores(TrainingConfig(), sites=1) == cores
        assert share_cores(TrainingConfig(threads=3), sites=100) == 3
        assert torch.get_num_threads() == 3
    finally:
        torch.set_num_threads(before)


def _steps_taken(monkeypatch: pytest.MonkeyPatch, rows: int, config: TrainingConfig) -> int:
    """Optimizer steps one local_train at a site of ``rows`` digits takes."""
    import fl_components.site.training as training

    steps = []
    made = training.make_optimizer

    def counting(model, config):  # type: ignore[no-untyped-def]
        optimizer = made(model, config)
        step = optimizer.step
        optimizer.step = lambda *a, **k: (steps.append(1), step(*a, **k))[1]  # type: ignore[method-assign]
        return optimizer

    monkeypatch.setattr(training, "make_optimizer", counting)
    data = load_bundled("digits")
    split = type(data)(data.features[:rows], data.labels[:rows])
    model = build_model(ModelConfig(), INFO, seed=0)
    local_train(model, get_parameters(model), split, config, site="s", round_num=1, seed=0)
    return len(steps)


def test_local_steps_give_every_site_the_same_number_of_updates(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    steps = TrainingConfig(local_steps=7, batch_size=32)
    epochs = TrainingConfig(epochs=1, batch_size=32)

    # 40 rows: 2 batches a pass, so 7 steps cycle through the rows 3.5 times
    assert [_steps_taken(monkeypatch, rows, steps) for rows in (40, 400)] == [7, 7]
    assert [_steps_taken(monkeypatch, rows, epochs) for rows in (40, 400)] == [2, 13]


def test_local_steps_and_epochs_together_are_refused() -> None:
    with pytest.raises(ValueError, match=r"training\.epochs \(3\) and training\.local_steps"):
        TrainingConfig(epochs=3, local_steps=10)
