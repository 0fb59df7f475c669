"""TVM's CUDA source made into a C++ program for this CPU (cuda_on_cpu.h defines the device
language): the constructs a header cannot define are rewritten here, and a table of the
kernels and a main() are appended.

Rewritten: the inline-PTX helpers TVM emits (cp.async copies, commits and waits) become calls
into the emulator, and ``__shared__`` arrays become pointers into the block's shared memory
(a function-local array would be one per thread). Anything else written in PTX is refused
with its name, so that a new construct fails loudly instead of running wrong.
"""

from __future__ import annotations

import re
from dataclasses import dataclass


class UnsupportedCuda(ValueError):
    """The source uses a construct the emulator does not have."""


@dataclass(frozen=True)
class KernelSignature:
    name: str
    parameters: tuple[tuple[str, str], ...]  # (C type, name), in order


_HELPER = re.compile(r"^__forceinline__ __device__ void (\w+)\((.*)\) \{$")
_CP_ASYNC = re.compile(r"ptx_cp_async_legacy(_pred)?_c[ag]_(\d+)_(\d+)_(\d+)")
_WAIT_GROUP = re.compile(r"tvm_builtin_ptx_cp_async_wait_group\w*_(\d+)")
_DYNAMIC_SHARED = re.compile(r"extern __shared__ (?:__align__\(\d+\) )?(\w+) (\w+)\[\];")
_STATIC_SHARED = re.compile(r"__shared__ (?:alignas\(\d+\) |__align__\(\d+\) )?([\w:]+) (\w+)\[(\d+)\];")
_KERNEL = re.compile(r'^extern "C" __global__ void (?:__launch_bounds__\(\d+\) )?(\w+)\((.*)\) \{$', re.M)
_PARAMETER = re.compile(r"^(.*?)\s*(?:__restrict__\s+)?(\w+)$")


def _emulated_helper(name: str, parameters: str) -> str:
    if match := _WAIT_GROUP.fullmatch(name):
        return f"emu::cp_async_wait({match.group(1)});"
    if name.startswith("tvm_builtin_ptx_cp_async_commit_group"):
        return "emu::cp_async_commit();"
    if match := _CP_ASYNC.fullmatch(name):
        predicated, size, dst_bytes, src_bytes = match.group(1), *map(int, match.groups()[1:])
        copy = (f"emu::cp_async((uint8_t*)dst + dst_off * {dst_bytes}, "
                f"(uint8_t*)src + src_off * {src_bytes}, {size});")
        if predicated:
            # The PTX stores zeros at once where the predicate is false (st.shared, not async).
            return f"if (predicate == 1) {{ {copy} }} else {{ std::memset((uint8_t*)dst + dst_off * {dst_bytes}, 0, {size}); }}"
        return copy
    raise UnsupportedCuda(f"inline PTX helper '{name}({parameters})' has no emulation")


def _rewrite_helpers(lines: list[str]) -> list[str]:
    """Replace the body of each helper that holds inline PTX (TVM closes them with a "}" line)."""
    out: list[str] = []
    index = 0
    while index < len(lines):
        match = _HELPER.match(lines[index])
        if not match:
            out.append(lines[index])
            index += 1
            continue
        end = lines.index("}", index)
        body = lines[index + 1:end]
        if any("asm" in line for line in body):
            out += [lines[index], "  " + _emulated_helper(*match.groups()), "}"]
        else:
            out += lines[index:end + 1]
        index = end + 1
    return out


def kernel_signatures(source: str) -> list[KernelSignature]:
    """The kernels defined in ``source``, with their parameters in order."""
    kernels = []
    for name, parameters in _KERNEL.findall(source):
        parsed = []
        for parameter in filter(None, (p.strip() for p in parameters.split(","))):
            match = _PARAMETER.match(parameter)
            if match is None:
                raise UnsupportedCuda(f"kernel {name}: cannot read parameter '{parameter}'")
            parsed.append((match.group(1).replace("__restrict__", "").strip(), match.group(2)))
        kernels.append(KernelSignature(name, tuple(parsed)))
    return kernels


def _launcher(kernel: KernelSignature) -> str:
    arguments = []
    for index, (ctype, _) in enumerate(kernel.parameters):
        if not ctype.endswith("*"):
            raise UnsupportedCuda(f"kernel {kernel.name}: scalar parameter of type {ctype} is not emulated")
        arguments.append(f"({ctype})args[{index}]")
    return f"static void emu_{kernel.name}(void** args) {{ {kernel.name}({', '.join(arguments)}); }}"


def emulation_source(cuda_source: str) -> str:
    """The C++ program (to compile with cuda_on_cpu.h force-included) of ``cuda_source``."""
    lines = _rewrite_helpers(cuda_source.splitlines())
    source = "\n".join(lines)
    source = _DYNAMIC_SHARED.sub(r"\1* \2 = (\1*)emu::dynamic_shared();", source)
    counter = iter(range(1 << 30))
    source = _STATIC_SHARED.sub(
        lambda m: f"{m.group(1)}* {m.group(2)} = ({m.group(1)}*)emu::static_shared({next(counter)}, "
                  f"sizeof({m.group(1)}) * {m.group(3)});",
        source,
    )
    leftover = [line.strip() for line in source.splitlines() if "__shared__" in line]
    if leftover:
        raise UnsupportedCuda(f"shared memory declared as '{leftover[0]}' is not emulated")
    kernels = kernel_signatures(source)
    if not kernels:
        raise UnsupportedCuda("no kernels in the source")
    table = ",\n  ".join(f'{{"{k.name}", emu_{k.name}, {len(k.parameters)}}}' for k in kernels)
    return "\n".join([
        source,
        "",
        "// --- appended by pipeline/verify/cuda_emulator/source.py",
        *(_launcher(kernel) for kernel in kernels),
        f"static const emu::Kernel emu_kernels[] = {{\n  {table}\n}};",
        "int main() { return emu::main(emu_kernels, sizeof(emu_kernels) / sizeof(emu_kernels[0])); }",
        "",
    ])
