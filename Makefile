# The two commands of the README: `make train` and `make test`. Both create .venv on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
RUN ?= configs/runs/shakespeare.yaml

.PHONY: train test check-python clean

check-python:
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 12))' 2>/dev/null || { \
	  echo "seqmix needs Python >= 3.12, but '$(PYTHON)' is $$($(PYTHON) --version 2>&1)."; \
	  echo "Install one (e.g. 'pyenv install 3.12', which .python-version then selects, or 'uv python install 3.12')"; \
	  echo "and run again, or point make at it: make PYTHON=/path/to/python3.12 ..."; \
	  exit 1; }

$(BIN)/python: | check-python
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

# Stamps re-install when pyproject.toml changes.
$(VENV)/.train-installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e .
	touch $@

$(VENV)/.test-installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $@ $(VENV)/.train-installed

train: $(VENV)/.train-installed
	$(BIN)/seqmix data prepare shakespeare
	$(BIN)/seqmix train $(RUN) --resume

# pytest exits 5 when it collects no tests: make reports that as a failure like any other.
# Three processes, not one: XLA:CPU maps each compiled program's code into its process, and the
# whole suite in one process passes the kernel's limit on memory maps (vm.max_map_count, 65530)
# and crashes inside a late compilation.
TEST_GROUPS = "tests/layers tests/mixers tests/models tests/test_configuration.py tests/test_examples.py" \
	tests/pallas_kernels tests/train
test: $(VENV)/.test-installed
	for group in $(TEST_GROUPS); do $(BIN)/python -m pytest $$group || exit $$?; done

clean:
	rm -rf $(VENV) runs .cache .pytest_cache
