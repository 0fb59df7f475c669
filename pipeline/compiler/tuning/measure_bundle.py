"""Tuning a board with no network path to it: rounds of candidates carried there in a
folder, and their timings carried back in a file.

    pipeline tune --target T ... --measure-bundle DIR        # round 1 -> DIR
    python DIR/measure.py --out results.json                 # on the board
    pipeline tune --target T ... --measure-results results.json   # records in, round 2 -> DIR

A round holds, per task still being tuned, MetaSchedule's next candidates (its evolutionary
search, with a cost model trained on every record of the database), each built as its
builder builds them into a library of its own; round 1 adds each task's default schedule
(and its seed record, as `pipeline tune` times them first), so what is measured always
includes the baselines. measure.py (pipeline/runtime/measure_runner.py) times them on the
board with MetaSchedule's evaluator. The timings come back as tuning records of the
database compile reads, exactly as `pipeline tune` commits them (a failed candidate as
1e10 s); tasks stop as `pipeline tune`'s do (their trials, or `patience` rounds without
improving), and rounds stop when every task has, or --trials are spent.

The database keeps the round in flight in ``measure_round.json``: the bundle's id, where
it was written, and per candidate its task, schedule trace and file sha256. A results file
is checked against it before anything is written: another target, CPU or GPU model, model,
bundle, or a file whose digest does not match its content is refused in one line and the
database is left as it was.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import tvm
import tvm_ffi
from tvm.s_tir import Schedule, Trace
from tvm.s_tir import meta_schedule as ms

from pipeline import artifacts
from pipeline.compiler.records import META_FILE, RECORD_FILE, WORKLOAD_FILE, database_problem, open_database, read_meta
from pipeline.compiler.schedules.apply import defaults_version
from pipeline.compiler.tuning import measuring, tuner
from pipeline.compiler.tuning.database import cpu_tag, write_json, write_meta
from pipeline.compiler.tuning.tasks import Task, extract_tasks, fused_module
from pipeline.engine import log
from pipeline.errors import PipelineError
from pipeline.runtime import measure_runner, runtime_only
from targets import Target

ROUND_FILE = "measure_round.json"
ROUND_FORMAT = 1
# A failed candidate's record, as MetaSchedule's AddToDatabase commits it.
FAILED_SECONDS = 1e10


def _plain(value: Any) -> Any:
    """A schedule trace's JSON form (Trace.as_json) as plain Python: what JSONDatabase writes."""
    if isinstance(value, (list, tuple)) or type(value).__name__ == "Array":
        return [_plain(v) for v in value]
    if type(value).__name__ in ("IntImm", "FloatImm"):
        return value.value
    if isinstance(value, str):
        return str(value)
    return value


def _identity(target: Target, key: str, db_dir: Path) -> dict[str, Any]:
    return {"dir": str(Path(db_dir).resolve()), "model_key": key, "tvm_version": tvm.__version__,
            "cpu_tag": cpu_tag(target.tvm_target)}


def read_round(db_dir: Path) -> dict[str, Any]:
    path = Path(db_dir) / ROUND_FILE
    if not path.is_file():
        return {"format": ROUND_FORMAT, "rounds_done": 0, "pending": None, "ingested": [], "tasks": {}}
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise PipelineError(f"{path} is unreadable ({exc}); delete it and write a new bundle with --measure-bundle DIR") from None


