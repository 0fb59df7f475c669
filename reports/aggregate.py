"""Gathers every committed reports/<folder>/latency.json and accuracy.json into
reports/README.md.

One table per model (variant, classes, input shape), one row per measured target x
precision; below it, the known targets without a measurement, one line per target
with its precisions and why, never a number. Each measured row is compared with the
previous history.jsonl entry for the same target, precision and model on the same
machine with the same tuning records, and flagged when its median latency rose by
more than 10% or its top-1 agreement with the FP32 reference fell. Bad or
missing files are skipped with a warning that names them; half a pair still shows
what it has.
"""

from __future__ import annotations

import json
import platform
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

from pipeline import artifacts
from pipeline.config import PRECISIONS
from pipeline.errors import PipelineError
from reports import history
from reports.rows import ModelKey, Row, as_dict, as_number
from reports.target_report import BOARD_LATENCY, emulated_by, pct, stands_on
from reports.tuning_curve import curve_database
from reports.warn import warn

README = "README.md"
PLOTS_DIR = "plots"
TUNING_FILE = "tuning.json"
# The nightly compile matrix (pipeline/cli/compile_matrix.py), linked when it has been written.
COMPILE_MATRIX = "compile-matrix/README.md"
PRECISION_ORDER = PRECISIONS
# A median more than this fraction slower than the previous entry's is a regression.
LATENCY_TOLERANCE = 0.10
# Below this, a lower agreement is float noise in the stored fraction, not a drop.
AGREEMENT_EPSILON = 1e-9
# What a target needs beyond a CPU, by TVM target kind: the reason it may be unmeasured.
DEVICE_BY_KIND = {
    "cuda": "an NVIDIA GPU",
    "rocm": "an AMD GPU",
    "metal": "an Apple GPU",
    "vulkan": "a Vulkan GPU",
    "opencl": "an OpenCL device",
}
COLUMNS = (
    "target", "precision", "median ms", "p99 ms", "throughput img/s",
    "speed-up vs fastest PyTorch", "speed-up vs ONNX Runtime", "top-1", "top-5",
    "top-1 agreement with FP32 ref", "evaluated on", "artifact MB", "tuning", "measured on", "date", "commit", "flag",
)
# The data loaders' descriptions say how many images the whole set holds ("... has 10000 images: using 256").
SET_SIZE = re.compile(r"has (\d+) images")

TargetLookup = Callable[[str], Any]


# The table that holds the "not measured" rows when nothing at all has been measured.
NO_MEASUREMENTS = ModelKey("no measurements yet", None, None)


# ---------------------------------------------------------------- gathering


def read_report(path: Path, warnings: list[str]) -> dict | None:
    """A latency.json or accuracy.json, or None (with a warning) when it is not a readable report."""
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        warn(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno}); skipped", warnings)
        return None
    except (OSError, UnicodeDecodeError) as exc:
        warn(f"{path}: unreadable ({exc}); skipped", warnings)
        return None
    if not isinstance(data, dict) or not isinstance(data.get("target"), str) \
            or not isinstance(data.get("precision"), str):
        warn(f'{path}: not a report (needs "target" and "precision"); skipped', warnings)
        return None
    return data


def model_key(latency: dict | None, accuracy: dict | None) -> ModelKey:
    """The table a report belongs in. accuracy.json does not record the input shape."""
    model = as_dict(as_dict(latency).get("model")) or as_dict(as_dict(accuracy).get("model"))
    variant = model.get("variant") if isinstance(model.get("variant"), str) else "unknown model"
    classes = model.get("num_classes")
    shape = as_dict(latency).get("input_shape")
    valid_shape = isinstance(shape, list) and shape and all(isinstance(d, int) and not isinstance(d, bool) for d in shape)
    return ModelKey(
        variant,
        classes if isinstance(classes, int) and not isinstance(classes, bool) else None,
        tuple(shape) if valid_shape else None,
    )


