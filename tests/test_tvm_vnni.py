"""AVX-512 VNNI int8 matmuls (pipeline/compiler/vnni.py and its use in pipeline/compiler/int8.py):
which targets get them, the weight layout, and that the compiled kernels use vpdpbusd and
give exactly the integers of a NumPy reference and of the generic int8 path."""

import dataclasses
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import tvm

from test_quantize import SIZE
from test_tvm_int8 import quantized

from pipeline.runtime.runners import load_artifact
from targets import get_target

ZNVER4 = {"kind": "llvm", "mcpu": "znver4", "num-cores": 2}


@pytest.fixture(scope="module")
def qdq_requantized(tmp_path_factory) -> Path:
    """The micro ConvNeXt as ONNX Runtime quantizes it, every layer requantized to int8."""
    return quantized(tmp_path_factory.mktemp("requant"), float_outputs=False)


def _host_has_vnni() -> bool:
    import tvm

    from pipeline.compiler.vnni import has_vnni

    return has_vnni(tvm.target.Target({"kind": "llvm", "mcpu": tvm.target.codegen.llvm_get_system_cpu()}))


@pytest.mark.parametrize("tvm_target, expected", [
    (ZNVER4, True),
    ({"kind": "llvm", "mcpu": "icelake-server"}, True),
    ({"kind": "llvm", "mcpu": "cascadelake"}, True),
    ({"kind": "llvm", "mcpu": "sapphirerapids"}, True),
    ({"kind": "llvm", "mcpu": "skylake-avx512"}, False),  # AVX-512 without VNNI
    ({"kind": "llvm", "mcpu": "skylake-avx512", "mattr": ["+avx512vnni"]}, True),
    ({"kind": "llvm", "mcpu": "znver3"}, False),
])
def test_vnni_is_decided_by_the_targets_cpu(tvm_target, expected):
    import tvm

    from pipeline.compiler.vnni import has_vnni

    assert has_vnni(tvm.target.Target(tvm_target)) is expected


def test_arm_and_gpu_targets_keep_the_generic_int8_path():
    import tvm

    from pipeline.compiler.vnni import has_vnni
    from targets import get_target, known_targets

    for target in map(get_target, known_targets()):
        if target.device == "cuda" or target.host_triple.startswith("aarch64"):
            assert not has_vnni(tvm.target.Target(target.tvm_target)), target.name


def test_packed_weight_puts_4_k_of_16_columns_in_one_register():
    from pipeline.compiler.vnni import fits, pack_weight

    wq = np.random.default_rng(0).integers(-128, 128, (8, 32), dtype=np.int8)
    packed = pack_weight(wq)
    assert packed.shape == (2, 2, 16, 4)
    for j, g, lane, i in np.ndindex(packed.shape):
        assert packed[j, g, lane, i] == wq[4 * g + i, 16 * j + lane]
    assert not fits(6, 32) and not fits(8, 10)


def _requantizing_matmul(m: int, k: int, n: int, wq: np.ndarray, offset: np.ndarray, scale: float):
    """x int8 -> +128 -> VNNI matmul -> + offset -> float -> * scale -> round/clip -> int8,
    as pipeline/compiler/int8.py emits it."""
    from tvm import relax

    from pipeline.compiler.vnni import matmul_primfunc, pack_weight

    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((m, k), "int8"))
    with bb.function("main", [x]):
        with bb.dataflow():
            shifted = relax.op.add(relax.op.astype(x, "int32"), relax.const(128, "int32"))
            xu8 = bb.emit(relax.op.astype(shifted, "uint8"))
            kernel = bb.add_func(matmul_primfunc(m, k, n), "vnni_matmul")
            packed = relax.const(pack_weight(wq))
            acc = bb.emit(relax.call_tir(kernel, [xu8, packed], relax.TensorType((m, n), "int32")))
            acc = bb.emit(relax.op.add(acc, relax.const(offset.astype(np.int32))))
            real = bb.emit(relax.op.multiply(relax.op.astype(acc, "float32"), relax.const(np.float32(scale))))
            clipped = relax.op.clip(relax.op.round(real), relax.prim_value(-128.0), relax.prim_value(127.0))
            out = bb.emit_output(relax.op.astype(clipped, "int8"))
        bb.emit_func_output(out)
    return bb.get()


