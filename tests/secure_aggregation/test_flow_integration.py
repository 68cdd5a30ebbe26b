"""Secure aggregation inside the real coordinator flow (Prefect harness, real MLflow)."""

from __future__ import annotations

import json
import stat
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from fl_components.config import FederationConfig, config_from_dict
from fl_components.errors import ConfigError, RoundError
from fl_components.federation import federation_dir
from fl_components.secure_aggregation import site_stages as secure_round
from fl_components.secure_aggregation.protocol import MaskedUpdate, SecAggCoordinator
from fl_components.tracking import load_run_model
from flows.federated_training import federated_training
from tasks.sites import LocalBackend
from tests.in_process_sites import dispatch_in_process

pytestmark = pytest.mark.usefixtures("prefect_harness")


def _secure(config: FederationConfig, **settings: Any) -> FederationConfig:
    section = config.secure_aggregation.model_copy(update={"enabled": True, **settings})
    return config.model_copy(update={"secure_aggregation": section})


def _one_round(config: FederationConfig) -> FederationConfig:
    return config.model_copy(update={"rounds": 1})


def _metric(client: MlflowClient, run_id: str, key: str) -> list[float]:
    return [m.value for m in sorted(client.get_metric_history(run_id, key), key=lambda m: m.step)]


def _flat(model: Any) -> np.ndarray:
    return np.concatenate([t.detach().numpy().ravel() for t in model.state_dict().values()])


