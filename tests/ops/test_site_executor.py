"""The site's warm executor, with a stand-in module in place of Prefect's engine.

The real engine path (a Prefect worker whose flow runs go through ``fedpipe-site-exec``) is
exercised by the stack end-to-end tests; here the protocol itself: the child gets the
client's standard streams and flow run id, but the executor's own environment and folder
(a job cannot redirect the site); its exit status and signals travel back; a vanished
client stops its child; no executor means a cold start.
"""

from __future__ import annotations

import os
import re
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from ops.site_executor import EXECUTOR_ENV, default_socket, executor_answers

REPO = Path(__file__).resolve().parents[2]
CLIENT = str(Path(sys.executable).parent / "fedpipe-site-exec")
# the probe's knobs come in its one argument ("sleep:code"): the client's environment
# does not reach it
PROBE = """
import os, sys, time
if __name__ == "__main__":
    print("probe", os.environ.get("PROBE_VALUE"), sys.argv[1:], os.getcwd(),
          os.environ.get("PREFECT__FLOW_RUN_ID"), os.environ.get("FEDPIPE_SITE_DIR"), flush=True)
    print("probe-stderr", file=sys.stderr, flush=True)
    sleep, code = (sys.argv[1] if len(sys.argv) > 1 else "0:0").split(":")
    time.sleep(float(sleep))
    sys.exit(int(code))
"""


@pytest.fixture()
def executor(tmp_path: Path) -> Iterator[tuple[Path, Path, subprocess.Popen[bytes]]]:
    """A running executor whose children run ``probe`` as __main__; stopped afterwards."""
    (tmp_path / "probe.py").write_text(PROBE)
    sock = tmp_path / "run" / "executor.sock"
    log = tmp_path / "executor.log"
    env = {
        **os.environ,
        "PYTHONPATH": f"{tmp_path}{os.pathsep}{REPO}",
        "PROBE_VALUE": "the-sites-own",
        "FEDPIPE_SITE_DIR": "/sites/north",
    }
    command = [sys.executable, "-m", "ops.site_executor", "serve", "--socket", str(sock)]
    with log.open("wb") as out:
        process = subprocess.Popen(
            [*command, "--module", "probe"], env=env, cwd=REPO, stderr=out, stdout=out
        )
    deadline = time.monotonic() + 60
    while not sock.exists():
        assert process.poll() is None, log.read_text()
        assert time.monotonic() < deadline, "executor did not start"
        time.sleep(0.05)
    yield sock, log, process
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=30)


def _client(
    sock: Path | str, cwd: Path, *, sleep: float = 0, code: int = 0, **env: str
) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [CLIENT, f"{sleep:g}:{code}", "ignored"],
        env={**os.environ, EXECUTOR_ENV: str(sock), **env},
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _child_pid(log: Path) -> int:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        found = re.findall(r"started in child (\d+)", log.read_text())
        if found:
            return int(found[-1])
        time.sleep(0.05)
    raise AssertionError(f"no child started; log:\n{log.read_text()}")


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def test_child_keeps_the_sites_env_and_folder_and_gets_only_the_runs_identity(
    executor: tuple[Path, Path, subprocess.Popen[bytes]], tmp_path: Path
) -> None:
    """A deployment's job variables cannot redirect the site: what the flow-run process
    sends beyond the run's id (its environment, working folder, extra arguments) is dropped."""
    sock, log, _ = executor
    workdir = tmp_path / "work"
    workdir.mkdir()
    client = _client(
        sock,
        workdir,
        code=3,
        PROBE_VALUE="from-the-job",
        FEDPIPE_SITE_DIR="/sites/south",  # another site's data, asked by a job
        PREFECT__FLOW_RUN_ID="run-42",
    )
    out, err = client.communicate(timeout=30)

    assert client.returncode == 3
    assert out.strip() == f"probe the-sites-own ['0:3'] {REPO} run-42 /sites/north"
    assert "probe-stderr" in err
    assert "started cold" not in err
    assert re.search(r"child \d+ exited 3", log.read_text())


def test_a_liveness_probe_is_answered_quietly(
    executor: tuple[Path, Path, subprocess.Popen[bytes]], tmp_path: Path
) -> None:
    sock, log, _ = executor
    assert executor_answers(sock)
    assert not executor_answers(tmp_path / "nothing-here.sock")
    client = _client(sock, tmp_path)  # still serving after the probe
    client.communicate(timeout=30)
    assert client.returncode == 0
    assert "refused" not in log.read_text()


