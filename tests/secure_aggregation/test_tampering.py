"""Tampering: each attack is rejected with a precise, logged error; the round goes on or
aborts as the threshold says, and never returns a corrupted sum."""

from __future__ import annotations

import logging
from dataclasses import replace

import numpy as np
import pytest

from fl_components.secure_aggregation.protocol import (
    ContextMismatchError,
    MalformedMessageError,
    MaskedUpdate,
    ReconstructionError,
    Registry,
    SecAggCoordinator,
    SecAggParticipant,
    ShareDecryptionError,
    SignatureError,
    SiteKeys,
    ThresholdNotMetError,
    UnknownSiteError,
    UnmaskRequest,
    UnsafeRequestError,
)

from .federation import Federation, clipped_sum, random_updates, site_keys

D = 32


@pytest.fixture
def fed() -> Federation:
    return Federation.make(5)


def _stage_one(fed: Federation, ctx, updates, skip=()):
    coord = SecAggCoordinator(ctx, fed.registry)
    for s in fed.sites:
        if s not in skip:
            coord.receive(fed.participants[s].mask_update(ctx, updates[s]).to_bytes())
    return coord


def _flip(blob: bytes, index: int) -> bytes:
    raw = bytearray(blob)
    raw[index] ^= 0x01
    return bytes(raw)


def test_flipped_ciphertext_bit_is_rejected_and_round_goes_on(fed, caplog):
    ctx = fed.context(dimension=D, threshold=3)
    updates = random_updates(fed.sites, D, seed=1)
    coord = _stage_one(fed, ctx, updates)
    requests = coord.unmask_requests()
    victim = fed.sites[0]
    bad = requests[victim]
    sender = fed.sites[3]
    tampered = replace(
        bad, ciphertexts={**bad.ciphertexts, sender: _flip(bad.ciphertexts[sender], 20)}
    )
    with pytest.raises(ShareDecryptionError, match=f"from '{sender}' failed AES-GCM"):
        fed.participants[victim].unmask_response(ctx, tampered)
    responses = [
        fed.participants[s].unmask_response(ctx, r) for s, r in requests.items() if s != victim
    ]
    result = coord.finish(responses)  # 4 responses >= t = 3: the round goes on, exactly
    assert np.all(np.abs(result.total - clipped_sum(updates, fed.sites, 1.0)) <= result.error_bound)


def test_flipped_bit_aborts_when_it_leaves_too_few_responses(fed):
    ctx = fed.context(dimension=D, threshold=5)
    coord = _stage_one(fed, ctx, random_updates(fed.sites, D, seed=1))
    requests = coord.unmask_requests()
    victim = fed.sites[1]
    sender, blob = next(iter(requests[victim].ciphertexts.items()))
    tampered = replace(
        requests[victim], ciphertexts={**requests[victim].ciphertexts, sender: _flip(blob, 3)}
    )
    with pytest.raises(ShareDecryptionError):
        fed.participants[victim].unmask_response(ctx, tampered)
    responses = [
        fed.participants[s].unmask_response(ctx, r) for s, r in requests.items() if s != victim
    ]
    with pytest.raises(ThresholdNotMetError, match=r"4 of 5 survivors .* below threshold 5"):
        coord.finish(responses)


@pytest.mark.parametrize("other", [{"round": 2}, {"run_id": "run-2"}])
def test_share_replayed_from_another_round_or_run_is_rejected(fed, other):
    updates = random_updates(fed.sites, D, seed=2)
    old_ctx = fed.context(dimension=D)
    old = _stage_one(fed, old_ctx, updates).unmask_requests()
    ctx = fed.context(dimension=D, **{"round": 1, "run_id": "run-1", **other})
    new = _stage_one(fed, ctx, updates).unmask_requests()
    victim, sender = fed.sites[0], fed.sites[1]
    replayed = replace(
        new[victim],
        ciphertexts={**new[victim].ciphertexts, sender: old[victim].ciphertexts[sender]},
    )
    with pytest.raises(ShareDecryptionError, match="replayed from another run or round"):
        fed.participants[victim].unmask_response(ctx, replayed)


def test_share_routed_to_the_wrong_receiver_is_rejected(fed):
    ctx = fed.context(dimension=D)
    requests = _stage_one(fed, ctx, random_updates(fed.sites, D, seed=2)).unmask_requests()
    a, b, sender = fed.sites[0], fed.sites[1], fed.sites[2]
    misrouted = replace(
        requests[a],
        ciphertexts={**requests[a].ciphertexts, sender: requests[b].ciphertexts[sender]},
    )
    with pytest.raises(ShareDecryptionError):
        fed.participants[a].unmask_response(ctx, misrouted)


