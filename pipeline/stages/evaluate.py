"""evaluate: accuracy of the artifact against the PyTorch reference.

With a labeled dataset it reports top-1/top-5 of both; on an unlabeled folder
or on random inputs, agreement and error statistics only.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from calibration.datasets import data_fingerprint
from pipeline.compare import compare_logits
from pipeline.config import PipelineConfig
from pipeline.engine import Stage, log
from pipeline.progress import Progress
from targets import Target


REFERENCE_BATCH = 256
# Unreadable files named in the accuracy record and on the terminal.
SKIPPED_SHOWN = 3


def settings(config: PipelineConfig, target: Target) -> dict:
    return {
        "data": config.data,
        "data_fingerprint": data_fingerprint(config.data),
        "preprocessing": config.preprocessing,
        "eval_limit": config.eval_limit,
        "eval_random_count": config.eval_random_count if config.data is None else None,
        "seed": config.seed,
        # Where the artifact ran does not change its outputs, but a different board might.
        "rpc_key": config.rpc_key or (target.rpc_key if config.rpc_tracker else None),
        # Only where set, so that the keys of evaluations run on a device stay what they were.
        **({"emulator": "qemu-aarch64"} if config.emulate else {}),
    }


def run_batched(runner, images: np.ndarray, batch_size: int, label: str) -> np.ndarray:
    """Feed a fixed-batch-size runner, padding the last batch with copies of its last image."""
    outputs = []
    total = images.shape[0]
    progress = Progress(f"[evaluate] {label}", total)
    for start in range(0, total, batch_size):
        chunk = images[start:start + batch_size]
        real = chunk.shape[0]
        if real < batch_size:
            chunk = np.concatenate([chunk, np.repeat(chunk[-1:], batch_size - real, axis=0)])
        outputs.append(runner.infer(chunk)[:real])
        progress.update(start + real)
    return np.concatenate(outputs)


def run_emulated(library: Path, images: np.ndarray) -> tuple[np.ndarray, dict]:
    """The aarch64 artifact's logits for every image under qemu-user (one process for many
    images), and what ran them: the board's binary on an emulated CPU gives the board's outputs."""
    from pipeline.runtime.cross import qemu_version, run_images_under_qemu

    progress = Progress("[evaluate] tvm under qemu-aarch64", images.shape[0])
    logits = run_images_under_qemu(library, images, progress=progress.update)
    return logits, {"name": qemu_version(), "kind": "user-mode CPU emulator", "binary": "same binary as the board"}


def load_inputs(config: PipelineConfig, in_chans: int, input_size: int):
    """(images, labels or None, description of the data) for the evaluation."""
    if config.data is None:
        rng = np.random.default_rng(config.seed)
        images = rng.standard_normal((config.eval_random_count, in_chans, input_size, input_size), dtype=np.float32)
        return images, None, {"source": "random normal inputs", "count": config.eval_random_count, "labeled": False}
    from calibration import load_dataset

    dataset = load_dataset(
        config.data, input_size=input_size, preprocessing=config.preprocessing,
        in_chans=in_chans, limit=config.eval_limit, seed=config.seed, progress=True,
    )
    description = {
        "source": dataset.source,
        "description": dataset.description,
        # What a committed report is compared by before a new one replaces it (stages/report.py).
        "preprocessing": config.preprocessing,
        "count": len(dataset),
        "skipped": len(dataset.skipped),
        "skipped_examples": [f"{path}: {reason}" for path, reason in dataset.skipped[:5]],
        "skipped_files": [path for path, _ in dataset.skipped[:SKIPPED_SHOWN]],
        "labeled": dataset.labels is not None,
        "class_names": dataset.class_names,
        "largest_label": int(dataset.labels.max()) if dataset.labels is not None and len(dataset.labels) else None,
    }
    return dataset.images, dataset.labels, description


def run(config: PipelineConfig, target: Target, inputs: dict[str, Path], out_dir: Path) -> dict:
    from pipeline.runtime.runners import OnnxRuntimeRunner, TorchRunner, artifact_runner

    meta = json.loads(Path(inputs["library_metadata"]).read_text())
    batch_size, in_chans, input_size = meta["input"]["shape"][0], meta["input"]["shape"][1], meta["input"]["shape"][2]
    images, labels, data = load_inputs(config, in_chans, input_size)
    log(f"[evaluate] {data['count']} images from {data['source']}")

    if "checkpoint" in inputs:
        # PyTorch takes any batch size: large batches make the reference pass cheap.
        reference, reference_batch = TorchRunner.from_checkpoint(inputs["checkpoint"]), REFERENCE_BATCH
    else:
        # The ONNX file has the artifact's static batch size.
        reference, reference_batch = OnnxRuntimeRunner(inputs["onnx_simplified"]), batch_size
    reference_logits = run_batched(reference, images, reference_batch, reference.name)
    if config.emulate:
        artifact_logits, emulator = run_emulated(inputs["library"], images)
    else:
        artifact = artifact_runner(inputs["library"], target, config.rpc_tracker, config.rpc_key)
        artifact_logits, emulator = run_batched(artifact, images, batch_size, "tvm"), None
    accuracy = {
        "target": target.name,
        "precision": config.precision,
        "reference": reference.name,
        "outputs": int(artifact_logits.shape[1]),
        "data": data,
        "metrics": compare_logits(reference_logits, artifact_logits, labels),
    }
    if emulator:
        accuracy["emulator"] = emulator
    (out_dir / "accuracy.json").write_text(json.dumps(accuracy, indent=2) + "\n")
    return {"outputs": {"accuracy": "accuracy.json"}, "info": accuracy["metrics"]}


def data_warnings(accuracy: dict) -> list[str]:
    """What makes the numbers of an accuracy record doubtful: classes of the data that do not
    match the model's outputs, and images that could not be read."""
    data, outputs = accuracy.get("data", {}), accuracy.get("outputs")
    warnings = []
    names, largest = data.get("class_names"), data.get("largest_label")
    if outputs and names and len(names) != outputs:
        shown = ", ".join(names[:5]) + (", ..." if len(names) > 5 else "")
        warnings.append(
            f"the data has {len(names)} classes ({shown}) but the model has {outputs} outputs: top-1/top-5 "
            f"count label i as output i, which holds only if the data's classes are the model's first "
            f"{len(names)} in the same order; fine-tune for these classes with "
            f"`pipeline train --init-weights X.pth --reset-head`"
        )
    elif outputs and largest is not None and largest >= outputs:
        warnings.append(
            f"the data has labels up to {largest} but the model has {outputs} outputs (0..{outputs - 1}): "
            f"those images can never be counted correct; check --data and --num-classes"
        )
    if data.get("skipped"):
        files = data.get("skipped_files") or []
        more = f" and {data['skipped'] - len(files)} more" if data["skipped"] > len(files) else ""
        warnings.append(
            f"{data['skipped']} unreadable image file(s) skipped: {', '.join(files)}{more}"
        )
    return warnings


