"""The real coordinator flow under a real (temporary) Prefect server, tracked in real MLflow."""

import time

import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from fl_components.errors import RoundError
from fl_components.federation import federation_dir, materialize_sites
from flows.federated_training import federated_training
from flows.progress import listening

pytestmark = pytest.mark.usefixtures("prefect_harness")


def test_three_sites_two_rounds_end_to_end(small_config) -> None:
    events = []

    with listening(lambda event, payload: events.append(event)):
        summary = federated_training(small_config)

    client = MlflowClient(tracking_uri=small_config.tracking.tracking_uri)
    run = client.get_run(summary.mlflow_run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags["prefect.flow_run_id"]
    assert run.data.params["training.epochs"] == "2"
    assert run.data.params["sites.count"] == "3"
    for key in ("global/accuracy", "global/loss", "participants", "bytes/up", "round_seconds"):
        steps = [m.step for m in client.get_metric_history(run.info.run_id, key)]
        assert {1, 2} <= set(steps), key
    for site in ("site-0", "site-1", "site-2"):
        steps = [
            m.step for m in client.get_metric_history(run.info.run_id, f"site/{site}/accuracy")
        ]
        assert sorted(steps) == [0, 1, 2]
    for key in ("eval/sites", "eval/partial"):  # once a step, the last step included
        steps = [m.step for m in client.get_metric_history(run.info.run_id, key)]
        assert sorted(steps) == [0, 1, 2], (key, steps)
    for key in ("promotion/sites", "promotion/partial"):  # the comparison's, once
        assert len(client.get_metric_history(run.info.run_id, key)) == 1, key
    participants = client.get_metric_history(run.info.run_id, "participants")
    assert all(m.value == 3 for m in participants)
    assert events == ["start", "round", "round", "end"]
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "plots")}
    assert "plots/accuracy.png" in artifacts

    import mlflow

    mlflow.set_tracking_uri(small_config.tracking.tracking_uri)
    model = mlflow.pyfunc.load_model(f"models:/{small_config.name}/{summary.model_version}")
    test = np.load(federation_dir(small_config) / "_central" / "test.npz")
    predictions = np.asarray(model.predict(test["x"]))
    assert predictions.shape == (len(test["y"]), 10)
    # the registered model is the final global model: it scores what the run logged
    accuracy = float((predictions.argmax(axis=1) == test["y"]).mean())
    assert accuracy == pytest.approx(summary.final_accuracy, abs=1e-6)
    assert summary.final_accuracy > 0.5
    _check_run_summary(client, summary, small_config.name)