def test_message_from_unknown_site_is_rejected_and_logged(fed, caplog):
    ctx = fed.context(dimension=D)
    mallory_keys = SiteKeys.generate()
    wider = Registry({**dict(fed.registry), "mallory": mallory_keys.public()})
    mallory = SecAggParticipant("mallory", mallory_keys, wider)
    wide_ctx = replace(ctx, participants=(*fed.sites, "mallory"))
    coord = SecAggCoordinator(ctx, fed.registry)
    with caplog.at_level(logging.WARNING), pytest.raises(UnknownSiteError, match="'mallory'"):
        coord.receive(mallory.mask_update(wide_ctx, np.zeros(D)).to_bytes())
    assert "rejected message" in caplog.text and "mallory" in caplog.text


def test_message_signed_by_another_key_is_rejected_and_round_goes_on(fed):
    ctx = fed.context(dimension=D, threshold=3)
    updates = random_updates(fed.sites, D, seed=3)
    impostor_keys = SiteKeys.generate()
    victim = fed.sites[4]
    fake_registry = Registry({**dict(fed.registry), victim: impostor_keys.public()})
    impostor = SecAggParticipant(victim, impostor_keys, fake_registry)
    coord = _stage_one(fed, ctx, updates, skip={victim})
    with pytest.raises(SignatureError, match=f"from site '{victim}' does not verify"):
        coord.receive(impostor.mask_update(ctx, np.ones(D)).to_bytes())
    requests = coord.unmask_requests()
    assert victim in requests[fed.sites[0]].dropped
    result = coord.finish(
        [fed.participants[s].unmask_response(ctx, r) for s, r in requests.items()]
    )
    survivors = fed.sites[:4]
    assert np.all(np.abs(result.total - clipped_sum(updates, survivors, 1.0)) <= result.error_bound)
    assert result.stats.rejected_messages == 1


def test_flipped_bit_in_masked_update_breaks_its_signature(fed):
    ctx = fed.context(dimension=D)
    raw = fed.participants[fed.sites[0]].mask_update(ctx, np.zeros(D)).to_bytes()
    coord = SecAggCoordinator(ctx, fed.registry)
    with pytest.raises(SignatureError):
        coord.receive(_flip(raw, len(raw) - 70))  # inside the masked vector


def test_wrong_length_vector_is_rejected(fed):
    ctx = fed.context(dimension=D)
    longer = fed.context(dimension=D + 1)
    coord = SecAggCoordinator(ctx, fed.registry)
    with pytest.raises(ContextMismatchError, match=rf"shape \({D + 1},\).*expects \({D},\)"):
        coord.receive(fed.participants[fed.sites[0]].mask_update(longer, np.zeros(D + 1)))
    with pytest.raises(ContextMismatchError, match=f"expects dimension {D}"):
        fed.participants[fed.sites[0]].mask_update(ctx, np.zeros(D + 1))
    raw = fed.participants[fed.sites[0]].mask_update(ctx, np.zeros(D)).to_bytes()
    with pytest.raises(MalformedMessageError):
        coord.receive(raw[:-100])


def test_masked_update_replayed_from_previous_round_is_rejected(fed):
    old = fed.participants[fed.sites[0]].mask_update(fed.context(dimension=D, round=1), np.zeros(D))
    coord = SecAggCoordinator(fed.context(dimension=D, round=2), fed.registry)
    with pytest.raises(ContextMismatchError, match="round 1, not run 'run-1' round 2"):
        coord.receive(old.to_bytes())


def test_duplicate_masked_update_is_rejected(fed):
    ctx = fed.context(dimension=D)
    coord = SecAggCoordinator(ctx, fed.registry)
    message = fed.participants[fed.sites[0]].mask_update(ctx, np.zeros(D))
    coord.receive(message)
    with pytest.raises(ContextMismatchError, match="second masked update"):
        coord.receive(message)


def test_wrong_share_from_a_participant_aborts_instead_of_corrupting(fed):
    ctx = fed.context(dimension=D, threshold=5)
    coord = _stage_one(fed, ctx, random_updates(fed.sites, D, seed=4))
    requests = coord.unmask_requests()
    responses = [fed.participants[s].unmask_response(ctx, r) for s, r in requests.items()]
    liar = responses[0]
    owner = fed.sites[2]
    forged = replace(liar, self_mask_shares={**liar.self_mask_shares, owner: 12345})
    forged = forged.with_signature(site_keys(liar.sender).sign(forged.signed_payload()))
    with pytest.raises(ReconstructionError, match=f"seed of '{owner}'"):
        coord.finish([forged, *responses[1:]])


