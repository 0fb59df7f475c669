"""Verification instruments, not compiler parts: the CUDA emulator (GPU kernels run on this
CPU, cuda_emulator/) and the qemu checks of aarch64 artifacts (qemu.py). Tests, benchmarks
and commands use them; the compiler, the runtime and the stages never import them
(pyproject.toml's import-linter contracts), and editing them rebuilds no artifact (compile's
cache key hashes pipeline/compiler/ only)."""
