# Two commands do everything on a fresh Debian machine: `make demo` and `make test`.
# Set-up: a virtual environment in .venv with the project at the exact versions of requirements/constraints.txt;
# espeak-ng (the demo's and SpeechGLUE's text-to-speech) from apt where we are root. Nothing is written outside
# this directory unless asked (`make slurm-profile`).

VENV ?= .venv
BIN := $(abspath $(VENV))/bin
ORACLE := $(abspath $(VENV))/oracle
CONSTRAINTS := requirements/constraints.txt
EXTRAS ?= dev,summarization,lora
CORES ?= 2
ESPEAK_NG ?= espeak-ng
export PATH := $(BIN):$(PATH)
export WANDB_MODE ?= offline

.PHONY: demo demo-summarization test setup system-deps demo-deps slurm-profile constraints lint dryrun-paper rulegraph clean

demo: setup demo-deps
	snakemake --cores $(CORES)
	@echo; echo "Result tables:"; ls results/tables/*.md

# Kang & Roy's DAG on the English demo world, in its own working directory (docs/demo.md).
SUMMARIZATION_DIR := runs/demo_summarization
demo-summarization: setup demo-deps
	snakemake --cores $(CORES) -d $(SUMMARIZATION_DIR) --configfile $(CURDIR)/config/demo_summarization.yaml
	@echo; echo "Result tables:"; ls $(SUMMARIZATION_DIR)/results/tables/*.md

test: setup $(ORACLE)/.installed
	ruff check src tests benchmarks
	ruff format --check src tests benchmarks
	PYTHONPATH=$(ORACLE)$${PYTHONPATH:+:$$PYTHONPATH} python -m pytest

setup: system-deps $(VENV)/.installed

# espeak-ng speaks the demo corpus and SpeechGLUE. As root it is installed; otherwise set-up goes on and says
# what is missing (the package itself installs without it; `make demo` stops at demo-deps).
# NIST sclite (Debian package sctk, in /usr/lib/sctk/bin) is the oracle of tests/test_sclite_oracle.py (config
# evaluate.asr_alignment: sclite). As root it is installed; a failure is only a note: that test then skips.
system-deps:
	@if ! command -v $(ESPEAK_NG) >/dev/null 2>&1; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "Installing espeak-ng with apt-get"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq espeak-ng >/dev/null; \
	  else \
	    echo "Note: espeak-ng is not installed; the demo and SpeechGLUE voicing need it" \
	      "(Debian/Ubuntu: sudo apt-get install -y espeak-ng; conda: conda install -c conda-forge espeak-ng)."; \
	  fi; \
	fi
	@if ! command -v sclite >/dev/null 2>&1 && [ ! -x /usr/lib/sctk/bin/sclite ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "Installing sctk (sclite) with apt-get"; \
	    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq sctk >/dev/null; } \
	      || echo "Note: apt-get could not install sctk; tests/test_sclite_oracle.py will skip"; \
	  else \
	    echo "Note: sclite is not installed; tests/test_sclite_oracle.py skips (Debian/Ubuntu: apt-get install sctk)"; \
	  fi; \
	fi

demo-deps:
	@command -v $(ESPEAK_NG) >/dev/null 2>&1 || { echo "make demo needs espeak-ng on PATH" \
	  "(Debian/Ubuntu: sudo apt-get install -y espeak-ng; conda: conda install -c conda-forge espeak-ng)."; exit 1; }

# Optional: `snakemake --profile slurm` looks for ./slurm, ~/.config/snakemake/slurm and /etc/xdg/snakemake/slurm;
# this links the user's entry to profiles/slurm (a profile of that name that is not a link is left alone).
# Without it: `snakemake --profile profiles/slurm`.
SNAKEMAKE_USER_PROFILES ?= $(or $(XDG_CONFIG_HOME),$(HOME)/.config)/snakemake
slurm-profile:
	@link="$(SNAKEMAKE_USER_PROFILES)/slurm"; \
	if [ -e "$$link" ] && [ ! -L "$$link" ]; then \
	  echo "$$link exists and is not a link; use: snakemake --profile profiles/slurm"; \
	else \
	  mkdir -p "$(SNAKEMAKE_USER_PROFILES)" && ln -sfn "$(CURDIR)/profiles/slurm" "$$link"; \
	fi

$(VENV)/.installed: pyproject.toml $(CONSTRAINTS)
	python3 -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -c $(CONSTRAINTS) -e '.[$(EXTRAS)]'
	touch $@

# After a deliberate upgrade of the environment: record its exact versions for everyone's `make`.
constraints: $(VENV)/.installed
	{ sed -n '1,2p' $(CONSTRAINTS); $(BIN)/pip freeze --exclude-editable | grep -iv '^speechllm'; } > $(CONSTRAINTS).tmp
	mv $(CONSTRAINTS).tmp $(CONSTRAINTS)

# Test-only reference implementations (see tests/oracle-requirements.txt), outside the venv's site-packages.
$(ORACLE)/.installed: tests/oracle-requirements.txt $(VENV)/.installed
	rm -rf $(ORACLE)
	$(BIN)/pip install --quiet --no-deps --target $(ORACLE) -r tests/oracle-requirements.txt
	touch $@

lint: setup
	ruff check src tests benchmarks
	ruff format --check src tests benchmarks
	snakemake --lint

dryrun-paper: setup
	snakemake -n --configfile config/experiments/bloomzmms.yaml

# The rule graphs of both paper-scale DAGs (docs/rulegraph-*.svg); needs graphviz's `dot` (apt-get install graphviz).
RULEGRAPH_DIR := $(shell mktemp -u /tmp/speechllm-rulegraph.XXXXXX)
rulegraph: setup
	@command -v dot >/dev/null || { echo "make rulegraph needs graphviz's dot: apt-get install graphviz"; exit 1; }
	for experiment in bloomzmms speech_summarization; do \
	  snakemake --rulegraph -d $(RULEGRAPH_DIR)/$$experiment --configfile config/experiments/$$experiment.yaml \
	    | dot -Tsvg > docs/rulegraph-$$experiment.svg.tmp && mv docs/rulegraph-$$experiment.svg.tmp docs/rulegraph-$$experiment.svg \
	    || exit 1; \
	done; rm -rf $(RULEGRAPH_DIR)

clean:
	rm -rf results resources logs .snakemake runs
