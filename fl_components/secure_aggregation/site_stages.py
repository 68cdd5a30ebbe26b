"""Secure aggregation in a federated round: enrolment, the site's two stages, the mean.

The protocol is Bonawitz et al. 2017, "Practical Secure Aggregation for Privacy-Preserving
Machine Learning", CCS (arXiv:1611.04482), implemented in
:mod:`fl_components.secure_aggregation.protocol`; this
module binds it to the federation (site folders, the config, local training, DP-FedAvg).

Where things live
-----------------
- A site's long-term private keys: ``<site folder>/keys/`` (0600, written once by
  :func:`enroll_site`; a work-pool site may point ``FEDPIPE_SITE_KEYS`` elsewhere).
- The site's memory of unmask requests ("never reveal both shares", across processes):
  ``<site folder>/secagg-state/``.
- The federation's public-key registry: ``secure_aggregation.registry``, by default
  ``<sites_dir>/<federation>/registry.json``. The coordinator reads only this file.

Weighting (FedAvg under a sum-only protocol)
--------------------------------------------
The protocol sums unweighted vectors clipped to ``±clip_range``. FedAvg needs
Σ n_k Δ_k / Σ n_k, so, as Flower's SecAgg+ workflow does with its ``max_weight``, each site
scales its update by w_k = min(n_k, W) / W (W = ``secure_aggregation.max_weight``) before
masking, keeping it inside the same clip range as Δ_k itself, and sends
``num_examples = min(n_k, W)`` in the clear (signed). The coordinator divides the unmasked
sum by Σ w_k = Σ min(n_k, W) / W. This is exactly FedAvg while every site holds at most W
examples; a larger site weighs as W. With participant-level DP (DP-FedAvg, McMahan et al.
2018, ICLR, arXiv:1710.06963) every site weighs 1, as in the plaintext DP path.

Participant-level DP under secure aggregation
---------------------------------------------
Each site clips Δ_k to L2 norm C and adds its share of the noise, integer noise of
variance (z C s)^2 / t in quantized units (s = quantizer scale, t = threshold: the
distributed discrete Gaussian of Kairouz, Liu & Steinke 2021, ICML, arXiv:2102.06387, via
:func:`fl_components.privacy.dp_fedavg.participant_noise`). It is added as ``noise / s``
before quantization, which stochastic rounding maps to exactly ``+noise`` levels; any t
survivors carry at least the central variance (z C)^2. The quantizer clips each value to
``±clip_range``: a clipped share is neither Gaussian nor of the variance accounted, so the
round's range is sized from the noise (:func:`dp_clip_range`): at least C + k z C / sqrt(t)
with k such that, in a round, *any* coordinate of *any* site's noised update is clipped
with probability at most :data:`NOISE_CLIP_TAIL` (each share is (z C / sqrt(t))-
subgaussian, Canonne, Kamath & Steinke 2020, Proposition 19 of arXiv:2004.00010, so
P(|X| >= k sigma) <= 2 exp(-k^2 / 2); union over d coordinates of n sites). A site
refuses a round context whose range is narrower than that.

At least three participants
---------------------------
With two participants, the sum tells each of them the other's update. A round needs at
least :data:`MIN_SECURE_PARTICIPANTS` selected sites (:func:`round_context`) and as many
whose masked update survives (the coordinator aborts before asking anyone to unmask, and
a site refuses an unmask request that names fewer survivors).
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path

import numpy as np
import numpy.typing as npt

from fl_components.compression.instruction import CompressionInstruction
from fl_components.compression.secure import secure_shape
from fl_components.compression.site import select_for_masking
from fl_components.config import FederationConfig
from fl_components.data.check import federation_dir
from fl_components.errors import ConfigError
from fl_components.exchange import ExchangeError, check_payload_size, parse_json_payload
from fl_components.federation import Site
from fl_components.parameters import NDArrays, flatten
from fl_components.privacy.dp_fedavg import SecureRandom, participant_noise
from fl_components.round.types import LocalUpdate, MaskedContribution, SiteInstructions
from fl_components.secure_aggregation.protocol import (
    AggregateResult,
    PublicKeys,
    Registry,
    RoundContext,
    SecAggParticipant,
    SiteKeys,
    UnmaskRequest,
    default_threshold,
)
from fl_components.secure_aggregation.protocol.errors import UnsafeRequestError
from fl_components.secure_aggregation.protocol.keys import ED25519_FILE
from fl_components.strategies.aggregation import bound_norm

log = logging.getLogger(__name__)

REGISTRY_FILE = "registry.json"
MIN_SECURE_PARTICIPANTS = 3
# probability that any noise share is clipped by the quantizer in a round (stated bound)
NOISE_CLIP_TAIL = 1e-9
KEYS_DIR = "keys"
STATE_DIR = "secagg-state"


# -- keys and registry ----------------------------------------------------------------------
def registry_path(config: FederationConfig) -> Path:
    """The federation's public-key registry file."""
    if config.secure_aggregation.registry is not None:
        return Path(config.secure_aggregation.registry)
    return federation_dir(config) / REGISTRY_FILE


