"""A kernel that FuseOps leaves on its own joins the fused function that reads its result.

FuseOps fuses elementwise consumers into a GEMM or convolution and elementwise producers
into a reduction, but never a producer into a convolution, nor a reduction's elementwise
consumers into the reduction. Where our GPU schedules take such a pair as one kernel (a
cast on the depthwise convolution's input tile, cast_fusion.py; the partial sums of a
split-K GEMM before its epilogue, split_k.py), this moves the producer's call_tir into
its consumer's fused function after FuseOps, and FuseTIR then makes one kernel of them.
"""

from __future__ import annotations

from typing import Callable

import tvm
from tvm import relax

# (the module, the producer's PrimFunc, the consumer's fused function, the argument
# position the producer's result takes there) -> whether the producer moves in.
Accepts = Callable[[tvm.IRModule, tvm.tirx.PrimFunc, relax.Function, int], bool]


def is_call_tir(value) -> bool:
    return isinstance(value, relax.Call) and value.op == tvm.ir.Op.get("relax.call_tir")


def is_fused_group(func) -> bool:
    """Whether ``func`` is a fused function (FuseOps' group, called from main)."""
    return isinstance(func, relax.Function) and bool(func.attrs and func.attrs.get("Primitive"))


def _merged(group: relax.Function, position: int, producer: relax.Call) -> relax.Function:
    """``group`` taking the producer's inputs in place of its parameter at ``position``,
    whose value the producer now computes inside (not one more output of the kernel)."""
    inputs = [relax.Var(value.name if isinstance(value, relax.Var) else f"producer_input{i}", value.ty)
              for i, value in enumerate(producer.args[1].fields)]
    replaced = group.params[position]
    produced = relax.DataflowVar(replaced.name, replaced.ty)
    rest = group.bind_params({replaced: produced})
    binding = relax.VarBinding(produced, relax.call_tir(producer.args[0], inputs, out_ty=replaced.ty))
    blocks = list(rest.body.blocks)
    blocks[0] = relax.DataflowBlock([binding, *blocks[0].bindings])
    params = [*group.params[:position], *inputs, *group.params[position + 1:]]
    return relax.Function(params, relax.SeqExpr(blocks, rest.body.body), group.ret_ty, group.is_pure, group.attrs)


def fuse_producers(mod: tvm.IRModule, accepts: Accepts) -> tvm.IRModule:
    """Every call_tir in ``main`` whose one use is an argument of a fused function, where
    ``accepts`` says so, becomes part of (a copy of) that fused function."""
    main = mod["main"]
    builder = relax.BlockBuilder(mod)  # adds the merged functions with their types
    merged: dict[tuple[str, str, int], tvm.ir.GlobalVar] = {}
    new_blocks = []
    for block in main.body.blocks:
        if not isinstance(block, relax.DataflowBlock):
            new_blocks.append(block)
            continue
        users = relax.analysis.udchain(block)
        producers = {binding.var: binding.value for binding in block.bindings
                     if isinstance(binding.var, relax.DataflowVar) and is_call_tir(binding.value)
                     and len(users.get(binding.var, [])) == 1}
        # consumer var -> (position, the producer it takes in)
        takes: dict[relax.Var, tuple[int, relax.Var]] = {}
        for binding in block.bindings:
            call = binding.value
            if not (isinstance(call, relax.Call) and isinstance(call.op, tvm.ir.GlobalVar)
                    and is_fused_group(mod[call.op])):
                continue
            for position, arg in enumerate(call.args):
                if (arg in producers and list(call.args).count(arg) == 1
                        and accepts(mod, mod[producers[arg].args[0]], mod[call.op], position)):
                    takes[binding.var] = (position, arg)
                    break
        moved = {producer for _, producer in takes.values()}
        bindings = []
        for binding in block.bindings:
            if binding.var in moved:
                continue
            if binding.var in takes:
                consumer = binding.value
                position, produced = takes[binding.var]
                producer = producers[produced]
                key = (producer.args[0].name_hint, consumer.op.name_hint, position)
                if key not in merged:
                    name = f"fused_{producer.args[0].name_hint}_{consumer.op.name_hint.removeprefix('fused_')}"
                    merged[key] = builder.add_func(_merged(mod[consumer.op], position, producer), name)
                args = [*consumer.args[:position], *producer.args[1].fields, *consumer.args[position + 1:]]
                binding = relax.VarBinding(binding.var, relax.Call(merged[key], args))
            bindings.append(binding)
        new_blocks.append(relax.DataflowBlock(bindings))
    if not merged:
        return mod
    builder.update_func(mod.get_global_var("main"), relax.Function(
        main.params, relax.SeqExpr(new_blocks, main.body.body), main.ret_ty, main.is_pure, main.attrs))
    return relax.transform.DeadCodeElimination()(relax.transform.Normalize()(builder.get()))
