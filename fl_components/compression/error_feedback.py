"""Error feedback: what compression dropped this round is added back next round.

Stich, Cordonnier & Jaggi 2018, "Sparsified SGD with Memory", NeurIPS (arXiv:1809.07599),
Algorithm 1: with memory m_t and update g_t, send comp(m_t + g_t) and keep
m_{t+1} = m_t + g_t - comp(m_t + g_t). The learning rate is already inside our g_t (a model
delta), so it does not appear separately.

The memory lives in the site's folder between rounds, as an ``.npz`` read with
``allow_pickle=False``, bound to the run and to the round it was made in. It is used again
only in the same run, for the same dimension, and at most ``max_age`` rounds later: a site
that skipped more rounds than that starts from zero, because a residual made against a
model that has since moved on many rounds is no longer an error of the current model.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import numpy.typing as npt

from fl_components.compression.encoded import CompressionError, EncodedUpdate

RESIDUAL_FILE = "compression-residual.npz"


def apply_feedback(
    update: npt.NDArray[np.floating],
    residual: npt.NDArray[np.floating],
    *,
    compress: Callable[[npt.NDArray[np.float32]], EncodedUpdate],
    decode: Callable[[EncodedUpdate], npt.NDArray[np.float32]],
) -> tuple[EncodedUpdate, npt.NDArray[np.float32]]:
    """One step of Algorithm 1: compress ``residual + update``, return (message, new residual).

    Raises
    ------
    CompressionError
        If ``update`` and ``residual`` differ in length.
    """
    corrected = np.asarray(update, dtype=np.float32).reshape(-1)
    memory = np.asarray(residual, dtype=np.float32).reshape(-1)
    if memory.shape != corrected.shape:
        raise CompressionError(
            f"error-feedback residual has {memory.size} values, the update {corrected.size}; "
            "delete the site's residual file after changing the model"
        )
    corrected = corrected + memory
    message = compress(corrected)
    return message, corrected - decode(message)


def load_residual(
    folder: str | os.PathLike[str], *, run_id: str, round: int, dimension: int, max_age: int
) -> npt.NDArray[np.float32]:
    """The residual to use in ``round``, or zeros if none is valid for it.

    A stored residual is valid when it was made in the same run, for ``dimension`` values,
    in an earlier round at most ``max_age`` rounds back.
    """
    zeros = np.zeros(dimension, dtype=np.float32)
    path = Path(folder) / RESIDUAL_FILE
    if not path.is_file():
        return zeros
    with np.load(path, allow_pickle=False) as stored:
        made_in = int(stored["round"])
        same_run = bytes(stored["run_id"]).decode() == run_id
        residual = np.asarray(stored["residual"], dtype=np.float32)
    if not same_run or residual.shape != (dimension,) or not 0 < round - made_in <= max_age:
        return zeros
    return residual


def save_residual(
    folder: str | os.PathLike[str],
    *,
    run_id: str,
    round: int,
    residual: npt.NDArray[np.floating],
) -> Path:
    """Write the residual made in ``round`` atomically (temporary file, then rename)."""
    target = Path(folder) / RESIDUAL_FILE
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f".{RESIDUAL_FILE}.{os.getpid()}.tmp.npz")
    np.savez(
        partial,
        residual=np.asarray(residual, dtype=np.float32).reshape(-1),
        round=np.int64(round),
        run_id=np.frombuffer(run_id.encode(), dtype=np.uint8),
    )
    partial.replace(target)
    return target
