"""MLflow tracking: the one module that speaks to MLflow.

One experiment per federation; one run per training flow run, tagged with the Prefect flow
run id; params are the whole config, flat; metrics use ``step = round``. The final model is
logged with a signature and registered under the federation's name.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from fl_components.config import FederationConfig, TrackingConfig, flatten_config
from fl_components.errors import ConfigError
from fl_components.exchange import ExchangeError, check_payload_size

if TYPE_CHECKING:
    from torch import nn

log = logging.getLogger(__name__)

# MLflow infers requirements by importing the model's environment (~6 s) and writes torch
# without its local "+cpu" tag; state them instead.
_PIP_REQUIREMENTS = ["torch==2.13.0", "numpy", "mlflow==3.17.2"]
# The logged model's parameters as safetensors, next to MLflow's pickled torch model: what
# fedpipe reads back (init_from, the champion's evaluation), so that nothing in the store,
# which other parties may write to, is ever unpickled here.
WEIGHTS_ARTIFACT_DIR = "model_weights"
WEIGHTS_FILE = "parameters.safetensors"
ALLOW_PICKLED_ENV = "FEDPIPE_ALLOW_PICKLED_MODELS"
# MLflow 3's UI opens an experiment in its GenAI view (traces) unless the experiment is
# tagged as model training, or the link asks for the classic view
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
MODEL_TRAINING_KIND = "custom_model_development"
CLASSIC_VIEW = "workflowType=machine_learning"


def run_url(base_url: str, *, experiment_id: str, run_id: str) -> str:
    """The MLflow UI's page of a run, in its classic (model-training) view."""
    base = base_url.rstrip("/")
    return f"{base}/#/experiments/{experiment_id}/runs/{run_id}?{CLASSIC_VIEW}"


def model_version_url(base_url: str, *, name: str, version: str) -> str:
    """The MLflow UI's page of a registered model version, in its classic view."""
    return f"{base_url.rstrip('/')}/#/models/{name}/versions/{version}?{CLASSIC_VIEW}"


def _quiet_mlflow() -> None:
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    os.environ.setdefault("GIT_PYTHON_REFRESH", "quiet")
    import mlflow  # noqa: F401  (its first import sets its loggers to INFO: quiet them after)

    for name in ("mlflow", "alembic"):
        logging.getLogger(name).setLevel(logging.WARNING)


