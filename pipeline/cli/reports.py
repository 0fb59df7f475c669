"""`pipeline reports`: regenerate reports/README.md from every committed target report."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from pipeline.errors import PipelineError


def parse_expected(values: list[str]) -> list[tuple[str, str]]:
    """TARGET:PRECISION pairs for rows that must appear, measured or not."""
    from pipeline.config import PRECISIONS
    from targets import get_target

    pairs = []
    for value in values:
        name, sep, precision = value.partition(":")
        if not sep or not name or not precision:
            raise PipelineError(f"--expect '{value}' is not TARGET:PRECISION; e.g. --expect x86:int8")
        if precision not in PRECISIONS:
            raise PipelineError(f"--expect '{value}': unknown precision '{precision}'; use one of: {', '.join(PRECISIONS)}")
        get_target(name)  # an unknown name raises the error that lists the known targets
        pairs.append((name, precision))
    return pairs


def reports(
    reports_dir: Annotated[Path, typer.Option(help="Folder of per-target reports (<target>/latency.json, accuracy.json).")] = Path("reports"),
    expect: Annotated[Optional[list[str]], typer.Option(metavar="TARGET:PRECISION", help="A row to list even if unmeasured; repeatable. Every precision of every known target is listed anyway.")] = None,
) -> None:
    """Regenerate reports/README.md: every target's latency and accuracy in one table per model, with plots and regression flags."""
    from pipeline.engine import log
    from reports.aggregate import regenerate

    if not reports_dir.is_dir():
        raise PipelineError(
            f"reports directory '{reports_dir}' does not exist; run `pipeline report --target TARGET` first "
            "or pass --reports-dir"
        )
    summary = regenerate(reports_dir, expected=parse_expected(expect or []))
    rows = [row for rows in summary.tables.values() for row in rows]
    measured = sum(row.measured for row in rows)
    log(f"[reports] {measured} measured and {len(rows) - measured} unmeasured rows in {len(summary.tables)} "
        f"table(s); {len(summary.appended)} new history entries; {len(summary.warnings)} files skipped")
    for row in summary.regressions:
        log(f"[reports] regression: {row.target} {row.precision} ({row.model.label()}): {'; '.join(row.flags)}")
    print(f"readme: {summary.readme}")


def register(app: typer.Typer) -> None:
    """Add the `reports` command to the `pipeline` CLI."""
    app.command(name="reports")(reports)
