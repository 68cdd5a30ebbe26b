"""The site's audit trail: an append-only, hash-chained JSON-lines log in its folder.

Every job the site receives (and whether it was accepted or refused, and why), what left
the site (sizes and hashes of what it sent), the epsilon charged and every approval is one
line. Each line holds the SHA-256 of the line before it (``prev``) and its own hash over
its canonical JSON without the ``hash`` field, as in a hash chain (Haber & Stornetta 1991,
"How to time-stamp a digital document", J. Cryptology 3(2)): editing, removing or
reordering a line breaks the chain at that line, and :func:`verify_chain` names it. A head
file beside the log (``audit.head``: the last sequence number and hash) also reveals lines
cut from the end. The chain shows tampering to whoever checks it; it does not stop someone
who can rewrite the whole file and its head (that needs the log shipped off the host).
"""

from __future__ import annotations

import enum
import hashlib
import json
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from fl_components.errors import FedpipeError
from fl_components.privacy.file_lock import locked

AUDIT_FILE = "audit.jsonl"
HEAD_SUFFIX = ".head"
GENESIS = "0" * 64


class AuditKind(enum.StrEnum):
    """What a line records."""

    RECEIVED = "received"  # a job arrived (before any check)
    ACCEPTED = "accepted"  # it passed signature, expiry, replay and policy checks
    REFUSED = "refused"  # it did not; details say which check and why
    RELEASED = "released"  # something left the site: sizes and hashes
    CHARGED = "charged"  # epsilon charged to the site's ledger
    APPROVAL = "approval"  # a steward's approval
    KEY = "key"  # the coordinator key pinned or rotated


class AuditChainError(FedpipeError):
    """The audit log was edited, cut or reordered; ``line`` is the first line that breaks.

    ``line`` is None when only the last line is known to be damaged (read from the end of
    the file, without counting the lines before it).
    """

    def __init__(self, message: str, *, line: int | None) -> None:
        super().__init__(message)
        self.line = line


@dataclass(frozen=True)
class AuditEntry:
    """One line of the log.

    Attributes
    ----------
    seq : int
        Its position, from 1.
    time : str
        UTC, ISO 8601.
    kind : AuditKind
        What it records.
    details : dict
        JSON-safe facts (job, round, stage, reason, sizes, hashes, epsilon).
    prev : str
        The previous line's hash (64 zeros for the first).
    hash : str
        SHA-256 of this line's canonical JSON without ``hash``.
    """

    seq: int
    time: str
    kind: AuditKind
    details: dict[str, Any]
    prev: str
    hash: str

    @property
    def moment(self) -> datetime:
        """``time`` as a datetime."""
        return datetime.fromisoformat(self.time)


def _entry_hash(body: Mapping[str, Any]) -> str:
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def audit_path(folder: str | os.PathLike[str]) -> Path:
    """The audit log of the site whose folder is ``folder``."""
    return Path(folder) / AUDIT_FILE


