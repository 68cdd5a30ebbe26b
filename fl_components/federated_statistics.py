"""The statistics stage: the federation's mean and std from the sites' summed statistics.

Before round 1 of a run with ``data.scale: federation``, and for ``fedpipe stats``, each site
computes the sufficient statistics of its own training rows (row count, per model input the
sum and the sum of squares, rows per class: :func:`fl_components.data.statistics.site_sums`);
no row leaves it. The coordinator learns only their sum (Chan, Golub & LeVeque 1983: the
pooled mean and variance follow from it):

- ``secure_aggregation.enabled``: each site writes its statistics as exact fixed-point
  digits (:func:`~fl_components.data.statistics.to_limbs`) and masks them with its enrolled
  keys as it masks a model update (Bonawitz et al. 2017, CCS, arXiv:1611.04482); the
  coordinator unmasks the sum alone, of at least :data:`MIN_SECURE_PARTICIPANTS` sites.
- otherwise the sites' statistics are added in the clear, as their updates are in such a run.

Every site then standardizes with the same mean and std, pinned into the run's config
(``data.scaling``), which each job carries to the site.

Privacy rules (``data.statistics_privacy``): fewer than ``min_sites`` sites or
``min_rows`` rows in all and the statistics are refused. With ``epsilon`` set, each site
clips its values to the public bounds (``clip``/``bounds``) and adds Gaussian noise of std
``sigma = z * Delta`` to its *own* statistics before they leave it (:func:`noised_sums`),
Delta the L2 sensitivity of one row (:func:`~fl_components.data.statistics.sensitivity`)
and z the smallest noise multiplier whose single release (sample rate 1, one step) costs at
most ``epsilon`` at ``delta`` under the site's Opacus accountant (RDP: Mironov 2017,
arXiv:1702.07476). Each site's guarantee so rests on its own noise alone, whoever else
colludes (the sum carries sqrt(n) times the noise one central release would). The release
is charged to the site's privacy ledger as ``(z, 1.0, 1)`` with mechanism "statistics",
composed with its DP-SGD rounds; a site whose budget (the config's, capped by its own policy) it
would pass refuses.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import numpy.typing as npt

from fl_components.config import (
    FederationConfig,
    FederationScaling,
    StatisticsPrivacy,
    config_from_dict,
)
from fl_components.data.check import check_sites, dataset_info, load_configured_site, site_folder
from fl_components.data.contract import DataContract
from fl_components.data.statistics import (
    LIMBS,
    FederationStats,
    SiteSums,
    add_sums,
    clipped_sums,
    from_limb_sums,
    sensitivity,
    site_sums,
    to_limbs,
)
from fl_components.errors import ConfigError, DataError
from fl_components.privacy.epsilon import epsilon_of
from fl_components.privacy.ledger import PrivacyLedger, default_delta
from fl_components.secure_aggregation import site_stages
from fl_components.secure_aggregation.protocol import (
    RoundContext,
    SecAggCoordinator,
    SecAggParticipant,
    SiteKeys,
    default_threshold,
)
from fl_components.secure_aggregation.protocol.quantize import max_bits
from fl_components.site.policy import enforce, load_policy, policy_path


@dataclass(frozen=True)
class StatisticsResult:
    """The federation's statistics, whose sites they sum, and how they were combined.

    ``per_site`` holds each site's own sums only when they were combined in the clear (the
    coordinator saw them then anyway); under secure aggregation it is empty.
    """

    stats: FederationStats
    inputs: tuple[str, ...]
    sites: tuple[str, ...]
    secure: bool
    per_site: dict[str, SiteSums]
    epsilon: float | None = None  # each site's cost of its noised statistics; None: no noise

    def scaling(self) -> FederationScaling:
        """What every site standardizes with (``data.scaling``)."""
        return FederationScaling(
            mean=tuple(float(m) for m in self.stats.mean),
            std=tuple(float(s) for s in self.stats.std),
            rows=self.stats.count,
            secure=self.secure,
            epsilon=self.epsilon,
        )


def site_statistics(
    config: FederationConfig, name: str, *, rng: np.random.Generator | None = None
) -> tuple[SiteSums, tuple[str, ...]]:
    """At site ``name``: the sums of its own training rows (as read, before any scaling).

    With ``data.statistics_privacy.epsilon``: of its values clipped to the public bounds,
    noised (:func:`noised_sums`) and charged to its ledger first.

    Raises
    ------
    BudgetExhaustedError
        When the release would take the site past ``privacy.max_epsilon``.
    """
    info = dataset_info(config)
    folder = site_folder(config, name)
    data = load_configured_site(config, name, folder, info=info)
    rules = config.data.statistics_privacy
    if rules.epsilon is None:
        return site_sums(data.train, n_classes=info.n_classes), data.train.columns
    low, high = public_bounds(rules, data.train.columns)
    sums = clipped_sums(data.train, n_classes=info.n_classes, low=low, high=high)
    delta = rules.delta or default_delta(max(1, len(data.train)))
    z = noise_multiplier_for(rules.epsilon, delta, accountant=config.privacy.accountant)
    ledger = PrivacyLedger.open(folder, site=name, accountant=config.privacy.accountant)
    budget = _site_budget(config, folder)
    ledger.check_round(
        noise_multiplier=z, sample_rate=1.0, steps=1, delta=delta, max_epsilon=budget
    )
    ledger.record(
        federation=config.name,
        round_num=0,
        noise_multiplier=z,
        sample_rate=1.0,
        steps=1,
        delta=delta,
        max_epsilon=budget,
        mechanism="statistics",
    )
    sigma = z * sensitivity(low, high)
    return noised_sums(sums, sigma, rng or np.random.default_rng()), data.train.columns


def _site_budget(config: FederationConfig, folder: Path) -> float | None:
    """The budget a release is checked against: the config's, never above the site's own.

    The config's ``privacy.max_epsilon``, capped by ``max_epsilon_total`` in the site's
    policy.yaml where it has one: a config cannot lift what the site set.
    """
    path = policy_path(folder)
    if not path.is_file():
        return config.privacy.max_epsilon
    return enforce(load_policy(path), config).privacy.max_epsilon


def public_bounds(
    rules: StatisticsPrivacy, columns: tuple[str, ...]
) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]:
    """Per model input: the public ``[low, high]`` (``bounds`` by name, else ``[-clip, clip]``).

    Raises
    ------
    ConfigError
        When a column has no bound, or ``bounds`` names a column that is no model input.
    """
    unknown = sorted(set(rules.bounds) - set(columns))
    if unknown:
        raise ConfigError(
            f"data.statistics_privacy.bounds names {', '.join(map(repr, unknown))}, not a model "
            f"input (inputs: {', '.join(columns)}); fix the column name"
        )
    low, high = [], []
    for column in columns:
        if column in rules.bounds:
            bound = rules.bounds[column]
        elif rules.clip is not None:
            bound = (-rules.clip, rules.clip)
        else:
            raise ConfigError(
                f"data.statistics_privacy: model input {column!r} has no public bound; add it "
                "to data.statistics_privacy.bounds or set data.statistics_privacy.clip"
            )
        low.append(bound[0])
        high.append(bound[1])
    return np.asarray(low, np.float64), np.asarray(high, np.float64)


def noise_multiplier_for(epsilon: float, delta: float, *, accountant: str) -> float:
    """The smallest z (to 0.1 %) whose one Gaussian release costs at most ``epsilon`` at ``delta``.

    The release is recorded as ``(z, 1.0, 1)`` and :func:`epsilon_of` (the ledger's own
    accountant) recomputes its epsilon; bisection on the same function keeps them equal.
    """

    def cost(z: float) -> float:
        return epsilon_of([(z, 1.0, 1)], delta=delta, accountant=accountant)

    low, high = 1e-2, 1.0
    while cost(high) > epsilon:
        low, high = high, high * 2
        if high > 1e6:
            raise ConfigError(
                f"data.statistics_privacy.epsilon {epsilon:g} at delta {delta:g} needs more "
                "than 1e6 times the sensitivity as noise; raise epsilon"
            )
    while high - low > 1e-3 * high:
        middle = (low + high) / 2
        if cost(middle) > epsilon:
            low = middle
        else:
            high = middle
    return high


def noised_sums(sums: SiteSums, sigma: float, rng: np.random.Generator) -> SiteSums:
    """``sums`` with independent N(0, sigma^2) noise on every entry of its vector."""
    vector = sums.vector() + rng.normal(0.0, sigma, size=sums.vector().shape)
    return SiteSums.from_vector(vector, n_features=len(sums.sums), n_classes=len(sums.label_counts))


def statistics_context(config: FederationConfig, *, sites: tuple[str, ...]) -> RoundContext:
    """The secure sum's context: digits of 16 bits summed exactly (quantizer scale 1).

    With ``clip_range`` = (2^bits - 1) / 2 the quantizer maps ``digit - clip_range`` to the
    digit itself, so no digit is rounded or clipped.

    Raises
    ------
    ConfigError
        If fewer than :data:`MIN_SECURE_PARTICIPANTS` sites take part.
    """
    n = len(sites)
    if n < site_stages.MIN_SECURE_PARTICIPANTS:
        raise ConfigError(
            f"federated statistics under secure aggregation need at least "
            f"{site_stages.MIN_SECURE_PARTICIPANTS} sites (got {n}: {', '.join(sites)}): with "
            "fewer, the sum tells each site the other's statistics; add sites"
        )
    info = dataset_info(config)
    bits = max_bits(n)
    secagg = config.secure_aggregation
    provisional = RoundContext(
        run_id=f"stats-{secrets.token_hex(8)}",  # its own masks: never a training round's
        round=0,
        participants=sites,
        threshold=1,
        dimension=(1 + 2 * info.n_features + info.n_classes) * LIMBS,
        clip_range=((1 << bits) - 1) / 2,
        neighbours=secagg.neighbours,
        bits=bits,
    )
    threshold = secagg.threshold or default_threshold(provisional.group_size)
    return replace(provisional, threshold=threshold)


def mask_statistics(
    config: FederationConfig, name: str, ctx: RoundContext
) -> tuple[bytes, tuple[str, ...]]:
    """At site ``name``: its statistics as digits, masked and signed (stage 1 of the sum)."""
    folder = site_folder(config, name)
    sums, columns = site_statistics(config, name)
    digits = to_limbs(sums, site=name).astype(np.float64) - ctx.clip_range
    registry = site_stages.load_registry(site_stages.registry_path(config), sites=ctx.participants)
    participant = SecAggParticipant(
        name,
        SiteKeys.load(site_stages.site_keys_dir(folder)),
        registry,
        state_dir=folder / site_stages.STATE_DIR,
    )
    return participant.mask_update(ctx, digits).to_bytes(), columns


def _secure_sum(
    config: FederationConfig, sites: tuple[str, ...]
) -> tuple[SiteSums, tuple[str, ...], tuple[str, ...]]:
    """Enrol the local sites, run both stages of the secure sum; the summed statistics."""
    public = {
        name: site_stages.enroll_site(site_stages.site_keys_dir(site_folder(config, name)))
        for name in sites
    }
    registry = site_stages.publish_public_keys(site_stages.registry_path(config), public)
    ctx = statistics_context(config, sites=sites)
    coordinator = SecAggCoordinator(ctx, registry)
    columns: tuple[str, ...] = ()
    for name in sites:
        payload, columns = mask_statistics(config, name, ctx)
        coordinator.receive(payload)
    responses = [
        site_stages.unmask_at_site(
            name,
            site_folder(config, name),
            ctx,
            request.to_bytes(),
            registry=registry,
            keys_dir=site_stages.site_keys_dir(site_folder(config, name)),
        )
        for name, request in coordinator.unmask_requests().items()
    ]
    result = coordinator.finish(responses)
    info = dataset_info(config)
    digit_sums = result.total + result.count * ctx.clip_range
    total = from_limb_sums(digit_sums, n_features=info.n_features, n_classes=info.n_classes)
    return total, columns, result.survivors


def federation_statistics(
    config: FederationConfig, *, sites: tuple[str, ...] | None = None
) -> StatisticsResult:
    """Run the statistics stage over the sites' folders on this machine (local backend).

    Raises
    ------
    DataError
        If a site cannot load its files (the message names site, file, column and fix).
    ConfigError
        Under secure aggregation, with fewer than three sites.
    """
    names = tuple(sites or config.site_names)
    rules = config.data.statistics_privacy
    if len(names) < rules.min_sites:
        raise ConfigError(
            f"federated statistics need at least data.statistics_privacy.min_sites = "
            f"{rules.min_sites} sites (got {len(names)}: {', '.join(names)}): with fewer they "
            "tell too much about each site; add sites (lowering min_sites weakens the rule)"
        )
    secure = config.secure_aggregation.enabled
    if secure:
        total, columns, summed = _secure_sum(config, names)
        per_site: dict[str, SiteSums] = {}
    else:
        found = {name: site_statistics(config, name) for name in names}
        per_site = {name: sums for name, (sums, _) in found.items()}
        total, columns, summed = add_sums(per_site.values()), found[names[0]][1], names
    if rules.min_rows and total.count < rules.min_rows:
        raise DataError(
            f"federated statistics need at least data.statistics_privacy.min_rows = "
            f"{rules.min_rows} training rows in all (the {len(summed)} sites hold about "
            f"{max(0, round(total.count))}); add sites or rows before forming them"
        )
    inputs = columns or DataContract.of(config.data).model_inputs(config.data.columns or ())
    return StatisticsResult(
        FederationStats.from_sums(total), inputs, summed, secure, per_site, rules.epsilon
    )


def with_federation_scaling(config: FederationConfig) -> FederationConfig:
    """``config`` with ``data.scaling`` formed by the statistics stage, when it needs one.

    Only for ``data.scale: federation`` without ``data.scaling``; any other config comes
    back unchanged. With ``data.allow_unloadable_sites``, the sites that load form it.
    """
    if config.data.scale != "federation" or config.data.scaling is not None:
        return config
    sites = None
    if config.data.allow_unloadable_sites:  # those sites drop out: the rest form the scale
        sites = tuple(row.site for row in check_sites(config).sites if row.loaded)
        if not sites:
            raise DataError(
                "data.scale is 'federation' but no site could load its files; fix them "
                "(`fedpipe data check CONFIG` names what stops each site)"
            )
    scaling = federation_statistics(config, sites=sites).scaling()
    raw = config.model_dump(mode="json", exclude_unset=True)
    raw["data"] = {**raw.get("data", {}), "scaling": scaling.model_dump(mode="json")}
    return config_from_dict(raw, source="the config with data.scaling from the statistics stage")
