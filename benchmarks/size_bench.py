"""Real model sizes: the coordinator's per-round aggregation time and peak memory.

Run from the repository root (under the machine's heavy-work lock)::

    flock /tmp/fedpipe-heavy.lock .venv/bin/python -m benchmarks.size_bench
    .venv/bin/python -m benchmarks.size_bench --sizes 1000000 --reps 1   # a quick look

Writes ``benchmarks/results/size.json``. For 10 sites at each model size (10M and 100M
float32 parameters, in four arrays like a model's layers) it measures one coordinator round:

- ``engine``: fedpipe's :func:`fl_components.round.engine.run_round` with FedAvg and a
  streaming dispatch (as the local and work-pool backends are): each update is validated
  and folded into the running mean as it arrives, then dropped; then the server step.
- ``engine_files``: the same, each update reaching the coordinator as on the work pool, a
  sealed file it opens, verifies and decrypts (:mod:`fl_components.wire.answer_files`).
- ``bare_numpy`` / ``bare_torch``: a plain loop doing the same aggregation, the float64
  weighted sum of the updates as they arrive, divided by the weight, added to the model.
- ``batch_before`` (10M only): the aggregation as fedpipe did it before streaming, every
  update held and stacked into an (n, d) float64 matrix (``weighted_mean``).
- ``secure`` (10M only): under secure aggregation, one round through the engine with
  ``SecureSum`` over a streaming dispatch (each masked message received into the running
  sum as it arrives, then dropped; the unmask round trip); the sites' masking and unmask
  responses are not counted.

Each site's update is made when the coordinator asks for it (a scaled copy of one random
vector); making it is timed apart and left out. Every repetition runs in a fresh process,
the modes interleaved (engine, numpy, torch, engine, ...), so each process's peak RSS is its
own. Peak memory is tracemalloc's (numpy and torch CPU tensors report to it) above what was
held before the round (the global model and the random vector), and the peak RSS above the
RSS before the round. "One model" is d float32 values (4d bytes).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
import tracemalloc
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent
OUTPUT = ROOT / "results" / "size.json"
SITES = 10
MODES = ("engine", "engine_files", "bare_numpy", "bare_torch")
SMALL_ONLY = ("batch_before", "secure")  # hold every update: run at the smaller size only


def _shapes(d: int) -> list[int]:
    return [d // 2, d // 4, d // 8, d - d // 2 - d // 4 - d // 8]


def _rss() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class Arrivals:
    """Makes site k's update (base · (1 + k/100)) when asked; times the making apart."""

    def __init__(self, d: int, sites: int) -> None:
        rng = np.random.default_rng(0)
        self.base = [rng.standard_normal(n).astype(np.float32) * 1e-3 for n in _shapes(d)]
        self.sites = sites
        self.making = 0.0

    def make(self, k: int) -> list[np.ndarray]:
        start = time.perf_counter()
        delta = [b * np.float32(1 + k / 100) for b in self.base]
        self.making += time.perf_counter() - start
        return delta

    def weights(self) -> list[int]:
        return [100 + 10 * k for k in range(self.sites)]


def _engine_round(arrivals: Arrivals, model: list[np.ndarray]) -> list[np.ndarray]:
    from fl_components.round.engine import RoundPlan, run_round
    from fl_components.round.types import Dropout, LocalUpdate, SiteJob, SiteResult
    from fl_components.strategies import FedAvg, ServerState

    weights = arrivals.weights()

    class Dispatch:
        def stream(self, jobs: Sequence[SiteJob]) -> Iterator[tuple[str, SiteResult | Dropout]]:
            for k, job in enumerate(jobs):
                update = LocalUpdate(job.site, 1, arrivals.make(k), weights[k], 0.0, 0.0)
                yield job.site, SiteResult(job.site, update=update)
                del update

        def __call__(self, jobs: Sequence[SiteJob]) -> dict[str, SiteResult | Dropout]:
            return dict(self.stream(jobs))

    sites = tuple(f"site-{k}" for k in range(arrivals.sites))
    strategy = FedAvg()
    # the coordinator holds its state between rounds: wrap the model, do not copy it
    state = ServerState(round=0, parameters=model)
    plan = RoundPlan(round=1, selected=sites, seeds=dict.fromkeys(sites, 0))
    after, _ = run_round(state, plan, Dispatch(), strategy)
    return after.parameters


