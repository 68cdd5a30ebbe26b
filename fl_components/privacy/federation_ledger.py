"""The coordinator's privacy ledger: participant-level rounds of every run of a federation.

A site's ledger (:mod:`fl_components.privacy.ledger`) bounds what DP-SGD spends on its
records; this one bounds what DP-FedAvg (McMahan et al. 2018, ICLR, arXiv:1710.06963)
spends on the *participants*. It lives with the coordinator's state, next to the MLflow
tracking store (``<store folder>/privacy/<federation>.json``), never in a site folder, and
keeps, per MLflow run, the Prefect flow run, the run its starting model came from
(``init_from: champion`` or ``run``) and every round's (noise multiplier, sample rate,
steps). A model's epsilon composes its own rounds with those of every run it descends
from (RDP composition, Mironov 2017, arXiv:1702.07476), replayed through Opacus.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import asdict, dataclass, field
from pathlib import Path

from fl_components.config import TrackingConfig
from fl_components.errors import BudgetExhaustedError, ConfigError
from fl_components.privacy.accounting import ClientRound, participant_epsilon
from fl_components.privacy.file_lock import locked

FEDERATION_LEDGER_VERSION = 1


def federation_ledger_path(tracking: TrackingConfig, federation: str) -> Path:
    """``<folder of the MLflow store>/privacy/<federation>.json``.

    The folder is the SQLite database's for a ``sqlite:///`` URI, else the parent of a
    local ``tracking.artifact_root``.

    Raises
    ------
    ConfigError
        When neither is a local path (a remote tracking server with remote artifacts).
    """
    uri = tracking.tracking_uri
    if uri.startswith("sqlite:///"):
        folder = Path(uri.removeprefix("sqlite:///")).parent
    elif "://" not in tracking.artifact_root:
        folder = Path(tracking.artifact_root).parent
    else:
        raise ConfigError(
            f"tracking.tracking_uri {uri!r} and tracking.artifact_root "
            f"{tracking.artifact_root!r} are remote: the coordinator has no local folder for "
            "its participant-level privacy ledger; use a sqlite:/// URI or a local artifact_root"
        )
    return folder / "privacy" / f"{federation}.json"


@dataclass(frozen=True)
class LedgerRound:
    """One participant-level round of a run, as recorded."""

    round: int
    noise_multiplier: float
    sample_rate: float
    steps: int
    sites: tuple[str, ...] | None
    recorded_at: float
    attempt: str | None = None  # the begun round's key: recorded once
    # charged by a resumed run for a round begun before a crash whose record was missing
    settled: bool = False

    @property
    def client_round(self) -> ClientRound:
        """The accountant's view of the round."""
        return ClientRound(
            self.noise_multiplier,
            self.sample_rate,
            self.steps,
            self.sites,
            attempt=self.attempt,
            round=self.round,
        )


@dataclass
class LedgerRun:
    """One MLflow run's participant-level rounds and where its starting model came from."""

    mlflow_run_id: str
    flow_run_id: str | None
    parent_run_id: str | None
    accountant: str
    delta: float
    started_at: float
    rounds: list[LedgerRound] = field(default_factory=list)


