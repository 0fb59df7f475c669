"""Choosing the default schedule of a CPU kernel: tuning records, where a database has them,
replace these (schedules/apply.py applies both). Each default is a rule of its own module:
the tiled GEMMs (cpu_tiled.py), VNNI matmuls (pipeline/compiler/vnni.py), NHWC depthwise
convolutions (depthwise.py), and the row kernels (cpu_rows.py).
"""

from __future__ import annotations

import logging

import tvm
from tvm.s_tir import Schedule

from pipeline.compiler.kernel_kinds import is_depthwise_nhwc
from pipeline.compiler.schedules import cpu_rows, depthwise
from pipeline.compiler.schedules.cpu_tiled import dense_contraction, tiled_default, vector_lanes


# Bump when the default schedules change, so compiled artifacts are rebuilt.
DEFAULT_SCHEDULE_VERSION = 7

log = logging.getLogger(__name__)


# Default schedules, chosen from the target's vector registers and caches rather than by
# search (the way MLAS and oneDNN block their GEMMs), and checked against tuned records:
#
#   * Dense contractions (the 1x1-conv matmuls with their bias/GELU epilogues, the stem and
#     the downsampling patch GEMMs) take MetaSchedule's own CPU sketch (multi-level tiling
#     "SSRSRS", epilogue fused, outer loops parallel, inner vectorized) with decisions from
#     ``RegisterBlock`` (cpu_tiled.py): a register tile of `rows` x 2 vectors of outputs,
#     as many rows as the vector registers hold accumulators for (a FMA chain per accumulator
#     hides the FMA latency; AVX-512 and NEON have 32 registers, AVX2 16), 64 reduction steps per pass
#     over the tile. Where the weights do not fit in a core's L2 (stage 3's 768x3072) a
#     parallel job takes up to 128 rows, image rows of a [1, H, W, C] map included, so each
#     weight panel is read from memory once per job instead of once per register tile.
#   * The depthwise 7x7 convolutions (channels-last since pipeline/compiler/layout.py) get
#     their register-tiled schedule (pipeline/compiler/schedules/depthwise.py).
#   * LayerNorms and means over channels, and the elementwise and data movement kernels
#     (pipeline/compiler/schedules/cpu_rows.py): pixels parallel, channels vectorized, the
#     reductions as vector partial sums.
#   * Matrix-vector products (the head at batch 1; cpu_rows.gemv_schedule): the weights
#     streamed once, parallel over vectors of output columns.
#
# ConvNeXt-T 224, batch 1, 2 threads (Xeon, rocketlake), kernel time summed over the model,
# these defaults vs. the znver5 tuned records replayed on the same machine: the 12 tiled
# GEMMs 39.4 vs 41.6 ms (the records faster on 4 of them, by up to 1.2x); LayerNorms and
# means 0.38 vs 0.67 ms; every kernel 42.4 vs 45.4 ms. Before these defaults (4 rows x
# 1 vector, reduction 4; reductions and elementwise kernels single-threaded scalar loops)
# the GEMMs took 62.9 ms and the LayerNorms and means 3.6 ms. Records replace defaults
# where a database has them.


def _vnni_default(func, tvm_target: tvm.target.Target) -> Schedule | None:
    """The VNNI matmul kernels of pipeline/compiler/int8.py (x86 with AVX-512 VNNI) have their own
    schedule (pipeline/compiler/vnni.py): the generic sketch would not tensorize them."""
    from pipeline.compiler import vnni

    if tvm_target.kind.name != "llvm" or "gpu" in tvm_target.keys:
        return None
    try:
        return vnni.schedule_vnni_matmul(func)
    except Exception as exc:  # a fused shape the schedule does not handle: the generic default
        log.warning("VNNI matmul keeps the generic schedule: %s", exc)
        return None


def default_schedule(task_mod: tvm.IRModule, tvm_target: tvm.target.Target) -> tuple[Schedule, str]:
    """The default schedule of a task ({"main": PrimFunc}) and its kind: "tiled" for dense
    contractions, "vnni" for the int8 VNNI matmuls, "depthwise" for channels-last depthwise
    convolutions (pipeline/compiler/schedules/depthwise.py), "gemv" for matrix-vector products,
    "reduction" and "elementwise" for LayerNorms, means and the kernels between
    (pipeline/compiler/schedules/cpu_rows.py), else
    "as_lowered" (an empty schedule: kernels too small to parallelize).
    Its trace is a tuning record's."""
    func = task_mod["main"]
    sch = _vnni_default(func, tvm_target)
    if sch is not None:
        return sch, "vnni"
    is_cpu = tvm_target.kind.name == "llvm" and "gpu" not in tvm_target.keys
    if is_cpu and is_depthwise_nhwc(func):
        sch = depthwise.depthwise_nhwc_schedule(task_mod, vector_lanes(tvm_target))
        if sch is not None:
            return sch, "depthwise"
    if is_cpu and dense_contraction(func):
        try:
            sch = tiled_default(func, tvm_target)
            if sch is not None:
                return sch, "tiled"
        except Exception as exc:  # a sketch that does not apply keeps the lowered loops
            log.info("no tiled default: %s", exc)
    if is_cpu:
        rules = (
            ("gemv", cpu_rows.gemv_schedule),
            ("reduction", cpu_rows.reduction_rows_schedule),
            ("elementwise", cpu_rows.injective_schedule),
        )
        for kind, rule in rules:
            try:
                sch = rule(func, vector_lanes(tvm_target))
            except Exception as exc:  # noqa: BLE001 -- a rule that does not apply
                log.info("no %s default: %s", kind, exc)
                sch = None
            if sch is not None:
                return sch, kind
    sch = Schedule(task_mod, seed=1)
    # TVM 0.27: a record with an empty trace is "invalid" and never looked up; fetching the
    # root block changes nothing and makes the lowered loops a record like any other.
    sch.get_sblock("root")
    return sch, "as_lowered"
