"""MetaSchedule for the pipeline: tuning tasks, the tuning loop, tuning databases, and the
default schedules that every task without a tuning record gets.

Like ``tvm_backend`` this module imports TVM's moving internals (MetaSchedule lives in
``tvm.s_tir.meta_schedule`` in TVM 0.27); quirks of the pinned version carry a comment
that starts with "TVM 0.27:".

A tuning database is a directory with MetaSchedule's two JSON tables and a ``meta.json``
naming the target and the TVM version that made it (a MetaSchedule database ignores the
target when it looks records up, so there is one database per target and model):

    artifacts/tune/<target>/<model-key>/   written by `pipeline tune`, read by compile
    tuning/<target>/<model-key>/<cpu>/     committed to the repository, one per CPU model
                                           (mcpu) or GPU architecture, read when the
                                           artifacts tree has none (shipped records)

        database_workload.json         MetaSchedule's workload table (one PrimFunc a line)
        database_tuning_record.json    MetaSchedule's records (schedule trace, run seconds)
        meta.json                      target JSON, TVM version, model key
        tune_state.json                per task: trials measured, best latency, finished?
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import importlib.util
import inspect
import json
import linecache
import logging
import math
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import tvm
import tvm_ffi
from tvm import relax
from tvm.ir.utils import derived_object

# TVM 0.27: MetaSchedule and the TensorIR schedule moved to tvm.s_tir.
from tvm.s_tir import meta_schedule as ms
from tvm.s_tir import Schedule
from tvm.s_tir.analysis import estimate_tir_flops

from pipeline import artifacts, tvm_backend, tvm_depthwise, tvm_prepack
from pipeline.errors import PipelineError
from targets import Target

REPO = Path(__file__).resolve().parents[1]
SHIPPED_ROOT = REPO / "tuning"
WORKLOAD_FILE = "database_workload.json"
RECORD_FILE = "database_tuning_record.json"
META_FILE = "meta.json"
STATE_FILE = "tune_state.json"
CURVE_FILE = "tune_curve.jsonl"
DATABASE_FORMAT = 1
# Bump when the default schedules change, so compiled artifacts are rebuilt.
DEFAULT_SCHEDULE_VERSION = 4
# Seconds to let a build's worker process exit before kernels are timed on this machine
# (_SettlingBuilder).
LOCAL_SETTLE_S = 2.0

log = logging.getLogger(__name__)


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr, flush=True)


@functools.lru_cache(maxsize=None)
def _warn_once(message: str) -> None:
    """A warning about a database, said once per process: compile looks it up twice (for
    its cache key and to build)."""
    _warn(message)


# ---------------------------------------------------------------------------
# TVM 0.27: tensor intrinsics load slowly enough to break MetaSchedule on a small machine.
#
# TuneContext and every LocalBuilder worker import tvm.s_tir.tensor_intrin, which parses
# ~250 TVMScript intrinsics; the parser calls inspect.stack() for each, and that reads the
# source context of every frame, scanning all of sys.modules per frame. Here (2 busy cores,
# ~2000 modules) the import takes 45-95 s, so a builder with the default 30 s timeout kills
# every worker before its first build and nothing is ever measured. The parser only reads
# the frame objects and the current line of each frame, which the stand-in below gives
# without the scan: the import takes ~4 s.


def _frames_without_source_scan(context: int = 1) -> list[inspect.FrameInfo]:
    frame = sys._getframe(1)
    frames = []
    while frame is not None:
        code = frame.f_code
        line = linecache.getline(code.co_filename, frame.f_lineno)
        frames.append(inspect.FrameInfo(
            frame, code.co_filename, frame.f_lineno, code.co_name, [line] if line else None, 0 if line else None,
        ))
        frame = frame.f_back
    return frames


def load_tensor_intrinsics() -> None:
    """Import tvm.s_tir.tensor_intrin quickly (also the LocalBuilder worker initializer),
    and register the pipeline's own VNNI intrinsic (pipeline/tvm_vnni.py)."""
    from pipeline import tvm_vnni

    tvm_vnni.register_intrinsic()
    if "tvm.s_tir.tensor_intrin" in sys.modules:
        return
    original = inspect.stack
    inspect.stack = _frames_without_source_scan
    try:
        import tvm.s_tir.tensor_intrin  # noqa: F401
    finally:
        inspect.stack = original


# ---------------------------------------------------------------------------
# Where databases live, and whether one can be used


def model_key(variant: str, input_size: int, batch_size: int, num_classes: int, in_chans: int,
              precision: str) -> str:
    """The directory name of a model's databases: every setting that changes its tasks."""
    return f"{variant}-{input_size}-b{batch_size}-c{num_classes}-in{in_chans}-{precision}"


def config_model_key(config) -> str:
    """model_key of a PipelineConfig."""
    return model_key(config.variant, config.input_size, config.batch_size, config.num_classes,
                     config.in_chans, config.precision)


def local_database_dir(artifacts_root: Path, target_name: str, key: str) -> Path:
    """Where `pipeline tune` writes: artifacts/tune/<target>/<model-key>/."""
    return Path(artifacts_root) / "tune" / target_name / key


def cpu_tag(tvm_target: dict[str, Any]) -> str:
    """What a database's records were tuned on, as a directory name: the CPU (``mcpu``) of
    a CPU target, the GPU architecture of a GPU target."""
    return str(tvm_target.get("arch") or tvm_target.get("mcpu") or "generic")


def shipped_database_dir(target_name: str, key: str, tvm_target: dict[str, Any]) -> Path:
    """Records committed to the repository: tuning/<target>/<model-key>/<cpu>/. A target
    such as x86 means whatever CPU the machine has, so one model keeps one database per CPU."""
    return SHIPPED_ROOT / target_name / key / cpu_tag(tvm_target)


def shipped_databases(target_name: str, key: str) -> list[Path]:
    """Every committed database of a target and model, one per CPU it was tuned on."""
    root = SHIPPED_ROOT / target_name / key
    return sorted(d for d in root.glob("*") if (d / WORKLOAD_FILE).is_file()) if root.is_dir() else []


def _without_cpu_model(tvm_target: dict[str, Any]) -> dict[str, Any]:
    stripped = {k: v for k, v in tvm_target.items() if k not in ("mcpu", "num-cores")}
    if isinstance(stripped.get("host"), dict):
        stripped["host"] = _without_cpu_model(stripped["host"])
    return stripped


def target_fit(made_for: dict[str, Any], target: Target) -> str:
    """How records made for the TVM target `made_for` fit `target`: "same"; "similar"
    (another CPU model or core count of the same kind and triple: a trace replays there
    and gives correct code, compiled for this CPU, but was timed on another one); else
    "foreign"."""
    if made_for == target.tvm_target:
        return "same"
    if _without_cpu_model(made_for) == _without_cpu_model(target.tvm_target):
        return "similar"
    return "foreign"


def _read_meta(db_dir: Path) -> dict[str, Any]:
    return json.loads((Path(db_dir) / META_FILE).read_text())


def database_problem(db_dir: Path, target: Target | None, *, similar_ok: bool = False) -> str | None:
    """Why the database in db_dir cannot be used for target (None: it can).

    Records made by another TVM version may not replay (schedule primitives and the IR
    printer change between releases), and records made for another target would be
    applied anyway, since MetaSchedule looks records up by workload only. With
    `similar_ok`, records of another CPU model of the same target kind are usable."""
    db_dir = Path(db_dir)
    missing = [name for name in (WORKLOAD_FILE, RECORD_FILE, META_FILE) if not (db_dir / name).is_file()]
    if missing:
        return f"{db_dir} is not a tuning database (no {', '.join(missing)})"
    try:
        meta = _read_meta(db_dir)
        made_for, made_with = meta["target_json"], meta["tvm_version"]
    except (OSError, ValueError, KeyError, TypeError):
        return f"{db_dir / META_FILE} is unreadable or incomplete"
    if made_with != tvm.__version__:
        return f"{db_dir} was tuned with TVM {made_with}, this is TVM {tvm.__version__}"
    fit = target_fit(made_for, target) if target is not None else "same"
    if fit == "foreign" or (fit == "similar" and not similar_ok):
        return (f"{db_dir} was tuned for {json.dumps(made_for, sort_keys=True)}, "
                f"not for target '{target.name}' {target.target_json()}")
    return None


