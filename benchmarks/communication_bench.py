"""Bytes on the wire against accuracy: update compression, in the clear and under SecAgg.

    .venv/bin/python benchmarks/communication_bench.py [--rounds 20] [--epochs 2] [--quick]

Digits, Dirichlet(0.5) over 10 sites, the default MLP, FedAvg, every site every round, run in
one process with the real encoders, the real secure-aggregation protocol (keys, masks,
shares, unmasking) and exact byte counts of what would cross the wire (framing included).
Variants: none, QSGD 8-bit and 4-bit, top-1% and top-10% with error feedback, shared
random-10% with error feedback, each in the clear and under secure aggregation (top-k is
refused under SecAgg: its coordinates differ per site), and under SecAgg shared random-25%
and random-50% quantized to 4 bits. Compressed variants also download
the model as an 8-bit delta (``--download-bits``); ``none`` downloads full float32 (today).
The download runs through the round engine's own pieces: the coordinator's
:class:`~fl_components.compression.download.ModelDownloads` (the broadcast and the hash each
site holds) and the site's :func:`~fl_components.compression.download.receive_model` (the
delta applied to the model in the site's folder, verified by SHA-256), so ``bytes_down`` is
what the engine reports as ``bytes/down``.
Writes ``benchmarks/results/communication.json`` and ``communication.png``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.communication_figures import compare, plot, round_
from fl_components.compression import decode_update, encode_update, load_residual, save_residual
from fl_components.compression.download import (
    DownloadKind,
    ModelDownloads,
    apply_download,
    full_download,
    receive_model,
)
from fl_components.compression.secure import scatter_secure_sum, secure_shape, select_for_secure
from fl_components.config import CompressionConfig, ModelConfig, TrainingConfig
from fl_components.data.site_files import partition_bundled
from fl_components.data.types import DatasetInfo, SiteData, Split
from fl_components.parameters import NDArrays, flatten, unflatten
from fl_components.secure_aggregation.protocol import (
    Registry,
    RoundContext,
    SecAggCoordinator,
    SecAggParticipant,
    SiteKeys,
)
from fl_components.site.models import build_model
from fl_components.site.training import evaluate, local_train, seed_for

RESULTS = Path(__file__).resolve().parent / "results"
RUN_ID = "communication-bench"


@dataclass(frozen=True)
class Variant:
    """One benchmark configuration."""

    name: str
    compression: CompressionConfig
    secure: bool


def variants(download_bits: int) -> list[Variant]:
    """Every method, in the clear and (where allowed) under secure aggregation."""
    down = {"download": "delta", "download_bits": download_bits}
    methods = {
        "none": CompressionConfig(),
        "qsgd-8bit": CompressionConfig(method="qsgd", bits=8, **down),
        "qsgd-4bit": CompressionConfig(method="qsgd", bits=4, **down),
        "top-1%+ef": CompressionConfig(method="top_k", fraction=0.01, **down),
        "top-10%+ef": CompressionConfig(method="top_k", fraction=0.1, **down),
        "random-10%+ef": CompressionConfig(method="random_k", fraction=0.1, bits=8, **down),
    }
    out = [Variant(name, config, False) for name, config in methods.items()]
    out += [Variant(name, c, True) for name, c in methods.items() if c.method != "top_k"]
    # Under SecAgg the shared coordinates are also quantized: fewer, coarser values.
    for percent in (25, 50):
        config = CompressionConfig(method="random_k", fraction=percent / 100, bits=4, **down)
        out.append(Variant(f"random-{percent}%+ef/4bit", config, True))
    return out


@dataclass
class Federation:
    """The fixed data, model shape and keys every variant runs on."""

    sites: list[SiteData]
    test: Split
    info: DatasetInfo
    registry: Registry
    keys: dict[str, SiteKeys]


def make_federation(n_sites: int, seed: int, dataset: str) -> Federation:
    """Digits split Dirichlet(0.5), or Synthetic(1, 1) (one FedProx device per site)."""
    names = tuple(f"site-{i:02d}" for i in range(n_sites))
    sites, test = partition_bundled(
        dataset=dataset,
        site_names=names,
        partitioner="dirichlet",
        alpha=0.5,
        shards_per_site=2,
        quantity_sigma=1.0,
        test_fraction=0.2,
        site_test_fraction=0.05,
        seed=seed,
    )
    info = DatasetInfo(n_features=int(test.features.shape[1]), n_classes=10)
    keys = {name: SiteKeys.generate() for name in names}
    return Federation(sites, test, info, Registry({n: k.public() for n, k in keys.items()}), keys)


def _secure_mean(
    fed: Federation, variant: Variant, values: list[np.ndarray], *, round: int, d: int, clip: float
) -> tuple[np.ndarray, int, int]:
    """One SecAgg round on the weighted values: (weighted mean, bytes up, bytes down)."""
    names = tuple(s.name for s in fed.sites)
    shape = secure_shape(variant.compression, n=len(names), dimension=d)
    ctx = RoundContext(
        run_id=RUN_ID,
        round=round,
        participants=names,
        threshold=len(names) // 2 + 1,
        dimension=shape.dimension,
        clip_range=clip,
        bits=shape.bits,
        field_bits=shape.field_bits,
    )
    coordinator = SecAggCoordinator(ctx, fed.registry)
    parts = {
        s.name: SecAggParticipant(
            s.name, fed.keys[s.name], fed.registry, rng=np.random.default_rng(round * 100 + i)
        )
        for i, s in enumerate(fed.sites)
    }
    up = down = 0
    weights = [len(s.train) / max(len(x.train) for x in fed.sites) for s in fed.sites]
    for site, vector, weight in zip(fed.sites, values, weights, strict=True):
        raw = parts[site.name].mask_update(ctx, vector * weight).to_bytes()
        up += len(raw)
        coordinator.receive(raw)
    responses = []
    for name, request in coordinator.unmask_requests().items():
        down += len(request.to_bytes())
        responses.append(parts[name].unmask_response(ctx, request).to_bytes())
        up += len(responses[-1])
    total = coordinator.finish(responses).total
    dense = scatter_secure_sum(
        total, config=variant.compression, run_id=RUN_ID, round=round, dimension=d
    )
    return dense / sum(weights), up, down


def _site_updates(
    fed: Federation,
    variant: Variant,
    deltas: list[np.ndarray],
    *,
    round: int,
    folder: Path,
) -> tuple[list[np.ndarray], float, int]:
    """Compress each site's delta (error feedback through its folder): (sent, seconds, bytes)."""
    config = variant.compression
    sent, seconds, up = [], 0.0, 0
    for i, (site, delta) in enumerate(zip(fed.sites, deltas, strict=True)):
        started = time.perf_counter()
        site_dir = folder / site.name
        residual = load_residual(
            site_dir, run_id=RUN_ID, round=round, dimension=delta.size, max_age=1
        )
        if variant.secure:  # the values to mask: the k shared ones with random-k
            values, residual = select_for_secure(
                delta, config=config, run_id=RUN_ID, round=round, residual=residual
            )
            sent.append(values)
        else:
            message, residual = encode_update(
                delta,
                config=config,
                run_id=RUN_ID,
                round=round,
                residual=residual,
                rng=np.random.default_rng(seed_for(base=round, round_num=round, site_index=i)),
            )
            up += message.nbytes
            sent.append(decode_update(message))
        save_residual(site_dir, run_id=RUN_ID, round=round, residual=residual)
        seconds += time.perf_counter() - started
    return sent, seconds, up


