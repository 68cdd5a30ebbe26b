"""Issue 20: the federation across hosts, without Docker: one coordinator and two sites in
their own network namespaces (veth links, 10.201.x.0/24), talking over TLS.

The coordinator's namespace runs `fedpipe up` (its servers on its own 127.0.0.1) and a TLS
proxy per server (what Caddy does in infra/compose.yaml) with `fedpipe certs`'s files;
each site's worker runs in its own namespace and reaches the coordinator only through the
proxy, trusting the federation's CA and nothing else. A run completes; a client with no
credentials, another CA's trust store, or (MLflow) no client certificate is refused. A site
whose link goes down mid-round is dropped (with its reason) and the round goes on; its link
back up, it takes part again in a later round.

Needs root and `ip netns`: run by `make test-multihost` (FEDPIPE_MULTIHOST=1), skipped
otherwise.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from tests.deploy.stack_harness import FEDPIPE, REPO

pytestmark = [pytest.mark.integration, pytest.mark.slow]

SITES = {"north": 1, "south": 2}  # site -> its link 10.201.N.0/24 to the coordinator
COORD = "fp-coord"
ROOT_SIDE, COORD_SIDE = "10.201.0.1", "10.201.0.2"  # this test's own link to the coordinator
PREFECT_TLS, MLFLOW_TLS = 4443, 5443
CREDENTIAL_ENV = ("PREFECT_API_AUTH_STRING", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")


def _ns(site: str) -> str:
    return f"fp-{site}"


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True)


def _delete_namespaces() -> None:
    for ns in [COORD, *(_ns(s) for s in SITES)]:
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)
    subprocess.run(["ip", "link", "del", "fpr0"], capture_output=True)


def _make_namespaces() -> None:
    _delete_namespaces()
    for ns in [COORD, *(_ns(s) for s in SITES)]:
        _ip("netns", "add", ns)
        _ip("-n", ns, "link", "set", "lo", "up")
    links = [("fpr0", None, ROOT_SIDE, "fpc0", COORD, COORD_SIDE)]
    for site, n in SITES.items():
        links.append((f"fps{n}", _ns(site), f"10.201.{n}.2", f"fpc{n}", COORD, f"10.201.{n}.1"))
    for a, a_ns, a_ip, b, b_ns, b_ip in links:
        _ip("link", "add", a, "type", "veth", "peer", "name", b)
        _ip("link", "set", b, "netns", b_ns)
        if a_ns:
            _ip("link", "set", a, "netns", a_ns)
        prefix = [] if a_ns is None else ["-n", a_ns]
        _ip(*prefix, "addr", "add", f"{a_ip}/24", "dev", a)
        _ip(*prefix, "link", "set", a, "up")
        _ip("-n", b_ns, "addr", "add", f"{b_ip}/24", "dev", b)
        _ip("-n", b_ns, "link", "set", b, "up")


def _clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k not in CREDENTIAL_ENV}


def _in_ns(ns: str, *command: str, timeout: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["ip", "netns", "exec", ns, *command],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=_clean_env(),
        check=False,
    )


def _start_site_worker(record: dict[str, Any], root: Path, site: str, certs: Path) -> None:
    """Replace the site's worker `up` started (in the coordinator's namespace) by one in
    the site's own namespace, reaching the coordinator over TLS only."""
    from fl_components.exchange import SITE_DIR_ENV, SITE_KEYS_ENV, SITE_NAME_ENV
    from ops.site_executor import default_socket
    from ops.stack.credentials import load_credentials, mlflow_client_env
    from ops.stack.processes import (
        _clean_env,
        _group_members,
        _spawn,
        _worker_env,
        remove_stale_sockets,
    )

    old = next(p for p in record["processes"] if p["name"] == f"worker-{site}")
    os.killpg(old["pgid"], signal.SIGKILL)
    while _group_members(old["pgid"]):
        time.sleep(0.1)
    record["processes"].remove(old)
    entry = record["sites"][site]
    remove_stale_sockets({"sites": {site: entry}})
    credentials = load_credentials(root)
    assert credentials is not None
    api = f"https://10.201.{SITES[site]}.1:{PREFECT_TLS}/api"
    home = root / "workers" / f"{site}-netns"
    env = _worker_env(_clean_env(root), api, home, credentials)
    env.update(mlflow_client_env(credentials.site(site)))
    env.update(
        {
            "PREFECT_API_SSL_CERT_FILE": str(certs / "ca.crt"),  # the federation's CA only
            "SSL_CERT_FILE": str(certs / "ca.crt"),
            SITE_NAME_ENV: site,
            SITE_DIR_ENV: entry["data"],
            SITE_KEYS_ENV: entry["keys"],
        }
    )
    executor = default_socket(home)
    entry["executor"] = str(executor)
    command = ["ip", "netns", "exec", _ns(site), sys.executable, "-m", "ops.site_executor"]
    command += ["worker", "--pool", entry["pool"], "--socket", str(executor)]
    record["processes"].append(_spawn(f"worker-{site}", command, env, root / "logs"))


