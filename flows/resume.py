"""Resuming a crashed training run from its last completed round, in the same MLflow run.

A run checkpoints each round once the round is logged (``fl_components.checkpoint``), in
``<checkpoint root>/<federation>/<MLflow run id>/``; the root is ``$FEDPIPE_CHECKPOINT_DIR``
(the stack sets it under its state folder) or ``state/checkpoints``. A run resumes when

- it is given ``resume`` (an MLflow run id: ``fedpipe run FILE --resume RUN_ID``, or the
  flow parameter in the Prefect UI), or
- Prefect retries a crashed flow run: the MLflow run tagged with this flow run's id is found.

It goes on from the round after the checkpoint, logging into the same MLflow run (no second
run, no round logged twice); what the crash left behind is closed: the crashed Prefect flow
run and its task runs still RUNNING are marked, so nothing stays RUNNING for ever.

Participant-level DP resumes with its accountant: the checkpoint's accountant rounds (its
``ServerState.accountant_history``), and every round the crashed attempt *began*
(``started.json``, written before a round is charged) that neither holds, are charged as
spent before the first round is re-run (:meth:`ResumePoint.begun_steps`), in the state and
in the federation ledger. A round whose outcome is unknown counts as spent; its re-run is
another run of the mechanism, and counts again. A checkpoint written before the accountant
moved into the state kept its rounds under ``extra["privacy"]["rounds"]``: read still.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from uuid import UUID

from fl_components.checkpoint import Checkpoint, load_latest, save_checkpoint, started_rounds
from fl_components.config import FederationConfig
from fl_components.errors import ConfigError
from fl_components.privacy.accounting import ClientRound
from fl_components.strategies import ServerState
from fl_components.tracking import RunTracker

log = logging.getLogger(__name__)

CHECKPOINT_DIR_ENV = "FEDPIPE_CHECKPOINT_DIR"


def run_folder(config: FederationConfig, mlflow_run_id: str) -> Path:
    """Where run ``mlflow_run_id``'s checkpoints live."""
    root = Path(os.environ.get(CHECKPOINT_DIR_ENV) or Path("state") / "checkpoints")
    return root.resolve() / config.name / mlflow_run_id


@dataclass(frozen=True)
class ResumePoint:
    """Where a resumed run picks up: its MLflow run, and its last checkpoint (if any)."""

    mlflow_run_id: str
    checkpoint: Checkpoint | None
    # rounds the crashed attempt logged: one may be past the checkpoint (a crash between
    # logging a round and checkpointing it); logged again it would count twice
    logged_rounds: frozenset[int] = frozenset()
    # every round begun (started.json), with each attempt's privacy step, checkpoint or not
    started: Mapping[int, list[Any]] = field(default_factory=dict)

    @property
    def next_round(self) -> int:
        """The first round to train."""
        return 1 if self.checkpoint is None else self.checkpoint.round + 1

    def state(self) -> ServerState | None:
        """The server state after the last completed round (None: no round completed).

        From an older checkpoint, the accountant's rounds are those it kept under
        ``extra["privacy"]`` (with their attempt keys), not its state's unkeyed steps.
        """
        if self.checkpoint is None:
            return None
        state = ServerState.load_state_dict(self.checkpoint.state)
        legacy = self.checkpoint.extra.get("privacy", {})
        if "rounds" in legacy:  # the layout before the accountant moved into the state
            kept = tuple(ClientRound.from_json(r) for r in legacy["rounds"])
            state = state.evolve(accountant_history=kept)
        return state

    def begun_steps(self, state: ServerState | None) -> list[ClientRound]:
        """Participant-level steps charged or begun before the crash: all count as spent.

        The checkpoint's accountant rounds and each attempt ``started.json`` lists (a round
        begun, its outcome unknown); the accountant skips those it holds (by attempt key).
        ``state``: this point's :meth:`state`, as the caller already built it (not built
        again here: that would hold a second copy of the model).
        """
        steps: list[ClientRound] = []
        if state is not None:
            steps.extend(state.accountant_history)
        for round_num, attempts in sorted(self.started.items()):
            for attempt in attempts:
                if isinstance(attempt, Mapping):  # None: a round begun without DP
                    steps.append(ClientRound.from_json({**attempt, "round": round_num}))
        return steps

    def history(self) -> list[dict[str, float]]:
        """The rows logged before the crash (round 0 included)."""
        if self.checkpoint is None:
            return []
        return [dict(row) for row in self.checkpoint.extra.get("history", [])]