def run_variant(fed: Federation, variant: Variant, args: argparse.Namespace) -> dict[str, object]:
    """Train ``args.rounds`` rounds; return accuracy, bytes and seconds."""
    net = build_model(ModelConfig(), fed.info, seed=args.seed)
    training = TrainingConfig(epochs=args.epochs, device="cpu")
    exact = [p.detach().numpy().astype(np.float32).copy() for p in net.state_dict().values()]
    # 'none': today's full float32 model each round; the others: the engine's model deltas
    compressed = variant.compression.enabled
    downloads = None
    if compressed:
        downloads = ModelDownloads(
            bits=variant.compression.download_bits,
            seed=args.seed,
            bucket=variant.compression.bucket_size,
        )
    up = down = 0
    extra = 0.0
    sizes = np.array([len(s.train) for s in fed.sites], dtype=np.float64)
    with tempfile.TemporaryDirectory() as folder:
        for round in range(1, args.rounds + 1):
            starts = []
            for site in fed.sites:
                model, size = _download(
                    downloads, exact, Path(folder) / site.name, site.name, round
                )
                starts.append(model)
                down += size
            deltas = [
                _train(net, start, s, training, round, args.seed, i)
                for i, (s, start) in enumerate(zip(fed.sites, starts, strict=True))
            ]
            sent, seconds, sent_up = _site_updates(
                fed, variant, deltas, round=round, folder=Path(folder)
            )
            started = time.perf_counter()
            if variant.secure:
                mean, sent_up, secure_down = _secure_mean(
                    fed, variant, sent, round=round, d=deltas[0].size, clip=args.clip_range
                )
                down += secure_down
            else:
                mean = np.tensordot(sizes / sizes.sum(), np.stack(sent), axes=1)
            extra += seconds + time.perf_counter() - started
            up += sent_up
            # FedAvg on the exact global model G; what the 8-bit download dropped (G - B_r)
            # goes out with the next round's delta.
            exact = unflatten(flatten(exact) + mean.astype(np.float32), exact)
    metrics = evaluate(net, exact, fed.test, device="cpu")
    d = sum(p.size for p in exact)
    uploads = args.rounds * len(fed.sites)
    return {
        "variant": variant.name,
        "secure_aggregation": variant.secure,
        "accuracy": round_(metrics.accuracy, 5),
        "test_loss": round_(metrics.loss, 6),
        "bytes_up": up,
        "bytes_down": down,
        "up_bytes_per_param": round_(up / (uploads * d), 4),
        "down_bytes_per_param": round_(down / (uploads * d), 4),
        "seconds_per_round": round_(extra / args.rounds, 4),
    }


