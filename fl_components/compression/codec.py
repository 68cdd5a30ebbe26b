"""The site's compression step and the coordinator's decoding, chosen by the config.

The site calls :func:`encode_update` on its flat model delta after training (and after any
DP clipping and noise: compressing DP output is post-processing); the coordinator calls
:func:`decode_update` on what arrived. ``message.nbytes`` is the exact upload size.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from fl_components.compression import qsgd, random_k, top_k
from fl_components.compression.encoded import CompressionError, EncodedUpdate, Method
from fl_components.compression.error_feedback import apply_feedback
from fl_components.config import CompressionConfig


def encode_dense(update: npt.NDArray[np.floating]) -> EncodedUpdate:
    """No compression: the float32 values, little-endian (4 bytes per value + 28 framing)."""
    values = np.asarray(update, dtype="<f4").reshape(-1)
    return EncodedUpdate(
        method=Method.DENSE,
        dimension=values.size,
        count=values.size,
        bits=32,
        bucket=0,
        payload=values.tobytes(),
    )


def decode_update(message: EncodedUpdate) -> npt.NDArray[np.float32]:
    """The dense float32 update a message stands for.

    Raises
    ------
    CompressionError
        If the message is malformed for its method.
    """
    if message.method == Method.DENSE:
        if len(message.payload) != 4 * message.dimension:
            raise CompressionError(
                f"dense payload holds {len(message.payload)} bytes, d={message.dimension} "
                f"needs {4 * message.dimension}"
            )
        return np.frombuffer(message.payload, dtype="<f4").astype(np.float32)
    if message.method == Method.QSGD:
        return qsgd.dequantize(message)
    if message.method == Method.TOP_K:
        return top_k.densify(message)
    return random_k.densify(message)


def encode_update(
    update: npt.NDArray[np.floating],
    *,
    config: CompressionConfig,
    run_id: str,
    round: int,
    residual: npt.NDArray[np.floating],
    rng: np.random.Generator,
) -> tuple[EncodedUpdate, npt.NDArray[np.float32]]:
    """Compress one site's flat update as ``config`` says.

    Parameters
    ----------
    update : numpy.ndarray, shape (d,)
        The flat model delta.
    config : CompressionConfig
        Method and its settings.
    run_id, round : str, int
        Bind the shared random-k coordinates to the round.
    residual : numpy.ndarray, shape (d,)
        Error-feedback memory from :func:`~fl_components.compression.error_feedback.load_residual`
        (zeros when none; ignored unless the method sparsifies with error feedback).
    rng : numpy.random.Generator
        QSGD's rounding noise.

    Returns
    -------
    tuple[EncodedUpdate, numpy.ndarray]
        The message, and the residual to save for the next round (zeros without feedback).
    """
    values = np.asarray(update, dtype=np.float32).reshape(-1)
    zeros = np.zeros_like(values)
    if config.method == "none":
        return encode_dense(values), zeros
    if config.method == "qsgd":
        message = qsgd.quantize(values, bits=config.bits, rng=rng, bucket=config.bucket_size)
        return message, zeros

    def compress(vector: npt.NDArray[np.float32]) -> EncodedUpdate:
        if config.method == "top_k":
            return top_k.sparsify(vector, fraction=config.fraction)
        return random_k.sparsify(vector, fraction=config.fraction, run_id=run_id, round=round)

    if not config.error_feedback:
        return compress(values), zeros
    return apply_feedback(values, residual, compress=compress, decode=decode_update)