def _usable_database(artifacts_root: Path, target: Target, key: str,
                     exclude: Path | None = None) -> tuple[Path, dict[str, Any]] | None:
    """The first usable database of a target and model, and the target it was made for:
    the artifacts tree's, then the repository's, those made for this exact target before
    those of another CPU model. One that exists but cannot be used is skipped with a
    warning."""
    usable = []
    for db_dir in (local_database_dir(artifacts_root, target.name, key), *shipped_databases(target.name, key)):
        if not (db_dir / WORKLOAD_FILE).is_file():
            continue
        if exclude is not None and db_dir.resolve() == Path(exclude).resolve():
            continue
        problem = database_problem(db_dir, target, similar_ok=True)
        if problem is not None:
            _warn_once(f"ignoring tuning records: {problem}")
            continue
        made_for = _read_meta(db_dir)["target_json"]
        if target_fit(made_for, target) == "same":
            return db_dir, made_for
        usable.append((db_dir, made_for))
    return usable[0] if usable else None


def find_database(artifacts_root: Path, target: Target, key: str) -> Path | None:
    """The database compile uses for a target and model (``_usable_database``); one tuned
    on another CPU model of the same kind comes with a warning: its schedules are correct
    here but were timed there."""
    found = _usable_database(artifacts_root, target, key)
    if found is None:
        return None
    db_dir, made_for = found
    if target_fit(made_for, target) != "same":
        _warn_once(f"using tuning records made on another CPU ({cpu_tag(made_for)}, this is "
                   f"{cpu_tag(target.tvm_target)}): {db_dir}; run `pipeline tune` for kernels timed on this one")
    return db_dir


def seed_database(artifacts_root: Path, target: Target, key: str, exclude: Path) -> Path | None:
    """Records `pipeline tune` starts from: the database compile would use (this CPU's
    first, else another CPU model's), other than the one being tuned."""
    found = _usable_database(artifacts_root, target, key, exclude=exclude)
    return found[0] if found is not None else None


def database_digest(db_dir: Path) -> str:
    """sha256 over the database's tables and meta: part of the compile stage's cache key."""
    digest = hashlib.sha256()
    for name in (WORKLOAD_FILE, RECORD_FILE, META_FILE):
        digest.update(name.encode())
        digest.update(bytes.fromhex(artifacts.file_sha256(Path(db_dir) / name)))
    return digest.hexdigest()


def _loads(workloads: str, records: list[str]) -> bool:
    with tempfile.TemporaryDirectory(prefix="tvm-db-check-") as scratch:
        (Path(scratch) / WORKLOAD_FILE).write_text(workloads)
        (Path(scratch) / RECORD_FILE).write_text("".join(records))
        try:
            ms.database.JSONDatabase(str(Path(scratch) / WORKLOAD_FILE), str(Path(scratch) / RECORD_FILE),
                                     allow_missing=False)
            return True
        except Exception:
            return False


def _unreplayable(workloads: str, records: list[str], indices: list[int]) -> list[int]:
    """The records among `indices` that do not load, by bisection (few are expected)."""
    if not indices or _loads(workloads, [records[i] for i in indices]):
        return []
    if len(indices) == 1:
        return indices
    middle = len(indices) // 2
    return _unreplayable(workloads, records, indices[:middle]) + _unreplayable(workloads, records, indices[middle:])


def _open_without_unreplayable(db_dir: Path, *, repair: bool) -> "ms.database.JSONDatabase | None":
    """A database without the records MetaSchedule cannot load back, or None.

    TVM 0.27 writes records that its own reader then rejects, failing the whole database
    (seen: rfactor traces of ConvNeXt-T's last LayerNorm, on 1 x 768). Those records are
    dropped with a warning: from the files themselves when `repair` (the database being
    tuned), else from a copy read once (compile, merge), leaving the files as they are."""
    workloads = (db_dir / WORKLOAD_FILE).read_text()
    records = [line for line in (db_dir / RECORD_FILE).read_text().splitlines(keepends=True) if line.strip()]
    try:
        for line in records:
            json.loads(line)
    except ValueError:  # not records TVM wrote: a corrupt file, not a TVM quirk
        return None
    dropped = set(_unreplayable(workloads, records, list(range(len(records)))))
    kept = [line for i, line in enumerate(records) if i not in dropped]
    if not dropped or not kept or not _loads(workloads, kept):
        return None
    _warn(f"{db_dir}: {len(dropped)} of {len(records)} records cannot be loaded back by TVM "
          f"{tvm.__version__} and are {'removed' if repair else 'skipped'}")
    if repair:
        artifacts.atomic_write_text(db_dir / RECORD_FILE, "".join(kept))
        (db_dir / RECORD_FILE).chmod(0o644)
        return ms.database.JSONDatabase(str(db_dir / WORKLOAD_FILE), str(db_dir / RECORD_FILE), allow_missing=False)
    with tempfile.TemporaryDirectory(prefix="tvm-db-") as scratch:
        (Path(scratch) / WORKLOAD_FILE).write_text(workloads)
        (Path(scratch) / RECORD_FILE).write_text("".join(kept))
        # Read now, into memory: nothing is committed to a database opened for reading.
        return ms.database.JSONDatabase(str(Path(scratch) / WORKLOAD_FILE), str(Path(scratch) / RECORD_FILE),
                                        allow_missing=False)


def open_database(db_dir: Path, target: Target | None, *, strict: bool,
                  repair: bool = False, similar_ok: bool = False) -> "ms.database.JSONDatabase | None":
    """Load a database; a foreign or corrupt one raises (strict) or warns and gives None.
    Records TVM cannot load back are skipped (removed from the files with `repair`)."""
    db_dir = Path(db_dir)
    problem = database_problem(db_dir, target, similar_ok=similar_ok)
    if problem is None:
        # Reading a record replays its trace, and a trace that tensorizes (the int8 VNNI
        # kernels: the pipeline's default, and MetaSchedule's own VNNI candidates) needs its
        # intrinsic registered. Loading them costs seconds, so only for such records.
        if "Tensorize" in (db_dir / RECORD_FILE).read_text():
            load_tensor_intrinsics()
        try:
            return ms.database.JSONDatabase(
                str(db_dir / WORKLOAD_FILE), str(db_dir / RECORD_FILE), allow_missing=False,
            )
        except Exception as exc:  # TVMError/ValueError from the JSON reader or the IR parser
            first = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
            problem = f"{db_dir} is corrupt ({first[:200]})"
            database = _open_without_unreplayable(db_dir, repair=repair)
            if database is not None:
                return database
    if strict:
        raise PipelineError(f"{problem}; delete it, or point to a database made by `pipeline tune`")
    _warn(f"ignoring tuning records: {problem}; building with default schedules")
    return None


def _write_json(path: Path, data: Any) -> None:
    artifacts.atomic_write_json(path, data)
    path.chmod(0o644)  # mkstemp makes 0600; databases are shared and committed


def _write_meta(db_dir: Path, target: Target, key: str, **extra: Any) -> None:
    _write_json(Path(db_dir) / META_FILE, {
        "format": DATABASE_FORMAT,
        "target": target.name,
        "target_json": target.tvm_target,
        "tvm_version": tvm.__version__,
        "model_key": key,
        **extra,
    })


