"""compile: simplified ONNX -> a TVM shared library for the target."""

from __future__ import annotations

import functools
import hashlib
from pathlib import Path

from pipeline import precisions
from pipeline.config import PipelineConfig
from pipeline.engine import Stage, log
from targets import Target


def tunable(target: Target, precision: str) -> bool:
    """`pipeline tune` makes records for ``precision`` on this target's device kind (pipeline/precisions.py)."""
    return precision in precisions.PLAN and precisions.PLAN[precision].tunable(target.device)


COMPILER_DIR = Path(__file__).resolve().parents[1] / "compiler"
# The precision plan decides which compiler phases a precision runs, so it is compiler source too.
PRECISION_PLAN = Path(precisions.__file__).resolve()


@functools.lru_cache(maxsize=1)
def compiler_digest() -> str:
    """sha256 of the compiler's sources (pipeline/compiler/**/*.py, and the precision plan):
    a changed schedule, pass or precision record rebuilds the artifact, where the stage
    version alone was easy to forget to bump."""
    digest = hashlib.sha256()
    for path in sorted(COMPILER_DIR.rglob("*.py")):
        digest.update(str(path.relative_to(COMPILER_DIR)).encode())
        digest.update(path.read_bytes())
    digest.update(PRECISION_PLAN.name.encode())
    digest.update(PRECISION_PLAN.read_bytes())
    return digest.hexdigest()


def settings(config: PipelineConfig, target: Target) -> dict:
    return {
        "target": target.name,
        "compiler_sha256": compiler_digest(),
        "target_json": target.tvm_target,
        "host_triple": target.host_triple,
        "precision": config.precision,
        "params_mode": config.params_mode,
        "input_size": config.input_size,
        "batch_size": config.batch_size,
        # New tuning records or new default schedules rebuild the artifact.
        **tuning_settings(config, target),
        **({"gpu_split_k": config.gpu_split_k} if target.device == "cuda" else {}),
    }


def tuning_database(config: PipelineConfig, target: Target) -> Path | None:
    """The tuning records compile applies to CPU (fp32, int8) and GPU builds (fp32, fp16): artifacts/tune/<target>/<model>/,
    else the checkout's tuning/<target>/<model>/<cpu>/, made on this CPU and timed against today's
    default schedules (pipeline/compiler/tuning/database.py says why others are not applied)."""
    if not tunable(target, config.precision) or not config.tuning_records:
        return None
    from pipeline.compiler.tuning import database

    return database.find_database(
        Path(config.artifacts).resolve(), target, database.config_model_key(config)
    )


def tuning_settings(config: PipelineConfig, target: Target) -> dict:
    if not tunable(target, config.precision):
        return {}
    from pipeline.compiler.schedules.apply import defaults_version
    from pipeline.compiler.tuning import database

    records = tuning_database(config, target)
    return {
        "tuning_database_sha256": database.database_digest(records) if records else None,
        "default_schedules": defaults_version(target.tvm_target),
    }


def _note_records_of_other_models(tuning: dict, config: PipelineConfig) -> None:
    """Records found by kernel in other models' databases (pipeline/compiler/tuning/database.py):
    say whose, and drop the tuning cost, which is the tuning of those models, not of this one
    (the report would draw their curve as this artifact's)."""
    from pipeline.compiler.records import read_meta
    from pipeline.compiler.tuning import database

    try:
        made_for = read_meta(Path(tuning["database"])).get("model_key")
    except (OSError, ValueError):  # a database without its meta.json: nothing to say
        return
    if made_for != database.config_model_key(config):
        tuning["records_of_models"] = made_for if isinstance(made_for, list) else [made_for]
        tuning["cost"] = None


def run(config: PipelineConfig, target: Target, inputs: dict[str, Path], out_dir: Path) -> dict:
    from pipeline.compiler.backend import compile_onnx

    # One line: the reason where the target has one (int8 on a GPU target), else what it offers.
    target.check_precision(config.precision)
    library = out_dir / "model.so"
    # The precision's model (model_input): int8's is the QDQ model from the quantize stage.
    info = compile_onnx(
        inputs[model_input(config)[0]], target, library, precision=config.precision,
        gpu_split_k=config.gpu_split_k if target.device == "cuda" else True,
        params_mode=config.params_mode,
        input_shape=(config.batch_size, config.in_chans, config.input_size, config.input_size),
        tuning_database=tuning_database(config, target),
    )
    if info.get("tuning", {}).get("database"):
        _note_records_of_other_models(info["tuning"], config)
    if "tuning" in info:
        counts = info["tuning"]
        log(f"[compile] {counts['tasks_from_records']} of {counts['tasks_total']} kernels from tuning records "
            f"({counts['database'] or ('no database' if config.tuning_records else 'tuning records off')}), "
            f"{counts['tasks_default']} with default schedules")
    cost = info.get("gpu_cost")
    if cost:
        from pipeline.compiler.cost import roofline_line

        log(f"[compile] {roofline_line(cost)}")
        # pipeline/compiler/split_k.py's partial GEMMs (PARTIAL_GEMM_NAME), a batch of slices of K.
        split = [k for k in cost["kernels"] if k["kernel"].startswith("split_k_matmul") and k.get("gemm")]
        if split:
            shapes = ", ".join(f"{m}x{n}x{slices * depth} in {slices}" for slices, m, n, depth in (k["gemm"] for k in split))
            log(f"[compile] split-K (MxNxK in slices of K): {shapes}; {sum(k['calls'] for k in split)} calls; "
                f"--no-gpu-split-k compiles without")
    # Paths inside the scratch directory mean nothing once it is renamed into place.
    info = {k: v for k, v in info.items() if k not in ("library", "metadata_file")}
    if info.get("params_file"):
        info["params_file"] = Path(info["params_file"]).name
    outputs = {"library": library.name}
    for path in sorted(out_dir.iterdir()):
        # The metadata, the weights file (separate params) and the CUDA source (GPU targets)
        # travel with the library.
        if path.name.endswith(".json"):
            outputs["library_metadata"] = path.name
        elif path.name.endswith(".npz"):
            outputs["params"] = path.name
        elif path.name.endswith(".cu"):
            outputs["cuda_source"] = path.name
    return {"outputs": outputs, "info": info}


def model_input(config: PipelineConfig) -> tuple[str, ...]:
    """The ONNX model the precision compiles (pipeline/precisions.py): the quantized one for
    int8, the simplified one for the float precisions."""
    return (precisions.get(config.precision).model_output,)


STAGE = Stage(
    name="compile",
    # 2: integer powers as multiplies, nvcc without fast math, model.cu and fp16 weights
    # (artifacts of version 1 computed NaN on CUDA GPUs and must not be reused);
    # 3: GPU kernels in NHWC with our depthwise and tensor-core GEMM schedules, CUDA graphs;
    # 4: GPU GEMMs on the NHWC maps with deeper pipelines, register rows in the depthwise
    # kernel, division by constants as multiplication, separate weights saved in the
    # layout the kernels read; 5: GPU LayerNorms exported in parts as one op. (The key also
    # holds compiler_sha256 now: a changed compiler rebuilds without a version bump.)
    # 6: info.tuning names the models whose records were found by kernel (records_of_models).
    version=6,
    inputs=model_input,
    outputs=("library", "library_metadata", "params", "cuda_source"),
    settings=settings,
    run=run,
)
