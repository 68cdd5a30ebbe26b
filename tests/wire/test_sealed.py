"""Sealed answers, played by an attacker: other sites and storage readers see only ciphertext."""

from __future__ import annotations

import base64
import json

import pytest
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from fl_components.secure_aggregation.protocol.keys import Registry, SiteKeys
from fl_components.wire import sealed as sealing
from fl_components.wire.rejection import AnswerReason, RejectedAnswer
from fl_components.wire.sealed import AnswerContext, SealedAnswer, open_answer, seal
from fl_components.wire.signing import CoordinatorIdentity

ANSWER = json.dumps({"delta": [0.125, -0.5, 3.0], "num_examples": 812}).encode()


@pytest.fixture
def coordinator() -> CoordinatorIdentity:
    return CoordinatorIdentity.generate()


@pytest.fixture
def sites() -> dict[str, SiteKeys]:
    return {name: SiteKeys.generate() for name in ("site-a", "site-b", "site-c")}


@pytest.fixture
def registry(sites: dict[str, SiteKeys]) -> Registry:
    return Registry({name: keys.public() for name, keys in sites.items()})


def _context(**changes: object) -> AnswerContext:
    values: dict[str, object] = {
        "federation": "fed",
        "run_id": "run-1",
        "round": 2,
        "stage": "mask",
        "site": "site-a",
    }
    values.update(changes)
    return AnswerContext.model_validate(values)


def _stored(answer: SealedAnswer) -> SealedAnswer:
    """As the coordinator reads it back from result storage (JSON)."""
    return SealedAnswer.model_validate_json(answer.model_dump_json())


def _reason(call) -> AnswerReason:  # type: ignore[no-untyped-def]
    with pytest.raises(RejectedAnswer) as caught:
        call()
    return caught.value.reason


def test_the_coordinator_opens_what_the_enrolled_site_sealed(coordinator, sites, registry) -> None:
    answer = _stored(
        seal(ANSWER, context=_context(), recipient=coordinator.public, sender=sites["site-a"])
    )
    assert (
        open_answer(answer, expected=_context(), identity=coordinator, registry=registry) == ANSWER
    )


def test_storage_holds_ciphertext_only(coordinator, sites) -> None:
    answer = seal(ANSWER, context=_context(), recipient=coordinator.public, sender=sites["site-a"])
    stored = answer.model_dump_json().encode()
    assert b"812" not in base64.b64decode(answer.ciphertext)
    assert b"num_examples" not in stored and b"delta" not in stored
    # two seals of the same answer share nothing (fresh ephemeral key and nonce)
    again = seal(ANSWER, context=_context(), recipient=coordinator.public, sender=sites["site-a"])
    assert again.ciphertext != answer.ciphertext and again.ephemeral != answer.ephemeral


def test_another_sites_keys_cannot_read_the_answer(coordinator, sites, registry) -> None:
    answer = seal(ANSWER, context=_context(), recipient=coordinator.public, sender=sites["site-a"])
    # site-b, holding its own long-term keys, runs the coordinator's side of the opening
    as_b = CoordinatorIdentity(sites["site-b"])
    reason = _reason(
        lambda: open_answer(answer, expected=_context(), identity=as_b, registry=registry)
    )
    assert reason is AnswerReason.WRONG_RECIPIENT
    # and the cryptography itself: the key site-b derives does not open the ciphertext
    ephemeral = base64.b64decode(answer.ephemeral)
    shared = sites["site-b"].x25519.exchange(X25519PublicKey.from_public_bytes(ephemeral))
    key = sealing._key(
        shared, context=_context(), ephemeral=ephemeral, recipient=sites["site-b"].public().x25519
    )
    with pytest.raises(InvalidTag):
        AESGCM(key).decrypt(
            base64.b64decode(answer.nonce),
            base64.b64decode(answer.ciphertext),
            sealing._associated_data(_context(), answer.recipient_key_id),
        )


