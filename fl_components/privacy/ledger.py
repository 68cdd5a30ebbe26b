"""The site's privacy ledger: every DP-SGD round it ever ran, persisted on its own disk.

Accounting follows Opacus's split between engine and accountant: the ledger keeps only the
history of ``(noise_multiplier, sample_rate, steps)`` and replays it through a fresh Opacus
accountant (RDP: Mironov 2017, "Rényi Differential Privacy", CSF, arXiv:1702.07476; PRV:
Gopi, Lee & Wutschitz 2021, NeurIPS, arXiv:2106.02848; GDP: Dong, Roth & Su 2019,
arXiv:1905.02383) whenever epsilon is asked for. Because the file lives in the site's
folder, recurring retraining of the same records keeps spending the same budget.
"""

from __future__ import annotations

import functools
import json
import math
import os
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fl_components.errors import BudgetExhaustedError, ConfigError

LEDGER_FILE = "privacy_ledger.json"
LEDGER_VERSION = 1

# Rényi orders the RDP accountant minimises over (Opacus's ``alphas``): its defaults
# (1.1 ... 10.9 and 12 ... 63) plus orders near 1 for large epsilons and up to 4096 for
# small ones (a few steps, or large noise, as in the first rounds of a federation or while
# ``get_noise_multiplier`` searches sigma). Every order gives a valid bound, so more orders
# only tighten it; covering the regime keeps Opacus from warning that the optimum sat at
# an end of the range. Recompute with ``RDPAccountant().get_epsilon(delta, alphas=RDP_ORDERS)``.
RDP_ORDERS: tuple[float, ...] = (
    1.01,
    1.02,
    1.05,
    *(1 + x / 10.0 for x in range(1, 100)),
    *(float(a) for a in range(12, 64)),
    *(float(a) for a in (64, 72, 80, 96, 112, 128, 160, 192, 256, 320, 384, 512, 768)),
    *(float(a) for a in (1024, 1536, 2048, 3072, 4096)),
)


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


def default_delta(n: int) -> float:
    """A power of ten at or below 1/(10 n): small against one record in n."""
    if n < 1:
        raise ConfigError(f"cannot pick delta for {n} examples; set privacy.delta")
    return 10.0 ** -math.ceil(math.log10(10 * n))


def make_accountant(kind: str) -> Any:
    """A fresh Opacus accountant by name ('rdp', 'prv', 'gdp')."""
    from opacus.accountants import create_accountant

    with warnings.catch_warnings():  # GDP warns that it is experimental on every creation
        warnings.simplefilter("ignore")
        return create_accountant(mechanism=kind)


def epsilon_of(history: list[tuple[float, float, int]], *, delta: float, accountant: str) -> float:
    """Epsilon at ``delta`` of a history of ``(noise_multiplier, sample_rate, steps)``.

    Parameters
    ----------
    history : list of (float, float, int)
        Each entry: sigma, Poisson sample rate q, and the number of steps taken with them.
    delta : float
        Target delta.
    accountant : str
        'rdp', 'prv' or 'gdp'; GDP composes only a constant (sigma, q).

    Returns
    -------
    float
        Epsilon spent; 0.0 for an empty history.
    """
    entries = [(float(s), float(q), int(n)) for s, q, n in history if n > 0]
    if not entries:
        return 0.0
    if accountant == "gdp":
        if len({(s, q) for s, q, _ in entries}) > 1:
            raise ConfigError(
                "privacy.accountant 'gdp' composes only one (noise_multiplier, sample_rate); "
                "this ledger holds several; use accountant 'rdp' or 'prv'"
            )
        entries = [(entries[0][0], entries[0][1], sum(n for _, _, n in entries))]
    if accountant == "rdp":
        return _rdp_epsilon(entries, delta=delta)
    acc = make_accountant(accountant)
    acc.history = list(entries)
    with np.errstate(divide="ignore", invalid="ignore"):  # PRV's log(1 - q) at q = 1
        return float(acc.get_epsilon(delta=delta))


@functools.lru_cache(maxsize=4096)
def _rdp_per_step(noise_multiplier: float, sample_rate: float) -> tuple[float, ...]:
    """Opacus's RDP of one step at every order of RDP_ORDERS (cached: ~0.5 s to compute)."""
    from opacus.accountants.analysis.rdp import compute_rdp

    rdp = compute_rdp(
        q=sample_rate, noise_multiplier=noise_multiplier, steps=1, orders=list(RDP_ORDERS)
    )
    return tuple(float(value) for value in rdp)


def _rdp_epsilon(entries: list[tuple[float, float, int]], *, delta: float) -> float:
    """What ``RDPAccountant().get_epsilon(delta, alphas=RDP_ORDERS)`` returns for the history.

    The same Opacus functions (``compute_rdp``, ``get_privacy_spent``); RDP composes by
    summation (Mironov 2017, Proposition 1), so each (sigma, q) is computed once.
    """
    from opacus.accountants.analysis.rdp import get_privacy_spent

    total = np.zeros(len(RDP_ORDERS))
    for sigma, q, steps in entries:
        total = total + np.asarray(_rdp_per_step(sigma, q)) * steps
    epsilon, _ = get_privacy_spent(orders=list(RDP_ORDERS), rdp=total, delta=delta)
    return float(epsilon)


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
    ) -> None:
        """Append one trained round and save the ledger.

        ``mlflow_run_id`` and ``flow_run_id`` name the MLflow run and the Prefect flow run
        that spent it, when the caller knows them (an auditor can then follow each entry).
        """
        self.entries.append(
            LedgerEntry(
                federation=federation,
                round=round_num,
                noise_multiplier=float(noise_multiplier),
                sample_rate=float(sample_rate),
                steps=int(steps),
                recorded_at=time.time(),
                mlflow_run_id=mlflow_run_id,
                flow_run_id=flow_run_id,
            )
        )
        self.delta, self.max_epsilon = delta, max_epsilon
        self.save()

    def remaining(self, delta: float) -> float | None:
        """Budget left at ``delta`` (None when unlimited)."""
        if self.max_epsilon is None:
            return None
        return max(0.0, self.max_epsilon - self.epsilon(delta))
