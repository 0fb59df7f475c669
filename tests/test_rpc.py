"""RpcRunner end to end on loopback: a tracker and an rpc_server started here (this x86
machine acting as the device, key "loopback"), and every bounded failure."""

from __future__ import annotations

import socket
import time

import numpy as np
import pytest

from rpc_loopback import free_port, loopback_tracker
from edge_models import compiled, sample
from pipeline.errors import PipelineError
from pipeline.runtime.rpc import RpcRunner, parse_tracker
from pipeline.runtime.runners import load_artifact
from targets import get_target

KEY = "loopback"


@pytest.fixture(scope="module")
def tracker(tmp_path_factory):
    """host:port of a tracker with one loopback device registered under KEY."""
    with loopback_tracker(tmp_path_factory.mktemp("rpc"), KEY) as address:
        yield address


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
        RpcRunner(tmp_path / "model.so", get_target("x86"), f"127.0.0.1:{free_port()}", KEY, connect_timeout=3)
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
