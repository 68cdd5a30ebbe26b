"""The site's own policy: the floor every job must meet, checked at the site, never sent to it.

A site's data steward owns ``<site folder>/policy.yaml``. ``fedpipe site init`` writes it
from the federation's settings (:func:`policy_from_federation`) so that the federation as
configured passes; the steward may then raise any floor. The coordinator never sends it and
a job cannot change it: :func:`check_job` refuses a job that asks for less than the policy
allows, naming the policy line it breaks (:class:`~fl_components.wire.rejection.PolicyBreach`),
and :func:`enforce` replaces the settings a job could lower to spend more of the site's
privacy (its budget and delta) with the policy's before anything runs.

What each line guards
---------------------
- ``federation``, ``coordinator_key_id``: the one federation and coordinator key served.
- ``privacy``: record-level DP-SGD (Abadi et al. 2016, CCS, arXiv:1607.00133) and/or
  participant-level DP-FedAvg (McMahan et al. 2018, ICLR, arXiv:1710.06963) required; the
  smallest noise multipliers; the largest epsilon one run may spend and the site's total, at
  the policy's ``delta``. Participant-level noise is added at the site only under secure
  aggregation (the distributed discrete Gaussian); in the clear the coordinator adds it,
  so a site that wants it enforced also sets ``secure_aggregation.required``.
- ``secure_aggregation``: masked updates required (a clear ``train`` stage is refused), and
  the smallest cohort and threshold (Bonawitz et al. 2017, CCS, arXiv:1611.04482: the
  coordinator learns the sum of at least ``threshold`` updates; a threshold of 1 lets it
  unmask one site's update alone).
- ``task_code``: the task-code hashes the site runs (empty: the code installed here).
- ``task``: the user's task (``module:attribute``) the site runs, and the SHA-256 of its
  source it accepts (:mod:`fl_components.task.loading`); empty: whatever task the job
  names, as installed here. In every case the job's task hash must be the installed one.
- ``rounds``: how many rounds one run may ask, and how many the site trains per day.
- ``columns``: the label and feature columns a job may use (null: any).
- ``approval``: which runs wait for the data steward's signed approval (``never``,
  ``new_config``, ``every_run``) and for how long (:mod:`fl_components.site.approval`).
"""

from __future__ import annotations

import functools
import hashlib
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from fl_components.config import FederationConfig, format_validation_error, parse_yaml
from fl_components.errors import ConfigError
from fl_components.wire.rejection import PolicyBreach, RejectedJob, RejectReason

POLICY_FILE = "policy.yaml"
Stage = Literal["train", "mask", "unmask", "evaluate"]
# stages that compute on the site's training data and release something derived from it
TRAINING_STAGES = ("train", "mask")


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class PrivacyFloor(_Section):
    """The least privacy a job may ask of this site."""

    record_dp_required: bool = Field(
        default=False, description="Every training job runs DP-SGD (privacy.mode record|both)."
    )
    participant_dp_required: bool = Field(
        default=False, description="Every training job uses DP-FedAvg (mode participant|both)."
    )
    min_noise_multiplier: float | None = Field(
        default=None, gt=0, description="Smallest DP-SGD sigma (privacy.noise_multiplier)."
    )
    min_client_noise_multiplier: float | None = Field(
        default=None, gt=0, description="Smallest DP-FedAvg z (privacy.client_noise_multiplier)."
    )
    max_epsilon_per_run: float | None = Field(
        default=None, gt=0, description="Most record-level epsilon one coordinator run spends here."
    )
    max_epsilon_total: float | None = Field(
        default=None, gt=0, description="The site's record-level budget across all runs."
    )
    delta: float | None = Field(
        default=None,
        gt=0,
        lt=1,
        description="Epsilon is accounted at this delta; a job may ask a smaller one only.",
    )

    @model_validator(mode="after")
    def _run_within_total(self) -> PrivacyFloor:
        run, total = self.max_epsilon_per_run, self.max_epsilon_total
        if run is not None and total is not None and run > total:
            raise ValueError(
                f"privacy.max_epsilon_per_run ({run}) exceeds privacy.max_epsilon_total "
                f"({total}); lower it"
            )
        return self


class SecureAggregationFloor(_Section):
    """Whether updates must be masked, and among how many."""

    required: bool = Field(default=True, description="Refuse every update sent in the clear.")
    min_cohort: int = Field(
        default=3, ge=3, le=100_000, description="Fewest sites in a secure round."
    )
    min_threshold: int = Field(
        default=2, ge=2, le=100_000, description="Smallest secure-aggregation threshold t."
    )


