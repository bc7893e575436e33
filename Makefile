# Two commands do everything on a fresh Debian machine: `make demo` and `make test`.
# Set-up: a virtual environment in .venv with the pinned project; espeak-ng, sox and ffmpeg from apt.

VENV ?= .venv
BIN := $(abspath $(VENV))/bin
ORACLE := $(abspath $(VENV))/oracle
SYSTEM_TOOLS := espeak-ng sox ffmpeg
CORES ?= 2
export PATH := $(BIN):$(PATH)
export WANDB_MODE ?= offline

.PHONY: demo demo-summarization test setup system-deps slurm-profile lint dryrun-paper clean

demo: setup
	snakemake --cores $(CORES)
	@echo; echo "Result tables:"; ls results/tables/*.md

# Kang & Roy's DAG on the English demo world, in its own working directory (README, "What the demo shows").
SUMMARIZATION_DIR := runs/demo_summarization
demo-summarization: setup
	snakemake --cores $(CORES) -d $(SUMMARIZATION_DIR) --configfile $(CURDIR)/config/demo_summarization.yaml
	@echo; echo "Result tables:"; ls $(SUMMARIZATION_DIR)/results/tables/*.md

test: setup $(ORACLE)/.installed
	ruff check src tests benchmarks
	PYTHONPATH=$(ORACLE)$${PYTHONPATH:+:$$PYTHONPATH} python -m pytest

setup: system-deps $(VENV)/.installed slurm-profile

system-deps:
	@missing=""; for tool in $(SYSTEM_TOOLS); do command -v $$tool >/dev/null 2>&1 || missing="$$missing $$tool"; done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ]; then \
	    echo "Installing$$missing with apt-get"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq$$missing >/dev/null; \
	  else \
	    echo "Missing system tools:$$missing. Run: sudo apt-get install -y$$missing"; exit 1; \
	  fi; \
	fi

# `snakemake --profile slurm` looks for ./slurm, ~/.config/snakemake/slurm and /etc/xdg/snakemake/slurm: link the
# user's entry to workflow/profiles/slurm (a profile of that name that is not a link is left alone).
SNAKEMAKE_USER_PROFILES ?= $(or $(XDG_CONFIG_HOME),$(HOME)/.config)/snakemake
slurm-profile:
	@link="$(SNAKEMAKE_USER_PROFILES)/slurm"; \
	if [ -e "$$link" ] && [ ! -L "$$link" ]; then \
	  echo "$$link exists and is not a link; use: snakemake --profile workflow/profiles/slurm"; \
	else \
	  mkdir -p "$(SNAKEMAKE_USER_PROFILES)" && ln -sfn "$(CURDIR)/workflow/profiles/slurm" "$$link"; \
	fi

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@

# Test-only reference implementations (see tests/oracle-requirements.txt), outside the venv's site-packages.
$(ORACLE)/.installed: tests/oracle-requirements.txt $(VENV)/.installed
	rm -rf $(ORACLE)
	$(BIN)/pip install --quiet --no-deps --target $(ORACLE) -r tests/oracle-requirements.txt
	touch $@

lint: setup
	ruff check src tests benchmarks
	snakemake --lint

dryrun-paper: setup
	snakemake -n --configfile config/experiments/bloomzmms.yaml

clean:
	rm -rf results resources logs .snakemake runs
