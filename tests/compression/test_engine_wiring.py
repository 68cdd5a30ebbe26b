"""Compression wired into the round engine: exact bytes, residuals, SecAgg with random-k."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from fl_components.compression.error_feedback import RESIDUAL_FILE
from fl_components.compression.instruction import CompressionInstruction
from fl_components.config import FederationConfig
from fl_components.federation import materialize_sites, site_folder
from fl_components.parameters import get_parameters
from fl_components.round.engine import RoundPlan, run_round
from fl_components.secure_aggregation import site_stages as secure_round
from fl_components.secure_aggregation.coordinator import SecureSum
from fl_components.site.jobs import InProcessSites
from fl_components.site.models import build_model
from fl_components.strategies import FedAvg


def _with(config: FederationConfig, **sections: dict[str, object]) -> FederationConfig:
    return FederationConfig.model_validate(config.model_dump(exclude_unset=True) | sections)


def test_top_k_in_the_clear_reports_exact_bytes_and_keeps_residuals(
    small_config: FederationConfig,
) -> None:
    config = _with(small_config, compression={"method": "top_k", "fraction": 0.1})
    materialize_sites(config)
    sites = InProcessSites(config)
    strategy = FedAvg()
    state = strategy.initial_state(get_parameters(build_model(config.model, sites.info, seed=0)))
    d = sum(p.size for p in state.parameters)
    k = -(-d // 10)
    names = config.site_names
    plan = RoundPlan(
        round=1,
        selected=names,
        seeds=dict.fromkeys(names, 1),
        compression=CompressionInstruction(config.compression, "run-c", 1),
    )

    _, report = run_round(state, plan, sites, strategy)

    assert report.metrics["bytes/up"] == 3 * (28 + 8 * k)  # frame + k (index, value) pairs
    assert report.metrics["bytes/up/site/site-0"] == 28 + 8 * k
    # (the mean folds each update as it arrives and keeps no delta: what each site sent, k
    # values, is what the byte counts above show)
    for site in names:
        assert (site_folder(config, site) / RESIDUAL_FILE).is_file()


def test_shared_random_k_under_secure_aggregation_masks_k_packed_values(
    small_config: FederationConfig, tmp_path: Path
) -> None:
    config = _with(
        small_config,
        secure_aggregation={"enabled": True, "clip_range": 0.5},
        compression={"method": "random_k", "fraction": 0.1, "bits": 8},
    )
    materialize_sites(config)
    secure_round.publish_public_keys(
        secure_round.registry_path(config),
        {
            s: secure_round.enroll_site(secure_round.site_keys_dir(site_folder(config, s)))
            for s in config.site_names
        },
    )
    sites = InProcessSites(config)
    strategy = FedAvg()
    state = strategy.initial_state(get_parameters(build_model(config.model, sites.info, seed=0)))
    d = sum(p.size for p in state.parameters)
    k = -(-d // 10)
    secure = SecureSum.for_round(
        config,
        secure_round.load_registry(secure_round.registry_path(config)),
        run_id="run-s",
        round_num=1,
        selected=config.site_names,
        like=state.parameters,
    )
    assert (secure.ctx.dimension, secure.ctx.bits, secure.ctx.field_bits) == (k, 8, 10)
    names = config.site_names
    plan = RoundPlan(round=1, selected=names, seeds=dict.fromkeys(names, 1), secure=secure)

    _, report = run_round(state, plan, sites, strategy)

    assert report.metrics["secagg/survivors"] == 3.0
    moved = sum(int(np.count_nonzero(a)) for a in report.aggregated.delta)
    assert 0.9 * k <= moved <= k  # only the shared coordinates moved
    # 10 bits per masked value (8 + ceil(log2 3)), plus the header with shares
    assert report.metrics["bytes/up"] < 3 * (k * 10 / 8 + 3000) < 3 * 4 * d
    # up counts the unmask responses too: each site's masked message plus its response
    responses = report.metrics["bytes/up/unmask"]
    assert responses > 0
    per_site = [report.metrics[f"bytes/up/site/{s}"] for s in names]
    assert report.metrics["bytes/up"] == sum(per_site)
    # down: the float32 model to each site, plus the unmask request each survivor was sent
    requests = [report.metrics[f"bytes/down/site/{s}"] - 4 * d for s in names]
    assert all(0 < r < 3000 for r in requests)
    assert report.metrics["bytes/down"] == 3 * 4 * d + sum(requests)
