"""Model download as a delta against the model the site already holds, verified by SHA-256.

The delta of the global model between two rounds is as compressible as an update: Konecny
et al. 2016 (arXiv:1610.05492) compress the upload; Caldas, Konecny, McMahan & Talwalkar
2018, "Expanding the Reach of Federated Learning by Reducing Client Resource Requirements"
(arXiv:1812.07210), Section 3, quantize the server-to-client model the same way. Here the
coordinator keeps the *broadcast* model B_r, the one every site that followed every round
holds, and sends Q(G_r - B_(r-1)) (QSGD, :mod:`fl_components.compression.qsgd`, or float32).
Both sides compute B_r = B_(r-1) + decoded delta in float32 with the same operations, so
both get the same bytes and the site can verify the result against SHA-256(B_r)
(:func:`fl_components.parameters.digest`). What quantization dropped, G_r - B_r, is not
lost: it is in the next round's delta (error feedback for free). A site whose model does
not hash to SHA-256(B_(r-1)), because it missed a round or is new, gets B_r in full.

In the round engine: the coordinator's memory is :class:`ModelDownloads` (B_r and one hash
per site: bounded, whatever the number of rounds); the site keeps the model it holds in its
own folder (:data:`HELD_FILE`) and rebuilds what it was sent with :func:`receive_model`,
falling back to the full model when its held model does not hash to the delta's base.

Wire format::

    b"FPMD" | version u8 | kind u8 (0 full, 1 delta) | base SHA-256 (32 bytes, zero for full)
            | target SHA-256 (32 bytes) | encoded vector (:mod:`.encoded`)
"""

from __future__ import annotations

import enum
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fl_components.compression import qsgd
from fl_components.compression.codec import decode_update, encode_dense
from fl_components.compression.encoded import FRAME_BYTES, CompressionError, EncodedUpdate
from fl_components.config import FederationConfig
from fl_components.parameters import NDArrays, digest, flatten, unflatten

MAGIC = b"FPMD"
VERSION = 1
_HEAD_BYTES = 4 + 1 + 1 + 32 + 32
HELD_FILE = "held-model.npz"


class DownloadKind(enum.IntEnum):
    """Whether a download replaces the site's model or updates it."""

    FULL = 0
    DELTA = 1


@dataclass(frozen=True, eq=False)
class ModelDownload:
    """The global model as one site receives it.

    Attributes
    ----------
    kind : DownloadKind
        FULL (the model itself) or DELTA (add to the model hashing to ``base_sha``).
    base_sha : str
        SHA-256 of the model the delta applies to ("" for FULL).
    target_sha : str
        SHA-256 of the model the site holds afterwards (B_r).
    vector : EncodedUpdate
        The flat model or delta.
    """

    kind: DownloadKind
    base_sha: str
    target_sha: str
    vector: EncodedUpdate

    @property
    def nbytes(self) -> int:
        """Exact bytes on the wire, framing included."""
        return _HEAD_BYTES + self.vector.nbytes

    def to_bytes(self) -> bytes:
        """Serialize (see the module's wire format)."""
        base = bytes.fromhex(self.base_sha) if self.base_sha else bytes(32)
        head = MAGIC + bytes([VERSION, int(self.kind)]) + base + bytes.fromhex(self.target_sha)
        return head + self.vector.to_bytes()

    @classmethod
    def from_bytes(cls, data: bytes) -> ModelDownload:
        """Parse bytes written by :meth:`to_bytes`."""
        if len(data) < _HEAD_BYTES or data[:4] != MAGIC or data[4] != VERSION or data[5] > 1:
            raise CompressionError(
                "not a fedpipe model download v1 (bad magic, version, kind or length)"
            )
        kind = DownloadKind(data[5])
        base = data[6:38].hex() if kind == DownloadKind.DELTA else ""
        return cls(
            kind=kind,
            base_sha=base,
            target_sha=data[38:70].hex(),
            vector=EncodedUpdate.from_bytes(data[_HEAD_BYTES:]),
        )


