"""Loading the champion (or a run's model) leaves no download folder behind."""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch

from fl_components.config import FederationConfig
from fl_components.tracking import RunTracker, load_registered_parameters, load_run_model


def test_champion_and_run_model_loads_remove_their_download_folder(
    small_config: FederationConfig, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = torch.nn.Sequential(torch.nn.Linear(3, 2))
    tracker = RunTracker(small_config)
    link = tracker.start(run_name="leak-check", tags={})
    version = tracker.log_model(model, input_example=np.zeros((2, 3), np.float32), register=True)
    assert version is not None
    tracker.set_alias("champion", version)
    tracker.end()
    downloads = tmp_path / "downloads"
    downloads.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(downloads))  # where mkdtemp puts folders

    champion = load_registered_parameters(
        small_config.tracking, name=small_config.name, alias="champion"
    )
    from_run = load_run_model(small_config.tracking, run_id=link.run_id)

    for loaded in (champion, from_run):
        weights = [t for t in loaded.state_dict().values()]
        assert torch.equal(weights[0], model[0].weight) and torch.equal(weights[1], model[0].bias)
    assert list(downloads.iterdir()) == []


def test_loading_never_unpickles_and_keeps_the_state_dict_order(
    small_config: FederationConfig, monkeypatch: pytest.MonkeyPatch
) -> None:
    import mlflow

    # names whose sorted order differs from the module's: 0.weight, 0.bias, 10.weight, ...
    model = torch.nn.Sequential(*[torch.nn.Linear(3, 3) for _ in range(11)])
    tracker = RunTracker(small_config)
    link = tracker.start(run_name="no-pickle", tags={})
    version = tracker.log_model(model, input_example=np.zeros((2, 3), np.float32), register=True)
    assert version is not None
    tracker.set_alias("champion", version)
    tracker.end()

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("mlflow.pytorch.load_model unpickles the model")

    monkeypatch.setattr(mlflow.pytorch, "load_model", refuse)
    champion = load_registered_parameters(
        small_config.tracking, name=small_config.name, alias="champion"
    )
    from_run = load_run_model(small_config.tracking, run_id=link.run_id)

    expected = list(model.state_dict().items())
    for loaded in (champion, from_run):
        assert [k for k, _ in loaded.state_dict().items()] == [k for k, _ in expected]
        assert all(
            torch.equal(a, b)
            for a, b in zip(loaded.state_dict().values(), dict(expected).values(), strict=True)
        )


def test_a_model_without_safetensors_weights_is_refused_not_unpickled(
    small_config: FederationConfig, monkeypatch: pytest.MonkeyPatch
) -> None:
    import mlflow
    from fl_components.errors import ConfigError
    from fl_components.tracking import resolve_tracking_uri

    mlflow.set_tracking_uri(resolve_tracking_uri(small_config.tracking))
    experiment = mlflow.create_experiment(  # artifacts under tmp_path, not the checkout
        "legacy", artifact_location=Path(small_config.tracking.artifact_root).as_uri()
    )
    with mlflow.start_run(
        experiment_id=experiment
    ) as run:  # logged as an older fedpipe did: the pickled model only
        mlflow.pytorch.log_model(
            torch.nn.Linear(3, 2), name="model", pip_requirements=[], serialization_format="pickle"
        )
    monkeypatch.delenv("FEDPIPE_ALLOW_PICKLED_MODELS", raising=False)

    with pytest.raises(ConfigError) as error:
        load_run_model(small_config.tracking, run_id=run.info.run_id)

    message = str(error.value)
    assert f"init_run_id {run.info.run_id!r}" in message
    assert "does not unpickle" in message and "FEDPIPE_ALLOW_PICKLED_MODELS=1" in message
    monkeypatch.setenv("FEDPIPE_ALLOW_PICKLED_MODELS", "1")
    loaded = load_run_model(small_config.tracking, run_id=run.info.run_id)
    assert isinstance(loaded, torch.nn.Linear)


