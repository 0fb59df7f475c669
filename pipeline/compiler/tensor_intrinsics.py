"""Tensor intrinsics for MetaSchedule and for schedules that tensorize (VNNI), loaded fast:
TVM's own import through tvm_compat.import_tensor_intrinsics_fast (45-95 s otherwise on a
busy small machine, which broke MetaSchedule's builder timeouts), then the pipeline's own."""

from __future__ import annotations

from pipeline.compiler.tvm_compat import import_tensor_intrinsics_fast


def load_tensor_intrinsics() -> None:
    """Import tvm.s_tir.tensor_intrin quickly (also the LocalBuilder worker initializer),
    and register the pipeline's own VNNI intrinsic (pipeline/compiler/vnni.py)."""
    from pipeline.compiler import vnni

    vnni.register_intrinsic()
    import_tensor_intrinsics_fast()
