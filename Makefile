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

# Stamps re-install when pyproject.toml changes. For the tests pip does not byte-compile what it
# installs (38 of the 64 s the test extra took here, every file of every package); the suite's
# processes write the bytecode of what they import instead, into .cache/pycache (below).
$(VENV)/.train-installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e .
	touch $@

$(VENV)/.test-installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet --no-compile -e '.[test]'
	touch $@ $(VENV)/.train-installed

train: $(VENV)/.train-installed
	$(BIN)/seqmix data prepare shakespeare
	$(BIN)/seqmix train $(RUN) --resume

# pytest exits 5 when it collects no tests: make reports that as a failure like any other.
# Three processes, side by side, so that both cores of a small machine stay busy (compiling is
# mostly single-threaded); each drops its compiled programs after every test module
# (tests/conftest.py), which keeps it under the kernel's limit on memory maps (vm.max_map_count).
# Each writes its own log, printed in order when all have finished, and the first failing group's
# status is make's. The groups and the CLI runs they start keep the bytecode of their imports in
# .cache/pycache, even where PYTHONDONTWRITEBYTECODE is set (as on the VM these were timed on):
# importing from source cost a test process 9 s of CPU instead of 3.
# Each group is "<devices>:<pytest arguments>", balanced by measured time (per module, from the
# groups' times on a fresh clone): the mixer harness and some models' tests; the kernels, the other
# models' tests and the tests that build meshes (the `eight_devices` modules, on 8 fake devices);
# the trainer's and the linearization tests, whose runs train on one device as on a machine with
# one (tests/conftest.py).
MESH_TESTS = tests/train/test_loss.py tests/train/test_sharding.py tests/train/test_activation_sharding.py \
	tests/train/test_checkpoint.py tests/train/test_compile_only.py
MODEL_TESTS_IN_GROUP_1 = tests/models/test_students.py tests/models/test_lm.py tests/models/test_attention.py \
	tests/models/test_seqmix_format.py
MODEL_TESTS_IN_GROUP_3 = tests/models/test_linearize.py tests/models/test_hf.py
TEST_GROUPS = "1:tests/layers tests/mixers tests/integrations tests/test_configuration.py tests/test_examples.py $(MODEL_TESTS_IN_GROUP_1)" \
	"8:tests/pallas_kernels tests/models $(addprefix --ignore=,$(MODEL_TESTS_IN_GROUP_1) $(MODEL_TESTS_IN_GROUP_3)) $(MESH_TESTS)" \
	"1:tests/train $(MODEL_TESTS_IN_GROUP_3) $(addprefix --ignore=,$(MESH_TESTS))"
TEST_LOGS := .test-logs
test: $(VENV)/.test-installed
	@rm -rf $(TEST_LOGS) && mkdir -p $(TEST_LOGS); \
	echo "running the test groups side by side (logs in $(TEST_LOGS)/)"; \
	group_index=0; for group in $(TEST_GROUPS); do group_index=$$((group_index + 1)); \
	  ( SEQMIX_TEST_DEVICES=$${group%%:*} PYTHONDONTWRITEBYTECODE= PYTHONPYCACHEPREFIX=$(CURDIR)/.cache/pycache \
	    $(BIN)/python -m pytest $${group#*:} > $(TEST_LOGS)/$$group_index.log 2>&1; \
	    echo $$? > $(TEST_LOGS)/$$group_index.status ) & \
	done; wait; status=0; \
	for log in $(TEST_LOGS)/*.log; do cat $$log; group_status=$$(cat $${log%.log}.status); \
	  if [ $$status -eq 0 ] && [ $$group_status -ne 0 ]; then status=$$group_status; fi; done; \
	exit $$status

clean:
	rm -rf $(VENV) runs .cache .pytest_cache $(TEST_LOGS)
