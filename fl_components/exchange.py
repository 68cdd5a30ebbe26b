"""What crosses the coordinator/site boundary of the work-pool backend, safely serialized.

The global model is handed to sites as an ``.npz`` file in shared exchange storage, named
by its SHA-256 (:func:`fl_components.parameters.digest`); a flow parameter carries only the
path and the hash, and the site verifies the hash before training (Prefect caps parameters
at 512 KB, and weights have no business in a run's parameters). A site answers with a
JSON-safe payload: arrays as base64 float32 bytes plus their shapes, never a pickle.
"""

from __future__ import annotations

import base64
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from fl_components.compression.download import ModelDownload, apply_download
from fl_components.compression.encoded import CompressionError
from fl_components.config import FederationConfig
from fl_components.errors import FedpipeError
from fl_components.parameters import NDArrays, digest, flatten, unflatten
from fl_components.training import LocalUpdate, Metrics

SITE_DIR_ENV = "FEDPIPE_SITE_DIR"
SITE_NAME_ENV = "FEDPIPE_SITE_NAME"
SITE_KEYS_ENV = "FEDPIPE_SITE_KEYS"
PAYLOAD_VERSION = 1


class ExchangeError(FedpipeError):
    """A model reference or a site payload failed verification."""


def site_pool_name(config: FederationConfig, site: str) -> str:
    """The Prefect work pool of ``site``: ``sites[].work_pool`` or ``fedpipe-<site>``."""
    for entry in config.sites:
        if entry.name == site:
            return entry.work_pool or f"fedpipe-{site}"
    raise FedpipeError(f"no site named {site!r} in the federation (sites: {config.site_names})")


def write_global_model(parameters: NDArrays, directory: str | os.PathLike[str]) -> tuple[str, str]:
    """Write the global parameters as ``<sha256>.npz`` under ``directory``.

    Returns
    -------
    tuple[str, str]
        The file's absolute path and the parameters' SHA-256. Writing is atomic (a temporary
        file renamed into place), so a site never reads a half-written model.
    """
    sha = digest(parameters)
    folder = Path(directory)
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / f"{sha}.npz"
    if not target.is_file():
        partial = folder / f".{sha}.{os.getpid()}.tmp.npz"
        np.savez(partial, *[np.ascontiguousarray(p, dtype=np.float32) for p in parameters])
        partial.replace(target)
    return str(target.resolve()), sha


def read_global_model(uri: str, *, sha256: str) -> NDArrays:
    """Load a global model written by :func:`write_global_model` and verify its hash.

    Raises
    ------
    ExchangeError
        If the file is missing or its contents do not hash to ``sha256``.
    """
    path = Path(uri.removeprefix("file://"))
    if not path.is_file():
        raise ExchangeError(
            f"global model {uri} is not readable from this site; the exchange folder "
            "(deployment.exchange_dir) must be shared storage mounted at the same path here"
        )
    with np.load(path, allow_pickle=False) as archive:
        parameters = [archive[f"arr_{i}"].astype(np.float32) for i in range(len(archive.files))]
    actual = digest(parameters)
    if actual != sha256:
        raise ExchangeError(
            f"global model {uri}: SHA-256 {actual} does not match the reference {sha256}; "
            "refusing to train on a model that is not the coordinator's"
        )
    return parameters


def write_model_download(
    download: ModelDownload, directory: str | os.PathLike[str]
) -> tuple[str, int]:
    """Write a (delta or full) model download as ``<target>-<base>.fpmd`` under ``directory``.

    ``compression.download: delta``: one file per kind and round, shared by every site that
    gets it. Returns the absolute path and the exact bytes a site reads (``bytes/down``).
    """
    folder = Path(directory)
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / f"{download.target_sha}-{download.base_sha or 'full'}.fpmd"
    if not target.is_file():
        partial = folder / f".{target.name}.{os.getpid()}.tmp"
        partial.write_bytes(download.to_bytes())
        partial.replace(target)
    return str(target.resolve()), download.nbytes


