"""RpcRunner end to end on loopback: a tracker and an rpc_server started here (this x86
machine acting as the device, key "loopback"), and every bounded failure."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from edge_models import compiled, sample
from pipeline.errors import PipelineError
from pipeline.rpc import RpcRunner, parse_tracker
from pipeline.tvm_backend import load_artifact
from targets import get_target

KEY = "loopback"


def _free_port() -> int:
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


@pytest.fixture(scope="module")
def tracker(tmp_path_factory):
    """host:port of a tracker with one loopback device registered under KEY."""
    from tvm import rpc

    logs = tmp_path_factory.mktemp("rpc")
    port = _free_port()
    processes = [_start(["tvm.exec.rpc_tracker", "--host", "127.0.0.1", "--port", str(port),
                         "--port-end", str(port + 1)], logs / "tracker.log")]
    try:
        server_port = _free_port()
        processes.append(_start(
            ["tvm.exec.rpc_server", "--tracker", f"127.0.0.1:{port}", "--key", KEY, "--host", "127.0.0.1",
             "--port", str(server_port), "--port-end", str(server_port + 20)], logs / "server.log"))
        deadline = time.monotonic() + 120
        while True:
            try:
                summary = rpc.connect_tracker("127.0.0.1", port).summary()
                if summary["queue_info"].get(KEY, {}).get("free", 0) >= 1:
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


@pytest.mark.slow
def test_measures_and_infers_on_the_remote_device(tmp_path_factory, tracker):
    library = compiled(tmp_path_factory, "x86")
    runner = RpcRunner(library, get_target("x86"), tracker, KEY)
    try:
        x = sample()
        np.testing.assert_allclose(runner.infer(x), load_artifact(library).infer(x), atol=1e-5)
        stats = runner.measure(warmup=2, repeats=5)
        assert stats["repeats"] == 5
        assert 0 < stats["min_ms"] <= stats["median_ms"] <= stats["max_ms"]
        assert stats["rpc_key"] == KEY and "device" in stats["timer"]
    finally:
        runner.close()


@pytest.mark.slow
def test_separate_params_travel_to_the_device(tmp_path_factory, tracker):
    library = compiled(tmp_path_factory, "x86", "separate")
    runner = RpcRunner(library, get_target("x86"), tracker, KEY)
    try:
        x = sample(3)
        np.testing.assert_allclose(runner.infer(x), load_artifact(library).infer(x), atol=1e-5)
    finally:
        runner.close()


@pytest.mark.slow
def test_a_busy_device_is_a_bounded_wait(tmp_path_factory, tracker):
    library = compiled(tmp_path_factory, "x86")
    holder = RpcRunner(library, get_target("x86"), tracker, KEY)
    try:
        start = time.monotonic()
        with pytest.raises(PipelineError, match=f"no device with key '{KEY}' became free within 2 s"):
            RpcRunner(library, get_target("x86"), tracker, KEY, request_timeout=2)
        assert time.monotonic() - start < 20
    finally:
        holder.close()
    # Closing hands the device back: it is free again shortly.
    deadline = time.monotonic() + 30
    while True:
        try:
            RpcRunner(library, get_target("x86"), tracker, KEY, request_timeout=5).close()
            break
        except PipelineError:
            assert time.monotonic() < deadline, "the device never came back after close()"


@pytest.mark.slow
def test_a_key_nobody_registered_lists_the_registered_ones(tmp_path_factory, tracker):
    with pytest.raises(PipelineError, match=r"no device with key 'orin'.*registered: loopback \([01]/1 free\)"
                                            r".*rpc_server --tracker .* --key orin"):
        RpcRunner(compiled(tmp_path_factory, "x86"), get_target("x86"), tracker, "orin")


def test_tracker_down_is_a_quick_clear_error(tmp_path):
    (tmp_path / "model.so").write_bytes(b"\0")
    (tmp_path / "model.so.json").write_text('{"target": "x86", "input": {"shape": [1], "dtype": "float32"}}')
    start = time.monotonic()
    with pytest.raises(PipelineError, match=r"cannot reach the RPC tracker at 127.0.0.1:\d+.*rpc_tracker"):
        RpcRunner(tmp_path / "model.so", get_target("x86"), f"127.0.0.1:{_free_port()}", KEY, connect_timeout=3)
    assert time.monotonic() - start < 10


def test_something_else_on_the_port_is_not_taken_for_a_tracker(tmp_path):
    (tmp_path / "model.so").write_bytes(b"\0")
    (tmp_path / "model.so.json").write_text('{"target": "x86", "input": {"shape": [1], "dtype": "float32"}}')
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        address = f"127.0.0.1:{server.getsockname()[1]}"
        start = time.monotonic()
        # Accepts (the backlog) and never answers: the handshake times out.
        with pytest.raises(PipelineError, match="did not answer in 1 s"):
            RpcRunner(tmp_path / "model.so", get_target("x86"), address, KEY, connect_timeout=1)
        assert time.monotonic() - start < 10


def test_an_artifact_for_another_target_is_refused_before_connecting(tmp_path):
    (tmp_path / "model.so").write_bytes(b"\0")
    (tmp_path / "model.so.json").write_text('{"target": "x86", "input": {"shape": [1], "dtype": "float32"}}')
    with pytest.raises(PipelineError, match="built for target 'x86', not 'jetson-orin'"):
        RpcRunner(tmp_path / "model.so", get_target("jetson-orin"), "127.0.0.1:1")


@pytest.mark.parametrize("address, expected", [("10.0.0.2:9190", ("10.0.0.2", 9190)), ("board", ("board", 9190))])
def test_tracker_address(address, expected):
    assert parse_tracker(address) == expected


@pytest.mark.parametrize("address", ["host:port", ":9190", "host:99999"])
def test_bad_tracker_address(address):
    with pytest.raises(PipelineError, match="is not HOST:PORT"):
        parse_tracker(address)
