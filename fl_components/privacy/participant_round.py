"""DP-FedAvg's figures for one round, as functions of the config and the server state.

McMahan, Ramage, Talwar & Zhang 2018, "Learning Differentially Private Recurrent Language
Models", ICLR, arXiv:1710.06963 (Algorithm 1; the fixed denominator q·N of the estimator
f̃_f under Poisson selection). Adaptive clipping: Andrew, Thakkar, McMahan & Ramaswamy 2021,
"Differentially Private Learning with Adaptive Clipping", NeurIPS, arXiv:1905.03871 (the
noised, centred count of unclipped updates, σ_b = m / 20).

Nothing here is kept between calls: the clip norm in force travels in ``ServerState``, the
noise comes from the caller's generator.
"""

from __future__ import annotations

from fl_components.config import FederationConfig
from fl_components.privacy.dp_fedavg import (
    DPAggregate,
    SecureRandom,
    adaptive_clip_norm,
    dp_fedavg_aggregate,
    update_noise_multiplier,
)
from fl_components.round.types import LocalUpdate, ServerState


def poisson(config: FederationConfig) -> bool:
    """True when participants are Poisson-sampled (DP-FedAvg with amplification)."""
    return config.privacy.participant_level and config.privacy.sampling == "random"


def fixed_denominator(config: FederationConfig) -> float | None:
    """Fixed denominator q·N of DP-FedAvg under Poisson selection; None otherwise."""
    if not poisson(config):
        return None
    return config.participation.fraction * len(config.sites)


def expected_cohort(config: FederationConfig, participants: int) -> float:
    """m, what the mean and the clipped-bit fraction divide by.

    Under Poisson selection the fixed q·N (the actual cohort size is secret); under a
    fixed, public selection the count that came back (known anyway).
    """
    denominator = fixed_denominator(config)
    return float(participants) if denominator is None else denominator


def count_noise_std(config: FederationConfig, participants: int) -> float:
    """σ_b of the centred adaptive-clipping count (Andrew et al.: m / 20), at least z.

    From the *expected* cohort m, so that the noise, like the denominator, does not
    depend on how many were drawn.
    """
    return max(expected_cohort(config, participants) / 20, config.privacy.client_noise_multiplier)


def noise_multiplier_of_update(config: FederationConfig, participants: int) -> float:
    """Noise multiplier of the update itself (smaller share when the count is noised)."""
    privacy = config.privacy
    if not privacy.adaptive_clipping:
        return privacy.client_noise_multiplier
    return update_noise_multiplier(
        privacy.client_noise_multiplier,
        count_noise_std=count_noise_std(config, participants),
    )


def clip_norm_in_force(config: FederationConfig, state: ServerState) -> float:
    """The clip norm for the round ``state`` starts: adapted so far, else privacy.clip_norm."""
    return config.privacy.clip_norm if state.clip_norm is None else state.clip_norm


def private_mean(
    config: FederationConfig,
    updates: list[LocalUpdate],
    *,
    clip_norm: float,
    rng: SecureRandom,
) -> DPAggregate:
    """DP-FedAvg over the round's updates: clip to ``clip_norm``, noise the sum, divide."""
    return dp_fedavg_aggregate(
        [u.delta for u in updates],
        clip_norm=clip_norm,
        noise_multiplier=noise_multiplier_of_update(config, len(updates)),
        rng=rng,
        denominator=fixed_denominator(config),
    )


def next_clip_norm(
    config: FederationConfig, clip_norm: float, result: DPAggregate, *, rng: SecureRandom
) -> float:
    """The clip norm for the next round, from the one in force and the round's release.

    With adaptive clipping it moves by the round's noised, centred count of unclipped
    updates, released with the round's update (together one mechanism of multiplier z: see
    :func:`fl_components.privacy.dp_fedavg.update_noise_multiplier`). Without it, or
    without per-update norms (under secure aggregation the sites clip), it stays.
    """
    privacy = config.privacy
    if not (privacy.adaptive_clipping and result.norms):
        return clip_norm
    participants = len(result.norms)
    return adaptive_clip_norm(
        clip_norm,
        norms=result.norms,
        target_quantile=privacy.target_quantile,
        learning_rate=privacy.clip_learning_rate,
        count_noise_std=count_noise_std(config, participants),
        expected_count=expected_cohort(config, participants),
        rng=rng,
    )