def test_secure_run_matches_plaintext_run(small_config: FederationConfig) -> None:
    plain = federated_training(small_config)
    config = _secure(small_config)

    secure = federated_training(config)

    client = MlflowClient(tracking_uri=config.tracking.tracking_uri)
    run = client.get_run(secure.mlflow_run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["secure_aggregation.enabled"] == "True"
    assert _metric(client, secure.mlflow_run_id, "secagg/enabled") == [1.0, 1.0]
    assert _metric(client, plain.mlflow_run_id, "secagg/enabled") == [0.0, 0.0]
    assert _metric(client, secure.mlflow_run_id, "secagg/dropouts_recovered") == [0.0, 0.0]
    for key in ("secagg/mask_seconds", "secagg/unmask_seconds"):
        assert all(v > 0 for v in _metric(client, secure.mlflow_run_id, key)), key
    expansion = _metric(client, secure.mlflow_run_id, "secagg/expansion")
    assert all(1.0 < v < 1.2 for v in expansion)  # 4 bytes per parameter + shares + header
    up = _metric(client, secure.mlflow_run_id, "bytes/up")
    assert up == pytest.approx(_metric(client, plain.mlflow_run_id, "bytes/up"), rel=0.2)
    # same seed, same data: the two global models differ only by quantization (~1e-8 per
    # value per round) and its effect through round 2's training
    plain_model = _flat(load_run_model(config.tracking, run_id=plain.mlflow_run_id))
    secure_model = _flat(load_run_model(config.tracking, run_id=secure.mlflow_run_id))
    assert np.max(np.abs(plain_model - secure_model)) < 1e-3
    assert secure.final_accuracy == pytest.approx(plain.final_accuracy, abs=0.01)
    # keys stay in each site's folder (0600); the registry holds public keys only
    registry = json.loads(secure_round.registry_path(config).read_text())
    assert sorted(registry) == ["site-0", "site-1", "site-2"]
    assert all(set(entry) == {"x25519", "ed25519"} for entry in registry.values())
    for site in config.site_names:
        keys = secure_round.site_keys_dir(federation_dir(config) / site)
        for name in ("x25519.key", "ed25519.key"):
            assert stat.S_IMODE((keys / name).stat().st_mode) == 0o600


def _tamper_site(monkeypatch: pytest.MonkeyPatch, victim: str) -> None:
    original = secure_round.mask_at_site

    def tampered(site, *args, **kwargs):  # type: ignore[no-untyped-def]
        contribution = original(site, *args, **kwargs)
        if site.name != victim:
            return contribution
        payload = bytearray(contribution.payload)
        payload[-200] ^= 0x01  # one bit of the masked vector
        return secure_round.MaskedContribution(**{**vars(contribution), "payload": bytes(payload)})

    monkeypatch.setattr(secure_round, "mask_at_site", tampered)


def _fail_unmask(monkeypatch: pytest.MonkeyPatch, victim: str) -> None:
    original = secure_round.unmask_at_site

    def failing(site, *args, **kwargs):  # type: ignore[no-untyped-def]
        if site == victim:
            raise ConnectionError(f"{site} went offline after stage 1")
        return original(site, *args, **kwargs)

    monkeypatch.setattr(secure_round, "unmask_at_site", failing)


def test_tampered_masked_update_is_rejected_and_the_round_recovers(
    small_config: FederationConfig, monkeypatch: pytest.MonkeyPatch
) -> None:
    # four sites: with three, the rejection would leave a sum of two (refused)
    sites = [*small_config.sites, small_config.sites[0].model_copy(update={"name": "site-3"})]
    config = _one_round(_secure(small_config.model_copy(update={"sites": sites})))
    _tamper_site(monkeypatch, "site-1")

    summary = federated_training(config)

    client = MlflowClient(tracking_uri=config.tracking.tracking_uri)
    assert _metric(client, summary.mlflow_run_id, "secagg/rejected") == [1.0]
    assert _metric(client, summary.mlflow_run_id, "secagg/dropouts_recovered") == [1.0]
    assert _metric(client, summary.mlflow_run_id, "participants") == [3.0]
    # four sites of digits after one round (0.27 measured): well above chance (0.1)
    assert summary.final_accuracy > 0.2


def test_site_that_drops_after_masking_is_recovered(
    small_config: FederationConfig, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = _one_round(_secure(small_config))  # t = 2 of 3
    _fail_unmask(monkeypatch, "site-2")

    summary = federated_training(config)

    client = MlflowClient(tracking_uri=config.tracking.tracking_uri)
    assert _metric(client, summary.mlflow_run_id, "secagg/unmask_failures") == [1.0]
    assert _metric(client, summary.mlflow_run_id, "participants") == [3.0]  # its update counts


def test_below_threshold_the_round_aborts_and_no_model_is_registered(
    small_config: FederationConfig, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = _one_round(_secure(small_config, threshold=3))
    _fail_unmask(monkeypatch, "site-2")

    with pytest.raises(RoundError, match=r"below threshold 3.*global model was left unchanged"):
        federated_training(config)

    client = MlflowClient(tracking_uri=config.tracking.tracking_uri)
    runs = client.search_runs([client.get_experiment_by_name(config.name).experiment_id])
    assert [r.info.status for r in runs] == ["FAILED"]
    assert client.search_model_versions(f"name='{config.name}'") == []


def _arrays(value: Any, seen: set[int] | None = None) -> list[np.ndarray]:
    """Every array reachable from ``value`` (masked messages parsed from their bytes)."""
    seen = seen if seen is not None else set()
    if id(value) in seen:
        return []
    seen.add(id(value))
    if isinstance(value, np.ndarray):
        return [value]
    if isinstance(value, bytes | bytearray):
        try:
            return [MaskedUpdate.from_bytes(bytes(value)).masked]
        except Exception:
            return []
    if isinstance(value, dict):
        return [a for item in value.values() for a in _arrays(item, seen)]
    if isinstance(value, list | tuple | set):
        return [a for item in value for a in _arrays(item, seen)]
    if hasattr(value, "__dict__"):
        return _arrays(vars(value), seen)
    return []


def test_coordinator_never_holds_an_individual_unmasked_update(
    small_config: FederationConfig, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = _one_round(_secure(small_config))
    plain: dict[str, np.ndarray] = {}  # recorded at the sites, before masking
    held: list[Any] = []  # everything that reaches the coordinator's side
    original_prepare = secure_round.prepare_update

    def record_site(cfg, update, ctx):  # type: ignore[no-untyped-def]
        vector, units = original_prepare(cfg, update, ctx)
        plain[update.site] = vector.copy()
        return vector, units

    monkeypatch.setattr(secure_round, "prepare_update", record_site)
    original_dispatch = LocalBackend.__call__

    def recorded(self, jobs):  # type: ignore[no-untyped-def]
        answers = original_dispatch(self, jobs)
        held.append(answers)
        return answers

    monkeypatch.setattr(LocalBackend, "__call__", recorded)
    for name in ("receive", "finish"):
        original = getattr(SecAggCoordinator, name)

        def spied(self, *args, _original=original, **kwargs):  # type: ignore[no-untyped-def]
            held.append(args)
            result = _original(self, *args, **kwargs)
            held.append((result, vars(self)))
            return result

        monkeypatch.setattr(SecAggCoordinator, name, spied)

    federated_training(config)

    assert sorted(plain) == ["site-0", "site-1", "site-2"]
    arrays = _arrays(held)
    assert any(a.dtype == np.uint32 and a.size > 1000 for a in arrays)  # masked vectors seen
    for site, vector in plain.items():
        scale = (2**30 - 1) / 2.0  # bits = 32 - ceil(log2 3), clip_range 1
        quantized = np.floor((np.clip(vector, -1, 1) + 1) * scale)
        for array in arrays:
            if array.shape != vector.shape:
                continue
            values = array.astype(np.float64)
            if array.dtype == np.uint32:  # a masked vector: uniform, unrelated to the input
                assert np.mean(np.abs(values - quantized) <= 1) < 0.01, site
            else:  # a float vector: never one site's update
                assert not np.allclose(values, vector, atol=1e-4), site


def test_threshold_above_the_round_participants_is_a_clear_error(
    small_config: FederationConfig,
) -> None:
    config = _secure(
        small_config.model_copy(
            update={
                "participation": small_config.participation.model_copy(update={"fraction": 0.5})
            }
        ),
        threshold=3,
    )
    with pytest.raises(ConfigError, match=r"threshold \(3\) exceeds the 2 participants"):
        secure_round.round_context(
            config, run_id="r", round_num=1, participants=("site-0", "site-1"), dimension=4
        )
    raw = small_config.model_dump(mode="json", exclude_unset=True)
    raw["secure_aggregation"] = {"enabled": True, "threshold": 4}
    with pytest.raises(ConfigError, match=r"secure_aggregation.threshold \(4\) exceeds the number"):
        config_from_dict(raw)


def test_registry_missing_names_the_fix(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="fedpipe site init"):
        secure_round.load_registry(tmp_path / "registry.json", sites=("a",))


def test_work_pool_backend_runs_both_stages_through_the_participant_flow(
    small_config: FederationConfig, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """The work-pool path with each site's deployment run in-process (no workers here)."""
    import os

    from fl_components.exchange import SITE_DIR_ENV
    from fl_components.federation import dataset_info, materialize_sites
    from fl_components.parameters import get_parameters
    from fl_components.round.engine import RoundPlan, run_round
    from fl_components.secure_aggregation.coordinator import SecureSum
    from fl_components.site.models import build_model
    from fl_components.strategies import FedAvg
    from tasks import work_pool

    config = _secure(
        small_config.model_copy(
            update={
                "backend": "work-pool",
                "deployment": small_config.deployment.model_copy(
                    update={"exchange_dir": str(tmp_path / "exchange")}
                ),
            }
        ),
        registry=str(tmp_path / "stack" / "registry.json"),
    )
    materialize_sites(config)
    keys = {s: tmp_path / "stack" / "keys" / s for s in config.site_names}  # as `fedpipe up`
    secure_round.publish_public_keys(
        secure_round.registry_path(config),
        {s: secure_round.enroll_site(folder) for s, folder in keys.items()},
    )
    dispatched = dispatch_in_process(monkeypatch, keys=keys)
    info = dataset_info(config)
    backend = work_pool.WorkPoolBackend(config, info, run_id="wp-run")
    parameters = get_parameters(build_model(config.model, info, seed=config.seed))
    strategy = FedAvg()
    state = strategy.initial_state(parameters)
    secure = SecureSum.for_round(
        config,
        backend.registry(),
        run_id="wp-run",
        round_num=1,
        selected=config.site_names,
        like=parameters,
    )
    plan = RoundPlan(
        round=1,
        selected=config.site_names,
        seeds=dict.fromkeys(config.site_names, 0),
        secure=secure,
    )
    received, kept = [], []
    receive = secure.receive

    def spy(answer: Any) -> Any:  # each masked answer, as the dispatch streams it in
        received.append(len(answer.masked.payload))
        kept.append(receive(answer))
        return kept[-1]

    monkeypatch.setattr(secure, "receive", spy)

    next_state, report = run_round(state, plan, backend, strategy)

    # streamed: each masked vector verified and summed on arrival, then only metadata kept
    assert len(received) == 3 and all(size > 0 for size in received)
    assert [k.masked.payload for k in kept] == [b"", b"", b""]
    assert [d["stage"] for d in dispatched] == ["mask"] * 3 + ["unmask"] * 3
    assert all(len(json.dumps(d["secagg"])) < 512_000 for d in dispatched)  # parameter cap
    assert report.metrics["secagg/survivors"] == 3.0
    assert [u.delta for u in report.updates] == [[], [], []]
    assert all(np.isfinite(m).all() for m in report.aggregated.delta)
    assert next_state.round == 1
    assert SITE_DIR_ENV not in os.environ  # each site's environment was scoped to its run


def test_participant_dp_under_secagg_clips_and_adds_a_noise_share(
    small_config: FederationConfig,
) -> None:
    from fl_components.round.types import LocalUpdate

    privacy = small_config.privacy.model_copy(
        update={"mode": "participant", "clip_norm": 1.0, "client_noise_multiplier": 0.5}
    )
    config = _secure(small_config.model_copy(update={"privacy": privacy}), clip_range=4.0)
    ctx = secure_round.round_context(
        config, run_id="r", round_num=1, participants=config.site_names, dimension=40_000
    )
    delta = np.full(40_000, 0.05, dtype=np.float32)  # norm 10: clipped to 1
    update = LocalUpdate("site-0", 1, [delta], num_examples=500, train_loss=0.0, seconds=0.0)

    vector, units = secure_round.prepare_update(config, update, ctx)

    assert units == 1  # DP-FedAvg: every site weighs the same
    noise = vector - 0.005  # the clipped update is 0.05 / 10 per value
    expected_std = 0.5 * 1.0 / np.sqrt(ctx.threshold)  # z C / sqrt(t): t shares carry (z C)^2
    assert np.std(noise) == pytest.approx(expected_std, rel=0.03)
    assert abs(np.mean(noise)) < 4 * expected_std / np.sqrt(noise.size)
    assert ctx.clip_range >= secure_round.dp_clip_range(
        config, participants=3, dimension=40_000, threshold=ctx.threshold
    )


def test_participant_dp_and_secure_aggregation_in_one_run(small_config: FederationConfig) -> None:
    privacy = small_config.privacy.model_copy(
        update={"mode": "participant", "clip_norm": 1.0, "client_noise_multiplier": 0.3}
    )
    config = _one_round(
        _secure(small_config.model_copy(update={"privacy": privacy}), clip_range=2.0)
    )

    summary = federated_training(config)

    client = MlflowClient(tracking_uri=config.tracking.tracking_uri)
    assert _metric(client, summary.mlflow_run_id, "secagg/enabled") == [1.0]
    assert _metric(client, summary.mlflow_run_id, "privacy/client_epsilon")[0] > 0


def test_with_neighbours_the_default_threshold_is_a_majority_of_the_neighbourhood(
    small_config: FederationConfig,
) -> None:
    """1,000 sites masking against 14 neighbours each: t defaults to 8 of 15, not 501 of 1,000."""
    raw = small_config.model_dump(mode="json", exclude_unset=True)
    raw["sites"] = [{"name": f"s{i:04d}"} for i in range(1000)]
    raw["secure_aggregation"] = {"enabled": True, "neighbours": 14}
    config = config_from_dict(raw)
    sites = tuple(config.site_names)
    ctx = secure_round.round_context(
        config, run_id="r", round_num=1, participants=sites, dimension=4
    )
    assert (ctx.group_size, ctx.threshold) == (15, 8)
    raw["secure_aggregation"]["threshold"] = 16
    with pytest.raises(ConfigError, match=r"threshold \(16\) exceeds a neighbourhood of 15"):
        secure_round.round_context(
            config_from_dict(raw), run_id="r", round_num=1, participants=sites, dimension=4
        )
