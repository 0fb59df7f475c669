"""A device bundle: one .tar.gz with everything needed to run an artifact on its target
with only the TVM runtime and NumPy installed there.

    <bundle>/model.so             the library (kernels; weights too, if embedded)
    <bundle>/model.so.json        its metadata: target, input/output, params order
    <bundle>/model.params.npz     weights, only for params_mode="separate"
    <bundle>/run.py               pipeline/runtime/runtime_only.py, unchanged: no pipeline import
    <bundle>/README.md            for the person at the board: runtime to install, input
                                  preprocessing, output, classes, the run command
    <bundle>/labels.txt           class names, one per line (index = output), when known
    <bundle>/manifest.json        target, versions, sha256 of every file, the run command

On the device: ``tar xzf bundle.tar.gz && cd <bundle> && python run.py model.so
--input x.npy --output y.npy`` (``--device cuda`` for a GPU target, which run.py also
picks by itself from model.so.json).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
import time
from importlib import metadata as importlib_metadata
from pathlib import Path

from pipeline.errors import PipelineError
from pipeline.runtime.runtime_only import metadata_path
from targets import Target

RUNNER_SOURCE = Path(__file__).with_name("runtime_only.py")
BUNDLE_FORMAT = 1


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def bundle_files(library: Path, target: Target) -> dict[str, bytes]:
    """Name in the bundle -> content, after checking the artifact is whole and for `target`."""
    library = Path(library)
    meta_file = metadata_path(library)
    if not library.is_file() or not meta_file.is_file():
        raise PipelineError(
            f"artifact {library} (with {meta_file.name} beside it) does not exist; run `pipeline compile` first"
        )
    metadata = json.loads(meta_file.read_text())
    if metadata.get("target") != target.name:
        raise PipelineError(
            f"{library} was built for target '{metadata.get('target')}', not '{target.name}'; "
            f"pass --target {metadata.get('target')} or compile it for '{target.name}'"
        )
    # Inside the bundle the library is always model.so; its metadata says so too.
    metadata["library"] = "model.so"
    files = {
        "model.so": library.read_bytes(),
        "model.so.json": (json.dumps(metadata, indent=2, sort_keys=True) + "\n").encode(),
        "run.py": RUNNER_SOURCE.read_bytes(),
    }
    if metadata.get("params_file"):
        weights = library.with_name(metadata["params_file"])
        if not weights.is_file():
            raise PipelineError(f"weights file {weights} is missing; it must sit beside {library.name}")
        files[metadata["params_file"]] = weights.read_bytes()
    return files


def bundle_model(config, library_given: bool = False) -> dict:
    """What the bundle says about the model, from the command's settings: what was compiled
    (unless a ready library was given, which the settings do not describe), how inputs are
    preprocessed, and the class names of --data when it has them."""
    from calibration.datasets import class_names

    model = {} if library_given else {
        "variant": config.variant, "input_size": config.input_size, "batch_size": config.batch_size,
        "num_classes": config.num_classes, "in_chans": config.in_chans, "precision": config.precision,
        "params_mode": config.params_mode,
        "weights": config.weights.name if config.weights is not None else f"random init (seed {config.seed})",
    }
    model["preprocessing"] = config.preprocessing
    names = class_names(config.data) if config.data is not None else None
    if names is not None:
        model["class_names"] = names
        model["class_names_from"] = config.data
    return model


def _tvm_ffi_version() -> str | None:
    try:
        return importlib_metadata.version("apache-tvm-ffi")
    except importlib_metadata.PackageNotFoundError:
        return None


def write_bundle(library: Path, target: Target, output: Path, model: dict | None = None) -> dict:
    """Write the bundle of `library` (built for `target`) to `output` (.tar.gz); returns
    its manifest. `model` describes what was compiled (``bundle_model``: variant, input
    size, preprocessing, class names, ...)."""
    output = Path(output)
    if not output.name.endswith(".tar.gz"):
        raise PipelineError(f"--output {output} must end in .tar.gz")
    model = dict(model or {})
    files = bundle_files(library, target)
    metadata = json.loads(files["model.so.json"])
    top = output.name[: -len(".tar.gz")]
    device_flag = "" if target.device == "cpu" else f" --device {target.device}"
    outputs = metadata["output"]["shape"][-1]
    names = model.get("class_names")
    if names is not None and len(names) != outputs:
        # Names of a data set with other classes than the head would label outputs wrongly.
        model["class_names_mismatch"] = f"{model.get('class_names_from')} has {len(names)} classes"
        del model["class_names"]
    elif names is not None:
        files["labels.txt"] = "".join(f"{name}\n" for name in names).encode()
    requires = [f"apache-tvm=={metadata.get('tvm_version')}"]
    ffi = _tvm_ffi_version()
    if ffi is not None:
        requires.append(f"apache-tvm-ffi=={ffi}")
    requires.append("numpy")
    run = f"python run.py model.so --input x.npy --output y.npy{device_flag}"
    files["README.md"] = bundle_readme(top, target, metadata, model, requires, run).encode()
    manifest = {
        "format": BUNDLE_FORMAT,
        "target": target.name,
        "target_json": target.tvm_target,
        "host_triple": target.host_triple,
        "device": target.device,
        "device_code": metadata.get("device_code", []),
        "model": model,
        "input": metadata["input"],
        "output": metadata["output"],
        "params_mode": metadata.get("params_mode"),
        "requires": requires,
        "run": run,
        "files": {name: {"bytes": len(data), "sha256": _sha256(data)} for name, data in sorted(files.items())},
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    files["manifest.json"] = (json.dumps(manifest, indent=2) + "\n").encode()

    output.parent.mkdir(parents=True, exist_ok=True)
    temp = output.with_name(f".{output.name}.tmp-{os.getpid()}")
    try:
        with tarfile.open(temp, "w:gz") as archive:
            for name, data in sorted(files.items()):
                info = tarfile.TarInfo(f"{top}/{name}")
                info.size = len(data)
                info.mode = 0o755 if name == "run.py" else 0o644
                info.mtime = int(time.time())
                archive.addfile(info, io.BytesIO(data))
        os.replace(temp, output)
    finally:
        temp.unlink(missing_ok=True)
    return manifest


# The board needs wheels for its Python and C library: PyPI has apache-tvm 0.27 as
# manylinux_2_27/2_28 wheels for x86-64 and aarch64 (any Python 3) and apache-tvm-ffi for
# CPython 3.9 and newer.
_BOARD_SYSTEMS = (
    "64-bit Linux with glibc 2.28 or newer (Debian 10+, Ubuntu 20.04+, Raspberry Pi OS 64-bit "
    "Bookworm, JetPack 5/6) and Python 3.9 or newer"
)


def _preprocessing_lines(model: dict, metadata: dict) -> list[str]:
    """How to turn an image into the input array, in words and as a tested snippet."""
    from calibration.preprocess import get_preprocessing, input_recipe

    batch, in_chans, size = metadata["input"]["shape"][:3]
    name = model.get("preprocessing")
    if name is None:
        return ["The preprocessing the model was trained with is not recorded in this bundle: feed what "
                "its training fed it."]
    recipe = input_recipe(get_preprocessing(name), in_chans, size)
    gray = recipe["mode"] == "L"
    lines = [
        f"Preprocessing `{name}`, the same as the pipeline's evaluation:",
        "",
        f"1. decode the image as {'grayscale (PIL mode L)' if gray else 'RGB'};",
        f"2. resize it ({recipe['interpolation']}) so that its shorter side is {recipe['resize_shorter_side']} "
        f"pixels, then crop the center {size}x{size};",
        "3. scale the pixels to [0, 1] (divide by 255);",
        f"4. subtract the mean {recipe['mean']} and divide by the std {recipe['std']}, per channel"
        + (";" if recipe["repeat_channels"] > 1 else "."),
    ]
    if recipe["repeat_channels"] > 1:
        lines.append(f"5. repeat the gray plane {recipe['repeat_channels']} times (the model takes {in_chans} channels).")
    transpose = "x = x[None]                                   # (H, W) -> (1, H, W)" if gray else \
        "x = x.transpose(2, 0, 1)                      # (H, W, C) -> (C, H, W)"
    lines += [
        "",
        "In Python (NumPy and Pillow: `python3 -m pip install pillow`):",
        "",
        "```python",
        "import sys",
        "",
        "import numpy as np",
        "from PIL import Image",
        "",
        f"image = Image.open(sys.argv[1]).convert(\"{recipe['mode']}\")",
        "width, height = image.size",
        f"short = {recipe['resize_shorter_side']}",
        "if height <= width:",
        "    new_w, new_h = int(short * width / height), short",
        "else:",
        "    new_w, new_h = short, int(short * height / width)",
        f"image = image.resize((new_w, new_h), Image.Resampling.{recipe['interpolation'].upper()})",
        f"left, top = int(round((new_w - {size}) / 2.0)), int(round((new_h - {size}) / 2.0))",
        f"image = image.crop((left, top, left + {size}, top + {size}))",
        "x = np.asarray(image, dtype=np.float32) / 255.0",
        transpose,
        f"mean = np.array({recipe['mean']}, np.float32).reshape(-1, 1, 1)",
        f"std = np.array({recipe['std']}, np.float32).reshape(-1, 1, 1)",
        "x = (x - mean) / std",
    ]
    if recipe["repeat_channels"] > 1:
        lines.append(f"x = np.repeat(x, {recipe['repeat_channels']}, axis=0)")
    if batch == 1:
        lines.append("np.save(\"x.npy\", x[None])                    # a batch of one: (1, C, H, W)")
    else:
        lines.append(f"np.save(\"x.npy\", np.stack([x] * {batch}))         # the model takes {batch} images at once")
    lines += ["```", "", "Save it as `preprocess.py` and run `python3 preprocess.py photo.jpg` to write `x.npy`."]
    return lines


def _class_lines(model: dict, outputs: int) -> list[str]:
    names = model.get("class_names")
    if names is not None:
        lines = [f"From `{model.get('class_names_from')}`; `labels.txt` has them one per line (line i = output i)."]
        if len(names) <= 20:
            lines += [""] + [f"{index}. {name}" for index, name in enumerate(names)]
        return lines
    if model.get("class_names_mismatch"):
        return [f"Not known: {model['class_names_mismatch']}, the model has {outputs} outputs, so their names "
                "would not match the outputs."]
    if outputs == 1000:
        return ["Not recorded. 1000 outputs: if the weights are an ImageNet-1k checkpoint (the official "
                "ConvNeXt release, timm's `*.in1k` models), output i is ImageNet-1k class i."]
    return ["Not recorded: package with `--data` pointing at the labeled data (an ImageFolder names its "
            "classes) to have them listed here."]


def bundle_readme(top: str, target: Target, metadata: dict, model: dict, requires: list[str], run: str) -> str:
    """README.md of a bundle: what the person at the board needs to run the model."""
    shape = metadata["input"]["shape"]
    outputs = metadata["output"]["shape"][-1]
    gpu = target.device != "cpu"
    arch = target.host_triple.split("-")[0]
    if model.get("variant"):
        what = (f"ConvNeXt-{model['variant']} ({model.get('precision', 'fp32').upper()}, "
                f"{model.get('num_classes')} classes, weights {model.get('weights')})")
    else:
        what = "A ConvNeXt model"
    device_code = ", ".join(metadata.get("device_code", [])) or target.cuda_arch
    lines = [
        f"# {top}",
        "",
        f"{what} compiled with Apache TVM {metadata.get('tvm_version')} for target `{target.name}`: "
        f"{target.description}.",
        "",
        "## What the board needs",
        "",
        f"- `model.so` is {arch} Linux code (`{target.host_triple}`)"
        + (f" with CUDA kernels ({device_code})" if gpu else "")
        + f": it loads only on an {arch} machine" + (" with that GPU" if gpu else "") + ".",
        f"- {_BOARD_SYSTEMS}. A 32-bit OS (`uname -m` says armv7l) cannot run aarch64 code: install the 64-bit one.",
        "- The TVM runtime of exactly the version the model was compiled with, and NumPy. PyPI has both for "
        "x86-64 and aarch64; the apache-tvm wheel holds all of TVM, `run.py` uses only its runtime:",
        "",
        "  ```sh",
        f"  python3 -m pip install {' '.join(requires)}",
        "  ```",
    ]
    if gpu:
        lines += [
            "- The GPU: `python3 -c \"import tvm; print(tvm.cuda(0).exist)\"` must print True (the board's "
            "CUDA driver is installed and the wheel's CUDA runtime finds it). Where it prints False (e.g. "
            f"a CUDA version the wheel does not support), build TVM {metadata.get('tvm_version')}'s runtime "
            "from source with `-DUSE_CUDA=ON`: https://tvm.apache.org/docs/install/from_source.html",
        ]
    lines += [
        "",
        "## Copy and run",
        "",
        "```sh",
        f"scp {top}.tar.gz user@board:            # from the machine that built it",
        "ssh user@board",
        f"tar xzf {top}.tar.gz && cd {top}",
        "python3 -m venv ~/tvm && . ~/tvm/bin/activate   # Debian 12 / Raspberry Pi OS refuse pip into the system Python",
        f"python3 -m pip install {' '.join(requires)}",
        f"python3 {run.removeprefix('python ')}",
        "```",
        "",
        "`run.py` needs nothing but the TVM runtime and NumPy; it saves the output to `y.npy` and prints the "
        "latency (`--repeat 20` times 20 runs) and each image's top class"
        + (" with its name from `labels.txt`" if "class_names" in model else "") + ". It runs the model on "
        "the device it was compiled for (`--device` picks another GPU: `cuda:1`). `manifest.json` lists every "
        "file with its sha256: `run.py` refuses a file it loads that differs (a damaged copy).",
        "",
        "## Input",
        "",
        f"`x.npy`: one {metadata['input']['dtype']} array of shape {tuple(shape)}, layout NCHW "
        "(batch, channels, height, width), saved with `numpy.save`.",
        "",
        *_preprocessing_lines(model, metadata),
        "",
        "## Output",
        "",
        f"`y.npy`: {metadata['output']['dtype']} of shape {tuple(metadata['output']['shape'])}: **logits**, one raw "
        "score per class, not probabilities. The largest is the predicted class; softmax turns them into "
        "probabilities:",
        "",
        "```python",
        "import numpy as np",
        "",
        "logits = np.load(\"y.npy\")[0]",
        "probabilities = np.exp(logits - logits.max())",
        "probabilities /= probabilities.sum()",
        *(["names = open(\"labels.txt\").read().splitlines()"] if "class_names" in model else []),
        "for index in np.argsort(-logits)[:5]:",
        ("    print(names[index], f\"{probabilities[index]:.3f}\")" if "class_names" in model
         else "    print(index, f\"{probabilities[index]:.3f}\")"),
        "```",
        "",
        "## Classes",
        "",
        *_class_lines(model, outputs),
        "",
    ]
    return "\n".join(lines)