def site_keys_dir(folder: str | os.PathLike[str]) -> Path:
    """Where a site keeps its long-term private keys: ``<site folder>/keys``."""
    return Path(folder) / KEYS_DIR


def enroll_site(keys_dir: str | os.PathLike[str]) -> PublicKeys:
    """Make the site's keys if it has none (0600, never overwritten); return the public half.

    Runs at the site: only the returned public keys leave it.
    """
    folder = Path(keys_dir)
    if not (folder / ED25519_FILE).is_file():
        SiteKeys.generate().save(folder)
    return SiteKeys.load(folder).public()


def publish_public_keys(
    path: str | os.PathLike[str], entries: Mapping[str, PublicKeys]
) -> Registry:
    """Merge ``entries`` into the registry file at ``path`` (written atomically); return it."""
    target = Path(path)
    current = dict(Registry.from_json(target.read_text())) if target.is_file() else {}
    current.update(entries)
    registry = Registry(current)
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    partial.write_text(registry.to_json() + "\n")
    partial.replace(target)
    return registry


def load_registry(path: str | os.PathLike[str], *, sites: tuple[str, ...] = ()) -> Registry:
    """Read the registry and check that every site in ``sites`` is enrolled.

    Raises
    ------
    ConfigError
        If the file is missing or a site has no public keys in it.
    """
    target = Path(path)
    if not target.is_file():
        raise ConfigError(
            f"secure_aggregation: registry {target} does not exist; enrol each site with "
            "`fedpipe site init NAME --data PATH` (or set secure_aggregation.registry)"
        )
    # written by every site's enrolment: bounded like any payload from another party
    check_payload_size(target.stat().st_size, what=f"secure_aggregation: registry {target}")
    registry = Registry.from_json(target.read_text())
    missing = [s for s in sites if s not in registry]
    if missing:
        raise ConfigError(
            f"secure_aggregation: sites {missing} have no public keys in {target}; enrol them "
            "with `fedpipe site init NAME --data PATH`"
        )
    return registry


# -- the round ------------------------------------------------------------------------------
def round_context(
    config: FederationConfig,
    *,
    run_id: str,
    round_num: int,
    participants: tuple[str, ...],
    dimension: int,
) -> RoundContext:
    """The round's :class:`RoundContext` from ``config.secure_aggregation``.

    Raises
    ------
    ConfigError
        If ``threshold`` exceeds the round's participants, or fewer than
        :data:`MIN_SECURE_PARTICIPANTS` take part.
    """
    secagg = config.secure_aggregation
    n = len(participants)
    # compression: b-bit fixed point packed in Z_2^(b + ceil(log2 n)) (compression.secure)
    shape = secure_shape(config.compression, n=n, dimension=dimension)
    provisional = RoundContext(
        run_id=run_id,
        round=round_num,
        participants=participants,
        threshold=1,
        dimension=shape.dimension,  # k with shared random-k: only those are masked
        clip_range=secagg.clip_range,
        neighbours=secagg.neighbours,
        bits=secagg.bits if shape.bits is None else shape.bits,
        field_bits=shape.field_bits,
    )
    # shares go to a site's neighbourhood (all n, or itself and its neighbours): t is a
    # majority of that group unless set
    group = provisional.group_size
    threshold = secagg.threshold if secagg.threshold is not None else default_threshold(group)
    if threshold > group:
        where = f"the {n} participants" if group == n else f"a neighbourhood of {group} sites"
        raise ConfigError(
            f"secure_aggregation.threshold ({threshold}) exceeds {where} of round {round_num}; "
            f"lower it, raise participation.fraction or secure_aggregation.neighbours, or set "
            f"it to null (majority: {default_threshold(group)})"
        )
    if n < MIN_SECURE_PARTICIPANTS:
        raise ConfigError(
            f"round {round_num}: secure aggregation with {n} participant(s) "
            f"({', '.join(participants) or 'none'}): with two, each learns the other's update "
            f"from the sum; it needs at least {MIN_SECURE_PARTICIPANTS}. Raise "
            "participation.fraction or participation.min_participants, or add sites"
        )
    if config.privacy.participant_level:  # the noise shares are sized by t
        wanted = dp_clip_range(config, participants=n, dimension=dimension, threshold=threshold)
        return replace(provisional, threshold=threshold, clip_range=max(secagg.clip_range, wanted))
    return replace(provisional, threshold=threshold)


