"""Runs stages in order with content-keyed caching.

A stage is a plain function from input files to output files. The engine
decides whether it must run (no complete directory for its key yet), gives it
a scratch directory, and records a manifest entry: the input hashes, settings,
tool versions, timings and outputs. Because a stage's key includes the hashes of
its input files, changing a setting re-runs that stage and, through the new
output hashes, only the stages downstream of it.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from pipeline import artifacts
from pipeline.config import PipelineConfig
from pipeline.errors import PipelineError
from pipeline.provenance import now_iso, tool_versions
from targets import Target

# (config, target, inputs by name, scratch dir) -> {"outputs": {name: file name}, "info": {...}}
StageFunction = Callable[[PipelineConfig, Target, dict[str, Path], Path], dict[str, Any]]


@dataclass(frozen=True)
class Stage:
    name: str
    # Names of files, produced upstream or supplied by the user, that the stage reads;
    # a function of the config where they depend on a setting (e.g. precision).
    inputs: tuple[str, ...] | Callable[[PipelineConfig], tuple[str, ...]]
    # Names of the files the stage produces.
    outputs: tuple[str, ...]
    # The settings the result depends on; part of the cache key.
    settings: Callable[[PipelineConfig, Target], dict[str, Any]]
    run: StageFunction
    # Bump when the stage's code changes what it writes, so old cache entries are not reused.
    version: int = 1
    # Measurements are not a pure function of their inputs: they run every time.
    cacheable: bool = True
    # Inputs the stage can do without (e.g. a PyTorch baseline for a user-supplied ONNX).
    optional_inputs: tuple[str, ...] = ()


def inputs_of(stage: Stage, config: PipelineConfig) -> tuple[str, ...]:
    return stage.inputs(config) if callable(stage.inputs) else stage.inputs


@dataclass
class StageResult:
    stage: str
    outputs: dict[str, Path]
    manifest: dict[str, Any]
    cached: bool
    path: Path = field(default=Path("."))


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def stage_key(stage: Stage, config: PipelineConfig, target: Target, inputs: dict[str, Path]) -> tuple[str, dict]:
    """The cache key of a stage run and the description it was made from."""
    description = {
        "stage": stage.name,
        "stage_version": stage.version,
        "settings": stage.settings(config, target),
        "inputs": {name: artifacts.file_sha256(path) for name, path in sorted(inputs.items())},
        "tools": tool_versions(),
    }
    return artifacts.content_key(description), description


def run_stage(
    stage: Stage,
    config: PipelineConfig,
    target: Target,
    inputs: dict[str, Path],
    root: Path,
    force: bool = False,
) -> StageResult:
    """Run one stage, or return its cached result when nothing it depends on changed."""
    wanted = inputs_of(stage, config)
    missing = [name for name in wanted if name not in inputs and name not in stage.optional_inputs]
    if missing:
        raise PipelineError(f"stage '{stage.name}' needs {', '.join(missing)}, which no earlier stage produced")
    stage_inputs = {name: Path(inputs[name]) for name in wanted if name in inputs}
    key, description = stage_key(stage, config, target, stage_inputs)
    stage_dir = artifacts.StageDir(Path(root), stage.name, key)

    manifest = stage_dir.manifest()
    if manifest is not None and stage.cacheable and not force:
        log(f"[{stage.name}] cached  {stage_dir.path}")
        outputs = {name: stage_dir.path / file for name, file in manifest["outputs"].items()}
        return StageResult(stage.name, outputs, manifest, cached=True, path=stage_dir.path)

    log(f"[{stage.name}] running -> {stage_dir.path}")
    temp_dir = artifacts.new_temp_dir(stage_dir)
    started = time.perf_counter()
    try:
        result = stage.run(config, target, stage_inputs, temp_dir)
        produced = result["outputs"]
        absent = [name for name in produced.values() if not (temp_dir / name).exists()]
        if absent:
            raise RuntimeError(f"stage '{stage.name}' did not write {absent}")
        manifest = {
            **description,
            "key": key,
            "target": target.name,
            "input_files": {name: str(path) for name, path in stage_inputs.items()},
            "outputs": produced,
            "output_sha256": {name: artifacts.file_sha256(temp_dir / file) for name, file in produced.items()},
            "info": result.get("info", {}),
            "seconds": round(time.perf_counter() - started, 3),
            "finished": now_iso(),
        }
        final = artifacts.commit_temp_dir(temp_dir, stage_dir, manifest)
    except BaseException:
        artifacts.discard_temp_dir(temp_dir)
        raise
    log(f"[{stage.name}] done in {manifest['seconds']:.1f}s")
    outputs = {name: final / file for name, file in produced.items()}
    return StageResult(stage.name, outputs, manifest, cached=False, path=final)


def stages_needed(
    stages: list[Stage],
    until: str,
    provided: dict[str, Path],
    config: PipelineConfig,
    unavailable: frozenset[str] = frozenset(),
) -> list[Stage]:
    """The stages, in order, that must run to produce `until`'s outputs from what is provided.

    Optional inputs named in `unavailable` are not produced (e.g. no PyTorch model
    exists for a user-supplied ONNX file, so none is built for the baselines)."""
    by_name = {stage.name: stage for stage in stages}
    if until not in by_name:
        raise PipelineError(f"unknown stage '{until}'; stages: {', '.join(by_name)}")
    producer = {output: stage for stage in stages for output in stage.outputs}
    needed: set[str] = set()
    pending = [by_name[until]]
    while pending:
        stage = pending.pop()
        if stage.name in needed:
            continue
        needed.add(stage.name)
        for name in inputs_of(stage, config):
            if name in provided or (name in unavailable and name in stage.optional_inputs):
                continue
            if name in producer:
                pending.append(producer[name])
            elif name not in stage.optional_inputs:
                raise PipelineError(f"stage '{stage.name}' needs '{name}'; pass it on the command line")
    return [stage for stage in stages if stage.name in needed]


def run_pipeline(
    stages: list[Stage],
    config: PipelineConfig,
    target: Target,
    until: str,
    provided: dict[str, Path] | None = None,
    force: tuple[str, ...] = (),
    unavailable: frozenset[str] = frozenset(),
) -> dict[str, StageResult]:
    """Run every stage `until` depends on, in order, reusing cached results."""
    root = artifacts.open_root(config.artifacts)
    for leftover in artifacts.remove_stale_temp_dirs(root):
        log(f"[cache] removed {leftover}, left by a stage that was killed")
    available: dict[str, Path] = dict(provided or {})
    results: dict[str, StageResult] = {}
    for stage in stages_needed(stages, until, available, config, unavailable):
        result = run_stage(stage, config, target, available, root, force=stage.name in force)
        results[stage.name] = result
        available.update(result.outputs)
    return results