def _start_proxy(record: dict[str, Any], root: Path, name: str, listen: int, target: str,
                 certs: Path, client_ca: bool) -> None:  # fmt: skip
    from ops.stack.processes import _spawn

    port = target.rsplit(":", 1)[1]
    command = ["ip", "netns", "exec", COORD, sys.executable, "-m", "tests.multihost.tls_proxy"]
    command += ["--listen", f"0.0.0.0:{listen}", "--target", f"127.0.0.1:{port}"]
    command += ["--cert", str(certs / "server.crt"), "--key", str(certs / "server.key")]
    if client_ca:
        command += ["--client-ca", str(certs / "ca.crt")]
    record["processes"].insert(0, _spawn(name, command, dict(os.environ), root / "logs"))


@pytest.fixture(scope="module")
def federation(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    if os.environ.get("FEDPIPE_MULTIHOST") != "1":
        pytest.skip("the multi-host test runs by `make test-multihost` (root, ip netns)")
    if os.geteuid() != 0 or shutil.which("ip") is None:
        pytest.skip("network namespaces need root and iproute2")
    from ops.certs import mint
    from ops.stack.credentials import load_credentials, prefect_auth

    tmp = tmp_path_factory.mktemp("multihost")
    _make_namespaces()
    certs = tmp / "certs"
    hosts = [COORD_SIDE, *(f"10.201.{n}.1" for n in SITES.values())]
    mint(certs, hosts=hosts, sites=list(SITES), federation="netns")
    config = {
        "name": "netns-fed",
        "rounds": 3,  # the partition test drops south in round 1, takes it back after
        "sites": [{"name": s} for s in SITES],
        "participation": {"fraction": 1.0, "min_participants": 2},
        "data": {"dataset": "digits", "sites_dir": str(tmp / "sites")},
        "model": {"kind": "mlp", "hidden": [16]},
        "training": {"epochs": 1, "batch_size": 64},
        "deployment": {"timeout_seconds": 120, "poll_interval": 0.3},
        "seed": 3,
    }
    (tmp / "federation.yaml").write_text(yaml.safe_dump(config))
    root = tmp / "state"
    up = _in_ns(
        COORD, *FEDPIPE, "up", "--config", str(tmp / "federation.yaml"), "--state-dir", str(root),
        "--mlflow-dir", str(tmp / "mlflow"), "--prefect-port", "0", "--mlflow-port", "0",
        timeout=900,
    )  # fmt: skip
    try:
        assert up.returncode == 0, up.stdout + up.stderr
        record = json.loads((root / "stack.json").read_text())
        _start_proxy(record, root, "tls-prefect", PREFECT_TLS, record["prefect_api_url"].removesuffix("/api"), certs, False)  # fmt: skip
        _start_proxy(record, root, "tls-mlflow", MLFLOW_TLS, record["mlflow_url"], certs, True)
        for site in SITES:
            _start_site_worker(record, root, site, certs)
        (root / "stack.json").write_text(json.dumps(record, indent=2) + "\n")
        credentials = load_credentials(root)
        api = f"https://{COORD_SIDE}:{PREFECT_TLS}/api"
        auth = prefect_auth(root)
        client = httpx.Client(verify=str(certs / "ca.crt"), auth=auth, timeout=30)
        deadline = time.monotonic() + 180
        waiting = {record["sites"][s]["pool"] for s in SITES}
        while waiting and time.monotonic() < deadline:
            for pool in sorted(waiting):
                try:
                    answer = client.get(f"{api}/work_pools/{pool}")
                except httpx.HTTPError:
                    continue
                if answer.status_code == 200 and answer.json().get("status") == "READY":
                    waiting.discard(pool)
            time.sleep(0.5)
        assert not waiting, f"no site worker came online over TLS for {waiting}"
        yield {
            "root": root, "certs": certs, "api": api, "client": client, "record": record,
            "credentials": credentials, "tmp": tmp,
        }  # fmt: skip
        client.close()
    finally:
        down = subprocess.run(
            [*FEDPIPE, "down", "--state-dir", str(root)], cwd=REPO, capture_output=True,
            text=True, timeout=120, env=_clean_env(),
        )  # fmt: skip
        _delete_namespaces()
        assert down.returncode == 0, down.stdout + down.stderr


def test_a_run_completes_across_namespaces_over_tls(federation: dict[str, Any]) -> None:
    client, api = federation["client"], federation["api"]
    deployment = client.get(f"{api}/deployments/name/federated-training/federated-training")
    assert deployment.status_code == 200, deployment.text
    started = time.monotonic()
    run = client.post(
        f"{api}/deployments/{deployment.json()['id']}/create_flow_run", json={"parameters": {}}
    )
    assert run.status_code == 201, run.text
    run_id = run.json()["id"]
    state = ""
    while time.monotonic() - started < 600:
        state = client.get(f"{api}/flow_runs/{run_id}").json()["state"]["type"]
        if state in {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}:
            break
        time.sleep(1)
    took = time.monotonic() - started
    assert state == "COMPLETED", state
    children = client.post(
        f"{api}/flow_runs/filter",
        json={"flows": {"name": {"any_": ["federated-participant"]}}, "limit": 200},
    ).json()
    pools = {c["work_pool_name"] for c in children if c["state_type"] == "COMPLETED"}
    assert pools == {f"fedpipe-{s}" for s in SITES}
    print(f"\nmultihost: 3 rounds, 2 sites in their own namespaces over TLS: {took:.1f}s")
    (federation["tmp"].parent / "multihost-figures.json").write_text(
        json.dumps({"run_seconds": round(took, 1), "participant_runs": len(children)})
    )


PROBE = """
import ssl, sys, httpx
url, verify, cert, user, password = sys.argv[1:6]
context = ssl.create_default_context(cafile=verify)
if cert:
    context.load_cert_chain(cert)
try:
    answer = httpx.get(url, verify=context, auth=(user, password) if user else None, timeout=10)
    print(answer.status_code)
except Exception as error:  # what the site's client sees: the reason, one line
    print(type(error).__name__, error)
"""


def _probe(site: str, url: str, verify: Path, *, cert: Path | None = None,
           auth: tuple[str, str] | None = None) -> str:  # fmt: skip
    user, password = auth or ("", "")
    done = _in_ns(
        _ns(site), sys.executable, "-c", PROBE, url, str(verify), str(cert or ""), user, password,
        timeout=60,
    )  # fmt: skip
    return done.stdout.strip() + done.stderr.strip()[-300:]


def test_wrong_certificate_or_no_credentials_is_refused(federation: dict[str, Any]) -> None:
    """From a site's namespace: the right CA and credentials get in; no credentials get
    401; trusting another CA (a man in the middle's view) fails verification; MLflow's
    port refuses a client without a certificate of the federation's CA."""
    from ops.certs import mint

    certs, credentials = federation["certs"], federation["credentials"]
    ca = certs / "ca.crt"
    other = federation["tmp"] / "other-ca"
    mint(other, hosts=["10.201.1.1"], sites=["north"], federation="other")
    prefect = f"https://10.201.1.1:{PREFECT_TLS}/api/flows/filter"
    user, _, password = credentials.prefect_auth_string.partition(":")
    # GET on a POST route: 405 means the request got past TLS and auth
    assert _probe("north", prefect, ca, auth=(user, password)) == "405"
    assert _probe("north", prefect, ca) == "401"
    assert _probe("north", prefect, ca, auth=(user, "guess")) == "401"
    assert "CERTIFICATE_VERIFY_FAILED" in _probe("north", prefect, other / "ca.crt")
    mlflow = f"https://10.201.1.1:{MLFLOW_TLS}/api/2.0/mlflow/experiments/search?max_results=1"
    site = credentials.site("north")
    pem = certs / "sites" / "north.pem"
    assert _probe("north", mlflow, ca, cert=pem, auth=(site.username, site.password)) == "200"
    assert _probe("north", mlflow, ca, cert=pem) == "401"
    refused = _probe("north", mlflow, ca, auth=(site.username, site.password))
    assert refused != "200" and "Error" in refused, refused  # no client certificate
    forged = _probe("north", mlflow, ca, cert=other / "sites" / "north.pem",
                    auth=(site.username, site.password))  # fmt: skip
    assert forged != "200" and "Error" in forged, forged
    # the other site's link cannot reach this one's address: the namespaces are apart
    assert "Error" in _probe("south", "https://10.201.1.2:1/", ca)


def _site_runs(client: httpx.Client, api: str, site: str, seen: set[str]) -> dict[str, Any]:
    """The site's participant runs not in ``seen``, by name (`{site}-r{round}-{stage}-...`)."""
    answer = client.post(
        f"{api}/flow_runs/filter",
        json={"flow_runs": {"tags": {"all_": ["fedpipe", f"site:{site}"]}}, "limit": 200},
    )
    assert answer.status_code == 200, answer.text
    return {r["name"]: r for r in answer.json() if r["id"] not in seen}


def _round(name: str) -> int:
    return int(name.split("-")[1].removeprefix("r"))


def test_a_partitioned_site_is_dropped_and_the_round_goes_on(
    federation: dict[str, Any],
) -> None:
    """Once south's round-1 run is out, its link to the coordinator goes down: the round
    ends without it (a dropout with its reason in the round's artifact), the run finishes,
    and south, its link back up, takes part again in a later round."""
    client, api = federation["client"], federation["api"]
    deployment = client.get(f"{api}/deployments/name/federated-training/federated-training")
    assert deployment.status_code == 200, deployment.text
    config = deployment.json()["parameters"]["config"]
    # one site is enough for a round (the sites' policy caps the rounds at the config's 3)
    config["participation"] = {**config.get("participation", {}), "min_participants": 1}
    seen = {r["id"] for r in _site_runs(client, api, "south", set()).values()}
    started = time.monotonic()
    run = client.post(
        f"{api}/deployments/{deployment.json()['id']}/create_flow_run",
        json={"parameters": {"config": config}},
    )
    assert run.status_code == 201, run.text
    run_id = run.json()["id"]
    link = ["-n", _ns("south"), "link", "set", f"fps{SITES['south']}"]
    cut = given_up = None
    state = ""
    try:
        while time.monotonic() - started < 300:
            state = client.get(f"{api}/flow_runs/{run_id}").json()["state"]["type"]
            if state in {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}:
                break
            runs = _site_runs(client, api, "south", seen)
            first = next((r for name, r in runs.items() if _round(name) == 1), None)
            if cut is None and first is not None and first["state_type"] == "RUNNING":
                _ip(*link, "down")  # mid-round: its job is out and being worked on
                cut = time.monotonic()
            elif cut is not None and given_up is None and first["state_type"] != "RUNNING":
                given_up = time.monotonic()  # the coordinator gave up on it (cancelled)
                _ip(*link, "up")
            time.sleep(0.5)
    finally:
        _ip(*link, "up")
    took = time.monotonic() - started
    assert state == "COMPLETED", client.get(f"{api}/flow_runs/{run_id}").json()["state"]
    assert cut is not None and given_up is not None, (cut, given_up)
    artifacts = client.post(
        f"{api}/artifacts/filter",
        json={"artifacts": {"flow_run_id": {"any_": [run_id]}}, "limit": 50},
    ).json()
    rounds = {a["description"]: a["data"] for a in artifacts if a["type"] == "markdown"}
    first_round = rounds["Round 1 of netns-fed"]
    assert "participants: 1, dropouts: 1" in first_round, first_round
    row = next(line for line in first_round.splitlines() if line.startswith("| south |"))
    assert "dropped:" in row, row
    runs = _site_runs(client, api, "south", seen)
    later = sorted(
        _round(n) for n, r in runs.items() if r["state_type"] == "COMPLETED" and _round(n) > 1
    )  # its round-1 run may still end COMPLETED once the link is back: too late, not counted
    assert later, f"south never took part again: {sorted(runs)}"
    figures = {
        "partition_run_seconds": round(took, 1),
        "given_up_after_seconds": round(given_up - cut, 1),
        "south_completed_rounds": later,
        "south_round1": row,
    }
    print(f"\nmultihost partition: {json.dumps(figures)}")
    (federation["tmp"].parent / "multihost-partition.json").write_text(json.dumps(figures))
