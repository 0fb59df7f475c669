"""Renders one target's report.md from its latency.json and accuracy.json."""

from __future__ import annotations

from typing import Any

BACKEND_ORDER = ("tvm", "onnxruntime", "onnxruntime-int8", "pytorch")
# The latency of an artifact evaluated under an emulator: its timings are not the board's.
BOARD_LATENCY = "needs the board (RPC)"


def emulated_by(accuracy: dict | None) -> str | None:
    """'measured under qemu-aarch64 7.2.22 (same binary as the board)' for an evaluation
    under an emulator, else None."""
    emulator = (accuracy or {}).get("emulator")
    if not isinstance(emulator, dict):
        return None
    return f"measured under {emulator.get('name', 'an emulator')} ({emulator.get('binary', 'emulated')})"


def stands_on(provenance: dict, accuracy: dict | None) -> str:
    """What a report's numbers were measured on: the device, or the emulator, its kind and host."""
    device = provenance.get("device", "n/a")
    emulator = (accuracy or {}).get("emulator")
    if isinstance(emulator, dict):
        return f"{emulator.get('name')} ({emulator.get('kind')}, {emulator.get('binary')}) on {device}"
    return device


def _fmt(value: Any, digits: int = 2) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def describe_tuning(tuning: Any) -> str:
    """One phrase for model.tuning: the compile stage's task counts, a trial count, or text."""
    if tuning in (None, ""):
        return "untuned"
    if isinstance(tuning, dict):
        trials = next((tuning[k] for k in ("trials", "trials_used", "num_trials", "total_trials")
                       if isinstance(tuning.get(k), (int, float))), None)
        total, tuned = tuning.get("tasks_total"), tuning.get("tasks_from_records")
        if isinstance(total, int) and isinstance(tuned, int):
            phrase = f"{tuned}/{total} kernels from tuning records" if tuned else f"untuned ({total} kernels on default schedules)"
            phrase += f", {int(trials)} trials" if trials is not None else ""
            cost = tuning.get("cost")
            if tuned and isinstance(cost, dict):
                phrase += f"; tuning took {cost['trials']} trials in {cost['seconds'] / 60:.0f} min"
                # Time to converge means something for one run only: a resumed run's curve
                # joins runs (and an unknown count may be several).
                if cost.get("runs") == 1:
                    phrase += (
                        f", within {100 * cost['within']:.0f}% of its final estimate after "
                        f"{cost['trials_to_within']} trials ({cost['seconds_to_within'] / 60:.0f} min)"
                    )
                elif cost.get("runs"):
                    phrase += f" over {cost['runs']} runs"
            return phrase
        if trials is not None:
            return f"{int(trials)} trials"
        return str(tuning.get("summary") or tuning.get("method") or "tuned")
    if isinstance(tuning, (int, float)) and not isinstance(tuning, bool):
        return f"{int(tuning)} trials"
    return str(tuning)


def pct(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.2f}%"


