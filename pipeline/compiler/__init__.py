"""The compiler layer: ONNX -> Relax -> scheduled kernels -> a shared library per target.

The only package that imports TVM's compiler (relax, s_tir, MetaSchedule). It may use
pipeline.runtime (to load what it built, to measure on a board); the runtime never imports it.
"""