@dataclass
class FederationLedger:
    """Participant-level history of one federation, across runs, saved as JSON.

    Every change re-reads the file under an exclusive lock before writing it back
    atomically, so two runs of one federation never lose each other's rounds.
    """

    path: Path
    federation: str
    runs: dict[str, LedgerRun] = field(default_factory=dict)

    @classmethod
    def load(cls, path: str | Path, *, federation: str | None = None) -> FederationLedger:
        """Read the ledger at ``path``; an absent file is an empty ledger of ``federation``.

        Raises
        ------
        ConfigError
            When the file is unreadable, or keeps another federation than ``federation``.
        """
        path = Path(path)
        if not path.is_file():
            if federation is None:
                raise ConfigError(f"{path}: no federation ledger there (no DP-FedAvg run yet)")
            return cls(path=path, federation=federation)
        try:
            raw = json.loads(path.read_text())
            runs = {}
            for item in raw["runs"]:
                rounds = [
                    LedgerRound(**{**r, "sites": None if r["sites"] is None else tuple(r["sites"])})
                    for r in item.pop("rounds")
                ]
                runs[item["mlflow_run_id"]] = LedgerRun(**item, rounds=rounds)
            ledger = cls(path=path, federation=str(raw["federation"]), runs=runs)
        except (OSError, ValueError, KeyError, TypeError) as error:
            raise ConfigError(
                f"{path}: not a readable federation privacy ledger ({error}); restore it from "
                "backup (deleting it would forget the participant-level budget already spent)"
            ) from None
        if federation is not None and ledger.federation != federation:
            raise ConfigError(
                f"{path} keeps federation {ledger.federation!r}, not {federation!r}; "
                "each federation has its own ledger file"
            )
        return ledger

    def save(self) -> None:
        """Write the ledger atomically."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        payload = {
            "version": FEDERATION_LEDGER_VERSION,
            "federation": self.federation,
            "runs": [asdict(run) for run in self.runs.values()],
        }
        temporary = self.path.with_suffix(".json.tmp")
        temporary.write_text(json.dumps(payload, indent=2))
        os.replace(temporary, self.path)

    def _locked(self) -> AbstractContextManager[None]:
        return locked(self.path)

    def _mutate(self, change: Callable[[FederationLedger], None]) -> None:
        with self._locked():
            fresh = FederationLedger.load(self.path, federation=self.federation)
            change(fresh)
            fresh.save()
            self.runs = fresh.runs

    def lineage(self, run_id: str) -> list[str]:
        """``run_id`` and the runs its starting model descends from, oldest first."""
        chain: list[str] = []
        current: str | None = run_id
        while current is not None and current not in chain:
            chain.append(current)
            run = self.runs.get(current)
            current = run.parent_run_id if run is not None else None
        return [r for r in reversed(chain) if r in self.runs]

    def prior_for(self, run_id: str) -> list[ClientRound]:
        """The rounds of the runs ``run_id``'s model descends from (not its own)."""
        return [
            r.client_round for rid in self.lineage(run_id) if rid != run_id
            for r in self.runs[rid].rounds
        ]  # fmt: skip

    def rounds_of(self, run_id: str) -> list[ClientRound]:
        """``run_id``'s own rounds, as recorded (every attempt)."""
        run = self.runs.get(run_id)
        return [] if run is None else [r.client_round for r in run.rounds]

    def history_for(self, run_id: str) -> list[ClientRound]:
        """Every round of ``run_id``'s lineage, oldest first (the composition to account)."""
        return [r.client_round for rid in self.lineage(run_id) for r in self.runs[rid].rounds]

    def epsilon(self, run_id: str, *, delta: float, accountant: str) -> float:
        """Participant-level epsilon of the model of ``run_id`` (its whole lineage)."""
        return participant_epsilon(self.history_for(run_id), delta=delta, accountant=accountant)

    def total_epsilon(self, *, delta: float, accountant: str) -> float:
        """Epsilon of every run of the federation composed, lineage or not (all releases)."""
        rounds = [r.client_round for run in self.runs.values() for r in run.rounds]
        return participant_epsilon(rounds, delta=delta, accountant=accountant)

    def begin_run(
        self,
        *,
        mlflow_run_id: str,
        flow_run_id: str | None,
        parent_run_id: str | None,
        accountant: str,
        delta: float,
    ) -> None:
        """Register a run (idempotent: a resumed run keeps its rounds)."""

        def change(ledger: FederationLedger) -> None:
            if mlflow_run_id not in ledger.runs:
                ledger.runs[mlflow_run_id] = LedgerRun(
                    mlflow_run_id=mlflow_run_id,
                    flow_run_id=flow_run_id,
                    parent_run_id=parent_run_id,
                    accountant=accountant,
                    delta=delta,
                    started_at=time.time(),
                )

        self._mutate(change)

    def check(
        self,
        run_id: str,
        planned: ClientRound,
        *,
        round_num: int,
        delta: float,
        accountant: str,
        max_epsilon: float | None,
    ) -> float:
        """Epsilon of the lineage after ``planned``; refuse the round past ``max_epsilon``.

        Raises
        ------
        BudgetExhaustedError
            Naming the federation, the epsilon spent, the round's cost and the budget.
        """
        history = self.history_for(run_id)
        after = participant_epsilon([*history, planned], delta=delta, accountant=accountant)
        if max_epsilon is not None and after > max_epsilon:
            spent = participant_epsilon(history, delta=delta, accountant=accountant)
            earlier = len(self.lineage(run_id)) - (1 if run_id in self.runs else 0)
            raise BudgetExhaustedError(
                f"federation {self.federation!r} refuses round {round_num}: participant-level "
                f"epsilon spent {spent:.3f} (this run and {earlier} earlier run(s) its model "
                f"descends from), this round would bring it to {after:.3f} "
                f"(+{after - spent:.3f}) past privacy.max_client_epsilon {max_epsilon:g} at "
                f"delta {delta:.0e}; raise max_client_epsilon or client_noise_multiplier, lower "
                "participation.fraction, or start a model afresh (init_from: fresh)"
            )
        return after

    def record(
        self, run_id: str, entry: ClientRound, *, round_num: int, settled: bool = False
    ) -> None:
        """Append one accounted round to ``run_id`` (registered by :meth:`begin_run`).

        Idempotent for a keyed entry: an attempt already recorded is not recorded again
        (it is one run of the mechanism). ``settled``: charged by a resumed run for a round
        begun before the crash (its outcome unknown).
        """
        if run_id not in self.runs:
            raise ConfigError(f"run {run_id!r} is not in {self.path}; call begin_run first")

        def change(ledger: FederationLedger) -> None:
            rounds = ledger.runs[run_id].rounds
            if entry.attempt is not None and any(r.attempt == entry.attempt for r in rounds):
                return
            rounds.append(
                LedgerRound(
                    round=round_num,
                    noise_multiplier=float(entry.noise_multiplier),
                    sample_rate=float(entry.sample_rate),
                    steps=int(entry.steps),
                    sites=entry.sites,
                    recorded_at=time.time(),
                    attempt=entry.attempt,
                    settled=settled,
                )
            )

        self._mutate(change)
