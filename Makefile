# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test install clean bench-rehearsal

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[train,pretrained,serve,monitor,opcua,ood,dev]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/crystalscope demo --out demo

test: $(STAMP)
	$(BIN)/python -m pytest -q tests

# the GPU benchmark script rehearsed on the CPU (tiny set, resnet18 32 px, 2 epochs; about a minute):
# keeps benchmarks/gpu_bench.sh runnable for the first session that has a GPU
bench-rehearsal: $(STAMP)
	rm -rf /tmp/crystalscope-rehearsal
	DEVICE=cpu PER_CLASS=24 IMAGE_SIZE=32 BACKBONE=resnet18 EPOCHS=2 BATCH=16 COMPILE_MODES= \
	  WORK=/tmp/crystalscope-rehearsal/work OUT=/tmp/crystalscope-rehearsal/out DEPS= PY=$(BIN)/python \
	  bash benchmarks/gpu_bench.sh
	test -s /tmp/crystalscope-rehearsal/out/gpu_table.md && test -s /tmp/crystalscope-rehearsal/out/gpu_results.json

clean:
	rm -rf demo runs .pytest_cache