def merge_databases(sources: list[Path], output: Path) -> dict[str, Any]:
    """Merge tuning databases of one target into a new one at `output`, through
    MetaSchedule's Database API (workloads are re-committed, duplicates dropped)."""
    output = Path(output)
    if len(sources) < 2:
        raise PipelineError("tune-db merge needs at least two databases")
    if output.exists() and any(output.iterdir()):
        raise PipelineError(f"{output} already exists; choose a new -o directory or delete it")
    metas = []
    for source in sources:
        problem = database_problem(source, None)
        if problem is not None:
            raise PipelineError(f"cannot merge: {problem}")
        metas.append(_read_meta(source))
    targets = {json.dumps(meta["target_json"], sort_keys=True) for meta in metas}
    if len(targets) > 1:
        raise PipelineError(
            "cannot merge databases of different targets ("
            + "; ".join(f"{s}: {json.dumps(m['target_json'], sort_keys=True)}" for s, m in zip(sources, metas))
            + "): MetaSchedule would apply one target's records to the other"
        )
    keys = sorted({meta.get("model_key", "?") for meta in metas})

    output.parent.mkdir(parents=True, exist_ok=True)
    temp = Path(tempfile.mkdtemp(prefix=f".{output.name}.tmp-", dir=output.parent))
    try:
        merged = ms.database.JSONDatabase(str(temp / WORKLOAD_FILE), str(temp / RECORD_FILE), allow_missing=True)
        seen: set[tuple[int, str]] = set()
        counts = {"records_in": 0, "records_out": 0}
        for source in sources:
            database = open_database(source, None, strict=True)
            for record in database.get_all_tuning_records():
                counts["records_in"] += 1
                workload_mod = record.workload.mod
                # The trace as text: record.as_json() cannot convert the IndexMap of a
                # layout rewrite (TVM 0.27), its printed form names it.
                identity = (tvm_ffi.structural_hash(workload_mod), str(record.trace),
                            tuple(float(s) for s in record.run_secs or ()))
                if identity in seen:
                    continue
                seen.add(identity)
                workload = merged.commit_workload(workload_mod)
                merged.commit_tuning_record(ms.database.TuningRecord(
                    record.trace, workload, record.run_secs, record.target, record.args_info,
                ))
                counts["records_out"] += 1
        meta = dict(metas[0])
        meta.update(merged_from=[str(s) for s in sources], model_key=keys[0] if len(keys) == 1 else keys)
        _write_json(temp / META_FILE, meta)
        temp.chmod(0o755)
        if output.exists():
            output.rmdir()
        os.replace(temp, output)
    except BaseException:
        shutil.rmtree(temp, ignore_errors=True)
        raise
    return {"output": str(output), "workloads": len(merged_workloads(output)), **counts}


def ship_database(source: Path, output: Path | None = None) -> dict[str, Any]:
    """Copy a tuning database into the repository's tuning/<target>/<model-key>/<cpu>/ (or
    `output`), pruned to the best record of each kernel, with its meta, state and curve. An
    earlier database there is replaced only once the new one is complete."""
    source = Path(source)
    problem = database_problem(source, None)
    if problem is not None:
        raise PipelineError(f"cannot ship: {problem}")
    meta = _read_meta(source)
    output = Path(output) if output is not None else shipped_database_dir(
        meta["target"], meta["model_key"], meta["target_json"])
    database = open_database(source, None, strict=True)
    output.parent.mkdir(parents=True, exist_ok=True)
    temp = Path(tempfile.mkdtemp(prefix=f".{output.name}.tmp-", dir=output.parent))
    try:
        pruned = ms.database.JSONDatabase(str(temp / WORKLOAD_FILE), str(temp / RECORD_FILE), allow_missing=True)
        database.dump_pruned(pruned)
        for name in (WORKLOAD_FILE, RECORD_FILE):
            (temp / name).chmod(0o644)
        for name in (META_FILE, STATE_FILE, CURVE_FILE):
            if (source / name).is_file():
                shutil.copyfile(source / name, temp / name)
                (temp / name).chmod(0o644)
        temp.chmod(0o755)
        if output.exists():
            shutil.rmtree(output)
        os.replace(temp, output)
    except BaseException:
        shutil.rmtree(temp, ignore_errors=True)
        raise
    return {"output": str(output), "records_in": len(database), "records_out": len(pruned)}


def merged_workloads(db_dir: Path) -> list[str]:
    """The lines of a database's workload table (one per distinct PrimFunc)."""
    text = (Path(db_dir) / WORKLOAD_FILE).read_text()
    return [line for line in text.splitlines() if line.strip()]


# ---------------------------------------------------------------------------
# Tasks: the distinct PrimFuncs of the fused model, as compile produces them


@dataclass
class Task:
    name: str
    mod: tvm.IRModule
    # How many times the model calls it, and its floating-point operations per call.
    weight: int
    flops: float

    @property
    def key(self) -> str:
        """The task's name with its workload's hash, what tune_state.json is keyed by: names
        number kernels in graph order and move when the graph changes (a new layout pass),
        and a resumed run must not give one kernel's progress to another."""
        return f"{self.name}#{tvm_ffi.structural_hash(self.mod) % 2**32:08x}"

    @property
    def score(self) -> float:
        """Where the latency is: FLOPs times occurrences (a tie-breaker of 1 FLOP keeps
        FLOP-free data movement tasks ordered by how often they run)."""
        return (self.flops + 1.0) * self.weight


def fused_module(
    onnx_path: Path, target: Target, input_shape: tuple[int, ...] | None = None,
    rewrites: tuple[tuple[str, list], ...] = (),
) -> tuple[tvm.IRModule, tvm.target.Target]:
    """The model after compile's phases up to fusion: the PrimFuncs that compile schedules.

    Uses compile's own import and pass list (tvm_backend.relax_phases, after ``rewrites``
    as compile_onnx runs them: the INT8 lowering), so the tasks tuned here are exactly the
    functions compile looks up (with embedded weights, the default)."""
    onnx_path = Path(onnx_path)
    model = tvm_backend._load_onnx(onnx_path)
    name, shape, dtype = tvm_backend._resolve_input(model, None, input_shape)
    mod, _, param_values = tvm_backend._import_relax(model, onnx_path, name, shape, dtype)
    main = mod["main"]
    num_input = int(main.attrs["num_input"])
    mod = relax.transform.BindParams("main", dict(zip(main.params[num_input:], param_values)))(mod)
    tvm_target = tvm.target.Target(target.tvm_target)
    with tvm_target:
        for phase, passes in [*rewrites, *tvm_backend.relax_phases(tvm_target)]:
            if passes:
                mod = tvm.transform.Sequential(passes, name=phase)(mod)
            if phase == "fuse":
                return mod, tvm_target
    raise RuntimeError("tvm_backend.relax_phases has no 'fuse' phase")


def extract_tasks(mod: tvm.IRModule, tvm_target: tvm.target.Target) -> list[Task]:
    """The tuning tasks of a fused module, most latency first (FLOPs x occurrences)."""
    tasks = []
    for extracted in ms.relax_integration.extract_tasks(mod, tvm_target):
        task_mod = extracted.dispatched[0]
        try:
            flops = float(estimate_tir_flops(task_mod))
        except Exception:  # data movement without arithmetic
            flops = 0.0
        tasks.append(Task(str(extracted.task_name), task_mod, int(extracted.weight), flops))
    tasks.sort(key=lambda task: (-task.score, task.name))
    return tasks


# ---------------------------------------------------------------------------
# Applying schedules at compile time: tuning records first, defaults for the rest


def _is_scheduled(func) -> bool:
    return bool(func.attrs is not None and func.attrs.get("tirx.is_scheduled", False))


def schedule_module(
    mod: tvm.IRModule, tvm_target: tvm.target.Target, target: Target, database_dir: Path | None,
) -> tuple[tvm.IRModule, dict[str, Any]]:
    """Give every PrimFunc a schedule: its tuning record where the database has one, a
    default schedule (``apply_default_schedules``) otherwise. Call inside ``with tvm_target``.

    Returns the module and the counts compile reports."""
    total = sum(isinstance(f, tvm.tirx.PrimFunc) and not _is_scheduled(f) for f in mod.functions.values())
    # find_database chose it, records of another CPU model included.
    database = (open_database(database_dir, target, strict=False, similar_ok=True)
                if database_dir is not None else None)
    from_records = 0
    if database is not None:
        with database:
            # Looks each PrimFunc up by structure; found ones get "tirx.is_scheduled".
            mod = relax.transform.MetaScheduleApplyDatabase(enable_warning=False)(mod)
        # Records made before weights were marked layout free (pipeline/tvm_prepack.py).
        mod = tvm_prepack.apply_unmarked_records(mod, database)
        from_records = sum(isinstance(f, tvm.tirx.PrimFunc) and _is_scheduled(f) for f in mod.functions.values())
    mod, defaults = apply_default_schedules(mod, tvm_target)
    return mod, {
        "database": str(database_dir) if database is not None else None,
        "tasks_total": total,
        "tasks_from_records": from_records,
        "tasks_default": total - from_records,
        # Of the defaults: tiled (dense contractions), VNNI matmuls, depthwise convolutions and
        # kept as lowered (see below).
        "default_tiled": defaults["tiled"],
        "default_vnni": defaults["vnni"],
        "default_depthwise": defaults["depthwise"],
        "default_as_lowered": defaults["as_lowered"],
        "default_schedule_version": DEFAULT_SCHEDULE_VERSION,
        "cost": tuning_cost(read_curve(database_dir)) if database is not None else None,
    }


