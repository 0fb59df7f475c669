"""Default schedules per device kind, applied where no tuning record exists: cpu.py (tiled
GEMMs, VNNI), depthwise.py (NHWC depthwise on CPU), gpu.py (dlight rules for CUDA).
"""
