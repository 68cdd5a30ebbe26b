"""GPUs: the image example task trained by fedpipe on CUDA and on CPU, against plain torch.

Run from the repository root (under the machine's heavy-work lock)::

    flock /tmp/fedpipe-heavy.lock .venv/bin/python -m benchmarks.gpu_bench
    .venv/bin/python -m benchmarks.gpu_bench --images 120 --epochs 1   # a quick look

Writes ``benchmarks/results/gpu.json``. It is the check to run whenever a GPU machine is
available (CI runs on CPU). For each device (CUDA when present, and CPU) and precision
(fp32, bf16, fp16 on CUDA; fp32 and bf16 on CPU) it trains the image example task
(:mod:`fedpipe_examples.images`: a small ResNet on PNG files, augmented) for one site's
local round twice, interleaved:

- ``fedpipe``: :func:`fl_components.site.training.local_train` with the task bound, the
  config's ``training.device``, ``training.precision`` and ``training.loader_workers``
  (pinned memory on CUDA);
- ``plain``: the same model, dataset, loader options, optimizer and autocast in a plain
  torch loop (zero_grad, forward, loss, backward, step).

It records samples/s (training examples x epochs over the wall time of the call, best of
``--reps``), the peak GPU memory allocated (``torch.cuda.max_memory_allocated``) and the
ratio fedpipe/plain of samples/s, and whether two fedpipe runs from the same seed gave the
same update bit for bit. Without CUDA it writes a result saying so, with no GPU figures
(never estimated ones), and runs the CPU part at the small size given.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent
OUTPUT = ROOT / "results" / "gpu.json"
sys.path.insert(0, str(ROOT.parent / "examples" / "tasks"))

from fedpipe_examples import images  # noqa: E402

from fl_components.config import TrainingConfig  # noqa: E402
from fl_components.parameters import get_parameters  # noqa: E402
from fl_components.site.training import autocast, local_train, make_loader  # noqa: E402
from fl_components.task import SiteContext  # noqa: E402
from fl_components.task.protocol import BoundTask  # noqa: E402


def _plain(
    task: BoundTask, train: Any, config: TrainingConfig, device: torch.device, seed: int
) -> None:
    """The same local round in a plain torch loop."""
    model = task.build_model(0).to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=config.lr, momentum=config.momentum)
    loader = make_loader(
        train,
        batch_size=config.batch_size,
        seed=seed,
        workers=config.loader_workers,
        pin_memory=device.type == "cuda",
    )
    scaler = torch.amp.GradScaler(device.type) if config.precision == "fp16" else None
    loss_fn = torch.nn.CrossEntropyLoss()
    model.train()
    for _ in range(config.epochs):
        for inputs, targets in loader:
            inputs = inputs.to(device, non_blocking=True)
            targets = targets.to(device, non_blocking=True)
            optimizer.zero_grad(set_to_none=True)
            with autocast(config.precision, device):
                loss = loss_fn(model(inputs), targets)
            if scaler is None:
                loss.backward()
                optimizer.step()
            else:
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
    if device.type == "cuda":
        torch.cuda.synchronize()


def _fedpipe(
    task: BoundTask, train: Any, config: TrainingConfig, seed: int
) -> list[np.ndarray[Any, Any]]:
    model = task.build_model(0)
    update = local_train(
        model, get_parameters(model), train, config, site="bench", round_num=1, seed=seed, task=task
    )
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return update.delta


def _timed(run: Any, device: torch.device) -> tuple[float, int | None, Any]:
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    out = run()
    seconds = time.perf_counter() - started
    peak = int(torch.cuda.max_memory_allocated()) if device.type == "cuda" else None
    return seconds, peak, out


def measure(
    device: str, precision: str, train: Any, task: BoundTask, args: argparse.Namespace
) -> dict[str, Any]:
    """One row: fedpipe and plain torch, interleaved, best of ``args.reps``."""
    target = torch.device(device)
    config = TrainingConfig(
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=0.05,
        device=device,  # type: ignore[arg-type]
        precision=precision,  # type: ignore[arg-type]
        loader_workers=args.workers if device == "cuda" else args.cpu_workers,
    )
    samples = len(train) * args.epochs
    _plain(task, train, config.model_copy(update={"epochs": 1}), target, 0)  # warm-up
    best: dict[str, float] = {"fedpipe": float("inf"), "plain": float("inf")}
    peaks: dict[str, int | None] = {"fedpipe": None, "plain": None}
    deltas = []
    for _ in range(args.reps):
        seconds, peak, delta = _timed(lambda: _fedpipe(task, train, config, 7), target)
        best["fedpipe"], peaks["fedpipe"] = min(best["fedpipe"], seconds), peak
        deltas.append(delta)
        seconds, peak, _ = _timed(lambda: _plain(task, train, config, target, 7), target)
        best["plain"], peaks["plain"] = min(best["plain"], seconds), peak
    repeatable = len(deltas) > 1 and all(
        np.array_equal(a, b) for a, b in zip(deltas[0], deltas[1], strict=True)
    )
    fedpipe_rate, plain_rate = samples / best["fedpipe"], samples / best["plain"]
    row: dict[str, Any] = {
        "device": device,
        "precision": precision,
        "loader_workers": config.loader_workers,
        "samples": samples,
        "fedpipe_samples_per_s": round(fedpipe_rate, 1),
        "plain_samples_per_s": round(plain_rate, 1),
        "ratio_fedpipe_to_plain": round(fedpipe_rate / plain_rate, 3),
        "same_update_twice": repeatable if args.reps > 1 else "not checked (--reps 1)",
    }
    if device == "cuda":
        row["fedpipe_peak_gpu_mib"] = round((peaks["fedpipe"] or 0) / 2**20, 1)
        row["plain_peak_gpu_mib"] = round((peaks["plain"] or 0) / 2**20, 1)
    print(json.dumps(row), flush=True)
    return row


def _versions() -> dict[str, str]:
    import opacus

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": str(torch.version.cuda),
        "opacus": opacus.__version__,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=2000, help="Training images (CUDA).")
    parser.add_argument(
        "--cpu-images", type=int, default=240, help="Training images on CPU (kept small)."
    )
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=4, help="training.loader_workers (CUDA).")
    parser.add_argument(
        "--cpu-workers",
        type=int,
        default=2,
        help="training.loader_workers on CPU (0: the augmentation draws from the process's "
        "global generator and does not repeat).",
    )
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--output", type=Path, default=OUTPUT)
    args = parser.parse_args()
    cuda = torch.cuda.is_available()
    task = BoundTask(images.task, spec="fedpipe_examples.images:task")
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as folder:
        for device, count, precisions in (
            ("cuda", args.images, ("fp32", "bf16", "fp16")),
            ("cpu", args.cpu_images, ("fp32", "bf16")),
        ):
            if device == "cuda" and not cuda:
                continue
            site = Path(folder) / device
            images.make_site(site, seed=0, train=count, test=1)
            train = task.load_data(SiteContext(name="bench", folder=site)).train
            rows += [measure(device, p, train, task, args) for p in precisions]
    notes = [
        "One site's local round of the image example task (fedpipe_examples.images: a small "
        "ResNet with GroupNorm on 16x16 PNG files, augmented), trained by fedpipe's "
        "local_train and by a plain torch loop with the same model, loader options, "
        "optimizer and autocast; samples/s is training examples x epochs over the wall time "
        "of the call (loading and decoding the PNG files included), best of the repetitions.",
        "same_update_twice: two fedpipe runs from the same seed gave the same update bit for "
        "bit. The task augments in __getitem__ with torch's generator: with loader_workers "
        ">= 1 each worker's generator is seeded from the round's seed; with 0 it draws from "
        "the process's global generator and the update does not repeat.",
    ]
    if cuda:
        notes.append(f"Ran on CUDA: {torch.cuda.get_device_name(0)}.")
    else:
        notes.append(
            "Did not run on a GPU: no CUDA device was present on this machine, so there are "
            "no CUDA rows and no GPU memory figures (none estimated). Run "
            "`python -m benchmarks.gpu_bench` on a GPU machine to measure them."
        )
    result = {
        "title": "GPUs: the image task on CUDA and on CPU against plain torch",
        "command": "flock /tmp/fedpipe-heavy.lock .venv/bin/python -m benchmarks.gpu_bench "
        + " ".join(sys.argv[1:]),
        "machine": {
            "cpu": platform.machine(),
            "cores": os.cpu_count(),
            "gpu": torch.cuda.get_device_name(0) if cuda else None,
        },
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "versions": _versions(),
        "notes": notes,
        "ran_on_gpu": cuda,
        "rows": rows,
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
