"""The GPU check in one folder: CUDA artifacts, the TVM runtime and the check, for a machine
that has a GPU and PyTorch but no TVM, no network and room for at most 64 MiB.

    make gpu-bundle                     # ConvNeXt-T and the demo model, cuda-sm90 -> dist/gpu-bundle/
    .venv/bin/python benchmarks/gpu_bundle.py --variant micro --input-size 32 --configs fp32:1,fp16:1

On the GPU machine: ``bash dist/gpu-bundle/run.sh`` (installs the bundled runtime once, then
runs gpu_check.py; see the README.md it writes). What the folder holds:

    gpu_check.py, gpu_check_report.py, run.sh, README.md, manifest.json
    lib/pipeline/             model.py, seeded_weights.py, runtime/runtime_only.py, compare.py,
                              latency_stats.py, errors.py: what the check imports, nothing else
    runtime/tvm-runtime.tar.xz    the installed apache-tvm package without its compiler
                              (lib/libtvm_compiler.so, 3rdparty/, include/, src/): 2-3 MB
    runtime/apache_tvm_ffi-*-cp312-*.whl   the FFI wheel for the GPU machine's Python
    artifacts.tar.xz          one folder per configuration: model.so, model.so.json, model.cu
                              and the weights (model.params.npz); with --demo-args also
                              demo-<config>/ and demo/: the demo's checkpoint and its labeled
                              test images (raw uint8, with a few preprocessed ones)

Every configuration is compiled through the pipeline's own stages (build -> export ->
simplify -> [quantize] -> compile), as `pipeline compile` does, from weights made from a
seed on a coarse grid (pipeline/seeded_weights.py): they compress 8-10x, and the check
rebuilds the same weights into PyTorch from the seed. Float artifacts take their weights
separately (params_mode "separate") and the weights are stored once: a configuration whose
weights equal another's up to a cast (fp32 vs fp16: the grid is exact in both) is derived
from it on the GPU machine, and the check verifies the derived arrays against a digest.

The demo model (--demo-args, the Makefile's MODEL_ARGS) is compiled from its trained
checkpoint instead, which travels as it is and is checked by its sha256, with its whole
labeled test set, so that the check measures the demo's top-1 on the GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from importlib import metadata
from pathlib import Path
from typing import NamedTuple

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from gpu_check import params_digest, preprocess  # noqa: E402  (the check verifies what this takes)
from gpu_check_report import DEMO  # noqa: E402

from pipeline.runtime.cross import cache_root  # noqa: E402
from pipeline.runtime.runtime_only import file_sha256  # noqa: E402  (as the check takes it)

MIB = 1024 * 1024
# What the check imports from the pipeline: NumPy, torch and the TVM runtime only.
BUNDLED_MODULES = (
    "errors.py", "model.py", "seeded_weights.py", "runtime/runtime_only.py", "compare.py", "latency_stats.py",
    "kernel_profile.py",
)
# The check and its report writer, beside each other at the bundle's top.
CHECK_SCRIPTS = ("gpu_check.py", "gpu_check_report.py")
# The options of the demo model (--demo-args: the Makefile's MODEL_ARGS) the bundle reads.
DEMO_OPTIONS = ("variant", "weights", "num_classes", "in_chans", "input_size", "data", "preprocessing")
# Preprocessed images carried beside the raw ones, for the check to hold its preprocessing to.
PREPROCESSED_SAMPLE = 64
# Parts of the apache-tvm wheel a machine that only runs artifacts does not need.
COMPILER_PARTS = ("lib/libtvm_compiler.so", "3rdparty", "include", "src")
# The GPU machine's Python (the tvm-ffi wheel has compiled code per Python version).
GPU_PYTHON = "3.12"
FFI_PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_24_x86_64", "manylinux_2_17_x86_64")


def log(message: str) -> None:
    print(f"[gpu_bundle] {message}", file=sys.stderr, flush=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variant", default="tiny", help="ConvNeXt variant (pipeline variants)")
    parser.add_argument("--input-size", type=int, default=224)
    parser.add_argument("--num-classes", type=int, default=1000)
    parser.add_argument("--target", default="cuda-sm90",
                        help="a CUDA target (pipeline targets); x86 makes a bundle to try the check on a CPU")
    # No int8: GPU targets do not offer it (targets.GPU_INT8_REASON); int8:1 is for --target x86.
    parser.add_argument("--configs", default=DEFAULT_CONFIGS,
                        help="comma-separated precision:batch pairs to compile; precision:batch:no-split-k "
                             "compiles one without split-K GEMMs too, to compare in the same run")
    parser.add_argument("--gemm-sweep", action=argparse.BooleanOptionalAction, default=True,
                        help="add the GEMM sweep (benchmarks/gemm_sweep.py: every fp16 GEMM in every tile and "
                             "split, timed by the check); CUDA targets only")
    parser.add_argument("--demo-args", default="",
                        help="the demo model as `pipeline compile` takes it (the Makefile passes its MODEL_ARGS): its "
                             "checkpoint, artifacts (--demo-configs) and labeled test images go into the bundle too, "
                             "for the demo's rows (default: none)")
    parser.add_argument("--demo-configs",
                        help="precision:batch pairs of the demo model (default: fp32:1 and fp16:1, those the target offers)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the weights and of the check's inputs")
    parser.add_argument("--calib-data", default="fashion-mnist",
                        help="INT8 calibration images (any source `pipeline quantize --data` takes)")
    parser.add_argument("--calib-size", type=int, default=32)
    parser.add_argument("--output", type=Path, default=REPO / "dist" / "gpu-bundle")
    parser.add_argument("--max-mib", type=float, default=60.0, help="refuse a bundle larger than this")
    parser.add_argument("--ffi-wheel", type=Path, help=f"the apache-tvm-ffi wheel for Python {GPU_PYTHON} "
                        "(default: downloaded once with pip into the cache)")
    parser.add_argument("--artifacts", type=Path, default=REPO / "artifacts")
    return parser.parse_args(argv)


NO_SPLIT_K = "no-split-k"
# Each GPU configuration at batch 1 and 8 with and without split-K GEMMs
# (pipeline/compiler/split_k.py), so that one GPU run says what split-K is worth.
DEFAULT_CONFIGS = f"fp32:1,fp16:1,fp16:8,fp16:1:{NO_SPLIT_K},fp16:8:{NO_SPLIT_K}"


class BundleConfig(NamedTuple):
    """One artifact of the bundle: precision, batch, and whether GPU GEMMs may be split over K."""

    precision: str
    batch: int
    split_k: bool = True

    @property
    def name(self) -> str:
        return f"{self.precision}-b{self.batch}" + ("" if self.split_k else f"-{NO_SPLIT_K}")


def parse_configs(text: str, target) -> list[BundleConfig]:
    """'fp32:1,fp16:8,fp16:8:no-split-k' -> [("fp32", 1), ("fp16", 8), ("fp16", 8, False)]
    (BundleConfig), checked against the target."""
    from pipeline.errors import PipelineError

    configs = []
    for item in text.split(","):
        parts = item.strip().split(":")
        precision, batch, variant = parts[0], (parts[1] if len(parts) > 1 else ""), parts[2:]
        if not batch.isdigit() or int(batch) < 1 or variant not in ([], [NO_SPLIT_K]):
            raise PipelineError(f"--configs item '{item}' is not precision:batch[:{NO_SPLIT_K}], e.g. fp16:8")
        if precision not in target.precisions:
            note = target.precision_note(precision)
            raise PipelineError(
                f"target '{target.name}' does not offer precision '{precision}'; it offers "
                f"{', '.join(target.precisions)}" + (f": {note}" if note else "")
            )
        if variant and target.device != "cuda":
            raise PipelineError(f"--configs item '{item}': {NO_SPLIT_K} is for GPU targets; drop it for '{target.name}'")
        configs.append(BundleConfig(precision, int(batch), not variant))
    if len(set(configs)) != len(configs):
        raise PipelineError(f"--configs '{text}' names a configuration twice")
    return configs


# ---------------------------------------------------------------------------
# The pieces


def seeded_checkpoint(variant: str, num_classes: int, seed: int, directory: Path) -> Path:
    """A checkpoint in the official layout with pipeline/seeded_weights.py's values."""
    import torch

    from pipeline.model import create_model
    from pipeline.seeded_weights import seeded_state

    path = directory / f"seeded-{variant}-c{num_classes}-s{seed}.pth"
    if path.is_file():
        return path
    model = create_model(variant, num_classes=num_classes)
    state = seeded_state(((k, tuple(v.shape)) for k, v in model.state_dict().items()), seed)
    directory.mkdir(parents=True, exist_ok=True)
    temp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    torch.save({"model": {k: torch.from_numpy(v) for k, v in state.items()}}, temp)
    os.replace(temp, path)
    return path


