"""`pipeline tune` (MetaSchedule tuning records for a target and model), and
`pipeline tune-db merge A B -o C`, `ship` and `remeasure` (records against today's defaults).

Registered on the main app by `pipeline.cli` with `register(app)`. Records go to
``artifacts/tune/<target>/<model-key>/``; `pipeline compile` with the same model settings
picks them up (see pipeline/compiler/tuning/database.py for the layout and the shipped ``tuning/`` tree).
"""

from __future__ import annotations

import inspect
import json
import shlex
import sys
import time
from pathlib import Path
from typing import Annotated, Optional

import typer

from pipeline.errors import PipelineError

db_app = typer.Typer(no_args_is_help=True, help="Work with tuning databases.")


# The shared model options tune takes (pipeline/cli/options.py): the model, and for
# --precision int8 its calibration images; --rpc-tracker/--rpc-key measure on a board.
MODEL_OPTIONS = (
    "target", "variant", "weights", "num_classes", "in_chans", "input_size", "batch_size", "seed", "precision",
    "data", "preprocessing", "calib_size", "calib_method", "rpc_tracker", "rpc_key", "artifacts",
)


def _tune_options(
    trials: Annotated[Optional[int], typer.Option(help="Trials in all for this run (default: trials-per-task for every task tuned).")] = None,
    trials_per_task: Annotated[int, typer.Option(help="At most this many trials per task; a task stops earlier once it stops improving.")] = 64,
    time_budget: Annotated[Optional[float], typer.Option(help="Stop after this many minutes from the start: no baseline or search round starts later; what was measured is kept and --resume continues.")] = None,
    max_tasks: Annotated[Optional[int], typer.Option(help="Tune only the N tasks with the most FLOPs x occurrences.")] = None,
    resume: Annotated[bool, typer.Option(help="Continue an earlier (interrupted) run into the same database.")] = False,
    rpc_timeout: Annotated[float, typer.Option(help="Seconds to wait for the tracker to answer.")] = 30.0,
    round_trials: Annotated[int, typer.Option(help="Candidates built and measured per round.")] = 16,
    measure_bundle: Annotated[Optional[Path], typer.Option(help="No network path to the board: write the round's candidates and measure.py into this folder, to run on the board (README.md).")] = None,
    measure_results: Annotated[Optional[Path], typer.Option(help="The results.json measure.py wrote on the board: add its timings to the database, then write the next round's bundle.")] = None,
) -> None:
    """Signature holder: tune's own options, appended to the model options."""


def tune_command(**options) -> None:
    """Tune the model's kernels for a target with MetaSchedule; compile reuses the records."""
    from pipeline.cli.options import config_from_options, validate_config
    from pipeline.engine import log, run_pipeline
    from pipeline.stages import STAGES
    from targets import get_target

    # The time budget counts from here: building the model is part of the run.
    started = time.monotonic()
    trials, trials_per_task, round_trials = options["trials"], options["trials_per_task"], options["round_trials"]
    time_budget, max_tasks = options["time_budget"], options["max_tasks"]
    rpc_tracker, rpc_key, precision = options["rpc_tracker"], options["rpc_key"], options["precision"]
    for name, value in (("trials-per-task", trials_per_task), ("round-trials", round_trials)):
        if value < 1:
            raise PipelineError(f"--{name} must be at least 1, got {value}")
    for name, value in (("trials", trials), ("max-tasks", max_tasks)):
        if value is not None and value < 1:
            raise PipelineError(f"--{name} must be at least 1, got {value}")
    if time_budget is not None and time_budget <= 0:
        raise PipelineError(f"--time-budget is in minutes and must be positive, got {time_budget:g}")
    if rpc_key is not None and rpc_tracker is None:
        raise PipelineError("--rpc-key needs --rpc-tracker HOST:PORT")
    from pipeline import precisions

    resolved = get_target(options["target"])
    plan = precisions.get(precision)
    if not plan.tunable(resolved.device):
        raise PipelineError(f"--precision {precision} cannot be tuned for target '{resolved.name}'; use one of: "
                            f"{', '.join(precisions.tunable(resolved.device))}")
    if plan.quantized and options["data"] is None:
        raise PipelineError(
            f"--precision {precision} tunes the quantized model, which needs calibration images; "
            "pass --data (the folder `pipeline quantize` uses, or e.g. --data fashion-mnist --preprocessing imagenet)"
        )
    config = config_from_options(options)
    validate_config(config, None)

    # Imported after the cheap checks: MetaSchedule pulls in all of TVM's compiler.
    from pipeline.compiler.tuning import database, measuring, tuner

    settings = measuring.TuneSettings(
        trials=trials, trials_per_task=trials_per_task,
        time_budget_s=time_budget * 60 if time_budget is not None else None,
        max_tasks=max_tasks, resume=options["resume"], rpc_tracker=rpc_tracker, rpc_key=rpc_key,
        rpc_timeout_s=options["rpc_timeout"], round_trials=round_trials, seed=config.seed,
    )
    key = database.config_model_key(config)
    db_dir = database.local_database_dir(config.artifacts, resolved.name, key)
    rounds = None
    if options["measure_bundle"] is not None or options["measure_results"] is not None:
        from pipeline.compiler.tuning.measure_bundle import MeasureRounds

        # A results file that does not belong to this database is refused here, before any work.
        rounds = MeasureRounds(resolved, settings, db_dir, key, options["measure_bundle"], options["measure_results"])
        workers = rounds.workers_line()
    else:
        # A device target without a tracker, or a tracker that does not answer, fails here,
        # before the model is built.
        workers = measuring.workers_line(resolved, settings, measuring.check_rpc(resolved, settings))
    log(f"pipeline tune for target {resolved.name}: {resolved.target_json()} -> {db_dir}; {workers}")
    log(config.describe())
    log(settings.describe())

    provided = {"weights": config.weights} if config.weights is not None else {}
    # The tasks compile will look up: the precision's model, as compile takes it. A QDQ
    # model's zero points are part of its kernels, so int8 records fit this calibration's
    # model; kernels of another calibration that differ fall back to default schedules.
    results = run_pipeline(STAGES, config, resolved, plan.model_stage, provided)
    onnx_path = results[plan.model_stage].outputs[plan.model_output]
    try:
        # Tuning starts from the records compile would otherwise use (shipped ones, possibly
        # timed on another CPU model); tasks a resumed run already seeded are not redone.
        seed_dir = database.seed_database(config.artifacts, resolved, key, exclude=db_dir)
        if rounds is not None:
            print(rounds.report(rounds.run(
                onnx_path, precision=precision, seed_dir=seed_dir, command="pipeline " + shlex.join(sys.argv[1:]),
                input_shape=(config.batch_size, config.in_chans, config.input_size, config.input_size))))
            return
        summary = tuner.tune(
            onnx_path, resolved, db_dir, key, settings, precision=precision, seed_dir=seed_dir,
            input_shape=(config.batch_size, config.in_chans, config.input_size, config.input_size),
            command="pipeline " + shlex.join(sys.argv[1:]), started=started,
        )
    except KeyboardInterrupt:
        # tune() has said where the records are; exit like any interrupted command.
        sys.exit(130)
    print(f"database: {summary['database']}")
    print(f"records: {summary['records']} ({summary['trials']} trials this run, "
          f"{summary['tasks_tuned']} of {summary['tasks_total']} tasks have records)")
    if summary["stopped"]:
        print(f"stopped: {summary['stopped']}; continue with the same command and --resume")


