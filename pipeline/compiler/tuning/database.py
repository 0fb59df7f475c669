"""Tuning databases: where MetaSchedule records live, which one compile uses, and writing,
merging and shipping them. Reading and repairing one is pipeline/compiler/records.py's,
below the schedule phase that applies the records.

A tuning database is a directory with MetaSchedule's two JSON tables and a ``meta.json``
naming the target and the TVM version that made it (a MetaSchedule database ignores the
target when it looks records up, so there is one database per target and model):

    artifacts/tune/<target>/<model-key>/   written by `pipeline tune`, read by compile
    tuning/<target>/<model-key>/<cpu>/     committed to the repository, one per CPU model
                                           (mcpu) or GPU architecture, read when the
                                           artifacts tree has none (shipped records), in
                                           the checkout the user stands in (project_root)

        database_workload.json         MetaSchedule's workload table (one PrimFunc a line)
        database_tuning_record.json    MetaSchedule's records (schedule trace, run seconds)
        meta.json                      target JSON, TVM version, model key
        tune_state.json                per task: trials measured, best latency, finished?
        tune_curve.jsonl               the tuning curve (pipeline/compiler/tuning/tuner.py)
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import tomllib
from pathlib import Path
from typing import Any

import tvm
import tvm_ffi
from tvm.s_tir import meta_schedule as ms

from pipeline import artifacts
from pipeline.errors import PipelineError
from pipeline.compiler.records import (
    CURVE_FILE, META_FILE, RECORD_FILE, STATE_FILE, WORKLOAD_FILE, database_problem, meta_problem, note_once,
    open_database, read_meta, target_fit, timed_against, warn_once,
)
from pipeline.compiler.schedules.apply import defaults_version
from targets import Target


PROJECT_NAME = "convnext-edge"
INSTALLED_CHECKOUT = Path(__file__).resolve().parents[3]
# Tests point it at a folder of their own; None: shipped_root() decides.
SHIPPED_ROOT: Path | None = None
DATABASE_FORMAT = 1


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


def project_root(start: Path | None = None) -> Path | None:
    """The convnext-edge checkout the user stands in: the nearest directory from `start`
    (the working directory) up whose pyproject.toml names the project; None outside one."""
    start = (Path.cwd() if start is None else Path(start)).resolve()
    for directory in (start, *start.parents):
        try:
            project = tomllib.loads((directory / "pyproject.toml").read_text()).get("project", {})
        except (OSError, ValueError):
            continue
        if isinstance(project, dict) and project.get("name") == PROJECT_NAME:
            return directory
    return None


def shipped_root() -> Path:
    """The tuning/ tree of the checkout the user stands in, so that compile reads the
    records `tune-db ship` writes there; outside a checkout, the one this code runs from
    (its records are part of what was installed; ship refuses to write there)."""
    if SHIPPED_ROOT is not None:
        return SHIPPED_ROOT
    return (project_root() or INSTALLED_CHECKOUT) / "tuning"


def shipped_database_dir(target_name: str, key: str, tvm_target: dict[str, Any],
                         root: Path | None = None) -> Path:
    """Records committed to the repository: tuning/<target>/<model-key>/<cpu>/ under `root`
    (default: shipped_root()). A target such as x86 means whatever CPU the machine has, so
    one model keeps one database per CPU."""
    return (shipped_root() if root is None else root) / target_name / key / cpu_tag(tvm_target)


def shipped_databases(target_name: str, key: str) -> list[Path]:
    """Every committed database of a target and model, one per CPU it was tuned on."""
    root = shipped_root() / target_name / key
    return sorted(d for d in root.glob("*") if (d / WORKLOAD_FILE).is_file()) if root.is_dir() else []


def _is_stale(db_dir: Path) -> bool:
    return timed_against(db_dir) < defaults_version(read_meta(db_dir)["target_json"])


def _usable_database(artifacts_root: Path, target: Target, key: str, exclude: Path | None = None,
                     stale: list[Path] | None = None) -> tuple[Path, dict[str, Any]] | None:
    """The first usable database of a target and model, and the target it was made for:
    the artifacts tree's, then the repository's, those made for this exact target before
    those of another CPU model. One that exists but cannot be used is skipped with a
    warning. With `stale`, this exact target's databases timed against older default
    schedules are skipped too, and added to it."""
    usable = []
    for db_dir in (local_database_dir(artifacts_root, target.name, key), *shipped_databases(target.name, key)):
        if not (db_dir / WORKLOAD_FILE).is_file():
            continue
        if exclude is not None and db_dir.resolve() == Path(exclude).resolve():
            continue
        problem = database_problem(db_dir, target, similar_ok=True)
        if problem is not None:
            warn_once(f"ignoring tuning records: {problem}")
            continue
        made_for = read_meta(db_dir)["target_json"]
        if target_fit(made_for, target) == "same":
            if stale is not None and _is_stale(db_dir):
                stale.append(db_dir)
                continue
            return db_dir, made_for
        usable.append((db_dir, made_for))
    return usable[0] if usable else None


def _other_models_databases(artifacts_root: Path, target: Target, key: str,
                            stale: list[Path] | None = None) -> list[tuple[Path, dict[str, Any]]]:
    """Usable databases of the target made for other models (any model key), the
    artifacts tree's first: those tuned for this exact target if there are any, else
    those of one other CPU model (records of two CPUs are never mixed). `stale`: as for
    _usable_database."""
    candidates = sorted(d for d in (Path(artifacts_root) / "tune" / target.name).glob("*")
                        if d.name != key and not d.name.startswith("_"))
    shipped = shipped_root() / target.name
    if shipped.is_dir():
        candidates += sorted(d for model in shipped.glob("*") if model.name != key for d in model.glob("*"))
    usable = []
    for db_dir in candidates:
        if not (db_dir / WORKLOAD_FILE).is_file():
            continue
        # Other models' databases of another TVM version or target are passed over quietly
        # (there can be many); a broken meta.json is said, since nothing else would show it.
        unreadable = meta_problem(db_dir)
        if unreadable is not None:
            warn_once(f"ignoring tuning records: {unreadable}")
        elif database_problem(db_dir, target, similar_ok=True) is None:
            made_for = read_meta(db_dir)["target_json"]
            if stale is not None and target_fit(made_for, target) == "same" and _is_stale(db_dir):
                stale.append(db_dir)
            else:
                usable.append((db_dir, made_for))
    same = [(d, m) for d, m in usable if target_fit(m, target) == "same"]
    if same or not usable:
        return same
    first = json.dumps(usable[0][1], sort_keys=True)
    return [(d, m) for d, m in usable if json.dumps(m, sort_keys=True) == first]


def _kernel_database(artifacts_root: Path, target: Target, key: str,
                     found: list[tuple[Path, dict[str, Any]]] | None = None) -> tuple[Path, dict[str, Any]] | None:
    """Records of other models for a model that has none: MetaSchedule finds a record by
    its kernel's workload, whatever model it was tuned in, so ConvNeXt-S compiles with
    ConvNeXt-T's records (the same 48 kernels, more blocks) and a batch or input size
    shares every kernel whose shape it keeps. Several databases are merged once into
    artifacts/tune/<target>/_kernels-<digest>/. `found`: the other models' databases, if
    the caller has listed them already (``_other_models_databases``)."""
    if found is None:
        found = _other_models_databases(artifacts_root, target, key)
    if not found:
        return None
    if len(found) == 1:
        return found[0]
    sources = [d for d, _ in found]
    digest = hashlib.sha256("".join(database_digest(d) for d in sources).encode()).hexdigest()[:16]
    merged = Path(artifacts_root) / "tune" / target.name / f"_kernels-{digest}"
    if not (merged / WORKLOAD_FILE).is_file():
        merge_databases(sources, merged)
    return merged, found[0][1]


def find_database(artifacts_root: Path, target: Target, key: str) -> Path | None:
    """The database compile uses for a target and model: its own (``_usable_database``),
    else the records of the target's other models for the kernels they share
    (``_kernel_database``), in either case only records tuned on this CPU model and timed
    against today's default schedules.

    Records of another CPU model are not applied, with a note (``pipeline tune`` starts from
    them): since the default schedules are chosen for the CPU they run on
    (pipeline/compiler/schedules/cpu.py), they ran faster than another CPU's records. On a
    rocketlake Xeon (2 cores), ConvNeXt-T 224 took 43.7 ms at batch 1 and 297 ms at batch 8
    with the defaults, 58.4 and 429 ms with the znver4 records.

    Records timed against older defaults are not applied until `pipeline tune-db remeasure`
    has timed them against today's, with a note that says so: a record only beat the
    default of its day, and on a znver4 the shipped ConvNeXt-T batch 8 records (timed
    against version 0) ran 538.2 ms where today's defaults ran 421.8 ms."""
    stale: list[Path] = []
    own = _usable_database(artifacts_root, target, key, stale=stale)
    if own is not None and target_fit(own[1], target) == "same":
        if stale:  # a newer one of this CPU came first, e.g. shipped after a stale local run
            _note_stale(stale)
        return own[0]
    others = _other_models_databases(artifacts_root, target, key, stale=stale)
    if stale:
        _note_stale(stale)
    if others and target_fit(others[0][1], target) == "same":
        db_dir, _ = _kernel_database(artifacts_root, target, key, others)
        # Not a warning: compile then says how many kernels were found (often none: the demo
        # model shares no kernel with ConvNeXt-T).
        note_once(f"no tuning records for {key}; looking its kernels up in the records of target "
                  f"'{target.name}''s other models made on this CPU: {db_dir}")
        return db_dir
    elsewhere = own or (others[0] if others else None)
    if elsewhere is not None and not stale:
        warn_once(f"not applying tuning records made on another CPU ({cpu_tag(elsewhere[1])}, this is "
                  f"{cpu_tag(target.tvm_target)}): {elsewhere[0]}; the default schedules, chosen for this CPU, "
                  f"ran faster than another CPU's records; `pipeline tune` starts from them")
    return None