def summary_lines(accuracy: dict) -> list[str]:
    """The accuracy record in a few lines for the terminal."""
    data, metrics, reference = accuracy["data"], accuracy["metrics"], accuracy["reference"]
    emulator = accuracy.get("emulator")
    lines = [f"evaluated: {data['count']} images from {data['source']}"
             + ("" if data.get("labeled") else " (no labels: agreement and error only)")
             + (f", measured under {emulator['name']} ({emulator['binary']})" if emulator else "")]
    for name in ("top1", "top5"):
        if name in metrics:
            lines.append(f"{name[:3]}-{name[3:]}: {100 * metrics[name]:.2f}% "
                         f"({reference} reference {100 * metrics['reference_' + name]:.2f}%)")
    lines.append(f"top-1 agreement with {reference}: {100 * metrics['top1_agreement']:.2f}%, "
                 f"max abs logit error {metrics['max_abs_error']:.3g}, min cosine {metrics['cosine_min']:.6f}")
    return lines


STAGE = Stage(
    name="evaluate",
    inputs=("library", "library_metadata", "params", "onnx_simplified", "checkpoint"),
    optional_inputs=("params", "checkpoint"),
    outputs=("accuracy",),
    settings=settings,
    run=run,
    # 2: the record names the model's outputs, the largest label and the skipped files;
    # 3: and the data's preprocessing.
    version=3,
)
