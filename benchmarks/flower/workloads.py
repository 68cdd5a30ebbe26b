"""The side-by-side workloads and the one partition every system trains on.

Each workload is a fedpipe federation config; :func:`prepare` materializes its sites with
fedpipe's own partitioner and packs them, with the central test split and the initial
weights θ_0, into one ``.npz`` that the Flower app and the bare loop read. fedpipe's run reads
the very same site folders, so all three train on the same partition from the same θ_0.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import yaml


@dataclass(frozen=True)
class Workload:
    """One federation to run through every system."""

    name: str
    dataset: str
    sites: int
    rounds: int
    model: str
    dp: bool = False
    hidden: tuple[int, ...] = (128,)
    epochs: int = 1

    def config(self, workdir: Path) -> dict[str, Any]:
        """The fedpipe federation config (a plain mapping, as YAML would give)."""
        raw: dict[str, Any] = {
            "name": f"bench-{self.name}",
            "rounds": self.rounds,
            "sites": [{"name": f"s{i:04d}"} for i in range(self.sites)],
            "participation": {"fraction": 1.0, "min_participants": 2},
            "data": {
                "source": "bundled",
                "dataset": self.dataset,
                "partitioner": "dirichlet",
                "alpha": 0.5,
                "sites_dir": str(workdir / "sites"),
            },
            "model": {"kind": self.model, "hidden": list(self.hidden)},
            "training": {
                "epochs": self.epochs,
                "batch_size": 32,
                "lr": 0.05,
                "momentum": 0.9,
                "optimizer": "sgd",
                "device": "cpu",
            },
            "strategy": {"name": "fedavg", "server_lr": 1.0},
            "tracking": {
                "tracking_uri": f"sqlite:///{workdir / 'mlflow.db'}",
                "artifact_root": str(workdir / "artifacts"),
                "register_model": True,
            },
            "seed": 0,
        }
        if self.dp:
            raw["privacy"] = {"mode": "record", "noise_multiplier": 1.0, "max_grad_norm": 1.0}
        return raw


WORKLOADS = {
    w.name: w
    for w in (
        Workload("digits-10", "digits", 10, 20, "mlp"),
        Workload("digits-100", "digits", 100, 20, "mlp"),
        Workload("breast_cancer-8", "breast_cancer", 8, 15, "logreg"),
        Workload("digits-10-dp", "digits", 10, 20, "mlp", dp=True),
        Workload("breast_cancer-8-dp", "breast_cancer", 8, 15, "logreg", dp=True),
        Workload("digits-1000", "digits", 1000, 5, "mlp"),
        # ~1 s of local training per site and round on this machine: the orchestration's
        # cost next to real training (fedpipe against the bare engine; Flower's app is fixed
        # to the small MLP and one epoch, so it does not run these)
        Workload("digits-10-1s", "digits", 10, 4, "mlp", hidden=(1024, 1024), epochs=70),
        Workload("digits-100-1s", "digits", 100, 2, "mlp", hidden=(1024, 1024), epochs=350),
    )
}


def prepare(workload: Workload, workdir: Path) -> tuple[Path, Path]:
    """Write the fedpipe YAML and the packed partition; return (config.yaml, partition.npz)."""
    from fl_components.config import config_from_dict
    from fl_components.data.site_files import load_site
    from fl_components.federation import (
        central_test_split,
        dataset_info,
        materialize_sites,
        site_folder,
    )
    from fl_components.parameters import get_parameters
    from fl_components.site.models import build_model

    workdir.mkdir(parents=True, exist_ok=True)
    raw = workload.config(workdir)
    config = config_from_dict(raw, source=workload.name)
    config_path = workdir / f"{workload.name}.yaml"
    config_path.write_text(yaml.safe_dump(raw, sort_keys=False))
    materialize_sites(config, overwrite=True)
    info = dataset_info(config)
    arrays: dict[str, np.ndarray] = {}
    for index, name in enumerate(config.site_names):
        data = load_site(site_folder(config, name))
        arrays[f"train_x_{index}"], arrays[f"train_y_{index}"] = (
            data.train.features,
            data.train.labels,
        )
        arrays[f"test_x_{index}"], arrays[f"test_y_{index}"] = data.test.features, data.test.labels
    central = central_test_split(config)
    if central is None:
        raise RuntimeError(f"{workload.name}: a bundled workload always has a central split")
    arrays["central_x"], arrays["central_y"] = central.features, central.labels
    initial = get_parameters(build_model(config.model, info, seed=config.seed))
    for index, layer in enumerate(initial):
        arrays[f"theta0_{index}"] = layer
    arrays["meta"] = np.array(
        [workload.sites, workload.rounds, info.n_features, info.n_classes, int(workload.dp)]
    )
    partition = workdir / f"{workload.name}.npz"
    np.savez(partition, **arrays)
    return config_path, partition
