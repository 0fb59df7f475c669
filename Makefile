# Two commands on a fresh machine: `make demo` and `make test`. Both install first.
SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
PIPELINE := $(VENV)/bin/pipeline
STAMP := $(VENV)/.installed
TARGET ?= x86
ARGS ?=
# The demo's model: the committed ConvNeXt-micro trained on Fashion-MNIST (models/*.json has its
# record), evaluated on all 10 000 test images; small enough that an untuned CPU build stays quick.
# MODEL_ARGS go to every model command; the measuring options only to those that measure (bench,
# report, run, reports), since the others take no measuring options. MEASURE_ARGS come after
# MEASURE_DEFAULTS and the last of a repeated option wins: MEASURE_ARGS="--repeats 20" keeps the
# whole test set (a report of other settings than the committed one goes beside it:
# reports/committed.py; --replace-report replaces it).
MODEL_ARGS ?= --variant micro --weights models/convnext-micro-fmnist.pth --num-classes 10 --in-chans 1 \
	--input-size 32 --data fashion-mnist --preprocessing fashion-mnist
MEASURE_DEFAULTS := --eval-limit 0 --repeats 100
MEASURE_ARGS ?=
MEASURE := $(MEASURE_DEFAULTS) $(MEASURE_ARGS)

.PHONY: install system-deps demo test tune compile compile-matrix bench report reports run package gpu-bundle check-cuda-kernels arm-runtime verify-arm reports-emulated clean

install: $(STAMP)

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))' || \
		{ echo "error: Python 3.11 is required (found $$($(PYTHON) --version)); set PYTHON=/path/to/python3.11" >&2; exit 2; }
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e .
	$(MAKE) --no-print-directory system-deps
	touch $(STAMP)

# Debian packages the pipeline reads or runs: the Fashion-MNIST data set.
system-deps:
	@bash scripts/system-deps.sh

# The whole pipeline on this CPU, FP32 and INT8, then every report gathered into reports/README.md.
demo: reports

# The layer contracts first (pyproject.toml, [tool.importlinter]), then the test suite.
test: install
	$(VENV)/bin/lint-imports --no-cache
	$(PY) -m pytest -q $(ARGS)

# MetaSchedule tuning of the MODEL_ARGS model, the one `make compile` and `make demo` build: its
# records land in artifacts/tune/<target>/<model>/ and compile applies them (it says how many
# kernels came from records). Another model: override MODEL_ARGS here and for compile alike.
# TUNE_ARGS are tune's own options; a run stops at its --time-budget (minutes) and --resume continues.
TUNE_ARGS ?= --time-budget 30
tune: install
	$(PIPELINE) tune --target $(TARGET) $(MODEL_ARGS) $(TUNE_ARGS) $(ARGS)

compile: install
	$(PIPELINE) compile --target $(TARGET) $(MODEL_ARGS) $(ARGS)

# The nightly check (.github/workflows/nightly.yml): ConvNeXt-Tiny compiled for every target in FP32,
# INT8 and each target's other precisions, into reports/compile-matrix/ (matrix.json, README.md);
# exits 1 if a cell a target offers failed. E.g. MATRIX_ARGS="--targets x86,arm-a72" (after the
# defaults, which it overrides one by one): a matrix of other settings than the committed one is
# written beside it, in reports/compile-matrix/<what differs>/ (--replace-report replaces it).
MATRIX_DEFAULTS := --variant tiny --input-size 224
MATRIX_ARGS ?=
compile-matrix: install
	$(PIPELINE) compile-matrix $(MATRIX_DEFAULTS) $(MATRIX_ARGS) $(ARGS)

# The target's bench stage, then (on x86) the speed-goal benchmarks: PyTorch vs ONNX Runtime vs
# TVM on ConvNeXt-T, -S and -B at batch 1 and 8, with the default schedules and (where any match)
# with the committed tuning records (tuning/x86/); and the
# INT8 artifact against the FP32 one (speed, size, agreement) on ConvNeXt-T at batch 1.
# BENCH_ARGS and INT8_BENCH_ARGS override the defaults one option at a time; a run of other
# settings than the committed reports/benchmarks/*.json is written beside them, in
# reports/benchmarks/<what differs>/ (--replace-report replaces them).
BENCH_DEFAULTS := --variants tiny,small,base --batches 1,8 --repeats 10
BENCH_ARGS ?=
INT8_BENCH_DEFAULTS := --variant tiny --batches 1 --repeats 20
INT8_BENCH_ARGS ?=
bench: install
	$(PIPELINE) bench --target $(TARGET) $(MODEL_ARGS) $(MEASURE) $(ARGS)
	if [ "$(TARGET)" = x86 ]; then \
		$(PY) benchmarks/cpu_latency.py $(BENCH_DEFAULTS) $(BENCH_ARGS) --json reports/benchmarks/cpu_latency.json && \
		$(PY) benchmarks/int8_speed.py $(INT8_BENCH_DEFAULTS) $(INT8_BENCH_ARGS) --json reports/benchmarks/int8_speed.json; fi

