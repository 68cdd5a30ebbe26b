"""``fedpipe certs``: the federation's own small certificate authority, and its secrets.

Across hosts, the coordinator's servers (Prefect, MLflow, object storage) are reached over
TLS, terminated by the proxy of ``infra/compose.yaml`` with the certificates minted here:

- ``ca.crt`` / ``ca.key``: the federation's CA (ECDSA P-256, ``path_length=0``: it signs
  leaves only). Sites trust this CA and no other for the coordinator's addresses, so a
  certificate from any public CA (or another federation's) is refused.
- ``server.crt`` / ``server.key``: the coordinator's servers, with every ``--host`` as a
  subject alternative name (DNS names and IP addresses), for server authentication only.
- ``sites/<name>.crt`` / ``.key`` / ``.pem``: one client certificate per site (and one for
  the coordinator), client authentication only; the proxy asks MLflow's clients for one.
- ``fedpipe.env``: the compose file's passwords (databases, object storage, the Prefect
  API's auth string, MLflow's admin and session key), random, never written in the file.

Private keys and ``fedpipe.env`` are 0600 from their first byte. Running it again keeps
the CA, the keys and the passwords, and adds what is missing (a new site, a new host).
"""

from __future__ import annotations

import datetime
import ipaddress
import re
import secrets
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fl_components.errors import FedpipeError
from ops.stack.credentials import write_private

CA_NAME = "ca"
SERVER_NAME = "server"
COORDINATOR_CLIENT = "coordinator"
ENV_FILE = "fedpipe.env"
# the compose file's secrets: name -> how it is made
ENV_SECRETS = (
    "PREFECT_DB_PASSWORD",
    "MLFLOW_DB_PASSWORD",
    "MINIO_ROOT_PASSWORD",
    "PREFECT_API_PASSWORD",
    "MLFLOW_ADMIN_PASSWORD",
    "MLFLOW_FLASK_SERVER_SECRET_KEY",
)
_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")


class CertsError(FedpipeError):
    """A certificate could not be minted (a bad name, host or folder)."""


@dataclass
class Minted:
    """What :func:`mint` wrote (new) and kept (already there)."""

    folder: Path
    written: list[Path] = field(default_factory=list)
    kept: list[Path] = field(default_factory=list)


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def _save_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    write_private(path, pem.decode())


def _load_key(path: Path) -> ec.EllipticCurvePrivateKey:
    key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise CertsError(f"{path}: not an EC private key; remove it to mint a new one")
    return key


def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _name(common_name: str, federation: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, f"fedpipe {federation}"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def _san(hosts: list[str]) -> x509.SubjectAlternativeName:
    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            if not re.fullmatch(r"[A-Za-z0-9*]([A-Za-z0-9.-]*[A-Za-z0-9])?", host):
                raise CertsError(
                    f"--host {host!r}: not a DNS name or an IP address; give each name or "
                    "address the sites reach the coordinator by (e.g. --host fl.example.org "
                    "--host 10.0.0.5)"
                ) from None
            names.append(x509.DNSName(host))
    return x509.SubjectAlternativeName(names)


def _issue_ca(folder: Path, federation: str, days: int) -> tuple[x509.Certificate, bool]:
    cert_path, key_path = folder / f"{CA_NAME}.crt", folder / f"{CA_NAME}.key"
    if cert_path.is_file() and key_path.is_file():
        return x509.load_pem_x509_certificate(cert_path.read_bytes()), False
    key = ec.generate_private_key(ec.SECP256R1())
    name = _name(f"fedpipe {federation} CA", federation)
    now = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    _save_key(key_path, key)
    cert_path.write_bytes(_pem(cert))
    return cert, True


def _issue_leaf(
    ca: x509.Certificate,
    ca_key: ec.EllipticCurvePrivateKey,
    *,
    common_name: str,
    federation: str,
    hosts: list[str],
    usage: x509.ObjectIdentifier,
    days: int,
    key: ec.EllipticCurvePrivateKey,
) -> x509.Certificate:
    now = _now()
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name, federation))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(min(now + datetime.timedelta(days=days), ca.not_valid_after_utc))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=True,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.public_key()),  # type: ignore[arg-type]
            critical=False,
        )
        .add_extension(_san(hosts), critical=False)
    )
    return builder.sign(ca_key, hashes.SHA256())


def _leaf_current(cert_path: Path, hosts: list[str], ca: x509.Certificate) -> bool:
    """An existing leaf may be kept: signed by this CA, valid a while yet, same names."""
    if not cert_path.is_file():
        return False
    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    if cert.issuer != ca.subject:
        return False
    if cert.not_valid_after_utc - _now() < datetime.timedelta(days=7):
        return False
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return set(san) == set(_san(hosts))


