# Both entry points create or refresh .venv from pyproject.toml first, at the versions pinned in
# constraints.txt (the ones CI passed on; CONSTRAINTS= installs the newest releases pyproject.toml allows);
# a stamp file makes the second call install nothing.
PYTHON ?= python3
VENV   ?= .venv
STAMP  := $(VENV)/.installed
MODEL  ?= mobilenet
ARGS   ?=
NPROC  ?= 1
CONSTRAINTS ?= constraints.txt
# pytest-xdist workers for make test (auto: one per core); each test file runs whole on one worker
TEST_WORKERS ?= auto

.PHONY: pipeline compare sweep test smoke venv clean

$(STAMP): pyproject.toml $(CONSTRAINTS)
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --quiet --upgrade pip
	$(VENV)/bin/python -m pip install --quiet $(if $(CONSTRAINTS),-c $(CONSTRAINTS)) -e '.[test]'
	touch $(STAMP)

venv: $(STAMP)

pipeline: $(STAMP)
	@test -f pipelines/$(MODEL).yaml || { echo "no recipe pipelines/$(MODEL).yaml; recipes: $$(ls pipelines | sed 's/\.yaml//' | tr '\n' ' ')" >&2; exit 2; }
	@case "$(NPROC)" in ''|*[!0-9]*|0) echo "NPROC must be a whole number of processes, 1 or more (got '$(NPROC)')" >&2; exit 2;; esac
	$(if $(filter-out 1,$(NPROC)),@$(VENV)/bin/compress -q pipeline pipelines/$(MODEL).yaml $(ARGS) --check --processes $(NPROC) >/dev/null)
	$(if $(filter-out 1,$(NPROC)),$(VENV)/bin/torchrun --standalone --nproc_per_node=$(NPROC) -m compress,$(VENV)/bin/compress) pipeline pipelines/$(MODEL).yaml $(ARGS)

compare: $(STAMP)
	$(VENV)/bin/compress compare pipelines/methods.yaml --artifacts $(or $(ARTIFACTS),artifacts) $(ARGS)

sweep: $(STAMP)
	$(VENV)/bin/compress sweep pipelines/sweep.yaml --artifacts $(or $(ARTIFACTS),artifacts) $(ARGS)

test: $(STAMP)
	$(VENV)/bin/lint-imports
	$(VENV)/bin/python -m pytest -n $(TEST_WORKERS) --dist loadfile

smoke: $(STAMP)
	$(VENV)/bin/compress pipeline pipelines/smoke.yaml --artifacts $(or $(ARTIFACTS),artifacts) $(ARGS)

clean:
	rm -rf artifacts/*/ artifacts/.cache