class AuditLog:
    """A site's audit log.

    Parameters
    ----------
    path : path
        The log file (``<site folder>/audit.jsonl``).
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.head = self.path.with_name(self.path.name + HEAD_SUFFIX)

    @classmethod
    def in_folder(cls, folder: str | os.PathLike[str]) -> AuditLog:
        """The log of the site whose folder is ``folder``."""
        return cls(audit_path(folder))

    def _last(self) -> tuple[int, str]:
        """The last line's (seq, hash), read from the end of the file."""
        if not self.path.is_file() or self.path.stat().st_size == 0:
            return 0, GENESIS
        with open(self.path, "rb") as handle:
            handle.seek(0, os.SEEK_END)
            end = handle.tell()
            block = b""
            position = end
            # read backwards until a whole last line is in hand
            while position > 0 and block.count(b"\n") < 2:
                step = min(65536, position)
                position -= step
                handle.seek(position)
                block = handle.read(step) + block
        last = block.rstrip(b"\n").rsplit(b"\n", 1)[-1]
        try:
            raw = json.loads(last)
            return int(raw["seq"]), str(raw["hash"])
        except (ValueError, KeyError, TypeError):
            raise AuditChainError(
                f"{self.path}: the last line is not an audit entry; run `fedpipe site audit` "
                "to find where the log was damaged",
                line=None,
            ) from None

    def append(
        self, kind: AuditKind, details: Mapping[str, Any], *, now: datetime | None = None
    ) -> AuditEntry:
        """Append one line, chained to the last (under an exclusive lock); return it."""
        moment = (now or datetime.now(UTC)).astimezone(UTC)
        with locked(self.path):
            seq, prev = self._last()
            body: dict[str, Any] = {
                "seq": seq + 1,
                "time": moment.isoformat(),
                "kind": str(kind),
                "details": dict(details),
                "prev": prev,
            }
            body["hash"] = _entry_hash(body)
            line = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
            with open(self.path, "a", encoding="utf-8") as handle:
                handle.write(line + "\n")
                handle.flush()
                os.fsync(handle.fileno())
            partial = self.head.with_name(f".{self.head.name}.{os.getpid()}.tmp")
            partial.write_text(json.dumps({"seq": body["seq"], "hash": body["hash"]}) + "\n")
            partial.replace(self.head)
        return AuditEntry(
            seq=body["seq"],
            time=body["time"],
            kind=kind,
            details=body["details"],
            prev=prev,
            hash=body["hash"],
        )

    def entries(self) -> Iterator[AuditEntry]:
        """Every entry, oldest first, the chain verified as it is read.

        Raises
        ------
        AuditChainError
            At the first line that does not chain (edited, removed, reordered, cut).
        """
        yield from verify_chain(self.path)

    def count_since(self, kind: AuditKind, *, since: datetime, stages: tuple[str, ...]) -> int:
        """Entries of ``kind`` at or after ``since`` whose ``details.stage`` is in ``stages``."""
        return sum(
            1
            for entry in self.entries()
            if entry.kind is kind and entry.details.get("stage") in stages and entry.moment >= since
        )

    def rounds_today(self, *, now: datetime | None = None) -> int:
        """Training jobs (``train``/``mask``) accepted in the 24 hours before ``now``."""
        moment = (now or datetime.now(UTC)).astimezone(UTC)
        return self.count_since(
            AuditKind.ACCEPTED, since=moment - timedelta(days=1), stages=("train", "mask")
        )


def verify_chain(path: str | os.PathLike[str]) -> Iterator[AuditEntry]:
    """Read the log at ``path`` line by line, checking each link; yield the entries.

    Raises
    ------
    AuditChainError
        Naming the first line (1-based) that was edited, removed, reordered or cut.
    """
    target = Path(path)
    if not target.is_file():
        return
    prev, seq = GENESIS, 0
    with open(target, encoding="utf-8") as handle:
        for number, text in enumerate(handle, start=1):
            try:
                raw = json.loads(text)
                body = {k: raw[k] for k in ("seq", "time", "kind", "details", "prev")}
                stated = str(raw["hash"])
                kind = AuditKind(raw["kind"])
            except (ValueError, KeyError, TypeError):
                raise AuditChainError(
                    f"{target} line {number}: not an audit entry (edited or damaged)", line=number
                ) from None
            if _entry_hash(body) != stated:
                raise AuditChainError(
                    f"{target} line {number}: its content does not match its hash (the line "
                    "was edited)",
                    line=number,
                )
            if body["prev"] != prev or body["seq"] != seq + 1:
                raise AuditChainError(
                    f"{target} line {number}: does not follow line {number - 1} (entry "
                    f"{body['seq']} after entry {seq}: a line before it was removed, or lines "
                    "were reordered)",
                    line=number,
                )
            prev, seq = stated, int(body["seq"])
            yield AuditEntry(
                seq=seq,
                time=str(body["time"]),
                kind=kind,
                details=dict(body["details"]),
                prev=str(body["prev"]),
                hash=stated,
            )
    head = target.with_name(target.name + HEAD_SUFFIX)
    if head.is_file():
        try:
            last = json.loads(head.read_text())
            head_seq, head_hash = int(last["seq"]), str(last["hash"])
        except (ValueError, KeyError, TypeError):
            raise AuditChainError(f"{head}: unreadable head record", line=seq + 1) from None
        if (head_seq, head_hash) != (seq, prev):
            raise AuditChainError(
                f"{target}: ends at entry {seq}, but {head.name} records entry {head_seq}: "
                f"lines were cut from the end (first missing: line {seq + 1})",
                line=seq + 1,
            )