def gather(reports_dir: Path, warnings: list[str]) -> list[Row]:
    """A row for every report folder under `reports_dir` with a readable latency.json or accuracy.json."""
    rows = []
    for folder in sorted(p for p in Path(reports_dir).iterdir() if p.is_dir()):
        latency_path, accuracy_path = folder / "latency.json", folder / "accuracy.json"
        if not latency_path.exists() and not accuracy_path.exists():
            continue  # plots/, or a folder that holds no report
        latency = read_report(latency_path, warnings) if latency_path.exists() else None
        accuracy = read_report(accuracy_path, warnings) if accuracy_path.exists() else None
        if latency is None and accuracy is None:
            continue
        if latency is not None and accuracy is not None and \
                (latency["target"], latency["precision"]) != (accuracy["target"], accuracy["precision"]):
            warn(f"{accuracy_path}: is for {accuracy['target']} {accuracy['precision']}, but {latency_path} "
                 f"is for {latency['target']} {latency['precision']}; accuracy skipped", warnings)
            accuracy = None
        for path, shown in ((latency_path, "accuracy"), (accuracy_path, "latency")):
            if not path.exists():
                warn(f"{path}: missing; showing {shown} only", warnings)
        record = latency if latency is not None else accuracy
        rows.append(Row(record["target"], record["precision"], model_key(latency, accuracy),
                        folder=folder.name, latency=latency, accuracy=accuracy))
    # An accuracy-only row knows its model but not the input shape: give it the shape of
    # the one table of that model, when there is exactly one, rather than a table of its own.
    for row in rows:
        if row.model.input_shape is None:
            same = {r.model for r in rows if r.model.input_shape is not None
                    and (r.model.variant, r.model.num_classes) == (row.model.variant, row.model.num_classes)}
            if len(same) == 1:
                row.model = same.pop()
    return rows


# ---------------------------------------------------------------- rows without a measurement


def not_measured_reason(name: str, precision: str, lookup: TargetLookup) -> str:
    """Why a known target has no measurement, from its record: the device it needs, if any."""
    try:
        target = lookup(name)
    except PipelineError as exc:
        # A detected target says itself why it is not here (e.g. "cuda" on a machine without a GPU).
        return f"no device: {str(exc).split(';')[0]}"
    except Exception:  # noqa: BLE001 -- the reason is a hint; a target that cannot load still gets a row
        return "no measurement committed"
    precisions = tuple(getattr(target, "precisions", ()) or ())
    if precisions and precision not in precisions:
        return f"{name} does not support {precision} (precisions: {', '.join(precisions)})"
    kind = as_dict(getattr(target, "tvm_target", None)).get("kind")
    need = DEVICE_BY_KIND.get(kind) or DEVICE_BY_KIND.get(getattr(target, "device", None))
    arch = _arch(str(getattr(target, "host_triple", "") or ""))
    if need is None and arch and arch != _arch(platform.machine()):
        need = f"{arch} hardware"
    if getattr(target, "runner", "local") == "rpc":
        key = getattr(target, "rpc_key", None)
        board = f"RPC key '{key}'" if key else "an RPC device"
        need = f"{need} ({board})" if need else board
    if need and kind == "llvm" and arch == "aarch64":
        # qemu runs the board's binary here: the accuracy needs no board (stages/evaluate.py).
        return f"no device: needs {need}; its accuracy under qemu: pipeline report --emulate --target {name}"
    return f"no device: needs {need}" if need else "no measurement committed"


def _arch(triple_or_machine: str) -> str:
    arch = triple_or_machine.split("-", 1)[0].lower()
    return {"arm64": "aarch64", "amd64": "x86_64"}.get(arch, arch)


def expected_rows(
    known: Iterable[str], extra: Iterable[tuple[str, str]], lookup: TargetLookup
) -> list[tuple[str, str, str]]:
    """(target, precision, reason) for every precision of every known target, plus `extra`."""
    wanted: list[tuple[str, str]] = []
    for name in known:
        try:
            precisions = tuple(getattr(lookup(name), "precisions", ()) or ()) or ("fp32",)
        except Exception:  # noqa: BLE001 -- see not_measured_reason
            precisions = ("fp32",)
        wanted += [(name, precision) for precision in precisions]
    wanted += [tuple(pair) for pair in extra]
    unique = list(dict.fromkeys(wanted))
    return [(name, precision, not_measured_reason(name, precision, lookup)) for name, precision in unique]


