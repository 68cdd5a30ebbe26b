"""Random-k with a seed shared by every site of a round: the same coordinates everywhere.

Konecny, McMahan, Yu, Richtarik, Suresh & Bacon 2016, "Federated Learning: Strategies for
Improving Communication Efficiency", NIPS PMPML workshop (arXiv:1610.05492), Section 3
("Random mask": a sparse random pattern regenerated from a seed, so only the values and the
seed travel). We go one step further and derive the seed from the run and the round alone,
so every site of a round keeps *the same* k coordinates: the vectors then add coordinate by
coordinate and compose with secure aggregation, which masks and sends only those k values.
Combined with error feedback (Stich et al. 2018, arXiv:1809.07599, Algorithm 1 with rand_k,
a k/d-contraction) the coordinates not sent are carried to later rounds.

seed = HKDF-SHA256(ikm = run_id, salt = "fedpipe/random-k/v1", info = round as u64 BE)
(RFC 5869). The k indices are those with the smallest words of the AES-256-CTR keystream
PRG(seed) (:mod:`fl_components.secure_aggregation.protocol.prg`), ties broken by index: a fixed
function of the
seed on every platform, independent of numpy's sampling algorithms.

Payload: the 32-byte seed, then the k values at the sorted indices as float32 little-endian.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from fl_components.compression.encoded import CompressionError, EncodedUpdate, Method
from fl_components.compression.top_k import kept_count
from fl_components.secure_aggregation.protocol.prg import SEED_BYTES, expand

_SALT = b"fedpipe/random-k/v1"


def round_seed(*, run_id: str, round: int) -> bytes:
    """The 32-byte seed every site of ``round`` of ``run_id`` derives (public, not secret)."""
    if round < 0:
        raise CompressionError(f"round must be >= 0 (got {round})")
    kdf = HKDF(algorithm=hashes.SHA256(), length=SEED_BYTES, salt=_SALT, info=round.to_bytes(8))
    return kdf.derive(run_id.encode())


def shared_indices(seed: bytes, *, dimension: int, k: int) -> npt.NDArray[np.int64]:
    """The k sorted coordinates chosen by ``seed`` out of ``dimension``."""
    if not 1 <= k <= dimension:
        raise CompressionError(f"random-k needs 1 <= k <= d (got k={k}, d={dimension})")
    words = expand(seed, dimension)
    return np.sort(np.argsort(words, kind="stable")[:k]).astype(np.int64)


def sparsify(
    update: npt.NDArray[np.floating], *, fraction: float, run_id: str, round: int
) -> EncodedUpdate:
    """Keep the round's shared ``ceil(fraction * d)`` coordinates of ``update``."""
    values = np.asarray(update, dtype=np.float32).reshape(-1)
    k = kept_count(values.size, fraction)
    seed = round_seed(run_id=run_id, round=round)
    kept = values[shared_indices(seed, dimension=values.size, k=k)]
    return EncodedUpdate(
        method=Method.RANDOM_K,
        dimension=values.size,
        count=k,
        bits=32,
        bucket=0,
        payload=seed + kept.astype("<f4").tobytes(),
    )


def densify(message: EncodedUpdate) -> npt.NDArray[np.float32]:
    """The dense float32 vector of a random-k message (indices rebuilt from its seed).

    Raises
    ------
    CompressionError
        If the message is not random-k or its length is wrong.
    """
    if message.method != Method.RANDOM_K:
        raise CompressionError(f"expected a RANDOM_K message, got {message.method.name}")
    k, d = message.count, message.dimension
    if len(message.payload) != SEED_BYTES + 4 * k:
        raise CompressionError(
            f"random-k payload holds {len(message.payload)} bytes; k={k} needs {SEED_BYTES + 4 * k}"
        )
    indices = shared_indices(message.payload[:SEED_BYTES], dimension=d, k=k)
    dense = np.zeros(d, dtype=np.float32)
    dense[indices] = np.frombuffer(message.payload[SEED_BYTES:], dtype="<f4")
    return dense
