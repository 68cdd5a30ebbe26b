"""A compressed update across the work-pool boundary: the wire message, decoded as in-process."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from fl_components.compression.download import DownloadKind, full_download
from fl_components.compression.encoded import CompressionError
from fl_components.compression.instruction import CompressionInstruction
from fl_components.compression.site import compress_local_update
from fl_components.config import CompressionConfig
from fl_components.exchange import ExchangeError
from fl_components.round.types import JobKind, LocalUpdate, Metrics, SiteJob, SiteResult
from fl_components.wire.site_answer import answer_from_payload, answer_payload

LIKE = [np.zeros((40, 8), dtype=np.float32), np.zeros(8, dtype=np.float32)]


def _update() -> LocalUpdate:
    rng = np.random.default_rng(3)
    delta = [rng.normal(size=p.shape).astype(np.float32) for p in LIKE]
    return LocalUpdate(site="s", round=2, delta=delta, num_examples=7, train_loss=0.5, seconds=0.1)


@pytest.mark.parametrize(
    "config",
    [
        CompressionConfig(method="qsgd", bits=4),
        CompressionConfig(method="top_k", fraction=0.1),
        CompressionConfig(method="random_k", fraction=0.2),
    ],
)
def test_the_encoded_update_travels_and_decodes_as_in_process(
    config: CompressionConfig, tmp_path: Path
) -> None:
    instruction = CompressionInstruction(config, "run", 2)
    decoded, message = compress_local_update(
        _update(), instruction=instruction, site_dir=tmp_path, seed=5
    )
    job = SiteJob(site="s", kind=JobKind.TRAIN, round=2, parameters=LIKE, compression=instruction)
    answer = SiteResult(site="s", update=decoded, upload=message, bytes_up=message.nbytes)

    wire = json.dumps(answer_payload(answer, job=job))
    back = answer_from_payload(json.loads(wire), job=job, size=len(wire))

    assert back.update is not None
    for got, want in zip(back.update.delta, decoded.delta, strict=True):
        np.testing.assert_array_equal(got, want)  # bit for bit the in-process update
    assert back.update.num_examples == 7
    assert back.bytes_up == len(wire)
    # base64 of the message plus a few hundred bytes of JSON, not the float32 arrays
    assert len(wire) < 4 / 3 * message.nbytes + 400 < 4 * 328


def test_a_compressed_update_of_the_wrong_size_is_refused(tmp_path: Path) -> None:
    instruction = CompressionInstruction(CompressionConfig(method="qsgd"), "run", 2)
    decoded, message = compress_local_update(
        _update(), instruction=instruction, site_dir=tmp_path, seed=5
    )
    answer = SiteResult(site="s", update=decoded, upload=message)
    sent = SiteJob(site="s", kind=JobKind.TRAIN, round=2, parameters=LIKE)
    other = SiteJob(site="s", kind=JobKind.TRAIN, round=2, parameters=LIKE[:1])
    with pytest.raises(CompressionError, match="d=328"):
        answer_from_payload(answer_payload(answer, job=sent), job=other, size=1)


def test_the_site_says_which_download_it_used_and_only_one_it_was_sent() -> None:
    full = full_download(LIKE)
    job = SiteJob(site="s", kind=JobKind.EVALUATE, round=1, parameters=LIKE, download=full)
    answer = SiteResult(site="s", evaluation=Metrics(0.1, 0.9, 3), received=DownloadKind.FULL)
    payload = answer_payload(answer, job=job)
    assert payload["received"] == "full"
    assert answer_from_payload(payload, job=job, size=1).received is DownloadKind.FULL
    with pytest.raises(ExchangeError, match="not sent"):
        answer_from_payload({**payload, "received": "delta"}, job=job, size=1)
