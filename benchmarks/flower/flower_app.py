"""The side-by-side workload as a Flower app, run by Flower's simulation engine (Ray).

Runs in its own venv (``build/flower-venv``: torch, ``flwr[simulation]``, opacus; no
fedpipe import). Written against Flower's message API (ClientApp/ServerApp, FedAvg's
``start``); it reads the partition and θ_0 that fedpipe wrote, trains the same model with
the same optimizer, and writes its round times and final accuracy as JSON.

    build/flower-venv/bin/python benchmarks/flower/flower_app.py PARTITION.npz OUT.json
"""

from __future__ import annotations

import itertools
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg
from flwr.simulation import run_simulation
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

PARTITION = Path(sys.argv[1])
OUTPUT = Path(sys.argv[2])
# "central": Flower evaluates the global model centrally only (no federated evaluation);
# otherwise every site evaluates it every round too, as fedpipe does
EVALUATE_SITES = len(sys.argv) < 4 or sys.argv[3] != "central"
DATA = dict(np.load(PARTITION))
SITES, ROUNDS, N_FEATURES, N_CLASSES, DP = (int(v) for v in DATA["meta"])
THETA0 = [DATA[f"theta0_{i}"] for i in range(sum(k.startswith("theta0_") for k in DATA))]
BATCH, LR, MOMENTUM, NOISE, CLIP = 32, 0.05, 0.9, 1.0, 1.0


def build_model() -> nn.Module:
    """The same architecture as fedpipe's: MLP 64-128-10 or a linear layer (logreg)."""
    if len(THETA0) == 2:
        return nn.Linear(N_FEATURES, N_CLASSES)
    return nn.Sequential(nn.Linear(N_FEATURES, 128), nn.ReLU(), nn.Linear(128, N_CLASSES))


def load(model: nn.Module, arrays: ArrayRecord) -> None:
    """Set the model's weights from a Flower ArrayRecord."""
    model.load_state_dict(arrays.to_torch_state_dict())


def split(index: int, kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    """A site's train or test split as tensors."""
    return torch.tensor(DATA[f"{kind}_x_{index}"]), torch.tensor(DATA[f"{kind}_y_{index}"])


def score(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    """Cross-entropy loss and accuracy."""
    model.eval()
    with torch.no_grad():
        logits = model(x)
        loss = float(nn.functional.cross_entropy(logits, y))
        return loss, float((logits.argmax(1) == y).float().mean())


def site_seed(*, round_num: int, site_index: int, base: int = 0) -> int:
    """The seed fedpipe gives a site's round (fl_components.site.training.seed_for's formula)."""
    return int(np.random.SeedSequence([base, round_num, site_index]).generate_state(1)[0])


client = ClientApp()


@client.train()
def train(msg: Message, context: Context) -> Message:
    """One local epoch of SGD (DP-SGD through Opacus when DP is on)."""
    torch.set_num_threads(1)
    index = int(context.node_config["partition-id"])
    round_num = int(msg.content["config"]["server-round"])
    seed = site_seed(round_num=round_num, site_index=index)
    torch.manual_seed(seed)
    model = build_model()
    load(model, msg.content["arrays"])
    x, y = split(index, "train")
    order = torch.Generator().manual_seed(seed)
    loader = DataLoader(
        TensorDataset(x, y), batch_size=min(BATCH, len(y)), shuffle=True, generator=order
    )
    optimizer = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM)
    if DP:
        from opacus import PrivacyEngine

        engine = PrivacyEngine(accountant="rdp")
        model, optimizer, loader = engine.make_private(
            module=model,
            optimizer=optimizer,
            data_loader=loader,
            noise_multiplier=NOISE,
            max_grad_norm=CLIP,
            poisson_sampling=True,
        )
    model.train()
    total, count = 0.0, 0
    for features, labels in loader:
        if len(labels) == 0:
            continue
        optimizer.zero_grad(set_to_none=True)
        loss = nn.functional.cross_entropy(model(features), labels)
        loss.backward()
        optimizer.step()
        total, count = total + float(loss.detach()) * len(labels), count + len(labels)
    plain = model._module if DP else model
    reply = RecordDict(
        {
            "arrays": ArrayRecord(plain.state_dict()),
            "metrics": MetricRecord({"train_loss": total / max(count, 1), "num-examples": len(y)}),
        }
    )
    return Message(content=reply, reply_to=msg)


@client.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Score the global model on the site's held-out split."""
    torch.set_num_threads(1)
    index = int(context.node_config["partition-id"])
    model = build_model()
    load(model, msg.content["arrays"])
    x, y = split(index, "test")
    loss, accuracy = score(model, x, y)
    metrics = MetricRecord({"loss": loss, "accuracy": accuracy, "num-examples": len(y)})
    return Message(content=RecordDict({"metrics": metrics}), reply_to=msg)


server = ServerApp()
MARKS: list[float] = []
ACCURACY: list[float] = []


def central_evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord:
    """Score on the central test split; its calls mark the end of each round."""
    MARKS.append(time.perf_counter())
    model = build_model()
    load(model, arrays)
    loss, accuracy = score(
        model, torch.from_numpy(DATA["central_x"]), torch.from_numpy(DATA["central_y"])
    )
    ACCURACY.append(accuracy)
    return MetricRecord({"loss": loss, "accuracy": accuracy})


@server.main()
def main(grid: Grid, context: Context) -> None:
    """FedAvg over every site, every round; federated evaluation on every site unless
    'central' (then the central evaluation only)."""
    model = build_model()
    model.load_state_dict(
        {k: torch.from_numpy(v) for k, v in zip(model.state_dict(), THETA0, strict=True)}
    )
    strategy = FedAvg(
        fraction_train=1.0,
        fraction_evaluate=1.0 if EVALUATE_SITES else 0.0,
        min_train_nodes=SITES,
        min_evaluate_nodes=SITES if EVALUATE_SITES else 0,
        min_available_nodes=SITES,
    )
    strategy.start(
        grid=grid,
        initial_arrays=ArrayRecord(model.state_dict()),
        num_rounds=ROUNDS,
        evaluate_fn=central_evaluate,
    )


if __name__ == "__main__":
    started = time.perf_counter()
    run_simulation(
        server_app=server,
        client_app=client,
        num_supernodes=SITES,
        backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0}},
    )
    rounds = [b - a for a, b in itertools.pairwise(MARKS)]
    OUTPUT.write_text(
        json.dumps(
            {
                "round_seconds": rounds,
                "final_accuracy": ACCURACY[-1] if ACCURACY else None,
                "inner_wall_s": time.perf_counter() - started,
            }
        )
    )