def test_an_answer_not_signed_by_the_enrolled_site_is_refused(coordinator, sites, registry) -> None:
    # site-b seals an answer claiming to be site-a's
    forged = seal(ANSWER, context=_context(), recipient=coordinator.public, sender=sites["site-b"])
    reason = _reason(
        lambda: open_answer(forged, expected=_context(), identity=coordinator, registry=registry)
    )
    assert reason is AnswerReason.BAD_SIGNATURE
    # an outsider with fresh keys, site not enrolled
    outsider = seal(
        ANSWER,
        context=_context(site="site-z"),
        recipient=coordinator.public,
        sender=SiteKeys.generate(),
    )
    reason = _reason(
        lambda: open_answer(
            outsider, expected=_context(site="site-z"), identity=coordinator, registry=registry
        )
    )
    assert reason is AnswerReason.UNKNOWN_SITE


@pytest.mark.parametrize(
    "moved",
    [
        {"run_id": "run-0"},
        {"round": 1},
        {"stage": "train"},
        {"site": "site-b"},
        {"federation": "x"},
    ],
)
def test_an_answer_from_another_context_is_refused(coordinator, sites, registry, moved) -> None:
    answer = seal(ANSWER, context=_context(), recipient=coordinator.public, sender=sites["site-a"])
    expected = _context(**moved)
    reason = _reason(
        lambda: open_answer(answer, expected=expected, identity=coordinator, registry=registry)
    )
    assert reason is AnswerReason.WRONG_CONTEXT


def test_relabelling_the_context_breaks_the_signature(coordinator, sites, registry) -> None:
    answer = seal(ANSWER, context=_context(), recipient=coordinator.public, sender=sites["site-a"])
    raw = json.loads(answer.model_dump_json())
    raw["context"]["round"] = 3  # replayed into the next round
    moved = SealedAnswer.model_validate(raw)
    reason = _reason(
        lambda: open_answer(
            moved, expected=_context(round=3), identity=coordinator, registry=registry
        )
    )
    assert reason is AnswerReason.BAD_SIGNATURE


def test_the_context_is_bound_into_the_encryption(coordinator, sites, registry) -> None:
    # even re-signed by the genuine site, a sealed answer moved to another round stays shut
    answer = seal(ANSWER, context=_context(), recipient=coordinator.public, sender=sites["site-a"])
    moved = answer.model_copy(update={"context": _context(round=3), "signature": ""})
    resigned = moved.model_copy(
        update={"signature": base64.b64encode(sites["site-a"].sign(moved.signed_bytes())).decode()}
    )
    reason = _reason(
        lambda: open_answer(
            resigned, expected=_context(round=3), identity=coordinator, registry=registry
        )
    )
    assert reason is AnswerReason.UNREADABLE


def test_a_flipped_ciphertext_bit_is_refused(coordinator, sites, registry) -> None:
    answer = seal(ANSWER, context=_context(), recipient=coordinator.public, sender=sites["site-a"])
    raw = bytearray(base64.b64decode(answer.ciphertext))
    raw[0] ^= 1
    flipped = answer.model_copy(update={"ciphertext": base64.b64encode(bytes(raw)).decode()})
    reason = _reason(
        lambda: open_answer(flipped, expected=_context(), identity=coordinator, registry=registry)
    )
    assert reason is AnswerReason.BAD_SIGNATURE  # the site's signature covers the ciphertext
    resigned = flipped.model_copy(
        update={
            "signature": base64.b64encode(sites["site-a"].sign(flipped.signed_bytes())).decode()
        }
    )
    reason = _reason(
        lambda: open_answer(resigned, expected=_context(), identity=coordinator, registry=registry)
    )
    assert reason is AnswerReason.UNREADABLE


def test_an_answer_sealed_to_a_rotated_out_key_says_so(sites, registry) -> None:
    old, new = CoordinatorIdentity.generate(), CoordinatorIdentity.generate()
    answer = seal(ANSWER, context=_context(), recipient=old.public, sender=sites["site-a"])
    reason = _reason(
        lambda: open_answer(answer, expected=_context(), identity=new, registry=registry)
    )
    assert reason is AnswerReason.WRONG_RECIPIENT
