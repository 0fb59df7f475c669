"""Measure an artifact on a remote device through a TVM RPC tracker.

The board runs ``python -m tvm.exec.rpc_server --tracker HOST:PORT --key KEY`` (only the
TVM runtime is needed there); the tracker (``python -m tvm.exec.rpc_tracker``) hands out
free devices by key. ``RpcRunner`` uploads the library, loads it into a Relax VM on the
device and has the same ``infer(batch)`` as the local runners in ``pipeline/runtime/runners.py``;
``measure`` times ``main`` on the device itself with TVM's time_evaluator (no network
round trip and no host copies in the numbers).

Every wait is bounded: a tracker that is down or not a tracker, a key no device has
registered, and a key whose devices all stay busy are PipelineErrors naming the fix.
"""

from __future__ import annotations

import json
import socket
import struct
from pathlib import Path

import numpy as np

from pipeline.errors import PipelineError, first_line
from targets import Target

DEFAULT_PORT = 9190
# TVM 0.27: tvm.rpc.base.RPC_TRACKER_MAGIC; the first 4 bytes both sides send.
_TRACKER_MAGIC = 0x2F271


def _bound_requests(session, timeout: float) -> None:
    """Every request on a tracker session fails after ``timeout`` seconds without an answer.
    TVM 0.27: TrackerSession keeps its socket in ._sock, with no timeout of its own."""
    session._sock.settimeout(timeout)


def parse_tracker(address: str) -> tuple[str, int]:
    """"host:port" (or "host", port 9190) -> (host, port)."""
    host, _, port = address.rpartition(":") if ":" in address else (address, ":", str(DEFAULT_PORT))
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise PipelineError(f"--rpc-tracker '{address}' is not HOST:PORT, e.g. 192.168.1.10:{DEFAULT_PORT}")
    return host, int(port)


def check_tracker(host: str, port: int, timeout: float) -> None:
    """Fail fast unless a TVM RPC tracker answers at host:port within `timeout` seconds."""
    start_hint = f"start one with `python -m tvm.exec.rpc_tracker --host 0.0.0.0 --port {port}`"
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            sock.settimeout(timeout)
            sock.sendall(struct.pack("<i", _TRACKER_MAGIC))
            reply = sock.recv(4)
    except (socket.timeout, TimeoutError):
        raise PipelineError(f"the RPC tracker at {host}:{port} did not answer in {timeout:g} s; {start_hint}") from None
    except OSError as exc:
        raise PipelineError(
            f"cannot reach the RPC tracker at {host}:{port} ({exc.strerror or exc}); {start_hint}"
        ) from None
    if len(reply) != 4 or struct.unpack("<i", reply)[0] != _TRACKER_MAGIC:
        raise PipelineError(f"{host}:{port} answers, but it is not a TVM RPC tracker; {start_hint}")


def _free_by_key(summary: dict) -> dict[str, tuple[int, int]]:
    """key -> (registered servers, free) from a tracker summary."""
    servers: dict[str, int] = {}
    for info in summary.get("server_info", []):
        # Servers register as "server:KEY".
        key = info["key"].split(":", 1)[-1]
        servers[key] = servers.get(key, 0) + 1
    queue = summary.get("queue_info", {})
    return {key: (count, int(queue.get(key, {}).get("free", 0))) for key, count in servers.items()}


def tracker_summary(host: str, port: int, timeout: float) -> dict:
    """The tracker's summary (what `python -m tvm.exec.query_rpc_tracker` prints): its
    registered servers and, per key, the free ones. Bounded by `timeout` seconds."""
    from tvm import rpc

    check_tracker(host, port, timeout)
    try:
        session = rpc.connect_tracker(host, port)
        _bound_requests(session, timeout)
        try:
            return session.summary()
        finally:
            session.close()
    except (OSError, RuntimeError) as exc:
        raise PipelineError(f"the RPC tracker at {host}:{port} did not answer a summary request ({exc})") from None


def servers_under_key(summary: dict, key: str) -> tuple[int, int]:
    """(registered servers, free servers) under `key` in a tracker summary."""
    registered, free = _free_by_key(summary).get(key, (0, 0))
    return registered, max(free, int(summary.get("queue_info", {}).get(key, {}).get("free", 0)))