class Compiled(NamedTuple):
    """One configuration compiled: the compile stage's output folder (model.so and what
    travels with it), compile's record of each GPU kernel (rule, grid, roofline bound;
    empty on CPU) and the ONNX model it compiled."""

    folder: Path
    kernels: list
    onnx: Path


def compile_configs(args: argparse.Namespace, target, configs, weights: Path, model: dict | None = None,
                    prefix: str = "") -> dict[str, Compiled]:
    """Config name (after ``prefix``) -> what compiling it gave (Compiled); ``model`` holds the
    settings of a model other than --variant's (the demo's: variant, classes, channels...)."""
    from pipeline import precisions
    from pipeline.config import PipelineConfig
    from pipeline.engine import run_pipeline
    from pipeline.stages import STAGES

    base = PipelineConfig(
        variant=args.variant, weights=weights, num_classes=args.num_classes, seed=args.seed,
        input_size=args.input_size, data=args.calib_data, calib_size=args.calib_size,
        calib_method="percentile", artifacts=args.artifacts,
    ).replace(**(model or {}))
    folders = {}
    for index, bundled in enumerate(configs, start=1):
        log(f"compile {index}/{len(configs)}: {base.variant} {bundled.name} for {target.name}")
        plan = precisions.get(bundled.precision)
        # Weights stored apart where the precision allows it (INT8 folds them into integer
        # constants at import, so it keeps them embedded).
        config = base.replace(precision=bundled.precision, batch_size=bundled.batch, gpu_split_k=bundled.split_k,
                              params_mode="separate" if "separate" in plan.params_modes else "embedded")
        results = run_pipeline(STAGES, config, target, "compile", {"weights": weights})
        compiled = results["compile"]
        onnx = results[plan.model_stage].outputs[plan.model_output]
        folders[prefix + bundled.name] = Compiled(Path(compiled.outputs["library"]).parent,
                                         compiled.manifest.get("info", {}).get("gpu_cost", {}).get("kernels", []),
                                         Path(onnx))
    return folders


