"""Exceptions raised by the secure-aggregation protocol.

Protocol after Bonawitz et al. 2017, "Practical Secure Aggregation for Privacy-Preserving
Machine Learning", CCS (arXiv:1611.04482). Every error is a :class:`ProtocolError` so that
the orchestration layer can catch one type at the boundary; subclasses say what went wrong
so that the caller can decide whether the round goes on (a single bad message) or aborts
(too few responses).
"""

from __future__ import annotations


class ProtocolError(Exception):
    """Base class of every secure-aggregation error."""


class UnknownSiteError(ProtocolError):
    """A message names a site that is not in the federation registry."""


class SignatureError(ProtocolError):
    """A message's Ed25519 signature does not verify against the registry's key."""


class ContextMismatchError(ProtocolError):
    """A message belongs to another run or round, or has the wrong shape for this round."""


class MalformedMessageError(ProtocolError):
    """Bytes that cannot be parsed as a secure-aggregation message."""


class ShareDecryptionError(ProtocolError):
    """An encrypted share failed AES-GCM authentication (tampered, replayed or misrouted)."""


class UnsafeRequestError(ProtocolError):
    """An unmask request would make an honest participant reveal too much; it is refused."""


class ThresholdNotMetError(ProtocolError):
    """Fewer than ``threshold`` participants survived or responded; the round must abort."""


class ReconstructionError(ProtocolError):
    """A reconstructed seed does not match the commitment its owner signed."""


class KeyFileError(ProtocolError):
    """A site's key directory is missing, malformed or readable by others."""
