"""Model download: deltas against the held model, verified by hash; full model otherwise."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from fl_components.compression.download import (
    DownloadKind,
    ModelDownload,
    apply_download,
    download_for,
    next_broadcast,
)
from fl_components.compression.encoded import CompressionError
from fl_components.exchange import ExchangeError, read_model_download, write_model_download
from fl_components.parameters import digest

LIKE = [np.zeros((3, 4), dtype=np.float32), np.zeros(4, dtype=np.float32)]


def _model(seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.normal(size=p.shape).astype(np.float32) for p in LIKE]


def _rounds(bits: int | None, count: int = 4) -> list:
    broadcasts, previous = [], None
    for r in range(count):
        b = next_broadcast(_model(r), previous=previous, bits=bits, rng=np.random.default_rng(r))
        broadcasts.append(b)
        previous = b.model
    return broadcasts


def test_first_round_is_full_and_exact() -> None:
    (first,) = _rounds(None, 1)
    download = download_for(first, site_sha=None)
    assert download.kind == DownloadKind.FULL
    model = apply_download(ModelDownload.from_bytes(download.to_bytes()), held=None, like=LIKE)
    assert digest(model) == digest(_model(0))
    assert download.nbytes == len(download.to_bytes()) == 70 + 28 + 16 * 4


@pytest.mark.parametrize("bits", [None, 8, 4])
def test_a_site_following_every_round_holds_the_broadcast(bits: int | None) -> None:
    held = None
    for broadcast in _rounds(bits):
        site_sha = digest(held) if held is not None else None
        download = download_for(broadcast, site_sha=site_sha)
        assert download.kind == (DownloadKind.FULL if held is None else DownloadKind.DELTA)
        held = apply_download(ModelDownload.from_bytes(download.to_bytes()), held=held, like=LIKE)
        assert digest(held) == broadcast.sha
    # Quantized deltas carry their error forward: B_r tracks G_r within one level.
    tolerance = 1e-6 if bits is None else 4.0 / (2 ** (bits - 1) - 1)
    for got, want in zip(held, _model(3), strict=True):
        np.testing.assert_allclose(got, want, atol=tolerance)


def test_quantized_delta_is_smaller() -> None:
    broadcast = _rounds(8, 2)[1]
    delta = download_for(broadcast, site_sha=broadcast.previous_sha)
    full = download_for(broadcast, site_sha=None)
    assert delta.nbytes == 70 + 28 + 4 + 16 and full.nbytes == 70 + 28 + 64


def test_a_site_that_missed_rounds_gets_the_full_model() -> None:
    broadcasts = _rounds(8)
    stale = broadcasts[1].model  # missed round 2
    download = download_for(broadcasts[3], site_sha=digest(stale))
    assert download.kind == DownloadKind.FULL
    assert digest(apply_download(download, held=stale, like=LIKE)) == broadcasts[3].sha


def test_delta_on_the_wrong_base_or_a_corrupt_result_is_refused() -> None:
    broadcasts = _rounds(None, 3)
    delta = download_for(broadcasts[2], site_sha=broadcasts[2].previous_sha)
    with pytest.raises(CompressionError, match="full model"):
        apply_download(delta, held=broadcasts[0].model, like=LIKE)
    raw = bytearray(delta.to_bytes())
    raw[-1] ^= 0x40  # flip a bit of the last float
    with pytest.raises(CompressionError, match="refusing"):
        apply_download(ModelDownload.from_bytes(bytes(raw)), held=broadcasts[1].model, like=LIKE)


def test_exchange_round_trip_through_a_file(tmp_path: Path) -> None:
    broadcasts = _rounds(8, 2)
    delta = download_for(broadcasts[1], site_sha=broadcasts[1].previous_sha)
    path, size = write_model_download(delta, tmp_path)
    assert size == len(Path(path).read_bytes()) == delta.nbytes
    model = read_model_download(path, sha256=broadcasts[1].sha, held=broadcasts[0].model, like=LIKE)
    assert digest(model) == broadcasts[1].sha
    with pytest.raises(ExchangeError, match="reference"):
        read_model_download(path, sha256="0" * 64, held=broadcasts[0].model, like=LIKE)
