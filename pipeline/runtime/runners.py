"""One small runner per backend, all with the same shape: infer(batch) -> logits.

Every latency and accuracy number goes through these, so PyTorch, ONNX Runtime
and TVM are always fed the same array the same way.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from pipeline.errors import PipelineError
from pipeline.runtime.runtime_only import ArtifactError, LoadedArtifact, machine_arch


class Runner(Protocol):
    name: str

    def infer(self, batch: np.ndarray) -> np.ndarray: ...


@dataclass
class TorchRunner:
    """PyTorch eager, the FP32 reference."""

    model: object
    name: str = "pytorch"

    @classmethod
    def from_checkpoint(cls, checkpoint: Path) -> "TorchRunner":
        from pipeline.checkpoints import load_model_from_checkpoint

        return cls(load_model_from_checkpoint(checkpoint))

    @property
    def threads(self) -> int:
        import torch

        return torch.get_num_threads()

    def infer(self, batch: np.ndarray) -> np.ndarray:
        import torch

        with torch.inference_mode():
            return self.model(torch.from_numpy(np.ascontiguousarray(batch))).numpy()


class OnnxRuntimeRunner:
    """ONNX Runtime on the CPU with all graph optimizations, as users run it."""

    name = "onnxruntime"

    def __init__(self, onnx_path: Path, threads: int | None = None):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads:
            options.intra_op_num_threads = threads
        self.session = ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
        # 0 (ORT's default) means one thread per physical core.
        from pipeline.runtime.runtime_only import physical_cores

        self.threads = threads or physical_cores()
        self.input_name = self.session.get_inputs()[0].name

    def infer(self, batch: np.ndarray) -> np.ndarray:
        return self.session.run(None, {self.input_name: np.ascontiguousarray(batch)})[0]


class ArtifactPipelineError(PipelineError, ArtifactError):
    """An artifact problem met inside the pipeline: a user error like any other (exit 2)."""


class _PipelineArtifact(LoadedArtifact):
    error_type = ArtifactPipelineError


def load_artifact(library_path: Path, device: str = "cpu") -> LoadedArtifact:
    """Load a compiled library for inference (runtime_only.LoadedArtifact, PipelineError errors)."""
    return _PipelineArtifact(library_path, device=device)


class TvmRunner:
    """A compiled artifact, loaded through the TVM runtime only."""

    name = "tvm"

    def __init__(self, library: Path, device: str = "cpu"):
        self.artifact = load_artifact(library, device=device)
        import tvm

        self.threads = tvm.runtime.num_threads() if device == "cpu" else None

    def infer(self, batch: np.ndarray) -> np.ndarray:
        return self.artifact.infer(batch)


def artifact_runner(library: Path, target, rpc_tracker: str | None = None, rpc_key: str | None = None):
    """The runner for a target's artifact: over RPC when a tracker is given, else in this
    process, refusing an artifact that this machine cannot run."""
    if rpc_tracker:
        from pipeline.runtime.rpc import RpcRunner

        return RpcRunner(library, target, rpc_tracker, rpc_key or target.rpc_key)
    host_arch = target.host_triple.split("-", 1)[0]
    if target.runner == "rpc" or host_arch != machine_arch():
        raise PipelineError(
            f"target '{target.name}' runs on its own board ({target.host_triple}), not this "
            f"{machine_arch()} machine; pass --rpc-tracker HOST:PORT [--rpc-key KEY] with the board "
            "registered there (python -m tvm.exec.rpc_server --tracker HOST:PORT --key KEY)"
        )
    runner = TvmRunner(library, device=target.device)
    runner.artifact.check_target(target.name)
    return runner
