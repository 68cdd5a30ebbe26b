"""``fedpipe certs``: the federation's CA and certificates (:mod:`ops.certs`).

The coordinator's server certificate, one client certificate per site, and the compose
file's generated passwords.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from fl_components.errors import FedpipeError
from ops.cli.app import console, fail


def certs(
    host: Annotated[
        list[str],
        typer.Option(
            "--host", help="A DNS name or IP address the sites reach the coordinator by (repeat)."
        ),
    ],
    site: Annotated[
        list[str] | None,
        typer.Option("--site", help="A site to give a client certificate (repeat)."),
    ] = None,
    out: Annotated[Path, typer.Option(help="Folder for the CA, certificates and keys.")] = Path(
        "infra/certs"
    ),
    federation: Annotated[str, typer.Option(help="The federation's name (in each subject).")] = (
        "federation"
    ),
    days: Annotated[int, typer.Option(help="Days each certificate is valid.")] = 365,
) -> None:
    """Mint the CA and the server and site certificates for TLS across hosts.

    Keys and the generated passwords (``fedpipe.env``, for ``docker compose --env-file``)
    are written 0600; run again to add a site or a host (the CA and keys are kept).
    """
    from ops.certs import mint

    try:
        minted = mint(out, hosts=host, sites=site or [], federation=federation, days=days)
    except FedpipeError as error:
        fail(error)
    for path in minted.written:
        console.print(f"[green]written[/] {path}", soft_wrap=True)
    for path in minted.kept:
        console.print(f"[dim]kept    {path}[/]", soft_wrap=True)
    console.print(
        f"Give each site {out}/ca.crt and its own sites/<name>.crt/.key/.pem (never ca.key); "
        f"start the coordinator: `docker compose --env-file {out}/fedpipe.env -f "
        "infra/compose.yaml up -d` (docs: how-to/tls-across-hosts)",
        soft_wrap=True,
    )
