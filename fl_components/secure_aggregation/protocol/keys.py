"""Long-term site keys and the federation's public-key registry.

Each site holds an X25519 key (key agreement, for pairwise mask seeds and share encryption)
and an Ed25519 key (signing what it sends), as in the authenticated variant of Bonawitz et
al. 2017, "Practical Secure Aggregation for Privacy-Preserving Machine Learning", CCS
(arXiv:1611.04482), Section 4 ("active adversary" setting relies on a PKI). Private keys
are written only on the site, with 0600 permissions; the registry holds public keys only.
"""

from __future__ import annotations

import base64
import json
import os
import stat
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    NoEncryption,
    PrivateFormat,
    PublicFormat,
)

from fl_components.secure_aggregation.protocol.errors import (
    KeyFileError,
    SignatureError,
    UnknownSiteError,
)

X25519_FILE = "x25519.key"
ED25519_FILE = "ed25519.key"
PUBLIC_FILE = "public.json"


def _raw_public(key: X25519PublicKey | Ed25519PublicKey) -> bytes:
    return key.public_bytes(Encoding.Raw, PublicFormat.Raw)


@dataclass(frozen=True)
class PublicKeys:
    """A site's public keys, as listed in the registry.

    Attributes
    ----------
    x25519 : bytes
        Raw 32-byte X25519 public key (key agreement).
    ed25519 : bytes
        Raw 32-byte Ed25519 public key (signature verification).
    """

    x25519: bytes
    ed25519: bytes

    def __post_init__(self) -> None:
        for name in ("x25519", "ed25519"):
            value = getattr(self, name)
            if not isinstance(value, bytes) or len(value) != 32:
                raise KeyFileError(f"public key {name} must be 32 raw bytes (got {value!r:.40})")

    def agreement_key(self) -> X25519PublicKey:
        """Return the X25519 public key object."""
        return X25519PublicKey.from_public_bytes(self.x25519)

    def verify(self, signature: bytes, payload: bytes, *, site: str) -> None:
        """Verify an Ed25519 signature over ``payload``.

        Raises
        ------
        SignatureError
            If the signature does not verify; names the site.
        """
        try:
            Ed25519PublicKey.from_public_bytes(self.ed25519).verify(signature, payload)
        except InvalidSignature:
            raise SignatureError(
                f"signature of a message from site {site!r} does not verify against its "
                "registry key: the message was altered or signed by another key; discard it"
            ) from None

    def to_dict(self) -> dict[str, str]:
        """Return a JSON-ready dict with base64 keys."""
        return {
            "x25519": base64.b64encode(self.x25519).decode(),
            "ed25519": base64.b64encode(self.ed25519).decode(),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, str]) -> PublicKeys:
        """Parse the dict written by :meth:`to_dict`."""
        try:
            return cls(
                x25519=base64.b64decode(data["x25519"], validate=True),
                ed25519=base64.b64decode(data["ed25519"], validate=True),
            )
        except (KeyError, ValueError, TypeError) as exc:
            raise KeyFileError(
                f"public key entry must hold base64 'x25519' and 'ed25519' (got {dict(data)!r})"
            ) from exc


