"""cpu_tiled: the tiled default places each loop of MetaSchedule's sketch by the block's
iterator types (spatial or reduction, and which spatial axis), not by the order in which the
sketch samples its tiles; a sketch it cannot place is declined with a warning."""

from __future__ import annotations

import logging

import pytest
import tvm
from tvm import te
from tvm.ir.utils import derived_object
from tvm.s_tir import meta_schedule as ms

from pipeline.compiler.schedules import cpu_tiled

ZNVER4 = tvm.target.Target({"kind": "llvm", "mcpu": "znver4", "num-cores": 2})
M = N = K = 64


def _matmul() -> tvm.tirx.PrimFunc:
    a = te.placeholder((M, K), name="a")
    w = te.placeholder((K, N), name="w")
    k = te.reduce_axis((0, K), name="k")
    out = te.compute((M, N), lambda i, j: te.sum(a[i, k] * w[k, j], axis=k), name="matmul")
    return te.create_prim_func([a, w, out]).with_attr("global_symbol", "main")


def _sketch(splits: tuple[tuple[int, int], ...]):
    """A stand-in for MetaSchedule's sketch that samples the tiles of the matmul's loops
    (0: i, 1: j, 2: k) in the order and counts of ``splits``: an upstream sketch that
    changed its order or its tiling structure."""

    @derived_object
    class _Tiling(ms.schedule_rule.PyScheduleRule):
        def _initialize_with_tune_context(self, context) -> None:
            pass

        def apply(self, sch, block):
            if sch.get(block).name_hint != "matmul":
                return [sch]
            loops = sch.get_loops(block)
            for axis, parts in splits:
                sch.split(loops[axis], sch.sample_perfect_tile(loops[axis], n=parts, max_innermost_factor=64))
            return [sch]

        def clone(self):
            return _Tiling()

    return lambda: ms.space_generator.PostOrderApply(sch_rules=[_Tiling()], postprocs=[], mutator_probs={})


def _tiles(sch) -> list[list[int]]:
    """The tile decisions of the schedule's trace, in the order the sketch sampled them."""
    trace = sch.trace
    return [[int(v) for v in trace.decisions[inst]] for inst in trace.insts if inst.kind.name == "SamplePerfectTile"]


def test_loops_are_placed_by_iterator_type_not_by_sampling_order(monkeypatch):
    block = cpu_tiled.register_block(ZNVER4)
    columns = block.columns(N)
    rows = block.rows(M, columns)
    assert columns != rows  # else the test could not tell the roles apart
    # MetaSchedule's order (i, j, k) and a reversed one (j, i, k): the same tiles per loop.
    expected = {0: [M // rows, 1, 1, rows], 1: [N // columns, 1, 1, columns], 2: [K // block.inner_reduction(K),
                                                                                 block.inner_reduction(K)]}
    for order in (((0, 4), (1, 4), (2, 2)), ((1, 4), (0, 4), (2, 2))):
        monkeypatch.setattr(cpu_tiled, "_default_space_generator", _sketch(order))
        sch = cpu_tiled.tiled_default(_matmul(), ZNVER4)
        assert sch is not None
        assert _tiles(sch) == [expected[axis] for axis, _ in order], order


def test_a_sketch_it_cannot_place_is_declined_with_a_warning(monkeypatch, caplog):
    # A spatial loop split in 2, as the tiled default splits only reduction loops.
    monkeypatch.setattr(cpu_tiled, "_default_space_generator", _sketch(((0, 4), (1, 2), (2, 2))))
    with caplog.at_level(logging.WARNING, logger=cpu_tiled.__name__):
        assert cpu_tiled.tiled_default(_matmul(), ZNVER4) is None
    assert "sketch is not the one this default was written for" in caplog.text
    assert "split in 2" in caplog.text


@pytest.mark.parametrize("mcpu", ["znver4", "haswell"])
def test_the_sketch_of_today_gives_the_tiled_default(mcpu):
    """MetaSchedule's own sketch still places: a dense contraction gets its tiled default."""
    target = tvm.target.Target({"kind": "llvm", "mcpu": mcpu, "num-cores": 2})
    sch = cpu_tiled.tiled_default(_matmul(), target)
    assert sch is not None
    block = cpu_tiled.register_block(target)
    columns = block.columns(N)
    assert [M // block.rows(M, columns), 1, 1, block.rows(M, columns)] in _tiles(sch)
    assert [N // columns, 1, 1, columns] in _tiles(sch)
