"""MetaSchedule tuning for the pipeline: the tasks (the distinct PrimFuncs of the fused model,
as compile produces them) and the tuning loop that measures candidates and writes records
into a database (pipeline/compiler/tuning/database.py).

Like the rest of pipeline.compiler this imports TVM's moving internals; quirks of the pinned
version carry a comment that starts with "TVM 0.27:".
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import shutil
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from tvm.ir.utils import derived_object
from tvm.s_tir import meta_schedule as ms
from tvm.s_tir import Schedule

from pipeline import artifacts
from pipeline.compiler import prepack
from pipeline.compiler.records import (
    CURVE_FILE, META_FILE, RECORD_FILE, STATE_FILE, WORKLOAD_FILE, database_problem, open_database, read_meta, warn,
)
from pipeline.compiler.schedules import cpu as cpu_schedules
from pipeline.compiler.schedules import gpu as gpu_schedules
from pipeline.compiler.schedules.apply import defaults_version
from pipeline.compiler.tensor_intrinsics import load_tensor_intrinsics
from pipeline.compiler.tuning import measuring
from pipeline.compiler.tuning.database import cpu_tag, write_json, write_meta
from pipeline.compiler.tuning.tasks import Task, extract_tasks, fused_module
from pipeline.engine import log
from pipeline.errors import PipelineError
from targets import Target


# ---------------------------------------------------------------------------
# What differs between device kinds in the search: a task's default schedule and the search
# space (how a candidate is built and where it can be measured: measuring.py). The loop
# below is the same for both.


def default_schedule(target: Target, task_mod, tvm_target) -> tuple[Schedule, str]:
    """A task's default schedule, what compile gives the kernel without a record, and its kind:
    schedules/cpu.py's for a CPU target, schedules/gpu.py's rules for a GPU target."""
    if target.device == "cuda":
        return gpu_schedules.default_schedule(task_mod, tvm_target, target.sm_count)
    return cpu_schedules.default_schedule(task_mod, tvm_target)


# The default GPU rules that put a kernel on tensor cores (float16 GEMMs): with fp16 their
# tasks are searched with MetaSchedule's tensor-core rules (WMMA/MMA intrinsics).
TENSOR_CORE_DEFAULTS = ("TensorCoreMatmul",)


def space_kind(target: Target, precision: str, default_kind: str) -> str:
    """The MetaSchedule rule set a task is searched with: the target's own ("llvm", "cuda"),
    "cuda-tensorcore" for the fp16 GEMMs whose default is on tensor cores."""
    if target.device != "cuda":
        return "llvm"
    return "cuda-tensorcore" if precision == "fp16" and default_kind in TENSOR_CORE_DEFAULTS else "cuda"


def _tensor_core_rules() -> list:
    """MetaSchedule's CUDA rules with its tensor-core tiling (WMMA, fp16 operands) in place of
    the plain one, which it falls back to on blocks that are no fp16 GEMM.

    TVM 0.27: its own "cuda-tensorcore" rules stage the accumulators in dynamic shared memory,
    and the build of an fp32 accumulator merged there with the fp16 operand tiles fails
    ("tvm_access_ptr element type must match the source buffer"): every candidate of the micro
    ConvNeXt's smaller GEMMs. The accumulators go through static shared memory here, as
    dlight's tensor-core matmul (our default) does."""
    from tvm.s_tir.tensor_intrin.cuda import get_wmma_intrin_group

    rule = ms.schedule_rule
    tensor_cores = rule.MultiLevelTilingTensorCore(
        intrin_groups=[get_wmma_intrin_group(load_scope="shared.dyn", store_scope="shared", in_dtype="float16",
                                             out_dtype=out_dtype, trans_b=trans_b)
                       for out_dtype in ("float32", "float16") for trans_b in (False, True)],
        structure="SSSRRSRS", tile_binds=["blockIdx.y", "blockIdx.x", "threadIdx.y"], max_innermost_factor=4,
        vector_load_lens=[1, 2, 3, 4, 8, 16],
        reuse_read=rule.ReuseType(req="must", levels=[4], scope="shared.dyn"),
        reuse_write=rule.ReuseType(req="must", levels=[2], scope="shared"),
        use_software_pipeline=False,
    )
    return [tensor_cores if isinstance(r, rule.MultiLevelTiling) else r for r in rule.ScheduleRule.create("cuda")]


