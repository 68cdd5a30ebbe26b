"""What crosses the coordinator/site boundary of the work-pool backend, safely serialized.

The global model is handed to sites as a ``.safetensors`` file in shared exchange storage,
named by its SHA-256 (:func:`fl_components.parameters.digest`); a flow parameter carries only the
path and the hash, and the site verifies the hash before training (Prefect caps parameters
at 512 KB, and weights have no business in a run's parameters). A site answers with a
JSON-safe payload: arrays as base64 float32 bytes plus their shapes, never a pickle.
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
import mmap
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from safetensors.numpy import save, save_file

from fl_components.compression.download import ModelDownload, apply_download
from fl_components.compression.encoded import CompressionError
from fl_components.config import FederationConfig
from fl_components.errors import FedpipeError
from fl_components.parameters import NDArrays, digest, flatten, unflatten
from fl_components.round.types import LocalUpdate, Metrics

SITE_DIR_ENV = "FEDPIPE_SITE_DIR"
SITE_NAME_ENV = "FEDPIPE_SITE_NAME"
SITE_KEYS_ENV = "FEDPIPE_SITE_KEYS"
PAYLOAD_VERSION = 1
MAX_CLASSES = 100_000  # label counts an evaluation may carry
# The most bytes fedpipe reads from another party in one piece (a site's JSON answer, a
# global model or model download file) before parsing it: 256 MiB holds the base64 update
# of a ~48M-parameter float32 model, far above the models here (the CNN has ~0.1M), and
# keeps a corrupt or hostile file from exhausting the reader's memory. Both sides read
# FEDPIPE_MAX_PAYLOAD_BYTES to raise it.
MAX_PAYLOAD_BYTES = 256 * 1024 * 1024
MAX_PAYLOAD_ENV = "FEDPIPE_MAX_PAYLOAD_BYTES"
MODEL_SUFFIX = ".safetensors"
# a safetensors header above this is refused unparsed (a 100M-parameter model's is < 1 KiB)
MAX_HEADER_BYTES = 16 * 1024 * 1024


class ExchangeError(FedpipeError):
    """A model reference or a site payload failed verification."""


class FieldSink(Protocol):
    """Where a site puts an answer field too large to travel inline (a sealed file)."""

    def wants(self, size: int) -> bool:
        """Whether a field of ``size`` bytes goes as a file."""
        ...

    def put(self, field: str, data: bytes | bytearray | memoryview) -> dict[str, Any]:
        """Store ``data``; the reference that replaces it in the answer."""
        ...


class FieldSource(Protocol):
    """Where the coordinator opens a field a site sent as a file."""

    def take(self, raw_ref: object, field: str) -> memoryview:
        """The field's bytes, verified."""
        ...


def payload_limit() -> int:
    """Bytes one payload from another party may have: ``FEDPIPE_MAX_PAYLOAD_BYTES`` or 256 MiB."""
    raw = os.environ.get(MAX_PAYLOAD_ENV, "").strip()
    if not raw:
        return MAX_PAYLOAD_BYTES
    try:
        limit = int(raw)
    except ValueError:
        limit = 0
    if limit < 1:
        raise ExchangeError(f"{MAX_PAYLOAD_ENV} must be a positive number of bytes (got {raw!r})")
    return limit


def check_payload_size(size: int, *, what: str, limit: int | None = None) -> None:
    """Refuse ``size`` bytes from another party above ``limit`` (default :func:`payload_limit`).

    Raises
    ------
    ExchangeError
        Naming ``what``, its size and the limit, before anything is parsed.
    """
    limit = payload_limit() if limit is None else limit
    if size > limit:
        raise ExchangeError(
            f"{what}: {size} bytes, above the {limit}-byte limit on what fedpipe reads from "
            f"another party; refused unparsed. If the model really is that large, set "
            f"{MAX_PAYLOAD_ENV} higher on both sides"
        )


def parse_json_payload(raw: str | bytes, *, what: str, limit: int | None = None) -> Any:
    """``json.loads`` of a payload from another party, its size checked first.

    Raises
    ------
    ExchangeError
        If the payload is too large (:func:`check_payload_size`) or not valid JSON.
    """
    size = len(raw.encode("utf-8", "surrogatepass") if isinstance(raw, str) else raw)
    check_payload_size(size, what=what, limit=limit)
    try:
        return json.loads(raw)
    except (ValueError, RecursionError) as error:  # JSONDecodeError, bad UTF-8, deep nesting
        raise ExchangeError(f"{what}: not valid JSON ({error.__class__.__name__})") from None


