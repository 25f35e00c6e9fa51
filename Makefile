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

# Before anything runs, a bad MODEL, NPROC or recipe is one line from make (exit code 2): the recipe is
# checked for NPROC processes before torchrun starts its workers (whose failures would print pages).
pipeline_check = $(strip \
  $(if $(wildcard pipelines/$(MODEL).yaml),,no recipe pipelines/$(MODEL).yaml; recipes: $(basename $(notdir $(wildcard pipelines/*.yaml)))) \
  $(if $(shell case "$(NPROC)" in (''|*[!0-9]*|0) echo bad;; esac),NPROC must be a whole number of processes$(comma) 1 or more (got '$(NPROC)')))
comma := ,
nproc_check = $(shell out=$$($(VENV)/bin/compress -q pipeline pipelines/$(MODEL).yaml $(ARGS) --check --processes $(NPROC) 2>&1 >/dev/null) || printf '%s' "$$out" | tail -n 1)

pipeline: $(STAMP)
	$(if $(pipeline_check),$(error $(pipeline_check)))
	$(if $(filter-out 1,$(NPROC)),$(if $(nproc_check),$(error $(nproc_check))))
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