def _engine_files_round(arrivals: Arrivals, model: list[np.ndarray]) -> list[np.ndarray]:
    """As ``engine``, each update reaching the coordinator as the work pool's do: a sealed
    file (:mod:`fl_components.wire.answer_files`) it opens, verifies and decrypts, named in
    the site's JSON answer. Making the updates and sealing their files are the sites': done
    before the round, timed apart and left out."""
    import tempfile

    from fl_components.exchange import update_from_payload, update_payload
    from fl_components.round.engine import RoundPlan, run_round
    from fl_components.round.types import Dropout, LocalUpdate, SiteJob, SiteResult
    from fl_components.strategies import FedAvg, ServerState
    from fl_components.wire.answer_files import AnswerFileSink, AnswerFileSource, file_limit
    from fl_components.wire.sealed import AnswerContext

    weights = arrivals.weights()
    folder = Path(tempfile.mkdtemp(prefix="fedpipe-size-files-"))
    values = sum(a.size for a in model)

    def context(site: str) -> AnswerContext:
        return AnswerContext(federation="bench", run_id="run", round=1, stage="train", site=site)

    sites = tuple(f"site-{k}" for k in range(arrivals.sites))
    # the sites' side, before the round (its memory is theirs, not the coordinator's)
    answers = {}
    for k, site in enumerate(sites):
        made = LocalUpdate(site, 1, arrivals.make(k), weights[k], 0.0, 0.0)
        start = time.perf_counter()
        sink = AnswerFileSink(folder, context=context(site), threshold=0)
        answers[site] = json.dumps(update_payload(made, sink=sink))
        del made
        arrivals.making += time.perf_counter() - start

    class Dispatch:
        def stream(self, jobs: Sequence[SiteJob]) -> Iterator[tuple[str, SiteResult | Dropout]]:
            for job in jobs:
                source = AnswerFileSource(
                    folder, context=context(job.site), limit=file_limit(values)
                )
                answer = json.loads(answers[job.site])
                update = update_from_payload(answer, site=job.site, round_num=1, source=source)
                yield job.site, SiteResult(job.site, update=update)
                del update

        def __call__(self, jobs: Sequence[SiteJob]) -> dict[str, SiteResult | Dropout]:
            return dict(self.stream(jobs))

    state = ServerState(round=0, parameters=model)
    plan = RoundPlan(round=1, selected=sites, seeds=dict.fromkeys(sites, 0))
    after, _ = run_round(state, plan, Dispatch(), FedAvg())
    folder.rmdir()  # every file was opened, then removed
    return after.parameters


def _numpy_round(arrivals: Arrivals, model: list[np.ndarray]) -> list[np.ndarray]:
    weights = arrivals.weights()
    total = [np.zeros(p.size, dtype=np.float64) for p in model]
    for k, w in enumerate(weights):
        delta = arrivals.make(k)
        for acc, part in zip(total, delta, strict=True):
            acc += w * part.ravel().astype(np.float64)
        del delta
    return [
        p + (acc / sum(weights)).astype(np.float32).reshape(p.shape)
        for p, acc in zip(model, total, strict=True)
    ]


def _torch_round(arrivals: Arrivals, model: list[np.ndarray]) -> list[np.ndarray]:
    import torch

    weights = arrivals.weights()
    total = [torch.zeros(p.size, dtype=torch.float64) for p in model]
    for k, w in enumerate(weights):
        delta = arrivals.make(k)
        for acc, part in zip(total, delta, strict=True):
            acc.add_(torch.from_numpy(part.ravel()), alpha=w)
        del delta
    return [
        p + (acc / sum(weights)).to(torch.float32).numpy().reshape(p.shape)
        for p, acc in zip(model, total, strict=True)
    ]