def find_resume_point(
    config: FederationConfig, tracker: RunTracker, *, resume: str | None, flow_run_id: str
) -> ResumePoint | None:
    """The point to resume from, or None for a fresh run.

    Raises
    ------
    ConfigError
        If ``resume`` names a run without checkpoints.
    """
    if resume:
        folder = run_folder(config, resume)
        checkpoint = load_latest(folder)
        if checkpoint is None:
            raise ConfigError(
                f"resume {resume!r}: no checkpoint under {folder}; a run checkpoints each "
                "round once it is logged, so this run completed none (start it again instead)"
            )
        point = ResumePoint(
            resume, checkpoint, _logged_rounds(tracker, resume), started_rounds(folder)
        )
    else:
        earlier = tracker.runs_of_flow_run(flow_run_id) if flow_run_id else []
        if not earlier:
            return None
        # a retry of a crashed flow run: the same MLflow run, from its last checkpoint
        folder = run_folder(config, earlier[0])
        point = ResumePoint(
            earlier[0],
            load_latest(folder),
            _logged_rounds(tracker, earlier[0]),
            started_rounds(folder),
        )
    return point


def _logged_rounds(tracker: RunTracker, run_id: str) -> frozenset[int]:
    return frozenset(
        int(m.step) for m in tracker.client.get_metric_history(run_id, "global/accuracy")
    )


def save_round(
    config: FederationConfig,
    *,
    mlflow_run_id: str,
    state: ServerState,
    round_num: int,
    history: list[dict[str, float]],
) -> Path:
    """Checkpoint round ``round_num`` (logged, its state ``state``); returns its folder.

    The participant-level accountant's rounds charged through round ``round_num`` are the
    state's; a round begun after it is in ``started.json`` (written before it is charged)
    and the federation ledger, which a resumed run charges from (over, never under).
    """
    checkpoint = Checkpoint(
        round=round_num,
        mlflow_run_id=mlflow_run_id,
        state=state.state_dict(),
        extra={"history": history},
    )
    return save_checkpoint(run_folder(config, mlflow_run_id), checkpoint)


def close_crashed_attempt(crashed_flow_run_id: str, *, current_flow_run_id: str) -> list[str]:
    """Mark what a crashed attempt left RUNNING: its flow run (if it is another) and tasks.

    Returns
    -------
    list[str]
        One line per flow or task run marked.
    """
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        FlowRunFilter,
        FlowRunFilterId,
        TaskRunFilter,
        TaskRunFilterState,
        TaskRunFilterStateType,
    )
    from prefect.client.schemas.objects import StateType
    from prefect.exceptions import ObjectNotFound
    from prefect.states import Cancelled, Crashed

    if not crashed_flow_run_id:
        return []
    lines: list[str] = []
    live = [StateType.RUNNING, StateType.PENDING, StateType.SCHEDULED]
    with get_client(sync_client=True) as client:
        if crashed_flow_run_id != current_flow_run_id:
            try:
                run = client.read_flow_run(UUID(crashed_flow_run_id))
            except ObjectNotFound:  # another server (a temporary one that is gone)
                return lines
            if run.state is not None and not run.state.is_final():
                message = f"crashed; resumed by flow run {current_flow_run_id}"
                client.set_flow_run_state(run.id, Crashed(message=message), force=True)
                lines.append(f"flow run {run.name}: marked Crashed")
        tasks = client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[UUID(crashed_flow_run_id)])),
            task_run_filter=TaskRunFilter(
                state=TaskRunFilterState(type=TaskRunFilterStateType(any_=live))
            ),
        )
        for task_run in tasks:
            client.set_task_run_state(
                task_run.id, Cancelled(message="orphaned by a crashed coordinator"), force=True
            )
            lines.append(f"task run {task_run.name}: marked Cancelled")
    return lines


def describe(point: ResumePoint) -> dict[str, Any]:
    """What the run logs and reports about the resume."""
    return {
        "mlflow_run_id": point.mlflow_run_id,
        "from_round": point.next_round,
        "unfinished": sorted(point.checkpoint.unfinished) if point.checkpoint else [],
    }
