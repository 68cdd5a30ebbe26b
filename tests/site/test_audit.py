"""The site's audit log, played by someone covering their tracks: every edit is found, by line."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from fl_components.site.audit import AuditChainError, AuditKind, AuditLog, verify_chain

NOW = datetime(2026, 12, 2, 10, 0, tzinfo=UTC)


@pytest.fixture
def log(tmp_path: Path) -> AuditLog:
    audit = AuditLog.in_folder(tmp_path / "site-a")
    audit.path.parent.mkdir(parents=True)
    audit.append(AuditKind.RECEIVED, {"job": "n1", "stage": "mask", "round": 1}, now=NOW)
    audit.append(AuditKind.ACCEPTED, {"job": "n1", "stage": "mask", "round": 1}, now=NOW)
    audit.append(AuditKind.CHARGED, {"epsilon": 0.41, "round": 1}, now=NOW)
    audit.append(AuditKind.RELEASED, {"bytes": 2048, "sha256": "ab" * 32}, now=NOW)
    audit.append(AuditKind.REFUSED, {"job": "n2", "reason": "replayed"}, now=NOW)
    return audit


def _lines(log: AuditLog) -> list[str]:
    return log.path.read_text().splitlines(keepends=True)


def _broken_at(log: AuditLog) -> int:
    with pytest.raises(AuditChainError) as caught:
        list(verify_chain(log.path))
    assert caught.value.line is not None
    return caught.value.line


def test_an_untouched_log_verifies(log) -> None:
    entries = list(log.entries())
    assert [e.seq for e in entries] == [1, 2, 3, 4, 5]
    assert [e.kind for e in entries][:2] == [AuditKind.RECEIVED, AuditKind.ACCEPTED]
    assert entries[1].prev == entries[0].hash


def test_an_edited_line_is_named(log) -> None:
    lines = _lines(log)
    raw = json.loads(lines[2])
    raw["details"]["epsilon"] = 0.01  # under-report what was charged
    lines[2] = json.dumps(raw, sort_keys=True, separators=(",", ":")) + "\n"
    log.path.write_text("".join(lines))
    assert _broken_at(log) == 3


def test_an_edited_line_with_its_hash_recomputed_breaks_the_next(log) -> None:
    from fl_components.site.audit import _entry_hash

    lines = _lines(log)
    raw = json.loads(lines[1])
    raw["kind"] = "refused"
    raw["hash"] = _entry_hash({k: raw[k] for k in ("seq", "time", "kind", "details", "prev")})
    lines[1] = json.dumps(raw, sort_keys=True, separators=(",", ":")) + "\n"
    log.path.write_text("".join(lines))
    assert _broken_at(log) == 3


def test_a_removed_line_is_named(log) -> None:
    lines = _lines(log)
    del lines[3]  # hide a release
    log.path.write_text("".join(lines))
    assert _broken_at(log) == 4


def test_reordered_lines_are_named(log) -> None:
    lines = _lines(log)
    lines[1], lines[2] = lines[2], lines[1]
    log.path.write_text("".join(lines))
    assert _broken_at(log) == 2


def test_lines_cut_from_the_end_are_found(log) -> None:
    lines = _lines(log)
    log.path.write_text("".join(lines[:-1]))  # drop the refusal
    assert _broken_at(log) == 5


def test_garbage_is_named(log) -> None:
    with open(log.path, "a") as handle:
        handle.write("not json\n")
    assert _broken_at(log) == 6


def test_appending_after_a_reopen_continues_the_chain(log) -> None:
    again = AuditLog(log.path)
    entry = again.append(AuditKind.APPROVAL, {"steward": "dr-x"}, now=NOW)
    assert entry.seq == 6
    assert [e.seq for e in verify_chain(log.path)] == [1, 2, 3, 4, 5, 6]


def test_rounds_today_counts_accepted_training_jobs_of_the_last_day(tmp_path: Path) -> None:
    audit = AuditLog.in_folder(tmp_path)
    audit.append(AuditKind.ACCEPTED, {"stage": "mask"}, now=NOW - timedelta(days=2))
    audit.append(AuditKind.ACCEPTED, {"stage": "mask"}, now=NOW - timedelta(hours=3))
    audit.append(AuditKind.ACCEPTED, {"stage": "train"}, now=NOW - timedelta(hours=1))
    audit.append(AuditKind.ACCEPTED, {"stage": "evaluate"}, now=NOW)
    audit.append(AuditKind.REFUSED, {"stage": "mask"}, now=NOW)
    assert audit.rounds_today(now=NOW) == 2
