from reports.target_report import describe_tuning, latency_table, render_report


def test_describe_tuning_forms():
    assert describe_tuning(None) == "untuned"
    assert describe_tuning({"tasks_total": 43, "tasks_from_records": 0}) == "untuned (43 kernels on default schedules)"
    assert describe_tuning({"tasks_total": 43, "tasks_from_records": 40, "trials": 512}) == (
        "40/43 kernels from tuning records, 512 trials"
    )
    assert describe_tuning(64) == "64 trials"


def test_time_to_converge_is_claimed_for_one_tuning_run_only():
    cost = {"trials": 128, "seconds": 420.0, "within": 0.1, "trials_to_within": 16, "seconds_to_within": 320.0}
    tuning = {"tasks_total": 43, "tasks_from_records": 43}
    one = describe_tuning({**tuning, "cost": {**cost, "runs": 1}})
    assert one == ("43/43 kernels from tuning records; tuning took 128 trials in 7 min, within 10% of its "
                   "final estimate after 16 trials (5 min)")
    # A resumed database joins runs whose clocks restarted: no claim about when it converged.
    assert describe_tuning({**tuning, "cost": {**cost, "runs": 3}}) == (
        "43/43 kernels from tuning records; tuning took 128 trials in 7 min over 3 runs")
    assert describe_tuning({**tuning, "cost": cost}) == "43/43 kernels from tuning records; tuning took 128 trials in 7 min"


def _stats(median):
    return {"median_ms": median, "p90_ms": median, "p99_ms": median, "mean_ms": median, "min_ms": median,
            "std_ms": 0.0, "throughput_ips": 1e3 / median, "repeats": 3}


def test_report_shows_every_backend_and_unmeasured_reasons():
    latency = {
        "target": "x86", "precision": "fp32", "batch_size": 1, "input_shape": [1, 3, 64, 64], "warmup": 1,
        "backends": {"tvm": _stats(2.0), "onnxruntime": _stats(1.0), "pytorch": {"not_measured": "no model"}},
        "tvm_speedup": {"vs_onnxruntime": 0.5}, "artifact_bytes": 2_000_000,
    }
    accuracy = {
        "reference": "pytorch", "data": {"source": "x", "count": 4, "labeled": True},
        "metrics": {"top1": 0.5, "top5": 1.0, "reference_top1": 0.5, "reference_top5": 1.0, "top1_agreement": 1.0,
                    "max_abs_error": 1e-6, "mean_abs_error": 1e-7, "cosine_min": 1.0, "cosine_mean": 1.0},
    }
    provenance = {"device": "cpu", "date": "d", "commit": "c", "command": "pipeline run", "tools": {"tvm": "0.27"}}
    text = render_report(latency, accuracy, {"variant": "micro"}, provenance)
    # Threads are shown where the measurement recorded them ("-" for older records).
    assert "| onnxruntime | - | 1.00 |" in text and "0.50x" in text
    latency["backends"]["onnxruntime"]["threads"] = 2
    assert "| onnxruntime | 2 | 1.00 |" in "\n".join(latency_table(latency))
    assert "not measured: no model" in text
    assert "top-1 (TVM artifact) | 50.00%" in text
    assert len(latency_table(latency)) == 5


def test_an_emulated_report_says_so_and_shows_no_time():
    # As stages/report.py writes it for `pipeline report --emulate`.
    latency = {
        "target": "arm-a72", "precision": "int8", "batch_size": 1, "input_shape": [1, 1, 32, 32], "warmup": None,
        "backends": {"tvm": {"not_measured": "needs the board (RPC)"}}, "tvm_speedup": {}, "artifact_bytes": 1_000_000,
    }
    accuracy = {
        "reference": "pytorch", "data": {"source": "fashion-mnist:test", "count": 300, "labeled": True},
        "metrics": {"top1": 0.9, "top5": 1.0, "reference_top1": 0.9, "reference_top5": 1.0, "top1_agreement": 0.99,
                    "max_abs_error": 1e-2, "mean_abs_error": 1e-3, "cosine_min": 0.99, "cosine_mean": 0.999},
        "emulator": {"name": "qemu-aarch64 7.2.22", "kind": "user-mode CPU emulator",
                     "binary": "same binary as the board"},
    }
    provenance = {"device": "Intel Xeon", "date": "d", "commit": "c", "command": "pipeline report --emulate",
                  "tools": {"tvm": "0.27"}}
    text = render_report(latency, accuracy, {"variant": "micro"}, provenance)
    assert "Accuracy measured under qemu-aarch64 7.2.22 (same binary as the board); latency needs the board (RPC)." in text
    assert "- device: qemu-aarch64 7.2.22 (user-mode CPU emulator, same binary as the board) on Intel Xeon" in text
    assert "Not measured: needs the board (RPC)" in text
    assert " ms" not in text.split("## Accuracy")[0].split("## Latency")[1]
    assert "top-1 (TVM artifact) | 90.00%" in text
