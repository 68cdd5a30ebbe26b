"""Synthetic(α, β): the FedProx paper's heterogeneous federated data set.

Li, Sahu, Zaheer, Sanjabi, Talwalkar & Smith, "Federated Optimization in Heterogeneous
Networks", MLSys 2020, arXiv:1812.06127, Sec. 5.1 (after Shamir et al. 2014): device k
draws y = argmax softmax(W_k x + b_k) with x ∈ R^60, 10 classes, and

    W_k ~ N(u_k, 1), b_k ~ N(u_k, 1), u_k ~ N(0, α)       (models differ: α)
    x ~ N(v_k, Σ), v_k ~ N(B_k, 1), B_k ~ N(0, β)          (features differ: β)
    Σ = diag(j^{-1.2}), n_k ~ lognormal(4, 2) + 50         (sizes differ)

As in the paper's generator (litian96/FedProx, ``data/synthetic_*/generate_niid.py``), α
and β are the *standard deviations* of u_k and B_k, b_k shares W_k's mean u_k, and the
size draw is truncated to an integer before adding 50.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fl_components.data.partition import split_holdout
from fl_components.data.types import SiteData, Split
from fl_components.errors import ConfigError

N_FEATURES = 60
N_CLASSES = 10


@dataclass(frozen=True)
class SyntheticDevice:
    """One device's examples and the model that labelled them."""

    data: Split
    weights: np.ndarray  # W_k, (60, 10)
    bias: np.ndarray  # b_k, (10,)


def synthetic_devices(
    *,
    n_devices: int = 30,
    alpha: float,
    beta: float,
    rng: np.random.Generator,
    max_examples: int | None = None,
) -> list[SyntheticDevice]:
    """Draw ``n_devices`` devices of Synthetic(α, β) from ``rng``.

    ``max_examples`` caps a device's size (the log-normal tail reaches 10^5; None: no cap).
    """
    if n_devices < 1 or alpha < 0 or beta < 0:
        raise ConfigError(
            f"Synthetic(alpha, beta) needs n_devices >= 1 and alpha, beta >= 0 "
            f"(got n_devices={n_devices}, alpha={alpha}, beta={beta})"
        )
    sizes = rng.lognormal(4, 2, n_devices).astype(np.int64) + 50
    if max_examples is not None:
        sizes = np.minimum(sizes, max_examples)
    u = rng.normal(0, alpha, n_devices)
    big_b = rng.normal(0, beta, n_devices)
    sigma_diag = np.arange(1, N_FEATURES + 1, dtype=np.float64) ** -1.2
    devices = []
    for k in range(n_devices):
        v_k = rng.normal(big_b[k], 1, N_FEATURES)
        w_k = rng.normal(u[k], 1, (N_FEATURES, N_CLASSES))
        b_k = rng.normal(u[k], 1, N_CLASSES)
        # Σ is diagonal: x = v_k + sqrt(Σ_jj) z, z ~ N(0, I)
        x = v_k + np.sqrt(sigma_diag) * rng.standard_normal((int(sizes[k]), N_FEATURES))
        y = np.argmax(x @ w_k + b_k, axis=1)  # argmax of softmax = argmax of the logits
        devices.append(
            SyntheticDevice(
                data=Split(x.astype(np.float32), y.astype(np.int64)), weights=w_k, bias=b_k
            )
        )
    return devices


def synthetic_sites(
    *,
    site_names: tuple[str, ...],
    alpha: float,
    beta: float,
    test_fraction: float,
    site_test_fraction: float,
    rng: np.random.Generator,
) -> tuple[list[SiteData], Split]:
    """One Synthetic(α, β) device per site; each gives ``test_fraction`` to the central test."""
    devices = synthetic_devices(n_devices=len(site_names), alpha=alpha, beta=beta, rng=rng)
    sites, central = [], []
    for name, device in zip(site_names, devices, strict=True):
        own, held = split_holdout(device.data, fraction=test_fraction, rng=rng)
        train, test = split_holdout(own, fraction=site_test_fraction, rng=rng)
        sites.append(SiteData(name=name, train=train, test=test))
        central.append(held)
    central_test = Split(
        np.concatenate([c.features for c in central]), np.concatenate([c.labels for c in central])
    )
    return sites, central_test