def dp_clip_range(
    config: FederationConfig, *, participants: int, dimension: int, threshold: int
) -> float:
    """The smallest ±range that clips no DP noise share but with :data:`NOISE_CLIP_TAIL`.

    C + k z C / sqrt(t), k = sqrt(2 ln(2 d n / tail)): each coordinate of a clipped update
    is at most C, and each share's noise is (z C / sqrt(t))-subgaussian (module docstring).
    """
    privacy = config.privacy
    share_std = privacy.client_noise_multiplier * privacy.clip_norm / math.sqrt(threshold)
    k = math.sqrt(2.0 * math.log(2.0 * max(1, dimension) * max(1, participants) / NOISE_CLIP_TAIL))
    return privacy.clip_norm + k * share_std


def weight_units(config: FederationConfig, num_examples: int) -> int:
    """The (signed, clear) weight a site sends: min(n_k, W), or 1 under DP-FedAvg."""
    if config.privacy.participant_level:
        return 1
    return max(1, min(int(num_examples), config.secure_aggregation.max_weight))


def weight_scale(config: FederationConfig) -> int:
    """W: weight units per unit of weight (1 under DP-FedAvg)."""
    return 1 if config.privacy.participant_level else config.secure_aggregation.max_weight


def _participant(
    site: str, keys_dir: str | os.PathLike[str], registry: Registry, folder: Path
) -> SecAggParticipant:
    return SecAggParticipant(site, SiteKeys.load(keys_dir), registry, state_dir=folder / STATE_DIR)


def prepare_update(
    config: FederationConfig,
    update: LocalUpdate,
    ctx: RoundContext,
    *,
    rng: SecureRandom | None = None,
) -> tuple[npt.NDArray[np.float64], int]:
    """Flatten, DP-clip-and-noise (participant-level DP) and weight a site's update.

    ``rng`` draws the noise share (a fresh key from the OS's CSPRNG unless given).

    Returns
    -------
    tuple[numpy.ndarray of float64, int]
        The vector to mask (shape (d,)) and its weight in units (sent in the clear).

    Raises
    ------
    ConfigError
        Under participant-level DP, when the round's clip range would clip the noise
        (the site refuses: the coordinator sized it too narrow).
    """
    delta = update.delta
    if config.strategy.norm_bound is not None:  # the coordinator sees only the sum: bound here
        delta = bound_norm(delta, config.strategy.norm_bound)
    vector = flatten(delta).astype(np.float64)
    if config.privacy.participant_level:
        return _clipped_and_noised(config, update, ctx, vector, rng=rng), 1
    units = weight_units(config, update.num_examples)
    if update.num_examples > config.secure_aggregation.max_weight:
        log.warning(
            "site %s has %d examples, above secure_aggregation.max_weight=%d: weighted as %d",
            update.site,
            update.num_examples,
            config.secure_aggregation.max_weight,
            units,
        )
    vector *= units / weight_scale(config)
    return vector, units


def _clipped_and_noised(
    config: FederationConfig,
    update: LocalUpdate,
    ctx: RoundContext,
    vector: npt.NDArray[np.float64],
    *,
    rng: SecureRandom | None,
) -> npt.NDArray[np.float64]:
    """Participant-level DP at the site: clip ``vector`` to C, add this site's noise share.

    The noise is in quantization levels: each of t survivors adds 1/t of the variance.
    """
    privacy = config.privacy
    wanted = dp_clip_range(
        config, participants=len(ctx.participants), dimension=vector.size,
        threshold=ctx.threshold,
    )  # fmt: skip
    if ctx.clip_range < wanted:
        share_std = privacy.client_noise_multiplier * privacy.clip_norm
        raise ConfigError(
            f"site {update.site!r} refuses round {ctx.round}: its clip range "
            f"±{ctx.clip_range:g} would clip the DP noise (std "
            f"{share_std / math.sqrt(ctx.threshold):g} per site, t = {ctx.threshold}); "
            f"it needs at least ±{wanted:.4g}. The "
            "coordinator sizes it from privacy.clip_norm and client_noise_multiplier: "
            "run the same fedpipe version on both sides"
        )
    norm = float(np.linalg.norm(vector))
    if norm > privacy.clip_norm:
        vector *= privacy.clip_norm / norm
    scale = ctx.quantizer.scale
    sigma_levels = privacy.client_noise_multiplier * privacy.clip_norm * scale
    noise = participant_noise(
        vector.shape,
        variance_share=sigma_levels**2 / ctx.threshold,
        rng=rng if rng is not None else SecureRandom(),
    )
    vector += noise / scale
    return vector