class TaskCode(_Section):
    """The code a job may run here, by SHA-256 (:func:`task_code_digest`)."""

    accepted: tuple[str, ...] = Field(
        default=(),
        description="Accepted task-code hashes; empty = only the fedpipe installed at the site.",
    )


class TaskPin(_Section):
    """The user's task this site runs, pinned by spec and source hash (empty: not pinned)."""

    spec: str | None = Field(
        default=None, description="The only task (module:attribute) a job may name."
    )
    sha256: tuple[str, ...] = Field(
        default=(),
        description="Accepted SHA-256 of the task's source (`fedpipe site check` prints it); "
        "empty = the task as installed here.",
    )


class RoundLimits(_Section):
    """How much work the site takes on."""

    max_per_run: int = Field(default=1000, ge=1, le=1_000_000)
    max_per_day: int = Field(default=10_000, ge=1, le=10_000_000)


class ColumnRules(_Section):
    """Which columns of the site's files a job may use (null: any)."""

    labels: tuple[str, ...] | None = None
    features: tuple[str, ...] | None = None


class ApprovalRule(_Section):
    """When a run waits for the site's data steward (``fedpipe site approve|reject``).

    ``never``: no approval. ``new_config``: a run whose config hash and task code this
    site has not approved before waits; a recurring run of an approved config goes
    without asking. ``every_run``: every coordinator run waits once (its later rounds go
    on the same decision).
    """

    mode: Literal["never", "new_config", "every_run"] = Field(
        default="never", description="Which runs wait for the steward's signed approval."
    )
    timeout_seconds: int = Field(
        default=3600,
        ge=1,
        le=7 * 86_400,
        description="How long a run waits; then the site declines it (typed `declined`).",
    )


