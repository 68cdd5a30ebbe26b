"""A TLS-terminating TCP proxy for the multi-host test: what Caddy does in
``infra/compose.yaml``, in a few lines of asyncio (no Docker here).

    python -m tests.multihost.tls_proxy --listen 0.0.0.0:4443 --target 127.0.0.1:4200 \
        --cert server.crt --key server.key [--client-ca ca.crt]

With ``--client-ca`` a client must present a certificate that CA signed (mutual TLS).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ssl


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except (ConnectionError, ssl.SSLError, OSError):
        pass
    finally:
        with contextlib.suppress(Exception):
            writer.close()


async def _serve(args: argparse.Namespace) -> None:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(args.cert, args.key)
    if args.client_ca:
        context.load_verify_locations(args.client_ca)
        context.verify_mode = ssl.CERT_REQUIRED
    target_host, target_port = args.target.rsplit(":", 1)

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(target_host, int(target_port))
        except OSError:
            writer.close()
            return
        await asyncio.gather(_pipe(reader, up_writer), _pipe(up_reader, writer))

    host, port = args.listen.rsplit(":", 1)
    server = await asyncio.start_server(handle, host, int(port), ssl=context)
    print(f"tls proxy {args.listen} -> {args.target}", flush=True)
    async with server:
        await server.serve_forever()


def main() -> None:
    parser = argparse.ArgumentParser()
    for flag in ("--listen", "--target", "--cert", "--key"):
        parser.add_argument(flag, required=True)
    parser.add_argument("--client-ca")
    asyncio.run(_serve(parser.parse_args()))


if __name__ == "__main__":
    main()
