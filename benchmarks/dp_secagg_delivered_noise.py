"""The noise DP-FedAvg under secure aggregation really delivers (issue 18, item 2).

For ``examples/smartwatch-100-dp-secagg.yaml``'s mechanism (100 sites, q = 0.3 so ~30 per
round, t = 16, z = 1, C = 1, d = 650 for logreg on digits, default clip_range 1.0): every
site's update lies along one coordinate, clipped to C there (the worst case for the
quantizer's range). Runs the sites' side (clip, noise share, quantize) and the sum RUNS
times for D (30 sites) and D' (31), and prints the measured multiplier std / shift with the
epsilon a Gaussian mechanism of that multiplier would have over 30 rounds, beside the one
logged. Usage: ``PYTHONPATH=. python benchmarks/dp_secagg_delivered_noise.py [RUNS]``.
"""

import sys

import numpy as np

from fl_components.config import config_from_dict
from fl_components.privacy.ledger import epsilon_of
from fl_components.round.types import LocalUpdate
from fl_components.secure_aggregation.site_stages import prepare_update, round_context
from fl_components.strategies import FedAvg
from fl_components.strategies.private import DPFedAvg

D, N = 650, 30  # logreg on digits; ~q N sites a round


def main(runs: int) -> None:
    """Measure and print (see the module docstring)."""
    raw = {
        "name": "smartwatch-100-dp-secagg",
        "rounds": 30,
        "sites": [{"name": f"watch-{i:03d}"} for i in range(100)],
        "participation": {"fraction": 0.3, "min_participants": 10},
        "privacy": {
            "mode": "participant",
            "clip_norm": 1.0,
            "client_noise_multiplier": 1.0,
            "sampling": "random",
        },
        "secure_aggregation": {"enabled": True},
    }
    config = config_from_dict(raw)
    strategy = DPFedAvg(FedAvg(), config)
    state = strategy.initial_state([np.zeros(D, dtype=np.float32)])
    e0 = np.zeros(D)
    e0[0] = 5.0
    out = {}
    for name, count in (("D", N), ("D'", N + 1)):
        sites = config.site_names[:count]
        ctx = round_context(config, run_id="m", round_num=1, participants=sites, dimension=D)
        q, mod = ctx.quantizer, 1 << ctx.field_bits
        vals = []
        for run in range(runs):
            total = np.zeros(D, dtype=np.int64)
            for k, site in enumerate(sites):
                upd = LocalUpdate(
                    site=site,
                    round=1,
                    delta=[e0.copy()],
                    num_examples=5,
                    train_loss=0.0,
                    seconds=0.0,
                )
                vec, _ = prepare_update(config, upd, ctx)
                total = (total + q.quantize(vec, rng=np.random.default_rng([run, k]))) % mod
            summed = q.dequantize_sum(total.astype(np.uint32), count=count)
            vals.append(
                strategy.aggregate_sum(
                    [summed], weight=count, participants=count, state=state
                ).delta[0][0]
            )
        out[name] = np.array(vals)
        print(name, "threshold", ctx.threshold, "clip_range", round(ctx.clip_range, 4))
    shift = out["D'"].mean() - out["D"].mean()
    std = out["D"].std()
    z = std / shift
    print(
        f"measured multiplier {z:.3f} (accounted 1.0); epsilon at it over 30 rounds, q 0.3, delta 1e-3: "
        f"{epsilon_of([(z, 0.3, 30)], delta=1e-3, accountant='rdp'):.3f}; logged "
        f"{epsilon_of([(1.0, 0.3, 30)], delta=1e-3, accountant='rdp'):.3f}"
    )


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 300)
