"""A site's large answer fields as sealed files in exchange storage, not inside its JSON answer.

A 100M-parameter update is 400 MB of float32: as base64 inside the sealed JSON answer it
would be ~710 MB of result-storage text, above the bound on what fedpipe parses from
another party (:data:`fl_components.exchange.MAX_PAYLOAD_BYTES`), and the coordinator would
hold it three times over while decoding. So a field above a size threshold (the update's
``delta`` and SCAFFOLD's ``control_delta``, as safetensors bytes; a masked update's bytes)
leaves the site as a file of its own:

- **Sealed.** Each file is encrypted under a fresh random AES-256-GCM key (NIST SP 800-38D,
  through ``cryptography``'s streaming GCM interface, so neither side holds the ciphertext
  and the plaintext at once). The associated data binds the answer's
  :class:`~fl_components.wire.sealed.AnswerContext` (federation, run, round, stage, site)
  and the field's name. The key, nonce, tag, size and the ciphertext's SHA-256 travel in a
  :class:`SealedFileRef` *inside* the JSON answer, which is itself sealed to the
  coordinator and signed by the site (:mod:`fl_components.wire.sealed`): result storage and
  every other site see only ciphertext, and only the signed answer says what the file is.
- **Confined.** The site writes only under ``<its enrolled exchange folder>/<run>/answers/
  <site>`` (never a folder a job names); the coordinator reads only a bare file name in the
  answering site's folder of its own ``<exchange_dir>/<run>/answers``, so no site can name
  (or get removed) another's file; it refuses one larger than the bound it sets from the
  model's size, opens it only as a regular file, never through a link nor waiting on a
  FIFO put in its place, and deletes the file once read.
- **One pass.** The coordinator maps the file and decrypts it chunk by chunk into one buffer
  (one model's worth of memory per update); GCM authenticates every byte in that same pass
  under a key only the signed answer carries, and the tag is checked before the safetensors
  header is read and the tensors are taken as views of that buffer. The SHA-256 in the
  reference is the site's record of what it released (its audit log); the coordinator does
  not hash the file again, which would take it from ~5 GB/s to ~1 GB/s on this machine and
  add nothing the tag does not already guarantee.

A site whose exchange folder it cannot write answers inline, as before, and says so in its
log. ``FEDPIPE_ANSWER_FILE_BYTES`` (the site's own environment; default 1 MiB) is the size
from which a field goes as a file.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import logging
import mmap
import os
import re
import stat
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from fl_components.exchange import ExchangeError, payload_limit
from fl_components.secure_aggregation.protocol.agreement import encode_fields
from fl_components.wire.rejection import AnswerReason, RejectedAnswer
from fl_components.wire.sealed import AnswerContext

log = logging.getLogger(__name__)

FILE_SUFFIX = ".fpsealed"
FILE_KEY = "file"  # the key under which an answer field names its sealed file
AD_LABEL = b"fedpipe/answer-file/associated-data/v1"
THRESHOLD_ENV = "FEDPIPE_ANSWER_FILE_BYTES"
DEFAULT_THRESHOLD = 1024 * 1024
CHUNK_BYTES = 8 * 1024 * 1024
ANSWERS_FOLDER = "answers"
_NAME = re.compile(r"^[0-9a-f]{32}\.fpsealed$")
# a run id and a site name each become one folder name: nothing that could climb out
_RUN_ID = re.compile(r"^[0-9A-Za-z][0-9A-Za-z_.-]{0,127}$")
_SITE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")  # as config.SiteConfig.name
_BLOCK = 16  # AES block: the slack `update_into` asks of its output buffer


class SealedFileRef(BaseModel):
    """What the signed answer says of one sealed file: where, how big, and how to open it.

    Attributes
    ----------
    file : str
        The file's bare name in the run's answers folder.
    bytes : int
        Its size (ciphertext, equal to the plaintext's under GCM).
    sha256 : str
        SHA-256 of the ciphertext, as written (the site's audit record of the file).
    key, nonce, tag : str
        Base64 of the file's AES-256 key, 12-byte GCM nonce and 16-byte GCM tag.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    file: str = Field(pattern=_NAME.pattern)
    bytes: int = Field(ge=0)
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    key: str
    nonce: str
    tag: str


def _associated_data(context: AnswerContext, field: str) -> bytes:
    return AD_LABEL + encode_fields(context.encoded(), field)


def answers_folder(exchange: str | os.PathLike[str], run_id: str, site: str) -> Path | None:
    """``<exchange>/<run_id>/answers/<site>``, or None unless both are one plain name."""
    if not _RUN_ID.match(run_id) or run_id in (".", "..") or not _SITE.match(site):
        return None
    return Path(exchange) / run_id / ANSWERS_FOLDER / site


def file_threshold() -> int:
    """Bytes from which a site sends a field as a file: ``FEDPIPE_ANSWER_FILE_BYTES`` or 1 MiB."""
    raw = os.environ.get(THRESHOLD_ENV, "").strip()
    if not raw:
        return DEFAULT_THRESHOLD
    try:
        return max(0, int(raw))
    except ValueError:
        raise ExchangeError(
            f"{THRESHOLD_ENV} must be a number of bytes (got {raw!r}); unset it for the "
            f"default of {DEFAULT_THRESHOLD}"
        ) from None


class AnswerFileSink:
    """The site's side: seals large fields of one answer into files (see the module's doc).

    Parameters
    ----------
    folder : Path
        The run's answers folder inside the site's enrolled exchange folder.
    context : AnswerContext
        The answer's context, bound into every file's associated data.
    threshold : int
        Fields of at least this many bytes go as files.
    """

    def __init__(self, folder: Path, *, context: AnswerContext, threshold: int) -> None:
        self.folder = folder
        self.context = context
        self.threshold = threshold
        self.written: list[SealedFileRef] = []
        self._usable: bool | None = None

    def wants(self, size: int) -> bool:
        """Whether a field of ``size`` bytes goes as a file (large, and the folder writable)."""
        if size < self.threshold:
            return False
        if self._usable is None:
            try:
                self.folder.mkdir(parents=True, exist_ok=True)
                self._usable = os.access(self.folder, os.W_OK)
            except OSError:
                self._usable = False
            if not self._usable:
                log.warning(
                    "site %s cannot write %s: its large answer goes inline in the sealed JSON "
                    "(bounded by FEDPIPE_MAX_PAYLOAD_BYTES); give the site's worker write "
                    "access to the exchange folder's run folders",
                    self.context.site,
                    self.folder,
                )
        return self._usable

    def put(self, field: str, data: bytes | bytearray | memoryview) -> dict[str, Any]:
        """Seal ``data`` into a new file; its reference, for the answer's JSON."""
        key, nonce = os.urandom(32), os.urandom(12)
        encryptor = Cipher(algorithms.AES(key), modes.GCM(nonce)).encryptor()
        encryptor.authenticate_additional_data(_associated_data(self.context, field))
        name = f"{uuid.uuid4().hex}{FILE_SUFFIX}"
        partial = self.folder / f".{name}.tmp"
        hasher = hashlib.sha256()
        view = memoryview(data).cast("B")
        with partial.open("wb") as out:
            for start in range(0, len(view), CHUNK_BYTES):
                chunk = encryptor.update(view[start : start + CHUNK_BYTES])
                hasher.update(chunk)
                out.write(chunk)
            tail = encryptor.finalize()
            hasher.update(tail)
            out.write(tail)
        partial.replace(self.folder / name)
        ref = SealedFileRef(
            file=name,
            bytes=len(view),
            sha256=hasher.hexdigest(),
            key=_b64(key),
            nonce=_b64(nonce),
            tag=_b64(encryptor.tag),
        )
        self.written.append(ref)
        return ref.model_dump()

    def discard(self) -> None:
        """Remove what this answer wrote (an answer that is not sent after all)."""
        for ref in self.written:
            with contextlib.suppress(OSError):
                (self.folder / ref.file).unlink()
        self.written.clear()


class AnswerFileSource:
    """The coordinator's side: opens the sealed files one answer names, each once.

    Parameters
    ----------
    folder : Path
        The answering site's folder of the run's answers, in the coordinator's exchange.
    context : AnswerContext
        The context the coordinator asked for (the file must have been sealed in it).
    limit : int
        The most bytes one file may have (set from the model's size).
    """

    def __init__(self, folder: Path, *, context: AnswerContext, limit: int) -> None:
        self.folder = folder
        self.context = context
        self.limit = limit
        self.taken = 0  # bytes read, for the answer's size on the wire

    def take(self, raw_ref: object, field: str) -> memoryview:
        """The plaintext of the file ``raw_ref`` names, verified; the file is then removed.

        Raises
        ------
        RejectedAnswer
            If the reference is malformed, the file is missing, larger than the bound or
            than the reference says, or fails its GCM tag (altered, or moved).
        """
        site = self.context.site
        try:
            ref = SealedFileRef.model_validate(raw_ref)
        except ValidationError as error:
            raise RejectedAnswer(
                AnswerReason.MALFORMED,
                f"site {site!r}: field {field!r} names no valid sealed file "
                f"({error.error_count()} problems)",
            ) from None
        path = self.folder / ref.file
        try:
            return self._open(path, ref, field)
        finally:
            with contextlib.suppress(OSError):
                path.unlink()

    def _open(self, path: Path, ref: SealedFileRef, field: str) -> memoryview:
        site = self.context.site
        if ref.bytes > self.limit:
            raise RejectedAnswer(
                AnswerReason.MALFORMED,
                f"site {site!r}: its {field!r} file would be {ref.bytes} bytes, above the "
                f"{self.limit} bytes this model's answer can need; refused unread",
            )
        try:  # never through a link, never waiting on a FIFO someone put there
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        except FileNotFoundError:
            raise RejectedAnswer(
                AnswerReason.MALFORMED,
                f"site {site!r}: its {field!r} file {path} is not in the exchange folder; the "
                "site and the coordinator must mount the same exchange storage at the same path",
            ) from None
        except OSError as error:  # ELOOP: a symbolic link; others: unreadable
            raise RejectedAnswer(
                AnswerReason.UNREADABLE,
                f"site {site!r}: its {field!r} file {path} cannot be opened as a plain file "
                f"({error.strerror}); discarded",
            ) from None
        handle = os.fdopen(fd, "rb", buffering=0, closefd=True) if _plain(fd) else None
        if handle is None:
            os.close(fd)
            raise RejectedAnswer(
                AnswerReason.UNREADABLE,
                f"site {site!r}: its {field!r} file {path} is not a regular file; discarded",
            )
        with handle:
            size = os.fstat(handle.fileno()).st_size
            if size != ref.bytes:
                raise RejectedAnswer(
                    AnswerReason.UNREADABLE,
                    f"site {site!r}: its {field!r} file has {size} bytes, the signed "
                    f"answer says {ref.bytes}: altered or truncated; discarded",
                )
            associated = _associated_data(self.context, field)
            plain = _decrypt(handle, ref, associated, site=site, field=field)
        self.taken += ref.bytes
        return plain


def _plain(fd: int) -> bool:
    """Whether the open descriptor is a regular file (not a folder, FIFO or device)."""
    return stat.S_ISREG(os.fstat(fd).st_mode)


def _decrypt(
    handle: BinaryIO, ref: SealedFileRef, associated: bytes, *, site: str, field: str
) -> memoryview:
    """Decrypt the open file in one pass over its mapping; the GCM tag checked before use.

    Into an uninitialised buffer (``numpy.empty``: no pass to zero it first, half the time
    of a ``bytearray`` at 40 MB).
    """
    key, nonce, tag = _unb64(ref.key, 32), _unb64(ref.nonce, 12), _unb64(ref.tag, 16)
    if key is None or nonce is None or tag is None:
        raise RejectedAnswer(
            AnswerReason.MALFORMED, f"site {site!r}: its {field!r} file's key, nonce or tag"
        )
    decryptor = Cipher(algorithms.AES(key), modes.GCM(nonce)).decryptor()
    decryptor.authenticate_additional_data(associated)
    target = np.empty(ref.bytes + _BLOCK, dtype=np.uint8).data  # a memoryview of it
    written = 0
    if ref.bytes:
        with mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
            source = memoryview(mapped)
            try:
                for start in range(0, ref.bytes, CHUNK_BYTES):
                    chunk = source[start : start + CHUNK_BYTES]
                    end = written + len(chunk) + _BLOCK - 1
                    written += decryptor.update_into(chunk, target[written:end])
                    chunk.release()
            finally:
                source.release()
    try:
        decryptor.finalize_with_tag(tag)
    except InvalidTag:
        raise RejectedAnswer(
            AnswerReason.UNREADABLE,
            f"site {site!r}: its {field!r} file failed AES-GCM authentication (altered, or "
            "sealed for another run, round, stage, site or field); discarded",
        ) from None
    return target[:written]


def file_limit(model_values: int) -> int:
    """The most bytes one answer file may have, for a model of ``model_values`` parameters.

    Eight bytes a value (a masked update's field elements are at most 64-bit) and the
    payload bound on top, for headers.
    """
    return 8 * model_values + payload_limit()


def is_file_ref(value: object) -> bool:
    """Whether an answer field is ``{"file": <SealedFileRef>, ...}`` rather than inline."""
    return isinstance(value, Mapping) and FILE_KEY in value


def _b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode("ascii")


def _unb64(text: str, size: int) -> bytes | None:
    try:
        raw = base64.b64decode(text, validate=True)
    except ValueError:
        return None
    return raw if len(raw) == size else None