# Default schedules, chosen by measurement (znver4, 2 busy cores: every PrimFunc of
# ConvNeXt-atto at 224 built alone and timed with time_evaluator, lowered vs candidates):
#
#   * Dense contractions (the 1x1-conv matmuls with their bias/GELU epilogues, the 2x2
#     downsampling convolutions) are 6-60x faster with MetaSchedule's own CPU sketch
#     (multi-level tiling "SSRSRS", epilogue fused, outer loops parallel, inner vectorized)
#     and these fixed decisions: innermost output tile = one vector register of lanes,
#     4 rows x 8 row-blocks, inner reduction 4, unroll 64. A randomly sampled sketch was
#     2-10x worse than these on the same tasks; fixed decisions also make builds repeatable.
#   * Since compile computes channels-last (pipeline/tvm_layout.py), the stem and the
#     downsampling layers are patch GEMMs (tiled as above) and the depthwise 7x7
#     convolutions get their own register-tiled schedule (pipeline/tvm_depthwise.py).
#   * LayerNorms, means and the data movement tasks were as fast or faster as lowered
#     (LLVM vectorizes the plain loops) than with any generic schedule tried: the same
#     sketch, parallel+vectorize+unroll alone, and random sketches were 1.2-20x slower.
#     They keep the lowered loops.
#
# Whole model, one inference (same machine and load): atto 224 untuned ~1000 ms, with these
# defaults ~71 ms, ONNX Runtime ~65 ms; micro 64: 7.6 ms, 1.2 ms, 0.21 ms. Records replace them.
_MIN_CONV_REDUCTION = 64
# Accumulator types the tiled default was measured for. Integer kernels need it most: the
# int8 x int8 -> int32 kernels of pipeline/tvm_int8.py as lowered took 2.47 s per
# ConvNeXt-T image (znver4, 2 threads), tiled 0.12 s; micro at 32: 0.28 -> 0.20 ms.
_TILED_ACCUMULATORS = ("float32", "int32")
_UNROLL_STEPS = (0, 16, 64, 512)
_DEFAULT_DECISIONS = {"rows": 4, "row_blocks": 8, "inner_reduction": 4, "unroll": 64}


def _dense_contraction(func) -> bool:
    """Whether the function's main computation is a dense contraction worth tiling: every
    operand is reused across some output axis (so not depthwise), and it is a matmul (one
    reduction axis) or a convolution with a reduction of at least _MIN_CONV_REDUCTION."""
    from tvm.s_tir.analysis import find_anchor_sblock
    from tvm.tirx.analysis import undefined_vars

    block = find_anchor_sblock(tvm.IRModule({"main": func}))
    if block is None:
        return False
    # TVM 0.27: IterVar.iter_type 0 = data parallel, 2 = commutative reduction.
    # Unit axes (keepdims of a mean) index nothing and reuse nothing.
    spatial = {iv.var.name for iv in block.iter_vars if int(iv.iter_type) == 0 and int(iv.dom.extent) > 1}
    reduce = [iv for iv in block.iter_vars if int(iv.iter_type) == 2]
    if not reduce or not spatial:
        return False
    if any(str(region.source.dtype) not in _TILED_ACCUMULATORS for region in block.writes):
        return False
    written = {region.source.name for region in block.writes}
    operands = [region for region in block.reads if region.source.name not in written]
    if len(operands) < 2:  # a reduction of one tensor (mean, sum) contracts nothing
        return False
    reused = all(
        not spatial <= {var.name for r in region.region for var in undefined_vars(r.min)}
        for region in operands
    )
    extent = math.prod(int(iv.dom.extent) for iv in reduce)
    return reused and (len(reduce) == 1 or extent >= _MIN_CONV_REDUCTION)


def _largest_divisor(n: int, cap: int) -> int:
    return max(d for d in range(1, max(1, min(n, cap)) + 1) if n % d == 0)


