"""Every setting of a pipeline run, resolved once and printed before work starts."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

# The names of pipeline/precisions.py's records (what each precision needs and adds).
from pipeline.precisions import PRECISIONS  # noqa: F401 -- the settings' vocabulary, imported from here

PARAMS_MODES = ("embedded", "separate")


@dataclass(frozen=True)
class PipelineConfig:
    # Model
    variant: str = "micro"
    weights: Path | None = None  # None: random init with `seed`
    num_classes: int = 1000
    in_chans: int = 3
    seed: int = 0
    # Export
    input_size: int = 224
    batch_size: int = 1
    opset: int = 17
    dynamic_batch: bool = False
    # Compile
    precision: str = "fp32"
    params_mode: str = "embedded"
    tuning_records: bool = True  # False: default schedules only, whatever records exist
    gpu_split_k: bool = True  # False: no GPU GEMM split over K (pipeline/compiler/split_k.py)
    # Bench
    warmup: int = 5
    repeats: int = 50
    # Remote measurement through a TVM RPC tracker ("host:port"); key defaults to the target's.
    rpc_tracker: str | None = None
    rpc_key: str | None = None
    # Evaluate: None means random inputs (agreement and error only, no top-1)
    data: str | None = None
    preprocessing: str = "imagenet"
    eval_limit: int | None = 256
    eval_random_count: int = 16
    # Evaluate an aarch64 artifact under qemu-user here: the board's binary, so its outputs and
    # accuracy, but no latency (pipeline/runtime/cross.py).
    emulate: bool = False
    # Quantize (precision int8; see pipeline/quantization/)
    calib_data: str | None = None  # None: the evaluation `data` (Fashion-MNIST: its train split)
    calib_size: int = 256
    calib_method: str = "minmax"  # minmax, percentile, entropy, mse
    calib_percentile: float = 99.99
    quant_per_channel: bool = True
    quant_exclude: tuple[str, ...] = ()  # fnmatch patterns on node names and op types
    quant_analyze: bool = False  # per-layer sensitivity in the quantization report
    quant_max_drop: float | None = None  # keep sensitive layers float until agreement drop <= this
    # Where things go
    artifacts: Path = Path("artifacts")
    reports_dir: Path = Path("reports")
    # The report replaces the committed one in reports_dir even where that one measured other
    # settings (else it is written beside it: reports/committed.py).
    replace_report: bool = False

    def describe(self) -> str:
        """The resolved settings, one per line, for the start of a run."""
        width = max(len(f.name) for f in dataclasses.fields(self))
        return "\n".join(
            f"  {f.name:<{width}}  {getattr(self, f.name)}" for f in dataclasses.fields(self)
        )

    def replace(self, **changes) -> "PipelineConfig":
        return dataclasses.replace(self, **changes)
