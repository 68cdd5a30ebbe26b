"""Fixed-point quantization of updates into Z_2^32, sized so that the sum cannot overflow.

Masks cancel exactly only in a finite group (Bonawitz et al. 2017, "Practical Secure
Aggregation for Privacy-Preserving Machine Learning", CCS, arXiv:1611.04482, Section 3:
inputs are vectors in Z_R^m). Each value is clipped to [-c, c], shifted to [0, 2c], scaled to
[0, 2^bits - 1] and rounded stochastically (unbiased: E[q] = scaled value; Gupta et al. 2015,
"Deep Learning with Limited Numerical Precision", ICML, arXiv:1502.02551). With
``n * (2^bits - 1) < 2^32`` the sum of n quantized values is exact in uint32, so the sum of
the masked vectors mod 2^32 *is* the integer sum once the masks are removed.

With compression the group shrinks to Z_2^m, m = bits + ceil(log2 n) (``field_bits``): the
sum still fits, and each masked value travels in m bits
(:mod:`fl_components.secure_aggregation.protocol.packing`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from fl_components.secure_aggregation.protocol.errors import ContextMismatchError

FIELD_BITS = 32


def headroom_bits(n: int) -> int:
    """Bits the sum of ``n`` values needs above one value's: ``ceil(log2 n)``."""
    return math.ceil(math.log2(n)) if n > 1 else 0


def max_bits(n: int, field_bits: int = FIELD_BITS) -> int:
    """The most bits per value such that the sum of ``n`` values fits in ``field_bits`` bits."""
    return field_bits - headroom_bits(n)


@dataclass(frozen=True)
class Quantizer:
    """Stochastic fixed-point quantizer for a sum of ``n`` vectors.

    Attributes
    ----------
    clip_range : float
        c: values are clipped to [-c, c].
    bits : int
        Bits per quantized value; levels are 0 .. 2^bits - 1.
    """

    clip_range: float
    bits: int

    @classmethod
    def for_sum(
        cls, *, n: int, clip_range: float, bits: int | None = None, field_bits: int = FIELD_BITS
    ) -> Quantizer:
        """Build the quantizer for a sum of ``n`` vectors.

        Parameters
        ----------
        n : int
            Number of vectors summed.
        clip_range : float
            c > 0.
        bits : int or None
            Bits per value; None picks :func:`max_bits` of ``n``.
        field_bits : int
            m of the group Z_2^m the sum lives in (32 without compression).

        Raises
        ------
        ContextMismatchError
            If ``clip_range`` is not a positive finite number or ``bits`` would overflow.
        """
        if not (math.isfinite(clip_range) and clip_range > 0):
            raise ContextMismatchError(
                f"secure_aggregation.clip_range must be a finite number > 0 (got {clip_range})"
            )
        limit = max_bits(n, field_bits)
        chosen = limit if bits is None else bits
        if not 1 <= chosen <= limit:
            raise ContextMismatchError(
                f"secure_aggregation.bits={bits} would overflow the sum of n={n} values in "
                f"Z_2^{field_bits}; use bits between 1 and {limit} (or null for {limit})"
            )
        return cls(clip_range=float(clip_range), bits=chosen)

    @property
    def levels(self) -> int:
        """The largest quantized value, ``2^bits - 1``."""
        return (1 << self.bits) - 1

    @property
    def scale(self) -> float:
        """Quantized units per unit of the input."""
        return self.levels / (2.0 * self.clip_range)

    def error_bound(self, count: int) -> float:
        """Largest per-coordinate error of a dequantized sum of ``count`` clipped vectors."""
        # Each stochastic rounding moves a value by < 1 unit; float64 slack on top.
        return count / self.scale + 1e-9 * count * self.clip_range

    def quantize(
        self, update: npt.NDArray[np.floating], *, rng: np.random.Generator
    ) -> npt.NDArray[np.uint32]:
        """Clip, shift, scale and stochastically round ``update`` to uint32.

        Raises
        ------
        ContextMismatchError
            If the update holds NaN or infinity (clipping cannot fix those).
        """
        values = np.asarray(update, dtype=np.float64).reshape(-1)
        if not np.isfinite(values).all():
            raise ContextMismatchError(
                "update holds NaN or infinite values; fix training (lower the learning rate, "
                "check the loss) before secure aggregation"
            )
        # In place on one float64 buffer: this runs on every parameter of every update.
        scaled = np.clip(values, -self.clip_range, self.clip_range)
        scaled += self.clip_range
        scaled *= self.scale
        noise = rng.random(scaled.shape[0])
        scaled += noise
        np.floor(scaled, out=scaled)
        # clip() made scaled >= 0; float rounding of 2c * scale may touch levels + 1.
        np.minimum(scaled, self.levels, out=scaled)
        return scaled.astype(np.uint32)

    def dequantize_sum(
        self, total: npt.NDArray[np.uint32], *, count: int
    ) -> npt.NDArray[np.float64]:
        """Map the integer sum of ``count`` quantized vectors back to a float sum."""
        return total.astype(np.float64) / self.scale - count * self.clip_range