def resolve_tracking_uri(config: TrackingConfig) -> str:
    """The configured tracking URI, with a relative SQLite path's folder created.

    The config wins over ``MLFLOW_TRACKING_URI``: MLflow itself sets that variable on
    ``set_tracking_uri``, so it would otherwise leak from one run into the next.
    """
    uri = config.tracking_uri
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        Path(uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    return uri


def open_stores(config: TrackingConfig) -> None:
    """Open (and, the first time, create) a local MLflow store: what a run does first.

    MLflow keeps one store per URI for the process, so a run that follows finds it made;
    the CLI calls this on a background thread while Prefect's server starts. A remote
    tracking server is left alone (its stores are its own).
    """
    uri = resolve_tracking_uri(config)
    if not uri.startswith("sqlite:"):
        return
    _quiet_mlflow()
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    client.search_experiments(max_results=1)  # the tracking store, its tables made
    client.search_registered_models(max_results=1)  # the registry's


@dataclass(frozen=True)
class RunLink:
    """Where a run can be found."""

    experiment_id: str
    run_id: str
    tracking_uri: str


class RunTracker:
    """Records one federated training run in MLflow."""

    def __init__(self, config: FederationConfig) -> None:
        _quiet_mlflow()
        from mlflow.tracking import MlflowClient

        import mlflow

        self._mlflow = mlflow
        self.config = config
        self.tracking_uri = resolve_tracking_uri(config.tracking)
        mlflow.set_tracking_uri(self.tracking_uri)
        mlflow.set_registry_uri(self.tracking_uri)
        self.client = MlflowClient(tracking_uri=self.tracking_uri)
        self.run_id: str | None = None
        self.experiment_id = self._experiment()

    def _experiment(self) -> str:
        existing = self.client.get_experiment_by_name(self.config.name)
        if existing is not None:
            if existing.tags.get(EXPERIMENT_KIND_TAG) is None:  # made by an older fedpipe
                self.client.set_experiment_tag(
                    existing.experiment_id, EXPERIMENT_KIND_TAG, MODEL_TRAINING_KIND
                )
            return str(existing.experiment_id)
        artifact_root = Path(self.config.tracking.artifact_root).resolve() / self.config.name
        is_remote = self.tracking_uri.startswith(("http://", "https://"))
        return str(
            self.client.create_experiment(
                self.config.name,
                artifact_location=None if is_remote else artifact_root.as_uri(),
                tags={
                    "fedpipe.federation": self.config.name,
                    EXPERIMENT_KIND_TAG: MODEL_TRAINING_KIND,
                },
            )
        )

    def start(self, *, run_name: str, tags: Mapping[str, str]) -> RunLink:
        """Create the run, log the flat config as params and the given tags."""
        run = self.client.create_run(
            self.experiment_id,
            run_name=run_name,
            tags={"fedpipe.federation": self.config.name, **tags},
        )
        self.run_id = run.info.run_id
        self.log_params(flatten_config(self.config))
        return RunLink(self.experiment_id, self.run_id, self.tracking_uri)

    def reopen(self, run_id: str, *, tags: Mapping[str, str]) -> RunLink:
        """Continue run ``run_id`` (a resumed training): RUNNING again, no second run.

        Raises
        ------
        ConfigError
            If there is no such run in this federation's experiment.
        """
        from mlflow.exceptions import MlflowException

        try:
            run = self.client.get_run(run_id)
        except MlflowException:
            run = None
        if run is None or run.info.experiment_id != self.experiment_id:
            raise ConfigError(
                f"resume {run_id!r}: no MLflow run of federation {self.config.name!r} has this "
                f"id at {self.tracking_uri}; give the run id `fedpipe run` printed"
            )
        self.client.update_run(run_id, status="RUNNING")
        self.run_id = run_id
        self.set_tags(tags)
        return RunLink(self.experiment_id, run_id, self.tracking_uri)

    def runs_of_flow_run(self, flow_run_id: str) -> list[str]:
        """Ids of this experiment's runs tagged with Prefect flow run ``flow_run_id``."""
        runs = self.client.search_runs(
            [self.experiment_id],
            filter_string=f"tags.`prefect.flow_run_id` = '{flow_run_id}'",
            order_by=["attributes.start_time DESC"],
        )
        return [run.info.run_id for run in runs]

    def log_params(self, params: Mapping[str, Any]) -> None:
        """Log params in batches (MLflow caps a batch at 100)."""
        from mlflow.entities import Param

        items = [Param(k, str(v)[:6000]) for k, v in params.items()]
        for start in range(0, len(items), 100):
            self.client.log_batch(self._run(), params=items[start : start + 100])

    def logged_at(self, key: str, *, step: int) -> bool:
        """Whether metric ``key`` already has a value at ``step`` (a retried write's check)."""
        return any(m.step == step for m in self.client.get_metric_history(self._run(), key))

    def log_metrics(self, metrics: Mapping[str, float], *, step: int) -> None:
        """Log a round's metrics at ``step = round`` in one batch."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [
            Metric(key, float(value), now, step)
            for key, value in metrics.items()
            if value is not None and np.isfinite(value)
        ]
        for start in range(0, len(items), 1000):
            self.client.log_batch(self._run(), metrics=items[start : start + 1000])

    def set_tags(self, tags: Mapping[str, str]) -> None:
        """Set run tags."""
        for key, value in tags.items():
            self.client.set_tag(self._run(), key, value)

    def log_figure(self, figure: Any, artifact_file: str) -> None:
        """Store a matplotlib figure as a run artifact."""
        self.client.log_figure(self._run(), figure, artifact_file)

    def log_dict(self, payload: dict[str, Any], artifact_file: str) -> None:
        """Store a JSON document as a run artifact."""
        self.client.log_dict(self._run(), payload, artifact_file)

    def log_text(self, text: str, artifact_file: str) -> None:
        """Store a text document (markdown) as a run artifact."""
        self.client.log_text(self._run(), text, artifact_file)

    def log_task(self, identity: Mapping[str, str]) -> None:
        """The identity of the task's code (spec, package, version, source SHA-256).

        Params ``task.identity.<field>`` and the tag ``fedpipe.task_sha256``: which code
        touched the sites' data in this run.
        """
        self.log_params({f"task.identity.{key}": value for key, value in identity.items()})
        self.set_tags({"fedpipe.task_sha256": identity.get("sha256", "")})

    def log_model(
        self,
        model: Any,
        *,
        input_example: npt.NDArray[np.float32] | None,
        register: bool,
        input_names: tuple[str, ...] | None = None,
    ) -> str | None:
        """Log the final torch model with a signature; register it; return its version.

        ``input_names`` (the data contract's model inputs, in order) make the signature one
        of named float32 columns: the model can then be called with a DataFrame, whose
        columns MLflow matches by name, in any order.

        Called again for a run that got this far before (resumed after a crash at the end),
        it never makes a second version: the run's registered version is reused, a logged
        model finished but not registered is registered, one the crash left PENDING is
        marked FAILED and logged again. MLflow stages the model in a folder named by the
        run, removed before each attempt: a crash mid-write leaves it for the next one.
        """
        import shutil

        staging = _staging_folder(self._run())
        shutil.rmtree(staging, ignore_errors=True)  # what a killed attempt left
        try:
            version = self._registered_version() if register else None
            if version is None:
                version = self._log_and_register(
                    model, input_example, staging, register, input_names=input_names
                )
            self._log_weights(model, staging)  # (again: the same file, overwritten)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return version

    def _registered_version(self) -> str | None:
        """The version registered from this run already (the lowest, if a bug made two)."""
        found = self.client.search_model_versions(
            f"name = '{self.config.name}' and run_id = '{self._run()}'"
        )
        versions = sorted(int(v.version) for v in found)
        if versions:
            log.warning("run %s registered version %d already: kept", self._run(), versions[0])
        return str(versions[0]) if versions else None

    def _log_and_register(
        self,
        model: Any,
        input_example: npt.NDArray[np.float32] | None,
        staging: Path,
        register: bool,
        *,
        input_names: tuple[str, ...] | None = None,
    ) -> str | None:
        """Log the model (or take the one a crash left logged, unregistered); register it."""
        import tempfile

        from mlflow.entities import LoggedModelStatus

        logged = self._logged_models()
        for pending in (m for m in logged if m.status == LoggedModelStatus.PENDING):
            log.warning("logged model %s was cut short by a crash: FAILED", pending.model_id)
            self.client.finalize_logged_model(pending.model_id, LoggedModelStatus.FAILED)
        ready = [m for m in logged if m.status == LoggedModelStatus.READY]
        if ready:  # logged in full, the crash came before its registration
            if not register:
                return None
            version = self._mlflow.register_model(
                f"models:/{ready[0].model_id}", self.config.name, await_registration_for=60
            )
            return str(version.version)
        example, signature = _signed_example(model, input_example, input_names)
        staging.mkdir(parents=True, exist_ok=True)
        # MLflow stages in tempfile's folder, with no way to name it: point that here while
        # it logs (the process's other threads are idle at the end of a run)
        previous, tempfile.tempdir = tempfile.tempdir, str(staging)
        # the pickle format is chosen on purpose (named inputs): MLflow's caution about it
        # would only alarm the operator; fedpipe loads the safetensors weights, not this file
        mlflow_torch_log = logging.getLogger("mlflow.pytorch")
        level = mlflow_torch_log.level
        if input_names is not None:
            mlflow_torch_log.setLevel(logging.ERROR)
        try:
            with self._mlflow.start_run(run_id=self._run()):
                info = self._mlflow.pytorch.log_model(
                    model,
                    name=self.config.name,  # the federation's model, by name
                    signature=signature,
                    input_example=example,
                    # MLflow's traced format (pt2) takes a tensor signature only; named
                    # columns need its pickle format. fedpipe itself reads the safetensors
                    # weights either way, never this file.
                    serialization_format="pickle" if input_names is not None else None,
                    pip_requirements=_PIP_REQUIREMENTS,
                    registered_model_name=self.config.name if register else None,
                    await_registration_for=60,
                )
        finally:
            tempfile.tempdir = previous
            mlflow_torch_log.setLevel(level)
        registered = getattr(info, "registered_model_version", None)
        return None if registered is None else str(registered)

    def _logged_models(self) -> list[Any]:
        """The logged models whose source is this run, oldest first."""
        found = self.client.search_logged_models(
            [self.experiment_id], filter_string=f"source_run_id = '{self._run()}'"
        )
        return sorted(found, key=lambda m: m.creation_timestamp)

    def _log_weights(self, model: Any, staging: Path) -> None:
        """Log the parameters as safetensors (state_dict order in the metadata)."""
        import json

        from safetensors.numpy import save_file

        state = {k: v.detach().cpu().numpy().copy() for k, v in model.state_dict().items()}
        folder = staging / "weights"
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / WEIGHTS_FILE
        save_file(state, str(path), metadata={"order": json.dumps(list(state))})
        self.client.log_artifact(self._run(), str(path), artifact_path=WEIGHTS_ARTIFACT_DIR)

    def describe(self, text: str) -> None:
        """The run's description (markdown), shown at the top of its MLflow page."""
        self.set_tags({"mlflow.note.content": text})

    def describe_version(self, version: str, *, text: str, tags: Mapping[str, str]) -> None:
        """A registered version's description (markdown) and tags."""
        self.client.update_model_version(self.config.name, version, description=text)
        for key, value in tags.items():
            self.client.set_model_version_tag(self.config.name, version, key, value)

    def set_alias(self, alias: str, version: str) -> None:
        """Point a registry alias (champion, challenger) at a version."""
        self.client.set_registered_model_alias(self.config.name, alias, version)

    def end(self, *, status: str = "FINISHED") -> None:
        """Close the run."""
        if self.run_id is not None:
            self.client.set_terminated(self.run_id, status=status)

    def _run(self) -> str:
        if self.run_id is None:
            raise RuntimeError("RunTracker.start() must be called before logging")
        return self.run_id


def _staging_folder(run_id: str) -> Path:
    """Where run ``run_id``'s final model is staged while it is logged (named by the run)."""
    import tempfile

    return Path(tempfile.gettempdir()) / f"fedpipe-log-model-{run_id}"


def accuracy_plot(history: list[dict[str, float]]) -> Any:
    """A matplotlib figure of global (and per-site mean) accuracy per round."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6, 4))
    rounds = [row["round"] for row in history]
    axis.plot(
        rounds, [row["global/accuracy"] for row in history], marker="o", label="global (test)"
    )
    if all("sites/mean_accuracy" in row for row in history):
        axis.plot(rounds, [row["sites/mean_accuracy"] for row in history], label="sites (mean)")
    axis.set_xlabel("round")
    axis.set_ylabel("accuracy")
    axis.set_ylim(0, 1)
    axis.grid(alpha=0.3)
    axis.legend()
    figure.tight_layout()
    return figure


def registered_version(tracking: TrackingConfig, *, name: str, alias: str) -> str | None:
    """The version number behind ``models:/name@alias``; None if there is no such alias."""
    _quiet_mlflow()
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=resolve_tracking_uri(tracking))
    try:
        return str(client.get_model_version_by_alias(name, alias).version)
    except MlflowException:
        return None


def registered_run_id(tracking: TrackingConfig, *, name: str, alias: str) -> str | None:
    """The MLflow run that logged ``models:/name@alias``; None if there is no such alias."""
    _quiet_mlflow()
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=resolve_tracking_uri(tracking))
    try:
        return client.get_model_version_by_alias(name, alias).run_id
    except MlflowException:
        return None


def read_run_artifact(tracking_uri: str, *, run_id: str, path: str) -> str:
    """The text of artifact ``path`` of MLflow run ``run_id``.

    Raises
    ------
    ConfigError
        When the run or the artifact does not exist in the store at ``tracking_uri``.
    """
    _quiet_mlflow()
    import tempfile

    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    try:
        with tempfile.TemporaryDirectory() as folder:
            local = client.download_artifacts(run_id, path, folder)
            return Path(local).read_text()
    except (MlflowException, OSError) as error:
        raise ConfigError(
            f"run {run_id!r} has no artifact {path!r} in {tracking_uri} ({type(error).__name__}); "
            "check the run id and --tracking-uri (runs log it since privacy reports exist)"
        ) from None


def epsilon_plots(history: list[dict[str, float]]) -> tuple[Any, Any]:
    """Two figures: epsilon per round (federation max and per site), accuracy vs epsilon."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [row for row in history if "privacy/epsilon" in row]
    per_round, axis = plt.subplots(figsize=(6, 4))
    rounds = [row["round"] for row in rows]
    axis.plot(rounds, [row["privacy/epsilon"] for row in rows], marker="o", label="max (sites)")
    site_keys = sorted({k for row in rows for k in row if k.startswith("privacy/site/")})
    for key in (k for k in site_keys if k.endswith("/epsilon")):
        points = [(row["round"], row[key]) for row in rows if key in row]
        axis.plot(*zip(*points, strict=True), alpha=0.5, label=key.split("/")[2])
    if any("privacy/client_epsilon" in row for row in rows):
        key = "privacy/client_epsilon"
        points = [(row["round"], row[key]) for row in rows if key in row]
        axis.plot(*zip(*points, strict=True), linestyle="--", label="participant-level")
    axis.set_xlabel("round")
    axis.set_ylabel("epsilon")
    axis.grid(alpha=0.3)
    axis.legend(fontsize="small")
    per_round.tight_layout()
    trade_off, axis = plt.subplots(figsize=(6, 4))
    axis.plot(
        [row["privacy/epsilon"] for row in rows],
        [row["global/accuracy"] for row in rows],
        marker="o",
    )
    axis.set_xlabel("epsilon spent (federation max)")
    axis.set_ylabel("global accuracy")
    axis.set_ylim(0, 1)
    axis.grid(alpha=0.3)
    trade_off.tight_layout()
    return per_round, trade_off


@dataclass(frozen=True)
class LoggedWeights:
    """A logged model's parameters, read from safetensors: what ``get_parameters`` needs.

    It stands in for the torch module where only its parameters are used (``state_dict()``
    in the module's order), so that loading runs no code from the store.
    """

    tensors: dict[str, Any]

    def state_dict(self) -> dict[str, Any]:
        """The parameters by name, in the logged module's ``state_dict`` order."""
        return dict(self.tensors)


def load_registered_parameters(
    tracking: TrackingConfig, *, name: str, alias: str
) -> LoggedWeights | nn.Module | None:
    """The parameters of the model behind ``models:/name@alias``; None if there is no alias.

    Raises
    ------
    ConfigError
        If that version was logged without its safetensors weights (before fedpipe logged
        them) and ``FEDPIPE_ALLOW_PICKLED_MODELS`` is not set.
    """
    _quiet_mlflow()
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=resolve_tracking_uri(tracking))
    try:
        version = client.get_model_version_by_alias(name, alias)
    except MlflowException:
        return None
    return _load_weights(
        tracking,
        run_id=str(version.run_id or ""),
        model_uri=f"models:/{name}@{alias}",
        what=f"model {name!r} version {version.version} (alias {alias!r})",
    )


def load_run_model(tracking: TrackingConfig, *, run_id: str) -> LoggedWeights | nn.Module:
    """The parameters of the model logged by run ``run_id`` (see :class:`LoggedWeights`).

    Raises
    ------
    ConfigError
        If the run logged no model, or logged it without its safetensors weights and
        ``FEDPIPE_ALLOW_PICKLED_MODELS`` is not set.
    """
    return _load_weights(
        tracking, run_id=run_id, model_uri=f"runs:/{run_id}/model", what=f"init_run_id {run_id!r}"
    )


def _load_weights(
    tracking: TrackingConfig, *, run_id: str, model_uri: str, what: str
) -> LoggedWeights | nn.Module:
    """Read a run's safetensors weights; the pickled model only where explicitly allowed.

    The download goes to a temporary folder removed once the weights are in memory
    (without a ``dst_path`` MLflow leaves one folder per load for the life of the machine).
    """
    import json
    import tempfile

    _quiet_mlflow()
    from mlflow.exceptions import MlflowException

    import mlflow

    uri = resolve_tracking_uri(tracking)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    with tempfile.TemporaryDirectory(prefix="fedpipe-model-") as folder:
        try:
            local = mlflow.artifacts.download_artifacts(
                artifact_uri=f"runs:/{run_id}/{WEIGHTS_ARTIFACT_DIR}/{WEIGHTS_FILE}",
                dst_path=folder,
            )
        except (MlflowException, OSError):
            local = None
        if local is None:
            if os.environ.get(ALLOW_PICKLED_ENV) != "1":
                raise ConfigError(
                    f"{what}: the run has no {WEIGHTS_ARTIFACT_DIR}/{WEIGHTS_FILE} (logged "
                    "by an older fedpipe, or not by fedpipe), and fedpipe does not unpickle "
                    "models from the store; retrain it, or, only if you trust everyone who "
                    f"can write to this MLflow store, set {ALLOW_PICKLED_ENV}=1"
                )
            log.warning("%s: loading a pickled torch model (%s=1)", what, ALLOW_PICKLED_ENV)
            try:
                pickled: nn.Module = mlflow.pytorch.load_model(model_uri, dst_path=folder)
                return pickled
            except MlflowException as error:
                raise ConfigError(f"{what}: no model could be loaded ({error})") from None
        try:
            check_payload_size(Path(local).stat().st_size, what=f"{what} weights")
            return _read_weights(Path(local))
        except (ExchangeError, ValueError, OSError, json.JSONDecodeError) as error:
            raise ConfigError(f"{what}: its weights could not be read ({error})") from None


def _read_weights(path: Path) -> LoggedWeights:
    import json

    import torch
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="numpy") as archive:
            order = json.loads((archive.metadata() or {}).get("order", "[]"))
            names = list(archive.keys())
            if sorted(order) != sorted(names):
                raise ValueError(f"tensor names {names} do not match the recorded order")
            arrays = {str(name): archive.get_tensor(name) for name in order}
    except SafetensorError as error:
        raise ValueError(f"not a safetensors file: {error}") from None
    return LoggedWeights({k: torch.from_numpy(v) for k, v in arrays.items()})


def _signed_example(
    model: Any,
    input_example: npt.NDArray[np.float32] | None,
    input_names: tuple[str, ...] | None,
) -> tuple[Any, Any]:
    """The input example MLflow logs with the model (named columns when given) and its signature.

    A task without an input example: (None, None), the model logged unsigned.
    """
    import torch
    from mlflow.models import infer_signature

    if input_example is None:
        return None, None
    model.eval()
    with torch.no_grad():
        output = model(torch.from_numpy(input_example)).numpy()
    example: Any = input_example
    if input_names is not None:
        import pandas as pd

        if len(input_names) != input_example.shape[1]:
            raise ValueError(
                f"{len(input_names)} input names for a model of {input_example.shape[1]} inputs"
            )
        example = pd.DataFrame(input_example, columns=list(input_names))
    return example, infer_signature(example, output)