def _note_stale(stale: list[Path]) -> None:
    """One line for the databases of this CPU that find_database passed over as timed
    against older default schedules: the first (this model's own, if it has one) by name."""
    first, version = stale[0], timed_against(stale[0])
    today = defaults_version(read_meta(first)["target_json"])
    made = f"version {version}" if version else "a version before versions were recorded"
    more = f" (and {len(stale) - 1} more of this CPU's databases)" if len(stale) > 1 else ""
    note_once(f"not applying the tuning records in {first}{more}: they were timed against older default "
              f"schedules ({made}; today's are version {today}) and can be slower; "
              f"`pipeline tune-db remeasure {first}` re-measures them")


def seed_database(artifacts_root: Path, target: Target, key: str, exclude: Path) -> Path | None:
    """Records `pipeline tune` starts from: the database compile would use (this CPU's
    first, else another CPU model's, else other models' records for the kernels they
    share), other than the one being tuned."""
    found = _usable_database(artifacts_root, target, key, exclude=exclude) or _kernel_database(
        artifacts_root, target, key)
    return found[0] if found is not None else None


def database_digest(db_dir: Path) -> str:
    """sha256 over the database's tables and meta: part of the compile stage's cache key."""
    digest = hashlib.sha256()
    for name in (WORKLOAD_FILE, RECORD_FILE, META_FILE):
        digest.update(name.encode())
        digest.update(bytes.fromhex(artifacts.file_sha256(Path(db_dir) / name)))
    return digest.hexdigest()