report: install
	$(PIPELINE) report --target $(TARGET) $(MODEL_ARGS) $(MEASURE) $(ARGS)

run: install
	$(PIPELINE) run --target $(TARGET) $(MODEL_ARGS) $(MEASURE) $(ARGS)

# A device bundle in dist/: artifact, metadata, weights, README, manifest and run.py (TVM runtime +
# NumPy only).
package: install
	$(PIPELINE) package --target $(TARGET) $(MODEL_ARGS) $(ARGS)

# The one-call GPU check, packed (benchmarks/gpu_bundle.py): ConvNeXt-T artifacts for cuda-sm90
# (fp32 b1, fp16 b1 and b8; GPU targets offer no int8) and the MODEL_ARGS model's (the demo's: fp32
# and fp16 b1, from its checkpoint, carried and checked by sha256, with its 10 000 labeled test
# images), the TVM runtime without its compiler and benchmarks/gpu_check.py, in dist/gpu-bundle/
# (at most 60 MiB). On the GPU machine: `bash dist/gpu-bundle/run.sh --out OUT [--pack]`, then copy
# OUT/reports/* into reports/: cuda-sm90*/ are ConvNeXt-T's rows, cuda-sm90-demo*/ the demo table's.
GPU_BUNDLE_ARGS ?= --variant tiny --input-size 224 --target cuda-sm90
gpu-bundle: install
	$(PY) benchmarks/gpu_bundle.py $(GPU_BUNDLE_ARGS) --demo-args "$(MODEL_ARGS)" --output dist/gpu-bundle $(ARGS)

# The cached aarch64 TVM runtime and runner that check ARM artifacts under qemu.
# Every GPU kernel of the bundle's configurations run on this CPU by the CUDA emulator and
# compared with its CPU build (benchmarks/cuda_emulation.py): reports/cuda-emulation/<target>.md.
check-cuda-kernels: install
	$(PY) benchmarks/cuda_emulation.py $(ARGS)

arm-runtime: install
	$(PY) -m pipeline.cli.cross runtime

# The MODEL_ARGS model compiled for an aarch64 CPU TARGET (arm-*, jetson-*-cpu) and for x86, the
# first run under qemu and compared with the second; any other TARGET is refused.
verify-arm: install
	$(PY) -m pipeline.cli.cross verify --target $(TARGET) $(MODEL_ARGS) $(ARGS)

# Re-measure the CPU rows (FP32 and INT8 on x86), then rebuild reports/README.md (one table per
# model, plots, history.jsonl, regression flags) from every reports/*/ folder, measured here or not.
reports: install
	$(PIPELINE) run --target x86 $(MODEL_ARGS) $(MEASURE) $(ARGS)
	$(PIPELINE) run --target x86 --precision int8 --calib-method percentile $(MODEL_ARGS) $(MEASURE) $(ARGS)
	$(PIPELINE) reports --reports-dir reports

# Accuracy of every aarch64 CPU target (arm-*, jetson-*-cpu), FP32 and INT8, with the board's own
# binary run under qemu-aarch64 here over the whole evaluation set (pipeline report --emulate): its
# outputs are the board's; its latency is not measured (that needs the board, over RPC). Then
# reports/README.md is rebuilt. Slow: about 20 ms per image under qemu, some 3-5 minutes a cell, but
# the SVE targets (jetson-thor-cpu, arm-neoverse-v1) far more (qemu 7.2: FP32 at about 2 images/s);
# INT8 first, the precision a board's choice most depends on.
reports-emulated: install
	targets="$$($(PY) -c 'from pipeline.runtime.cross import emulated_targets; print(*emulated_targets())')" && \
	for target in $$targets; do \
		$(PIPELINE) report --emulate --target $$target --precision int8 --calib-method percentile \
			$(MODEL_ARGS) $(MEASURE) $(ARGS) || exit 1; \
	done && \
	for target in $$targets; do \
		$(PIPELINE) report --emulate --target $$target $(MODEL_ARGS) $(MEASURE) $(ARGS) || exit 1; \
	done
	$(PIPELINE) reports --reports-dir reports

clean:
	rm -rf artifacts .pytest_cache
