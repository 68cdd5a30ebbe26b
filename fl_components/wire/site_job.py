"""The site job: what the coordinator sends a site across the work-pool boundary, typed.

One message, written once, used by the coordinator's work-pool task (which builds it), the
participant flow (which takes it as its only parameter) and the tests. It carries references
and small values only, never an array: the global model (and SCAFFOLD's server control
variate) as a file in exchange storage named by its SHA-256, or as a delta/full download,
FedProx's μ, secure aggregation's round context and unmask request, the folded evaluation's
round, the compression instruction. Prefect validates it against this model before the
flow runs; anything unknown is refused (``extra="forbid"``). ``version`` changes when the
meaning of a field does, so a site refuses a message it cannot read rather than misread it.

This is the message the coordinator signs and the site verifies before it touches its data
(DESIGN.md, "Trust").
"""

from __future__ import annotations

from typing import Any, ClassVar, Final, Literal, Self

from pydantic import BaseModel, ConfigDict, Field, model_validator

from fl_components.config import FederationConfig

SITE_JOB_VERSION: Final = 1

Stage = Literal["train", "mask", "unmask", "evaluate"]

_SHA256 = r"^[0-9a-f]{64}$"


class _Message(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class ModelRef(_Message):
    """An array file in exchange storage and the SHA-256 it must hash to."""

    uri: str = Field(min_length=1)
    sha256: str = Field(pattern=_SHA256)


class ModelDownloadRef(_Message):
    """The model as a delta against the one the site holds, and in full.

    ``compression.download: delta``: the site applies ``delta_uri`` to the model it holds when
    that hashes to ``base_sha256``, else reads ``full_uri``; either way the result must hash
    to ``sha256``.
    """

    sha256: str = Field(pattern=_SHA256)
    base_sha256: str = ""
    delta_uri: str = ""
    full_uri: str = Field(min_length=1)
    shapes: list[list[int]]


class InstructionsRef(_Message):
    """What the strategy sends with a training job (see ``SiteInstructions``)."""

    proximal_mu: float = Field(default=0.0, ge=0.0)
    report_initial_loss: bool = False
    server_control: ModelRef | None = None  # SCAFFOLD's c, as a file in exchange storage


class SecureStageRef(_Message):
    """Secure aggregation's round context (JSON) and, for ``unmask``, the request (base64)."""

    context: str = Field(min_length=2)
    request: str | None = None


class TaskRef(_Message):
    """The identity of the task code the coordinator ran and expects the site to run.

    See :class:`fl_components.task.loading.TaskIdentity`: the config's task spec, its
    package, installed version and SHA-256 over its source files.
    """

    spec: str = Field(min_length=1, max_length=200)
    package: str = Field(min_length=1, max_length=200)
    version: str = Field(max_length=100)
    sha256: str = Field(pattern=_SHA256)


class SiteJobMessage(_Message):
    """One stage of one round for one site, as the participant flow's only parameter.

    Attributes
    ----------
    version : int
        The message format (:data:`SITE_JOB_VERSION`).
    federation : FederationConfig
        The run's federation config.
    site, run_id, mlflow_run_id :
        Who the job is for; the coordinator's Prefect flow run and MLflow run.
    round, stage :
        Which round, and what to do (``train``, ``mask``, ``unmask``, ``evaluate``).
    model, download :
        The global model, as one file or as a delta/full download (neither for ``unmask``).
    secagg :
        Secure aggregation's context (``mask``, ``unmask``) and unmask request (``unmask``).
    evaluate_round :
        ``train``/``mask``: first score the received model as the federated evaluation of
        that round.
    task_code :
        The task code's hash (the site refuses one its policy does not accept).
    task :
        The identity of the user's task code (or the built-in task's), as the coordinator
        has it installed: the site refuses to train with code that hashes otherwise and
        writes it into its audit log.
    instructions, compression :
        The strategy's instructions; the compression instruction (``CompressionInstruction``
        as a dict).
    """

    # signed with this type in the signed bytes (fl_components.wire.signing)
    WIRE_TYPE: ClassVar[str] = f"fedpipe-site-job/v{SITE_JOB_VERSION}"

    version: Literal[1] = SITE_JOB_VERSION
    federation: FederationConfig
    site: str = Field(min_length=1)
    run_id: str = Field(min_length=1)
    mlflow_run_id: str = ""
    round: int = Field(ge=0)  # 0: the initial model's evaluation
    stage: Stage
    model: ModelRef | None = None
    download: ModelDownloadRef | None = None
    secagg: SecureStageRef | None = None
    evaluate_round: int | None = Field(default=None, ge=0)
    instructions: InstructionsRef = InstructionsRef()
    compression: dict[str, Any] | None = None
    task_code: str = Field(
        default="",
        description="SHA-256 of the fedpipe task code the coordinator expects the site to run "
        "(fl_components.site.admission.installed_task_code); the site's policy accepts it or not.",
    )

    task: TaskRef | None = None

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        if self.stage in ("mask", "unmask") and self.secagg is None:
            raise ValueError(f"stage {self.stage!r} needs secagg (the round context)")
        if self.stage == "unmask":
            if self.secagg is None or not self.secagg.request:
                raise ValueError("stage 'unmask' needs secagg.request (the unmask request)")
            if self.model is not None or self.download is not None:
                raise ValueError("stage 'unmask' carries no model")
        elif (self.model is None) == (self.download is None):
            raise ValueError(f"stage {self.stage!r} needs exactly one of model and download")
        if self.site not in self.federation.site_names:
            raise ValueError(
                f"site {self.site!r} is not in federation {self.federation.name!r} "
                f"(sites: {', '.join(self.federation.site_names)})"
            )
        return self

    def to_parameters(self) -> dict[str, Any]:
        """The flow run's parameters: ``{"job": <this message as JSON>}``.

        The federation config goes as the fields that were set: a dump of every field would
        not validate again (a strategy's knobs are checked against the strategy's name).
        """
        body = self.model_dump(mode="json", exclude={"federation"})
        body["federation"] = self.federation.model_dump(mode="json", exclude_unset=True)
        return {"job": body}

    @property
    def model_sha256(self) -> str:
        """The SHA-256 the received model must hash to ('' for ``unmask``)."""
        if self.download is not None:
            return self.download.sha256
        return self.model.sha256 if self.model is not None else ""
