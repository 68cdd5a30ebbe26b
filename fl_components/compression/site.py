"""The site's compression step: one call after training, residual kept in the site's folder.

What the coordinator tells a site for a round is a :class:`CompressionInstruction`
(JSON-safe, so it rides in the round engine's per-site instructions); the site calls
:func:`compress_for_upload` in the clear, or :func:`select_for_masking` under secure
aggregation, on its flat model delta after training and after any DP clipping and noise
(compressing DP output is post-processing). Both load the error-feedback residual from the
site's folder and save the new one (:mod:`fl_components.compression.error_feedback`).
"""

from __future__ import annotations

import os
from dataclasses import replace

import numpy as np
import numpy.typing as npt

from fl_components.compression.codec import decode_update, encode_update
from fl_components.compression.encoded import CompressionError, EncodedUpdate
from fl_components.compression.error_feedback import load_residual, save_residual
from fl_components.compression.instruction import CompressionInstruction
from fl_components.compression.secure import select_for_secure
from fl_components.parameters import NDArrays, flatten, unflatten
from fl_components.round.types import LocalUpdate


def compress_for_upload(
    delta: npt.NDArray[np.floating],
    *,
    instruction: CompressionInstruction,
    site_dir: str | os.PathLike[str],
    rng: np.random.Generator,
) -> EncodedUpdate:
    """Compress a flat delta for upload in the clear; ``.nbytes`` is the exact upload size."""
    residual = _residual(delta, instruction, site_dir)
    message, residual = encode_update(
        delta,
        config=instruction.config,
        run_id=instruction.run_id,
        round=instruction.round,
        residual=residual,
        rng=rng,
    )
    _save(instruction, site_dir, residual)
    return message


def compress_local_update(
    update: LocalUpdate,
    *,
    instruction: CompressionInstruction,
    site_dir: str | os.PathLike[str],
    seed: int,
) -> tuple[LocalUpdate, EncodedUpdate]:
    """The round engine's step: compress ``update.delta``, return what the coordinator decodes.

    Returns
    -------
    tuple[LocalUpdate, EncodedUpdate]
        The update whose delta is exactly the decoded message (what the coordinator
        aggregates, :func:`decode_upload`), and the message itself: what travels, and whose
        ``nbytes`` is the exact upload size (``bytes/up``).
    """
    message = compress_for_upload(
        flatten(update.delta),
        instruction=instruction,
        site_dir=site_dir,
        rng=np.random.default_rng([seed, instruction.round]),
    )
    return replace(update, delta=decode_upload(message, like=update.delta)), message


def decode_upload(message: EncodedUpdate, *, like: NDArrays) -> NDArrays:
    """The coordinator's side: the dense float32 update a message stands for, cut like ``like``.

    Raises
    ------
    CompressionError
        If the message is malformed or not of the model's dimension.
    """
    dimension = sum(int(p.size) for p in like)
    if message.dimension != dimension:
        raise CompressionError(
            f"compressed update has d={message.dimension}, the model has {dimension} values"
        )
    return unflatten(decode_update(message), like)


def select_for_masking(
    delta: npt.NDArray[np.floating],
    *,
    instruction: CompressionInstruction,
    site_dir: str | os.PathLike[str],
) -> npt.NDArray[np.float32]:
    """The values a site hands to ``SecAggParticipant.mask_update`` (k of them with random-k)."""
    residual = _residual(delta, instruction, site_dir)
    values, residual = select_for_secure(
        delta,
        config=instruction.config,
        run_id=instruction.run_id,
        round=instruction.round,
        residual=residual,
    )
    _save(instruction, site_dir, residual)
    return values


def _residual(
    delta: npt.NDArray[np.floating],
    instruction: CompressionInstruction,
    site_dir: os.PathLike[str] | str,
) -> npt.NDArray[np.float32]:
    return load_residual(
        site_dir,
        run_id=instruction.run_id,
        round=instruction.round,
        dimension=int(np.asarray(delta).size),
        max_age=instruction.config.residual_max_age,
    )


def _save(
    instruction: CompressionInstruction,
    site_dir: os.PathLike[str] | str,
    residual: npt.NDArray[np.float32],
) -> None:
    if instruction.config.error_feedback and instruction.config.method in ("top_k", "random_k"):
        save_residual(
            site_dir, run_id=instruction.run_id, round=instruction.round, residual=residual
        )
