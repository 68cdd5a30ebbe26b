"""A site's warm executor: its flow runs start in milliseconds instead of seconds.

Prefect's process worker starts every flow run as a fresh ``python -m prefect.engine``
subprocess, and on a site that is 3-4 s of imports (Prefect, torch, fedpipe) for every stage
of every round (measured 3.6 s of a 5-6 s dispatch here). The warm executor is a long-lived
process started beside the site's worker, with the same environment: it imports all of that
once and, for each flow run, *forks* a child that runs the site's engine entry point
(:mod:`ops.site_engine` as ``__main__``: Prefect's engine, pinned to the installed
participant flow, never a deployment's code or pull steps).

How a flow run reaches it: the site's worker (:mod:`ops.site_worker`) starts every flow run
as ``python -m ops.site_executor client`` (:func:`client_main`, standard library only,
~50 ms to start), whatever command the deployment names. The client hands its argv,
environment, working directory and standard streams (file descriptors, over ``SCM_RIGHTS``)
to the executor over a Unix socket, forwards SIGTERM/SIGINT to the child, and exits with the
child's status, so Prefect's worker sees an ordinary flow-run process. The child keeps the
executor's own environment and folder (the site's, as its worker was started) and takes
from the request only the run's identity (:data:`RUN_ENV`) and the flow run id. Without an
executor (``FEDPIPE_SITE_EXECUTOR`` unset, or nothing answering there) the client runs
``python -m ops.site_engine`` in its place: the same run, started cold, with one line on
stderr saying why.

CUDA: the executor imports torch but never touches the GPU (it refuses to serve if CUDA was
initialized before forking); each child initializes CUDA itself, as a fresh process would.

Safety: the socket lives in a 0700 folder and the executor serves only peers with its own
uid (``SO_PEERCRED``); it runs the site's engine and nothing a peer names (the optional
``module`` is fixed when the executor starts). Code is imported once: after upgrading
fedpipe on a site, restart its worker (``fedpipe down``/``up`` here).

    python -m ops.site_executor worker --pool fedpipe-west [--socket PATH]
        the site's worker: an executor plus the site's pinned process worker (ops.site_worker)
    python -m ops.site_executor client [FLOW_RUN_ID]
        what the site's worker starts for a flow run: hand it to the executor
    python -m ops.site_executor serve --socket PATH
        the executor alone
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import selectors
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

EXECUTOR_ENV = "FEDPIPE_SITE_EXECUTOR"
# a site runs nothing but the participant entry point (never a deployment's code or pull steps)
ENGINE_MODULE = "ops.site_engine"
# what a child takes from the flow-run process that asked for it: the run's identity and
# Prefect's control channel to it; everything else (the site's folder, keys, API, storage)
# is the executor's own, as the site's worker was started
RUN_ENV = (
    "PREFECT__FLOW_RUN_ID",
    "PREFECT__CONTROL_PORT",
    "PREFECT__CONTROL_TOKEN",
    "PREFECT__DEPLOYMENT_NAME",
    "PREFECT__ENABLE_CANCELLATION_AND_CRASHED_HOOKS",
)
_HEADER = struct.Struct("!Q")  # length of the JSON request that follows the descriptors
_MAX_REQUEST = 4 * 1024 * 1024
_SOCKET_NAME = "executor.sock"
_MAX_SOCKET_PATH = 100  # sun_path holds 108 bytes
_TEMP_PREFIX = "fedpipe-exec-"


# ----------------------------------------------------------------------------- client


def _cold_start(reason: str) -> None:
    """Run the flow run as Prefect's worker would have: a fresh engine process."""
    print(f"fedpipe-site-exec: {reason}; starting the flow run cold", file=sys.stderr, flush=True)
    argv = [sys.executable, "-m", ENGINE_MODULE, *sys.argv[1:]]
    os.execv(sys.executable, argv)


def _read_line(sock: socket.socket, buffer: bytearray) -> str | None:
    while b"\n" not in buffer:
        chunk = sock.recv(4096)
        if not chunk:
            return None
        buffer.extend(chunk)
    line, _, rest = bytes(buffer).partition(b"\n")
    buffer[:] = rest
    return line.decode()


