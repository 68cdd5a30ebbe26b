"""The DP-SGD updates a site released, kept so that a repeated request gets the same one.

A site's ledger charges each (federation, MLflow run, round) once
(:class:`fl_components.privacy.ledger.PrivacyLedger`). When the same round is asked for
again (a retried task, a re-delivered job, a coordinator resumed after a crash that re-runs
a round the site had trained), the site must not train again: fresh DP-SGD on the same
records is a second release, a second charge. Returning the release it already made is
post-processing of an output already paid for, and costs nothing more (Dwork & Roth 2014,
"The Algorithmic Foundations of Differential Privacy", Proposition 2.1). So the site keeps
each release next to its ledger and returns it unchanged, provided the request carries the
global model it was trained from (a digest of it is kept; another model is another
request, trained and charged anew).

Layout in the site's folder (arrays as safetensors, the rest as JSON; nothing pickled)::

    privacy_releases/<federation>/<MLflow run>/round-0007-<digest[:16]>.safetensors
    privacy_releases/<federation>/<MLflow run>/round-0007-<digest[:16]>.json

Only the releases of a run's :data:`KEPT_PER_RUN` latest rounds are kept: a resumed
coordinator re-runs at most the two rounds after its last checkpoint (round t is
checkpointed once its evaluation, which rides with round t + 1, is in).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict
from pathlib import Path

import numpy as np

from fl_components.parameters import NDArrays
from fl_components.round.types import LocalUpdate

RELEASES_DIR = "privacy_releases"
KEPT_PER_RUN = 2


def parameters_digest(parameters: NDArrays) -> str:
    """SHA-256 of the global model a site trains from (shapes, dtypes, bytes of each array).

    Floating arrays are taken as float32, what the site's model holds once they are loaded
    (a coordinator's float64 copy and its float32 checkpoint are the same model).
    """
    digest = hashlib.sha256()
    for array in parameters:
        array = np.asarray(array)
        if np.issubdtype(array.dtype, np.floating):
            array = array.astype(np.float32)
        array = np.ascontiguousarray(array)
        digest.update(f"{array.dtype.str}{array.shape};".encode())
        digest.update(array.tobytes())
    return digest.hexdigest()


def release_path(*, federation: str, mlflow_run_id: str, round_num: int, digest: str) -> str:
    """Where a round's release is kept, relative to the site's folder (no suffix)."""
    return f"{RELEASES_DIR}/{federation}/{mlflow_run_id}/round-{round_num:04d}-{digest[:16]}"


def keep_release(folder: Path, relative: str, update: LocalUpdate) -> None:
    """Write ``update`` (the round's release) under ``folder / relative``, atomically."""
    from safetensors.numpy import save_file

    if update.control_delta is not None:
        raise ValueError("a DP-SGD release carries no SCAFFOLD control delta")
    target = folder / relative
    target.parent.mkdir(parents=True, exist_ok=True)
    arrays = {f"delta.{i}": np.ascontiguousarray(a) for i, a in enumerate(update.delta)}
    staging = target.with_name(f".{target.name}.tmp.safetensors")
    save_file(arrays, str(staging))
    os.replace(staging, target.with_suffix(".safetensors"))
    meta = {k: v for k, v in asdict(update).items() if k not in ("delta", "control_delta")}
    meta["arrays"] = len(update.delta)
    staging_json = target.with_name(f".{target.name}.tmp.json")
    staging_json.write_text(json.dumps(meta, allow_nan=True))
    os.replace(staging_json, target.with_suffix(".json"))
    _prune(target.parent)


def load_release(folder: Path, relative: str) -> LocalUpdate | None:
    """The release kept under ``folder / relative``; None if it is gone or damaged."""
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    target = folder / relative
    try:
        meta = json.loads(target.with_suffix(".json").read_text())
        arrays = load_file(str(target.with_suffix(".safetensors")))
        delta = [np.array(arrays[f"delta.{i}"], copy=True) for i in range(int(meta.pop("arrays")))]
        return LocalUpdate(
            site=str(meta["site"]),
            round=int(meta["round"]),
            delta=delta,
            num_examples=int(meta["num_examples"]),
            train_loss=float(meta["train_loss"]),
            seconds=float(meta["seconds"]),
            extra={str(k): float(v) for k, v in meta["extra"].items()},
            initial_loss=None if meta.get("initial_loss") is None else float(meta["initial_loss"]),
        )
    except (OSError, ValueError, KeyError, TypeError, SafetensorError):
        return None


def _prune(run_folder: Path) -> None:
    """Keep the releases of the run's :data:`KEPT_PER_RUN` latest rounds."""
    kept = sorted({p.name.split("-")[1] for p in run_folder.glob("round-*")})[-KEPT_PER_RUN:]
    for stale in run_folder.glob("round-*"):
        if stale.name.split("-")[1] not in kept:
            stale.unlink(missing_ok=True)
