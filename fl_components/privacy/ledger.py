"""The site's privacy ledger: every DP-SGD round it ever ran, persisted on its own disk.

Accounting follows Opacus's split between engine and accountant: the ledger keeps only the
history of ``(noise_multiplier, sample_rate, steps)`` and replays it through a fresh Opacus
accountant (RDP: Mironov 2017, "Rényi Differential Privacy", CSF, arXiv:1702.07476; PRV:
Gopi, Lee & Wutschitz 2021, NeurIPS, arXiv:2106.02848; GDP: Dong, Roth & Su 2019,
arXiv:1905.02383) whenever epsilon is asked for. Because the file lives in the site's
folder, recurring retraining of the same records keeps spending the same budget.

An entry is keyed by (federation, MLflow run, round, digest of the global model it was
trained from): one release, charged once. The same request again (a retried task, a
re-delivered job, a resumed coordinator re-running a round from the same model) is answered
with the release kept for it (:mod:`fl_components.privacy.releases`), never by training
again. A round asked for from *another* model (a resumed run whose earlier rounds came out
differently) is a new release of the same records: trained, and charged again.
"""

from __future__ import annotations

import json
import math
import os
import time
from contextlib import AbstractContextManager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from fl_components.errors import BudgetExhaustedError, ConfigError

# re-exported: callers import the accountant maths from here too
from fl_components.privacy.epsilon import RDP_ORDERS as RDP_ORDERS
from fl_components.privacy.epsilon import epsilon_of as epsilon_of
from fl_components.privacy.epsilon import make_accountant as make_accountant
from fl_components.privacy.file_lock import locked

LEDGER_FILE = "privacy_ledger.json"
LEDGER_VERSION = 1


@dataclass(frozen=True)
class LedgerEntry:
    """One round of DP-SGD at the site."""

    federation: str
    round: int
    noise_multiplier: float
    sample_rate: float
    steps: int
    recorded_at: float
    mlflow_run_id: str | None = None
    flow_run_id: str | None = None
    # the update released for this round, kept at the site (relative to its folder), and
    # a digest of the global model it was trained from: a repeat request gets it back
    release: str | None = None
    parameters_digest: str | None = None
    # the code that touched the records: the task's spec and the SHA-256 of its source
    # (fl_components.task.loading); None in entries written before it was recorded
    task: str | None = None
    task_sha256: str | None = None
    # what was released: None for a DP-SGD round; "statistics" for one release of the
    # site's noised federated statistics (Gaussian mechanism: sample_rate 1, steps 1)
    mechanism: str | None = None

    @property
    def key(self) -> tuple[str, str, int, str] | None:
        """(federation, MLflow run, round, model digest): one release, charged once.

        None without an MLflow run id or a digest (bare loops): nothing to match.
        """
        if not self.mlflow_run_id or not self.parameters_digest:
            return None
        return (self.federation, self.mlflow_run_id, self.round, self.parameters_digest)


class SiteBudgetExhausted(BudgetExhaustedError):
    """A site's decline, with the figures as fields (the coordinator needs ``spent``).

    Attributes
    ----------
    site : str
        The declining site.
    spent : float
        Epsilon its ledger holds already (all runs), at ``delta``.
    after : float
        Epsilon the declined round would have brought it to.
    """

    def __init__(self, message: str, *, site: str, spent: float, after: float) -> None:
        super().__init__(message)
        self.site, self.spent, self.after = site, spent, after

    def __reduce__(self) -> tuple[Any, tuple[str, str, float, float]]:
        # keyword-only fields: pickle (process pools, Prefect results) needs a rebuilder
        return _rebuild_decline, (str(self), self.site, self.spent, self.after)


def _rebuild_decline(message: str, site: str, spent: float, after: float) -> SiteBudgetExhausted:
    return SiteBudgetExhausted(message, site=site, spent=spent, after=after)


class RoundAlreadyCharged(SiteBudgetExhausted):
    """A site's decline of a release its ledger has charged, with nothing kept to return.

    Training again from the same model for the same (run, round) would be a second release
    under one key; the site declines instead.
    """

    def __reduce__(self) -> tuple[Any, tuple[str, str, float, float]]:
        return _rebuild_charged, (str(self), self.site, self.spent, self.after)


def _rebuild_charged(message: str, site: str, spent: float, after: float) -> RoundAlreadyCharged:
    return RoundAlreadyCharged(message, site=site, spent=spent, after=after)


