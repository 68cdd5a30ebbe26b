"""DP-FedAvg under secure aggregation: noise never clipped, never a sum of two.

The quantizer's range is sized from the noise (a site refuses a narrower one), and secure
aggregation refuses fewer than three participants at every point: config, round, unmask.
"""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fl_components.config import FederationConfig, config_from_dict
from fl_components.errors import ConfigError, RoundError
from fl_components.round.types import LocalUpdate, MaskedContribution, SiteResult
from fl_components.secure_aggregation.coordinator import SecureSum
from fl_components.secure_aggregation.protocol import UnmaskRequest
from fl_components.secure_aggregation.protocol.errors import UnsafeRequestError
from fl_components.secure_aggregation.site_stages import (
    NOISE_CLIP_TAIL,
    dp_clip_range,
    prepare_update,
    round_context,
    unmask_at_site,
)
from fl_components.strategies import FedAvg
from tests.secure_aggregation.federation import Federation


def _config(sites: int = 6, **secagg: Any) -> FederationConfig:
    return config_from_dict(
        {
            "name": "secure-dp",
            "sites": [{"name": f"site-{i:03d}"} for i in range(sites)],
            "participation": {"fraction": 1.0, "min_participants": 2},
            "privacy": {"mode": "participant", "clip_norm": 1.0, "client_noise_multiplier": 1.0},
            "secure_aggregation": {"enabled": True, **secagg},
        }
    )


def _update(site: str, vector: np.ndarray) -> LocalUpdate:
    return LocalUpdate(
        site=site, round=1, delta=[vector], num_examples=5, train_loss=0.0, seconds=0.0
    )


def test_the_round_range_leaves_room_for_the_noise_by_the_stated_tail() -> None:
    config = _config()  # default clip_range 1.0: too narrow for z = C = 1
    sites = config.site_names

    ctx = round_context(config, run_id="r", round_num=1, participants=sites, dimension=1000)

    std = 1.0 / math.sqrt(ctx.threshold)  # one site's share: z C / sqrt(t)
    k = math.sqrt(2 * math.log(2 * 1000 * len(sites) / NOISE_CLIP_TAIL))
    assert ctx.clip_range == pytest.approx(1.0 + k * std)
    # the subgaussian bound it rests on: P(|X| >= k std) <= 2 exp(-k^2 / 2), over d n values
    assert 2 * math.exp(-(k**2) / 2) * 1000 * len(sites) <= NOISE_CLIP_TAIL * (1 + 1e-9)


def test_a_wider_configured_range_is_kept() -> None:
    config = _config(clip_range=50.0)

    ctx = round_context(
        config, run_id="r", round_num=1, participants=config.site_names, dimension=10
    )

    assert ctx.clip_range == 50.0


def test_a_site_refuses_a_range_that_would_clip_its_noise() -> None:
    # the coordinator (or whoever wrote the job) narrows the range back to the default
    config = _config()
    ctx = round_context(
        config, run_id="r", round_num=1, participants=config.site_names, dimension=8
    )
    narrowed = replace(ctx, clip_range=1.0)

    with pytest.raises(ConfigError, match=r"refuses round 1: its clip range ±1 would clip"):
        prepare_update(config, _update("site-000", np.ones(8)), narrowed)
    vector, units = prepare_update(config, _update("site-000", np.ones(8)), ctx)
    assert units == 1 and vector.shape == (8,)
    assert dp_clip_range(
        config, participants=6, dimension=8, threshold=ctx.threshold
    ) == pytest.approx(ctx.clip_range)


@pytest.mark.parametrize(
    ("sites", "secagg", "match"),
    [
        (2, {}, "needs at least 3 sites"),
        (5, {"threshold": 2}, r"threshold \(2\) lets a sum of fewer than 3"),
        (5, {"neighbours": 1}, r"neighbours \(1\) makes groups of fewer than 3"),
    ],
)
def test_config_refuses_secure_sums_of_two(sites: int, secagg: dict[str, Any], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        _config(sites, **secagg)


def test_a_round_of_two_participants_is_refused() -> None:
    config = _config()

    with pytest.raises(ConfigError, match="each learns the other's update"):
        round_context(
            config, run_id="r", round_num=4, participants=("site-000", "site-001"), dimension=4
        )


def test_the_coordinator_asks_nobody_to_unmask_a_sum_of_two_survivors() -> None:
    fed = Federation.make(3)
    config = _config(3, threshold=3).model_copy(
        update={"privacy": _config().privacy.model_copy(update={"mode": "off"})}
    )
    ctx = replace(fed.context(dimension=4), threshold=2)  # as an older coordinator had it
    masked = {
        site: SiteResult(
            site=site,
            masked=MaskedContribution(
                site=site,
                round=1,
                num_examples=1,
                train_loss=0.0,
                seconds=0.0,
                payload=fed.participants[site]
                .mask_update(ctx, np.full(4, 0.1), num_examples=1)
                .to_bytes(),
            ),
        )
        for site in fed.sites[:2]  # the third dropped out before masking
    }
    asked: list[Any] = []
    strategy = FedAvg()

    with pytest.raises(RoundError, match=r"2 masked update\(s\) survived .* nobody was asked"):
        SecureSum(config, ctx, fed.registry).aggregate(
            masked,
            state=strategy.initial_state([np.zeros(4, dtype=np.float32)]),
            strategy=strategy,
            dispatch=lambda jobs: asked.append(jobs) or {},  # type: ignore[func-returns-value]
        )
    assert asked == []


def test_a_site_refuses_to_unmask_a_sum_of_two(tmp_path: Path) -> None:
    fed = Federation.make(3)
    ctx = replace(fed.context(dimension=4), threshold=2)
    request = UnmaskRequest(
        run_id=ctx.run_id,
        round=1,
        receiver="site-000",
        survivors=("site-000", "site-001"),
        dropped=("site-002",),
        ciphertexts={},
    )

    with pytest.raises(UnsafeRequestError, match="names 2 survivor"):
        unmask_at_site(
            "site-000",
            tmp_path,
            ctx,
            request.to_bytes(),
            registry=fed.registry,
            keys_dir=tmp_path / "keys",
        )


def test_clipped_fraction_is_not_logged_where_the_coordinator_cannot_know_it() -> None:
    from fl_components.privacy.rounds import PrivacyRounds
    from fl_components.strategies.private import DPFedAvg

    config = _config()
    privacy = PrivacyRounds(config)
    strategy = DPFedAvg(FedAvg(), config)
    state = strategy.initial_state([np.zeros(4, dtype=np.float32)])
    state, _ = privacy.account(state, None, selected=config.site_names, round_num=1)

    secure = strategy.aggregate_sum([np.ones(4)], weight=6.0, participants=6, state=state)
    in_clear = strategy.aggregate(
        [_update(s, np.full(4, 2.0)) for s in config.site_names[:3]], state
    )

    assert secure.private is not None and secure.private.clipped is None
    secure_metrics = privacy.metrics(state, [], secure.private, declined={})
    assert "privacy/clipped_fraction" not in secure_metrics  # the sites clipped; norms stayed
    assert secure_metrics["privacy/clip_norm"] == 1.0
    clear_metrics = privacy.metrics(state, [], in_clear.private, declined={})
    assert clear_metrics["privacy/clipped_fraction"] == 1.0  # norm 4 > C = 1: all clipped
