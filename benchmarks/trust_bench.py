"""What trust costs per job: signing, verifying (with the site's nonce store), sealing answers.

Run from the repository root::

    .venv/bin/python benchmarks/trust_bench.py

Prints a table and writes ``benchmarks/results/trust.json``. The job is a site job of the
default secure-aggregation federation's size (its whole federation config, a round context,
model reference and hashes); times are medians over ``--repeats`` runs on one core.
"""

from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import argparse
import base64
import json
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import cryptography
import numpy as np

from fl_components.config import FederationConfig
from fl_components.secure_aggregation.protocol import RoundContext
from fl_components.secure_aggregation.protocol.keys import Registry, SiteKeys
from fl_components.secure_aggregation.site_stages import context_to_json
from fl_components.site.nonces import NonceStore
from fl_components.wire.sealed import AnswerContext, SealedAnswer, open_answer, seal
from fl_components.wire.signing import CoordinatorIdentity, Signed, sign, verify
from fl_components.wire.site_job import ModelRef, SecureStageRef, SiteJobMessage

RESULTS = Path(__file__).resolve().parent / "results" / "trust.json"


class _Forgetful:
    """A nonce register that keeps nothing: isolates the signature's own cost."""

    def admit(self, nonce: str, *, expires_at: datetime, now: datetime) -> None:
        del nonce, expires_at, now


def _median_us(fn: Callable[[], Any], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e6


def _job(config: FederationConfig) -> SiteJobMessage:
    """A mask job of round 7 with the real round context of 3 sites and d = 1M."""
    context = RoundContext(
        run_id="f" * 36,
        round=7,
        participants=config.site_names,
        threshold=2,
        dimension=1_000_000,
        clip_range=1.0,
    )
    return SiteJobMessage(
        federation=config,
        site="site-a",
        run_id="f" * 36,
        mlflow_run_id="e" * 32,
        round=7,
        stage="mask",
        model=ModelRef(uri="/state/exchange/run/" + "a" * 64 + ".npz", sha256="a" * 64),
        secagg=SecureStageRef(context=context_to_json(context)),
        evaluate_round=6,
        task_code="c" * 64,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=2000)
    parser.add_argument("--answer-floats", type=int, default=100_000)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()

    config = FederationConfig.model_validate(
        {
            "name": "digits-demo",
            "sites": [{"name": f"site-{c}", "work_pool": f"pool-{c}"} for c in "abc"],
            "backend": "work-pool",
            "privacy": {"mode": "record", "noise_multiplier": 1.1, "max_epsilon": 3.0},
            "secure_aggregation": {"enabled": True},
        }
    )
    coordinator = CoordinatorIdentity.generate()
    pinned = coordinator.public
    job = _job(config)
    lifetime = timedelta(minutes=10)

    def signed_wire() -> str:
        return sign(
            job, identity=coordinator, audience="site-a", lifetime=lifetime
        ).model_dump_json()

    wire = signed_wire()
    forgetful = _Forgetful()

    def verify_in_memory() -> None:
        envelope = Signed[SiteJobMessage].model_validate_json(wire)
        verify(envelope, pinned=pinned, site="site-a", nonces=forgetful)

    folder = Path(tempfile.mkdtemp(prefix="fedpipe-trust-bench-"))
    store = NonceStore.in_folder(folder)
    fresh = [signed_wire() for _ in range(args.repeats)]
    pending = iter(fresh)

    def verify_at_site() -> None:  # a fresh job each time: the nonce store grows as in a day
        envelope = Signed[SiteJobMessage].model_validate_json(next(pending))
        verify(envelope, pinned=pinned, site="site-a", nonces=store)

    site_keys = SiteKeys.generate()
    registry = Registry({"site-a": site_keys.public()})
    update = np.random.default_rng(0).standard_normal(args.answer_floats).astype(np.float32)
    answer = json.dumps({"delta": base64.b64encode(update.tobytes()).decode()}).encode()
    context = AnswerContext(
        federation="digits-demo", run_id="r", round=7, stage="mask", site="site-a"
    )
    sealed_wire = seal(
        answer, context=context, recipient=pinned, sender=site_keys
    ).model_dump_json()

    def seal_answer() -> str:
        return seal(answer, context=context, recipient=pinned, sender=site_keys).model_dump_json()

    def open_stored() -> bytes:
        stored = SealedAnswer.model_validate_json(sealed_wire)
        return open_answer(stored, expected=context, identity=coordinator, registry=registry)

    payload_bytes = b"x" * 3000
    signature = coordinator.keys.sign(payload_bytes)
    verifier = coordinator.keys.ed25519.public_key()

    small = max(50, args.repeats // 20)
    rows = {
        "ed25519_sign_us": _median_us(lambda: coordinator.keys.sign(payload_bytes), args.repeats),
        "ed25519_verify_us": _median_us(
            lambda: verifier.verify(signature, payload_bytes), args.repeats
        ),
        "parse_job_us": _median_us(
            lambda: Signed[SiteJobMessage].model_validate_json(wire), args.repeats
        ),
        "sign_us": _median_us(signed_wire, args.repeats),
        "verify_in_memory_us": _median_us(verify_in_memory, args.repeats),
        "verify_with_nonce_store_us": _median_us(verify_at_site, args.repeats),
        "seal_answer_ms": _median_us(seal_answer, small) / 1e3,
        "open_answer_ms": _median_us(open_stored, small) / 1e3,
    }
    rows["sign_plus_verify_us"] = rows["sign_us"] + rows["verify_with_nonce_store_us"]
    sizes = {
        "signed_job_bytes": len(wire),
        "answer_bytes": len(answer),
        "sealed_answer_bytes": len(sealed_wire),
    }
    for name, value in {**rows, **sizes}.items():
        print(
            f"{name:>28} {value:>12.1f}" if isinstance(value, float) else f"{name:>28} {value:>12}"
        )
    payload = {
        "command": f"python benchmarks/trust_bench.py --repeats {args.repeats} "
        f"--answer-floats {args.answer_floats}",
        "date": datetime.now(UTC).date().isoformat(),
        "machine": {
            "cpu": platform.processor() or platform.machine(),
            "cores": os.cpu_count(),
            "python": platform.python_version(),
            "cryptography": cryptography.__version__,
        },
        "notes": [
            "sign: pydantic dump, canonical JSON, Ed25519 signature, envelope JSON.",
            "parse_job: pydantic parsing of the signed job's JSON alone, which the site "
            "does with or without signatures (it is most of verify_in_memory).",
            "verify_with_nonce_store: JSON parse, signature, expiry, site, and the nonce "
            "written to the site's store under its file lock (the full check a site makes).",
            f"seal/open: an answer of {args.answer_floats} float32 values (base64 JSON).",
        ],
        "per_job": rows,
        "sizes": sizes,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
