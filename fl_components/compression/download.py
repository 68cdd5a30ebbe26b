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

Wire format::

    b"FPMD" | version u8 | kind u8 (0 full, 1 delta) | base SHA-256 (32 bytes, zero for full)
            | target SHA-256 (32 bytes) | encoded vector (:mod:`.encoded`)
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

import numpy as np

from fl_components.compression import qsgd
from fl_components.compression.codec import decode_update, encode_dense
from fl_components.compression.encoded import CompressionError, EncodedUpdate
from fl_components.parameters import NDArrays, digest, flatten, unflatten

MAGIC = b"FPMD"
VERSION = 1
_HEAD_BYTES = 4 + 1 + 1 + 32 + 32


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