def read_model_download(
    uri: str, *, sha256: str, held: NDArrays | None, like: NDArrays
) -> NDArrays:
    """Load a model download, apply it to the model the site holds and verify ``sha256``.

    Raises
    ------
    ExchangeError
        If the file is missing, malformed, for another base model or does not hash to
        ``sha256``.
    """
    path = Path(uri.removeprefix("file://"))
    if not path.is_file():
        raise ExchangeError(
            f"model download {uri} is not readable from this site; the exchange folder "
            "(deployment.exchange_dir) must be shared storage mounted at the same path here"
        )
    try:
        download = ModelDownload.from_bytes(path.read_bytes())
        if download.target_sha != sha256:
            raise CompressionError(
                f"it builds model {download.target_sha[:12]}, the reference is {sha256[:12]}"
            )
        return apply_download(download, held=held, like=like)
    except CompressionError as error:
        raise ExchangeError(f"model download {uri}: {error}") from None


def encode_arrays(arrays: NDArrays) -> dict[str, Any]:
    """Arrays as JSON-safe base64 float32 bytes with their shapes."""
    return {
        "dtype": "float32",
        "shapes": [list(a.shape) for a in arrays],
        "data": base64.b64encode(flatten(arrays).astype("<f4").tobytes()).decode("ascii"),
    }


def decode_arrays(encoded: Mapping[str, Any]) -> NDArrays:
    """Inverse of :func:`encode_arrays`, checking dtype and size."""
    if encoded.get("dtype") != "float32":
        raise ExchangeError(
            f"payload arrays: dtype must be 'float32' (got {encoded.get('dtype')!r})"
        )
    shapes = [tuple(int(d) for d in shape) for shape in encoded["shapes"]]
    vector = np.frombuffer(base64.b64decode(encoded["data"], validate=True), dtype="<f4")
    like = [np.zeros(shape, dtype=np.float32) for shape in shapes]
    return unflatten(vector.astype(np.float32), like)


def update_payload(update: LocalUpdate) -> dict[str, Any]:
    """A site's training result as a JSON-safe mapping."""
    return {
        "version": PAYLOAD_VERSION,
        "stage": "train",
        "site": update.site,
        "round": update.round,
        "num_examples": update.num_examples,
        "train_loss": float(update.train_loss),
        "seconds": float(update.seconds),
        "extra": {k: float(v) for k, v in update.extra.items()},
        "delta": encode_arrays(update.delta),
        "control_delta": (
            encode_arrays(update.control_delta) if update.control_delta is not None else None
        ),
        "initial_loss": None if update.initial_loss is None else float(update.initial_loss),
    }


def update_from_payload(payload: Mapping[str, Any], *, site: str, round_num: int) -> LocalUpdate:
    """Rebuild a :class:`LocalUpdate`, checking it is the expected site's and round's."""
    _check_header(payload, stage="train", site=site, round_num=round_num)
    return LocalUpdate(
        site=site,
        round=round_num,
        delta=decode_arrays(payload["delta"]),
        num_examples=int(payload["num_examples"]),
        train_loss=float(payload["train_loss"]),
        seconds=float(payload["seconds"]),
        extra={str(k): float(v) for k, v in payload.get("extra", {}).items()},
        control_delta=(
            decode_arrays(payload["control_delta"]) if payload.get("control_delta") else None
        ),
        initial_loss=(
            None if payload.get("initial_loss") is None else float(payload["initial_loss"])
        ),
    )


def metrics_payload(metrics: Metrics, *, site: str, round_num: int) -> dict[str, Any]:
    """A site's evaluation result as a JSON-safe mapping."""
    return {
        "version": PAYLOAD_VERSION,
        "stage": "evaluate",
        "site": site,
        "round": round_num,
        "loss": float(metrics.loss),
        "accuracy": float(metrics.accuracy),
        "examples": int(metrics.examples),
    }


def metrics_from_payload(payload: Mapping[str, Any], *, site: str, round_num: int) -> Metrics:
    """Rebuild :class:`Metrics`, checking it is the expected site's and round's."""
    _check_header(payload, stage="evaluate", site=site, round_num=round_num)
    return Metrics(
        loss=float(payload["loss"]),
        accuracy=float(payload["accuracy"]),
        examples=int(payload["examples"]),
    )


def _check_header(payload: Mapping[str, Any], *, stage: str, site: str, round_num: int) -> None:
    if not isinstance(payload, Mapping):
        raise ExchangeError(f"site {site!r}: result is a {type(payload).__name__}, not a mapping")
    expected = {"version": PAYLOAD_VERSION, "stage": stage, "site": site, "round": round_num}
    wrong = {k: payload.get(k) for k, v in expected.items() if payload.get(k) != v}
    if wrong:
        raise ExchangeError(
            f"site {site!r} round {round_num}: result header {wrong} does not match {expected}"
        )