# ---------------------------------------------------------------------------
# The demo model


def parse_demo_args(text: str) -> dict:
    """--demo-args (the Makefile's MODEL_ARGS) -> the demo model's settings, by PipelineConfig name."""
    from calibration import fashion_mnist
    from calibration.datasets import check_source
    from pipeline.cli.options import option_help
    from pipeline.errors import PipelineError

    parser = argparse.ArgumentParser(prog="--demo-args", add_help=False, exit_on_error=False)
    for name in DEMO_OPTIONS:
        kind, default, _ = option_help(name)
        parser.add_argument("--" + name.replace("_", "-"), type=kind, default=default)
    try:
        values, unknown = parser.parse_known_args(shlex.split(text))
    except argparse.ArgumentError as exc:
        raise PipelineError(f"--demo-args: {exc}; give the model options as `pipeline compile` takes them") from None
    if unknown:
        raise PipelineError(f"--demo-args: '{unknown[0]}' is not one of the options the bundle reads "
                            f"({', '.join('--' + n.replace('_', '-') for n in DEMO_OPTIONS)})")
    weights = Path(values.weights)
    if values.weights.lower() == "none" or not weights.is_file():
        raise PipelineError(f"--demo-args: --weights {values.weights} is not a checkpoint file; the demo's rows are "
                            f"of its trained weights, e.g. --weights models/convnext-micro-fmnist.pth")
    if values.data is None or check_source(values.data) != "fashion-mnist":
        raise PipelineError(f"--demo-args: --data {values.data} is not Fashion-MNIST; the bundle carries that set's "
                            f"labeled test images only (--data fashion-mnist)")
    fashion_mnist.load_raw(values.data.partition(":")[2] or "test")  # missing or damaged: said before compiling
    return {**{name: getattr(values, name) for name in DEMO_OPTIONS}, "weights": weights}