def _check_run_summary(client: MlflowClient, summary, federation: str) -> None:  # type: ignore[no-untyped-def]
    """The run's summary in Prefect; its description, version and experiment in MLflow."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    with get_client(sync_client=True) as prefect:
        artifacts = prefect.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[f"{federation}-summary"]))
        )
    (artifact,) = [a for a in artifacts if str(a.flow_run_id) == summary.prefect_flow_run_id]
    markdown = str(artifact.data)
    assert f"# {federation}: run summary" in markdown
    assert "accuracy on the central test split" in markdown and "federated accuracy" in markdown
    assert "promotion: **champion**: no champion yet" in markdown
    assert summary.mlflow_run_id in markdown and "Not a deployment run" in markdown

    run = client.get_run(summary.mlflow_run_id)
    assert run.data.tags["mlflow.note.content"].startswith(markdown)
    assert run.data.tags["fedpipe.promotion_held"] == "none"
    version = client.get_model_version(federation, summary.model_version)
    assert f"from MLflow run {summary.mlflow_run_id}" in version.description
    assert version.tags["fedpipe.strategy"] == "fedavg" and version.tags["fedpipe.rounds"] == "2"
    assert version.tags["fedpipe.source_run"] == summary.mlflow_run_id
    assert float(version.tags["fedpipe.federated_accuracy"]) > 0.5
    (logged,) = client.search_logged_models(
        [run.info.experiment_id], filter_string=f"source_run_id = '{summary.mlflow_run_id}'"
    )
    assert logged.name == federation  # not "model"
    experiment = client.get_experiment(run.info.experiment_id)
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"


def test_a_broken_site_drops_out_and_the_round_goes_on(small_config) -> None:
    materialize_sites(small_config)
    (federation_dir(small_config) / "site-2" / "train.npz").write_bytes(b"not an npz")

    summary = federated_training(small_config)

    client = MlflowClient(tracking_uri=small_config.tracking.tracking_uri)
    dropouts = client.get_metric_history(summary.mlflow_run_id, "dropouts")
    participants = client.get_metric_history(summary.mlflow_run_id, "participants")
    assert [m.value for m in dropouts] == [1.0, 1.0]
    assert [m.value for m in participants] == [2.0, 2.0]


def test_too_few_participants_aborts_without_touching_the_model(small_config) -> None:
    config = small_config.model_copy(
        update={
            "participation": small_config.participation.model_copy(update={"min_participants": 3})
        }
    )
    materialize_sites(config)
    (federation_dir(config) / "site-0" / "train.npz").write_bytes(b"tampered")

    with pytest.raises(RoundError, match="only 2 of 3 sites returned a valid update"):
        federated_training(config)

    client = MlflowClient(tracking_uri=config.tracking.tracking_uri)
    runs = client.search_runs([client.get_experiment_by_name(config.name).experiment_id])
    assert runs[0].info.status == "FAILED"
    assert client.search_registered_models() == []


def test_a_failing_round_still_logs_the_previous_rounds_evaluation(
    small_config, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Round t's evaluation travels with round t+1's dispatch: when round t+1 fails, round t
    is still evaluated and logged before the run fails."""
    from fl_components.errors import DataError
    from fl_components.federation import Site

    config = small_config.model_copy(update={"rounds": 3})
    real = Site.train

    def fails_in_round_2(self, parameters, *, round_num, **kwargs):  # type: ignore[no-untyped-def]
        if round_num == 2:  # every site's files vanish: the round aborts after the dispatch
            raise DataError(f"site {self.name!r}: train.npz is missing (test)")
        return real(self, parameters, round_num=round_num, **kwargs)

    monkeypatch.setattr(Site, "train", fails_in_round_2)
    with pytest.raises(RoundError, match="round 2: only 0 of 3"):
        federated_training(config)

    client = MlflowClient(tracking_uri=config.tracking.tracking_uri)
    run = client.search_runs([client.get_experiment_by_name(config.name).experiment_id])[0]
    assert run.info.status == "FAILED"
    history = client.get_metric_history(run.info.run_id, "global/accuracy")
    assert sorted(m.step for m in history) == [0, 1]
    steps = client.get_metric_history(run.info.run_id, "site/site-0/accuracy")
    assert sorted(m.step for m in steps) == [0, 1]


