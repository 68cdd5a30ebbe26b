"""A site job's instructions and a site's answer across the work-pool boundary, as JSON.

The coordinator sends the participant flow references and small values only: the global
model (and SCAFFOLD's server control variate) as files in exchange storage named by their
SHA-256, FedProx's μ, the folded evaluation's round. The site answers with one JSON object
per job (:func:`answer_payload`): its update, masked message, unmask response or score,
the folded evaluation under ``"evaluation"``, or a typed refusal (``declined`` /
``bad_data``) that the coordinator reads back as a :class:`~fl_components.round.engine.Dropout`
without parsing any error text. Nothing here is ever unpickled.

A compressed update (``compression`` in the clear) travels as its wire message
(:class:`~fl_components.compression.EncodedUpdate`, base64) under ``"delta"``, decoded at
the coordinator with the same code as in-process (:func:`decode_upload`); with model
deltas the answer says which download the site used under ``"received"``.

Large fields (an update's arrays, a masked update's bytes) may instead name a sealed file
under ``"file"``: the site's ``sink`` writes it, the coordinator's ``source`` opens it
(:mod:`fl_components.wire.answer_files`).
"""

from __future__ import annotations

import base64
import os
from collections.abc import Mapping
from dataclasses import replace
from functools import partial
from typing import Any

import numpy as np

from fl_components.compression.download import DownloadKind
from fl_components.compression.encoded import EncodedUpdate
from fl_components.compression.site import decode_upload
from fl_components.exchange import (
    PAYLOAD_VERSION,
    ExchangeError,
    FieldSink,
    FieldSource,
    check_payload_size,
    metrics_from_payload,
    metrics_payload,
    read_global_model,
    update_from_payload,
    update_payload,
    write_global_model,
)
from fl_components.round.types import (
    Dropout,
    DropoutKind,
    JobKind,
    LocalUpdate,
    MaskedContribution,
    SiteInstructions,
    SiteJob,
    SiteResult,
)

# what a site may say of itself; timeouts and failures are the coordinator's to judge
_SITE_REFUSALS = (DropoutKind.DECLINED, DropoutKind.BAD_DATA, DropoutKind.REJECTED)
# what reading a malformed field raises (a missing key, float(None), float("x"), bad base64)
_MALFORMED = (KeyError, IndexError, TypeError, ValueError, AttributeError, OverflowError)

# a compressed delta's encoding; update_from_payload reads this stand-in for the arrays
ENCODED_DELTA = "fpcu"
_NO_ARRAYS = {"dtype": "float32", "shapes": [[0]], "data": ""}


def compressed_update_payload(answer: SiteResult) -> dict[str, Any]:
    """A training result whose delta travels as the compressed message the site made."""
    if answer.update is None or answer.upload is None:
        raise ExchangeError(f"site {answer.site!r}: no compressed update to send")
    body = update_payload(replace(answer.update, delta=[np.zeros(0, dtype=np.float32)]))
    raw = answer.upload.to_bytes()
    body["delta"] = {"encoding": ENCODED_DELTA, "data": base64.b64encode(raw).decode("ascii")}
    return body


def update_from_answer(
    payload: Mapping[str, Any], *, job: SiteJob, source: FieldSource | None = None
) -> LocalUpdate:
    """The update of a training answer, float32 or compressed (decoded against the model)."""
    delta = payload.get("delta")
    if not (isinstance(delta, Mapping) and delta.get("encoding") == ENCODED_DELTA):
        return update_from_payload(payload, site=job.site, round_num=job.round, source=source)
    if job.parameters is None:
        raise ExchangeError(f"site {job.site!r}: a compressed update needs the job's model")
    update = update_from_payload(
        {**payload, "delta": _NO_ARRAYS}, site=job.site, round_num=job.round
    )
    message = EncodedUpdate.from_bytes(base64.b64decode(delta["data"], validate=True))
    return replace(update, delta=decode_upload(message, like=job.parameters))


