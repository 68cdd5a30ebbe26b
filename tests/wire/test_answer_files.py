"""A site's large answer fields as sealed files, played by an attacker with the exchange folder.

Storage readers and other sites see only ciphertext; a file altered, truncated, swapped
into another answer, field, run or round, or named by a path out of the folder, is refused;
the coordinator never allocates more than the model's size allows, and removes what it read.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from fl_components.exchange import ExchangeError, decode_arrays, encode_arrays
from fl_components.round.types import (
    JobKind,
    LocalUpdate,
    MaskedContribution,
    SiteJob,
    SiteResult,
)
from fl_components.wire import answer_files
from fl_components.wire.answer_files import (
    AnswerFileSink,
    AnswerFileSource,
    answers_folder,
    file_limit,
    file_threshold,
)
from fl_components.wire.rejection import AnswerReason, RejectedAnswer
from fl_components.wire.sealed import AnswerContext
from fl_components.wire.site_answer import answer_from_payload, answer_payload

RNG = np.random.default_rng(7)
ARRAYS = [
    RNG.standard_normal((300, 40)).astype(np.float32),
    RNG.standard_normal(40).astype(np.float32),
]
VALUES = sum(a.size for a in ARRAYS)


def _context(**changes: object) -> AnswerContext:
    values: dict[str, object] = {
        "federation": "fed",
        "run_id": "run-1",
        "round": 2,
        "stage": "train",
        "site": "site-a",
    }
    values.update(changes)
    return AnswerContext.model_validate(values)


def _sink(folder: Path, **changes: object) -> AnswerFileSink:
    return AnswerFileSink(folder, context=_context(**changes), threshold=0)


def _source(folder: Path, *, limit: int | None = None, **changes: object) -> AnswerFileSource:
    return AnswerFileSource(
        folder, context=_context(**changes), limit=file_limit(VALUES) if limit is None else limit
    )


def _reason(call) -> AnswerReason:  # type: ignore[no-untyped-def]
    with pytest.raises(RejectedAnswer) as caught:
        call()
    return caught.value.reason


def test_arrays_cross_as_a_sealed_file_and_come_back_exact(tmp_path: Path) -> None:
    sink = _sink(tmp_path)
    encoded = encode_arrays(ARRAYS, sink=sink)
    assert "data" not in encoded  # nothing inline: the JSON names the file
    (written,) = tmp_path.iterdir()
    raw = written.read_bytes()
    # the file is ciphertext: no tensor's bytes, no safetensors header in it
    assert ARRAYS[0][:4].tobytes() not in raw and b"F32" not in raw and b"p00000" not in raw

    source = _source(tmp_path)
    back = decode_arrays(json.loads(json.dumps(encoded)), source=source)

    assert all(np.array_equal(a, b) for a, b in zip(back, ARRAYS, strict=True))
    assert source.taken == len(raw)
    assert list(tmp_path.iterdir()) == []  # read once, then removed


def test_a_small_field_stays_inline(tmp_path: Path) -> None:
    sink = AnswerFileSink(tmp_path, context=_context(), threshold=10**9)
    encoded = encode_arrays(ARRAYS, sink=sink)
    assert "data" in encoded and "file" not in encoded
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("where", ["first", "middle", "tag-area"])
def test_a_byte_altered_in_storage_is_refused(tmp_path: Path, where: str) -> None:
    encoded = encode_arrays(ARRAYS, sink=_sink(tmp_path))
    path = tmp_path / encoded["file"]["file"]
    raw = bytearray(path.read_bytes())
    raw[{"first": 0, "middle": len(raw) // 2, "tag-area": len(raw) - 1}[where]] ^= 1
    path.write_bytes(bytes(raw))

    assert _reason(lambda: decode_arrays(encoded, source=_source(tmp_path))) is (
        AnswerReason.UNREADABLE
    )
    assert not path.exists()  # discarded


def test_a_truncated_or_grown_file_is_refused_unread(tmp_path: Path) -> None:
    encoded = encode_arrays(ARRAYS, sink=_sink(tmp_path))
    path = tmp_path / encoded["file"]["file"]
    path.write_bytes(path.read_bytes()[:-5])
    assert _reason(lambda: decode_arrays(encoded, source=_source(tmp_path))) is (
        AnswerReason.UNREADABLE
    )


@pytest.mark.parametrize(
    "elsewhere",
    [{"round": 3}, {"run_id": "run-2"}, {"site": "site-b"}, {"stage": "mask"}, {"federation": "x"}],
)
def test_a_file_moved_into_another_answer_does_not_open(
    tmp_path: Path, elsewhere: dict[str, object]
) -> None:
    """Another site (or storage) copies a genuine file and its reference into another context."""
    encoded = encode_arrays(ARRAYS, sink=_sink(tmp_path))
    source = _source(tmp_path, **elsewhere)
    assert _reason(lambda: decode_arrays(encoded, source=source)) is AnswerReason.UNREADABLE


def test_a_file_swapped_into_another_field_does_not_open(tmp_path: Path) -> None:
    encoded = encode_arrays(ARRAYS, sink=_sink(tmp_path), field="delta")
    source = _source(tmp_path)
    assert _reason(lambda: decode_arrays(encoded, source=source, field="control_delta")) is (
        AnswerReason.UNREADABLE
    )


@pytest.mark.parametrize(
    "name", ["../../etc/passwd", "/etc/passwd", "x.fpsealed", "0" * 32 + ".safetensors"]
)
def test_a_reference_naming_a_path_is_refused_before_any_read(tmp_path: Path, name: str) -> None:
    encoded = encode_arrays(ARRAYS, sink=_sink(tmp_path))
    encoded["file"]["file"] = name
    assert _reason(lambda: decode_arrays(encoded, source=_source(tmp_path))) is (
        AnswerReason.MALFORMED
    )


def _planted(tmp_path: Path, plant) -> dict:  # type: ignore[no-untyped-def,type-arg]
    """A genuine answer whose file another party replaced with what ``plant`` makes."""
    encoded = encode_arrays(ARRAYS, sink=_sink(tmp_path))
    path = tmp_path / encoded["file"]["file"]
    path.unlink()
    plant(path)
    return encoded


def test_a_symbolic_link_in_place_of_the_file_is_never_followed(tmp_path: Path) -> None:
    """A link to a file of the right size elsewhere: refused without reading its target."""
    secret = tmp_path.parent / f"{tmp_path.name}-secret"
    secret.write_bytes(b"s" * (4 * VALUES + 1024))
    encoded = encode_arrays(ARRAYS, sink=_sink(tmp_path))
    path = tmp_path / encoded["file"]["file"]
    secret.write_bytes(b"s" * path.stat().st_size)
    path.unlink()
    path.symlink_to(secret)
    with pytest.raises(RejectedAnswer, match="cannot be opened as a plain file"):
        decode_arrays(encoded, source=_source(tmp_path))
    assert secret.exists() and not path.is_symlink()  # the link removed, its target kept


def test_a_fifo_in_place_of_the_file_is_refused_without_waiting(tmp_path: Path) -> None:
    """A named pipe would block a plain open() forever: the coordinator never waits on it."""
    encoded = _planted(tmp_path, os.mkfifo)
    with pytest.raises(RejectedAnswer, match="not a regular file"):
        decode_arrays(encoded, source=_source(tmp_path))


def test_a_folder_in_place_of_the_file_is_refused(tmp_path: Path) -> None:
    encoded = _planted(tmp_path, Path.mkdir)
    assert _reason(lambda: decode_arrays(encoded, source=_source(tmp_path))) is (
        AnswerReason.UNREADABLE
    )


def test_a_file_larger_than_the_model_allows_is_refused_unread(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    encoded = encode_arrays(ARRAYS, sink=_sink(tmp_path))
    opened: list[Path] = []
    monkeypatch.setattr(answer_files, "_decrypt", lambda path, *a, **k: opened.append(path))
    source = _source(tmp_path, limit=100)
    with pytest.raises(RejectedAnswer, match="above the 100 bytes"):
        decode_arrays(encoded, source=source)
    assert opened == []


def test_a_missing_file_names_the_shared_storage_fix(tmp_path: Path) -> None:
    encoded = encode_arrays(ARRAYS, sink=_sink(tmp_path / "site-view"))
    with pytest.raises(RejectedAnswer, match="same exchange storage at the same path"):
        decode_arrays(encoded, source=_source(tmp_path / "coordinator-view"))


def test_a_file_reference_without_a_source_is_refused(tmp_path: Path) -> None:
    encoded = encode_arrays(ARRAYS, sink=_sink(tmp_path))
    with pytest.raises(ExchangeError, match="names a file"):
        decode_arrays(encoded)


def test_stated_shapes_must_match_the_files(tmp_path: Path) -> None:
    encoded = encode_arrays(ARRAYS, sink=_sink(tmp_path))
    encoded["shapes"] = [[40, 300], [40]]
    with pytest.raises(ExchangeError, match="holds shapes"):
        decode_arrays(encoded, source=_source(tmp_path))


@pytest.mark.parametrize("run_id", ["..", ".", "../x", "a/b", "", "-x"])
def test_a_run_id_that_is_not_one_plain_name_gets_no_folder(run_id: str) -> None:
    assert answers_folder("/exchange", run_id, "site-a") is None


@pytest.mark.parametrize("site", ["..", "../site-b", "a/b", "", "Site"])
def test_a_site_name_that_is_not_one_plain_name_gets_no_folder(site: str) -> None:
    assert answers_folder("/exchange", "run-1", site) is None


def test_each_site_gets_its_own_folder_of_the_run_inside_the_exchange() -> None:
    assert answers_folder("/exchange", "6f1c-2e.a_b", "site-a") == Path(
        "/exchange/6f1c-2e.a_b/answers/site-a"
    )


def test_a_site_cannot_name_another_sites_file(tmp_path: Path) -> None:
    """Site b's answer names site a's genuine file: the coordinator looks only in b's
    folder, so it never opens (nor removes) a's file, and a's answer still opens."""
    a_folder, b_folder = tmp_path / "site-a", tmp_path / "site-b"
    genuine = encode_arrays(ARRAYS, sink=_sink(a_folder))
    stolen = {**genuine, "file": dict(genuine["file"])}
    with pytest.raises(RejectedAnswer, match="not in the exchange folder"):
        decode_arrays(stolen, source=_source(b_folder, site="site-b"))
    back = decode_arrays(genuine, source=_source(a_folder))
    assert np.array_equal(back[1], ARRAYS[1])


def test_an_unwritable_folder_falls_back_to_inline(tmp_path: Path) -> None:
    blocker = tmp_path / "run"
    blocker.write_text("a file where the folder would go")
    sink = AnswerFileSink(blocker / "answers", context=_context(), threshold=0)
    assert "data" in encode_arrays(ARRAYS, sink=sink)


def test_the_threshold_is_the_sites_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FEDPIPE_ANSWER_FILE_BYTES", "4096")
    assert file_threshold() == 4096
    monkeypatch.setenv("FEDPIPE_ANSWER_FILE_BYTES", "a lot")
    with pytest.raises(ExchangeError, match="FEDPIPE_ANSWER_FILE_BYTES must be a number"):
        file_threshold()


def test_a_training_answer_with_a_control_variate_round_trips(tmp_path: Path) -> None:
    job = SiteJob(site="site-a", kind=JobKind.TRAIN, round=2, parameters=ARRAYS)
    update = LocalUpdate(
        site="site-a",
        round=2,
        delta=ARRAYS,
        num_examples=90,
        train_loss=0.5,
        seconds=1.0,
        control_delta=[-a for a in ARRAYS],
    )
    sink = _sink(tmp_path)
    payload = answer_payload(SiteResult(site="site-a", update=update), job=job, sink=sink)
    assert len(sink.written) == 2 and len(json.dumps(payload)) < 4096

    answer = answer_from_payload(
        json.loads(json.dumps(payload)), job=job, size=1, source=_source(tmp_path)
    )

    assert answer.update is not None and answer.update.control_delta is not None
    assert all(np.array_equal(a, b) for a, b in zip(answer.update.delta, ARRAYS, strict=True))
    assert np.array_equal(answer.update.control_delta[0], -ARRAYS[0])


def test_a_masked_update_round_trips(tmp_path: Path) -> None:
    job = SiteJob(site="site-a", kind=JobKind.MASK, round=2, parameters=ARRAYS)
    masked = MaskedContribution(
        site="site-a",
        round=2,
        num_examples=9,
        train_loss=0.1,
        seconds=1.0,
        payload=bytes(range(256)) * 40,
    )
    sink = _sink(tmp_path, stage="mask")
    payload = answer_payload(SiteResult(site="site-a", masked=masked), job=job, sink=sink)
    assert isinstance(payload["masked"], dict)

    answer = answer_from_payload(payload, job=job, size=1, source=_source(tmp_path, stage="mask"))

    assert answer.masked is not None and bytes(answer.masked.payload) == masked.payload


def test_discard_removes_what_an_unsent_answer_wrote(tmp_path: Path) -> None:
    sink = _sink(tmp_path)
    encode_arrays(ARRAYS, sink=sink)
    sink.discard()
    assert list(tmp_path.iterdir()) == []
