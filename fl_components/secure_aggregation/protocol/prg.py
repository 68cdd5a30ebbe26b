"""Mask expansion: a 256-bit seed stretched into a uint32 vector by AES-256 in counter mode.

Bonawitz et al. 2017, "Practical Secure Aggregation for Privacy-Preserving Machine
Learning", CCS (arXiv:1611.04482), Section 4 uses PRG(seed) for both the self-mask and the
pairwise masks. Our PRG is the AES-256-CTR keystream under key = seed, starting at counter
block ``0^96 || 00000002``. We produce it with OpenSSL's AES-GCM encryptor over zeros: GCM's
ciphertext of zeros *is* exactly that CTR keystream (NIST SP 800-38D, Section 7.1, with
J0 = IV || 0^31 || 1 for a 96-bit IV; the tag is never computed), and OpenSSL's stitched GCM
code runs ~1.3x faster than its plain CTR on this CPU (see ``benchmarks/secagg_bench.py``;
``tests/secure_aggregation/test_prg.py`` pins the equality). Seeds are 256 bits and never folded.

Speed comes from three choices: ``update_into`` a reused buffer (no allocation per call),
working in 256 KiB chunks that stay in L2 while many seeds are applied to the same chunk,
and numpy's wrapping uint32 ``add``/``subtract`` in place (arithmetic mod 2^32).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import numpy.typing as npt
from cryptography.hazmat.primitives.ciphers import Cipher, CipherContext, algorithms, modes

SEED_BYTES = 32
CHUNK_WORDS = 1 << 16  # 256 KiB of keystream per chunk: fits in L2 alongside the accumulator.
_GCM_IV = bytes(12)
_BLOCK = 16


def _keystream(seed: bytes) -> CipherContext:
    if len(seed) != SEED_BYTES:
        raise ValueError(f"mask seeds must be {SEED_BYTES} bytes (got {len(seed)})")
    return Cipher(algorithms.AES(seed), modes.GCM(_GCM_IV)).encryptor()


class MaskExpander:
    """Adds and subtracts PRG masks to a uint32 accumulator in place.

    One expander owns its scratch buffers; use one per thread (the crypto calls hold the
    GIL anyway, so parallel maskers need processes).

    Parameters
    ----------
    chunk_words : int
        Keystream words generated per call; the default keeps a chunk in L2.
    """

    def __init__(self, chunk_words: int = CHUNK_WORDS) -> None:
        self._chunk = chunk_words
        self._zeros = memoryview(bytes(4 * chunk_words))
        self._buffer = bytearray(4 * chunk_words + _BLOCK - 1)
        self._words = np.frombuffer(self._buffer, dtype="<u4", count=chunk_words)

    def apply(
        self,
        accumulator: npt.NDArray[np.uint32],
        *,
        add: Sequence[bytes] = (),
        subtract: Sequence[bytes] = (),
    ) -> None:
        """Set ``accumulator += sum(PRG(s) for s in add) - sum(PRG(s) for s in subtract)``.

        Arithmetic is mod 2^32 (numpy's uint32 wraps). The loop runs chunk-outer, seed-inner
        so each accumulator chunk is read from memory once whatever the number of seeds.

        Parameters
        ----------
        accumulator : numpy.ndarray of uint32, shape (d,)
            Modified in place; must be contiguous.
        add, subtract : sequence of bytes
            32-byte seeds whose masks are added / subtracted.
        """
        if accumulator.dtype != np.uint32 or not accumulator.flags.c_contiguous:
            raise ValueError("accumulator must be a contiguous uint32 array")
        plus = [_keystream(seed) for seed in add]
        minus = [_keystream(seed) for seed in subtract]
        d = accumulator.shape[0]
        for start in range(0, d, self._chunk):
            stop = min(start + self._chunk, d)
            width = stop - start
            target = accumulator[start:stop]
            zeros = self._zeros[: 4 * width]
            words = self._words[:width]
            for stream in plus:
                stream.update_into(zeros, self._buffer)
                np.add(target, words, out=target)
            for stream in minus:
                stream.update_into(zeros, self._buffer)
                np.subtract(target, words, out=target)


def expand(seed: bytes, dimension: int) -> npt.NDArray[np.uint32]:
    """Return PRG(seed) as a fresh uint32 vector of length ``dimension`` (tests, clarity)."""
    out = np.zeros(dimension, dtype=np.uint32)
    MaskExpander().apply(out, add=[seed])
    return out