def build_tables(
    measured: Sequence[Row], expected: Sequence[tuple[str, str, str]], order: Sequence[str] = ()
) -> dict[ModelKey, list[Row]]:
    """Rows grouped by model; every table also lists the expected rows it has no measurement for."""
    tables: dict[ModelKey, list[Row]] = {}
    for row in measured:
        tables.setdefault(row.model, []).append(row)
    if not tables and expected:
        tables[NO_MEASUREMENTS] = []
    position = {name: index for index, name in enumerate(order)}

    def row_order(row: Row) -> tuple:
        precision = PRECISION_ORDER.index(row.precision) if row.precision in PRECISION_ORDER else len(PRECISION_ORDER)
        return (position.get(row.target, len(position)), row.target, precision, row.precision, row.folder or "")

    for key, rows in tables.items():
        present = {(row.target, row.precision) for row in rows}
        rows += [Row(name, precision, key, not_measured=reason)
                 for name, precision, reason in expected if (name, precision) not in present]
        rows.sort(key=row_order)
    return dict(sorted(tables.items(), key=lambda item: item[0].sort_key()))


# ---------------------------------------------------------------- regressions


def regression_flags(current: dict, previous: dict | None, tolerance: float = LATENCY_TOLERANCE) -> list[str]:
    """What got worse since `previous` (history entries): median latency up more than
    `tolerance`, or top-1 agreement down."""
    if previous is None:
        return []
    flags = []
    now, before = as_number(current.get("median_ms")), as_number(previous.get("median_ms"))
    if now is not None and before is not None and before > 0 and now > before * (1 + tolerance):
        flags.append(f"median {_ms(before)} -> {_ms(now)} ms (+{100 * (now / before - 1):.1f}%)")
    now, before = as_number(current.get("top1_agreement")), as_number(previous.get("top1_agreement"))
    if now is not None and before is not None and now < before - AGREEMENT_EPSILON:
        flags.append(f"top-1 agreement {pct(before)} -> {pct(now)}")
    return flags


# ---------------------------------------------------------------- Markdown


def _ms(value: float | None) -> str:
    if value is None:
        return "n/a"
    if value >= 100:
        return f"{value:.0f}"
    return f"{value:.2f}" if value >= 1 else f"{value:.3f}"


def _times(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}x"


def _cell(value: Any) -> str:
    return str(value).replace("\n", " ").replace("|", "\\|")


def _table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_cell(v) for v in row) + " |" for row in rows]
    return lines


def pytorch_config(name: str) -> str:
    """A PyTorch backend's name in a latency record, as words: 'torch_compile_cudagraphs_fp16' ->
    'torch.compile reduce-overhead (CUDA graphs) fp16'."""
    words = name.split("_")
    if words[:2] == ["torch", "compile"]:
        head, rest = "torch.compile", words[2:]
        if rest[:1] == ["cudagraphs"]:
            head, rest = "torch.compile reduce-overhead (CUDA graphs)", rest[1:]
    elif words[0] == "pytorch":
        head, rest = "PyTorch eager", words[1:]
    else:
        return name
    return f"{head} {' '.join(rest).replace('channels last', 'channels_last')}".strip()


def speedup_vs_fastest_pytorch(row: Row) -> str:
    """TVM's speed-up over the fastest PyTorch configuration measured in the same run, named."""
    fastest, tvm = row.fastest_pytorch(), row.median_ms
    if fastest is None or tvm is None or tvm <= 0:
        return "n/a"
    name, median = fastest
    return f"{_times(median / tvm)} vs {pytorch_config(name)}"


def evaluated_on(accuracy: dict | None) -> str:
    """The evaluation set and how much of it: 'fashion-mnist:test, all 10000 images', or
    '256 of 10000 images' for a sample."""
    data = as_dict(as_dict(accuracy).get("data"))
    count, source = data.get("count"), data.get("source") or "unknown data"
    if not isinstance(count, int):
        return "n/a"
    # The pipeline's evaluate stage and gpu_check.py name random inputs so.
    if source in ("random normal inputs", "random"):
        return f"{count} random inputs (no labels)"
    size = SET_SIZE.search(str(data.get("description") or ""))
    total = int(size.group(1)) if size else None
    if total is not None and count < total:
        return f"{source}, {count} of {total} images"
    return f"{source}, {'all ' if total == count else ''}{count} images"