def client_main() -> None:
    """``fedpipe-site-exec``: hand this flow run to the site's warm executor (or run cold)."""
    path = os.environ.get(EXECUTOR_ENV)
    if not path:
        _cold_start(f"{EXECUTOR_ENV} is not set (no warm executor on this worker)")
        return
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(path)
    except OSError as error:
        sock.close()
        _cold_start(f"no warm executor answering at {path} ({error.strerror or error})")
        return
    child: int | None = None
    early: list[int] = []  # signals that came before the child's pid did

    def forward(signum: int, _frame: object) -> None:
        if child is None:
            early.append(signum)
        else:
            _signal(child, signum)

    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, forward)
    request = json.dumps(
        {"argv": sys.argv[1:], "env": dict(os.environ), "cwd": os.getcwd()}
    ).encode()
    socket.send_fds(sock, [_HEADER.pack(len(request))], [0, 1, 2])
    sock.sendall(request)
    buffer = bytearray()
    first = _read_line(sock, buffer)
    if first is None or not first.startswith("pid "):
        print(f"fedpipe-site-exec: the executor refused the run: {first}", file=sys.stderr)
        sys.exit(1)
    child = int(first.split()[1])
    for early_signum in early:
        _signal(child, early_signum)
    while True:
        try:
            last = _read_line(sock, buffer)
            break
        except InterruptedError:  # a forwarded signal; keep waiting for the exit status
            continue
    if last is None or not last.startswith("exit "):
        print("fedpipe-site-exec: lost the executor before the run ended", file=sys.stderr)
        sys.exit(1)
    code = int(last.split()[1])
    if code < 0:  # killed by a signal: end the same way, so the worker reports it alike
        signal.signal(-code, signal.SIG_DFL)
        os.kill(os.getpid(), -code)
    sys.exit(code)


# ----------------------------------------------------------------------------- server


@dataclass
class _Request:
    argv: list[str]
    env: dict[str, str]
    cwd: str
    fds: list[int] = field(default_factory=list)


def _log(message: str) -> None:
    stamp = time.strftime("%H:%M:%S")
    print(f"{stamp} fedpipe-site-executor: {message}", file=sys.stderr, flush=True)


class _Probe(Exception):
    """A connection closed without a request: a liveness check, not an error."""


def executor_answers(path: Path | str, *, timeout: float = 2.0) -> bool:
    """Whether a warm executor accepts connections on ``path`` (what `fedpipe status` shows)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        try:
            sock.connect(str(path))
        except OSError:
            return False
    return True


def _receive(conn: socket.socket) -> _Request:
    """Read one request: the header with the client's standard streams, then the JSON."""
    conn.settimeout(10)
    header, fds, _flags, _addr = socket.recv_fds(conn, _HEADER.size, 3)
    if not header and not fds:
        raise _Probe  # connected and closed: `fedpipe status` asking whether we answer
    while len(header) < _HEADER.size:
        more = conn.recv(_HEADER.size - len(header))
        if not more:
            raise ValueError("connection closed inside the header")
        header += more
    if len(fds) != 3:
        for fd in fds:
            os.close(fd)
        raise ValueError(f"expected 3 file descriptors (stdin, stdout, stderr), got {len(fds)}")
    try:
        (length,) = _HEADER.unpack(header)
        if length > _MAX_REQUEST:
            raise ValueError(f"request of {length} bytes (limit {_MAX_REQUEST})")
        data = bytearray()
        while len(data) < length:
            chunk = conn.recv(min(65536, length - len(data)))
            if not chunk:
                raise ValueError("connection closed inside the request")
            data.extend(chunk)
        body = json.loads(data)
        return _Request(
            argv=[str(a) for a in body["argv"]],
            env={str(k): str(v) for k, v in body["env"].items()},
            cwd=str(body["cwd"]),
            fds=fds,
        )
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise


def _peer_uid(conn: socket.socket) -> int:
    creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    _pid, uid, _gid = struct.unpack("3i", creds)
    return int(uid)


