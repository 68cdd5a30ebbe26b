"""`fedpipe certs`: the chain verifies, the names are the ones asked for, the validity is
bounded, keys and passwords are 0600; a real TLS handshake with the minted files succeeds,
and one with another CA's certificate, a wrong name or no client certificate is refused."""

from __future__ import annotations

import datetime
import socket
import ssl
import stat
import threading
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID

from ops.certs import ENV_FILE, ENV_SECRETS, CertsError, mint, verify_chain
from tests.deploy.stack_harness import FEDPIPE, REPO

HOSTS = ["127.0.0.1", "fl.example.org"]


@pytest.fixture(scope="module")
def minted(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("certs")
    mint(folder, hosts=HOSTS, sites=["north", "south"], federation="fed", days=30)
    return folder


def _cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def test_chain_names_usage_and_expiry(minted: Path) -> None:
    ca = minted / "ca.crt"
    server = verify_chain(minted / "server.crt", ca, host="fl.example.org")
    verify_chain(minted / "server.crt", ca, host="127.0.0.1")
    with pytest.raises(CertsError, match="does not verify"):
        verify_chain(minted / "server.crt", ca, host="evil.example.org")
    san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert set(map(str, san.get_values_for_type(x509.IPAddress))) == {"127.0.0.1"}
    assert san.get_values_for_type(x509.DNSName) == ["fl.example.org"]
    usage = server.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(usage) == [ExtendedKeyUsageOID.SERVER_AUTH]
    for site in ("north", "south", "coordinator"):
        client = verify_chain(minted / "sites" / f"{site}.crt", ca)
        usage = client.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        assert list(usage) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    root = _cert(ca)
    constraints = root.extensions.get_extension_for_class(x509.BasicConstraints).value
    assert constraints.ca and constraints.path_length == 0
    lifetime = server.not_valid_after_utc - server.not_valid_before_utc
    assert datetime.timedelta(days=29) < lifetime <= datetime.timedelta(days=30, minutes=5)
    assert server.not_valid_after_utc <= root.not_valid_after_utc


def test_keys_and_passwords_are_private(minted: Path) -> None:
    private = [minted / "ca.key", minted / "server.key", minted / ENV_FILE]
    private += sorted((minted / "sites").glob("*.key")) + sorted((minted / "sites").glob("*.pem"))
    assert len(private) == 9
    for path in private:
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    values = dict(
        line.split("=", 1) for line in (minted / ENV_FILE).read_text().splitlines() if "=" in line
    )
    assert set(ENV_SECRETS) <= set(values)
    assert len({values[k] for k in ENV_SECRETS}) == len(ENV_SECRETS)
    compose = (REPO / "infra" / "compose.yaml").read_text()
    assert not any(values[k] in compose for k in ENV_SECRETS)
    for name in ENV_SECRETS:
        assert f"${{{name}:?" in compose, f"compose.yaml must take {name} from the env file"


def test_run_again_keeps_the_ca_and_adds_a_site(minted: Path) -> None:
    before = {
        p: p.read_bytes() for p in (minted / "ca.key", minted / "server.key", minted / ENV_FILE)
    }
    again = mint(minted, hosts=HOSTS, sites=["north", "south", "east"], federation="fed", days=30)
    assert {p.name for p in again.written} == {"east.crt"}
    assert all(p.read_bytes() == text for p, text in before.items())
    verify_chain(minted / "sites" / "east.crt", minted / "ca.crt")


def test_bad_input_is_one_clear_error(tmp_path: Path) -> None:
    with pytest.raises(CertsError, match="no --host"):
        mint(tmp_path, hosts=[], sites=[])
    with pytest.raises(CertsError, match="--host 'bad host!'"):
        mint(tmp_path, hosts=["bad host!"], sites=[])
    with pytest.raises(CertsError, match="--site 'North'"):
        mint(tmp_path, hosts=["h"], sites=["North"])
    assert not any(tmp_path.iterdir())  # nothing written


def _serve_once(context: ssl.SSLContext) -> tuple[int, threading.Thread, list[str]]:
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    seen: list[str] = []

    def serve() -> None:
        with listener:
            conn, _ = listener.accept()
            try:
                with context.wrap_socket(conn, server_side=True) as tls:
                    peer = tls.getpeercert() or {}
                    subject = dict(x[0] for x in peer.get("subject", ()))
                    seen.append(str(subject.get("commonName")))
                    tls.sendall(b"ok")
            except (ssl.SSLError, OSError) as error:
                seen.append(f"refused: {error}")

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    return port, thread, seen


def _server_context(folder: Path) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(folder / "server.crt", folder / "server.key")
    context.load_verify_locations(folder / "ca.crt")
    context.verify_mode = ssl.CERT_REQUIRED  # as the proxy does for MLflow's clients
    return context


def _client(folder: Path, ca: Path, site: str | None, host: str, port: int) -> bytes:
    context = ssl.create_default_context(cafile=str(ca))
    if site is not None:
        context.load_cert_chain(folder / "sites" / f"{site}.crt", folder / "sites" / f"{site}.key")
    with (
        socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
        context.wrap_socket(raw, server_hostname=host) as tls,
    ):
        return tls.recv(2)


def test_tls_handshakes_with_the_minted_files(minted: Path, tmp_path: Path) -> None:
    """A site holding the CA and its own certificate talks to the server; a client trusting
    another CA, asking for another name, or holding no client certificate is refused."""
    port, thread, seen = _serve_once(_server_context(minted))
    assert _client(minted, minted / "ca.crt", "north", "fl.example.org", port) == b"ok"
    thread.join(10)
    assert seen == ["north"]

    other = tmp_path / "other"
    mint(other, hosts=HOSTS, sites=["north"], federation="other")
    port, thread, seen = _serve_once(_server_context(minted))
    with pytest.raises(ssl.SSLCertVerificationError):  # the site trusts its own CA only
        _client(other, other / "ca.crt", "north", "fl.example.org", port)
    thread.join(10)

    port, thread, seen = _serve_once(_server_context(minted))
    with pytest.raises(ssl.SSLCertVerificationError, match="match"):
        _client(minted, minted / "ca.crt", "north", "evil.example.org", port)
    thread.join(10)

    port, thread, seen = _serve_once(_server_context(minted))
    with pytest.raises((ssl.SSLError, ConnectionError)):  # another CA's site certificate
        _client(other, minted / "ca.crt", "north", "fl.example.org", port)
        raise ConnectionError("refused after the handshake")
    thread.join(10)
    assert seen and seen[0].startswith("refused")


def test_the_cli_writes_them(tmp_path: Path) -> None:
    import subprocess

    out = tmp_path / "certs"
    done = subprocess.run(
        [*FEDPIPE, "certs", "--host", "127.0.0.1", "--site", "north", "--out", str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert (out / "sites" / "north.crt").is_file() and "never ca.key" in done.stdout
    bad = subprocess.run(
        [*FEDPIPE, "certs", "--host", "no way", "--out", str(tmp_path / "x")],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert bad.returncode != 0 and "Traceback" not in bad.stdout + bad.stderr