def row_cells(row: Row, reports_dir: Path | None = None) -> list[str]:
    """The main table's cells for one measured row."""
    target = row.target
    if row.folder and reports_dir is not None and (Path(reports_dir) / row.folder / "report.md").is_file():
        target = f"[{row.target}]({row.folder}/report.md)"
    if row.latency is None:
        latency = ["no latency.json"] + ["n/a"] * 4
    elif emulated_by(row.accuracy):
        # An emulator's timings are not the board's: no time at all, whatever the record holds.
        latency = [BOARD_LATENCY] + ["n/a"] * 4
    else:
        tvm = row.tvm
        throughput = as_number(tvm.get("throughput_ips"))
        latency = [
            _ms(row.median_ms), _ms(as_number(tvm.get("p99_ms"))),
            "n/a" if throughput is None else f"{throughput:.1f}",
            speedup_vs_fastest_pytorch(row), _times(row.speedup("onnxruntime")),
        ]
    if row.accuracy is None:
        accuracy = ["n/a", "n/a", "no accuracy.json"]
    else:
        accuracy = [pct(row.top1), pct(as_number(row.metrics.get("top5"))), pct(row.agreement)]
    size = as_number(as_dict(row.latency).get("artifact_bytes"))
    origin = row.provenance
    return [
        target, row.precision, *latency, *accuracy, evaluated_on(row.accuracy),
        "n/a" if size is None else f"{size / 1e6:.2f}",
        row.tuning,
        stands_on(origin, row.accuracy), str(origin.get("date", "n/a"))[:10], origin.get("commit", "n/a"),
        ("⚠ " + "; ".join(row.flags)) if row.flags else "",
    ]


def not_measured_lines(rows: Sequence[Row]) -> list[str]:
    """The known targets a table has no measurement for, one line per target and reason with
    its precisions, rather than a row of empty cells per precision."""
    grouped: dict[tuple[str, str], list[str]] = {}
    for row in rows:
        if not row.measured:
            grouped.setdefault((row.target, row.not_measured or ""), []).append(row.precision)
    if not grouped:
        return []
    return ["Not measured:", "", *_table(("target", "precisions", "why"),
                                         ((target, ", ".join(precisions), reason)
                                          for (target, reason), precisions in grouped.items())), ""]


def provenance_cells(row: Row) -> list[str]:
    """The provenance table's cells for one measured row."""
    origin = row.provenance
    host = as_dict(origin.get("host"))
    tools = as_dict(origin.get("tools"))
    cpu = host.get("cpu", "n/a")
    details = [f"-mcpu={host['mcpu']}"] if host.get("mcpu") else []
    details += [f"{host['cores']} cores"] if host.get("cores") else []
    if details:
        cpu = f"{cpu} ({', '.join(details)})"
    gpu = origin.get("gpu") or host.get("gpu") or "none recorded"
    command = origin.get("command")
    return [
        row.target, row.precision, row.model.label(), as_dict(row.accuracy).get("reference", "n/a"),
        origin.get("device", "n/a"), cpu, gpu,
        tools.get("apache-tvm", "n/a"), tools.get("torch", "n/a"), tools.get("onnxruntime", "n/a"),
        origin.get("date", "n/a"), origin.get("commit", "n/a"), f"`{command}`" if command else "n/a",
    ]


@dataclass
class TablePlots:
    """The plots of one table, as paths relative to the README, or None with the reason in a note."""

    latency: str | None = None
    accuracy: str | None = None
    accuracy_metric: str = ""
    tuning: str | None = None
    notes: list[str] = field(default_factory=list)


