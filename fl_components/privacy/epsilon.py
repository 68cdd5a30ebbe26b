"""Epsilon of a history of (noise multiplier, sample rate, steps), through Opacus.

RDP: Mironov 2017, "Rényi Differential Privacy", CSF, arXiv:1702.07476 (composition by
summation, Proposition 1; conversion to (epsilon, delta)); the sampled Gaussian's RDP:
Mironov, Talwar & Zhang 2019, arXiv:1908.10530. PRV: Gopi, Lee & Wutschitz 2021, NeurIPS,
arXiv:2106.02848. GDP: Dong, Roth & Su 2019, arXiv:1905.02383. Used by the sites' ledgers,
the coordinator's federation ledger and the privacy report alike.
"""

from __future__ import annotations

import functools
import warnings
from typing import Any

import numpy as np

from fl_components.errors import ConfigError

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