def _write_env(path: Path, minted: Minted) -> None:
    known: dict[str, str] = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            key, sep, value = line.partition("=")
            if sep and not line.startswith("#"):
                known[key.strip()] = value.strip()
    missing = [name for name in ENV_SECRETS if not known.get(name)]
    if not missing:
        minted.kept.append(path)
        return
    for name in missing:
        known[name] = (
            secrets.token_hex(32) if name.endswith("SECRET_KEY") else secrets.token_urlsafe(24)
        )
    lines = [
        "# fedpipe certs: the compose file's secrets (0600; never commit or print this file)",
        "# docker compose --env-file THIS_FILE -f infra/compose.yaml up -d",
        *(f"{name}={known[name]}" for name in known),
    ]
    write_private(path, "\n".join(lines) + "\n")
    minted.written.append(path)


def _check_request(hosts: list[str], sites: list[str], days: int) -> None:
    """Refuse no host, a bad site name or fewer than one day, before anything is written."""
    if not hosts:
        raise CertsError(
            "no --host given: name each DNS name or IP address the sites reach the "
            "coordinator by (e.g. --host fl.example.org --host 10.0.0.5)"
        )
    if days < 1:
        raise CertsError(f"--days {days}: a certificate must be valid at least 1 day")
    for site in sites:
        if not _NAME.match(site) or site == COORDINATOR_CLIENT:
            raise CertsError(
                f"--site {site!r}: a site name is 1-63 lowercase letters, digits, '-' or '_' "
                f"(and not {COORDINATOR_CLIENT!r}), as in the federation config"
            )


def mint(
    folder: Path,
    *,
    hosts: list[str],
    sites: list[str],
    federation: str = "federation",
    days: int = 365,
) -> Minted:
    """Mint (or complete) the CA, the servers' and the sites' certificates under ``folder``.

    Raises
    ------
    CertsError
        If no host is given, a site name or host is not valid, or ``days`` is below 1.
    """
    _check_request(hosts, sites, days)
    _san(hosts)  # refuse a bad host before anything is written
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "sites").mkdir(exist_ok=True)
    minted = Minted(folder)
    ca, new_ca = _issue_ca(folder, federation, days)
    (minted.written if new_ca else minted.kept).append(folder / f"{CA_NAME}.crt")
    ca_key = _load_key(folder / f"{CA_NAME}.key")
    leaves = [(folder / SERVER_NAME, SERVER_NAME, hosts, ExtendedKeyUsageOID.SERVER_AUTH)]
    for client in [COORDINATOR_CLIENT, *sites]:
        leaves.append(
            (folder / "sites" / client, client, [client], ExtendedKeyUsageOID.CLIENT_AUTH)
        )
    for stem, common_name, names, usage in leaves:
        cert_path, key_path = stem.with_suffix(".crt"), stem.with_suffix(".key")
        if not new_ca and key_path.is_file() and _leaf_current(cert_path, names, ca):
            minted.kept.append(cert_path)
            continue
        key = _load_key(key_path) if key_path.is_file() else ec.generate_private_key(ec.SECP256R1())
        cert = _issue_leaf(
            ca,
            ca_key,
            common_name=common_name,
            federation=federation,
            hosts=names,
            usage=usage,
            days=days,
            key=key,
        )
        _save_key(key_path, key)
        cert_path.write_bytes(_pem(cert))
        if usage == ExtendedKeyUsageOID.CLIENT_AUTH:  # one file for MLflow's client cert
            write_private(stem.with_suffix(".pem"), (_pem(cert) + key_path.read_bytes()).decode())
        minted.written.append(cert_path)
    _write_env(folder / ENV_FILE, minted)
    return minted


def verify_chain(cert_path: Path, ca_path: Path, *, host: str | None = None) -> x509.Certificate:
    """Verify ``cert_path`` against the CA at ``ca_path`` (and, given, for ``host``).

    Raises
    ------
    CertsError
        If the chain, the validity period or the name does not verify.
    """
    from cryptography.x509.verification import (
        ClientVerifier,
        PolicyBuilder,
        ServerVerifier,
        Store,
        VerificationError,
    )

    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    store = Store([x509.load_pem_x509_certificate(ca_path.read_bytes())])
    builder = PolicyBuilder().store(store)
    verifier: ServerVerifier | ClientVerifier
    try:
        if host is not None:
            try:
                subject: x509.GeneralName = x509.IPAddress(ipaddress.ip_address(host))
            except ValueError:
                subject = x509.DNSName(host)
            verifier = builder.build_server_verifier(subject)  # type: ignore[arg-type]
        else:
            verifier = builder.build_client_verifier()
        verifier.verify(cert, [])
    except VerificationError as error:
        raise CertsError(f"{cert_path} does not verify against {ca_path}: {error}") from None
    return cert