def site_pool_name(config: FederationConfig, site: str) -> str:
    """The Prefect work pool of ``site``: ``sites[].work_pool`` or ``fedpipe-<site>``."""
    for entry in config.sites:
        if entry.name == site:
            return entry.work_pool or f"fedpipe-{site}"
    raise FedpipeError(f"no site named {site!r} in the federation (sites: {config.site_names})")


def _tensor_name(index: int) -> str:
    return f"p{index:05d}"


def write_global_model(parameters: NDArrays, directory: str | os.PathLike[str]) -> tuple[str, str]:
    """Write the global parameters as ``<sha256>.safetensors`` under ``directory``.

    safetensors (a JSON header of dtypes, shapes and offsets, then the raw little-endian
    bytes) carries no code, and the reader maps it instead of reading it into memory.

    Returns
    -------
    tuple[str, str]
        The file's absolute path and the parameters' SHA-256. Writing is atomic (a temporary
        file renamed into place), so a site never reads a half-written model.
    """
    sha = digest(parameters)
    folder = Path(directory)
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / f"{sha}{MODEL_SUFFIX}"
    if not target.is_file():
        partial = folder / f".{sha}.{os.getpid()}.tmp{MODEL_SUFFIX}"
        save_file(
            {
                _tensor_name(i): np.ascontiguousarray(p, dtype="<f4")
                for i, p in enumerate(parameters)
            },
            str(partial),
        )
        partial.replace(target)
    return str(target.resolve()), sha


def _safetensors_layout(view: memoryview, size: int) -> list[tuple[tuple[int, ...], int, int]]:
    """The (shape, start, end) of each float32 tensor in a mapped safetensors file, in order.

    Everything is checked before any tensor is touched: the header's length and JSON, the
    names ``p00000``..., dtype F32, shapes, and offsets that tile the data exactly, in order.
    """
    if size < 8:
        raise ValueError("shorter than the 8-byte header length")
    header_len = int.from_bytes(view[:8], "little")
    if header_len > min(MAX_HEADER_BYTES, size - 8):
        raise ValueError(f"header length {header_len} out of range")
    header = json.loads(bytes(view[8 : 8 + header_len]))
    if not isinstance(header, dict):
        raise ValueError("header is not a JSON object")
    header.pop("__metadata__", None)
    data_start, data_size = 8 + header_len, size - 8 - header_len
    layout = []
    position = 0
    for index in range(len(header)):
        entry = header.get(_tensor_name(index))
        if not isinstance(entry, dict) or entry.get("dtype") != "F32":
            raise ValueError(f"tensor {_tensor_name(index)} missing or not F32")
        shape, offsets = entry.get("shape"), entry.get("data_offsets")
        if not isinstance(shape, list) or not all(
            isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in shape
        ):
            raise ValueError(f"tensor {_tensor_name(index)}: bad shape")
        if (
            not isinstance(offsets, list)
            or len(offsets) != 2
            or not all(isinstance(n, int) and not isinstance(n, bool) for n in offsets)
        ):
            raise ValueError(f"tensor {_tensor_name(index)}: bad offsets")
        start, end = offsets
        if start != position or end - start != 4 * math.prod(shape) or end > data_size:
            raise ValueError(f"tensor {_tensor_name(index)}: offsets do not match its shape")
        layout.append((tuple(shape), data_start + start, data_start + end))
        position += end - start
    if position != data_size:
        raise ValueError("tensors do not cover the data exactly")
    return layout