def read_results(path: Path, target: Target, db_dir: Path, key: str) -> dict[str, Any]:
    """A results file of the round in flight of this database, checked through; PipelineError
    (one line) for anything else. Reads only: a refused file leaves the database as it was."""
    fix = "run `python BUNDLE/measure.py --out results.json` on the board again and bring that file"
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise PipelineError(f"results file {path} does not exist; {fix}") from None
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        raise PipelineError(f"{path} is corrupted (not JSON: {str(exc)[:80]}); {fix}") from None
    if not isinstance(data, dict) or "digest" not in data:
        raise PipelineError(f"{path} is not a results file of measure.py (no digest); {fix}")
    body = {k: v for k, v in data.items() if k != "digest"}
    if data["digest"] != measure_runner.results_digest(body):
        raise PipelineError(f"{path} is corrupted (its digest does not match its content: cut short or edited); {fix}")
    if data.get("format") != measure_runner.RESULTS_FORMAT:
        raise PipelineError(f"{path} is of results format {data.get('format')}, this pipeline reads "
                            f"{measure_runner.RESULTS_FORMAT}; write a new bundle with --measure-bundle DIR")
    if data.get("target") != target.name or data.get("target_json") != target.tvm_target:
        raise PipelineError(f"{path} holds timings for target '{data.get('target')}', not '{target.name}' "
                            f"{target.target_json()}; pass --target {data.get('target')} with the model it was tuned for")
    tag = cpu_tag(target.tvm_target)
    measured = data.get("measured_on") or {}
    if data.get("cpu_tag") != tag or measured.get("gpu_arch", tag) != tag:
        raise PipelineError(f"{path} holds timings made on {measured.get('gpu_arch') or data.get('cpu_tag')}, "
                            f"but this database is for {tag} (target '{target.name}'); measure on a {tag} board")
    identity = data.get("database") or {}
    if identity.get("model_key") != key:
        raise PipelineError(f"{path} holds timings of model {identity.get('model_key')}, not {key}; "
                            f"pass the model options of the bundle's `pipeline tune --measure-bundle` command")
    state = read_round(db_dir)
    pending = state.get("pending")
    bundle_id = data.get("bundle_id")
    if pending is None or pending.get("bundle_id") != bundle_id:
        if bundle_id in state.get("ingested", []):
            why = "its timings are in the database already"
        elif pending is None:
            why = f"no round is in flight for {db_dir}"
        else:
            why = (f"the round in flight for {db_dir} is bundle {pending['bundle_id']} "
                   f"(round {pending['round']}, {pending['bundle_dir']})")
        raise PipelineError(f"{path} holds timings of bundle {bundle_id}, but {why}; measure the bundle "
                            f"of the round in flight, or write one with --measure-bundle DIR")
    candidates = pending["candidates"]
    for result in data.get("results", []):
        listed = candidates.get(result.get("id")) if isinstance(result, dict) else None
        if listed is None or result.get("sha256") != listed["sha256"] or not (
                "error" in result or (isinstance(result.get("run_secs"), list) and result["run_secs"])):
            raise PipelineError(f"{path} is corrupted (result {str(result)[:60]} is not of a candidate of bundle {bundle_id}); {fix}")
    return data


@dataclass
class _Candidate:
    task: Task
    kind: str  # "default", "seed" or "search"
    sch: Schedule


