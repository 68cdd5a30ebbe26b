"""The nonces a site has accepted, kept in its folder until they expire: replays are refused.

Every signed job carries 128 random bits (:class:`~fl_components.wire.signing.Signed`); a
site admits a nonce once. Each admitted nonce is one empty file ``<site folder>/nonces/<nonce>``
created with ``O_CREAT | O_EXCL`` (atomic across the site's processes: of two runs of the
same job, exactly one creates the file), its modification time set to the nonce's expiry.
Expired files are pruned at most once a minute: a job past its expiry is refused on that
ground, so its nonce need not be remembered. Admitting costs one file creation, whatever
the number of nonces held.
"""

from __future__ import annotations

import os
import re
from datetime import UTC, datetime
from pathlib import Path

from fl_components.wire.rejection import RejectedJob, RejectReason

NONCE_DIR = "nonces"
PRUNE_MARK = ".pruned"
PRUNE_EVERY_SECONDS = 60.0
_NONCE = re.compile(r"^[0-9a-f]{16,128}$")


class NonceStore:
    """A site's accepted nonces, one file each in ``<site folder>/nonces/``.

    Parameters
    ----------
    directory : path
        The store's folder.
    """

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        self.directory = Path(directory)

    @classmethod
    def in_folder(cls, folder: str | os.PathLike[str]) -> NonceStore:
        """The store of the site whose folder is ``folder``."""
        return cls(Path(folder) / NONCE_DIR)

    def admit(self, nonce: str, *, expires_at: datetime, now: datetime) -> None:
        """Record ``nonce`` until ``expires_at``.

        Raises
        ------
        RejectedJob
            ``replayed`` if the nonce was admitted before and has not been pruned (it is
            pruned only after its expiry, when the job's expiry refuses it anyway);
            ``malformed`` if it is not a hex nonce (it names a file).
        """
        if not _NONCE.fullmatch(nonce):
            raise RejectedJob(RejectReason.MALFORMED, f"nonce {nonce[:40]!r} is not hex")
        self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._prune(now)
        target = self.directory / nonce
        try:
            fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            raise RejectedJob(
                RejectReason.REPLAYED,
                f"nonce {nonce} was already used by a job this site accepted; a job runs "
                "once (the coordinator signs a fresh job for every dispatch)",
            ) from None
        os.close(fd)
        expiry = expires_at.astimezone(UTC).timestamp()
        os.utime(target, (expiry, expiry))

    def _prune(self, now: datetime) -> None:
        """Remove expired nonces, at most once every :data:`PRUNE_EVERY_SECONDS`."""
        moment = now.astimezone(UTC).timestamp()
        mark = self.directory / PRUNE_MARK
        try:
            if moment - mark.stat().st_mtime < PRUNE_EVERY_SECONDS:
                return
        except FileNotFoundError:
            pass
        mark.touch()
        os.utime(mark, (moment, moment))
        with os.scandir(self.directory) as entries:
            for entry in entries:
                if entry.name == PRUNE_MARK:
                    continue
                try:
                    if entry.stat().st_mtime <= moment:
                        os.unlink(entry.path)
                except FileNotFoundError:  # another process pruned it first
                    continue

    def __len__(self) -> int:
        if not self.directory.is_dir():
            return 0
        return sum(1 for p in self.directory.iterdir() if p.name != PRUNE_MARK)