def test_wrong_pairwise_seed_aborts_instead_of_corrupting(fed):
    ctx = fed.context(dimension=D, threshold=3)
    coord = _stage_one(fed, ctx, random_updates(fed.sites, D, seed=4), skip={fed.sites[0]})
    requests = coord.unmask_requests()
    responses = [fed.participants[s].unmask_response(ctx, r) for s, r in requests.items()]
    liar = responses[0]
    forged = replace(liar, pairwise_seeds={fed.sites[0]: bytes(32)})
    forged = forged.with_signature(site_keys(liar.sender).sign(forged.signed_payload()))
    with pytest.raises(ReconstructionError, match="pairwise seed"):
        coord.finish([forged, *responses[1:]])


# -- an honest participant never reveals both kinds of share ---------------------------
def _request(fed, ctx, receiver, survivors, dropped) -> UnmaskRequest:
    return UnmaskRequest(
        run_id=ctx.run_id,
        round=ctx.round,
        receiver=receiver,
        survivors=tuple(survivors),
        dropped=tuple(dropped),
        ciphertexts={},
    )


def test_refuses_request_listing_itself_as_dropped(fed):
    ctx = fed.context(dimension=D, threshold=2)
    me = fed.sites[0]
    with pytest.raises(UnsafeRequestError, match="lists this site as dropped"):
        fed.participants[me].unmask_response(ctx, _request(fed, ctx, me, fed.sites[1:], [me]))


def test_refuses_site_in_both_sets(fed):
    ctx = fed.context(dimension=D, threshold=2)
    me, v = fed.sites[0], fed.sites[1]
    with pytest.raises(UnsafeRequestError, match="both survivor and dropped"):
        fed.participants[me].unmask_response(ctx, _request(fed, ctx, me, fed.sites, [v]))


def test_refuses_to_flip_a_dropped_peer_to_survivor_in_the_same_round(fed, tmp_path):
    """A lying coordinator asks first for s_{me,v} (v 'dropped'), then for v's b-share."""
    ctx = fed.context(dimension=D, threshold=2)
    me, v = fed.sites[0], fed.sites[1]
    others = [s for s in fed.sites if s != v]
    participant = SecAggParticipant(me, site_keys(me), fed.registry, state_dir=tmp_path)
    first = participant.unmask_response(ctx, _request(fed, ctx, me, others, [v]))
    assert v in first.pairwise_seeds
    with pytest.raises(UnsafeRequestError, match=f"contradicts an earlier one about \\['{v}'\\]"):
        participant.unmask_response(ctx, _request(fed, ctx, me, fed.sites, []))
    # the memory survives a restart (stage 2 may run in another process)
    restarted = SecAggParticipant(me, site_keys(me), fed.registry, state_dir=tmp_path)
    with pytest.raises(UnsafeRequestError, match="contradicts"):
        restarted.unmask_response(ctx, _request(fed, ctx, me, fed.sites, []))
    # ... and is per round: the next round is a fresh start
    next_round = fed.context(dimension=D, threshold=2, round=2)
    restarted.unmask_response(next_round, _request(fed, next_round, me, fed.sites, []))


def test_refuses_too_few_survivors_and_non_partitions(fed):
    ctx = fed.context(dimension=D, threshold=4)
    me = fed.sites[0]
    with pytest.raises(UnsafeRequestError, match="below threshold 4"):
        fed.participants[me].unmask_response(
            ctx, _request(fed, ctx, me, fed.sites[:3], fed.sites[3:])
        )
    with pytest.raises(UnsafeRequestError, match="partition"):
        fed.participants[me].unmask_response(ctx, _request(fed, ctx, me, fed.sites[:4], []))


def test_edited_copy_of_a_parsed_message_is_rehashed_and_rejected(fed):
    ctx = fed.context(dimension=D)
    raw = fed.participants[fed.sites[0]].mask_update(ctx, np.zeros(D)).to_bytes()
    parsed = MaskedUpdate.from_bytes(raw)
    edited = replace(parsed, masked=np.zeros(D, dtype=np.uint32))
    with pytest.raises(SignatureError):
        SecAggCoordinator(ctx, fed.registry).receive(edited)