class MeasureRounds:
    """`pipeline tune --measure-bundle/--measure-results` for one target, model and database."""

    def __init__(self, target: Target, settings: "measuring.TuneSettings", db_dir: Path, key: str,
                 bundle_dir: Path | None, results_path: Path | None, say: Callable[[str], None] = log):
        self.target, self.settings, self.db_dir, self.key = target, settings, Path(db_dir), key
        self.say = say
        if settings.rpc_tracker is not None or settings.time_budget_s is not None:
            raise PipelineError("--measure-bundle/--measure-results measure on a board with no network path: "
                                "leave out --rpc-tracker and --time-budget (rounds stop at --trials or when converged)")
        self.results = read_results(results_path, target, db_dir, key) if results_path is not None else None
        self.round = read_round(db_dir)
        pending = self.round.get("pending")
        if self.results is None:
            if pending is not None:
                raise PipelineError(
                    f"round {pending['round']}'s bundle ({pending['bundle_dir']}) is waiting for its timings: run "
                    f"`python {pending['bundle_dir']}/measure.py --out results.json` on the board, then pass "
                    f"--measure-results results.json (or delete {self.db_dir / ROUND_FILE} to drop that round)")
            has_records = (self.db_dir / RECORD_FILE).is_file() and (self.db_dir / RECORD_FILE).stat().st_size > 0
            if has_records and not settings.resume:
                raise PipelineError(f"{self.db_dir} holds records of an earlier tuning run; pass --resume to "
                                    f"continue it, or delete the directory to start over")
        if bundle_dir is None and pending is not None:
            bundle_dir = Path(pending["bundle_dir"])
        if bundle_dir is None:
            raise PipelineError("--measure-results needs --measure-bundle DIR to say where the next round goes")
        self.bundle_dir = Path(bundle_dir)
        if (self.bundle_dir.exists() and any(self.bundle_dir.iterdir())
                and not (self.bundle_dir / measure_runner.MANIFEST).is_file()):
            raise PipelineError(f"{self.bundle_dir} exists and is not a measure bundle; choose a new folder for --measure-bundle")
        if (self.db_dir / META_FILE).is_file():
            problem = database_problem(self.db_dir, target)
            if problem is not None:
                raise PipelineError(f"cannot tune into it: {problem}; delete the directory to start over")

    def report(self, summary: dict[str, Any]) -> str:
        """The command's last lines (stdout): the database, and the next bundle or that tuning is done."""
        lines = [f"database: {summary['database']}",
                 f"records: {summary['records']} ({summary['trials']} search trials measured in all)"]
        if summary["bundle"]:
            lines += [f"bundle: {summary['bundle']} (round {summary['round']})",
                      f"next: on the board `python {Path(summary['bundle']).name}/measure.py --out results.json`, then "
                      f"this command with --measure-results results.json"]
        else:
            lines.append("finished: every task has its trials or stopped improving; `pipeline compile` applies the records")
        return "\n".join(lines)

    def workers_line(self) -> str:
        return (f"building on {measuring.build_workers()} cores, measuring on the board with "
                f"{self.bundle_dir}/measure.py (no network path)")

    # -- the round ------------------------------------------------------------------------

    def run(self, onnx_path: Path, *, input_shape: tuple[int, ...], precision: str, seed_dir: Path | None,
            command: str) -> dict[str, Any]:
        """Take the results in (if any), then write the next round's bundle unless tuning is
        finished. Returns a summary for the command's last lines."""
        db_dir, target, settings, say = self.db_dir, self.target, self.settings, self.say
        db_dir.mkdir(parents=True, exist_ok=True)
        version = defaults_version(target.tvm_target)
        if (db_dir / META_FILE).is_file():
            version = min(version, read_meta(db_dir).get("default_schedule_version", 0))
        write_meta(db_dir, target, self.key, onnx_sha256=artifacts.file_sha256(onnx_path), default_schedule_version=version)
        for name in (WORKLOAD_FILE, RECORD_FILE):
            (db_dir / name).touch()
        tuner.load_tensor_intrinsics()
        database = open_database(db_dir, target, strict=True, repair=True)
        seed_database = None
        if seed_dir is not None and self.results is None and self.round["rounds_done"] == 0:
            seed_database = open_database(seed_dir, target, strict=False, similar_ok=True)
        mod, self.tvm_target = fused_module(onnx_path, target, input_shape, precision)
        self.precision = precision
        tasks = [tuner._in_stored_names(t, database, seed_database) for t in extract_tasks(mod, self.tvm_target)]
        state = tuner._load_state(db_dir)
        for task in tasks:
            state.setdefault(task.key, tuner.TaskProgress(task.name, task.flops, task.weight))
        chosen = tasks[: settings.max_tasks] if settings.max_tasks else tasks
        stopped = None
        with tuner._CtrlC(say) as ctrl_c:
            try:
                if self.results is not None:
                    self._ingest(tasks, state, database, command)
                todo = [t for t in chosen if state[t.key].status not in tuner.FINISHED
                        and state[t.key].trials < settings.trials_per_task]
                spent = sum(p.trials for p in state.values())
                if ctrl_c.requested:
                    stopped = "interrupted"
                elif not todo or (settings.trials is not None and spent >= settings.trials):
                    stopped = "finished"
                else:
                    self._write_bundle(todo, state, database, seed_database, command, ctrl_c)
            except KeyboardInterrupt:
                stopped = "interrupted"
            finally:
                tuner._save_state(db_dir, state, command)
        say(tuner._summary_table(tasks, state))
        pending = read_round(db_dir).get("pending")
        if stopped == "interrupted":
            say(f"[tune] interrupted: {len(database)} records are kept in {db_dir}; the next round's bundle was "
                f"not written: run the same command with --measure-bundle DIR to write it")
            raise KeyboardInterrupt
        return {"database": str(db_dir), "records": len(database), "finished": stopped == "finished",
                "bundle": pending["bundle_dir"] if pending else None, "round": pending["round"] if pending else None,
                "trials": sum(p.trials for p in state.values())}

    def _ingest(self, tasks: list[Task], state: dict, database, command: str) -> None:
        """The results become records; each task's progress, best time and status follow."""
        pending = self.round["pending"]
        by_key = {t.key: t for t in tasks}
        measured: dict[str, list[tuple[str, float]]] = {}
        records = []
        for result in self.results["results"]:
            candidate = pending["candidates"][result["id"]]
            task = by_key.get(candidate["task_key"])
            if task is None:
                self.say(f"[tune] warning: {candidate['task']} is no longer a kernel of this model; its timing is dropped")
                continue
            sch = Schedule(task.mod)
            Trace.apply_json_to_schedule(candidate["trace"], sch)
            run_secs = result.get("run_secs") or [FAILED_SECONDS]
            args_info = [ms.arg_info.ArgInfo.from_json(a) for a in candidate["args_info"]]
            records.append(ms.database.TuningRecord(sch.trace, database.commit_workload(task.mod), run_secs,
                                                    self.tvm_target, args_info))
            seconds = tuner.median(run_secs) if "run_secs" in result else None
            measured.setdefault(task.key, []).append((candidate["kind"], seconds))
        # Every trace replayed before the first commit: a failure leaves no half round.
        for record in records:
            database.commit_tuning_record(record)
        counters = self.round.setdefault("tasks", {})
        settings = self.settings
        for key, timings in measured.items():
            progress, counter = state[key], counters.setdefault(key, {"stale": 0, "failed": 0})
            previous = progress.best_s
            for kind, seconds in timings:
                if kind == "default" and seconds is not None:
                    progress.default_s = seconds
                elif kind == "seed" and seconds is not None:
                    progress.seed_s = seconds
                if seconds is not None and (progress.best_s is None or seconds < progress.best_s):
                    progress.best_s = seconds
            searched = [s for kind, s in timings if kind == "search"]
            progress.trials += len(searched)
            if searched:
                if all(s is None for s in searched):
                    counter["failed"] += 1
                    if counter["failed"] >= 2:
                        progress.status = "failed"
                else:
                    counter["failed"] = 0
                    improved = previous is None or progress.best_s < previous * (1 - settings.min_improvement)
                    counter["stale"] = 0 if improved else counter["stale"] + 1
                    if counter["stale"] >= settings.patience:
                        progress.status = "converged"
            if progress.status not in tuner.FINISHED:
                progress.status = "done" if progress.trials >= settings.trials_per_task else "tuning"
            task = by_key[key]
            self.say(f"[tune] round {pending['round']} {task.name}: {len(timings)} timed, "
                     f"{progress.trials}/{settings.trials_per_task} trials, best "
                     f"{tuner._fmt_latency(progress.best_s, task.flops)} (default "
                     f"{tuner._fmt_latency(progress.default_s, task.flops)}); {progress.status}")
        failed = sum(1 for r in self.results["results"] if "error" in r)
        missing = len(pending["candidates"]) - len(self.results["results"])
        self.say(f"[tune] round {pending['round']}: {len(records)} records added to {self.db_dir} "
                 f"({failed} failed on the board{f', {missing} not measured (the run was cut short)' if missing else ''})")
        self.round["rounds_done"] = pending["round"]
        self.round["ingested"] = [*self.round.get("ingested", []), pending["bundle_id"]]
        self.round["pending"] = None
        tuner._save_state(self.db_dir, state, command)
        tuner._append_curve(self.db_dir, state, time.monotonic())
        write_json(self.db_dir / ROUND_FILE, self.round)

    # -- the next bundle -----------------------------------------------------------------

    def _trained_cost_model(self, tasks: list[Task], database) -> tuple[Any, dict[str, set[int]]]:
        """An XGBoost cost model trained on every record of the tasks (as MetaSchedule's
        UpdateCostModel trains it during a search), and the structural hashes of the
        schedules already measured per task: the search does not offer them again."""
        cost_model = ms.cost_model.CostModel.create("xgb", num_tuning_cores=measuring.build_workers())
        by_workload = {tvm_ffi.structural_hash(database.commit_workload(t.mod).mod): t for t in tasks}
        grouped: dict[str, tuple[Task, list, list]] = {}
        for record in database.get_all_tuning_records():
            task = by_workload.get(tvm_ffi.structural_hash(record.workload.mod))
            if task is None:
                continue
            try:
                candidate = record.as_measure_candidate()
            except Exception:  # TVMError: a trace that no longer replays
                continue
            entry = grouped.setdefault(task.key, (task, [], []))
            entry[1].append(candidate)
            entry[2].append(ms.runner.RunnerResult(run_secs=record.run_secs, error_msg=None))
        measured = {}
        for key, (task, candidates, results) in grouped.items():
            cost_model.update(self._context(task, 0), candidates, results)
            measured[key] = {tvm_ffi.structural_hash(c.sch.mod) for c in candidates}
        return cost_model, measured

    def _context(self, task: Task, seed: int) -> "ms.TuneContext":
        default_kind = tuner.default_schedule(self.target, task.mod, self.tvm_target)[1] if self.target.device == "cuda" else ""
        kind = tuner.space_kind(self.target, self.precision, default_kind)
        population = self.settings.population
        return ms.TuneContext(
            mod=task.mod, target=self.tvm_target, space_generator=tuner.space_generator(kind),
            search_strategy=ms.search_strategy.EvolutionarySearch(
                population_size=population, init_min_unmeasured=min(50, population)),
            task_name=task.name, rand_state=seed, num_threads=measuring.build_workers(),
        ).clone()

    def _search(self, task: Task, count: int, seed: int, database, cost_model, measured: set[int]) -> list[Schedule]:
        """The search's next `count` candidates not measured yet (the search strategy remembers
        what it measured in one process only)."""
        context = self._context(task, seed)
        context.pre_tuning(max_trials=2 * count + len(measured), num_trials_per_iter=2 * count + len(measured),
                           design_spaces=context.generate_design_space(), database=database, cost_model=cost_model)
        offered = context.generate_measure_candidates() or []
        context.post_tuning()
        chosen, seen = [], set(measured)
        for candidate in offered:
            digest = tvm_ffi.structural_hash(candidate.sch.mod)
            if digest not in seen:
                seen.add(digest)
                chosen.append(candidate.sch)
        return chosen[:count]

    def _write_bundle(self, todo: list[Task], state: dict, database, seed_database, command: str, ctrl_c) -> None:
        settings, say = self.settings, self.say
        number = self.round["rounds_done"] + 1
        spent = sum(p.trials for p in state.values())
        budget = settings.trials - spent if settings.trials is not None else None
        cost_model, measured = self._trained_cost_model(todo, database)
        say(f"[tune] round {number}: searching {len(todo)} tasks (cost model trained on "
            f"{sum(len(v) for v in measured.values())} records)")
        candidates: list[_Candidate] = []
        for index, task in enumerate(todo, start=1):
            if ctrl_c.requested:
                raise KeyboardInterrupt
            progress = state[task.key]
            chosen = []
            kind = None
            if progress.default_s is None:
                sch, kind = tuner.default_schedule(self.target, task.mod, self.tvm_target)
                chosen.append(_Candidate(task, "default", sch))
            if seed_database is not None and progress.seed_s is None:
                sch = self._seed_schedule(task, seed_database)
                if sch is not None:
                    chosen.append(_Candidate(task, "seed", sch))
            if kind == "vnni":
                progress.status = "kept"  # as tuner.measure_baselines: MetaSchedule's VNNI rules do not build here
            else:
                count = min(settings.round_trials, settings.trials_per_task - progress.trials)
                if budget is not None:
                    count = min(count, budget)
                found = self._search(task, count, settings.seed + 7919 * number + progress.trials + index,
                                     database, cost_model, measured.get(task.key, set())) if count > 0 else []
                if budget is not None:
                    budget -= len(found)
                if count > 0 and not found:
                    progress.status = "exhausted"
                chosen += [_Candidate(task, "search", sch) for sch in found]
            candidates += chosen
            say(f"[tune] round {number}: task {index} of {len(todo)} {task.name}: "
                f"{len(chosen)} candidates ({', '.join(sorted({c.kind for c in chosen})) or 'none'})")
        if not candidates:
            say("[tune] the search has nothing left to offer: tuning is finished")
            return
        self._build(number, candidates, command)

    def _seed_schedule(self, task: Task, seed_database) -> Schedule | None:
        from pipeline.compiler import prepack

        if not seed_database.has_workload(task.mod):
            return prepack.schedule_from_unmarked_record(seed_database, task.mod)
        try:
            return prepack.replay_best_record(seed_database, task.mod, task.mod)
        except Exception:  # TVMError: a trace of another TVM build or target kind
            return None

    def _build(self, number: int, candidates: list[_Candidate], command: str) -> None:
        """Build every candidate and write the bundle (complete, or not at all), then the
        round in flight."""
        target, say = self.target, self.say
        builder = measuring.make_builder(target, self.settings, measured_here=False)
        bundle_id = f"{target.name}-r{number}-{uuid.uuid4().hex[:12]}"
        self.bundle_dir.parent.mkdir(parents=True, exist_ok=True)
        temp = Path(tempfile.mkdtemp(prefix=f".{self.bundle_dir.name}.tmp-", dir=self.bundle_dir.parent))
        try:
            (temp / "candidates").mkdir()
            say(f"[tune] round {number}: building {len(candidates)} candidates on {measuring.build_workers()} cores")
            built = builder.build([ms.builder.BuilderInput(c.sch.mod, self.tvm_target) for c in candidates])
            listed, pending, failures = [], {}, 0
            for index, (candidate, result) in enumerate(zip(candidates, built)):
                args_info = [a.as_json() for a in tuner._args_info(candidate.sch)]
                args_info = _plain(args_info)
                if result.error_msg is not None:
                    failures += 1
                    say(f"[tune] {candidate.task.name}: a {candidate.kind} candidate did not build: "
                        f"{str(result.error_msg).strip().splitlines()[-1][:160]}")
                    continue
                ident = f"c{index:05d}"
                file = f"candidates/{ident}.so"
                shutil.move(result.artifact_path, temp / file)
                shutil.rmtree(os.path.dirname(result.artifact_path), ignore_errors=True)
                digest = artifacts.file_sha256(temp / file)
                listed.append({"id": ident, "task": candidate.task.name, "kind": candidate.kind, "file": file,
                               "sha256": digest, "args_info": args_info})
                pending[ident] = {"task_key": candidate.task.key, "task": candidate.task.name, "kind": candidate.kind,
                                  "sha256": digest, "args_info": args_info,
                                  "trace": _plain(candidate.sch.trace.as_json())}
            runner_source = Path(measure_runner.__file__)
            shutil.copyfile(runner_source, temp / "measure.py")
            shutil.copyfile(Path(runtime_only.__file__), temp / "runtime_only.py")
            evaluator = measuring._evaluator()
            manifest = {
                "format": measure_runner.BUNDLE_FORMAT, "bundle_id": bundle_id, "round": number,
                "created": time.strftime("%Y-%m-%dT%H:%M:%S"), "command": command,
                "target": target.name, "target_json": target.tvm_target, "cpu_tag": cpu_tag(target.tvm_target),
                "device": "cuda" if target.device == "cuda" else "cpu",
                "gpu_arch": target.cuda_arch,
                "machine": target.host_triple.split("-", 1)[0],
                "database": _identity(target, self.key, self.db_dir),
                "evaluator": {"number": evaluator.number, "repeat": evaluator.repeat,
                              "min_repeat_ms": evaluator.min_repeat_ms,
                              "enable_cpu_cache_flush": bool(evaluator.enable_cpu_cache_flush)},
                "candidates": listed,
                "files": {name: artifacts.file_sha256(temp / name) for name in ("measure.py", "runtime_only.py")},
            }
            (temp / measure_runner.MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
            temp.chmod(0o755)
            if self.bundle_dir.exists():
                shutil.rmtree(self.bundle_dir)
            os.replace(temp, self.bundle_dir)
        except BaseException:
            shutil.rmtree(temp, ignore_errors=True)
            raise
        self.round["pending"] = {"bundle_id": bundle_id, "round": number, "bundle_dir": str(self.bundle_dir.resolve()),
                                 "created": manifest["created"], "candidates": pending}
        write_json(self.db_dir / ROUND_FILE, self.round)
        size = sum(f.stat().st_size for f in self.bundle_dir.rglob("*") if f.is_file())
        say(f"[tune] round {number}: bundle {bundle_id} with {len(listed)} candidates "
            f"({size / 2**20:.1f} MiB{f', {failures} did not build' if failures else ''}) -> {self.bundle_dir}")