# what a participant's stages import (Prefect's engine, torch, the bundled data sets'
# loaders, Opacus for DP-SGD): measured 1.1 s for sklearn and 0.9 s for Opacus alone
PRELOAD = (
    "prefect.flow_engine",
    "torch",
    "sklearn.datasets",
    "opacus",
    "opacus.accountants",
    "opacus.validators",
    "fl_components.site.dpsgd",
    "fl_components.privacy.dp_fedavg",
    "flows.participant",
)


def _preload(module: str) -> None:
    """Import once what every flow run needs, so a forked child starts with it in memory."""
    import importlib
    import threading

    started = time.perf_counter()
    for name in (module, *(PRELOAD if module == ENGINE_MODULE else ())):
        importlib.import_module(name)
    if threading.active_count() != 1:  # a thread would not survive fork(): refuse to serve
        raise RuntimeError(f"imports started threads {threading.enumerate()}; cannot fork safely")
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_initialized():  # CUDA does not survive fork()
        raise RuntimeError("CUDA was initialized before fork; the children could not use it")
    _log(f"preloaded {module} and what its runs import in {time.perf_counter() - started:.1f}s")


_CHILD_SIGNALS = {signal.SIGTERM, signal.SIGINT, signal.SIGHUP}


def _run_child(request: _Request, module: str) -> None:
    """In the forked child: become the flow-run process and run ``module`` as __main__."""
    import runpy

    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD):
        signal.signal(signum, signal.SIG_DFL)
    # blocked since before the fork (see _accept): one sent meanwhile is delivered now
    signal.pthread_sigmask(signal.SIG_UNBLOCK, _CHILD_SIGNALS)
    for target, fd in enumerate(request.fds):
        os.dup2(fd, target)
        os.close(fd)
    # the site's own environment and folder; from the request only the run's identity
    os.environ.update({k: v for k, v in request.env.items() if k in RUN_ENV})
    sys.argv = [module, *request.argv[:1]]
    code = 0
    try:
        runpy.run_module(module, run_name="__main__", alter_sys=True)
    except SystemExit as done:
        code = _exit_code(done.code)
    except BaseException:
        import traceback

        traceback.print_exc()
        code = 1
    # The run's final state and result are written by now. Send what Prefect still holds
    # (logs, events: its atexit drains), then leave without tearing down an interpreter
    # that holds torch: measured at 5-7 s of CPU per run when five sites share two cores.
    started = time.perf_counter()
    import atexit

    atexit._run_exitfuncs()
    with contextlib.suppress(Exception):
        sys.stdout.flush()
        sys.stderr.flush()
    _log(f"child {os.getpid()}: exit handlers took {time.perf_counter() - started:.2f}s")
    os._exit(code)


def _exit_code(code: object) -> int:
    """What the interpreter would exit with for ``sys.exit(code)``."""
    if code is None:
        return 0
    if isinstance(code, int):
        return code
    print(code, file=sys.stderr)
    return 1


@dataclass
class _Running:
    conn: socket.socket
    flow_run: str
    started: float