def demo_checkpoint(demo: dict, into: Path) -> dict:
    """into/demo/<checkpoint>, copied as it is; the manifest's demo "model"."""
    import torch

    from pipeline.checkpoints import load_weights
    from pipeline.errors import PipelineError
    from pipeline.model import create_model
    from pipeline.stages.report import training_record

    weights = demo["weights"]
    net = create_model(demo["variant"], num_classes=demo["num_classes"], in_chans=demo["in_chans"]).eval()
    load_weights(net, weights, demo["variant"])  # says what does not fit, as compile would
    # The check loads it with torch alone: a plain state_dict, or one under "model" (the official layout).
    raw = torch.load(weights, map_location="cpu", weights_only=True)
    key = "model" if isinstance(raw, dict) and isinstance(raw.get("model"), dict) else None
    state, own = (raw[key] if key else raw), net.state_dict()
    if not isinstance(state, dict) or set(state) != set(own) or any(not torch.equal(state[k], own[k]) for k in own):
        raise PipelineError(f"checkpoint {weights} is not a ConvNeXt state_dict (plain or under 'model'), which the "
                            f"GPU check loads with torch alone; re-save it with torch.save({{'model': state_dict}}, path)")
    (into / DEMO).mkdir(parents=True, exist_ok=True)
    shutil.copy2(weights, into / DEMO / weights.name)
    return {"variant": demo["variant"], "num_classes": demo["num_classes"], "in_chans": demo["in_chans"],
            "input_size": demo["input_size"], "weights": str(weights), "checkpoint": f"{DEMO}/{weights.name}",
            "checkpoint_sha256": file_sha256(weights), "state_dict_key": key,
            "training": training_record(str(weights))}


def demo_test_set(demo: dict, into: Path) -> dict:
    """into/demo/<set>.npz: the raw uint8 test images and labels (they compress; preprocessed
    floats would not), and a few preprocessed ones for the check to hold its preprocessing to;
    the manifest's demo "data"."""
    from calibration import fashion_mnist, load_dataset
    from calibration.preprocess import get_preprocessing, input_recipe, resize_geometry
    from pipeline.errors import PipelineError

    split = demo["data"].partition(":")[2] or "test"
    raw, labels = fashion_mnist.load_raw(split)
    dataset = load_dataset(demo["data"], demo["input_size"], demo["preprocessing"], demo["in_chans"], split=split)
    spec = get_preprocessing(demo["preprocessing"])
    recipe = input_recipe(spec, demo["in_chans"], demo["input_size"])
    height, width, top, left = resize_geometry(*raw.shape[1:], demo["input_size"], spec.crop_pct)
    recipe = {"name": spec.name, "mean": recipe["mean"], "std": recipe["std"],
              "repeat_channels": recipe["repeat_channels"], "input_size": demo["input_size"],
              "resize": [height, width], "crop_at": [top, left], "antialias": spec.interpolation != "nearest",
              "torch_mode": "nearest-exact" if spec.interpolation == "nearest" else spec.interpolation}
    if not np.array_equal(preprocess(raw, recipe), dataset.images) or not np.array_equal(labels, dataset.labels):
        raise PipelineError(f"the GPU check's preprocessing of '{demo['data']}' ({spec.name}, {demo['in_chans']} "
                            f"channels) differs from the pipeline's (calibration/preprocess.py); the demo cannot be "
                            f"bundled with it: pass --demo-args without it or fix gpu_check.preprocess")
    name = f"{dataset.source.replace(':', '-')}.npz"
    arrays = {"images": raw, "labels": labels}
    np.savez(into / DEMO / name, **arrays, preprocessed_sample=dataset.images[:PREPROCESSED_SAMPLE])
    return {"file": f"{DEMO}/{name}", "digest": params_digest(arrays, ["images", "labels"]), "source": dataset.source,
            "name": dataset.description.split(":")[0], "set_size": len(raw), "class_names": dataset.class_names,
            "preprocessing": recipe}