def _batch_before_round(arrivals: Arrivals, model: list[np.ndarray]) -> list[np.ndarray]:
    from fl_components.parameters import flatten, unflatten
    from fl_components.strategies.robust import weighted_mean

    weights = arrivals.weights()
    updates = [arrivals.make(k) for k in range(arrivals.sites)]  # every answer, then combine
    mean = weighted_mean([flatten(u) for u in updates], [float(w) for w in weights])
    return [p + d for p, d in zip(model, unflatten(mean, model), strict=True)]


ROUNDS = {
    "engine": _engine_round,
    "engine_files": _engine_files_round,
    "bare_numpy": _numpy_round,
    "bare_torch": _torch_round,
    "batch_before": _batch_before_round,
}


class SecureArrivals:
    """A streaming dispatch for a secure round: each site's masked message is made when
    the engine asks for the next (its making timed apart); unmask jobs are answered by the
    sites' own protocol objects. ``held``/``peak`` count the masked messages alive at once."""

    def __init__(self, d: int, sites: int) -> None:
        from fl_components.config import config_from_dict
        from fl_components.secure_aggregation.protocol import (
            Registry,
            SecAggParticipant,
            SiteKeys,
        )
        from fl_components.secure_aggregation.site_stages import round_context

        self.names = tuple(f"site-{k}" for k in range(sites))
        self.config = config_from_dict(
            {
                "name": "size",
                "sites": [{"name": n} for n in self.names],
                "secure_aggregation": {"enabled": True, "clip_range": 1.0},
            }
        )
        keys = {s: SiteKeys.generate() for s in self.names}
        self.registry = Registry({s: k.public() for s, k in keys.items()})
        self.participants = {
            s: SecAggParticipant(s, keys[s], self.registry, rng=np.random.default_rng(i))
            for i, s in enumerate(self.names)
        }
        self.ctx = round_context(
            self.config, run_id="size", round_num=1, participants=self.names, dimension=d
        )
        self.base = np.random.default_rng(0).uniform(-1e-3, 1e-3, d).astype(np.float32)
        self.making = self.answering = 0.0
        self.alive = self.peak = 0

    def stream(self, jobs: list[Any]) -> Iterator[tuple[str, Any]]:
        from fl_components.round.types import MaskedContribution, SiteResult

        for k, job in enumerate(jobs):
            start = time.perf_counter()
            payload = (
                self.participants[job.site]
                .mask_update(self.ctx, self.base * np.float32(1 + k / 100), num_examples=100)
                .to_bytes()
            )
            self.making += time.perf_counter() - start
            self.alive += 1
            self.peak = max(self.peak, self.alive)
            masked = MaskedContribution(job.site, 1, 100, 0.0, 0.0, payload=payload)
            del payload
            yield job.site, SiteResult(site=job.site, masked=masked, bytes_up=len(masked.payload))
            self.alive -= 1  # the engine took it: what it keeps has no masked vector

    def __call__(self, jobs: list[Any]) -> dict[str, Any]:
        from fl_components.round.types import SiteResult
        from fl_components.secure_aggregation.protocol.messages import UnmaskRequest

        start = time.perf_counter()
        answers = {}
        for job in jobs:
            request = UnmaskRequest.from_bytes(job.unmask_request)
            response = self.participants[job.site].unmask_response(self.ctx, request).to_bytes()
            answers[job.site] = SiteResult(site=job.site, unmask_response=response)
        self.answering += time.perf_counter() - start
        return answers


def _secure(d: int, sites: int) -> dict[str, Any]:
    """One secure round through the engine (``run_round`` with ``SecureSum``, FedAvg),
    the masked messages streamed in; the sites' masking and unmasking not counted."""
    from fl_components.round.engine import RoundPlan, run_round
    from fl_components.secure_aggregation.coordinator import SecureSum
    from fl_components.strategies import FedAvg

    dispatch = SecureArrivals(d, sites)
    strategy = FedAvg()
    state = strategy.initial_state([np.zeros(d, dtype=np.float32)])
    plan = RoundPlan(
        round=1,
        selected=dispatch.names,
        seeds=dict.fromkeys(dispatch.names, 0),
        secure=SecureSum(dispatch.config, dispatch.ctx, dispatch.registry),
    )
    rss_before = _rss()
    tracemalloc.start()
    baseline = tracemalloc.get_traced_memory()[0]
    start = time.perf_counter()
    next_state, report = run_round(state, plan, dispatch, strategy)
    seconds = time.perf_counter() - start - dispatch.making - dispatch.answering
    peak = tracemalloc.get_traced_memory()[1] - baseline
    tracemalloc.stop()
    assert report.metrics["secagg/survivors"] == sites and next_state.round == 1
    return {
        "seconds": seconds,
        "tracemalloc_peak_bytes": peak,
        "rss_peak_above_start_bytes": _maxrss() - rss_before,
        "sites_masking_seconds_total": dispatch.making,
        "masked_messages_held_at_once": dispatch.peak,
    }