@dataclass(frozen=True)
class SiteKeys:
    """A site's long-term private keys.

    Attributes
    ----------
    x25519 : X25519PrivateKey
        Key-agreement key.
    ed25519 : Ed25519PrivateKey
        Signing key.
    """

    x25519: X25519PrivateKey
    ed25519: Ed25519PrivateKey

    @classmethod
    def generate(cls) -> SiteKeys:
        """Make fresh keys from the operating system's CSPRNG."""
        return cls(x25519=X25519PrivateKey.generate(), ed25519=Ed25519PrivateKey.generate())

    def public(self) -> PublicKeys:
        """Return the public half, for the registry."""
        return PublicKeys(
            x25519=_raw_public(self.x25519.public_key()),
            ed25519=_raw_public(self.ed25519.public_key()),
        )

    def sign(self, payload: bytes) -> bytes:
        """Sign ``payload`` with Ed25519 (64 bytes)."""
        return self.ed25519.sign(payload)

    def exchange(self, peer: PublicKeys) -> bytes:
        """Return the raw X25519 shared secret with ``peer`` (to be fed to HKDF, never used raw)."""
        return self.x25519.exchange(peer.agreement_key())

    def save(self, directory: str | os.PathLike[str]) -> Path:
        """Write the keys to ``directory`` with 0600 permissions, plus ``public.json``.

        Existing key files are never overwritten.

        Returns
        -------
        Path
            The directory written.
        """
        path = Path(directory)
        path.mkdir(parents=True, exist_ok=True, mode=0o700)
        raw = {
            X25519_FILE: self.x25519.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption()),
            ED25519_FILE: self.ed25519.private_bytes(
                Encoding.Raw, PrivateFormat.Raw, NoEncryption()
            ),
        }
        for name, data in raw.items():
            target = path / name
            try:
                # O_EXCL with mode 0600: the file never exists with looser permissions.
                fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            except FileExistsError:
                raise KeyFileError(
                    f"{target} already exists; refusing to overwrite a site key "
                    "(delete it deliberately to re-enrol the site)"
                ) from None
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
        (path / PUBLIC_FILE).write_text(json.dumps(self.public().to_dict(), indent=2) + "\n")
        return path

    @classmethod
    def load(cls, directory: str | os.PathLike[str]) -> SiteKeys:
        """Read keys written by :meth:`save`.

        Raises
        ------
        KeyFileError
            If a file is missing, has the wrong size, or is readable by group or others.
        """
        path = Path(directory)
        raw: dict[str, bytes] = {}
        for name in (X25519_FILE, ED25519_FILE):
            target = path / name
            if not target.is_file():
                raise KeyFileError(f"{target} not found; run `fedpipe site init` for this site")
            mode = stat.S_IMODE(target.stat().st_mode)
            if mode & 0o077:
                raise KeyFileError(
                    f"{target} has permissions {oct(mode)}; private keys must be 0600 "
                    f"(run: chmod 600 {target})"
                )
            data = target.read_bytes()
            if len(data) != 32:
                raise KeyFileError(f"{target} must hold 32 raw bytes (got {len(data)})")
            raw[name] = data
        return cls(
            x25519=X25519PrivateKey.from_private_bytes(raw[X25519_FILE]),
            ed25519=Ed25519PrivateKey.from_private_bytes(raw[ED25519_FILE]),
        )


class Registry(Mapping[str, PublicKeys]):
    """The federation's public-key registry: site name -> :class:`PublicKeys`.

    Parameters
    ----------
    entries : Mapping[str, PublicKeys]
        Public keys by site name.
    """

    def __init__(self, entries: Mapping[str, PublicKeys]) -> None:
        self._entries: dict[str, PublicKeys] = dict(entries)

    def __getitem__(self, site: str) -> PublicKeys:
        try:
            return self._entries[site]
        except KeyError:
            raise UnknownSiteError(
                f"site {site!r} is not in the federation registry "
                f"(known: {', '.join(sorted(self._entries)) or 'none'}); enrol it with "
                "`fedpipe site init` and add its public keys"
            ) from None

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, site: object) -> bool:
        return site in self._entries

    def get(self, site: str, default: PublicKeys | None = None) -> PublicKeys | None:  # type: ignore[override]
        """Return the keys of ``site``, or ``default`` when it is not enrolled."""
        return self._entries.get(site, default)

    def to_json(self) -> str:
        """Serialize to JSON (public keys only)."""
        return json.dumps(
            {site: keys.to_dict() for site, keys in sorted(self._entries.items())}, indent=2
        )

    @classmethod
    def from_json(cls, text: str) -> Registry:
        """Parse the JSON written by :meth:`to_json`."""
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise KeyFileError(f"registry is not valid JSON: {exc}") from exc
        if not isinstance(data, dict):
            raise KeyFileError("registry JSON must be an object mapping site -> public keys")
        return cls({site: PublicKeys.from_dict(entry) for site, entry in data.items()})