def _load_npz(path: Path) -> dict[str, np.ndarray]:
    with np.load(path) as data:
        return {name: data[name] for name in data.files}


# Arrays up to this size may differ between weight sets that are otherwise one (they are
# written into the manifest); anything larger that differs means a weights file of its own.
_INLINE_VALUES = 64


def _differences(base: dict[str, np.ndarray], arrays: dict[str, np.ndarray]) -> list[str] | None:
    """Names whose values differ from ``base`` cast to their dtype, or None when ``arrays``
    cannot be derived from ``base`` (other names, or a large array that differs)."""
    if set(base) != set(arrays):
        return None
    differ = [n for n in arrays if base[n].shape != arrays[n].shape
              or not np.array_equal(base[n].astype(arrays[n].dtype), arrays[n])]
    return differ if all(arrays[n].size <= _INLINE_VALUES for n in differ) else None


def stage_artifacts(folders: dict[str, Path], into: Path) -> dict[str, dict]:
    """Copy each artifact into ``into/<config>/``; weights equal to an already stored set up
    to a cast are not copied but derived on the GPU machine. Returns the manifest entries."""
    entries: dict[str, dict] = {}
    stored: dict[str, dict[str, np.ndarray]] = {}

    def weight_bytes(folder: Path) -> int:
        weights = folder / "model.params.npz"
        return weights.stat().st_size if weights.is_file() else 0

    # The smallest (narrowest dtypes) set is stored, the others derived from it: a cast up is exact.
    ordered = sorted(folders.items(), key=lambda item: weight_bytes(item[1]))
    for name, folder in ordered:
        destination = into / name
        destination.mkdir(parents=True)
        files = [f for f in ("model.so", "model.so.json", "model.cu") if (folder / f).is_file()]
        entry: dict = {"files": {}}
        metadata_ = json.loads((folder / "model.so.json").read_text())
        entry["input"], entry["output"] = metadata_["input"], metadata_["output"]
        entry["params_mode"] = metadata_.get("params_mode")
        weights_file = metadata_.get("params_file")
        if weights_file:
            arrays = _load_npz(folder / weights_file)
            order = metadata_["params_order"]
            source = next(((other, differ) for other, base in stored.items()
                           if (differ := _differences(base, arrays)) is not None), None)
            if source is None:
                files.append(weights_file)
                stored[name] = arrays
            else:
                other, differ = source
                entry["derived_params"] = {
                    "file": weights_file, "from": f"{other}/{weights_file}",
                    "dtypes": {n: arrays[n].dtype.name for n in order},
                    # Small arrays that do differ, e.g. reshape targets holding the batch size.
                    "values": {n: arrays[n].tolist() for n in differ},
                }
            entry["params_digest"] = params_digest(arrays, order)
        for file in files:
            shutil.copy2(folder / file, destination / file)
            entry["files"][file] = {"bytes": (folder / file).stat().st_size}
        entries[name] = entry
    return dict(sorted(entries.items()))


def tvm_runtime_archive(into: Path) -> dict:
    """runtime/tvm-runtime.tar.xz: the installed apache-tvm package less its compiler (cached)."""
    import tvm

    version = metadata.version("apache-tvm")
    cached = cache_root() / "gpu-bundle" / f"tvm-runtime-{version}.tar.xz"
    if not cached.is_file():
        package = Path(tvm.__file__).parent
        cached.parent.mkdir(parents=True, exist_ok=True)
        temp = cached.with_name(f".{cached.name}.tmp-{os.getpid()}")

        def keep(info: tarfile.TarInfo) -> tarfile.TarInfo | None:
            relative = info.name.split("/", 1)[1] if "/" in info.name else ""
            if "__pycache__" in info.name or any(
                    relative == part or relative.startswith(part + "/") for part in COMPILER_PARTS):
                return None
            return info

        log(f"packing the TVM {version} runtime (without its compiler)")
        with tarfile.open(temp, "w:xz", preset=6) as archive:
            archive.add(package, arcname="tvm", filter=keep)
        os.replace(temp, cached)
    shutil.copy2(cached, into / "tvm-runtime.tar.xz")
    return {"apache-tvm": version, "archive": "runtime/tvm-runtime.tar.xz", "removed": list(COMPILER_PARTS)}