def serve(path: Path, *, module: str = ENGINE_MODULE) -> _Request | None:
    """Serve flow runs on the Unix socket ``path`` until SIGTERM/SIGINT.

    Returns
    -------
    _Request | None
        In a forked child, the request it must run (the caller runs it outside this
        function's clean-up); in the executor itself, ``None`` once it stops.
    """
    _preload(module)
    listener = _listen(path)
    server_pid = os.getpid()
    stopping = False

    def stop(_signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    selector = selectors.DefaultSelector()
    selector.register(listener, selectors.EVENT_READ)
    running: dict[int, _Running] = {}
    terminated: set[int] = set()
    _log(f"serving flow runs on {path} (pid {server_pid})")
    try:
        while not stopping or running:
            if stopping:  # let running flow runs finish; their workers are stopping too
                for pid in set(running) - terminated:
                    _signal(pid, signal.SIGTERM)
                    terminated.add(pid)
            for key, _events in selector.select(timeout=0.05):
                sock = key.fileobj
                assert isinstance(sock, socket.socket)
                if sock is listener:
                    if stopping:
                        continue
                    request = _accept(listener, selector, running, module)
                    if request is not None:  # this is the forked child
                        return request
                else:  # a client's connection: readable means it went away
                    _client_gone(sock, selector, running)
            _reap(selector, running)
    finally:
        if os.getpid() == server_pid:
            selector.close()
            _close(listener, path)
    return None


def _listen(path: Path) -> socket.socket:
    """A listening Unix socket at ``path``, in a private folder, reachable by its owner only."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.parent.chmod(0o700)
    staging = path.with_name(path.name + ".starting")
    for stale in (path, staging):
        stale.unlink(missing_ok=True)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(staging))
    staging.chmod(0o600)
    listener.listen(64)
    staging.rename(path)  # appears only once it accepts: a client never meets a half-open socket
    return listener


def _close(listener: socket.socket, path: Path) -> None:
    """Close the executor's socket and remove it (and default_socket's fallback folder)."""
    listener.close()
    path.unlink(missing_ok=True)
    if path.parent.name.startswith(_TEMP_PREFIX):
        with contextlib.suppress(OSError):
            path.parent.rmdir()
    _log("stopped")


def _signal(pid: int, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signum)


def _accept(
    listener: socket.socket,
    selector: selectors.BaseSelector,
    running: dict[int, _Running],
    module: str,
) -> _Request | None:
    conn, _ = listener.accept()
    try:
        uid = _peer_uid(conn)
        if uid != os.getuid():
            raise PermissionError(f"peer uid {uid} is not this executor's uid {os.getuid()}")
        request = _receive(conn)
    except _Probe:
        conn.close()
        return None
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
        _log(f"refused a connection: {error}")
        with contextlib.suppress(OSError, KeyError):
            conn.sendall(f"refused {error}\n".encode())
        conn.close()
        return None
    flow_run = request.env.get("PREFECT__FLOW_RUN_ID") or (request.argv or ["?"])[0]
    sys.stdout.flush()
    sys.stderr.flush()
    # A signal sent to the child before it drops the executor's handlers would run the
    # executor's `stop` in the child and be lost: keep them blocked until _run_child.
    signal.pthread_sigmask(signal.SIG_BLOCK, _CHILD_SIGNALS)
    pid = os.fork()
    if pid != 0:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, _CHILD_SIGNALS)
    if pid == 0:  # child: drop the executor's sockets, then run the flow run
        for key in list(selector.get_map().values()):
            key.fileobj.close()  # type: ignore[union-attr]
        selector.close()
        conn.close()
        return request
    for fd in request.fds:
        os.close(fd)
    conn.settimeout(None)
    conn.sendall(f"pid {pid}\n".encode())
    selector.register(conn, selectors.EVENT_READ)
    running[pid] = _Running(conn=conn, flow_run=flow_run, started=time.perf_counter())
    _log(f"flow run {flow_run}: started in child {pid}")
    return None


def _client_gone(
    conn: socket.socket, selector: selectors.BaseSelector, running: dict[int, _Running]
) -> None:
    """The client (the worker's flow-run process) died: stop its child too."""
    with contextlib.suppress(OSError, KeyError):
        if conn.recv(1, socket.MSG_PEEK):
            return
    selector.unregister(conn)
    for pid, entry in running.items():
        if entry.conn is conn:
            _log(f"flow run {entry.flow_run}: its worker process went away; stopping child {pid}")
            _signal(pid, signal.SIGTERM)


def _reap(selector: selectors.BaseSelector, running: dict[int, _Running]) -> None:
    while running:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        entry = running.pop(pid, None)
        if entry is None:
            continue
        code = os.waitstatus_to_exitcode(status)
        seconds = time.perf_counter() - entry.started
        _log(f"flow run {entry.flow_run}: child {pid} exited {code} after {seconds:.2f}s")
        with contextlib.suppress(OSError, KeyError):
            selector.unregister(entry.conn)
        with contextlib.suppress(OSError, KeyError):
            entry.conn.sendall(f"exit {code}\n".encode())
        entry.conn.close()


# ----------------------------------------------------------------------------- worker


def default_socket(home: Path | None = None) -> Path:
    """``home/executor/executor.sock``, or a private temp folder when that path is too long.

    ``home`` defaults to the worker's ``PREFECT_HOME`` (or ``~/.prefect``).
    """
    if home is None:
        home = Path(os.environ.get("PREFECT_HOME") or Path.home() / ".prefect")
    path = home / "executor" / _SOCKET_NAME
    if len(str(path)) <= _MAX_SOCKET_PATH:
        return path
    return Path(tempfile.mkdtemp(prefix=_TEMP_PREFIX)) / _SOCKET_NAME


def _wait_ready(path: Path, executor: subprocess.Popen[bytes], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if executor.poll() is not None:
            raise SystemExit(f"the warm executor exited ({executor.returncode}) during start")
        if time.monotonic() > deadline:
            raise SystemExit(f"the warm executor did not open {path} within {timeout:.0f}s")
        time.sleep(0.1)


def run_worker(
    pool: str,
    socket_path: Path,
    *,
    worker_args: list[str],
    worker_command: list[str] | None = None,
    module: str = ENGINE_MODULE,
) -> int:
    """Start an executor, then Prefect's process worker for ``pool`` pointed at it.

    All stay in this process's group; SIGTERM/SIGINT reach both. An executor that dies is
    started again (flow runs start cold meanwhile, never fail for it). Returns the worker's
    status once it exits (and stops the executor). ``worker_command`` and ``module``
    replace Prefect's worker and engine in tests.
    """
    env = {**os.environ, EXECUTOR_ENV: str(socket_path)}
    serve_command = [sys.executable, "-m", "ops.site_executor", "serve"]
    serve_command += ["--socket", str(socket_path), "--module", module]
    executor = subprocess.Popen(serve_command, env=env)
    stopping = False
    try:
        _wait_ready(socket_path, executor, timeout=120)
        # the site's worker: Prefect's process worker, pinned to the participant entry point
        command = worker_command or [sys.executable, "-m", "ops.site_worker"]
        worker = subprocess.Popen([*command, "--pool", pool, *worker_args], env=env)

        def forward(signum: int, _frame: object) -> None:
            nonlocal stopping
            stopping = True
            for process in (worker, executor):
                _signal(process.pid, signum)

        signal.signal(signal.SIGTERM, forward)
        signal.signal(signal.SIGINT, forward)
        while True:
            with contextlib.suppress(subprocess.TimeoutExpired):
                return worker.wait(timeout=1.0)
            if executor.poll() is not None and not stopping:
                _log(
                    f"the warm executor exited ({executor.returncode}); starting it again "
                    "(flow runs start cold until it is back)"
                )
                executor = subprocess.Popen(serve_command, env=env)
    finally:
        if executor.poll() is None:
            executor.terminate()
            try:
                executor.wait(timeout=30)
            except subprocess.TimeoutExpired:
                executor.kill()


def main(argv: list[str] | None = None) -> None:
    """``python -m ops.site_executor serve|worker ...``."""
    parser = argparse.ArgumentParser(prog="python -m ops.site_executor", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    serve_cmd = commands.add_parser("serve", help="run the warm executor alone")
    serve_cmd.add_argument("--socket", type=Path, required=True, help="Unix socket path")
    serve_cmd.add_argument(
        "--module", default=ENGINE_MODULE, help="module each child runs as __main__ (tests)"
    )
    worker_cmd = commands.add_parser("worker", help="an executor plus the site's process worker")
    worker_cmd.add_argument("--pool", required=True, help="the site's work pool")
    worker_cmd.add_argument(
        "--socket", type=Path, default=None, help="default: $PREFECT_HOME/executor/executor.sock"
    )
    commands.add_parser("client", help="hand this flow run to the executor (or run it cold)")
    args, rest = parser.parse_known_args(argv)
    if args.command == "client":
        sys.argv = [sys.argv[0], *rest]
        client_main()
        return
    if args.command == "serve":
        if rest:
            parser.error(f"unknown arguments: {rest}")
        request = serve(args.socket, module=args.module)
        if request is not None:  # forked child: run outside serve()'s clean-up
            _run_child(request, args.module)
        return
    sys.exit(run_worker(args.pool, args.socket or default_socket(), worker_args=rest))


if __name__ == "__main__":
    main()