class RpcRunner:
    """An artifact on a remote device: ``infer(batch)`` and ``measure(warmup, repeats)``."""

    name = "tvm-rpc"

    def __init__(
        self,
        library: Path,
        target: Target,
        tracker: str,
        key: str | None = None,
        *,
        session_timeout: float = 600.0,
        connect_timeout: float = 10.0,
        request_timeout: float = 60.0,
    ):
        import tvm
        from tvm import rpc

        # TVM 0.27: the Relax VM lives in tvm.runtime.vm and works on RPC modules.
        from tvm.runtime.vm import VirtualMachine

        self.library = Path(library)
        self.key = key or target.rpc_key or target.name
        self.metadata = self._read_metadata(self.library, target)
        self.input_shape = tuple(self.metadata["input"]["shape"])
        self.input_dtype = np.dtype(self.metadata["input"]["dtype"])
        self.tracker = tracker
        host, port = parse_tracker(tracker)
        check_tracker(host, port, connect_timeout)

        try:
            session = rpc.connect_tracker(host, port)
        except RuntimeError as exc:
            raise PipelineError(f"cannot connect to the RPC tracker at {tracker}: {exc}") from None
        try:
            # Bounds the wait for a busy device (the request is dropped when we hang up).
            _bound_requests(session, request_timeout)
            devices = _free_by_key(session.summary())
            if self.key not in devices:
                known = ", ".join(f"{k} ({free}/{count} free)" for k, (count, free) in sorted(devices.items()))
                raise PipelineError(
                    f"no device with key '{self.key}' is registered with the RPC tracker at {tracker} "
                    f"(registered: {known or 'none'}); on the board run `python -m tvm.exec.rpc_server "
                    f"--tracker {tracker} --key {self.key}`, or pass the right --rpc-key"
                )
            try:
                self.remote = session.request(self.key, priority=1, session_timeout=session_timeout, max_retry=1)
            except RuntimeError as exc:
                count, free = devices[self.key]
                raise PipelineError(
                    f"no device with key '{self.key}' became free within {request_timeout:g} s "
                    f"({free} of {count} free when asked): {str(exc).split('last_error:')[-1].strip()}"
                ) from None
        finally:
            session.close()

        try:
            self.device = self.remote.device(self.metadata.get("device", "cpu"))
            if not self.device.exist:
                raise PipelineError(
                    f"the device with key '{self.key}' has no {self.metadata.get('device', 'cpu')} device; "
                    f"is '{self.key}' really a '{target.name}' board?"
                )
            self.remote.upload(str(self.library))
            module = self.remote.load_module(self.library.name)
            self._vm = VirtualMachine(module, self.device)
        except PipelineError:
            raise
        except Exception as exc:  # a TVMError from the board: wrong architecture, missing lib
            raise PipelineError(
                f"the device with key '{self.key}' cannot load {self.library.name} "
                f"(built for '{target.name}'): {first_line(exc)}"
            ) from None
        self._tensor = tvm.runtime.tensor
        self._params: list = []
        if self.metadata.get("params_file"):
            with np.load(self.library.with_name(self.metadata["params_file"])) as weights:
                self._params = [
                    self._tensor(weights[name], self.device) for name in self.metadata["params_order"]
                ]

    @staticmethod
    def _read_metadata(library: Path, target: Target) -> dict:
        meta_file = library.with_name(library.name + ".json")
        if not library.is_file() or not meta_file.is_file():
            raise PipelineError(f"artifact {library} (and its {meta_file.name}) does not exist; run `pipeline compile`")
        metadata = json.loads(meta_file.read_text())
        if metadata.get("target") != target.name:
            raise PipelineError(
                f"{library} was built for target '{metadata.get('target')}', not '{target.name}'; "
                f"compile it for '{target.name}'"
            )
        return metadata

    def infer(self, batch: np.ndarray) -> np.ndarray:
        """Run the model on the device on one batch of the compiled shape and dtype."""
        batch = np.asarray(batch)
        if batch.shape != self.input_shape or batch.dtype != self.input_dtype:
            raise PipelineError(
                f"input is {batch.dtype} {list(batch.shape)}, but {self.library.name} was compiled "
                f"for {self.input_dtype} {list(self.input_shape)}"
            )
        x = self._tensor(np.ascontiguousarray(batch), self.device)
        return self._vm["main"](x, *self._params).numpy()

    def measure(self, warmup: int, repeats: int, batch: np.ndarray | None = None, seed: int = 0) -> dict:
        """Latency of ``main`` timed on the device: `warmup` untimed runs, then `repeats`
        timed ones; the same statistics as the local bench (pipeline.stages.bench)."""
        from pipeline.latency_stats import latency_stats

        if batch is None:
            batch = np.random.default_rng(seed).standard_normal(self.input_shape).astype(self.input_dtype)
        x = self._tensor(np.ascontiguousarray(batch), self.device)
        # A saved closure: the timed calls skip argument conversion and lookups.
        self._vm.save_function("main", "main_timed", x, *self._params)
        if warmup > 0:
            self._vm.time_evaluator("main_timed", self.device, number=1, repeat=warmup)()
        result = self._vm.time_evaluator("main_timed", self.device, number=1, repeat=repeats)()
        stats = latency_stats(list(result.results), int(self.input_shape[0]))
        return {**stats, "timer": "on the device (TVM time_evaluator), no host copies",
                "rpc_key": self.key, "rpc_tracker": self.tracker}

    def close(self) -> None:
        """Hang up: the device goes back to the tracker's free pool."""
        # Everything remote holds the session (a device keeps it in ._rpc_sess): drop all.
        self._vm = None
        self._params = []
        self.device = None
        self.remote = None