@db_app.command("merge")
def merge_command(
    sources: Annotated[list[Path], typer.Argument(help="Tuning database directories of one target.")],
    output: Annotated[Path, typer.Option("-o", "--output", help="New directory for the merged database.")],
) -> None:
    """Merge tuning databases of the same target (and TVM version) into a new one."""
    from pipeline.compiler.tuning import database

    for source in sources:
        if not source.is_dir():
            raise PipelineError(f"{source} is not a directory; pass tuning database directories (artifacts/tune/<target>/<model>)")
    result = database.merge_databases(sources, output)
    print(json.dumps(result, indent=2))


@db_app.command("ship")
def ship_command(
    source: Annotated[Path, typer.Argument(help="A tuning database directory (artifacts/tune/<target>/<model>).")],
    output: Annotated[Optional[Path], typer.Option("-o", "--output", help="Where to write it (default: tuning/<target>/<model>/<cpu>/ of the checkout you are in).")] = None,
) -> None:
    """Copy a tuning database into the tuning/ tree of the checkout you are in (the nearest
    directory up whose pyproject.toml names convnext-edge), best record per kernel."""
    from pipeline.compiler.tuning import database

    if not source.is_dir():
        raise PipelineError(f"{source} is not a directory; pass a tuning database directory (artifacts/tune/<target>/<model>)")
    print(json.dumps(database.ship_database(source, output), indent=2))


@db_app.command("remeasure")
def remeasure_command(
    database_dir: Annotated[Path, typer.Argument(help="A tuning database directory (tuning/<target>/<model>/<cpu>/ or artifacts/tune/<target>/<model>).")],
    margin: Annotated[float, typer.Option(help="Drop a kernel's records where today's default schedule is at least this fraction faster.")] = 0.03,
) -> None:
    """Time each record against today's default schedule on this CPU (the one the records
    were made for) and drop the records that the default now beats."""
    if not database_dir.is_dir():
        raise PipelineError(f"{database_dir} is not a directory; pass a tuning database directory (tuning/<target>/<model>/<cpu>)")
    from pipeline.compiler.tuning import remeasure

    result = remeasure.remeasure_database(database_dir, margin=margin)
    print(remeasure.format_table(result))


def register(app: typer.Typer) -> None:
    """Add `tune` and `tune-db` to `app`."""
    from pipeline.cli.options import model_parameters

    own = list(inspect.signature(_tune_options, eval_str=True).parameters.values())
    tune_command.__signature__ = inspect.Signature(model_parameters(MODEL_OPTIONS) + own)
    tune_command.__doc__ = "Tune the model's kernels for a target with MetaSchedule; compile reuses the records."
    app.command(name="tune")(tune_command)
    app.add_typer(db_app, name="tune-db")