def ffi_wheel(into: Path, given: Path | None) -> dict:
    """runtime/<apache-tvm-ffi wheel for the GPU machine's Python>, downloaded once."""
    from pipeline.errors import PipelineError

    version = metadata.version("apache-tvm-ffi")
    tag = "cp" + GPU_PYTHON.replace(".", "")
    if given is not None:
        if not given.is_file() or f"-{tag}-" not in given.name:
            raise PipelineError(f"--ffi-wheel {given} is not an apache-tvm-ffi wheel for Python {GPU_PYTHON}")
        wheel = given
    else:
        folder = cache_root() / "gpu-bundle" / "wheels"
        found = sorted(folder.glob(f"apache_tvm_ffi-{version}-{tag}-*.whl"))
        if not found:
            log(f"downloading apache-tvm-ffi=={version} for Python {GPU_PYTHON}")
            command = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
                       "--python-version", GPU_PYTHON, "--implementation", "cp", "-d", str(folder)]
            command += [arg for platform in FFI_PLATFORMS for arg in ("--platform", platform)]
            result = subprocess.run([*command, f"apache-tvm-ffi=={version}"], capture_output=True, text=True)
            found = sorted(folder.glob(f"apache_tvm_ffi-{version}-{tag}-*.whl"))
            if result.returncode != 0 or not found:
                errors = [line for line in result.stderr.splitlines() if line.startswith("ERROR")]
                raise PipelineError(
                    f"cannot download apache-tvm-ffi=={version} for Python {GPU_PYTHON} "
                    f"({errors[-1] if errors else 'pip failed'}); download it elsewhere and pass --ffi-wheel"
                )
        wheel = found[-1]
    shutil.copy2(wheel, into / wheel.name)
    return {"apache-tvm-ffi": version, "wheel": f"runtime/{wheel.name}", "python": GPU_PYTHON}


def _xz_tar(source: Path, output: Path) -> None:
    """tar + xz of a folder, with xz's own threads when it is installed (4x faster on 2 cores)."""
    xz = shutil.which("xz")
    if xz is None:
        with tarfile.open(output, "w:xz", preset=6) as archive:
            archive.add(source, arcname=".")
        return
    with open(output, "wb") as out:
        tar = subprocess.Popen(["tar", "-C", str(source), "-cf", "-", "."], stdout=subprocess.PIPE)
        compress = subprocess.run([xz, "-6", "-T0", "-c"], stdin=tar.stdout, stdout=out)
        tar.stdout.close()
        if tar.wait() != 0 or compress.returncode != 0:
            raise RuntimeError(f"tar | xz failed for {source}")


def _commit() -> str:
    result = subprocess.run(["git", "-C", str(REPO), "describe", "--always", "--dirty", "--abbrev=12"],
                            capture_output=True, text=True)
    return result.stdout.strip() or "unknown"


RUN_SH = """#!/usr/bin/env bash
# The one command of the GPU check: installs the bundled TVM runtime into ./_site once (no
# network), then runs gpu_check.py with every argument given here (--help lists them).
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
if ! "$PY" -c "import tvm" 2>/dev/null && [ ! -d _site/tvm ]; then
    mkdir -p _site.tmp
    "$PY" -m pip install --quiet --no-index --no-deps --target _site.tmp runtime/apache_tvm_ffi-*.whl
    tar -xJf runtime/tvm-runtime.tar.xz -C _site.tmp
    mv _site.tmp _site
fi
if [ -d _site ]; then export PYTHONPATH="$PWD/_site${PYTHONPATH:+:$PYTHONPATH}"; fi
export TVM_USE_RUNTIME_LIB=1
exec "$PY" gpu_check.py "$@"
"""