def test_socket_is_private_and_removed_when_the_executor_stops(
    executor: tuple[Path, Path, subprocess.Popen[bytes]],
) -> None:
    sock, log, process = executor
    assert stat.S_IMODE(sock.parent.stat().st_mode) == 0o700
    assert stat.S_IMODE(sock.stat().st_mode) == 0o600

    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=30) == 0
    assert not sock.exists()
    assert "stopped" in log.read_text()


def test_sigterm_to_the_client_reaches_the_child(
    executor: tuple[Path, Path, subprocess.Popen[bytes]], tmp_path: Path
) -> None:
    sock, log, _ = executor
    client = _client(sock, tmp_path, sleep=60)
    child = _child_pid(log)
    assert _alive(child)

    client.send_signal(signal.SIGTERM)  # what a worker does to cancel a flow run
    client.communicate(timeout=30)

    assert client.returncode == -signal.SIGTERM  # ended the way the child ended
    assert not _alive(child)
    assert re.search(rf"child {child} exited -15", log.read_text())


def test_a_vanished_client_stops_its_child(
    executor: tuple[Path, Path, subprocess.Popen[bytes]], tmp_path: Path
) -> None:
    sock, log, _ = executor
    client = _client(sock, tmp_path, sleep=60)
    child = _child_pid(log)

    client.kill()  # SIGKILL: no chance to forward anything
    client.communicate(timeout=30)

    deadline = time.monotonic() + 10
    while _alive(child) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(child)
    assert "went away" in log.read_text()


def test_without_an_executor_the_run_starts_cold_and_says_why(tmp_path: Path) -> None:
    client = _client(tmp_path / "nothing-here.sock", tmp_path)
    _, err = client.communicate(timeout=120)

    # the cold path is the site's engine: given no flow run id, it refuses with exit 1
    assert "no warm executor answering" in err
    assert "starting the flow run cold" in err
    assert "no valid flow run id" in err
    assert client.returncode == 1


def test_default_socket_fits_a_unix_socket_path(tmp_path: Path) -> None:
    short = default_socket(Path("/tmp/site-a"))
    assert short == Path("/tmp/site-a/executor/executor.sock")
    long_home = tmp_path / ("x" * 120)
    path = default_socket(long_home)
    assert len(str(path)) <= 100
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700


def test_the_site_worker_starts_a_dead_executor_again(tmp_path: Path) -> None:
    """`fedpipe site worker`: an executor killed under a running worker comes back; runs in
    between start cold rather than fail; SIGTERM stops the worker and the executor."""
    (tmp_path / "probe.py").write_text(PROBE)
    sock = tmp_path / "run" / "executor.sock"
    log = tmp_path / "worker.log"
    stand_in = [sys.executable, "-c", "import time; time.sleep(300)"]  # Prefect's worker
    code = (
        "from pathlib import Path; from ops.site_executor import run_worker; "
        f"raise SystemExit(run_worker('pool-a', Path({str(sock)!r}), worker_args=[], "
        f"worker_command={stand_in!r}, module='probe'))"
    )
    env = {**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{REPO}"}
    with log.open("wb") as out:
        worker = subprocess.Popen(
            [sys.executable, "-c", code], env=env, cwd=REPO, stdout=out, stderr=out
        )
    try:

        def serving() -> list[int]:
            return [
                int(p)
                for p in re.findall(r"serving flow runs on .* \(pid (\d+)\)", log.read_text())
            ]

        deadline = time.monotonic() + 60
        while not serving():
            assert worker.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.1)
        first = serving()[0]
        os.kill(first, signal.SIGKILL)
        while len(serving()) < 2:
            assert worker.poll() is None and time.monotonic() < deadline + 60, log.read_text()
            time.sleep(0.1)
        assert serving()[1] != first
        assert "starting it again" in log.read_text()
        while not sock.exists():
            time.sleep(0.1)

        client = _client(sock, tmp_path, code=5)
        out, err = client.communicate(timeout=30)
        assert client.returncode == 5
        assert "started cold" not in err  # served by the new executor
    finally:
        worker.send_signal(signal.SIGTERM)
        # the stand-in worker died of the forwarded SIGTERM; its status is the exit status
        assert worker.wait(timeout=60) == (-signal.SIGTERM) % 256
    assert not _alive(serving()[1])