def write_json(path: Path, data: Any) -> None:
    artifacts.atomic_write_json(path, data)
    path.chmod(0o644)  # mkstemp makes 0600; databases are shared and committed


def write_meta(db_dir: Path, target: Target, key: str, **extra: Any) -> None:
    write_json(Path(db_dir) / META_FILE, {
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
        metas.append(read_meta(source))
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
        meta.update(merged_from=[str(s) for s in sources], model_key=keys[0] if len(keys) == 1 else keys,
                    # Timed against the oldest defaults of any source (schedules/cpu.py).
                    default_schedule_version=min(m.get("default_schedule_version", 0) for m in metas))
        write_json(temp / META_FILE, meta)
        temp.chmod(0o755)
        if output.exists():
            output.rmdir()
        os.replace(temp, output)
    except BaseException:
        shutil.rmtree(temp, ignore_errors=True)
        raise
    return {"output": str(output), "workloads": len(merged_workloads(output)), **counts}


def ship_database(source: Path, output: Path | None = None) -> dict[str, Any]:
    """Copy a tuning database into tuning/<target>/<model-key>/<cpu>/ of the checkout the
    user stands in (``project_root``; or `output`), pruned to the best record of each
    kernel, with its meta, state and curve. An earlier database there is replaced only once
    the new one is complete."""
    source = Path(source)
    problem = database_problem(source, None)
    if problem is not None:
        raise PipelineError(f"cannot ship: {problem}")
    meta = read_meta(source)
    if output is None:
        # Into the checkout the user stands in, never into whichever one is installed.
        project = project_root()
        if project is None:
            raise PipelineError(
                f"{Path.cwd()} is not inside a {PROJECT_NAME} checkout (no pyproject.toml naming it here or above); "
                f"run tune-db ship from the checkout whose tuning/ should hold the records, or pass -o DIR"
            )
        output = shipped_database_dir(meta["target"], meta["model_key"], meta["target_json"], project / "tuning")
    output = Path(output)
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
