"""Warm the one-time costs of a run's start while the temporary server boots.

A process pays, once, for torch's first optimizer (it imports ``torch._dynamo``: ~2 s here,
8 s on a loaded machine), scikit-learn's data sets, MLflow's PyTorch flavour and SQL store
(~0.5 s, and ~0.8 s more to make a fresh folder's store), the identity of the task's code
(a hash of its source) and MLflow's map of the installed packages (~0.5 s, read when it
logs the model). Paid in the run they delay it; paid on a background thread while the CLI
waits for Prefect's server they cost nothing. Every step here is a cache the run would
fill itself: a failure is left for the run to report.
"""

from __future__ import annotations

import contextlib
import threading

from fl_components.config import FederationConfig


def _warm(config: FederationConfig | None) -> None:
    import torch

    torch.optim.SGD(torch.nn.Linear(1, 1).parameters(), lr=0.1)  # imports torch._dynamo
    import mlflow.pytorch
    import mlflow.store.model_registry.sqlalchemy_store
    import mlflow.store.tracking.sqlalchemy_store  # noqa: F401
    import sklearn.datasets  # noqa: F401

    if config is None:
        return
    from fl_components.task.loading import task_identity
    from fl_components.tracking import open_stores

    with contextlib.suppress(Exception):  # the run raises it again, and says what to fix
        task_identity(config)
    with contextlib.suppress(Exception):  # idem
        open_stores(config.tracking)
    # MLflow checks the model's requirements against a map of every installed package; it
    # builds that map once per process (private, hence guarded: a rename costs only time)
    with contextlib.suppress(Exception):
        from mlflow.utils import requirements_utils

        requirements_utils._init_packages_to_modules_map()


def warm_in_background(config: FederationConfig | None = None) -> threading.Thread:
    """Start the warm-up on a daemon thread; return it (joining it is optional)."""
    thread = threading.Thread(target=_warm, args=(config,), name="fedpipe-warm-up", daemon=True)
    thread.start()
    return thread