def _maxrss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def one(mode: str, d: int, sites: int, rounds: int) -> dict[str, Any]:
    """One process's measurement: ``rounds`` timed rounds, then one traced for memory."""
    if mode == "secure":
        return _secure(d, sites)
    round_fn = ROUNDS[mode]
    import torch  # noqa: F401  (imports are not the round's time)

    import fl_components.round.engine
    import fl_components.strategies  # noqa: F401

    arrivals = Arrivals(d, sites)
    model = [np.zeros(n, dtype=np.float32) for n in _shapes(d)]
    rss_before = _rss()
    times = []
    for _ in range(rounds):
        arrivals.making = 0.0
        start = time.perf_counter()
        round_fn(arrivals, model)
        times.append(time.perf_counter() - start - arrivals.making)
    rss_peak = _maxrss() - rss_before
    tracemalloc.start()
    baseline = tracemalloc.get_traced_memory()[0]
    round_fn(arrivals, model)
    peak = tracemalloc.get_traced_memory()[1] - baseline
    tracemalloc.stop()
    return {
        "seconds": statistics.median(times),
        "seconds_all": times,
        "tracemalloc_peak_bytes": peak,
        "rss_peak_above_start_bytes": rss_peak,
    }


def _child(mode: str, d: int, sites: int, rounds: int) -> dict[str, Any]:
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "benchmarks.size_bench",
            "--one",
            mode,
            str(d),
            str(sites),
            str(rounds),
        ],
        check=True,
        capture_output=True,
        text=True,
    )
    return dict(json.loads(out.stdout.strip().splitlines()[-1]))


def _versions() -> dict[str, str]:
    import torch

    return {
        "python": platform.python_version(),
        "numpy": np.__version__,
        "torch": torch.__version__,
    }


def _load() -> str:
    one_min, five_min, _ = os.getloadavg()
    return f"load average {one_min:.2f} (1 min), {five_min:.2f} (5 min) at the start"