def _vector_lanes(tvm_target: tvm.target.Target, bits: int = 32) -> int:
    try:
        width = int(tvm.target.codegen.llvm_get_vector_width(tvm_target))
    except Exception:  # an LLVM without this target: assume 128-bit vectors
        width = 128
    return max(1, width // bits)


def _default_space_generator() -> "ms.space_generator.PostOrderApply":
    """MetaSchedule's CPU sketch reduced to one design space: inline elementwise ops,
    multi-level tiling with the epilogue fused at the second level, then
    parallelize/vectorize/unroll, and the weights' layout rewritten to match the tiles."""
    rule = ms.schedule_rule
    return ms.space_generator.PostOrderApply(
        sch_rules=[
            rule.AutoInline(
                into_producer=False, into_consumer=True, inline_const_tensor=True,
                disallow_if_then_else=True, require_injective=True, require_ordered=True,
                disallow_op=["tirx.exp"],
            ),
            rule.MultiLevelTiling(
                structure="SSRSRS", tile_binds=None, max_innermost_factor=64, reuse_read=None,
                reuse_write=rule.ReuseType(req="must", levels=[2], scope="global"),
            ),
            rule.ParallelizeVectorizeUnroll(
                max_jobs_per_core=16, max_vectorize_extent=64, unroll_max_steps=list(_UNROLL_STEPS),
                unroll_explicit=True,
            ),
        ],
        postprocs=[
            ms.postproc.DisallowDynamicLoop(),
            ms.postproc.RewriteParallelVectorizeUnroll(),
            ms.postproc.RewriteReductionBlock(),
            # Weights packed in the tiles' order (pipeline/tvm_prepack.py).
            ms.postproc.RewriteLayout(),
        ],
        mutator_probs={},
    )


def _tiled_default(func, tvm_target: tvm.target.Target, lanes: int) -> Schedule | None:
    """The tiled default schedule of a dense contraction, or None if the sketch fails."""
    load_tensor_intrinsics()
    mod = tvm.IRModule({"main": func.with_attr("global_symbol", "main")})
    context = ms.TuneContext(
        mod=mod, target=tvm_target, space_generator=_default_space_generator(), task_name="default",
        num_threads=1, rand_state=1,
    )
    spaces = context.space_generator.generate_design_space(mod)
    if len(spaces) != 1:
        return None
    trace = spaces[0].trace
    # Each tiled block's loops are split in loop order: 4-way for spatial loops, 2-way for
    # reduction loops. Its last spatial loop is the contiguous output axis (vector lanes),
    # the one before it gives the rows of the register tile.
    roles: list[str] = []
    group: list[int] = []
    for inst in trace.insts:
        kind = inst.kind.name
        if kind == "GetLoops" and group:
            roles[group[-1]] = "lanes"
            if len(group) > 1:
                roles[group[-2]] = "rows"
            group = []
        if kind == "SamplePerfectTile":
            if int(inst.attrs[0]) == 4:
                group.append(len(roles))
                roles.append("outer")
            else:
                roles.append("reduction")
    if group:
        roles[group[-1]] = "lanes"
        if len(group) > 1:
            roles[group[-2]] = "rows"
    if not roles:
        return None
    sch = Schedule(mod, seed=1)
    position = iter(roles)
    decisions = _DEFAULT_DECISIONS

    def decide(inst, inputs, attrs, decision):
        kind = inst.kind.name
        if kind == "SamplePerfectTile":
            role = next(position)
            extent = int(sch.get(inputs[0]).extent)
            if role == "lanes":
                inner = _largest_divisor(extent, lanes)
                return [extent // inner, 1, 1, inner]
            if role == "rows":
                rows = _largest_divisor(extent, decisions["rows"])
                blocks = _largest_divisor(extent // rows, decisions["row_blocks"])
                return [extent // rows // blocks, 1, blocks, rows]
            if role == "reduction":
                inner = _largest_divisor(extent, decisions["inner_reduction"])
                return [extent // inner, inner]
            return [extent, 1, 1, 1]
        if kind == "SampleCategorical":
            candidates = [int(c) for c in attrs[0]]
            return candidates.index(decisions["unroll"]) if decisions["unroll"] in candidates else decision
        return decision

    trace.apply_to_schedule(sch, remove_postproc=True, decision_provider=decide)
    # Marked as postprocessing in the trace, as MetaSchedule does: a search seeded with this
    # record replays it without them and runs them again (RewriteLayout twice fails).
    sch.enter_postproc()
    if not all(postproc.apply(sch) for postproc in context.space_generator.postprocs):
        return None
    return sch


def _vnni_default(func, tvm_target: tvm.target.Target) -> Schedule | None:
    """The VNNI matmul kernels of pipeline/tvm_int8.py (x86 with AVX-512 VNNI) have their own
    schedule (pipeline/tvm_vnni.py): the generic sketch would not tensorize them."""
    from pipeline import tvm_vnni

    if tvm_target.kind.name != "llvm" or "gpu" in tvm_target.keys:
        return None
    try:
        return tvm_vnni.schedule_vnni_matmul(func)
    except Exception as exc:  # a fused shape the schedule does not handle: the generic default
        log.warning("VNNI matmul keeps the generic schedule: %s", exc)
        return None


def default_schedule(task_mod: tvm.IRModule, tvm_target: tvm.target.Target) -> tuple[Schedule, str]:
    """The default schedule of a task ({"main": PrimFunc}) and its kind: "tiled" for dense
    contractions, "vnni" for the int8 VNNI matmuls, "depthwise" for channels-last depthwise
    convolutions (pipeline/tvm_depthwise.py), else "as_lowered" (an empty schedule).
    Its trace is a tuning record's."""
    func = task_mod["main"]
    sch = _vnni_default(func, tvm_target)
    if sch is not None:
        return sch, "vnni"
    is_cpu = tvm_target.kind.name == "llvm" and "gpu" not in tvm_target.keys
    if is_cpu and tvm_depthwise.is_depthwise_nhwc(func):
        sch = tvm_depthwise.depthwise_nhwc_schedule(task_mod, _vector_lanes(tvm_target))
        if sch is not None:
            return sch, "depthwise"
    if is_cpu and _dense_contraction(func):
        try:
            sch = _tiled_default(func, tvm_target, _vector_lanes(tvm_target))
            if sch is not None:
                return sch, "tiled"
        except Exception as exc:  # a sketch that does not apply keeps the lowered loops
            log.info("no tiled default: %s", exc)
    sch = Schedule(task_mod, seed=1)
    # TVM 0.27: a record with an empty trace is "invalid" and never looked up; fetching the
    # root block changes nothing and makes the lowered loops a record like any other.
    sch.get_sblock("root")
    return sch, "as_lowered"


def apply_default_schedules(mod: tvm.IRModule, tvm_target: tvm.target.Target) -> tuple[tvm.IRModule, dict[str, int]]:
    """Default schedules for every PrimFunc not scheduled yet (see the notes above).

    CPU (LLVM) targets only: GPU targets get dlight's rules in compile's schedule phase."""
    counts = {"tiled": 0, "vnni": 0, "depthwise": 0, "as_lowered": 0}
    pending = [(gv, f) for gv, f in mod.functions_items() if isinstance(f, tvm.tirx.PrimFunc) and not _is_scheduled(f)]
    if tvm_target.kind.name != "llvm" or "gpu" in tvm_target.keys:
        counts["as_lowered"] = len(pending)
        return mod, counts
    for gv, func in pending:
        sch, kind = default_schedule(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), tvm_target)
        counts[kind] += 1
        if kind != "as_lowered":
            scheduled = sch.mod["main"]
            symbol = func.attrs.get("global_symbol") if func.attrs is not None else None
            scheduled = scheduled.with_attr("global_symbol", symbol) if symbol else scheduled.without_attr("global_symbol")
            mod[gv] = scheduled.with_attr("tirx.is_scheduled", True)
    return mod, counts


# ---------------------------------------------------------------------------
# The tuning loop


@dataclass(frozen=True)
class TuneSettings:
    """Everything `pipeline tune` was asked, resolved; printed before work starts."""

    trials: int | None = None  # total this run; None: trials_per_task for each task
    trials_per_task: int = 64
    time_budget_s: float | None = None
    max_tasks: int | None = None
    resume: bool = False
    rpc_tracker: str | None = None
    rpc_key: str | None = None
    rpc_timeout_s: float = 30.0
    # Candidates built and measured per round; a task stops after `patience` rounds
    # that improve its best latency by less than `min_improvement`.
    round_trials: int = 16
    patience: int = 2
    min_improvement: float = 0.01
    builder_timeout_s: float = 300.0
    runner_timeout_s: float = 60.0
    population: int = 256
    seed: int = 0

    def describe(self) -> str:
        width = max(len(f.name) for f in dataclasses.fields(self))
        return "\n".join(f"  {f.name:<{width}}  {getattr(self, f.name)}" for f in dataclasses.fields(self))


def _export_library(cross_compiler: str | None, mod) -> str:
    """LocalBuilder export: a shared library linked for the target (cross compiler or cc)."""
    from tvm.support import cc

    directory = tempfile.mkdtemp(prefix="tvm-tune-build-")
    path = os.path.join(directory, "candidate.so")
    mod.export_library(path, fcompile=cc.cross_compiler(cross_compiler) if cross_compiler else None)
    return path


@derived_object
class _SettlingBuilder(ms.builder.PyBuilder):
    """A builder that returns only once this machine is quiet enough to time kernels.

    LocalBuilder's worker process is still exiting when build() returns, and a process
    busy on one of the cores a kernel is timed on stalls the kernel's thread barrier for
    a scheduler tick. On two cores, the candidates timed in the next ~1.5 s came out 2-4x
    slow (ConvNeXt-T's largest GEMM: 2.0-2.4 ms instead of 0.60), which misled the search
    and buried good records."""

    def __init__(self, builder: "ms.builder.Builder", settle_s: float):
        super().__init__()
        self.builder, self.settle_s = builder, settle_s

    def build(self, build_inputs):
        results = self.builder.build(build_inputs)
        time.sleep(self.settle_s)
        return results


def _builder(target: Target, settings: TuneSettings) -> "ms.builder.Builder":
    builder = ms.builder.LocalBuilder(
        max_workers=1,
        timeout_sec=settings.builder_timeout_s,
        initializer=load_tensor_intrinsics,
        f_export=functools.partial(_export_library, target.cross_compiler),
    )
    # Candidates timed on a device over RPC do not share its cores with the build.
    return builder if settings.rpc_tracker is not None else _SettlingBuilder(builder, LOCAL_SETTLE_S)


def _evaluator() -> "ms.runner.EvaluatorConfig":
    return ms.runner.EvaluatorConfig(number=3, repeat=3, min_repeat_ms=50, enable_cpu_cache_flush=False)


def _runner(target: Target, settings: TuneSettings):
    if settings.rpc_tracker is None:
        # Candidates are timed in worker processes that inherit TVM_NUM_THREADS: on as
        # many cores as the artifact will run on (runtime_only.configure_cpu_threads).
        from pipeline.runtime_only import configure_cpu_threads

        configure_cpu_threads()
        return ms.runner.LocalRunner(timeout_sec=settings.runner_timeout_s, evaluator_config=_evaluator())
    from pipeline.rpc import parse_tracker

    host, port = parse_tracker(settings.rpc_tracker)
    return ms.runner.RPCRunner(
        rpc_config=ms.runner.RPCConfig(
            tracker_host=host, tracker_port=port, tracker_key=settings.rpc_key or target.rpc_key or target.name,
            session_priority=1, session_timeout_sec=int(settings.runner_timeout_s),
        ),
        evaluator_config=_evaluator(),
        max_workers=1,
    )


def check_rpc(target: Target, settings: TuneSettings) -> None:
    """Before any work: a device target needs a tracker, and the tracker must answer and
    have a device registered under the key."""
    key = settings.rpc_key or target.rpc_key or target.name
    connect_hint = (
        f"start a tracker (`python -m tvm.exec.rpc_tracker --host 0.0.0.0 --port 9190`), on the board run "
        f"`python -m tvm.exec.rpc_server --tracker HOST:9190 --key {key}`, then pass "
        f"--rpc-tracker HOST:9190 --rpc-key {key}"
    )
    if settings.rpc_tracker is None:
        if target.runner == "rpc":
            raise PipelineError(f"target '{target.name}' is measured on the device itself, through an RPC tracker; {connect_hint}")
        return
    from tvm import rpc

    from pipeline.rpc import check_tracker, parse_tracker

    host, port = parse_tracker(settings.rpc_tracker)
    check_tracker(host, port, settings.rpc_timeout_s)
    try:
        session = rpc.connect_tracker(host, port)
        # TVM 0.27: TrackerSession keeps its socket in ._sock, with no timeout of its own.
        session._sock.settimeout(settings.rpc_timeout_s)
        summary = session.summary()
        session.close()
    except (OSError, RuntimeError) as exc:
        raise PipelineError(f"the RPC tracker at {host}:{port} did not answer a summary request ({exc}); {connect_hint}") from None
    free = int(summary.get("queue_info", {}).get(key, {}).get("free", 0))
    registered = [info["key"].split(":", 1)[-1] for info in summary.get("server_info", [])]
    if key not in registered and free == 0:
        raise PipelineError(
            f"no device with key '{key}' is registered with the RPC tracker at {host}:{port} "
            f"(registered: {', '.join(sorted(set(registered))) or 'none'}); {connect_hint}"
        )


@derived_object
class _RoundResults(ms.measure_callback.PyMeasureCallback):
    """Collects what one round measured: run seconds of successes, error messages."""

    def __init__(self) -> None:
        super().__init__()
        self.seconds: list[float] = []
        self.errors: list[str] = []

    def apply(self, task_scheduler, task_id, measure_candidates, builder_results, runner_results) -> None:
        for built, ran in zip(builder_results, runner_results):
            if built.error_msg is not None:
                self.errors.append(str(built.error_msg))
            elif ran.error_msg is not None:
                self.errors.append(str(ran.error_msg))
            elif ran.run_secs:
                runs = sorted(float(s) for s in ran.run_secs)
                self.seconds.append(runs[len(runs) // 2])


# Statuses a resumed run does not reopen: stopped improving, nothing left to try, or kept on
# a schedule of the pipeline's own (VNNI).
FINISHED = ("converged", "exhausted", "kept")


@dataclass
class TaskProgress:
    name: str
    flops: float
    weight: int
    trials: int = 0
    best_s: float | None = None
    # The default schedule, measured once as a record of its own: compile applies the
    # fastest record, so tuning can never make a task slower than its default.
    default_s: float | None = None
    # The best record of the database tuning started from (pipeline tune's seed: records
    # of this model shipped for this or another CPU), replayed and timed on this machine.
    seed_s: float | None = None
    status: str = "pending"  # pending, tuning, converged, done (its trials), exhausted, kept, failed

    def as_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _fmt_duration(seconds: float) -> str:
    seconds = max(0, int(seconds))
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


def _fmt_latency(seconds: float | None, flops: float) -> str:
    if seconds is None:
        return "none yet"
    rate = f", {flops / seconds / 1e9:.1f} GFLOP/s" if flops > 0 else ""
    return f"{seconds * 1e3:.3f} ms{rate}"


def _load_state(db_dir: Path) -> dict[str, TaskProgress]:
    path = Path(db_dir) / STATE_FILE
    if not path.is_file():
        return {}
    try:
        raw = json.loads(path.read_text())["tasks"]
        return {name: TaskProgress(**entry) for name, entry in raw.items()}
    except (OSError, ValueError, KeyError, TypeError):
        _warn(f"{path} is unreadable; tasks are tuned as if none had been")
        return {}


def _save_state(db_dir: Path, state: dict[str, TaskProgress], command: str) -> None:
    _write_json(Path(db_dir) / STATE_FILE, {
        "command": command, "updated": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "tasks": {name: progress.as_json() for name, progress in state.items()},
    })


def _append_curve(db_dir: Path, state: dict[str, TaskProgress], started: float) -> None:
    """One point of the tuning curve per round: all trials so far against the model's
    estimated latency (sum over measured kernels of calls x best time), for the reports."""
    measured = [p for p in state.values() if (p.best_s or p.default_s) is not None]
    point = {
        "trials": sum(p.trials for p in state.values()),
        "best_ms": 1e3 * sum(p.weight * (p.best_s if p.best_s is not None else p.default_s) for p in measured),
        "kernels_measured": len(measured),
        "seconds": round(time.monotonic() - started, 1),
        "date": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    with open(Path(db_dir) / CURVE_FILE, "a") as f:
        f.write(json.dumps(point) + "\n")


def read_curve(db_dir: Path) -> list[dict[str, Any]]:
    """The points _append_curve wrote; [] when there are none or the file is unreadable."""
    try:
        lines = (Path(db_dir) / CURVE_FILE).read_text().splitlines()
        return [json.loads(line) for line in lines if line.strip()]
    except (OSError, ValueError):
        return []


def tuning_cost(curve: list[dict[str, Any]], within: float = 0.10) -> dict[str, Any] | None:
    """What tuning cost: trials and wall time in all, and to first come within ``within``
    (10%) of the final estimated latency. None without a curve.

    Only points that cover every kernel measured by the end count (before that the
    estimate leaves kernels out); the clock restarts with each resumed run, so seconds
    are summed across runs."""
    if not curve:
        return None
    offset, last, points = 0.0, 0.0, []
    for point in curve:
        seconds = float(point.get("seconds") or 0.0)
        if seconds < last:  # a new (resumed) run started its clock again
            offset += last
        last = seconds
        points.append((int(point["trials"]), offset + seconds, float(point["best_ms"]), point.get("kernels_measured")))
    kernels = points[-1][3]
    complete = [p for p in points if p[3] == kernels] or points
    final_ms = complete[-1][2]
    reached = next(p for p in complete if p[2] <= final_ms * (1 + within))
    return {
        "final_estimate_ms": round(final_ms, 3),
        "trials": points[-1][0],
        "seconds": round(points[-1][1], 1),
        "within": within,
        "trials_to_within": reached[0],
        "seconds_to_within": round(reached[1], 1),
    }


def _args_info(sch: Schedule) -> list:
    """The arguments a scheduled kernel is built and timed with: as MetaSchedule does, those
    of the kernel without its weight layout rewrite, which takes the weights packed."""
    return ms.arg_info.ArgInfo.from_entry_func(sch.mod, remove_preproc=True)


def _median(values) -> float:
    ordered = sorted(float(v) for v in values)
    return ordered[len(ordered) // 2]


def _best_record_seconds(database, task: Task) -> float | None:
    if not database.has_workload(task.mod):
        return None
    records = database.get_top_k(database.commit_workload(task.mod), 1)
    if not records or not records[0].run_secs:
        return None
    return _median(records[0].run_secs)


class _CtrlC:
    """Ctrl-C during tuning: the first stops after the round in flight (its records are
    measured and kept), a second stops at once. TVM 0.27: a KeyboardInterrupt raised inside
    MetaSchedule's C++ loop (in a Python callback) comes out as a bare RuntimeError, so the
    first one must not be raised there."""

    def __init__(self, say: Callable[[str], None]):
        self.say = say
        self.requested = False
        self.previous = None

    def __enter__(self) -> "_CtrlC":
        if threading.current_thread() is threading.main_thread():
            self.previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        self.say("[tune] Ctrl-C: stopping after the round in flight (Ctrl-C again stops now); records are kept")

    def __exit__(self, *exc) -> None:
        if self.previous is not None:
            signal.signal(signal.SIGINT, self.previous)


def tune(
    onnx_path: Path,
    target: Target,
    db_dir: Path,
    key: str,
    settings: TuneSettings,
    *,
    input_shape: tuple[int, ...] | None = None,
    rewrites: tuple[tuple[str, list], ...] = (),
    seed_dir: Path | None = None,
    command: str = "",
    say: Callable[[str], None] = _say,
) -> dict[str, Any]:
    """Tune the model's tasks for target into the database at db_dir.

    Tasks go most latency first; each gets up to trials_per_task trials in rounds and stops
    early once a round no longer improves it. Every measured record is in the database as
    soon as it is measured, so an interruption (Ctrl-C, a tracker that goes away) loses
    only the round in flight; `resume` continues where the state file says it stopped.

    With `seed_dir` (another database of this model, e.g. the one shipped for another CPU
    model), each task's best record there is timed here and added first: the search starts
    from it (MetaSchedule seeds its population with the best measured records) and the
    task can only get faster than it."""
    db_dir = Path(db_dir)
    started = time.monotonic()
    # LocalBuilder ships work to its workers with cloudpickle; the cost model is XGBoost.
    missing = [name for name in ("cloudpickle", "xgboost") if importlib.util.find_spec(name) is None]
    if missing:
        raise PipelineError(
            f"tuning needs the Python packages {', '.join(missing)}; run `make install` "
            f"(or `pip install cloudpickle xgboost-cpu`)"
        )
    check_rpc(target, settings)
    has_records = (db_dir / RECORD_FILE).is_file() and (db_dir / RECORD_FILE).stat().st_size > 0
    if has_records and not settings.resume:
        raise PipelineError(
            f"{db_dir} holds records of an earlier tuning run; pass --resume to continue it, "
            f"or delete the directory to start over"
        )
    if settings.resume and (db_dir / META_FILE).is_file():
        problem = database_problem(db_dir, target)
        if problem is not None:
            raise PipelineError(f"cannot resume: {problem}; delete the directory to start over")
    db_dir.mkdir(parents=True, exist_ok=True)
    _write_meta(db_dir, target, key, onnx_sha256=artifacts.file_sha256(onnx_path))
    for name in (WORKLOAD_FILE, RECORD_FILE):
        (db_dir / name).touch()
    load_tensor_intrinsics()
    database = open_database(db_dir, target, strict=True, repair=True)

    seed_database = None
    if seed_dir is not None:
        seed_database = open_database(seed_dir, target, strict=False, similar_ok=True)
        if seed_database is not None:
            say(f"[tune] starting from the records of {seed_dir} ({cpu_tag(_read_meta(seed_dir)['target_json'])})")

    mod, tvm_target = fused_module(onnx_path, target, input_shape, rewrites)
    all_tasks = [_in_stored_names(task, database, seed_database) for task in extract_tasks(mod, tvm_target)]
    state = _load_state(db_dir) if settings.resume else {}
    chosen = all_tasks[: settings.max_tasks] if settings.max_tasks else all_tasks
    for task in all_tasks:
        state.setdefault(task.key, TaskProgress(task.name, task.flops, task.weight))
    # "done" is a task that used its trials: a run with more trials per task continues it.
    todo = [t for t in chosen if state[t.key].status not in FINISHED
            and state[t.key].trials < settings.trials_per_task]
    budget_trials = settings.trials if settings.trials is not None else settings.trials_per_task * len(todo)
    say(f"[tune] {len(all_tasks)} tasks for {target.name}; tuning {len(todo)} "
        f"({len(chosen) - len(todo)} already done) with up to {budget_trials} trials -> {db_dir}")

    tuner = _Tuner(target, tvm_target, settings, database, db_dir, command, say)
    stop_reason = None
    with _CtrlC(say) as ctrl_c:
        try:
            # First the default schedule of every chosen task (and its seed record), timed
            # as records: the baselines each task's tuning must beat.
            for task in chosen:
                if ctrl_c.requested:
                    stop_reason = "interrupted"
                    break
                tuner.measure_baselines(task, state[task.key], seed_database)
                _save_state(db_dir, state, command)
            todo = [t for t in todo if state[t.key].status not in FINISHED]  # measure_baselines may keep one
            for index, task in enumerate(todo if stop_reason is None else [], start=1):
                stop_reason = tuner.tune_task(task, state, index, len(todo), budget_trials, started, ctrl_c)
                _save_state(db_dir, state, command)
                if stop_reason:
                    break
        except BaseException as exc:
            _save_state(db_dir, state, command)
            if not (ctrl_c.requested or isinstance(exc, KeyboardInterrupt)):
                raise
            stop_reason = "interrupted"
    summary = {
        "database": str(db_dir),
        "tasks_total": len(all_tasks),
        "tasks_tuned": sum(1 for t in all_tasks if state[t.key].trials > 0),
        "trials": tuner.spent,
        "records": len(database),
        "stopped": stop_reason,
        "seconds": round(time.monotonic() - started, 1),
        "tasks": [state[t.key].as_json() for t in all_tasks],
    }
    say(_summary_table(all_tasks, state))
    if stop_reason == "interrupted":
        say(f"[tune] interrupted: {len(database)} records are kept in {db_dir}; "
            f"run the same command with --resume to continue")
        raise KeyboardInterrupt
    return summary


def _in_stored_names(task: Task, database, seed_database) -> Task:
    """The task as its workload is stored in the database (else in the seed database).

    Records are schedule traces that name blocks, and compile replays them on the stored
    workload. Lookups match workloads by structure, ignoring names, so a kernel whose block
    names changed since it was stored (a new graph pass upstream) must be scheduled in the
    stored names, or its new records would not replay."""
    for db in (database, seed_database):
        # has_workload first: commit_workload on a database it lacks would add it there.
        if db is not None and db.has_workload(task.mod):
            return dataclasses.replace(task, mod=db.commit_workload(task.mod).mod)
    for db in (database, seed_database):
        # Records of the kernel from before its weights were marked layout free.
        marked = tvm_prepack.stored_marked(db, task.mod) if db is not None else None
        if marked is not None:
            return dataclasses.replace(task, mod=marked)
    return task


class _Tuner:
    """Rounds of MetaSchedule search for one task at a time, into one database."""

    def __init__(self, target: Target, tvm_target, settings: TuneSettings, database, db_dir: Path,
                 command: str, say: Callable[[str], None]):
        self.target, self.tvm_target, self.settings = target, tvm_target, settings
        self.database, self.db_dir, self.command, self.say = database, db_dir, command, say
        self.cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        self.builder, self.runner = _builder(target, settings), _runner(target, settings)
        # One cost model for the whole run: what it learns on one task helps the next.
        self.cost_model = ms.cost_model.CostModel.create("xgb", num_tuning_cores=self.cores)
        self.spent = 0

    def run_round(self, task: Task, trials: int, seed: int) -> _RoundResults:
        """Search, build and measure `trials` candidates; records go to the database."""
        results = _RoundResults()
        context = ms.TuneContext(
            mod=task.mod, target=self.tvm_target, space_generator="post-order-apply",
            search_strategy=ms.search_strategy.EvolutionarySearch(
                population_size=self.settings.population,
                init_min_unmeasured=min(50, self.settings.population),
            ),
            task_name=task.name, rand_state=seed, num_threads=self.cores,
        ).clone()
        ms.tune.tune_tasks(
            tasks=[context], task_weights=[1.0], work_dir=str(self.db_dir),
            max_trials_global=trials, max_trials_per_task=trials, num_trials_per_iter=trials,
            builder=self.builder, runner=self.runner, database=self.database, cost_model=self.cost_model,
            measure_callbacks=[
                ms.measure_callback.AddToDatabase(), ms.measure_callback.RemoveBuildArtifact(),
                ms.measure_callback.UpdateCostModel(), results,
            ],
            task_scheduler="round-robin",
        )
        return results

    def _measure(self, task: Task, schedules: list[tuple[Schedule, str]]) -> list[list[float] | None]:
        """Build schedules of a task together and time each; None (said why) where one fails."""
        built = self.builder.build([ms.builder.BuilderInput(sch.mod, self.tvm_target) for sch, _ in schedules])
        device = "cpu" if self.tvm_target.kind.name == "llvm" else self.tvm_target.kind.name
        timings: list[list[float] | None] = []
        for (sch, what), result in zip(schedules, built):
            args_info = _args_info(sch)
            if result.error_msg is not None:
                self.say(f"[tune] {task.name}: the {what} did not build: {str(result.error_msg).strip()[:200]}")
                timings.append(None)
                continue
            try:
                # Timed three times, the fastest kept: noise only ever adds time.
                futures = self.runner.run([ms.runner.RunnerInput(result.artifact_path, device, args_info)] * 3)
                runs = [future.result() for future in futures]
            finally:
                shutil.rmtree(os.path.dirname(result.artifact_path), ignore_errors=True)
            timed = [r for r in runs if r.error_msg is None and r.run_secs]
            if not timed:
                self.say(f"[tune] {task.name}: the {what} did not run: {str(runs[0].error_msg).strip()[-300:]}")
                timings.append(None)
                continue
            timings.append([float(s) for s in min(timed, key=lambda r: _median(r.run_secs)).run_secs])
        return timings

    def _commit(self, task: Task, sch: Schedule, run_secs: list[float], progress: TaskProgress) -> float:
        """Add a timed schedule to the database as a record; its median latency."""
        workload = self.database.commit_workload(task.mod)
        self.database.commit_tuning_record(
            ms.database.TuningRecord(sch.trace, workload, run_secs, self.tvm_target, _args_info(sch))
        )
        median = _median(run_secs)
        if progress.best_s is None or median < progress.best_s:
            progress.best_s = median
        return median

    def _seed_schedule(self, task: Task, seed_database) -> Schedule | None:
        """The seed database's best record of the task, replayed; None if it has none."""
        if not seed_database.has_workload(task.mod):
            return tvm_prepack.schedule_from_unmarked_record(seed_database, task.mod)
        try:
            return tvm_prepack.replay_best_record(seed_database, task.mod, task.mod)
        except Exception as exc:  # TVMError: a trace of another TVM build or target kind
            self.say(f"[tune] {task.name}: the seed record does not replay ({str(exc).strip().splitlines()[-1][:160]})")
            return None

    def measure_baselines(self, task: Task, progress: TaskProgress, seed_database) -> None:
        """Time the task's default schedule and (with a seed database) its best record
        there, and commit each as a record: the baselines tuning must beat, and what
        compile uses where tuning does not."""
        wanted: list[tuple[str, Schedule, str]] = []
        kind = None
        if progress.default_s is None:
            sch, kind = default_schedule(task.mod, self.tvm_target)
            wanted.append(("default_s", sch, f"default schedule ({kind.replace('_', ' ')})"))
        if seed_database is not None and progress.seed_s is None:
            sch = self._seed_schedule(task, seed_database)
            if sch is not None:
                wanted.append(("seed_s", sch, "seed record"))
        if not wanted:
            return
        for (field, sch, what), run_secs in zip(wanted, self._measure(task, [(sch, what) for _, sch, what in wanted])):
            if run_secs is not None:
                setattr(progress, field, self._commit(task, sch, run_secs, progress))
                self.say(f"[tune] {task.name}: {what} {_fmt_latency(getattr(progress, field), task.flops)}")
        if kind == "vnni":
            # MetaSchedule's x86 rules tensorize with TVM's own dot_16x4_vnni, which this
            # LLVM rejects (pipeline/tvm_vnni.py): every candidate would fail to build.
            progress.status = "kept"
            self.say(f"[tune] {task.name}: VNNI kernel, kept on its own schedule (not searched)")

    def tune_task(self, task: Task, state: dict[str, TaskProgress], index: int, count: int,
                  budget_trials: int, started: float, ctrl_c: "_CtrlC") -> str | None:
        """Rounds until the task has its trials, stops improving, or a budget runs out
        (returned as the reason to stop the whole run)."""
        settings = self.settings
        progress = state[task.key]
        progress.status = "tuning"
        progress.best_s = _best_record_seconds(self.database, task) or progress.best_s
        stale = failed_rounds = rounds = 0
        while progress.trials < settings.trials_per_task:
            elapsed = time.monotonic() - started
            if ctrl_c.requested:
                progress.status = "pending"
                return "interrupted"
            if settings.time_budget_s is not None and elapsed >= settings.time_budget_s:
                progress.status = "pending"
                return "time budget spent"
            if self.spent >= budget_trials:
                progress.status = "pending"
                return "trial budget spent"
            if settings.rpc_tracker is not None:
                # Before each round: a tracker that went away is an error now, not after
                # a round of connection retries.
                _tracker_gone(settings, self.db_dir, self.database)
            trials = min(settings.round_trials, settings.trials_per_task - progress.trials, budget_trials - self.spent)
            results = self.run_round(task, trials, seed=settings.seed + 7919 * rounds + progress.trials + 1)
            rounds += 1
            measured = len(results.seconds) + len(results.errors)
            progress.trials += measured
            self.spent += measured
            previous = progress.best_s
            if results.seconds:
                progress.best_s = min(results.seconds + ([previous] if previous is not None else []))
            _save_state(self.db_dir, state, self.command)
            _append_curve(self.db_dir, state, started)
            self._report(task, progress, index, count, budget_trials, started)
            if measured == 0:
                progress.status = "exhausted"  # the search space has nothing left to try
                return None
            if not results.seconds:
                failed_rounds += 1
                first = results.errors[0].strip().splitlines()[0] if results.errors else "no result"
                if settings.rpc_tracker is not None and "RPCRunner" in first:
                    _tracker_gone(settings, self.db_dir, self.database)
                if failed_rounds >= 2:
                    self.say(f"[tune] task {task.name}: every candidate failed twice ({first[:160]}); moving on")
                    progress.status = "failed"
                    return None
                continue
            failed_rounds = 0
            improved = previous is None or progress.best_s < previous * (1 - settings.min_improvement)
            stale = 0 if improved else stale + 1
            if stale >= settings.patience:
                progress.status = "converged"
                return None
        progress.status = "done"
        return None

    def _report(self, task: Task, progress: TaskProgress, index: int, count: int, budget_trials: int,
                started: float) -> None:
        settings = self.settings
        elapsed = time.monotonic() - started
        if settings.time_budget_s is not None:
            left = f"{_fmt_duration(settings.time_budget_s - elapsed)} left of the budget"
        else:
            left = f"~{_fmt_duration(elapsed / max(self.spent, 1) * (budget_trials - self.spent))} left"
        self.say(
            f"[tune] task {index} of {count} {task.name} ({task.flops / 1e6:.1f} MFLOP x{task.weight}): "
            f"{progress.trials}/{settings.trials_per_task} trials, best {_fmt_latency(progress.best_s, task.flops)}; "
            f"{self.spent}/{budget_trials} trials in all, {left}"
        )


def _tracker_gone(settings: TuneSettings, db_dir: Path, database) -> None:
    """After a round where every run failed over RPC: a clear error if the tracker is gone."""
    from pipeline.rpc import check_tracker, parse_tracker

    host, port = parse_tracker(settings.rpc_tracker)
    try:
        check_tracker(host, port, settings.rpc_timeout_s)
    except PipelineError as exc:
        raise PipelineError(
            f"{exc}; the {len(database)} records measured so far are kept in {db_dir}: "
            f"run the same command with --resume once the tracker is back"
        ) from None


def _summary_table(tasks: list[Task], state: dict[str, TaskProgress]) -> str:
    """The tasks that have trials, most latency first; the rest in one line."""
    lines = [f"{'task':<58} {'MFLOP':>8} {'x':>3} {'trials':>6} {'default ms':>10} {'best':>26}  status"]
    untouched = 0
    for task in tasks:
        progress = state[task.key]
        if progress.trials == 0 and progress.default_s is None:
            untouched += 1
            continue
        lines.append(
            f"{task.name[:58]:<58} {task.flops / 1e6:>8.2f} {task.weight:>3} {progress.trials:>6} "
            f"{progress.default_s * 1e3 if progress.default_s else float('nan'):>10.3f} "
            f"{_fmt_latency(progress.best_s, task.flops):>26}  {progress.status}"
        )
    if untouched:
        lines.append(f"{untouched} more tasks have no trials yet: compile gives them default schedules")
    return "\n".join(lines)
