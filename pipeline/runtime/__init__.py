"""The runtime layer: loading and running artifacts (runtime_only.py, also shipped as run.py),
runners per backend, isolated timing, RPC, qemu cross-runs and device bundles. Never imports
pipeline.compiler.
"""