def readme(manifest: dict) -> str:
    model = manifest["model"]
    rows = "\n".join(
        f"| {name} | {entry['input']['shape']} | {entry['params_mode']} | "
        f"{'derived from ' + entry['derived_params']['from'] if 'derived_params' in entry else 'stored'} |"
        for name, entry in manifest["artifacts"].items())
    sweep = manifest.get("gemm_sweep")
    sweep_text = (f"""
It also times the {len(sweep['kernels'])} kernels of the GEMM sweep (`artifacts/gemm-sweep/`,
benchmarks/gemm_sweep.py): every fp16 GEMM in every block tile and split over K, each alone
on random arguments (`--sweep-ms`: GPU time per repeat, 0: none), into `OUT/gemm_sweep.md`
and `gpu_check.json`.
""" if sweep else "")
    demo = manifest.get(DEMO)
    demo_text = (f"""
The demo model, ConvNeXt-{demo['model']['variant']} ({demo['model']['weights']}, sha256
{demo['model']['checkpoint_sha256'][:12]}, checked before use), is measured too: its artifacts
({', '.join(c['name'] for c in demo['configs'])}) on its {demo['data']['set_size']} labeled
{demo['data']['source']} images (`--demo-images N`: the first N) against PyTorch float32 from the
same checkpoint on the same GPU: top-1, top-5, agreement and the errors, and the latency beside
PyTorch's. Its reports go to `OUT/reports/{manifest['target']}-{DEMO}*/`, which the repository's
reports/README.md shows in the demo model's table.
""" if demo else "")
    return f"""# GPU check bundle: ConvNeXt-{model['variant']} for {manifest['target']}

Built {manifest['created']} from commit {manifest['commit']} by `{manifest['command']}`.

On a machine with an NVIDIA GPU, PyTorch with CUDA and Python {manifest['runtime']['python']}
(no TVM and no network needed):

```sh
bash run.sh --out OUT        # installs the bundled TVM runtime into ./_site once, then runs the check
```

Where only a few files come back (the lent GPU machine returns 8 from `$OUT`), pack the
report folders: `bash dist/gpu-bundle/run.sh --out "$OUT" --pack` gives `gpu_check.json`,
`summary.md` and `reports.tar.gz` (`tar xzf reports.tar.gz` in the repository root puts them
into `reports/`).

`gpu_check.py` rebuilds the model in PyTorch with the same seeded weights (seed {model['seed']},
pipeline/seeded_weights.py), runs every artifact below on the GPU against PyTorch float32 (TF32 off)
and times TVM beside PyTorch eager fp16, channels_last, `torch.compile` and `torch.compile`
with CUDA graphs; it records 20 calls (`--profile-calls`) of each artifact with PyTorch's profiler for a
table of each kernel's GPU time beside its roofline bound (`--profile-calls 0`: none). It writes
`OUT/reports/<folder>/` (latency.json, accuracy.json, kernels.json, report.md: copy them into
the repository's `reports/`), `OUT/gpu_check.json` and `OUT/summary.md`, and
exits 0 when the criteria hold (no NaN, fp32 max abs error <= 1e-4, fp16 top-1 agreement
>= 99%), 1 when one fails, 2 when it cannot run (no GPU, a damaged bundle).
{demo_text}{sweep_text}
| configuration | input | weights | weights file |
|---|---|---|---|
{rows}
"""