def default_delta(n: int) -> float:
    """A power of ten at or below 1/(10 n): small against one record in n."""
    if n < 1:
        raise ConfigError(f"cannot pick delta for {n} examples; set privacy.delta")
    return 10.0 ** -math.ceil(math.log10(10 * n))


@dataclass
class PrivacyLedger:
    """A site's accountant history across rounds and runs, saved as JSON in its folder.

    Attributes
    ----------
    path : Path
        ``<site folder>/privacy_ledger.json``.
    site : str
        The site's name.
    accountant : str
        Accountant every entry is composed with; fixed when the ledger is created.
    delta : float | None
        Delta the site reports epsilon at (the latest one used).
    max_epsilon : float | None
        The site's budget (the latest one configured); None = unlimited.
    entries : list of LedgerEntry
        One per round trained with DP-SGD.
    """

    path: Path
    site: str
    accountant: str = "rdp"
    delta: float | None = None
    max_epsilon: float | None = None
    entries: list[LedgerEntry] = field(default_factory=list)

    @classmethod
    def open(cls, folder: str | Path, *, site: str, accountant: str) -> PrivacyLedger:
        """Load the ledger of the site in ``folder``, or start an empty one.

        Raises
        ------
        ConfigError
            When the ledger on disk was kept with another accountant (its epsilon cannot
            be recomputed by a different one without re-deriving the whole history).
        """
        path = Path(folder) / LEDGER_FILE
        if not path.is_file():
            return cls(path=path, site=site, accountant=accountant)
        ledger = cls.load(path)
        if ledger.accountant != accountant:
            raise ConfigError(
                f"site {site!r}: {path} was kept with accountant {ledger.accountant!r}, "
                f"privacy.accountant is {accountant!r}; set privacy.accountant to "
                f"{ledger.accountant!r} (a site's budget is composed with one accountant)"
            )
        return ledger

    @classmethod
    def load(cls, path: str | Path) -> PrivacyLedger:
        """Read a ledger file."""
        path = Path(path)
        try:
            raw = json.loads(path.read_text())
            entries = [LedgerEntry(**item) for item in raw["entries"]]
            return cls(
                path=path,
                site=str(raw["site"]),
                accountant=str(raw["accountant"]),
                delta=raw.get("delta"),
                max_epsilon=raw.get("max_epsilon"),
                entries=entries,
            )
        except (OSError, ValueError, KeyError, TypeError) as error:
            raise ConfigError(
                f"{path}: not a readable privacy ledger ({error}); restore it from backup "
                "(deleting it would forget the budget already spent)"
            ) from None

    def save(self) -> None:
        """Write the ledger atomically (a crash never leaves half a file)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        payload = {
            "version": LEDGER_VERSION,
            "site": self.site,
            "accountant": self.accountant,
            "delta": self.delta,
            "max_epsilon": self.max_epsilon,
            "entries": [asdict(entry) for entry in self.entries],
        }
        temporary = self.path.with_suffix(".json.tmp")
        temporary.write_text(json.dumps(payload, indent=2))
        os.replace(temporary, self.path)

    @property
    def history(self) -> list[tuple[float, float, int]]:
        """The ``(noise_multiplier, sample_rate, steps)`` history, oldest first."""
        return [(e.noise_multiplier, e.sample_rate, e.steps) for e in self.entries]

    def epsilon(self, delta: float) -> float:
        """Epsilon spent so far at ``delta``, replayed through a fresh Opacus accountant."""
        return epsilon_of(self.history, delta=delta, accountant=self.accountant)

    def epsilon_after(
        self, *, noise_multiplier: float, sample_rate: float, steps: int, delta: float
    ) -> float:
        """Epsilon the site would have spent after one more round with these settings."""
        planned = [*self.history, (noise_multiplier, sample_rate, steps)]
        return epsilon_of(planned, delta=delta, accountant=self.accountant)

    def would_exceed(
        self,
        *,
        noise_multiplier: float,
        sample_rate: float,
        steps: int,
        delta: float,
        max_epsilon: float | None,
    ) -> bool:
        """True when the planned round would take the site past ``max_epsilon``."""
        if max_epsilon is None:
            return False
        after = self.epsilon_after(
            noise_multiplier=noise_multiplier, sample_rate=sample_rate, steps=steps, delta=delta
        )
        return after > max_epsilon

    def check_round(
        self,
        *,
        noise_multiplier: float,
        sample_rate: float,
        steps: int,
        delta: float,
        max_epsilon: float | None,
    ) -> float:
        """Return the epsilon after the planned round, or decline it.

        Raises
        ------
        BudgetExhaustedError
            Naming the site, the epsilon spent, the round's cost and the budget.
        """
        after = self.epsilon_after(
            noise_multiplier=noise_multiplier, sample_rate=sample_rate, steps=steps, delta=delta
        )
        if max_epsilon is not None and after > max_epsilon:
            spent = self.epsilon(delta)
            raise SiteBudgetExhausted(
                f"site {self.site!r} declines: epsilon spent {spent:.3f}, this round would "
                f"bring it to {after:.3f} (+{after - spent:.3f}) past privacy.max_epsilon "
                f"{max_epsilon:g} at delta {delta:.0e}; raise max_epsilon, the noise "
                "multiplier, or retire the site's data",
                site=self.site,
                spent=spent,
                after=after,
            )
        return after

    def record(
        self,
        *,
        federation: str,
        round_num: int,
        noise_multiplier: float,
        sample_rate: float,
        steps: int,
        delta: float,
        max_epsilon: float | None,
        mlflow_run_id: str | None = None,
        flow_run_id: str | None = None,
        release: str | None = None,
        parameters_digest: str | None = None,
        task: str | None = None,
        task_sha256: str | None = None,
        mechanism: str | None = None,
    ) -> None:
        """Append one trained round and save the ledger (re-read under a lock first).

        ``mlflow_run_id`` and ``flow_run_id`` name the MLflow run and the Prefect flow run
        that spent it, when the caller knows them (an auditor can then follow each entry).
        ``release`` and ``parameters_digest``: where the released update is kept and what
        it was trained from (:mod:`fl_components.privacy.releases`). ``task`` and
        ``task_sha256``: the task that trained on the records, and its source hash.

        Raises
        ------
        RoundAlreadyCharged
            When (federation, ``mlflow_run_id``, ``round_num``, ``parameters_digest``) is
            charged already: the caller must not release what it trained (one charge per
            key).
        """
        entry = LedgerEntry(
            federation=federation,
            round=round_num,
            noise_multiplier=float(noise_multiplier),
            sample_rate=float(sample_rate),
            steps=int(steps),
            recorded_at=time.time(),
            mlflow_run_id=mlflow_run_id,
            flow_run_id=flow_run_id,
            release=release,
            parameters_digest=parameters_digest,
            task=task,
            task_sha256=task_sha256,
            mechanism=mechanism,
        )
        with self._locked():  # another delivery of the same job may be recording right now
            if self.path.is_file():
                self.entries = PrivacyLedger.load(self.path).entries
            self._refuse_charged_twice(entry, delta=delta)
            self.entries.append(entry)
            self.delta, self.max_epsilon = delta, max_epsilon
            self.save()

    def _refuse_charged_twice(self, entry: LedgerEntry, *, delta: float) -> None:
        """Raise :class:`RoundAlreadyCharged` when ``entry``'s key is charged already."""
        earlier = self.entry_for(
            federation=entry.federation,
            mlflow_run_id=entry.mlflow_run_id,
            round_num=entry.round,
            parameters_digest=entry.parameters_digest,
        )
        if earlier is not None:
            spent = self.epsilon(delta)
            raise RoundAlreadyCharged(
                f"site {self.site!r} declines round {entry.round} of run "
                f"{entry.mlflow_run_id}: its ledger charged this (run, round, model) already "
                f"(recorded at {earlier.recorded_at:.0f}); the update just trained is "
                "discarded, not released, so it is not charged",
                site=self.site,
                spent=spent,
                after=spent,
            )

    def _locked(self) -> AbstractContextManager[None]:
        return locked(self.path)

    def entry_for(
        self,
        *,
        federation: str,
        mlflow_run_id: str | None,
        round_num: int,
        parameters_digest: str | None,
    ) -> LedgerEntry | None:
        """The entry charged for this (federation, run, round, model), if any.

        None without an MLflow run id or digest: such rounds (bare loops) have no key.
        """
        if not mlflow_run_id or not parameters_digest:
            return None
        key = (federation, mlflow_run_id, round_num, parameters_digest)
        return next((e for e in self.entries if e.key == key), None)

    def remaining(self, delta: float) -> float | None:
        """Budget left at ``delta`` (None when unlimited)."""
        if self.max_epsilon is None:
            return None
        return max(0.0, self.max_epsilon - self.epsilon(delta))