def read_global_model(uri: str, *, sha256: str) -> NDArrays:
    """Load a global model written by :func:`write_global_model` and verify its hash.

    The file is memory-mapped; each tensor is hashed and copied out in one pass over the
    mapping (:func:`fl_components.parameters.digest`'s bytes), never read whole into memory
    first.

    Raises
    ------
    ExchangeError
        If the file is missing, not a safetensors file of float32 tensors, or its contents do
        not hash to ``sha256``.
    """
    path = Path(uri.removeprefix("file://"))
    if not path.is_file():
        raise ExchangeError(
            f"global model {uri} is not readable from this site; the exchange folder "
            "(deployment.exchange_dir) must be shared storage mounted at the same path here"
        )
    size = path.stat().st_size
    check_payload_size(size, what=f"global model {uri}")
    hasher = hashlib.sha256()
    parameters: NDArrays = []
    try:
        with path.open("rb") as handle:
            if size == 0:
                raise ValueError("empty file")
            with mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
                view = memoryview(mapped)
                try:
                    for shape, start, end in _safetensors_layout(view, len(mapped)):
                        part = view[start:end]
                        hasher.update(str(shape).encode())
                        hasher.update(part)
                        array = np.frombuffer(part, dtype="<f4").astype(np.float32)
                        parameters.append(array.reshape(shape))
                        part.release()
                finally:
                    view.release()
    except (ValueError, OSError, RecursionError) as error:  # JSONDecodeError, bad UTF-8, ...
        raise ExchangeError(
            f"global model {uri} is not a readable safetensors file of float32 tensors "
            f"({error.__class__.__name__}); refusing to train on it"
        ) from None
    actual = hasher.hexdigest()
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
    check_payload_size(path.stat().st_size, what=f"model download {uri}")
    try:
        download = ModelDownload.from_bytes(path.read_bytes())
        if download.target_sha != sha256:
            raise CompressionError(
                f"it builds model {download.target_sha[:12]}, the reference is {sha256[:12]}"
            )
        return apply_download(download, held=held, like=like)
    except CompressionError as error:
        raise ExchangeError(f"model download {uri}: {error}") from None


def safetensors_bytes(arrays: NDArrays) -> bytes:
    """``arrays`` as one safetensors document of float32 tensors ``p00000``, ``p00001``, ..."""
    return save(
        {_tensor_name(i): np.ascontiguousarray(a, dtype="<f4") for i, a in enumerate(arrays)}
    )


