"""A cast of a depthwise convolution's input joins the convolution's kernel (GPU, fp16).

In mixed precision ConvNeXt's residual stream stays float32 (the GEMM epilogue adds the
residual in float32) and each block's 7x7 depthwise convolution reads it in float16. TVM's
FuseOps never fuses an elementwise producer into a convolution (only into injective or
reduction consumers), so each block paid a kernel of its own for that cast: 18 launches
per ConvNeXt-T inference, each writing a float16 copy the convolution then read back.
After FuseOps, this pass moves such a cast into the convolution's fused function, where
FuseTIR makes one kernel of them and the depthwise schedule (schedules/gpu_depthwise.py)
converts on the copy of the input tile into shared memory.
"""

from __future__ import annotations

import tvm
from tvm import relax

from pipeline.compiler.schedules.depthwise import is_depthwise_nhwc


def _call_tir(value) -> bool:
    return isinstance(value, relax.Call) and value.op == tvm.ir.Op.get("relax.call_tir")


def _is_cast(func) -> bool:
    """An elementwise PrimFunc of one input and one output whose dtypes differ."""
    if not isinstance(func, tvm.tirx.PrimFunc) or len(func.params) != 2:
        return False
    if int((func.attrs or {}).get("op_pattern", -1)) != 0:  # kElemWise (AnnotateTIROpPattern)
        return False
    # TVM 0.27: a PrimFunc's parameters are its buffers (shape, dtype).
    source, result = func.params
    return str(source.dtype) != str(result.dtype) and [int(d) for d in source.shape] == [int(d) for d in result.shape]


def _depthwise_group(mod: tvm.IRModule, gvar) -> bool:
    """Whether ``gvar`` is a fused function (FuseOps' group) around a depthwise convolution."""
    func = mod[gvar]
    if not isinstance(func, relax.Function) or not (func.attrs and func.attrs.get("Primitive")):
        return False
    for block in func.body.blocks:
        for binding in block.bindings:
            value = binding.value
            if _call_tir(value):
                callee = mod[value.args[0]]
                if isinstance(callee, tvm.tirx.PrimFunc) and is_depthwise_nhwc(callee):
                    return True
    return False


def _merged(group: relax.Function, cast_gvar, source_type) -> relax.Function:
    """``group`` taking the cast's input: its first parameter becomes the cast's result, a
    value inside the function (not one more output of the fused kernel)."""
    # TVM 0.27: an expression's type is `.ty` (was `.struct_info`).
    cast_input = relax.Var("cast_input", source_type)
    first = group.params[0]
    cast_result = relax.DataflowVar(first.name, first.ty)
    rest = group.bind_params({first: cast_result})
    cast = relax.VarBinding(cast_result, relax.call_tir(cast_gvar, [cast_input], out_ty=first.ty))
    blocks = list(rest.body.blocks)
    blocks[0] = relax.DataflowBlock([cast, *blocks[0].bindings])
    body = relax.SeqExpr(blocks, rest.body.body)
    return relax.Function([cast_input, *rest.params], body, group.ret_ty, group.is_pure, group.attrs)


def fuse_casts_into_depthwise(mod: tvm.IRModule) -> tvm.IRModule:
    """Every ``y = cast(x)`` in ``main`` whose one use is as the first argument of a fused
    depthwise convolution becomes part of that convolution's fused function."""
    main = mod["main"]
    builder = relax.BlockBuilder(mod)  # adds the merged functions with their types
    merged: dict[tuple[str, str], tvm.ir.GlobalVar] = {}
    new_blocks = []
    for block in main.body.blocks:
        if not isinstance(block, relax.DataflowBlock):
            new_blocks.append(block)
            continue
        users = relax.analysis.udchain(block)
        casts = {binding.var: binding.value for binding in block.bindings
                 if _call_tir(binding.value) and _is_cast(mod[binding.value.args[0]])
                 and len(users.get(binding.var, [])) == 1}
        # The consumers that take a cast in, and the casts that move into them.
        consumers = {binding.var for binding in block.bindings
                     if isinstance(binding.value, relax.Call) and isinstance(binding.value.op, tvm.ir.GlobalVar)
                     and binding.value.args and binding.value.args[0] in casts
                     and _depthwise_group(mod, binding.value.op)}
        moved = {binding.value.args[0] for binding in block.bindings if binding.var in consumers}
        bindings = []
        for binding in block.bindings:
            if binding.var in moved:
                continue
            consumer = binding.value
            if binding.var in consumers:
                cast = casts[consumer.args[0]]
                cast_gvar, source = cast.args[0], cast.args[1][0]
                key = (cast_gvar.name_hint, consumer.op.name_hint)
                if key not in merged:
                    name = f"fused_{cast_gvar.name_hint}_{consumer.op.name_hint.removeprefix('fused_')}"
                    merged[key] = builder.add_func(_merged(mod[consumer.op], cast_gvar, source.ty), name)
                binding = relax.VarBinding(binding.var, relax.Call(merged[key], [source, *consumer.args[1:]]))
            bindings.append(binding)
        new_blocks.append(relax.DataflowBlock(bindings))
    if not merged:
        return mod
    builder.update_func(mod.get_global_var("main"), relax.Function(
        main.params, relax.SeqExpr(new_blocks, main.body.body), main.ret_ty, main.is_pure, main.attrs))
    return relax.transform.DeadCodeElimination()(relax.transform.Normalize()(builder.get()))


def fuse_casts_into_depthwise_pass() -> tvm.transform.Pass:
    """``fuse_casts_into_depthwise`` as a module pass (after FuseOps, before FuseTIR)."""

    @tvm.transform.module_pass(opt_level=0, name="FuseCastsIntoDepthwise")
    def transform(mod, _ctx):
        return fuse_casts_into_depthwise(mod)

    return transform