def test_an_older_champion_without_safetensors_is_not_compared_and_the_run_goes_on(
    small_config: FederationConfig, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Upgrading fedpipe must not fail a recurring run at its end on the old champion."""
    from fl_components.federation import materialize_sites
    from fl_components.round.types import Metrics
    from fl_components.site.jobs import InProcessSites
    from tasks.promotion import promote_if_better

    materialize_sites(small_config)
    example = np.zeros((2, 64), np.float32)
    first = RunTracker(small_config)
    first.start(run_name="before-upgrade", tags={})
    old = first.log_model(
        torch.nn.Sequential(torch.nn.Linear(64, 10)), input_example=example, register=True
    )
    assert old is not None
    first.set_alias("champion", old)
    first.end()
    # as an older fedpipe logged it: the MLflow model only, no safetensors weights
    weights = list(Path(small_config.tracking.artifact_root).rglob("parameters.safetensors"))
    assert weights
    for path in weights:
        path.unlink()
    monkeypatch.delenv("FEDPIPE_ALLOW_PICKLED_MODELS", raising=False)

    tracker = RunTracker(small_config)
    tracker.start(run_name="after-upgrade", tags={})
    version = tracker.log_model(
        torch.nn.Sequential(torch.nn.Linear(64, 10)), input_example=example, register=True
    )
    assert version is not None and version != old
    scores = {s: Metrics(loss=1.0, accuracy=0.5, examples=10) for s in small_config.site_names}
    decision = promote_if_better(
        small_config,
        InProcessSites(small_config),
        tracker,
        version=version,
        challenger_scores=scores,
    )
    tracker.end()
    assert decision.alias == "champion"
    assert f"champion version {old} could not be scored" in decision.reason


def test_a_champion_of_another_architecture_is_never_sent_to_the_sites(
    small_config: FederationConfig, caplog: pytest.LogCaptureFixture
) -> None:
    """A run that changed model.hidden: its sites would only fail on the old champion."""
    from fl_components.round.types import Metrics
    from tasks.promotion import promote_if_better

    example = np.zeros((2, 64), np.float32)
    first = RunTracker(small_config)
    first.start(run_name="small-model", tags={})
    old = first.log_model(
        torch.nn.Sequential(torch.nn.Linear(64, 10)), input_example=example, register=True
    )
    assert old is not None
    first.set_alias("champion", old)
    first.end()
    bigger = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 10))
    tracker = RunTracker(small_config)
    tracker.start(run_name="bigger-model", tags={})
    version = tracker.log_model(bigger, input_example=example, register=True)
    assert version is not None
    dispatched: list[object] = []
    scores = {s: Metrics(loss=1.0, accuracy=0.5, examples=10) for s in small_config.site_names}

    with caplog.at_level(logging.WARNING):
        decision = promote_if_better(
            small_config,
            lambda jobs: dispatched.append(jobs) or {},  # type: ignore[arg-type,func-returns-value]
            tracker,
            version=version,
            challenger_scores=scores,
            shapes=[tuple(p.shape) for p in bigger.parameters()],
        )
    tracker.end()

    assert dispatched == []
    assert decision.alias == "champion"
    assert f"champion version {old} not compared: another architecture" in caplog.text


def test_a_model_of_named_inputs_is_called_with_a_dataframe_in_any_column_order(
    small_config: FederationConfig,
) -> None:
    import pandas as pd

    import mlflow

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 2))
    tracker = RunTracker(small_config)
    link = tracker.start(run_name="named-inputs", tags={})
    names = ("age", "income", "region=north")
    tracker.log_model(
        model, input_example=np.zeros((2, 3), np.float32), register=False, input_names=names
    )
    tracker.end()
    pyfunc = mlflow.pyfunc.load_model(f"runs:/{link.run_id}/{small_config.name}")

    assert pyfunc.metadata.get_input_schema().input_names() == list(names)
    rows = np.array([[30.0, 1.5, 1.0], [50.0, -0.5, 0.0]], np.float32)
    ordered = pd.DataFrame(rows, columns=list(names))
    shuffled = ordered[["region=north", "age", "income"]]  # another order: matched by name
    expected = model(torch.from_numpy(rows)).detach().numpy()
    np.testing.assert_allclose(np.asarray(pyfunc.predict(ordered)), expected, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(pyfunc.predict(shuffled)), expected, rtol=1e-5)