def instructions_payload(
    instructions: SiteInstructions, *, exchange: str | os.PathLike[str]
) -> dict[str, Any]:
    """JSON-safe instructions; arrays go to ``exchange`` as files named by their hash."""
    control = None
    if instructions.server_control is not None:
        uri, sha = write_global_model(instructions.server_control, exchange)
        control = {"uri": uri, "sha256": sha}
    return {
        "proximal_mu": float(instructions.proximal_mu),
        "report_initial_loss": bool(instructions.report_initial_loss),
        "server_control": control,
    }


def instructions_from_payload(payload: Mapping[str, Any] | None) -> SiteInstructions:
    """Inverse of :func:`instructions_payload`, verifying any array file by its hash.

    Raises
    ------
    ExchangeError
        If the payload is not a mapping of the fields above.
    """
    if not payload:
        return SiteInstructions()
    try:
        control = payload.get("server_control")
        return SiteInstructions(
            proximal_mu=float(payload.get("proximal_mu", 0.0)),
            report_initial_loss=bool(payload.get("report_initial_loss", False)),
            server_control=(
                read_global_model(str(control["uri"]), sha256=str(control["sha256"]))
                if control
                else None
            ),
        )
    except _MALFORMED as error:
        raise ExchangeError(
            f"site instructions are malformed ({error.__class__.__name__}: {error}); "
            "the coordinator and this site may run different fedpipe versions"
        ) from None


def unmask_payload(response: bytes, *, site: str, round_num: int) -> dict[str, Any]:
    """An unmask response as a JSON-safe mapping."""
    return {
        "stage": "unmask",
        "site": site,
        "round": round_num,
        "response": base64.b64encode(response).decode("ascii"),
    }


def response_from_payload(payload: Mapping[str, Any], *, site: str, round_num: int) -> bytes:
    """Inverse of :func:`unmask_payload`, checking stage, site and round."""
    header = {k: payload.get(k) for k in ("stage", "site", "round")}
    if header != {"stage": "unmask", "site": site, "round": round_num}:
        raise ExchangeError(
            f"site {site!r} round {round_num}: unmask result header {header} does not match"
        )
    return base64.b64decode(payload["response"], validate=True)


def _masked_payload(masked: MaskedContribution, sink: FieldSink | None) -> dict[str, Any]:
    if sink is None or not sink.wants(len(masked.payload)):
        return masked.to_payload()
    body = replace(masked, payload=b"").to_payload()
    body["masked"] = {"file": sink.put("masked", masked.payload)}
    return body


def _body(answer: SiteResult, job: SiteJob, sink: FieldSink | None) -> dict[str, Any]:
    if answer.refusal is not None:
        return {
            "version": PAYLOAD_VERSION,
            "stage": "refusal",
            "site": job.site,
            "round": job.round,
            "kind": str(answer.refusal.kind),
            "reason": answer.refusal.reason,
            "epsilon_spent": answer.refusal.epsilon_spent,
        }
    if job.kind is JobKind.TRAIN and answer.update is not None:
        if answer.upload is not None:
            return compressed_update_payload(answer)
        return update_payload(answer.update, sink=sink)
    if job.kind is JobKind.MASK and isinstance(answer.masked, MaskedContribution):
        return _masked_payload(answer.masked, sink)
    if job.kind is JobKind.UNMASK and answer.unmask_response is not None:
        return unmask_payload(answer.unmask_response, site=job.site, round_num=job.round)
    if job.kind is JobKind.EVALUATE and answer.evaluation is not None:
        return metrics_payload(answer.evaluation, site=job.site, round_num=job.round)
    raise ExchangeError(f"site {job.site!r}: no {job.kind} result to send")


def answer_payload(
    answer: SiteResult, *, job: SiteJob, sink: FieldSink | None = None
) -> dict[str, Any]:
    """The site's answer to ``job`` as one JSON-safe mapping (folded evaluation included).

    With a ``sink``, its large fields go to sealed files the mapping names.
    """
    body = _body(answer, job, sink)
    if job.kind is not JobKind.EVALUATE and answer.evaluation is not None:
        body["evaluation"] = metrics_payload(
            answer.evaluation, site=job.site, round_num=int(job.evaluate_round or 0)
        )
    if answer.received is not None:
        body["received"] = answer.received.name.lower()
    return body


