"""External tools a build or a check needs (cross compilers, nvcc, qemu): found on the PATH,
or a PipelineError that names the Debian package to install, raised before any work starts."""

from __future__ import annotations

import shutil

from pipeline.errors import PipelineError


def require_tool(executable: str, package: str, purpose: str) -> str:
    """The path of `executable`, or a PipelineError naming the Debian package that has it."""
    path = shutil.which(executable)
    if path is None:
        raise PipelineError(
            f"{executable} is not installed; it is needed to {purpose}: apt-get install {package}"
        )
    return path


def require_cross_compiler(target) -> None:
    """Fail early when the target's cross compiler is missing (before any compile work)."""
    if target.cross_compiler is not None:
        require_tool(
            target.cross_compiler, target.cross_compiler_package or target.cross_compiler,
            f"link artifacts for target '{target.name}'",
        )