@dataclass(frozen=True, eq=False)
class Broadcast:
    """One round's broadcast: the model sites will hold, and the delta that gets them there.

    Attributes
    ----------
    model : NDArrays
        B_r, what every site holds after this round's download (train from it).
    sha : str
        ``digest(model)``.
    previous_sha : str
        ``digest(B_(r-1))``: sites holding it get ``delta``; all others the full model.
    delta : EncodedUpdate or None
        Q(G_r - B_(r-1)); None in the first round.
    """

    model: NDArrays
    sha: str
    previous_sha: str
    delta: EncodedUpdate | None


def next_broadcast(
    global_model: NDArrays,
    *,
    previous: NDArrays | None,
    bits: int | None,
    rng: np.random.Generator,
    bucket: int = qsgd.DEFAULT_BUCKET,
) -> Broadcast:
    """Build B_r from the exact global model G_r and last round's broadcast B_(r-1).

    ``bits`` None sends the delta as float32 (B_r = G_r up to float32 rounding of the sum).
    """
    if previous is None:
        model = [np.asarray(p, dtype=np.float32).copy() for p in global_model]
        return Broadcast(model=model, sha=digest(model), previous_sha="", delta=None)
    base = flatten(previous)
    change = flatten(global_model).astype(np.float64) - base
    delta = (
        encode_dense(change)
        if bits is None
        else qsgd.quantize(change, bits=bits, rng=rng, bucket=bucket)
    )
    model = unflatten(_apply(base, delta), previous)
    return Broadcast(model=model, sha=digest(model), previous_sha=digest(previous), delta=delta)


def download_for(broadcast: Broadcast, *, site_sha: str | None) -> ModelDownload:
    """What one site receives: the delta if it holds B_(r-1) (by hash), else B_r in full."""
    if broadcast.delta is not None and site_sha == broadcast.previous_sha:
        return ModelDownload(
            kind=DownloadKind.DELTA,
            base_sha=broadcast.previous_sha,
            target_sha=broadcast.sha,
            vector=broadcast.delta,
        )
    return ModelDownload(
        kind=DownloadKind.FULL,
        base_sha="",
        target_sha=broadcast.sha,
        vector=encode_dense(flatten(broadcast.model)),
    )


def full_download(model: NDArrays) -> ModelDownload:
    """``model`` in full (float32), as a site without the delta's base receives it."""
    return ModelDownload(
        kind=DownloadKind.FULL,
        base_sha="",
        target_sha=digest(model),
        vector=encode_dense(flatten(model)),
    )


def full_download_nbytes(dimension: int) -> int:
    """Exact bytes of a full download of ``dimension`` values (framing included)."""
    return _HEAD_BYTES + FRAME_BYTES + 4 * dimension


class ModelDownloads:
    """The coordinator's side of model deltas across a run: B_r, and the hash each site holds.

    Memory is bounded: the last broadcast (one model, its encoded delta) and one SHA-256 per
    site, never a model per site. Each round :meth:`broadcast` builds B_r from the exact
    global model and B_(r-1); :meth:`for_site` is the delta for a site known to hold
    B_(r-1), the full model for any other; :meth:`received` records what a site now holds.

    Parameters
    ----------
    bits : int or None
        QSGD bits of the delta (None: float32).
    seed : int
        Seeds the delta's quantization noise, per round.
    bucket : int
        QSGD bucket size.
    """

    def __init__(self, *, bits: int | None, seed: int, bucket: int = qsgd.DEFAULT_BUCKET) -> None:
        self.bits = bits
        self.seed = seed
        self.bucket = bucket
        self._current: Broadcast | None = None
        self._key: tuple[int, str] | None = None
        self._held: dict[str, str] = {}

    @classmethod
    def from_config(cls, config: FederationConfig) -> ModelDownloads | None:
        """The run's memory when ``compression.download`` is ``delta``; None for ``full``."""
        compression = config.compression
        if compression.download != "delta":
            return None
        return cls(bits=compression.download_bits, seed=config.seed, bucket=compression.bucket_size)

    def broadcast(self, global_model: NDArrays, *, round: int) -> Broadcast:
        """B_r for round ``round`` (built once: the same round and model give the same B_r)."""
        key = (round, digest(global_model))
        if self._current is not None and self._key == key:
            return self._current
        previous = self._current.model if self._current is not None else None
        self._current = next_broadcast(
            global_model,
            previous=previous,
            bits=self.bits,
            rng=np.random.default_rng([self.seed, round]),
            bucket=self.bucket,
        )
        self._key = key
        return self._current

    def for_site(self, site: str) -> ModelDownload:
        """What ``site`` is sent this round (call :meth:`broadcast` first)."""
        if self._current is None:
            raise CompressionError("no broadcast yet this run: call broadcast() first")
        return download_for(self._current, site_sha=self._held.get(site))

    def received(self, site: str, sha: str) -> None:
        """``site`` confirmed it holds the model hashing to ``sha``."""
        self._held[site] = sha

    def holds(self, site: str) -> str | None:
        """The hash of the model ``site`` last confirmed holding (None: none this run)."""
        return self._held.get(site)


