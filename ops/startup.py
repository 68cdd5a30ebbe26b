"""Warm the one-time costs of a run's first round while the temporary server boots.

A process pays, once, for torch's first optimizer (it imports ``torch._dynamo``: ~2 s here,
8 s on a loaded machine), scikit-learn's data sets and MLflow's PyTorch flavour. Paid in the
first round they delay it; paid on a background thread while the CLI waits for Prefect's
server they cost nothing.
"""

from __future__ import annotations

import threading


def _warm() -> None:
    import torch

    torch.optim.SGD(torch.nn.Linear(1, 1).parameters(), lr=0.1)  # imports torch._dynamo
    import mlflow.pytorch  # noqa: F401
    import sklearn.datasets  # noqa: F401


def warm_in_background() -> threading.Thread:
    """Start the warm-up on a daemon thread; return it (joining it is optional)."""
    thread = threading.Thread(target=_warm, name="fedpipe-warm-up", daemon=True)
    thread.start()
    return thread
