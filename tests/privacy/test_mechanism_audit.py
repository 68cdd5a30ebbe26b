"""An audit of what each privacy mechanism really releases, against what is accounted.

Per mode, the aggregation runs many times on fixed neighbouring inputs D and D' (D' has one
more participant, or one more record, of the worst kind), with common random numbers where
the code takes a generator. From the outputs: the released noise's standard deviation and
the shift between D and D' (the sensitivity as the code applies it), per released quantity
(the update; with adaptive clipping, the clipped-bit fraction read back from the next clip
norm). For Gaussian releases the measured multiplier is (Σ_j (shift_j / std_j)^2)^(-1/2);
the multiplier handed to the accountant must not exceed it beyond sampling error.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest

from fl_components.config import FederationConfig, config_from_dict
from fl_components.errors import ConfigError
from fl_components.privacy.dp_fedavg import SecureRandom
from fl_components.privacy.participant_round import next_clip_norm, private_mean
from fl_components.round.types import LocalUpdate
from fl_components.secure_aggregation.site_stages import prepare_update, round_context
from fl_components.strategies import FedAvg
from fl_components.strategies.private import DPFedAvg

RUNS = 1200
RECORD_STEPS = 300  # DP-SGD steps are dearer; with z = 0.25 the shift's error stays ~2 %
DIM = 4
# three standard errors of a std estimated from RUNS draws, and of a mean shift
TOLERANCE = 0.08


def _config(*, sites: int, adaptive: bool, secure: bool, **privacy: Any) -> FederationConfig:
    raw: dict[str, Any] = {
        "name": "audit",
        "rounds": 1,
        "sites": [{"name": f"s{i:02d}"} for i in range(sites)],
        "participation": {"fraction": 0.5, "min_participants": 2},
        "privacy": {
            "mode": "participant",
            "clip_norm": 1.0,
            "client_noise_multiplier": 1.0,
            "adaptive_clipping": adaptive,
            "sampling": "random",
            **privacy,
        },
        "secure_aggregation": {"enabled": secure, "threshold": 3 if secure else None},
    }
    return config_from_dict(raw)


def _update(site: str, vector: npt.NDArray[np.float64]) -> LocalUpdate:
    return LocalUpdate(
        site=site, round=1, delta=[vector.astype(np.float64)], num_examples=10,
        train_loss=0.0, seconds=0.0,
    )  # fmt: skip


def _multiplier(parts: list[tuple[float, float]]) -> float:
    """(Σ (shift / std)^2)^(-1/2) over the released quantities."""
    return sum((shift / std) ** 2 for shift, std in parts) ** -0.5


def _along(
    released: npt.NDArray[np.float64], neighbour: npt.NDArray[np.float64], unit: npt.NDArray[Any]
) -> tuple[float, float]:
    """Shift of the mean output from D to D', and the output's std, along ``unit``."""
    shift = abs(float((neighbour - released).mean(axis=0) @ unit))
    return shift, float((released @ unit).std())


def _key(run: int, who: int) -> bytes:
    return run.to_bytes(4, "big") + who.to_bytes(4, "big") + bytes(24)


def _participant_in_clear(config: FederationConfig) -> tuple[float, float]:
    """Measured multiplier, and the one accounted, of DP-FedAvg (with adaptive clipping)."""
    privacy = config.privacy
    direction = np.ones(DIM) / math.sqrt(DIM)
    # D: 20 updates far above C (every bit "clipped"); D': one more, of norm exactly C
    # (bit "unclipped"): the worst neighbour for the update and for the count at once
    base = [_update(f"s{i:02d}", 5.0 * direction) for i in range(20)]
    extra = _update("s20", privacy.clip_norm * direction)
    outputs: dict[str, list[npt.NDArray[np.float64]]] = {"D": [], "D'": []}
    fractions: dict[str, list[float]] = {"D": [], "D'": []}
    for run in range(RUNS):
        for name, updates in (("D", base), ("D'", [*base, extra])):
            rng = SecureRandom(_key(run, 0))  # common random numbers for D and D'
            # what the coordinator runs: the DP-FedAvg wrapper's mean, then the clip's move
            result = private_mean(config, updates, clip_norm=privacy.clip_norm, rng=rng)
            outputs[name].append(np.asarray(result.mean_update[0], dtype=np.float64))
            if privacy.adaptive_clipping:
                after = next_clip_norm(config, privacy.clip_norm, result, rng=rng)
                # b̃ read back from C' = C exp(-η (b̃ - γ))
                fraction = (
                    privacy.target_quantile
                    - math.log(after / privacy.clip_norm) / privacy.clip_learning_rate
                )
                fractions[name].append(fraction)
    parts = [_along(np.stack(outputs["D"]), np.stack(outputs["D'"]), direction)]
    if privacy.adaptive_clipping:
        b, b_neighbour = np.array(fractions["D"]), np.array(fractions["D'"])
        parts.append((abs(float((b_neighbour - b).mean())), float(b.std())))
    return _multiplier(parts), privacy.client_noise_multiplier


def _participant_secure(config: FederationConfig) -> tuple[float, float]:
    """Measured multiplier of DP-FedAvg under secure aggregation: sites clip and noise.

    The masks cancel exactly (tests/secagg prove it), so the unmasked sum is the sum of
    the quantized vectors modulo the field; t = 3 of D's 3 participants. Every update
    lies along one coordinate: clipped to C there, the value the quantizer's range must
    leave room above for the noise.
    """
    privacy = config.privacy
    direction = np.eye(DIM)[0]
    sites = config.site_names
    outputs: dict[str, list[npt.NDArray[np.float64]]] = {"D": [], "D'": []}
    strategy = DPFedAvg(FedAvg(), config)
    state = strategy.initial_state([np.zeros(DIM, dtype=np.float32)])
    for name, count in (("D", 3), ("D'", 4)):
        ctx = round_context(
            config, run_id="audit", round_num=1, participants=sites[:count], dimension=DIM
        )
        assert ctx.threshold == 3
        quantizer = ctx.quantizer
        modulus = 1 << ctx.field_bits
        for run in range(RUNS):
            total = np.zeros(DIM, dtype=np.int64)
            for k in range(count):
                vector, _ = prepare_update(
                    config,
                    _update(sites[k], 5.0 * direction),
                    ctx,
                    rng=SecureRandom(_key(run, k)),
                )
                rounding = np.random.default_rng([run, k])
                total = (total + quantizer.quantize(vector, rng=rounding)) % modulus
            summed = quantizer.dequantize_sum(total.astype(np.uint32), count=count)
            mean = strategy.aggregate_sum([summed], weight=count, participants=count, state=state)
            outputs[name].append(np.asarray(mean.delta[0], dtype=np.float64))
    shift = _along(np.stack(outputs["D"]), np.stack(outputs["D'"]), direction)
    return _multiplier([shift]), privacy.client_noise_multiplier


@pytest.mark.parametrize("adaptive", [False, True], ids=["fixed-clip", "adaptive-clip"])
def test_participant_level_in_the_clear_releases_what_is_accounted(adaptive: bool) -> None:
    config = _config(sites=40, adaptive=adaptive, secure=False)

    measured, accounted = _participant_in_clear(config)

    assert accounted <= measured * (1 + TOLERANCE), (accounted, measured)


def test_participant_level_under_secure_aggregation_releases_what_is_accounted() -> None:
    # the default secure_aggregation.clip_range (1.0) with z = 1, C = 1
    config = _config(sites=8, adaptive=False, secure=True)

    measured, accounted = _participant_secure(config)

    assert accounted <= measured * (1 + TOLERANCE), (accounted, measured)


def test_adaptive_clipping_under_secure_aggregation_is_refused() -> None:
    # the per-site norms it needs never reach the coordinator: nothing to audit but the refusal
    with pytest.raises(ConfigError, match="adaptive_clipping needs each update's norm"):
        _config(sites=8, adaptive=True, secure=True)


def _record_level(config: FederationConfig) -> tuple[float, float]:
    """Measured multiplier, and the one accounted, of DP-SGD as a site runs it.

    One batch holds every record (q = 1, as Opacus's Poisson loader draws it), the
    learning rate is 0 so θ stays fixed, and the gradient each step is handed (after
    Opacus's clipping, noise and scaling: where the strategy's terms are added) is read
    back and multiplied by the batch size Opacus divides by. D: 8 ordinary records; D':
    the same and one outlier whose gradient is far above the clip norm C.
    """
    import torch
    from torch import nn

    from fl_components.data.types import Split
    from fl_components.site.dpsgd import DPSGD, choose_grad_sample_mode, plan_round
    from fl_components.site.training import TrainingRun, make_loader, train_epochs

    steps = RECORD_STEPS
    features = np.full((8, DIM), 0.1, dtype=np.float32)
    outlier = np.full((1, DIM), 1e3, dtype=np.float32)
    training = config.training.model_copy(
        update={"epochs": steps, "batch_size": 16, "lr": 0.0, "momentum": 0.0}
    )
    sums: dict[str, list[npt.NDArray[np.float64]]] = {"D": [], "D'": []}
    direction: npt.NDArray[np.float64] | None = None
    plan = None
    for name, rows in (("D", features), ("D'", np.concatenate([features, outlier]))):
        split = Split(features=rows, labels=np.zeros(len(rows), dtype=np.int64))
        torch.manual_seed(0)
        model = nn.Linear(DIM, 2)
        plan = plan_round(examples=len(split), privacy=config.privacy, training=training, rounds=1)
        if direction is None:  # the outlier's own gradient: the direction D' moves in
            loss = nn.functional.cross_entropy(
                model(torch.from_numpy(outlier)), torch.zeros(1, dtype=torch.long)
            )
            grads = torch.autograd.grad(loss, list(model.parameters()))
            flat = torch.cat([g.reshape(-1) for g in grads]).double().numpy()
            direction = flat / np.linalg.norm(flat)
        seen: list[npt.NDArray[np.float64]] = []

        def read(model: nn.Module = model, seen: list[Any] = seen) -> None:
            seen.append(
                torch.cat([p.grad.reshape(-1) for p in model.parameters()]).double().numpy()
            )

        run = TrainingRun(
            model=model,
            optimizer=torch.optim.SGD(model.parameters(), lr=0.0),
            loader=make_loader(split, batch_size=training.batch_size, seed=0),
            adjust_gradients=read,
        )
        private = DPSGD(plan, choose_grad_sample_mode(model, "auto")).wrap(run)
        train_epochs(
            private.model, private.loader, private.optimizer, epochs=steps,
            device=torch.device("cpu"), loss_fn=private.loss_fn,
        )  # fmt: skip
        if private.close is not None:
            private.close()
        batch = float(private.optimizer.expected_batch_size)
        sums[name] = [g * batch for g in seen]
    assert direction is not None and plan is not None
    released, neighbour = np.stack(sums["D"]), np.stack(sums["D'"])
    shift, _ = _along(released, neighbour, direction)
    # the noise is i.i.d. over the coordinates: its std pooled over all of them
    std = float((released - released.mean(axis=0)).std())
    return _multiplier([(shift, std)]), plan.noise_multiplier


@pytest.mark.parametrize("secure", [False, True], ids=["in-the-clear", "secure-aggregation"])
def test_record_level_dpsgd_releases_what_is_accounted(secure: bool) -> None:
    # under secure aggregation the site releases the same DP-SGD output, masked afterwards
    config = config_from_dict(
        {
            "name": "audit-record",
            "sites": [{"name": f"s{i}"} for i in range(4)],
            "privacy": {"mode": "record", "noise_multiplier": 0.25, "max_grad_norm": 0.5},
            "secure_aggregation": {"enabled": secure},
        }
    )

    measured, accounted = _record_level(config)

    assert accounted <= measured * (1 + TOLERANCE), (accounted, measured)
