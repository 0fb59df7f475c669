"""Reading and rewriting Relax graphs, once for every graph pass: an expression's static
shape and operator, a function's bindings with their readers, and the "twin" rewriter that
layout.py (NHWC twins of NCHW values) and nhwc_gemms.py (map twins of flattened rows) build on."""

from __future__ import annotations

from typing import Callable

import tvm
from tvm import relax


def static_shape(expr: relax.Expr) -> tuple[int, ...] | None:
    """The shape of a tensor expression whose every dimension is a constant, else None."""
    ty = getattr(expr, "ty", None)
    shape = ty.shape if isinstance(ty, relax.TensorType) else None
    if not isinstance(shape, relax.ShapeExpr):
        return None
    dims = list(shape.values)
    return tuple(int(d) for d in dims) if all(isinstance(d, tvm.tirx.IntImm) for d in dims) else None


def op_name(call: relax.Expr) -> str | None:
    """The Relax operator a call applies ("relax.add"), None for any other expression."""
    if isinstance(call, relax.Call) and isinstance(call.op, tvm.ir.Op):
        return call.op.name
    return None


def vars_read(expr: relax.Expr) -> list[relax.Var]:
    """The variables an expression reads directly (through calls, tuples and their items)."""
    if isinstance(expr, relax.Var):
        return [expr]
    if isinstance(expr, relax.Call):
        return [var for arg in expr.args for var in vars_read(arg)]
    if isinstance(expr, relax.Tuple):
        return [var for item in expr.fields for var in vars_read(item)]
    if isinstance(expr, relax.TupleGetItem):
        return vars_read(expr.tuple_value)
    return []


class Bindings:
    """A function's variable bindings: each bound variable's value, in order, and for each
    variable the binding variables that read it (None: the function's result)."""

    def __init__(self, func: relax.Function):
        self.value: dict[relax.Var, relax.Expr] = {}
        self.readers: dict[relax.Var, list[relax.Var | None]] = {}
        self.order: list[relax.Var] = []
        for block in func.body.blocks:
            for binding in block.bindings:  # VarBinding and MatchCast alike bind a value
                self.value[binding.var] = binding.value
                self.order.append(binding.var)
                for read in vars_read(binding.value):
                    self.readers.setdefault(read, []).append(binding.var)
        for read in vars_read(func.body.body):
            self.readers.setdefault(read, []).append(None)

    def resolve(self, expr: relax.Expr) -> relax.Expr:
        """The value behind a chain of variables."""
        while isinstance(expr, relax.Var) and expr in self.value:
            expr = self.value[expr]
        return expr

    def only_reader(self, var: relax.Var) -> relax.Var | None:
        readers = self.readers.get(var, [])
        return readers[0] if len(readers) == 1 else None


class TwinRewriter(relax.PyExprMutator):
    """A dataflow rewrite that keeps some values only as a "twin": the same tensor in another
    layout or shape. ``convert(value)`` returns ("twin", new) to bind the value's twin, or
    ("direct", new) to replace the value, or None to keep the binding; a twin-only value read
    by anything the rewrite does not convert is materialized there (``materialize``), so the
    result is always correct. Subclasses are decorated with ``relax.expr_functor.mutator``."""

    def __init__(self, mod: tvm.IRModule):
        super().__init__(mod)
        self.twin: dict[relax.Var, relax.Var] = {}
        self.converted = 0

    def convert(self, value: relax.Expr) -> tuple[str, relax.Expr] | None:
        raise NotImplementedError

    def materialize(self, var: relax.Var, twin: relax.Var) -> relax.Expr:
        """The original value, computed from its twin."""
        raise NotImplementedError

    def twin_bound(self, var: relax.Var, value: relax.Expr) -> None:
        """Called once a twin of ``var`` (bound to ``value``) is recorded."""

    def twin_of(self, expr: relax.Expr) -> relax.Var | None:
        return self.twin.get(expr) if isinstance(expr, relax.Var) else None

    def _materialized(self, var: relax.Var) -> relax.Var:
        original = self.materialize(var, self.twin.pop(var))
        self.set_var_remap(var, original)
        return original

    def visit_dataflow_var_(self, var: relax.DataflowVar) -> relax.Expr:
        if var in self.twin:
            return self._materialized(var)
        return super().visit_dataflow_var_(var)

    def visit_var_(self, var: relax.Var) -> relax.Expr:
        if var in self.twin:
            return self._materialized(var)
        return super().visit_var_(var)

    def visit_var_binding_(self, binding: relax.VarBinding) -> None:
        # Values leaving the dataflow block keep their form: only dataflow vars get twins.
        if isinstance(binding.var, relax.DataflowVar):
            result = self.convert(binding.value)
            if result is not None:
                kind, new = result
                if kind == "twin":
                    self.twin[binding.var] = new
                    self.twin_bound(binding.var, binding.value)
                else:
                    self.set_var_remap(binding.var, new)
                self.converted += 1
                return
        super().visit_var_binding_(binding)


def rewrite_functions(mod: tvm.IRModule, rewriter: Callable[[tvm.IRModule], relax.PyExprMutator]) -> tvm.IRModule:
    """``mod`` with every Relax function rewritten by a fresh ``rewriter(mod)``."""
    result = mod.clone()
    for gvar, func in mod.functions.items():
        if isinstance(func, relax.Function):
            result.update_func(gvar, rewriter(mod).visit_expr(func))
    return result