def test_vnni_kernel_with_its_epilogue_is_exact_and_uses_vpdpbusd():
    import tvm

    from pipeline.compiler import phases
    from pipeline.compiler.schedules import apply as schedule_apply

    m, k, n = 56, 96, 128  # 56 rows: a register tile of 8 rows, not a power of two
    rng = np.random.default_rng(1)
    wq = rng.integers(-128, 128, (k, n), dtype=np.int8)
    offset = rng.integers(-5000, 5000, n)
    scale = 1.0 / 512
    mod = _requantizing_matmul(m, k, n, wq, offset, scale)
    tvm_target = tvm.target.Target(ZNVER4)
    target = dataclasses.replace(get_target("x86"), name="znver4", tvm_target=ZNVER4)
    with tvm_target:
        for _, passes in phases.phases_before(phases.relax_phases(target), "schedule"):
            if passes:
                mod = tvm.transform.Sequential(passes)(mod)
        fused = [str(gv.name_hint) for gv in mod.functions if "vnni_matmul" in str(gv.name_hint)]
        # The requantize epilogue is fused into the kernel, which gets the VNNI schedule.
        assert len(fused) == 1 and "round" in fused[0] and "clip" in fused[0], fused
        mod, counts = schedule_apply.apply_default_schedules(mod, tvm_target)
        assert counts["vnni"] == 1
    executable = tvm.compile(mod, target=tvm_target)
    asm = "".join(lib.inspect_source("asm") for lib in executable.mod.imports if lib.kind == "llvm")
    assert "vpdpbusd" in asm
    if not _host_has_vnni():
        return  # the assembly is checked; running it needs the instruction
    from tvm import relax

    x = rng.integers(-128, 128, (m, k), dtype=np.int8)
    vm = relax.VirtualMachine(executable, tvm.cpu())
    got = vm["main"](tvm.runtime.tensor(x, tvm.cpu())).numpy()
    acc = (x.astype(np.int64) + 128) @ wq.astype(np.int64) + offset
    expected = np.clip(np.round(acc.astype(np.float32) * np.float32(scale)), -128, 127).astype(np.int8)
    np.testing.assert_array_equal(got, expected)


def _objdump_has(library: Path, mnemonic: str) -> bool:
    # binutils comes with the C compiler that links every artifact.
    disassembly = subprocess.run(
        [shutil.which("objdump"), "-d", str(library)], capture_output=True, text=True, check=True,
    )
    return mnemonic in disassembly.stdout


@pytest.mark.slow  # two TVM builds of the micro model
def test_tiny_convnext_int8_with_vnni_equals_the_generic_int8_path(qdq_requantized, tmp_path, monkeypatch):
    import dataclasses

    from pipeline.compiler import backend
    from pipeline.compiler import vnni
    from targets import get_target

    # Built for this CPU where it has VNNI (and run), else for Zen 4 (built and read only):
    # a Zen 4 build may use any Zen 4 instruction, e.g. AVX-512 BF16, which a VNNI CPU
    # such as Rocket Lake lacks (SIGILL).
    host = {"kind": "llvm", "mcpu": tvm.target.codegen.llvm_get_system_cpu(), "num-cores": 2}
    target = dataclasses.replace(get_target("x86"), tvm_target=host if _host_has_vnni() else ZNVER4)
    info = backend.compile_onnx(qdq_requantized, target, tmp_path / "vnni.so", precision="int8")
    # Every matmul but the classifier head (10 classes: no multiple of 16) takes VNNI, and
    # so do the stem and the 3 downsampling convolutions (kernel = stride: patch matmuls);
    # the depthwise 7x7 convolutions keep the generic kernel.
    assert info["int8"]["integer_ops"] == {"conv2d": 9, "matmul": 11}
    assert info["int8"]["vnni_ops"] == {"conv2d": 4, "matmul": 10}
    assert info["tuning"]["default_vnni"] >= 1
    assert _objdump_has(tmp_path / "vnni.so", "vpdpbusd")

    # The same target with the VNNI kernel turned off: the generic integer kernels.
    monkeypatch.setattr(vnni, "has_vnni", lambda _target: False)
    generic = backend.compile_onnx(qdq_requantized, target, tmp_path / "generic.so", precision="int8")
    assert generic["int8"]["integer_ops"] == {"conv2d": 9, "matmul": 11} and not generic["int8"]["vnni_ops"]
    assert not _objdump_has(tmp_path / "generic.so", "vpdpbusd")
    if not _host_has_vnni():
        return  # both builds and their instructions are checked; running them needs VNNI
    x = np.random.default_rng(0).standard_normal((1, 3, SIZE, SIZE)).astype(np.float32)
    with_vnni = load_artifact(tmp_path / "vnni.so").infer(x)
    without = load_artifact(tmp_path / "generic.so").infer(x)
    # Same integers into the same float epilogues: the same logits, bit for bit.
    np.testing.assert_array_equal(with_vnni, without)
