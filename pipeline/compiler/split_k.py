"""Split-K for GPU GEMMs of small M: partial sums over slices of K, added by one more kernel.

ConvNeXt's last stages are GEMMs of few pixels and deep channels (batch 1, stage 3: M 49,
K 3072). Tiled over M x N alone, their grid is a few hundred one-warp blocks, each
walking all of K in series. Where gpu_cost_model.split_k_factor says it pays, a
float16 matmul with a 2-D weight becomes

    partial[s, ..., n] = sum over k in slice s of a[..., k] * w[k, n]   (float32)
    result = sum(partial, axis=0)

The partial GEMM is a batched GEMM whose batch is the slice, scheduled on tensor cores
like any other (TensorCoreMatmul). The sum is a reduction, into which FuseOps fuses no
consumer: ``fuse_partial_sums`` (after FuseOps) moves it into the fused function of the
GEMM's epilogue (bias, GELU, layer scale, residual), and schedules/gpu_partial_sums.py
schedules the two as one kernel. The rewrite runs before legalization, on GPU targets only.
"""

from __future__ import annotations

import math

import tvm
from tvm import relax, te

from pipeline.compiler.relax_graph import static_shape
from pipeline.compiler.producer_fusion import fuse_producers
from pipeline.compiler.gpu_cost_model import split_k_factor, takes_arch

PARTIAL_GEMM_NAME = "split_k_matmul"
PARTIAL_SUM_NAME = "split_k_sum"
# Marks the sums' PrimFuncs, so that the fuse phase finds them whatever they are named.
PARTIAL_SUM_ATTR = "convnext_edge.split_k_sum"


def partial_products(a: te.Tensor, w: te.Tensor, splits: int) -> te.Tensor:
    """partial[s, ..., n]: a's rows times w over the s-th of ``splits`` slices of K, float32."""
    *rows, depth_total = (int(d) for d in a.shape)
    columns = int(w.shape[1])
    depth = depth_total // splits
    k = te.reduce_axis((0, depth), name="k")

    def compute(split, *index):
        *row, column = index
        source = split * depth + k
        return te.sum(a[(*row, source)].astype("float32") * w[source, column].astype("float32"), axis=k)

    return te.compute((splits, *rows, columns), compute, name=PARTIAL_GEMM_NAME)


def partial_sum(partial: te.Tensor) -> te.Tensor:
    """The sum of ``partial`` over its first axis (the slices of K)."""
    split = te.reduce_axis((0, int(partial.shape[0])), name="split")
    return te.compute(tuple(partial.shape[1:]), lambda *index: te.sum(partial[(split, *index)], axis=split),
                      name=PARTIAL_SUM_NAME)


@relax.expr_functor.mutator
class _SplitK(relax.PyExprMutator):
    def __init__(self, mod: tvm.IRModule, sm_count: int):
        super().__init__(mod)
        self.sm_count = sm_count
        self.sums: list[tvm.ir.GlobalVar] = []

    def visit_call_(self, call: relax.Call) -> relax.Expr:
        call = super().visit_call_(call)
        if not (isinstance(call.op, tvm.ir.Op) and call.op.name == "relax.matmul" and len(call.args) == 2):
            return call
        a, w = call.args
        a_shape, w_shape = static_shape(a), static_shape(w)
        if (a_shape is None or w_shape is None or len(w_shape) != 2 or len(a_shape) < 2
                or str(a.ty.dtype) != "float16" or str(w.ty.dtype) != "float16"):
            return call
        # TVM 0.27: an unset out_dtype is None (the operands' dtype).
        out_dtype = str(call.attrs.out_dtype or a.ty.dtype)
        if out_dtype == "void":
            out_dtype = str(a.ty.dtype)
        m, k, n = math.prod(a_shape[:-1]), a_shape[-1], w_shape[1]
        splits = split_k_factor(m, n, k, self.sm_count)
        if splits == 1:
            return call
        partial = self.builder_.emit(
            self.builder_.call_te(partial_products, a, w, splits, primfunc_name_hint=PARTIAL_GEMM_NAME), "partial_sums")
        total = self.builder_.call_te(partial_sum, partial, primfunc_name_hint=PARTIAL_SUM_NAME)
        self.sums.append(total.args[0])
        if out_dtype == "float32":
            return total
        return relax.op.astype(self.builder_.emit(total, "split_k_sum"), out_dtype)


def split_k(mod: tvm.IRModule, sm_count: int) -> tvm.IRModule:
    """``mod`` with the GEMMs that split_k_factor splits for ``sm_count`` SMs split."""
    mutator = _SplitK(mod, sm_count)
    for gvar, func in list(mod.functions_items()):
        if isinstance(func, relax.Function):
            mutator.builder_.update_func(gvar, mutator.visit_expr(func))
    if not mutator.sums:
        return mod
    result = mutator.builder_.get()
    for gvar in mutator.sums:
        result.update_func(gvar, result[gvar].with_attr(PARTIAL_SUM_ATTR, True))
    return relax.transform.DeadCodeElimination()(result)


def _partial_sum_into_epilogue(_mod: tvm.IRModule, producer, _group: relax.Function, _position: int) -> bool:
    return isinstance(producer, tvm.tirx.PrimFunc) and bool((producer.attrs or {}).get(PARTIAL_SUM_ATTR))


def fuse_partial_sums(mod: tvm.IRModule) -> tvm.IRModule:
    """Each split GEMM's sum joins the fused function of its epilogue (after FuseOps, which
    fuses no consumer into a reduction), so that the sum and the epilogue are one kernel."""
    return fuse_producers(mod, _partial_sum_into_epilogue)


def fuse_partial_sums_pass() -> tvm.transform.Pass:
    """``fuse_partial_sums`` as a module pass (after FuseOps, before FuseTIR)."""

    @tvm.transform.module_pass(opt_level=0, name="FusePartialSums")
    def _pass(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        return fuse_partial_sums(mod)

    return _pass


def split_k_pass(target) -> tvm.transform.Pass:
    """``split_k`` for a GPU target (targets.Target) as a module pass; a no-op where the
    tensor-core schedule, which split_k_factor models, does not run (before sm_80)."""

    @tvm.transform.module_pass(opt_level=0, name="SplitK")
    def _pass(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        if not takes_arch(target.cuda_arch or ""):
            return mod
        return split_k(mod, target.sm_count)

    return _pass