def _download(
    downloads: ModelDownloads | None, exact: NDArrays, folder: Path, site: str, round: int
) -> tuple[NDArrays, int]:
    """One site's model download as the engine does it: (the model it trains from, bytes)."""
    if downloads is None:  # today: the full float32 model, framed as a full download
        return exact, full_download(exact).nbytes
    broadcast = downloads.broadcast(exact, round=round)
    download = downloads.for_site(site)
    full = download if download.kind is DownloadKind.FULL else full_download(broadcast.model)
    model, used = receive_model(
        folder,
        base_sha=download.base_sha,
        apply_delta=lambda held: apply_download(download, held=held, like=exact),
        fetch_full=lambda: apply_download(full, held=None, like=exact),
    )
    downloads.received(site, broadcast.sha)
    return model, (download if used is download.kind else full).nbytes


def _train(
    model: torch.nn.Module,
    start: NDArrays,
    site: SiteData,
    training: TrainingConfig,
    round: int,
    seed: int,
    index: int,
) -> np.ndarray:
    update = local_train(
        model,
        start,
        site.train,
        training,
        site=site.name,
        round_num=round,
        seed=seed_for(base=seed, round_num=round, site_index=index),
    )
    return flatten(update.delta)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--sites", type=int, default=10)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--clip-range",
        type=float,
        default=0.25,
        help="SecAgg clip of each weighted update value (public bound).",
    )
    parser.add_argument("--download-bits", type=int, default=8)
    parser.add_argument("--quick", action="store_true", help="3 rounds, 1 epoch (smoke test).")
    parser.add_argument(
        "--variants", default="", help="Comma-separated variant names to run ('none' is always)."
    )
    parser.add_argument("--output", default="communication", help="Results file stem.")
    parser.add_argument(
        "--dataset", default="digits", choices=["digits", "synthetic"], help="synthetic: (1, 1)."
    )
    args = parser.parse_args()
    if args.quick:
        args.rounds, args.epochs = 3, 1
    torch.set_num_threads(1)
    fed = make_federation(args.sites, args.seed, args.dataset)
    rows = []
    wanted = {"none", *filter(None, args.variants.split(","))}
    for variant in variants(args.download_bits):
        if args.variants and variant.name not in wanted:
            continue
        rows.append(run_variant(fed, variant, args))
        print(json.dumps(rows[-1]), flush=True)
    compare(rows)
    RESULTS.mkdir(parents=True, exist_ok=True)
    named = "Synthetic(1, 1)" if args.dataset == "synthetic" else "Digits, Dirichlet(0.5)"
    plot(rows, RESULTS / f"{args.output}.png", title=f"{named}, {args.sites} sites")
    flags = (
        f"--rounds {args.rounds} --epochs {args.epochs} --sites {args.sites} "
        f"--clip-range {args.clip_range} --download-bits {args.download_bits} --seed {args.seed}"
    )
    if args.variants:
        flags += f" --variants {args.variants}"
    if args.dataset != "digits":
        flags += f" --dataset {args.dataset}"
    if args.output != "communication":
        flags += f" --output {args.output}"
    report = {
        "title": "Communication: bytes on the wire against accuracy",
        "command": f"python benchmarks/communication_bench.py {flags}",
        "machine": {
            "cpu": platform.processor() or platform.machine(),
            "python": platform.python_version(),
            "numpy": np.__version__,
            "torch": torch.__version__,
            "threads": 1,
        },
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "figure": f"benchmarks/results/{args.output}.png",
        "notes": NOTES,
        "runs": rows,
    }
    if args.dataset != "digits":
        report["title"] += f", FedProx Synthetic(1, 1) (seed {args.seed})"
    elif args.output != "communication":
        report["title"] += f" (seed {args.seed}, selected variants)"
    (RESULTS / f"{args.output}.json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {RESULTS / args.output}.json")


NOTES = [
    "Digits by default; --dataset synthetic runs FedProx Synthetic(1, 1).",
    "bytes_up / bytes_down: exact serialized messages, framing included; under secure "
    "aggregation they include the unmask request (down) and response (up).",
    "Compressed variants download the model as an 8-bit QSGD delta against the broadcast "
    "model (verified by SHA-256); 'none' downloads full float32 every round, as today. The "
    "download runs through the round engine's pieces (ModelDownloads at the coordinator, "
    "receive_model at each site, held model in the site's folder): bytes_down is the "
    "engine's bytes/down.",
    "upload_reduction_vs_float32: against the float32 upload in the clear (4 bytes per "
    "parameter; today's JSON/base64 payload is larger still); vs_same_mode: against 'none' "
    "with the same secure-aggregation setting (Z_2^32 masks under SecAgg).",
    "extra_seconds_per_round: compression + masking + unmasking time per round over 'none' "
    "of the same mode (training excluded).",
]


if __name__ == "__main__":
    main()
