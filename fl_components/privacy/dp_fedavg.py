"""Participant-level DP: DP-FedAvg with fixed or adaptive clipping, and distributed noise.

DP-FedAvg: McMahan, Ramage, Talwar & Zhang 2018, "Learning Differentially Private Recurrent
Language Models", ICLR, arXiv:1710.06963 (Algorithm 1: clip each participant's update to
L2 norm S, add N(0, z^2 S^2 I) to the sum). Adaptive clipping: Andrew, Thakkar, McMahan &
Ramaswamy 2021, "Differentially Private Learning with Adaptive Clipping", NeurIPS,
arXiv:1905.03871 (Algorithm 1, geometric update of the clip norm toward a norm quantile).
Distributed noise under secure aggregation: Kairouz, Liu & Steinke 2021, "The Distributed
Discrete Gaussian Mechanism for Federated Learning with Secure Aggregation", ICML,
arXiv:2102.06387; the discrete Gaussian sampler is Canonne, Kamath & Steinke 2020, "The
Discrete Gaussian for Differential Privacy", NeurIPS, arXiv:2004.00010 (Algorithm 3).

All noise here comes from :class:`SecureRandom`, a ChaCha20 keystream keyed from the
operating system's CSPRNG, never from numpy's or torch's generators. Samplers work in
float64: they approximate the exact discrete samplers to within float rounding.

Dropouts under secure aggregation: each of n participants adds a share of variance
sigma^2 / n, so if m of them drop out the sum carries (n - m) / n of the variance. Secure
aggregation needs at least t survivors to unmask, so the sum always carries at least t / n
of the variance; calibrate with n replaced by t (``variance_share = sigma^2 / t``) to keep
the full guarantee under any dropout the protocol tolerates.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

from fl_components.parameters import NDArrays

_KEY_BYTES = 32
_NONCE_BYTES = 16
_MANTISSA = 2.0**-53


class SecureRandom:
    """Uniforms, Gaussians and discrete Gaussians from a ChaCha20 keystream.

    The 256-bit key comes from ``os.urandom`` unless given (tests pass a key to pin draws).
    """

    def __init__(self, key: bytes | None = None) -> None:
        key = os.urandom(_KEY_BYTES) if key is None else key
        if len(key) != _KEY_BYTES:
            raise ValueError(f"SecureRandom key must be {_KEY_BYTES} bytes (got {len(key)})")
        cipher = Cipher(algorithms.ChaCha20(key, bytes(_NONCE_BYTES)), mode=None)
        self._stream = cipher.encryptor()

    def uniform(self, size: int) -> npt.NDArray[np.float64]:
        """``size`` floats uniform on (0, 1), 53 random bits each."""
        words = np.frombuffer(self._stream.update(bytes(8 * size)), dtype=np.uint64)
        return ((words >> np.uint64(11)).astype(np.float64) + 0.5) * _MANTISSA

    def normal(self, size: int) -> npt.NDArray[np.float64]:
        """``size`` standard normal floats (Box-Muller on secure uniforms)."""
        pairs = math.ceil(size / 2)
        u1, u2 = self.uniform(pairs), self.uniform(pairs)
        radius = np.sqrt(-2.0 * np.log(u1))
        angle = 2.0 * np.pi * u2
        return np.concatenate([radius * np.cos(angle), radius * np.sin(angle)])[:size]

    def discrete_gaussian(self, size: int, *, sigma: float) -> npt.NDArray[np.int64]:
        """``size`` draws of N_Z(0, sigma^2), by rejection from a discrete Laplace.

        Canonne et al. 2020, Algorithm 3: propose Y ~ Lap_Z(t) with t = floor(sigma) + 1,
        accept with probability exp(-(|Y| - sigma^2 / t)^2 / (2 sigma^2)).
        """
        if sigma <= 0:
            return np.zeros(size, dtype=np.int64)
        t = math.floor(sigma) + 1
        out = np.empty(0, dtype=np.int64)
        while out.size < size:
            want = 2 * (size - out.size) + 16  # acceptance is above 1/2 for sigma >= 1
            u1, u2, u3 = self.uniform(want), self.uniform(want), self.uniform(want)
            # two-sided geometric: difference of two Geometric(1 - exp(-1/t)) on {0, 1, ...}
            proposal = np.floor(-t * np.log(u1)) - np.floor(-t * np.log(u2))
            accept = u3 < np.exp(-((np.abs(proposal) - sigma**2 / t) ** 2) / (2 * sigma**2))
            out = np.concatenate([out, proposal[accept].astype(np.int64)])
        return out[:size]


def global_norm(update: NDArrays) -> float:
    """L2 norm of an update taken over all its arrays together."""
    return float(math.sqrt(sum(float(np.sum(np.square(a, dtype=np.float64))) for a in update)))


def clip_update(update: NDArrays, clip_norm: float) -> tuple[NDArrays, float]:
    """Scale ``update`` to L2 norm at most ``clip_norm``; return it and its original norm.

    McMahan et al. 2018, Algorithm 1, ``ClipFn``: Δ · min(1, S / ||Δ||).
    """
    if clip_norm <= 0:
        raise ValueError(f"clip_norm must be > 0 (got {clip_norm})")
    norm = global_norm(update)
    scale = min(1.0, clip_norm / norm) if norm > 0 else 1.0
    return [(a * scale).astype(a.dtype, copy=False) for a in update], norm


def gaussian_noise_like(update: NDArrays, *, std: float, rng: SecureRandom) -> NDArrays:
    """Arrays shaped like ``update`` of N(0, std^2) noise from a secure generator."""
    return [(std * rng.normal(a.size)).reshape(a.shape).astype(a.dtype, copy=False) for a in update]


@dataclass(frozen=True)
class DPAggregate:
    """The noised mean update and what it took to make it.

    ``clipped`` is None where the coordinator cannot know it (under secure aggregation the
    sites clip, and their norms never leave them).
    """

    mean_update: NDArrays
    clip_norm: float
    noise_std: float
    clipped: int | None
    norms: tuple[float, ...]


def dp_fedavg_aggregate(
    updates: list[NDArrays],
    *,
    clip_norm: float,
    noise_multiplier: float,
    rng: SecureRandom,
    denominator: float | None = None,
) -> DPAggregate:
    """Clip each update to ``clip_norm``, add N(0, (z C)^2) to the sum, divide.

    Every participant weighs the same (example counts would change the sensitivity).
    ``denominator`` is McMahan et al.'s fixed denominator q·N of the estimator f̃_f
    (Algorithm 1) under Poisson selection, so that the released mean is a function of the
    noised sum alone and not of the cohort's size; None divides by the count (a fixed,
    public selection, whose size is known anyway).

    Raises
    ------
    ValueError
        On an empty list of updates.
    """
    if not updates:
        raise ValueError("dp_fedavg_aggregate needs at least one update")
    clipped, norms = zip(*(clip_update(u, clip_norm) for u in updates), strict=True)
    total = [np.sum(np.stack(layer), axis=0) for layer in zip(*clipped, strict=True)]
    std = noise_multiplier * clip_norm
    noise = gaussian_noise_like(total, std=std, rng=rng)
    count = float(len(updates)) if denominator is None else float(denominator)
    if count <= 0:
        raise ValueError(f"dp_fedavg_aggregate: denominator must be > 0 (got {denominator})")
    mean = [
        ((t + z) / count).astype(t.dtype, copy=False) for t, z in zip(total, noise, strict=True)
    ]
    return DPAggregate(
        mean_update=mean,
        clip_norm=clip_norm,
        noise_std=std,
        clipped=sum(1 for n in norms if n > clip_norm),
        norms=tuple(norms),
    )


def adaptive_clip_norm(
    clip_norm: float,
    *,
    norms: tuple[float, ...],
    target_quantile: float,
    learning_rate: float,
    count_noise_std: float,
    expected_count: float,
    rng: SecureRandom,
) -> float:
    """Next round's clip norm: C · exp(-η (b̃ - γ)) (Andrew et al. 2021, Algorithm 1).

    Each participant's bit b_i = 1[‖Δ_i‖ ≤ C] is centred, b_i - ½ (sensitivity ½ under
    adding or removing a participant), the centred sum gets N(0, σ_b²), and the fraction is
    taken over the *expected* cohort size m, not the actual one (under Poisson selection
    the actual size is itself secret): b̃ = (Σ (b_i - ½) + N(0, σ_b²)) / m + ½. This is the
    mechanism whose cost :func:`update_noise_multiplier` folds into z, as TF-Privacy's
    ``QuantileEstimatorQuery`` (``privacy/dp_query/quantile_estimator_query.py``) does it:
    records mapped to ±½, a normalized query over ``expected_num_records``.

    Raises
    ------
    ValueError
        If ``expected_count`` is not positive.
    """
    if expected_count <= 0:
        raise ValueError(f"adaptive_clip_norm: expected_count must be > 0 (got {expected_count})")
    centred = sum((1.0 if n <= clip_norm else 0.0) - 0.5 for n in norms)
    noised = centred + count_noise_std * float(rng.normal(1)[0])
    fraction = noised / expected_count + 0.5
    return float(clip_norm * math.exp(-learning_rate * (fraction - target_quantile)))


def count_sensitivity() -> float:
    """L2 sensitivity of the centred clipped-bit sum: one participant moves it by ½."""
    return 0.5


def update_noise_multiplier(noise_multiplier: float, *, count_noise_std: float) -> float:
    """z_Δ = (z^-2 - (2 σ_b)^-2)^(-1/2): the update noise left once the count is noised.

    Andrew et al. 2021, Section 3.1 / Theorem 1: the update sum (sensitivity C, noise
    z_Δ C) and the centred bit sum (sensitivity ½, noise σ_b) released together are one
    Gaussian mechanism of multiplier (z_Δ^-2 + (½ / σ_b)^2)^(-1/2) = z, so the round is
    accounted at z. ``count_noise_std`` is σ_b on the *centred* sum of
    :func:`adaptive_clip_norm`; the identity does not hold for uncentred bits.
    """
    count_multiplier = count_noise_std / count_sensitivity()
    remainder = noise_multiplier**-2 - count_multiplier**-2
    if remainder <= 0:
        raise ValueError(
            f"count noise std {count_noise_std} is too small for noise multiplier "
            f"{noise_multiplier}: needs 2 * sigma_b > z"
        )
    return float(remainder**-0.5)


def combined_noise_multiplier(update_multiplier: float, *, count_noise_std: float) -> float:
    """The multiplier of the update and the count released together (inverse of the above)."""
    return float((update_multiplier**-2 + (count_noise_std / count_sensitivity()) ** -2) ** -0.5)


def participant_noise(
    shape: tuple[int, ...], *, variance_share: float, rng: SecureRandom
) -> npt.NDArray[np.int64]:
    """One participant's share of the integer noise added in the quantized domain.

    The secure-aggregation participant adds this to its quantized update before masking,
    so that the unmasked sum of n shares carries noise of variance ``n * variance_share``
    (the distributed discrete Gaussian, Kairouz et al. 2021). For central noise std
    z · C and a quantizer of ``scale`` levels per unit, pass
    ``variance_share = (z * C * scale)^2 / t`` with t the secure-aggregation threshold, so
    the guarantee holds with any dropout the protocol survives (see the module docstring).

    Parameters
    ----------
    shape : tuple of int
        Shape of the quantized update.
    variance_share : float
        Variance of this participant's integer noise (>= 0).
    rng : SecureRandom
        Cryptographically secure generator.

    Returns
    -------
    numpy.ndarray of int64
        Integer noise; add it modulo the field (2^32) to the quantized update.
    """
    if variance_share < 0:
        raise ValueError(f"variance_share must be >= 0 (got {variance_share})")
    size = int(np.prod(shape)) if shape else 1
    return rng.discrete_gaussian(size, sigma=math.sqrt(variance_share)).reshape(shape)