def render_readme(
    tables: dict[ModelKey, list[Row]],
    plots: dict[ModelKey, TablePlots],
    warnings: Sequence[str],
    reports_dir: Path | None = None,
) -> str:
    """The whole reports/README.md."""
    lines = [
        "# Latency and accuracy per target",
        "",
        "Generated by `pipeline reports` (`make reports`) from `reports/*/latency.json` and "
        "`accuracy.json`; do not edit by hand. Each target's full report is its `report.md`.",
        "",
        "Latency is the TVM artifact's time per call after warm-up; the speed-ups divide the median of "
        "the fastest PyTorch configuration measured in the same run (named in the cell: eager, channels_last, "
        "torch.compile, CUDA graphs; each target's report.md lists them all) and of ONNX Runtime, measured on "
        "the same input, each alone in a process of its own, by TVM's. "
        "A row measured under qemu-aarch64 ran the board's own binary on an emulated CPU: its outputs, so "
        "its accuracy, are the board's, but its latency needs the board (RPC) and is never shown. "
        "\"Measured on\" names the device or the emulator, \"evaluated on\" the data and how many of its images. "
        "Top-1 agreement is the share of inputs whose top class matches the FP32 reference's (PyTorch, or "
        "ONNX Runtime for a user-supplied ONNX file; see Provenance); "
        "top-1 and top-5 need labeled data. A flag marks a regression against the previous "
        "measurement of the same target, precision and model on the same machine (device, CPU model, "
        "-mcpu, cores) with the same tuning records (see Regressions).",
        "",
    ]
    for key, rows in tables.items():
        lines += [f"## {key.label()}", ""]
        measured_rows = [row for row in rows if row.measured]
        if measured_rows:
            lines += _table(COLUMNS, (row_cells(row, reports_dir) for row in measured_rows))
            lines.append("")
        lines += not_measured_lines(rows)
        table_plots = plots.get(key, TablePlots())
        if table_plots.latency:
            lines += [f"![TVM latency per target, {key.label()}]({table_plots.latency})", ""]
        if table_plots.accuracy:
            lines += [f"![median latency against {table_plots.accuracy_metric}, {key.label()}]"
                      f"({table_plots.accuracy})", ""]
        if table_plots.tuning:
            lines += [f"![tuning curves, {key.label()}]({table_plots.tuning})", ""]
        lines += [f"_{note}_" + "  " for note in table_plots.notes]
        if table_plots.notes:
            lines.append("")

    if reports_dir is not None and (Path(reports_dir) / COMPILE_MATRIX).is_file():
        lines += [
            "## Compile matrix",
            "",
            f"Which targets and precisions compile, with artifact sizes and compile times: "
            f"[{COMPILE_MATRIX}]({COMPILE_MATRIX}) (`make compile-matrix`, run nightly).",
            "",
        ]

    measured = [row for rows in tables.values() for row in rows if row.measured]
    flagged = [row for row in measured if row.flags]
    lines += [
        "## Regressions",
        "",
        f"Against the previous `history.jsonl` entry for the same target, precision and model, measured on "
        f"the same device and CPU (model name, -mcpu, cores) with the same tuning records: median latency "
        f"up more than {100 * LATENCY_TOLERANCE:.0f}%, or top-1 agreement down. Entries of another machine "
        f"or other records are not compared.",
        "",
    ]
    if not flagged:
        lines += ["None.", ""]
    for row in flagged:
        before = row.previous or {}
        lines.append(
            f"- **{row.target} {row.precision}** ({row.model.label()}; {row.provenance.get('device', 'n/a')}): "
            f"{'; '.join(row.flags)}; previous: commit {before.get('commit', 'n/a')}, {before.get('date', 'n/a')}"
        )
    if flagged:
        lines.append("")

    if measured:
        lines += ["## Provenance", ""]
        lines += _table(
            ("target", "precision", "model", "reference", "device", "CPU", "GPU", "TVM", "torch", "ONNX Runtime",
             "date", "commit", "command"),
            (provenance_cells(row) for row in measured),
        )
        lines.append("")
    if warnings:
        lines += ["## Skipped files", ""]
        lines += [f"- {_cell(message)}" for message in warnings]
        lines.append("")
    return "\n".join(lines)


# ---------------------------------------------------------------- plots and the whole regeneration