def load_held(folder: str | os.PathLike[str]) -> NDArrays | None:
    """The model this site holds (read with ``allow_pickle=False``), or None."""
    path = Path(folder) / HELD_FILE
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as archive:
            return [archive[f"arr_{i}"].astype(np.float32) for i in range(len(archive.files))]
    except (OSError, ValueError, KeyError):  # unreadable: the site simply holds nothing
        return None


def save_held(folder: str | os.PathLike[str], model: NDArrays) -> None:
    """Keep ``model`` as the one this site holds (atomic: temporary file, then rename)."""
    target = Path(folder) / HELD_FILE
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f".{HELD_FILE}.{os.getpid()}.tmp.npz")
    np.savez(partial, *[np.ascontiguousarray(p, dtype=np.float32) for p in model])
    partial.replace(target)


def receive_model(
    folder: str | os.PathLike[str],
    *,
    base_sha: str,
    apply_delta: Callable[[NDArrays], NDArrays],
    fetch_full: Callable[[], NDArrays],
) -> tuple[NDArrays, DownloadKind]:
    """The site's side of a download: the delta if it holds its base (by hash), else in full.

    Parameters
    ----------
    folder : path
        The site's folder (its held model, :data:`HELD_FILE`).
    base_sha : str
        The delta's base ("" when the coordinator sent the full model only).
    apply_delta : callable
        ``held -> model``: fetch the delta, apply it to the held model, verify the result.
    fetch_full : callable
        ``() -> model``: fetch the full model, verify it.

    Returns
    -------
    tuple[NDArrays, DownloadKind]
        The model (now also held in ``folder``) and which download the site used: what
        crossed the wire.
    """
    held = load_held(folder) if base_sha else None
    if held is not None and digest(held) == base_sha:
        model, kind = apply_delta(held), DownloadKind.DELTA
    else:  # missed a round, new, or holds another model: the full one
        model, kind = fetch_full(), DownloadKind.FULL
    save_held(folder, model)
    return model, kind


def apply_download(download: ModelDownload, *, held: NDArrays | None, like: NDArrays) -> NDArrays:
    """The site's side: rebuild B_r from ``held`` and verify it by SHA-256.

    Parameters
    ----------
    download : ModelDownload
        What arrived.
    held : NDArrays or None
        The model this site holds (None: none yet).
    like : NDArrays
        Arrays of the model's shapes (to cut the flat vector).

    Raises
    ------
    CompressionError
        If a delta's base is not the model held, or the result does not hash to the target.
    """
    if download.kind == DownloadKind.FULL:
        model = unflatten(decode_update(download.vector), like)
    else:
        held_sha = digest(held) if held is not None else "none"
        if held is None or held_sha != download.base_sha:
            raise CompressionError(
                f"model delta applies to {download.base_sha[:12]}, but this site holds "
                f"{held_sha[:12]}; the coordinator must send the full model (report the site's "
                "model hash with its result)"
            )
        model = unflatten(_apply(flatten(held), download.vector), like)
    actual = digest(model)
    if actual != download.target_sha:
        raise CompressionError(
            f"downloaded model hashes to {actual[:12]}, expected {download.target_sha[:12]}; "
            "refusing to train on it (corrupt transfer or mismatched fedpipe versions)"
        )
    return model


def _apply(base: np.ndarray, delta: EncodedUpdate) -> np.ndarray:
    # One float32 addition, identical at coordinator and site, so both hash the same bytes.
    return (base.astype(np.float32) + decode_update(delta)).astype(np.float32)