class SitePolicy(_Section):
    """A site's policy file (``policy.yaml`` in its folder)."""

    version: Literal[1] = 1
    federation: str = Field(min_length=1, description="The one federation this site serves.")
    coordinator_key_id: str = Field(
        pattern=r"^[0-9a-f]{64}$", description="The coordinator key this site serves."
    )
    privacy: PrivacyFloor = PrivacyFloor()
    secure_aggregation: SecureAggregationFloor = SecureAggregationFloor()
    task_code: TaskCode = TaskCode()
    task: TaskPin = TaskPin()
    rounds: RoundLimits = RoundLimits()
    columns: ColumnRules = ColumnRules()
    approval: ApprovalRule = ApprovalRule()

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the policy as YAML (atomically), with a header saying who owns it."""
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        header = (
            "# This site's policy: its data steward owns it; the coordinator never sends it.\n"
            "# A job asking for less is refused, naming the line.\n"
            "# Check it: fedpipe site policy check\n"
        )
        body = yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)
        partial = target.with_name(f".{target.name}.{os.getpid()}.tmp")
        partial.write_text(header + body, encoding="utf-8")
        partial.replace(target)
        return target


def policy_path(folder: str | os.PathLike[str]) -> Path:
    """The policy file of the site whose folder is ``folder``."""
    return Path(folder) / POLICY_FILE


def load_policy(path: str | os.PathLike[str]) -> SitePolicy:
    """Read and validate a policy file.

    Raises
    ------
    ConfigError
        If the file is missing, not YAML, or a setting is invalid (naming it and the value).
    """
    target = Path(path)
    if not target.is_file():
        raise ConfigError(
            f"site policy {target} does not exist; a site runs no job without one: "
            "`fedpipe site init` writes it from the federation's settings"
        )
    raw = parse_yaml(target.read_text(encoding="utf-8"), source=str(target))
    if not isinstance(raw, dict):
        raise ConfigError(f"{target}: expected a mapping at the top level")
    try:
        return SitePolicy.model_validate(raw)
    except ValidationError as error:
        raise ConfigError(format_validation_error(error, source=str(target))) from None


def policy_from_federation(config: FederationConfig, *, coordinator_key_id: str) -> SitePolicy:
    """The policy ``site init`` writes: the federation's own settings, as a floor.

    The federation as configured passes it; a job that lowers any of them is refused.
    Unset budgets stay unset (the steward decides them); the cohort and threshold floors
    are at least 3 and 2.
    """
    privacy, secagg = config.privacy, config.secure_aggregation
    cohort = max(3, min(len(config.sites), config.participation.min_participants))
    return SitePolicy(
        federation=config.name,
        coordinator_key_id=coordinator_key_id,
        privacy=PrivacyFloor(
            record_dp_required=privacy.record_level,
            participant_dp_required=privacy.participant_level,
            min_noise_multiplier=privacy.noise_multiplier if privacy.record_level else None,
            min_client_noise_multiplier=(
                privacy.client_noise_multiplier if privacy.participant_level else None
            ),
            max_epsilon_per_run=privacy.target_epsilon if privacy.record_level else None,
            max_epsilon_total=privacy.max_epsilon if privacy.record_level else None,
            delta=privacy.delta,
        ),
        secure_aggregation=SecureAggregationFloor(
            required=secagg.enabled,
            min_cohort=cohort,
            min_threshold=max(2, secagg.threshold or 2),
        ),
        rounds=RoundLimits(max_per_run=max(config.rounds, 1)),
        columns=ColumnRules(
            labels=(config.data.label_column,) if config.data.source == "site_files" else None
        ),
    )


def task_code_digest(root: str | os.PathLike[str]) -> str:
    """SHA-256 over the Python sources under ``root`` (path and bytes, in sorted order).

    ``root`` is the installed ``fl_components`` package: what a site runs for any job.
    """
    base = Path(root)
    digest = hashlib.sha256()
    for path in sorted(base.rglob("*.py")):
        relative = path.relative_to(base).as_posix().encode()
        content = path.read_bytes()
        digest.update(len(relative).to_bytes(4, "big") + relative)
        digest.update(len(content).to_bytes(8, "big") + content)
    return digest.hexdigest()


@functools.cache
def installed_task_code() -> str:
    """The SHA-256 of the ``fl_components`` sources installed here (what every job runs).

    The coordinator names it in each job; a site whose policy accepts no other hash runs
    jobs only from a coordinator with the same code.
    """
    return task_code_digest(Path(__file__).resolve().parents[1])


def _breach(line: str, message: str) -> PolicyBreach:
    return PolicyBreach(line, message)


def _check_privacy(floor: PrivacyFloor, config: FederationConfig) -> None:
    privacy = config.privacy
    if floor.record_dp_required and not privacy.record_level:
        raise _breach(
            "privacy.record_dp_required",
            f"the job's privacy.mode is {privacy.mode!r}; this site trains only with "
            "record-level DP (privacy.mode 'record' or 'both')",
        )
    if floor.participant_dp_required and not privacy.participant_level:
        raise _breach(
            "privacy.participant_dp_required",
            f"the job's privacy.mode is {privacy.mode!r}; this site trains only with "
            "participant-level DP (privacy.mode 'participant' or 'both')",
        )
    minimum = floor.min_noise_multiplier
    sigma = privacy.noise_multiplier
    if privacy.record_level and minimum is not None and sigma is not None and sigma < minimum:
        raise _breach(
            f"privacy.min_noise_multiplier ({minimum:g})",
            f"the job's privacy.noise_multiplier is {sigma:g}; raise it to at least {minimum:g}",
        )
    z_min = floor.min_client_noise_multiplier
    if privacy.participant_level and z_min is not None and privacy.client_noise_multiplier < z_min:
        raise _breach(
            f"privacy.min_client_noise_multiplier ({z_min:g})",
            f"the job's privacy.client_noise_multiplier is "
            f"{privacy.client_noise_multiplier:g}; raise it to at least {z_min:g}",
        )
    per_run = floor.max_epsilon_per_run
    target = privacy.target_epsilon
    if privacy.record_level and per_run is not None and target is not None and target > per_run:
        raise _breach(
            f"privacy.max_epsilon_per_run ({per_run:g})",
            f"the job's privacy.target_epsilon is {target:g}; lower it to at most {per_run:g}",
        )
    if floor.delta is not None and privacy.delta is not None and privacy.delta > floor.delta:
        raise _breach(
            f"privacy.delta ({floor.delta:g})",
            f"the job's privacy.delta is {privacy.delta:g}; this site accounts at delta "
            f"{floor.delta:g} or smaller",
        )


def _check_secure_aggregation(
    floor: SecureAggregationFloor,
    config: FederationConfig,
    *,
    stage: Stage,
    cohort: int | None,
    threshold: int | None,
) -> None:
    if floor.required and not config.secure_aggregation.enabled and stage in TRAINING_STAGES:
        raise _breach(
            "secure_aggregation.required (true)",
            "the job's secure_aggregation.enabled is false; this site sends updates only "
            "masked (set secure_aggregation.enabled: true)",
        )
    if floor.required and stage == "train":
        raise _breach(
            "secure_aggregation.required (true)",
            "the job asks for the 'train' stage, which answers with the update in the clear; "
            "this site answers training only as the 'mask' stage of a secure round",
        )
    if stage not in ("mask", "unmask"):
        return
    if cohort is None or threshold is None:
        raise RejectedJob(
            RejectReason.MALFORMED, f"a {stage!r} job must carry its round's cohort and threshold"
        )
    if cohort < floor.min_cohort:
        raise _breach(
            f"secure_aggregation.min_cohort ({floor.min_cohort})",
            f"the round has {cohort} participants; this site masks its update only among "
            f"at least {floor.min_cohort}",
        )
    if threshold < floor.min_threshold:
        raise _breach(
            f"secure_aggregation.min_threshold ({floor.min_threshold})",
            f"the round's threshold is {threshold}; this site takes part only with a "
            f"threshold of at least {floor.min_threshold}",
        )


def check_job(
    policy: SitePolicy,
    config: FederationConfig,
    *,
    stage: Stage,
    round_num: int,
    key_id: str,
    task_code: str,
    installed_task_code: str,
    cohort: int | None = None,
    threshold: int | None = None,
    rounds_today: int = 0,
) -> None:
    """Refuse a job that asks for less than ``policy`` allows; return None when it may run.

    Parameters
    ----------
    policy : SitePolicy
        The site's own policy.
    config : FederationConfig
        The federation config the (verified) job carries.
    stage : str
        ``train``, ``mask``, ``unmask`` or ``evaluate``.
    round_num : int
        The job's round.
    key_id : str
        The key the job was signed with (already verified against the site's pin).
    task_code : str
        The task-code hash the job names.
    installed_task_code : str
        The hash of the code installed at this site (:func:`task_code_digest`).
    cohort, threshold : int, optional
        The secure round's participants and threshold (``mask`` / ``unmask``).
    rounds_today : int
        Training rounds this site accepted in the last 24 hours (its audit log).

    Raises
    ------
    PolicyBreach
        Naming the policy line broken, the job's value and what would pass.
    """
    _check_origin(policy, config, key_id=key_id, task_code=task_code, installed=installed_task_code)
    _check_rounds_per_run(policy, config, round_num=round_num)
    _check_label_column(policy, config)
    if stage not in (*TRAINING_STAGES, "unmask", "evaluate"):
        raise RejectedJob(RejectReason.MALFORMED, f"unknown stage {stage!r}")
    _check_secure_aggregation(
        policy.secure_aggregation, config, stage=stage, cohort=cohort, threshold=threshold
    )
    if stage in TRAINING_STAGES:
        _check_privacy(policy.privacy, config)
        if rounds_today >= policy.rounds.max_per_day:
            raise _breach(
                f"rounds.max_per_day ({policy.rounds.max_per_day})",
                f"this site trained {rounds_today} rounds in the last 24 hours; try tomorrow",
            )


def _check_label_column(policy: SitePolicy, config: FederationConfig) -> None:
    """Refuse a label column the site's policy does not list (where it lists any)."""
    labels = policy.columns.labels
    if labels is not None and config.data.label_column not in labels:
        raise _breach(
            f"columns.labels ({', '.join(labels)})",
            f"the job's data.label_column is {config.data.label_column!r}",
        )


def _check_origin(
    policy: SitePolicy, config: FederationConfig, *, key_id: str, task_code: str, installed: str
) -> None:
    """The federation, the coordinator's key and the task code are the ones this site serves."""
    if config.name != policy.federation:
        raise _breach(
            f"federation ({policy.federation})",
            f"the job is for federation {config.name!r}; this site serves only "
            f"{policy.federation!r}",
        )
    if key_id != policy.coordinator_key_id:
        raise _breach(
            f"coordinator_key_id ({policy.coordinator_key_id[:16]}...)",
            f"the job is signed by key {key_id[:16]}...; after a key rotation the steward "
            "updates coordinator_key_id",
        )
    accepted = policy.task_code.accepted or (installed,)
    if task_code not in accepted:
        raise _breach(
            "task_code.accepted",
            f"the job's task code {task_code[:16]}... is not one this site runs "
            f"({', '.join(a[:16] + '...' for a in accepted)}); install the coordinator's "
            "fedpipe version at the site, or have the steward accept the hash",
        )


def check_task(
    policy: SitePolicy, *, spec: str, job_sha256: str | None, installed_sha256: str
) -> None:
    """The task the job names is the one installed here, and one the policy pins (if any).

    Parameters
    ----------
    spec : str
        The task the job's config names (``builtin:<kind>`` without ``task``).
    job_sha256 : str or None
        The task source hash the coordinator ran (None: an older coordinator's job).
    installed_sha256 : str
        The hash of that task's source as installed at this site.

    Raises
    ------
    PolicyBreach
        Naming the line broken (``task.spec``, ``task.sha256``, or ``task`` for code that
        differs from the coordinator's).
    """
    pin = policy.task
    if pin.spec is not None and spec != pin.spec:
        raise _breach(
            f"task.spec ({pin.spec})",
            f"the job names task {spec!r}; this site runs only {pin.spec!r}",
        )
    if job_sha256 is not None and job_sha256 != installed_sha256:
        raise _breach(
            "task",
            f"the job expects task {spec!r} with source sha256 {job_sha256[:16]}..., the code "
            f"installed here hashes to {installed_sha256[:16]}...; install the same version "
            "of the task's package at the coordinator and the site (`fedpipe site check` "
            "prints the hash)",
        )
    if pin.sha256 and installed_sha256 not in pin.sha256:
        raise _breach(
            f"task.sha256 ({', '.join(h[:16] + '...' for h in pin.sha256)})",
            f"task {spec!r} installed here hashes to {installed_sha256[:16]}..., which the "
            "steward has not accepted; reinstall the agreed version, or add the hash",
        )


def _check_rounds_per_run(policy: SitePolicy, config: FederationConfig, *, round_num: int) -> None:
    """The run is no longer than ``rounds.max_per_run``."""
    limit = policy.rounds.max_per_run
    if round_num > limit or config.rounds > limit:
        raise _breach(
            f"rounds.max_per_run ({limit})",
            f"the job is round {round_num} of a run of {config.rounds} rounds; lower rounds "
            f"to at most {limit}",
        )


def check_features(policy: SitePolicy, columns: Sequence[str]) -> None:
    """Refuse data whose feature columns the policy does not allow (``columns.features``)."""
    allowed = policy.columns.features
    if allowed is None:
        return
    extra = [c for c in columns if c not in allowed]
    if extra:
        raise _breach(
            f"columns.features ({', '.join(allowed)})",
            f"the site's data would give the job columns {', '.join(extra)}; remove them "
            "from the site's files or allow them in the policy",
        )


def check_round_spend(
    policy: SitePolicy,
    *,
    noise_multiplier: float,
    epsilon_run_after: float,
) -> None:
    """Refuse a DP-SGD round whose sigma or the run's epsilon breaks the policy.

    Called at training time, with the sigma the site derived (``target_epsilon`` jobs too)
    and the epsilon the coordinator's run will have spent at this site after the round.
    The site's total is enforced by its ledger with the budget from :func:`enforce`.
    """
    floor = policy.privacy
    if floor.min_noise_multiplier is not None and noise_multiplier < floor.min_noise_multiplier:
        raise _breach(
            f"privacy.min_noise_multiplier ({floor.min_noise_multiplier:g})",
            f"the round would train with sigma {noise_multiplier:.4g}; ask for more noise "
            "(a larger noise_multiplier, or a smaller target_epsilon)",
        )
    per_run = floor.max_epsilon_per_run
    if per_run is not None and epsilon_run_after > per_run:
        raise _breach(
            f"privacy.max_epsilon_per_run ({per_run:g})",
            f"after this round the run would have spent epsilon {epsilon_run_after:.4g} at "
            "this site",
        )


def enforce(policy: SitePolicy, config: FederationConfig) -> FederationConfig:
    """``config`` with the site's budget and delta in place of whatever the job said.

    The budget is the smaller of the job's ``privacy.max_epsilon`` and the policy's
    ``max_epsilon_total`` (a job cannot lift it by sending null); delta is the smaller of
    the two deltas. Call after :func:`check_job`.
    """
    privacy, floor = config.privacy, policy.privacy
    budgets = [b for b in (privacy.max_epsilon, floor.max_epsilon_total) if b is not None]
    deltas = [d for d in (privacy.delta, floor.delta) if d is not None]
    enforced = privacy.model_copy(
        update={
            "max_epsilon": min(budgets) if budgets else None,
            "delta": min(deltas) if deltas else None,
        }
    )
    return config.model_copy(update={"privacy": enforced})