def write_plots(reports_dir: Path, tables: dict[ModelKey, list[Row]], warnings: list[str]) -> dict[ModelKey, TablePlots]:
    """Draw each table's plots into reports_dir/plots/ and remove the PNGs no table draws any more."""
    from reports import plots  # matplotlib is only loaded when plots are drawn

    plots_dir = Path(reports_dir) / PLOTS_DIR
    written: set[Path] = set()
    result = {}
    for key, rows in tables.items():
        measured = [row for row in rows if row.measured]
        table_plots = TablePlots()
        result[key] = table_plots
        if not measured:
            continue
        title = key.label()

        summaries = [
            plots.LatencySummary(
                f"{row.target}\n{row.precision}",
                *(as_number(row.tvm.get(name)) for name in ("min_ms", "median_ms", "p90_ms", "p99_ms", "max_ms")),
                samples_ms=row.samples_ms,
            )
            # Not the rows evaluated under an emulator: they have no time to draw.
            for row in measured if row.latency is not None and (row.median_ms is not None or row.samples_ms)
        ]
        path = plots.latency_distribution(summaries, plots_dir / f"{key.slug()}-latency.png", title)
        if path is not None:
            written.add(path)
            table_plots.latency = f"{PLOTS_DIR}/{path.name}"
            if any(not s.samples_ms for s in summaries):
                table_plots.notes.append(
                    "Latency plot: where bench recorded no raw samples (`samples_ms`), the strip shows "
                    "min to max, a bar from median to p90, and p99.")

        both = [row for row in measured if row.median_ms is not None and row.agreement is not None]
        use_top1 = bool(both) and all(row.top1 is not None for row in both)
        metric = "top-1" if use_top1 else "top-1 agreement with FP32 reference"
        points = [
            plots.AccuracyPoint(row.target, row.precision, row.median_ms, row.top1 if use_top1 else row.agreement)
            for row in both
        ]
        path = plots.latency_vs_accuracy(points, plots_dir / f"{key.slug()}-accuracy.png",
                                         title, metric)
        if path is not None:
            written.add(path)
            table_plots.accuracy, table_plots.accuracy_metric = f"{PLOTS_DIR}/{path.name}", metric
        else:
            table_plots.notes.append("No latency-vs-accuracy plot: no row has both a latency and an agreement.")

        curves, medians = {}, {}
        for row in measured:
            if row.folder is None:
                continue
            curve_file = Path(reports_dir) / row.folder / TUNING_FILE
            curve = plots.read_tuning_curve(curve_file, warnings)
            if curve and curve_database(curve_file) != row.tuning_database:
                # Left from another build: not the tuning of the artifact measured in this row.
                warn(f"{curve_file}: a curve of {curve_database(curve_file)}, but {row.label} was compiled with "
                     f"{row.tuning_database or 'no tuning records'}; skipped", warnings)
                continue
            if curve:
                curves[row.label] = curve
                if row.median_ms is not None:
                    medians[row.label] = row.median_ms
        path = plots.tuning_curves(curves, plots_dir / f"{key.slug()}-tuning.png", title, medians)
        if path is not None:
            written.add(path)
            table_plots.tuning = f"{PLOTS_DIR}/{path.name}"
        else:
            table_plots.notes.append(f"No tuning curves: no row has a `{TUNING_FILE}` beside its report.")

    if plots_dir.is_dir():
        for stale in plots_dir.glob("*.png"):
            if stale not in written:
                stale.unlink()
    return result


@dataclass
class Summary:
    """What a regeneration did."""

    readme: Path
    tables: dict[ModelKey, list[Row]]
    warnings: list[str]
    regressions: list[Row]
    appended: list[dict]


def regenerate(
    reports_dir: Path,
    expected: Iterable[tuple[str, str]] = (),
    known: Sequence[str] | None = None,
    lookup: TargetLookup | None = None,
) -> Summary:
    """Rebuild reports_dir/README.md and its plots from the reports in it, and append
    the measured rows to history.jsonl (once per report, however often this runs)."""
    if known is None or lookup is None:
        from targets import get_target, known_targets

        known = known_targets() if known is None else known
        lookup = get_target if lookup is None else lookup
    reports_dir = Path(reports_dir)
    warnings: list[str] = []
    measured = gather(reports_dir, warnings)
    tables = build_tables(measured, expected_rows(known, expected, lookup), order=known)
    in_order = [row for rows in tables.values() for row in rows if row.measured]

    history_path = reports_dir / history.HISTORY_FILE
    past = history.load_history(history_path, warnings)
    for row in in_order:
        row.previous = history.previous_entry(past, row.history_entry())
        row.flags = regression_flags(row.history_entry(), row.previous)
    appended = history.append_entries(history_path, past, [row.history_entry() for row in in_order])

    table_plots = write_plots(reports_dir, tables, warnings)
    readme = reports_dir / README
    artifacts.atomic_write_text(readme, render_readme(tables, table_plots, warnings, reports_dir))
    return Summary(readme, tables, warnings, [row for row in in_order if row.flags], appended)
