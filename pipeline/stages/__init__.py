"""The pipeline's stages, in the order they run."""

from pipeline.stages import bench, build, compile, evaluate, export, report, simplify

STAGES = [
    build.STAGE,
    export.STAGE,
    simplify.STAGE,
    compile.STAGE,
    bench.STAGE,
    evaluate.STAGE,
    report.STAGE,
]
