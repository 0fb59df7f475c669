"""The pipeline's stages, in the order they run."""

from pipeline.stages import bench, build, compile, evaluate, export, quantize, report, simplify

STAGES = [
    build.STAGE,
    export.STAGE,
    simplify.STAGE,
    quantize.STAGE,  # precision int8 only: compile reads its output instead of simplify's
    compile.STAGE,
    bench.STAGE,
    evaluate.STAGE,
    report.STAGE,
]