def test_many_sites_run_as_cohorts_of_sites_per_task(small_config) -> None:
    """Past runner.cohort_threshold jobs a wave runs as cohorts; every site still counts."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    config = small_config.model_copy(
        update={"runner": small_config.runner.model_copy(update={"cohort_threshold": 2})}
    )
    broken = federation_dir(config) / "site-2" / "train.npz"
    materialize_sites(config)
    broken.write_bytes(b"not an npz")

    summary = federated_training(config)

    client = MlflowClient(tracking_uri=config.tracking.tracking_uri)
    participants = client.get_metric_history(summary.mlflow_run_id, "participants")
    assert [m.value for m in participants] == [2.0, 2.0]  # site-2's bad data: its own dropout
    # task runs reach the server as events, recorded a moment after the flow returns: wait
    # for them (up to 180 s: a loaded server records events behind) rather than read a
    # half-written history
    names: set[str] = set()
    deadline = time.monotonic() + 180
    while not {"cohort-0-r1", "cohort-1-r1"} <= names and time.monotonic() < deadline:
        time.sleep(0.5)
        with get_client(sync_client=True) as prefect:
            runs = prefect.read_task_runs(
                flow_run_filter=FlowRunFilter(
                    id=FlowRunFilterId(any_=[summary.prefect_flow_run_id])
                )
            )
        names = {run.name for run in runs}
    assert {"cohort-0-r1", "cohort-1-r1"} <= names
    assert not any(name.startswith("train-") for name in names)


def test_an_aborted_round_is_retried_after_a_backoff_and_logged_once(
    small_config, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Round 2 finds every site failing once (a transient outage): with round_retries 2 it is
    tried again after the backoff and the run finishes, each metric once per step; without
    retries the same outage fails the run, and a lasting one fails it after the retries."""
    from fl_components.errors import DataError
    from fl_components.federation import Site

    participation = small_config.participation.model_copy(
        update={"round_retries": 2, "retry_backoff_seconds": 0.1}
    )
    config = small_config.model_copy(update={"rounds": 3, "participation": participation})
    real = Site.train
    failed: list[str] = []

    def outage_in_round_2(self, parameters, *, round_num, **kwargs):  # type: ignore[no-untyped-def]
        if round_num == 2 and self.name not in failed:  # each site fails its first try
            failed.append(self.name)
            raise DataError(f"site {self.name!r}: train.npz is missing (test)")
        return real(self, parameters, round_num=round_num, **kwargs)

    monkeypatch.setattr(Site, "train", outage_in_round_2)
    summary = federated_training(config)

    client = MlflowClient(tracking_uri=config.tracking.tracking_uri)
    for key in ("global/accuracy", "participants", "site/site-0/accuracy"):
        steps = [m.step for m in client.get_metric_history(summary.mlflow_run_id, key)]
        assert sorted(steps) == sorted(set(steps)), key  # never twice at one step
    participants = client.get_metric_history(summary.mlflow_run_id, "participants")
    assert sorted((m.step, m.value) for m in participants) == [(1, 3.0), (2, 3.0), (3, 3.0)]

    def always_in_round_2(self, parameters, *, round_num, **kwargs):  # type: ignore[no-untyped-def]
        if round_num == 2:
            raise DataError(f"site {self.name!r}: train.npz is missing (test)")
        return real(self, parameters, round_num=round_num, **kwargs)

    monkeypatch.setattr(Site, "train", always_in_round_2)
    with pytest.raises(RoundError, match=r"round 2: only 0 of 3.*\(after 2 retries\)"):
        federated_training(config)


def _model_copies(shape: tuple[int, ...]) -> int:
    """How many distinct buffers of ``shape`` (the model's first layer) are alive."""
    import gc

    gc.collect()
    buffers = set()
    for holder in gc.get_objects():  # arrays are not tracked themselves: their holders are
        for found in gc.get_referents(holder):
            if isinstance(found, np.ndarray) and found.shape == shape:
                base = found
                while isinstance(base.base, np.ndarray):
                    base = base.base
                buffers.add(base.__array_interface__["data"][0])
    return len(buffers)


def test_between_rounds_the_coordinator_holds_two_models_not_five(small_config) -> None:
    """The applied aggregate, the last report's updates and θ_0 are let go.

    Held while a round's evaluation is logged: the new global model and the one before it
    (whose central evaluation and checkpoint that logging writes). The old flow held five
    (θ_0 all run, both reports' aggregates): at 100M parameters 1.2 GB more.
    """
    config = small_config.model_copy(
        update={
            "rounds": 3,
            "model": small_config.model.model_copy(update={"hidden": [97]}),
            "tracking": small_config.tracking.model_copy(update={"register_model": False}),
        }
    )
    held: list[int] = []

    def count(event: str, payload: dict) -> None:  # type: ignore[type-arg]
        if event == "round":
            held.append(_model_copies((97, 64)))

    with listening(count):
        federated_training(config)
    assert held and max(held) <= 2, held
