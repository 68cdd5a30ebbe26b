"""Secure-aggregation benchmark: masking, unmasking and dropout recovery vs plaintext FedAvg.

Run from the repository root::

    .venv/bin/python benchmarks/secagg_bench.py            # n in {10, 100}, d in {100k, 1M}
    .venv/bin/python benchmarks/secagg_bench.py --quick    # n = 10 only, d = 100k

Prints a table and writes ``benchmarks/results/secagg.json``. Everything runs on one core
(BLAS threads pinned to 1) so the figures compare like with like. Every participant of every
configuration really masks its update (the coordinator needs all of them); masking times are
the median over participants.
"""

from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")

import argparse
import json
import math
import platform
import statistics
import time
from functools import reduce
from pathlib import Path

import cryptography
import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from fl_components.secure_aggregation.protocol import (
    Registry,
    RoundContext,
    SecAggCoordinator,
    SecAggParticipant,
    SiteKeys,
    shamir,
)
from fl_components.secure_aggregation.protocol.prg import MaskExpander

RESULTS = Path(__file__).resolve().parent / "results" / "secagg.json"


def _best(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def keystream_rates(megabytes: int = 4, repeats: int = 20) -> dict[str, float]:
    """Raw keystream GB/s of each stream cipher, ``update_into`` a reused buffer."""
    size = megabytes << 20
    zeros, out = bytes(size), bytearray(size + 15)
    key = os.urandom(32)
    makers = {
        "aes256_ctr": lambda: Cipher(algorithms.AES(key), modes.CTR(bytes(16))).encryptor(),
        "aes256_gcm_keystream": lambda: Cipher(
            algorithms.AES(key), modes.GCM(bytes(12))
        ).encryptor(),
        "chacha20": lambda: Cipher(algorithms.ChaCha20(key, bytes(16)), None).encryptor(),
    }
    rates = {}
    for name, make in makers.items():
        seconds = _best(lambda make=make: make().update_into(zeros, out), repeats)
        rates[name] = size / seconds / 1e9
    fresh = _best(lambda: makers["aes256_ctr"]().update(zeros), repeats)
    rates["aes256_ctr_fresh_buffers"] = size / fresh / 1e9
    return rates


def shamir_costs(n: int, repeats: int = 20) -> dict[str, float]:
    t = n // 2 + 1
    secret = shamir.random_secret()
    xs = list(range(1, n + 1))
    split_s = _best(lambda: shamir.split(secret, threshold=t, xs=xs), repeats)
    shares = shamir.split(secret, threshold=t, xs=xs)
    rebuild_s = _best(lambda: shamir.reconstruct(shares, threshold=t), repeats)
    coefficients = shamir.lagrange_at_zero(xs[:t])
    combine_s = _best(lambda: shamir.combine([s.y for s in shares[:t]], coefficients), repeats)
    return {
        "n": n,
        "t": t,
        "split_ms": split_s * 1e3,
        "reconstruct_ms": rebuild_s * 1e3,
        "reconstruct_cached_basis_ms": combine_s * 1e3,
    }


def mask_rate(d: int, seeds: int, repeats: int = 3) -> float:
    """GB/s of mask generated and added by one participant's expander (one core)."""
    accumulator = np.zeros(d, dtype=np.uint32)
    keys = [os.urandom(32) for _ in range(seeds)]
    expander = MaskExpander()
    half = seeds // 2
    seconds = _best(
        lambda: expander.apply(accumulator, add=keys[:half], subtract=keys[half:]), repeats
    )
    return seeds * 4 * d / seconds / 1e9


def run_config(
    n: int, d: int, *, dropout_rates: list[float], neighbours: int | None, seed: int
) -> list[dict[str, object]]:
    sites = tuple(f"site-{i:03d}" for i in range(n))
    keys = {s: SiteKeys.generate() for s in sites}
    registry = Registry({s: k.public() for s, k in keys.items()})
    participants = {
        s: SecAggParticipant(s, keys[s], registry, rng=np.random.default_rng(i))
        for i, s in enumerate(sites)
    }
    rng = np.random.default_rng(seed)
    updates = rng.uniform(-1, 1, (n, d)).astype(np.float32)
    weights = rng.integers(10, 1000, n).astype(np.float32)

    rows = []
    for round_number, rate in enumerate(dropout_rates, start=1):
        # A fresh round per dropout rate: reusing a round would make honest participants
        # refuse (they were told other sites dropped in it).
        ctx = RoundContext(
            run_id="bench",
            round=round_number,
            participants=sites,
            threshold=n // 2 + 1 if neighbours is None else 3,
            dimension=d,
            clip_range=1.0,
            neighbours=neighbours,
        )
        masks_per_participant = len(ctx.neighbours_of(sites[0])) + 1
        dropped = set(sites[:: round(1 / rate)]) if rate > 0 else set()
        wire: dict[str, bytes] = {}
        mask_seconds = []
        for i, s in enumerate(sites):
            if s in dropped:
                continue
            start = time.perf_counter()
            message = participants[s].mask_update(ctx, updates[i], num_examples=int(weights[i]))
            mask_seconds.append(time.perf_counter() - start)
            wire[s] = message.to_bytes()
        survivors = [i for i, s in enumerate(sites) if s not in dropped]
        stack = updates[survivors]
        w = weights[survivors]
        plaintext_s = _best(lambda stack=stack, w=w: (w @ stack) / w.sum(), 3)
        # Flower's aggregate(): a weighted copy of every update, then a reduction.
        flower_s = _best(
            lambda stack=stack, w=w: (
                reduce(np.add, [x * wi for x, wi in zip(stack, w, strict=True)]) / w.sum()
            ),
            3,
        )
        masked = [
            np.frombuffer(wire[sites[i]][-(4 * d + 66) : -66], dtype="<u4") for i in survivors
        ]

        def summation(masked=masked) -> None:
            total = np.zeros(d, dtype=np.uint32)
            for vector in masked:
                np.add(total, vector, out=total)

        sum_s = _best(summation, 3)
        coordinator = SecAggCoordinator(ctx, registry)
        start = time.perf_counter()
        for i in survivors:
            coordinator.receive(wire[sites[i]])
        receive_s = time.perf_counter() - start
        requests = coordinator.unmask_requests()
        start = time.perf_counter()
        responses = [participants[s].unmask_response(ctx, r) for s, r in requests.items()]
        respond_s = (time.perf_counter() - start) / len(responses)
        result = coordinator.finish([r.to_bytes() for r in responses])
        expected = updates[survivors].astype(np.float64).sum(axis=0)
        error = float(np.abs(result.total - expected).max())
        if error > result.error_bound:
            raise RuntimeError(f"secure sum off by {error} > bound {result.error_bound}")
        unmask_s = result.stats.unmask_seconds
        expander_rate = mask_rate(d, masks_per_participant)
        rows.append(
            {
                "n": n,
                "d": d,
                "neighbours": neighbours,
                "masks_per_participant": masks_per_participant,
                "dropout_rate": rate,
                "dropped": len(dropped),
                "mask_ms_median": statistics.median(mask_seconds) * 1e3,
                "mask_ms_max": max(mask_seconds) * 1e3,
                "participant_mask_GBps": masks_per_participant
                * 4
                * d
                / statistics.median(mask_seconds)
                / 1e9,
                "respond_ms_mean": respond_s * 1e3,
                "receive_verify_s": receive_s,
                "sum_s": sum_s,
                "unmask_s": unmask_s,
                "coordinator_s": sum_s + unmask_s,
                "plaintext_fedavg_gemv_s": plaintext_s,
                "plaintext_fedavg_flower_s": flower_s,
                "ratio_vs_gemv": (sum_s + unmask_s) / plaintext_s,
                "ratio_vs_flower": (sum_s + unmask_s) / flower_s,
                "expander_only_GBps": expander_rate,
                "bytes_up": result.stats.bytes_up,
                "expansion_factor": result.stats.expansion_factor,
                "max_abs_error": error,
                "error_bound": result.error_bound,
            }
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="n = 10, d = 100k only")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    ns = [10] if args.quick else [10, 100]
    ds = [100_000] if args.quick else [100_000, 1_000_000]

    started = time.perf_counter()
    rates = keystream_rates()
    shamir_rows = [shamir_costs(n) for n in (10, 100)]
    rows = []
    for n in ns:
        for d in ds:
            rows += run_config(n, d, dropout_rates=[0.0, 0.1], neighbours=None, seed=n + d)
    if not args.quick:
        k = 2 * math.ceil(math.log2(100))
        rows += run_config(100, 1_000_000, dropout_rates=[0.0, 0.1], neighbours=k, seed=1)
    expander_rate = mask_rate(1_000_000, 100)

    print(
        "keystream GB/s (one core, update_into reused buffer): "
        + ", ".join(f"{k} {v:.2f}" for k, v in rates.items())
    )
    print(f"participant mask expansion + addition, 100 seeds x d=1M: {expander_rate:.2f} GB/s")
    for s in shamir_rows:
        print(
            f"Shamir n={s['n']} t={s['t']}: split {s['split_ms']:.2f} ms/seed, reconstruct "
            f"{s['reconstruct_ms']:.2f} ms ({s['reconstruct_cached_basis_ms']:.3f} ms cached basis)"
        )
    header = (
        f"{'n':>4} {'d':>9} {'k':>3} {'drop':>4} {'mask ms':>7} {'e2e GB/s':>8} {'PRG GB/s':>8} "
        f"{'recv s':>6} {'sum s':>6} {'unmask s':>8} {'gemv s':>6} {'flwr s':>6} {'x gemv':>6} "
        f"{'x flwr':>6} {'expand':>6}"
    )
    print(header)
    print("-" * len(header))
    for r in rows:
        print(
            f"{r['n']:>4} {r['d']:>9} {r['masks_per_participant'] - 1:>3} "
            f"{r['dropout_rate']:>4.0%} {r['mask_ms_median']:>7.1f} "
            f"{r['participant_mask_GBps']:>8.2f} {r['expander_only_GBps']:>8.2f} "
            f"{r['receive_verify_s']:>6.3f} {r['sum_s']:>6.3f} {r['unmask_s']:>8.3f} "
            f"{r['plaintext_fedavg_gemv_s']:>6.3f} {r['plaintext_fedavg_flower_s']:>6.3f} "
            f"{r['ratio_vs_gemv']:>6.2f} {r['ratio_vs_flower']:>6.2f} {r['expansion_factor']:>6.4f}"
        )
    payload = {
        "command": "python benchmarks/secagg_bench.py" + (" --quick" if args.quick else ""),
        "machine": {
            "cpu": platform.processor() or platform.machine(),
            "cores": os.cpu_count(),
            "python": platform.python_version(),
            "cryptography": cryptography.__version__,
            "numpy": np.__version__,
        },
        "keystream_GBps": rates,
        "participant_expander_GBps_100_seeds_d1M": expander_rate,
        "shamir": shamir_rows,
        "rounds": rows,
        "seconds_total": time.perf_counter() - started,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"wrote {args.out} in {payload['seconds_total']:.0f} s")


if __name__ == "__main__":
    main()