def _write(
    rows: list[dict[str, Any]], args: argparse.Namespace, load: str, started: float
) -> dict[str, Any]:
    targets = {
        f"{d // 1_000_000}M{'' if mode == 'engine' else ' (sealed files)'}": {
            "time_x_bare_numpy": row["x_bare_numpy"],
            "time_ok (<= 1.5x)": row["x_bare_numpy"] <= 1.5,
            "peak_models (tracemalloc)": row["peak_models"],
            "peak_ok (<= 3 models + 64 MB)": row["peak_MB"] <= 3 * 4 * d / 1e6 + 64,
        }
        for mode in ("engine", "engine_files")
        for d, row in {r["params"]: r for r in rows if r["mode"] == mode}.items()
    }
    result = {
        "title": "Real model sizes: coordinator aggregation time and memory",
        "command": "flock /tmp/fedpipe-heavy.lock python -m benchmarks.size_bench"
        + (
            ""
            if args.sizes == [10_000_000, 100_000_000]
            else f" --sizes {' '.join(map(str, args.sizes))}"
        )
        + ("" if args.reps == 3 else f" --reps {args.reps}"),
        "machine": {
            "cpu": platform.machine(),
            "cores": os.cpu_count(),
            "memory_GB": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9, 1),
            "shared": "yes: other agents' jobs ran at the same time (" + load + ")",
        },
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "versions": _versions(),
        "notes": [
            f"{SITES} sites; each update made on arrival and its making left out of the time; "
            "medians over the reps, each rep a fresh process, modes interleaved.",
            "Ran under load on a shared 2-core machine (other agents' tests and builds ran at "
            "the same time): times are noisy, ratios were measured side by side.",
            "engine = fedpipe's run_round with FedAvg over a streaming dispatch: validate "
            "(shapes, dtype, NaN/Inf), fold into a float64 running sum, drop; then the server "
            "step. bare_* = the same weighted float64 sum and step in a plain loop.",
            "engine_files = engine, each update reaching the coordinator as on the work pool: "
            "a sealed file (AES-256-GCM, safetensors inside) named in the site's JSON answer, "
            "opened, hashed and decrypted in one pass, then read as views of that buffer; "
            "making and sealing the file are the site's and left out of the time.",
            "peak_models = tracemalloc peak above the memory held before the round, in units "
            "of one float32 model (4d bytes); rss_models the same from the process's peak RSS. "
            "torch's allocations are not seen by tracemalloc: for bare_torch read rss_models.",
            "batch_before = the aggregation as fedpipe did it before streaming (all updates "
            "held, stacked into an (n, d) float64 matrix); the issue measured 7.9 s and 3.5 GB "
            "a round for the whole engine at 10M. Not run at 100M: it would hold ~12 GB.",
            "secure = one round through the engine with SecureSum and FedAvg over a streaming "
            "dispatch (the sites' masking and unmask responses are not counted): each masked "
            "message is verified and added to the running uint32 sum as it arrives, and only "
            "its metadata is kept (masked_held_at_once: messages alive at once, counted in "
            "the peak). Run at the smaller size only.",
            "Robust rules (median, trimmed mean, Krum, Multi-Krum, Bulyan) hold n·d·8 bytes; "
            "a round past strategy.robust_memory_mb (default 4096 MiB) is refused before "
            "dispatch.",
        ],
        "targets": targets,
        "rounds": rows,
        "seconds_total": time.perf_counter() - started,
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2) + "\n")
    return targets


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--one", nargs=4, metavar=("MODE", "D", "SITES", "ROUNDS"))
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000_000, 100_000_000])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--output", type=Path, default=OUTPUT)
    args = parser.parse_args()
    if args.one:
        mode, d, sites, rounds = args.one
        print(json.dumps(one(mode, int(d), int(sites), int(rounds))))
        return

    load = _load()
    started = time.perf_counter()
    rows = []
    for d in args.sizes:
        model_bytes = 4 * d
        modes = list(MODES) + (list(SMALL_ONLY) if d == min(args.sizes) else [])
        runs: dict[str, list[dict[str, Any]]] = {m: [] for m in modes}
        for rep in range(args.reps):
            for mode in modes:  # interleaved: engine, numpy, torch, engine, ...
                if mode == "secure" and rep > 0:
                    continue
                runs[mode].append(_child(mode, d, SITES, args.rounds))
                print(d, mode, rep, runs[mode][-1]["seconds"], flush=True)
        bare = statistics.median(r["seconds"] for r in runs["bare_numpy"])
        bare_torch = statistics.median(r["seconds"] for r in runs["bare_torch"])
        for mode, measured in runs.items():
            seconds = statistics.median(r["seconds"] for r in measured)
            peak = max(r["tracemalloc_peak_bytes"] for r in measured)
            rss = max(r["rss_peak_above_start_bytes"] for r in measured)
            rows.append(
                {
                    "params": d,
                    "sites": SITES,
                    "mode": mode,
                    "reps": len(measured),
                    "round_s": seconds,
                    "per_site_s": seconds / SITES,
                    "x_bare_numpy": seconds / bare,
                    "x_bare_torch": seconds / bare_torch,
                    "peak_MB": peak / 1e6,
                    "peak_models": peak / model_bytes,
                    "rss_peak_MB": rss / 1e6,
                    "rss_models": rss / model_bytes,
                    **(
                        {"masked_held_at_once": measured[0]["masked_messages_held_at_once"]}
                        if "masked_messages_held_at_once" in measured[0]
                        else {}
                    ),
                }
            )
        _write(rows, args, load, started)  # what has been measured, should a later size fail
    print(json.dumps(_write(rows, args, load, started), indent=2))
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
