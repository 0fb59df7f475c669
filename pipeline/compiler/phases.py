"""The compile pipeline written out: the Relax passes from an imported ONNX graph to code the
VM runs, phase by phase, with a comment per phase; scheduling is one of the phases."""

from __future__ import annotations

from pathlib import Path

import tvm
from tvm import relax

from pipeline import precisions
from pipeline.compiler import (cast_fusion, graph_rewrites, int8, layout, nhwc_gemms, pass_results, prepack, split_k,
                               vnni, weight_params)
from pipeline.compiler.schedules import apply as schedule_apply
from pipeline.compiler.schedules import gpu as gpu_schedules
from targets import Target

# (phase name, its passes in order)
Phase = tuple[str, list[tvm.transform.Pass]]


def schedule_pass(target: Target, tuning_database: Path | None) -> tvm.transform.Pass:
    """Every kernel gets a schedule: its tuning record where ``tuning_database`` has one,
    else its device kind's default: on CPU the defaults of schedules/cpu.py, then the
    weights packed in the order the tiles read them (prepack.py); on GPU dlight's rules
    (schedules/gpu.py). The module it returns carries its result "schedule"
    (pass_results.py): the counts compile reports and, for GPU targets, each kernel's rule,
    grid and block ("gpu_kernels"). Runs inside ``with tvm_target``, as compile runs every phase."""

    @tvm.transform.module_pass(opt_level=0, name="Schedule")
    def _pass(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        tvm_target = tvm.target.Target.current(allow_none=False)
        mod, report = schedule_apply.schedule_module(mod, tvm_target, target, tuning_database)
        if target.device == "cuda":
            mod, report["gpu_kernels"] = gpu_schedules.schedule_module(mod, tvm_target, target.sm_count)
        else:
            mod = tvm.transform.Sequential(prepack.pack_weights(), name="pack_weights")(mod)
        return pass_results.with_result(mod, "schedule", report)

    return _pass


def relax_phases(target: Target, tuning_database: Path | None = None, gpu_split_k: bool = True) -> list[Phase]:
    """The Relax passes from an imported graph to VM-ready code, in order, per phase.

    This follows TVM's own per-target pipeline (relax/backend/cpu_generic/pipeline.py)
    rather than relax.build's "default", because on CPU that default skips fusion
    (TVM 0.27: vm_build.py keeps the unfused pipeline for CPU because fusion can drop
    side-effecting call_pure_packed calls; ONNX vision graphs have none). The schedule
    phase applies ``tuning_database``'s records (schedule_pass). On GPU,
    ``gpu_split_k=False`` leaves every GEMM unsplit (to compare with; split_k.py).
    """
    transform = relax.transform
    is_gpu = target.device == "cuda"
    return [
        # Simplify: split composite ops (batch_norm, attention) into basic ones, drop
        # trivial bindings so that legalization sees plain ops; x ** 2 (channels-first
        # LayerNorm) becomes x * x, exact for negative x where a fast pow is NaN
        # (pipeline/compiler/graph_rewrites.py).
        ("simplify", [
            transform.DecomposeOpsForInference(),
            transform.CanonicalizeBindings(),
            graph_rewrites.integer_power_to_multiply(),
        ]),
        # Channels last: NCHW convolutions compute in NHWC so that the transposes around
        # ConvNeXt's LayerNorms cancel and channel reductions read contiguous memory
        # (pipeline/compiler/layout.py); on GPU too, where the depthwise kernel then loads
        # channel vectors and each LayerNorm is one row reduction. On GPU the pointwise
        # GEMMs also stay on the NHWC maps (no flatten/unflatten around them), so that their
        # casts, layer scale and residual add fuse into neighbouring kernels
        # (pipeline/compiler/nhwc_gemms.py); CPU records are keyed by the flattened GEMMs.
        # Weights passed in (--params separate) are saved in the layout the kernels read,
        # instead of being permuted and reshaped on every call (weight_params.py; GPU).
        # LayerNorms exported in parts (channels-first, now over the last axis) become one
        # op (graph_rewrites.py; GPU).
        ("channels_last", [layout.channels_last_pass(), *([
            nhwc_gemms.gemms_on_maps_pass(), graph_rewrites.layer_norm_from_parts_pass(),
            weight_params.lift_weight_layouts_pass()] if is_gpu else [])]),
        # Library dispatch: route sampling/sort ops to hand-written kernels (a no-op for
        # CNNs, kept so that the list matches TVM's own CPU pipeline).
        ("dispatch", [relax.backend.DispatchSampling(), relax.backend.DispatchSortScan()]),
        # Fast math: erf (GELU), exp and tanh become polynomial approximations that LLVM
        # vectorizes (float32 error ~1e-7 relative, ~2e-6 on ConvNeXt-T logits). The libm
        # erf is a scalar call per element and took more time than the 1x1-conv GEMMs it
        # is fused into (ConvNeXt-atto, znver4: 34 ms -> 24 ms per image untuned).
        # On GPU, division by a constant is a multiplication by its reciprocal
        # (graph_rewrites.py: GELU's x / sqrt(2) was 22 IEEE divisions per element).
        ("fast_math", [transform.FastMathTransform(),
                       *([graph_rewrites.divide_by_constant_to_multiply_pass()] if is_gpu else [])]),
        # Split-K (GPU): GEMMs of few rows and deep K become partial GEMMs over slices of K
        # plus a sum that takes the epilogue, where the schedule's model says the long
        # serial K loops of a small grid cost more than the extra kernel (split_k.py).
        ("split_k", [split_k.split_k_pass(target)] if is_gpu and gpu_split_k else []),
        # Legalize: every Relax op becomes a call_tir to a TE-generated PrimFunc; constant
        # subgraphs (weight transposes of embedded params) are evaluated now.
        ("legalize", [
            transform.LegalizeOps(),
            transform.AnnotateTIROpPattern(),
            transform.FoldConstant(),
        ]),
        # Fuse: group elementwise/injective ops into their producers and merge each group
        # into one PrimFunc: the kernels (and MetaSchedule's tuning tasks). On GPU the cast
        # of a depthwise convolution's input joins the convolution (cast_fusion.py: FuseOps
        # leaves it a kernel of its own), and a split GEMM's partial sum joins its epilogue
        # (split_k.py). Weights marked layout free (CPU): a tuned kernel
        # may read them packed in its tiles' order, packed once after scheduling
        # (pipeline/compiler/prepack.py).
        ("fuse", [transform.FuseOps(),
                  *([cast_fusion.fuse_casts_into_depthwise_pass(), split_k.fuse_partial_sums_pass()] if is_gpu else []),
                  transform.FuseTIR(), *([] if is_gpu else [prepack.mark_weights()])]),
        # Schedule: every kernel gets its tuning record, else its device kind's default
        # (schedule_pass).
        ("schedule", [schedule_pass(target, tuning_database)]),
        # Dataflow lowering: leave the pure dataflow world; call_tir becomes explicit
        # output allocation plus a call.
        ("lower_dataflow", [
            transform.RewriteDataflowReshape(),
            transform.ToNonDataflow(),
            transform.RemovePurityChecking(),
            transform.CallTIRRewrite(),
        ]),
        # VM finalization: plan and reuse memory statically, free after last use, lower
        # builtins and shape computations to VM instructions, name the entry points. On
        # GPU, the kernels between the input's first and the output's last one are captured
        # as one CUDA graph on the first call and replayed after (pass_config turns it on):
        # a batch-1 ConvNeXt is otherwise bound by ~130-200 kernel launches.
        ("finalize", [
            transform.StaticPlanBlockMemory(),
            *([transform.RewriteCUDAGraph()] if is_gpu else []),
            transform.LowerAllocTensor(),
            transform.KillAfterLastUse(),
            transform.LowerRuntimeBuiltin(),
            transform.ComputePrimValue(),
            transform.VMShapeLower(),
            transform.AttachGlobalSymbol(),
        ]),
    ]


def pass_config(target: Target) -> dict:
    """The PassContext settings compile runs the phases and TIR's lowering under: on GPU,
    CUDA graph capture (RewriteCUDAGraph does nothing without it) and asynchronous
    global-to-shared copies (cp.async, sm_80+) where a schedule pipelines its loads."""
    if target.device != "cuda":
        return {}
    return {"relax.backend.use_cuda_graph": True, "tirx.use_async_copy": True}


def phases_before(phases: list[Phase], name: str) -> list[Phase]:
    """The phases that run before phase ``name`` (the tuner stops before "schedule")."""
    names = [phase for phase, _ in phases]
    if name not in names:
        raise ValueError(f"no phase '{name}' in {names}")
    return phases[:names.index(name)]


def _int8_phase(target: Target) -> list[tvm.transform.Pass]:
    """int8: the QDQ model's convolutions and matmuls lowered to integers (int8.py), first,
    once the weights are bound, which it needs; on x86 CPUs with AVX-512 VNNI, the matmuls
    that fit it on that instruction."""
    return [int8.int8_lowering_pass(vnni.has_vnni(tvm.target.Target(target.tvm_target)))]


def _fp16_phase(target: Target) -> list[tvm.transform.Pass]:
    """FP16: convolutions and matmuls take float16 operands and accumulate in float32
    (ToMixedPrecision's out_dtype), the rest of the graph follows the float16 values where
    it is numerically safe; the model's input and output stay float32. Weights passed in at
    run time (params_mode="separate") become float16 parameters, cast once when they are saved."""
    return [relax.transform.ToMixedPrecision(out_dtype="float32"), weight_params.cast_weight_params_once()]


# The compiler phases pipeline/precisions.py's records name (Precision.phases), by key: the
# passes each runs for a target.
PRECISION_PHASES = {"int8": _int8_phase, "fp16": _fp16_phase}


def precision_phases(precision: str, target: Target) -> list[Phase]:
    """The phases ``precision`` runs before compile's Relax phases (its record's ``phases``,
    pipeline/precisions.py), for ``target``."""
    return [(key, PRECISION_PHASES[key](target)) for key in precisions.get(precision).phases]