def arrays_from_safetensors(buffer: memoryview, *, what: str) -> NDArrays:
    """The float32 tensors of a safetensors document, as views of ``buffer`` (no copy).

    Raises
    ------
    ExchangeError
        If it is not a safetensors document of tensors ``p00000``... in order, float32.
    """
    try:
        layout = _safetensors_layout(buffer, len(buffer))
    except (ValueError, RecursionError) as error:
        raise ExchangeError(
            f"{what}: not a safetensors document of float32 tensors ({error}); discarded"
        ) from None
    return [
        np.frombuffer(buffer, dtype="<f4", count=(end - start) // 4, offset=start).reshape(shape)
        for shape, start, end in layout
    ]


def encode_arrays(
    arrays: NDArrays, *, sink: FieldSink | None = None, field: str = "delta"
) -> dict[str, Any]:
    """Arrays as JSON-safe base64 float32 bytes with their shapes.

    With a ``sink`` that wants them (large enough), they go as a safetensors document in a
    sealed file instead, named under ``"file"`` (:mod:`fl_components.wire.answer_files`).
    """
    shapes = [list(a.shape) for a in arrays]
    if sink is not None and sink.wants(4 * sum(int(a.size) for a in arrays)):
        return {
            "dtype": "float32",
            "shapes": shapes,
            "file": sink.put(field, safetensors_bytes(arrays)),
        }
    return {
        "dtype": "float32",
        "shapes": shapes,
        "data": base64.b64encode(flatten(arrays).astype("<f4").tobytes()).decode("ascii"),
    }


def _arrays_from_file(
    encoded: Mapping[str, Any], *, source: FieldSource | None, field: str
) -> NDArrays:
    """The arrays of a field sent as a sealed file, their shapes checked against the answer's."""
    if source is None:
        raise ExchangeError(f"payload arrays: {field!r} names a file where none can be read")
    arrays = arrays_from_safetensors(source.take(encoded["file"], field), what=f"{field!r} file")
    shapes = [tuple(a.shape) for a in arrays]
    stated = [tuple(s) for s in encoded.get("shapes") or []]
    if shapes != stated:
        raise ExchangeError(
            f"payload arrays: the {field!r} file holds shapes {shapes[:3]}..., the answer "
            f"says {stated[:3]}...; discarded"
        )
    return arrays


def decode_arrays(
    encoded: Mapping[str, Any], *, source: FieldSource | None = None, field: str = "delta"
) -> NDArrays:
    """Inverse of :func:`encode_arrays`, checking dtype, shapes and size before allocating."""
    if not isinstance(encoded, Mapping):
        raise ExchangeError(f"payload arrays: expected a mapping, got {type(encoded).__name__}")
    if "file" in encoded and encoded.get("dtype") == "float32":
        return _arrays_from_file(encoded, source=source, field=field)
    if encoded.get("dtype") != "float32":
        raise ExchangeError(
            f"payload arrays: dtype must be 'float32' (got {encoded.get('dtype')!r})"
        )
    raw_shapes, data = encoded.get("shapes"), encoded.get("data")
    if not isinstance(data, str) or not isinstance(raw_shapes, list):
        raise ExchangeError("payload arrays: need 'shapes' (a list) and 'data' (base64 text)")
    shapes = []
    for shape in raw_shapes:
        if not isinstance(shape, list) or not all(
            isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape
        ):
            raise ExchangeError(f"payload arrays: shape {shape!r} is not a list of sizes >= 0")
        shapes.append(tuple(shape))
    check_payload_size(len(data), what="payload arrays")
    # no axis can be longer than the payload could ever hold values (an empty array with a
    # huge axis would hold none, yet numpy would refuse to shape it)
    longest = payload_limit() // 4
    for shape in shapes:
        if any(d > longest for d in shape):
            raise ExchangeError(
                f"payload arrays: shape {list(shape)} has an axis longer than the "
                f"{longest} float32 values the payload limit allows; refused"
            )
    values = sum(int(np.prod(shape, dtype=object)) for shape in shapes)
    try:
        raw = base64.b64decode(data, validate=True)
    except ValueError:  # binascii.Error
        raise ExchangeError("payload arrays: 'data' is not valid base64") from None
    if len(raw) != 4 * values:
        raise ExchangeError(
            f"payload arrays: {len(raw)} bytes of data for shapes holding {values} float32 values"
        )
    if not shapes:
        return []
    vector = np.frombuffer(raw, dtype="<f4")
    like = [np.zeros(shape, dtype=np.float32) for shape in shapes]
    return unflatten(vector.astype(np.float32), like)


def update_payload(update: LocalUpdate, *, sink: FieldSink | None = None) -> dict[str, Any]:
    """A site's training result as a JSON-safe mapping (large arrays to ``sink``'s files)."""
    return {
        "version": PAYLOAD_VERSION,
        "stage": "train",
        "site": update.site,
        "round": update.round,
        "num_examples": update.num_examples,
        "train_loss": float(update.train_loss),
        "seconds": float(update.seconds),
        "extra": {k: float(v) for k, v in update.extra.items()},
        "delta": encode_arrays(update.delta, sink=sink, field="delta"),
        "control_delta": (
            encode_arrays(update.control_delta, sink=sink, field="control_delta")
            if update.control_delta is not None
            else None
        ),
        "initial_loss": None if update.initial_loss is None else float(update.initial_loss),
    }


def update_from_payload(
    payload: Mapping[str, Any],
    *,
    site: str,
    round_num: int,
    source: FieldSource | None = None,
) -> LocalUpdate:
    """Rebuild a :class:`LocalUpdate`, checking it is the expected site's and round's.

    ``source`` opens arrays the site sent as sealed files (the work-pool backend).
    """
    _check_header(payload, stage="train", site=site, round_num=round_num)
    return LocalUpdate(
        site=site,
        round=round_num,
        delta=decode_arrays(payload["delta"], source=source, field="delta"),
        num_examples=int(payload["num_examples"]),
        train_loss=float(payload["train_loss"]),
        seconds=float(payload["seconds"]),
        extra={str(k): float(v) for k, v in payload.get("extra", {}).items()},
        control_delta=(
            decode_arrays(payload["control_delta"], source=source, field="control_delta")
            if payload.get("control_delta")
            else None
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
        "label_counts": [int(c) for c in metrics.label_counts],
    }


def metrics_from_payload(payload: Mapping[str, Any], *, site: str, round_num: int) -> Metrics:
    """Rebuild :class:`Metrics`, checking it is the expected site's and round's."""
    _check_header(payload, stage="evaluate", site=site, round_num=round_num)
    examples = int(payload["examples"])
    counts = tuple(int(c) for c in payload.get("label_counts", ())[: MAX_CLASSES + 1])
    # the counts set the promotion's baseline: they must describe the split that was scored
    if counts and (len(counts) > MAX_CLASSES or min(counts) < 0 or sum(counts) != examples):
        raise ExchangeError(
            f"site {site!r} round {round_num}: label_counts (sum {sum(counts)}, "
            f"{len(counts)} classes) do not describe its {examples} held-out examples"
        )
    return Metrics(
        loss=float(payload["loss"]),
        accuracy=float(payload["accuracy"]),
        examples=examples,
        label_counts=counts,
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
