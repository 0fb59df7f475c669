"""RpcRunner end to end on loopback: a tracker and an rpc_server started here (this x86
machine acting as the device, key "loopback"), and every bounded failure."""

from __future__ import annotations

import re
import socket
import time
from datetime import datetime
from pathlib import Path

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


def _sessions(log: Path) -> list[tuple[float, float]]:
    """(start, end) seconds of each session an rpc_server's log records."""
    stamp = lambda line: datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S.%f").timestamp()  # noqa: E731
    started, sessions = {}, []
    for line in log.read_text().splitlines():
        peer = re.search(r"(connected from|finish serving) (\(.*\))", line)
        if peer and peer.group(1) == "connected from":
            started[peer.group(2)] = stamp(line)
        elif peer and peer.group(2) in started:
            sessions.append((started.pop(peer.group(2)), stamp(line)))
    return sessions


@pytest.mark.slow
def test_a_farm_of_boards_under_one_key_gets_a_worker_per_board(tmp_path):
    """Two boards free under the key: the tuner's runner holds one worker per board (each
    worker keeps a session with a board while it measures) and candidates reach both.
    Whether two sessions overlap in time depends on how fast this machine starts the
    worker processes, so it is not what is asserted."""
    import tvm
    from tvm import te
    from tvm.s_tir import meta_schedule as ms

    from pipeline.compiler.tuning import measuring

    target = get_target("x86")
    # An unscheduled 640^3 matmul: most of a second a call, so a session (9 calls) lasts
    # seconds and a board is still busy when another worker asks the tracker for one.
    a = te.placeholder((640, 640), name="a")
    k = te.reduce_axis((0, 640), name="k")
    c = te.compute((640, 640), lambda i, j: te.sum(a[i, k] * a[k, j], axis=k), name="c")
    mod = tvm.IRModule({"main": te.create_prim_func([a, c])})
    with loopback_tracker(tmp_path, "farm", servers=2) as address:
        settings = measuring.TuneSettings(rpc_tracker=address, rpc_key="farm")
        boards = measuring.check_rpc(target, settings)
        assert boards == 2
        assert measuring.workers_line(target, settings, boards) == (
            f"building on {measuring.build_workers()} cores, measuring on 2 boards under key farm")
        built = measuring.make_builder(target, settings).build([ms.builder.BuilderInput(mod, tvm.target.Target(target.tvm_target))])
        assert built[0].error_msg is None, built[0].error_msg
        workers = []
        rpc_runner = ms.runner.RPCRunner

        def recording_runner(*args, **kwargs):
            workers.append(kwargs.get("max_workers"))
            return rpc_runner(*args, **kwargs)

        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(ms.runner, "RPCRunner", recording_runner)
            runner = measuring.make_runner(target, settings)  # N from the tracker's summary
        assert workers == [2]
        inputs = [ms.runner.RunnerInput(built[0].artifact_path, "cpu", ms.arg_info.ArgInfo.from_prim_func(mod["main"]))] * 2
        results = [future.result() for future in runner.run(inputs)]
        results += [future.result() for future in runner.run(inputs)]
    assert all(r.error_msg is None and r.run_secs for r in results), [r.error_msg for r in results]
    first, second = _sessions(tmp_path / "server.log"), _sessions(tmp_path / "server-2.log")
    assert first and second, "both boards must receive candidates"
