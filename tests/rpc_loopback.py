"""A TVM RPC tracker and one rpc_server on loopback, started and stopped by tests
(this machine acts as the device)."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import pytest


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _start(args: list[str], log: Path) -> subprocess.Popen:
    # A session of its own: the tracker and server fork workers, stopped with them.
    return subprocess.Popen(
        [sys.executable, "-m", *args], stdout=open(log, "w"), stderr=subprocess.STDOUT,
        env={**os.environ, "PYTHONUNBUFFERED": "1"}, start_new_session=True,
    )


def _stop(process: subprocess.Popen) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(process.pid, sig)
            process.wait(timeout=10)
            return
        except ProcessLookupError:
            return
        except subprocess.TimeoutExpired:
            continue


@contextlib.contextmanager
def loopback_tracker(logs: Path, key: str, timeout: float = 120, servers: int = 1) -> Iterator[str]:
    """host:port of a tracker with `servers` devices registered under `key` (each logs to
    server.log, server-2.log, ...); stopped on exit."""
    from tvm import rpc

    port = free_port()
    processes = [_start(["tvm.exec.rpc_tracker", "--host", "127.0.0.1", "--port", str(port),
                         "--port-end", str(port + 1)], logs / "tracker.log")]
    try:
        for number in range(1, servers + 1):
            server_port = free_port()
            processes.append(_start(
                ["tvm.exec.rpc_server", "--tracker", f"127.0.0.1:{port}", "--key", key, "--host", "127.0.0.1",
                 "--port", str(server_port), "--port-end", str(server_port + 20)],
                logs / ("server.log" if number == 1 else f"server-{number}.log")))
        deadline = time.monotonic() + timeout
        while True:
            try:
                if rpc.connect_tracker("127.0.0.1", port).summary()["queue_info"].get(key, {}).get("free", 0) >= servers:
                    break
            except (OSError, RuntimeError):
                pass
            if time.monotonic() > deadline or any(p.poll() is not None for p in processes):
                pytest.fail("the loopback tracker/server did not start:\n"
                            + "\n".join(f.read_text() for f in sorted(logs.iterdir())))
            time.sleep(1)
        yield f"127.0.0.1:{port}"
    finally:
        for process in reversed(processes):
            _stop(process)
