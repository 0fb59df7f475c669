"""pipeline/cli/reports.py: the `pipeline reports` command."""

import pytest
import typer
from typer.testing import CliRunner

import targets
from pipeline.errors import PipelineError
from pipeline.cli.reports import register
from report_samples import KNOWN, lookup, write_pair


@pytest.fixture
def app(monkeypatch):
    """A CLI with only the `reports` command, over the fake targets (no TVM import)."""
    monkeypatch.setattr(targets, "known_targets", lambda: list(KNOWN))
    monkeypatch.setattr(targets, "get_target", lookup)
    app = typer.Typer()
    register(app)

    @app.command()
    def other() -> None:
        """A second command, so that typer keeps `reports` as a subcommand."""

    return app


def test_reports_regenerates_the_readme(app, tmp_path):
    write_pair(tmp_path, "x86")
    result = CliRunner().invoke(app, ["reports", "--reports-dir", str(tmp_path), "--expect", "cuda:fp16"])
    assert result.exit_code == 0, result.output
    assert f"readme: {tmp_path / 'README.md'}" in result.stdout
    markdown = (tmp_path / "README.md").read_text()
    assert "| x86 | fp32 | 10.00 |" in markdown
    assert "| cuda | fp32, fp16 | no device: needs an NVIDIA GPU |" in markdown
    assert "[reports] 1 measured and" in result.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--reports-dir", "{tmp}/absent"], "does not exist"),
        (["--expect", "x86"], "is not TARGET:PRECISION"),
        (["--expect", "x86:fp64"], "unknown precision 'fp64'"),
        (["--expect", "tpu:fp32"], "unknown target 'tpu'"),
    ],
)
def test_user_errors(app, tmp_path, args, message):
    args = [arg.format(tmp=tmp_path) for arg in args]
    if "--reports-dir" not in args:
        args += ["--reports-dir", str(tmp_path)]
    result = CliRunner().invoke(app, ["reports", *args])
    assert isinstance(result.exception, PipelineError)
    assert message in str(result.exception)


def test_registered_in_the_pipeline_cli(tmp_path):
    """Once pipeline/cli.py registers the command, a user error is one line and exit code 2."""
    from conftest import run_cli
    from pipeline import cli

    if "reports" not in [command.name for command in cli.app.registered_commands]:
        pytest.skip("pipeline/cli.py does not register `reports` yet")
    result = run_cli("reports", "--reports-dir", str(tmp_path / "absent"), cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip().startswith("error: reports directory") and "Traceback" not in result.stderr