def build_bundle(args: argparse.Namespace) -> dict:
    from pipeline.errors import PipelineError
    from targets import get_target

    target = get_target(args.target)
    if target.cuda_arch is None and target.name != "x86":
        raise PipelineError(f"--target {args.target} is not a CUDA target; use e.g. cuda-sm90 "
                            f"(or x86, to try the check on this CPU: gpu_check.py --device cpu)")
    configs = parse_configs(args.configs, target)
    demo = parse_demo_args(args.demo_args) if args.demo_args.strip() else None
    demo_configs = parse_configs(args.demo_configs or ",".join(
        f"{p}:1" for p in ("fp32", "fp16") if p in target.precisions), target) if demo else []
    target.check_available()

    weights = seeded_checkpoint(args.variant, args.num_classes, args.seed, args.artifacts / "gpu-bundle")
    compiled = compile_configs(args, target, configs, weights)
    folders = {name: c.folder for name, c in compiled.items()}
    demo_compiled = compile_configs(args, target, demo_configs, demo["weights"], demo, prefix=f"{DEMO}-") if demo else {}

    output = args.output.resolve()
    output.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{output.name}.tmp-", dir=output.parent))
    try:
        bundle = work / "bundle"
        for module in BUNDLED_MODULES:
            destination = bundle / "lib" / "pipeline" / module
            for package in (destination.parent, *destination.parent.parents):
                if package == bundle / "lib":
                    break
                package.mkdir(parents=True, exist_ok=True)
                (package / "__init__.py").touch()
            shutil.copy2(REPO / "pipeline" / module, destination)
        for script in CHECK_SCRIPTS:
            shutil.copy2(REPO / "benchmarks" / script, bundle / script)
        (bundle / "run.sh").write_text(RUN_SH)
        (bundle / "run.sh").chmod(0o755)
        (bundle / "runtime").mkdir()
        runtime = {**tvm_runtime_archive(bundle / "runtime"), **ffi_wheel(bundle / "runtime", args.ffi_wheel)}

        entries = stage_artifacts(folders, work / "artifacts")
        demo_part = None
        if demo:
            # Weights of their own (a trained checkpoint), stored apart from the seeded ones.
            entries.update(stage_artifacts({name: c.folder for name, c in demo_compiled.items()}, work / "artifacts"))
            log(f"the demo's checkpoint and {demo['data']} test images")
            demo_part = {"model": demo_checkpoint(demo, work / "artifacts"),
                         "data": demo_test_set(demo, work / "artifacts"),
                         "configs": [{"name": f"{DEMO}-{c.name}", "precision": c.precision, "batch_size": c.batch,
                                      "gpu_split_k": c.split_k} for c in demo_configs]}
        for name, c in {**compiled, **demo_compiled}.items():
            entries[name]["kernels"] = c.kernels  # what the check's kernel profile is set beside
        sweep = None
        sweep_models = {c.batch: compiled[c.name].onnx for c in configs if c.precision == "fp16" and c.split_k}
        if args.gemm_sweep and target.device == "cuda" and sweep_models:
            from gemm_sweep import build_sweep

            sweep = build_sweep([(onnx, batch) for batch, onnx in sorted(sweep_models.items())], target,
                                work / "artifacts" / "gemm-sweep", log=log)
        log("compressing the artifacts (xz)")
        _xz_tar(work / "artifacts", bundle / "artifacts.tar.xz")

        manifest = {
            "format": 1,
            "target": target.name,
            "target_json": target.tvm_target,
            "model": {"variant": args.variant, "num_classes": args.num_classes, "in_chans": 3,
                      "input_size": args.input_size, "seed": args.seed,
                      "weights": "pipeline/seeded_weights.py (coarse grid, exact in float16)"},
            "configs": [{"name": c.name, "precision": c.precision, "batch_size": c.batch, "gpu_split_k": c.split_k}
                        for c in configs],
            "artifacts": entries,
            **({DEMO: demo_part} if demo_part else {}),
            **({"gemm_sweep": sweep} if sweep else {}),
            "runtime": runtime,
            "commit": _commit(),
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "command": "benchmarks/gpu_bundle.py " + shlex.join(sys.argv[1:]),
        }
        (bundle / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
        (bundle / "README.md").write_text(readme(manifest))

        total = sum(p.stat().st_size for p in bundle.rglob("*") if p.is_file())
        manifest["bytes"] = total
        if total > args.max_mib * MIB:
            raise PipelineError(
                f"the bundle is {total / MIB:.1f} MiB, over --max-mib {args.max_mib:g}; "
                f"bundle fewer --configs (e.g. drop fp16:8)"
            )
        if output.exists():
            shutil.rmtree(output)
        os.replace(bundle, output)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    log(f"wrote {output} ({manifest['bytes'] / MIB:.1f} MiB): {', '.join(manifest['artifacts'])}")
    return manifest


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    build_bundle(args)


if __name__ == "__main__":
    from pipeline.errors import EXIT_USER_ERROR, PipelineError

    try:
        main()
    except PipelineError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(EXIT_USER_ERROR)
    except KeyboardInterrupt:
        print("interrupted; compiled configurations are kept in the artifacts cache", file=sys.stderr)
        sys.exit(130)