def mask_at_site(
    site: Site,
    global_parameters: NDArrays,
    ctx: RoundContext,
    *,
    registry: Registry,
    keys_dir: str | os.PathLike[str],
    seed: int,
    instructions: SiteInstructions | None = None,
    spent_by: tuple[str, str] = ("", ""),
) -> MaskedContribution:
    """Stage 1 at a site: train, (DP), weight, quantize and mask; return the signed bytes.

    Nothing but the masked message and clear metadata leaves this function. ``spent_by``
    names the coordinator's runs in the site's privacy ledger (see :meth:`Site.train`).
    """
    update = site.train(
        global_parameters,
        round_num=ctx.round,
        seed=seed,
        instructions=instructions,
        spent_by=spent_by,
    )
    vector: npt.NDArray[np.floating]
    vector, units = prepare_update(site.config, update, ctx)
    if site.config.compression.method == "random_k":  # the round's shared k coordinates
        instruction = CompressionInstruction(site.config.compression, ctx.run_id, ctx.round)
        vector = select_for_masking(vector, instruction=instruction, site_dir=site.folder)
    message = _participant(site.name, keys_dir, registry, site.folder).mask_update(
        ctx, vector, num_examples=units
    )
    return MaskedContribution(
        site=site.name,
        round=ctx.round,
        num_examples=update.num_examples,
        train_loss=update.train_loss,
        seconds=update.seconds,
        extra=dict(update.extra),
        payload=message.to_bytes(),
    )


def unmask_at_site(
    site: str,
    folder: str | os.PathLike[str],
    ctx: RoundContext,
    request: bytes,
    *,
    registry: Registry,
    keys_dir: str | os.PathLike[str],
) -> bytes:
    """Stage 2 at a site: answer the coordinator's unmask request (refusing unsafe ones)."""
    parsed = UnmaskRequest.from_bytes(request)
    if len(parsed.survivors) < MIN_SECURE_PARTICIPANTS:
        raise UnsafeRequestError(
            f"site {site!r} refuses to unmask round {ctx.round}: the request names "
            f"{len(parsed.survivors)} survivor(s) ({', '.join(parsed.survivors)}); a sum of "
            f"fewer than {MIN_SECURE_PARTICIPANTS} tells each survivor the other's update"
        )
    participant = _participant(site, keys_dir, registry, Path(folder))
    return participant.unmask_response(ctx, parsed).to_bytes()


def secagg_metrics(result: AggregateResult) -> dict[str, float]:
    """MLflow metrics of one securely aggregated round."""
    stats = result.stats
    return {
        "secagg/enabled": 1.0,
        "secagg/survivors": float(stats.survivors),
        "secagg/dropouts_recovered": float(stats.dropouts_recovered),
        "secagg/rejected": float(stats.rejected_messages),
        "secagg/mask_seconds": stats.mask_seconds_max,
        "secagg/receive_seconds": stats.receive_seconds,
        "secagg/unmask_seconds": stats.unmask_seconds,
        "secagg/error_bound": float(result.error_bound),
        "bytes/up": float(stats.bytes_up),
        "secagg/expansion": stats.expansion_factor,
    }


def context_to_json(ctx: RoundContext) -> str:
    """The round context as JSON (sent to work-pool sites)."""
    return json.dumps(ctx.to_dict(), sort_keys=True)


def context_from_json(text: str) -> RoundContext:
    """Inverse of :func:`context_to_json` (size-bounded before parsing).

    Raises
    ------
    ExchangeError
        If the text is too large, not JSON, or not a round context.
    """
    data = parse_json_payload(text, what="secure-aggregation round context")
    try:
        return RoundContext(
            run_id=str(data["run_id"]),
            round=int(data["round"]),
            participants=tuple(str(p) for p in data["participants"]),
            threshold=int(data["threshold"]),
            dimension=int(data["dimension"]),
            clip_range=float(data["clip_range"]),
            neighbours=None if data["neighbours"] is None else int(data["neighbours"]),
            bits=None if data["bits"] is None else int(data["bits"]),
            field_bits=int(data.get("field_bits", 32)),
        )
    except (KeyError, IndexError, TypeError, ValueError, AttributeError, OverflowError) as error:
        raise ExchangeError(
            f"secure-aggregation round context is malformed ({error.__class__.__name__}: "
            f"{error}); the coordinator and this site may run different fedpipe versions"
        ) from None
