"""Why a site refuses a job, or the coordinator an answer: typed, never an error string to parse.

A site checks every job before it touches its data (:mod:`fl_components.wire.signing`, then
:mod:`fl_components.site.policy`); each check that fails raises :class:`RejectedJob` with a
:class:`RejectReason`, which the participant turns into a typed ``rejected`` answer and an
audit-log line. The coordinator checks each sealed answer the same way
(:class:`RejectedAnswer`, :mod:`fl_components.wire.sealed`).
"""

from __future__ import annotations

import enum

from fl_components.errors import FedpipeError


class RejectReason(enum.StrEnum):
    """Why a site refused a job."""

    MALFORMED = "malformed"  # not a signed job of a known type and version
    NOT_ENROLLED = "not_enrolled"  # the site has no pinned coordinator key
    UNKNOWN_KEY = "unknown_key"  # signed by a key the site did not pin
    BAD_SIGNATURE = "bad_signature"  # altered, or signed by another key
    WRONG_SITE = "wrong_site"  # a job for another site
    EXPIRED = "expired"  # past its expiry, or valid for longer than the site allows
    REPLAYED = "replayed"  # a nonce the site has already seen
    MODEL_HASH = "model_hash"  # the model does not hash to what was signed
    CONFIG_HASH = "config_hash"  # the config does not hash to what was signed
    MODEL_LOCATION = "model_location"  # a model path outside the enrolled exchange folder
    POLICY = "policy"  # asks for less than the site's policy allows


class RejectedJob(FedpipeError):
    """A job the site refuses; ``reason`` says which check failed, the message how to fix it.

    Parameters
    ----------
    reason : RejectReason
        The check that failed.
    message : str
        What was wrong (field, value) and what would be accepted.
    """

    def __init__(self, reason: RejectReason, message: str) -> None:
        super().__init__(f"{reason}: {message}")
        self.reason = reason
        self.detail = message

    def __reduce__(self) -> tuple[type[RejectedJob], tuple[RejectReason, str]]:
        return (type(self), (self.reason, self.detail))


class PolicyBreach(RejectedJob):
    """A job that asks for less than the site's policy allows; ``line`` names the policy line.

    Parameters
    ----------
    line : str
        The policy setting broken, as written in the policy file (``privacy.min_noise_multiplier``).
    message : str
        The job's value against the policy's, and what the coordinator must change.
    """

    def __init__(self, line: str, message: str) -> None:
        super().__init__(RejectReason.POLICY, f"policy {line}: {message}")
        self.line = line
        self.message_text = message

    def __reduce__(self) -> tuple[type[PolicyBreach], tuple[str, str]]:  # type: ignore[override]
        return (type(self), (self.line, self.message_text))


class AnswerReason(enum.StrEnum):
    """Why the coordinator refused a site's sealed answer."""

    MALFORMED = "malformed"
    UNKNOWN_SITE = "unknown_site"  # the answer names a site that is not enrolled
    BAD_SIGNATURE = "bad_signature"  # not signed by the enrolled site's key
    WRONG_CONTEXT = "wrong_context"  # another federation, run, round, stage or site
    WRONG_RECIPIENT = "wrong_recipient"  # sealed to another coordinator key
    UNREADABLE = "unreadable"  # AES-GCM authentication failed


class RejectedAnswer(FedpipeError):
    """A site's answer the coordinator refuses; ``reason`` says which check failed."""

    def __init__(self, reason: AnswerReason, message: str) -> None:
        super().__init__(f"{reason}: {message}")
        self.reason = reason
        self.detail = message

    def __reduce__(self) -> tuple[type[RejectedAnswer], tuple[AnswerReason, str]]:
        return (type(self), (self.reason, self.detail))
