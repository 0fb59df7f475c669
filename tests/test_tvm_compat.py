"""The IR quirks tvm_compat.py says once for the compiler hold in the pinned TVM: a PrimFunc's
parameters are its buffers, a Relax constant is a GenericConst, and a block's iterator kinds
are IterVar.DataPar and IterVar.CommReduce. On a TVM upgrade that changes one, this fails here
rather than in a schedule rule or graph pass that reads it."""

from __future__ import annotations

import numpy as np
import tvm
from tvm import relax, te
from tvm.s_tir import Schedule
from tvm.script import relax as R

from pipeline.compiler.tvm_compat import constant_value, is_constant, prim_func_buffers


def _row_sums():
    a = te.placeholder((8, 16), "float16", name="a")
    k = te.reduce_axis((0, 16), "k")
    out = te.compute((8,), lambda i: te.sum(a[i, k].astype("float32"), axis=k), name="row_sum")
    return te.create_prim_func([a, out])


def test_prim_func_buffers_are_its_parameters_with_shape_and_dtype():
    buffers = prim_func_buffers(_row_sums())
    assert [([int(d) for d in b.shape], str(b.dtype)) for b in buffers] == [([8, 16], "float16"), ([8], "float32")]


def test_block_iterator_kinds_are_data_parallel_then_reduction():
    sch = Schedule(tvm.IRModule({"main": _row_sums()}))
    kinds = [int(iv.iter_type) for iv in sch.get(sch.get_sblock("row_sum")).iter_vars]
    assert kinds == [tvm.tirx.IterVar.DataPar, tvm.tirx.IterVar.CommReduce]


def test_a_relax_constant_and_its_value():
    value = np.arange(6, dtype="float32").reshape(2, 3)
    constant = relax.const(value)
    assert is_constant(constant)
    np.testing.assert_array_equal(constant_value(constant), value)
    assert not is_constant(relax.Var("x", R.Tensor((2, 3), "float32")))