def space_generator(kind: str):
    """The design space of rule set `kind` (space_kind)."""
    if kind == "llvm":
        return "post-order-apply"
    rules = _tensor_core_rules() if kind == "cuda-tensorcore" else kind
    return ms.space_generator.PostOrderApply(sch_rules=rules, postprocs=kind, mutator_probs=kind)


# ---------------------------------------------------------------------------
# The tuning loop


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


def _budget_spent(settings: measuring.TuneSettings, started: float) -> bool:
    return settings.time_budget_s is not None and time.monotonic() - started >= settings.time_budget_s


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
        warn(f"{path} is unreadable; tasks are tuned as if none had been")
        return {}


def _save_state(db_dir: Path, state: dict[str, TaskProgress], command: str) -> None:
    write_json(Path(db_dir) / STATE_FILE, {
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


def _args_info(sch: Schedule) -> list:
    """The arguments a scheduled kernel is built and timed with: as MetaSchedule does, those
    of the kernel without its weight layout rewrite, which takes the weights packed."""
    return ms.arg_info.ArgInfo.from_entry_func(sch.mod, remove_preproc=True)


def median(values) -> float:
    ordered = sorted(float(v) for v in values)
    return ordered[len(ordered) // 2]


def _best_record_seconds(database, task: Task) -> float | None:
    if not database.has_workload(task.mod):
        return None
    records = database.get_top_k(database.commit_workload(task.mod), 1)
    if not records or not records[0].run_secs:
        return None
    return median(records[0].run_secs)


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
    settings: measuring.TuneSettings,
    *,
    input_shape: tuple[int, ...] | None = None,
    precision: str = "fp32",
    seed_dir: Path | None = None,
    command: str = "",
    say: Callable[[str], None] = log,
    started: float | None = None,
) -> dict[str, Any]:
    """Tune the model's tasks for target into the database at db_dir.

    Tasks go most latency first; each gets up to trials_per_task trials in rounds and stops
    early once a round no longer improves it. Every measured record is in the database as
    soon as it is measured, so an interruption (Ctrl-C, a tracker that goes away) loses
    only the round in flight; `resume` continues where the state file says it stopped.

    With `seed_dir` (another database of this model, e.g. the one shipped for another CPU
    model), each task's best record there is timed here and added first: the search starts
    from it (MetaSchedule seeds its population with the best measured records) and the
    task can only get faster than it.

    The time budget (`settings.time_budget_s`) counts from `started` (a time.monotonic(),
    default now) and is checked before each task's baselines and before each round: a run
    that spends it stops there, its records kept, and says why in the summary's "stopped"."""
    db_dir = Path(db_dir)
    started = time.monotonic() if started is None else started
    # LocalBuilder ships work to its workers with cloudpickle; the cost model is XGBoost.
    missing = [name for name in ("cloudpickle", "xgboost") if importlib.util.find_spec(name) is None]
    if missing:
        raise PipelineError(
            f"tuning needs the Python packages {', '.join(missing)}; run `make install` "
            f"(or `pip install cloudpickle xgboost-cpu`)"
        )
    measuring.check_rpc(target, settings)
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
    # The defaults its records were timed against: a resumed run keeps the oldest.
    version = defaults_version(target.tvm_target)
    if settings.resume and (db_dir / META_FILE).is_file():
        version = min(version, read_meta(db_dir).get("default_schedule_version", 0))
    write_meta(db_dir, target, key, onnx_sha256=artifacts.file_sha256(onnx_path), default_schedule_version=version)
    for name in (WORKLOAD_FILE, RECORD_FILE):
        (db_dir / name).touch()
    load_tensor_intrinsics()
    database = open_database(db_dir, target, strict=True, repair=True)

    seed_database = None
    if seed_dir is not None:
        seed_database = open_database(seed_dir, target, strict=False, similar_ok=True)
        if seed_database is not None:
            say(f"[tune] starting from the records of {seed_dir} ({cpu_tag(read_meta(seed_dir)['target_json'])})")

    mod, tvm_target = fused_module(onnx_path, target, input_shape, precision)
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
        f"({len(chosen) - len(todo)} already done) with up to {budget_trials} trials -> {db_dir}; "
        f"first the baselines (each task's default schedule, timed), then the search")

    tuner = _Tuner(target, tvm_target, settings, database, db_dir, command, say, precision)
    stop_reason = None
    with _CtrlC(say) as ctrl_c:
        try:
            # First the default schedule of every chosen task (and its seed record), timed
            # as records: the baselines each task's tuning must beat.
            for index, task in enumerate(chosen, start=1):
                if ctrl_c.requested:
                    stop_reason = "interrupted"
                    break
                if _budget_spent(settings, started):
                    measured = sum(1 for t in chosen if state[t.key].default_s is not None)
                    stop_reason = (f"the time budget ran out while measuring the baselines "
                                   f"({measured} of {len(chosen)} tasks measured, none searched yet)")
                    break
                tuner.measure_baselines(task, state[task.key], seed_database, index, len(chosen), started)
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
        marked = prepack.stored_marked(db, task.mod) if db is not None else None
        if marked is not None:
            return dataclasses.replace(task, mod=marked)
    return task


def time_schedules(builder, runner, tvm_target, name: str, schedules: list[tuple[Schedule, str]],
                   say: Callable[[str], None] = log) -> list[list[float] | None]:
    """Build schedules of one kernel together and time each (its run_secs); None, said why,
    where one fails to build or run."""
    built = builder.build([ms.builder.BuilderInput(sch.mod, tvm_target) for sch, _ in schedules])
    device = "cpu" if tvm_target.kind.name == "llvm" else tvm_target.kind.name
    timings: list[list[float] | None] = []
    for (sch, what), result in zip(schedules, built):
        args_info = _args_info(sch)
        if result.error_msg is not None:
            say(f"[tune] {name}: the {what} did not build: {str(result.error_msg).strip()[:200]}")
            timings.append(None)
            continue
        try:
            # Timed three times, the fastest kept: noise only ever adds time.
            futures = runner.run([ms.runner.RunnerInput(result.artifact_path, device, args_info)] * 3)
            runs = [future.result() for future in futures]
        finally:
            shutil.rmtree(os.path.dirname(result.artifact_path), ignore_errors=True)
        timed = [r for r in runs if r.error_msg is None and r.run_secs]
        if not timed:
            say(f"[tune] {name}: the {what} did not run: {str(runs[0].error_msg).strip()[-300:]}")
            timings.append(None)
            continue
        timings.append([float(s) for s in min(timed, key=lambda r: median(r.run_secs)).run_secs])
    return timings


class _Tuner:
    """Rounds of MetaSchedule search for one task at a time, into one database."""

    def __init__(self, target: Target, tvm_target, settings: measuring.TuneSettings, database, db_dir: Path,
                 command: str, say: Callable[[str], None], precision: str = "fp32"):
        self.target, self.tvm_target, self.settings, self.precision = target, tvm_target, settings, precision
        self.database, self.db_dir, self.command, self.say = database, db_dir, command, say
        self.cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        self.builder, self.runner = measuring.make_builder(target, settings), measuring.make_runner(target, settings)
        # One cost model for the whole run: what it learns on one task helps the next.
        self.cost_model = ms.cost_model.CostModel.create("xgb", num_tuning_cores=self.cores)
        self.spent = 0
        self._space_kinds: dict[str, str] = {}

    def space_kind(self, task: Task) -> str:
        """The rule set the task is searched with (space_kind), decided once per task."""
        if task.key not in self._space_kinds:
            default_kind = default_schedule(self.target, task.mod, self.tvm_target)[1] if self.target.device == "cuda" else ""
            self._space_kinds[task.key] = space_kind(self.target, self.precision, default_kind)
        return self._space_kinds[task.key]

    def run_round(self, task: Task, trials: int, seed: int) -> _RoundResults:
        """Search, build and measure `trials` candidates; records go to the database."""
        results = _RoundResults()
        context = ms.TuneContext(
            mod=task.mod, target=self.tvm_target, space_generator=space_generator(self.space_kind(task)),
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
        return time_schedules(self.builder, self.runner, self.tvm_target, task.name, schedules, self.say)

    def _commit(self, task: Task, sch: Schedule, run_secs: list[float], progress: TaskProgress) -> float:
        """Add a timed schedule to the database as a record; its median latency."""
        workload = self.database.commit_workload(task.mod)
        self.database.commit_tuning_record(
            ms.database.TuningRecord(sch.trace, workload, run_secs, self.tvm_target, _args_info(sch))
        )
        seconds = median(run_secs)
        if progress.best_s is None or seconds < progress.best_s:
            progress.best_s = seconds
        return seconds

    def _seed_schedule(self, task: Task, seed_database) -> Schedule | None:
        """The seed database's best record of the task, replayed; None if it has none."""
        if not seed_database.has_workload(task.mod):
            return prepack.schedule_from_unmarked_record(seed_database, task.mod)
        try:
            return prepack.replay_best_record(seed_database, task.mod, task.mod)
        except Exception as exc:  # TVMError: a trace of another TVM build or target kind
            self.say(f"[tune] {task.name}: the seed record does not replay ({str(exc).strip().splitlines()[-1][:160]})")
            return None

    def measure_baselines(self, task: Task, progress: TaskProgress, seed_database, index: int, count: int,
                          started: float) -> None:
        """Time the task's default schedule and (with a seed database) its best record
        there, and commit each as a record: the baselines tuning must beat, and what
        compile uses where tuning does not. Says one line, task `index` of `count`."""
        wanted: list[tuple[str, Schedule, str]] = []
        kind = None
        if progress.default_s is None:
            sch, kind = default_schedule(self.target, task.mod, self.tvm_target)
            wanted.append(("default_s", sch, f"default schedule ({kind.replace('_', ' ')})"))
        if seed_database is not None and progress.seed_s is None:
            sch = self._seed_schedule(task, seed_database)
            if sch is not None:
                wanted.append(("seed_s", sch, "seed record"))
        if not wanted:
            return
        timed = []
        for (field, sch, what), run_secs in zip(wanted, self._measure(task, [(sch, what) for _, sch, what in wanted])):
            if run_secs is not None:
                setattr(progress, field, self._commit(task, sch, run_secs, progress))
                timed.append(f"{what} {_fmt_latency(getattr(progress, field), task.flops)}")
        left = (f"; {_fmt_duration(self.settings.time_budget_s - (time.monotonic() - started))} left of the budget"
                if self.settings.time_budget_s is not None else "")
        self.say(f"[tune] baseline {index}/{count} {task.name}: {'; '.join(timed) or 'nothing timed'}{left}")
        if kind == "vnni":
            # MetaSchedule's x86 rules tensorize with TVM's own dot_16x4_vnni, which this
            # LLVM rejects (pipeline/compiler/vnni.py): every candidate would fail to build.
            progress.status = "kept"
            self.say(f"[tune] {task.name}: VNNI kernel, kept on its own schedule (not searched)")

    def tune_task(self, task: Task, state: dict[str, TaskProgress], index: int, count: int,
                  budget_trials: int, started: float, ctrl_c: "_CtrlC") -> str | None:
        """Rounds until the task has its trials, stops improving, or a budget runs out
        (returned as the reason to stop the whole run)."""
        settings = self.settings
        progress = state[task.key]
        progress.status = "tuning"
        if self.target.device == "cuda":
            self.say(f"[tune] task {index} of {count} {task.name}: searching MetaSchedule's {self.space_kind(task)} space")
        progress.best_s = _best_record_seconds(self.database, task) or progress.best_s
        stale = failed_rounds = rounds = 0
        while progress.trials < settings.trials_per_task:
            if ctrl_c.requested:
                progress.status = "pending"
                return "interrupted"
            if _budget_spent(settings, started):
                progress.status = "pending"
                return f"the time budget ran out in the search (at task {index} of {count})"
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


def _tracker_gone(settings: measuring.TuneSettings, db_dir: Path, database) -> None:
    """After a round where every run failed over RPC: a clear error if the tracker is gone."""
    from pipeline.runtime.rpc import check_tracker, parse_tracker

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
