"""``fedpipe server start|stop|status``: the local Prefect server that runs reuse."""

from __future__ import annotations

import os
from typing import Annotated

import typer

from fl_components.errors import FedpipeError
from ops.cli.app import STATE_DIR, console

server_app = typer.Typer(
    help="A local Prefect server (and its UI) that every `fedpipe run` here reuses.",
    no_args_is_help=True,
)


def _prefect_home() -> None:
    os.environ.setdefault("PREFECT_HOME", str((STATE_DIR / "prefect").resolve()))
    os.makedirs(os.environ["PREFECT_HOME"], exist_ok=True)


@server_app.command("start")
def server_start(
    port: Annotated[int, typer.Option(help="Port on 127.0.0.1 for the API and the UI.")] = 4200,
) -> None:
    """Start the local server in the background (a no-op when it already runs)."""
    from ops.servers import local as local_server

    _prefect_home()
    with console.status(f"starting Prefect's server on 127.0.0.1:{port}..."):
        try:
            server = local_server.start(port=port)
        except FedpipeError as error:
            console.print(f"[bold red]error:[/] {error}", soft_wrap=True)
            raise typer.Exit(code=1) from None
    console.print(
        f"Prefect server up: UI {server.ui_url}, API {server.api_url} (pid {server.pid}).\n"
        "`fedpipe run` and `fedpipe demo` in this folder now use it (no server start per run, "
        "and their runs stay in the UI); stop it with `fedpipe server stop`.",
        soft_wrap=True,
    )


@server_app.command("prepare")
def server_prepare() -> None:
    """Make Prefect's empty database once, so that runs in fresh folders skip its migrations.

    `make` runs this when it creates the environment; a run in a fresh folder does it too,
    from its own server, when it finds none.
    """
    import tempfile
    from pathlib import Path

    from ops.servers import schema
    from ops.servers.temporary import TemporaryServer

    template = schema.template_path()
    if not template.is_file():
        with tempfile.TemporaryDirectory(prefix="fedpipe-schema-") as home:
            os.environ["PREFECT_HOME"] = home
            with console.status("making Prefect's database schema (once)..."):
                server = TemporaryServer.start(Path(home) / "server.log")
                try:
                    server.wait_ready(timeout=300)  # its start writes the template
                except FedpipeError as error:
                    console.print(f"[bold red]error:[/] {error}", soft_wrap=True)
                    raise typer.Exit(code=1) from None
                finally:
                    server.stop()
    if not template.is_file():
        console.print(f"[bold red]error:[/] could not write {template} (is the folder writable?)")
        raise typer.Exit(code=1)
    console.print(f"Prefect's empty database for fresh folders: {template}", soft_wrap=True)


@server_app.command("stop")
def server_stop() -> None:
    """Stop the local server."""
    from ops.servers import local as local_server

    _prefect_home()
    if local_server.stop():
        console.print("Prefect server stopped; runs start their own temporary server again.")
    else:
        console.print("no local Prefect server was running")


@server_app.command("status")
def server_status() -> None:
    """Say whether the local server runs and answers (exit 1 if not)."""
    from ops.servers import local as local_server

    _prefect_home()
    server = local_server.recorded()
    if server is None:
        console.print("no local Prefect server (start one with `fedpipe server start`)")
        raise typer.Exit(code=1)
    if local_server.running_api_url() is None:
        console.print(
            f"the local Prefect server (pid {server.pid}) does not answer on {server.api_url}; "
            "restart it: `fedpipe server stop && fedpipe server start`",
            soft_wrap=True,
        )
        raise typer.Exit(code=1)
    console.print(f"Prefect server up: UI {server.ui_url}, API {server.api_url} (pid {server.pid})")