def latency_table(latency: dict) -> list[str]:
    lines = [
        "| backend | threads | median ms | p90 ms | p99 ms | mean ms | min ms | std ms | throughput img/s | TVM speed-up |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name in BACKEND_ORDER:
        stats = latency["backends"].get(name)
        if stats is None:
            continue
        if "median_ms" not in stats:
            lines.append(f"| {name} | | not measured: {stats.get('not_measured', 'unknown')} |||||||")
            continue
        speedup = "1.00x" if name == "tvm" else f"{latency['tvm_speedup'].get('vs_' + name, 0):.2f}x"
        lines.append(
            f"| {name} | {stats.get('threads') or '-'} | {_fmt(stats['median_ms'])} | {_fmt(stats['p90_ms'])} | {_fmt(stats['p99_ms'])} "
            f"| {_fmt(stats['mean_ms'])} | {_fmt(stats['min_ms'])} | {_fmt(stats['std_ms'])} "
            f"| {_fmt(stats['throughput_ips'], 1)} | {speedup} |"
        )
    return lines


def accuracy_table(accuracy: dict) -> list[str]:
    m = accuracy["metrics"]
    lines = ["| metric | value |", "|---|---|"]
    if "top1" in m:
        lines += [
            f"| top-1 ({accuracy['reference']} reference) | {pct(m['reference_top1'])} |",
            f"| top-1 (TVM artifact) | {pct(m['top1'])} |",
            f"| top-5 ({accuracy['reference']} reference) | {pct(m['reference_top5'])} |",
            f"| top-5 (TVM artifact) | {pct(m['top5'])} |",
        ]
    lines += [
        f"| top-1 agreement with {accuracy['reference']} | {pct(m['top1_agreement'])} |",
        f"| max abs logit error | {m['max_abs_error']:.3e} |",
        f"| mean abs logit error | {m['mean_abs_error']:.3e} |",
        f"| min / mean logit cosine | {m['cosine_min']:.6f} / {m['cosine_mean']:.6f} |",
    ]
    return lines


def _training_lines(training: dict | None) -> list[str]:
    if not training:
        return []
    return [
        f"- trained by: `{training.get('command')}` (seed {training.get('seed')}, {training.get('epochs')} epochs, "
        f"recorded test top-1 {training.get('test_top1')}%; record {training.get('record')})"
    ]


def render_report(latency: dict, accuracy: dict, model: dict, provenance: dict) -> str:
    """Markdown for one target x precision."""
    data = accuracy["data"]
    emulated = emulated_by(accuracy)
    tvm = latency["backends"]["tvm"]
    if "median_ms" in tvm:
        timing = [
            f"## Latency (batch {latency['batch_size']}, {latency['warmup']} warm-up runs, "
            f"{tvm['repeats']} timed runs, same input for every backend, each timed alone in a process of its own)",
            "",
            *latency_table(latency),
        ]
    else:
        why = tvm.get("not_measured", "unknown")
        if emulated:
            why += ": an emulator runs the board's binary, so its outputs are the board's, but not its speed"
        timing = [f"## Latency (batch {latency['batch_size']})", "", f"Not measured: {why}."]
    lines = [
        f"# {model.get('variant', '?')} on `{latency['target']}` ({latency['precision'].upper()})",
        "",
        *([f"Accuracy {emulated}; latency {BOARD_LATENCY}.", ""] if emulated else []),
        f"- device: {stands_on(provenance, accuracy)}",
        f"- date: {provenance['date']}",
        f"- commit: {provenance['commit']}",
        f"- command: `{provenance['command']}`",
        "- tools: " + ", ".join(f"{k} {v}" for k, v in provenance["tools"].items()),
        "",
        "## Model",
        "",
        f"- variant: {model.get('variant')} ({_fmt(model.get('parameters'))} parameters), "
        f"{model.get('num_classes')} classes, input {latency['input_shape']}",
        f"- weights: {model.get('weights')}"
        + (f" (sha256 {model['weights_sha256'][:16]}...)" if model.get("weights_sha256") else ""),
        *_training_lines(model.get("training")),
        f"- ONNX nodes: {_fmt(model.get('nodes_before'))} exported, {_fmt(model.get('nodes_after'))} after onnxsim",
        f"- artifact: {latency['artifact_bytes'] / 1e6:.2f} MB, compiled in {_fmt(model.get('compile_seconds'), 1)} s, "
        f"{describe_tuning(model.get('tuning'))}",
        "",
        *timing,
        "",
        f"## Accuracy ({data['count']} images: {data.get('description') or data['source']})",
        "",
    ]
    if not data.get("labeled"):
        lines += ["No labels: agreement and error against the reference only.", ""]
    lines += accuracy_table(accuracy)
    if data.get("skipped"):
        lines += ["", f"{data['skipped']} unreadable files were skipped, e.g. " + "; ".join(data["skipped_examples"])]
    return "\n".join(lines) + "\n"
