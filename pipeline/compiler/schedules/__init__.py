"""Schedules: apply.py gives each kernel its tuning record, else its device kind's default;
cpu.py chooses CPU defaults (cpu_tiled.py: tiled GEMMs, depthwise.py: NHWC depthwise,
cpu_rows.py: row kernels), gpu.py orders the CUDA rules (ours, then dlight's).
"""