def _refusal(payload: Mapping[str, Any], job: SiteJob) -> Dropout:
    header = {k: payload.get(k) for k in ("version", "site", "round")}
    if header != {"version": PAYLOAD_VERSION, "site": job.site, "round": job.round}:
        raise ExchangeError(f"site {job.site!r} round {job.round}: refusal header {header}")
    raw_kind = payload.get("kind")
    try:
        kind = DropoutKind(raw_kind) if isinstance(raw_kind, str) else DropoutKind.FAILED
    except ValueError:
        kind = DropoutKind.FAILED
    if kind not in _SITE_REFUSALS:
        raise ExchangeError(f"site {job.site!r}: a site cannot report a {kind!r} refusal")
    spent = payload.get("epsilon_spent")
    return Dropout(
        job.site,
        kind,
        str(payload.get("reason", ""))[:2000],
        epsilon_spent=float(spent) if isinstance(spent, int | float) else None,
    )


def answer_from_payload(
    payload: Mapping[str, Any], *, job: SiteJob, size: int, source: FieldSource | None = None
) -> SiteResult:
    """Inverse of :func:`answer_payload`, checking stage, site and round of every part.

    ``size`` is the payload's size on the wire (bytes up); the caller parses the JSON with
    :func:`fl_components.exchange.parse_json_payload`, which bounds it before parsing.
    ``source`` opens the fields the site sent as sealed files (none are read without it).

    Raises
    ------
    ExchangeError
        If the payload is too large, malformed, or not the answer ``job`` asked for.
    """
    check_payload_size(size, what=f"site {job.site!r} round {job.round} answer")
    if not isinstance(payload, Mapping):
        raise ExchangeError(f"site {job.site!r}: result is a {type(payload).__name__}")
    try:
        return _answer(payload, job=job, size=size, source=source)
    except _MALFORMED as error:
        raise ExchangeError(
            f"site {job.site!r} round {job.round}: malformed {job.kind} answer "
            f"({error.__class__.__name__}: {error}); discarded"
        ) from None


def _masked(
    body: Mapping[str, Any], *, job: SiteJob, source: FieldSource | None
) -> MaskedContribution:
    field = body.get("masked")
    if not isinstance(field, Mapping):
        return MaskedContribution.from_payload(body, site=job.site, round_num=job.round)
    if source is None:
        raise ExchangeError(f"site {job.site!r}: its masked update names a file none can read")
    masked = MaskedContribution.from_payload(
        {**body, "masked": ""}, site=job.site, round_num=job.round
    )
    # the buffer itself (no copy): secure aggregation reads it as bytes once, then drops it
    return replace(masked, payload=source.take(field.get("file"), "masked"))


def _answer(
    payload: Mapping[str, Any], *, job: SiteJob, size: int, source: FieldSource | None
) -> SiteResult:
    body = dict(payload)
    folded = body.pop("evaluation", None)
    evaluation = None
    if folded is not None and job.evaluate_round is not None:
        evaluation = metrics_from_payload(folded, site=job.site, round_num=job.evaluate_round)
    received = _received(body.pop("received", None), job)
    result = partial(
        SiteResult, site=job.site, evaluation=evaluation, bytes_up=size, received=received
    )
    if body.get("stage") == "refusal":
        return result(refusal=_refusal(body, job))
    if job.kind is JobKind.TRAIN:
        return result(update=update_from_answer(body, job=job, source=source))
    if job.kind is JobKind.MASK:
        return result(masked=_masked(body, job=job, source=source))
    if job.kind is JobKind.UNMASK:
        response = response_from_payload(body, site=job.site, round_num=job.round)
        return result(unmask_response=response)
    scores = metrics_from_payload(body, site=job.site, round_num=job.round)
    return SiteResult(site=job.site, evaluation=scores, bytes_up=size, received=received)


def _received(value: object, job: SiteJob) -> DownloadKind | None:
    """Which model download the site says it used: only for a job that carried one."""
    if value is None or job.download is None:
        return None
    if value not in ("delta", "full"):
        raise ExchangeError(f"site {job.site!r}: unknown model download {value!r}")
    kind = DownloadKind[str(value).upper()]
    if kind is DownloadKind.DELTA and job.download.kind is not DownloadKind.DELTA:
        raise ExchangeError(f"site {job.site!r}: says it used a delta it was not sent")
    return kind
