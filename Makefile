# Two commands do everything on a fresh Debian machine: `make demo` and `make test`.
# Set-up: a virtual environment in .venv with the pinned project; espeak-ng, sox and ffmpeg from apt.

VENV ?= .venv
BIN := $(abspath $(VENV))/bin
SYSTEM_TOOLS := espeak-ng sox ffmpeg
CORES ?= 2
export PATH := $(BIN):$(PATH)
export WANDB_MODE ?= offline

.PHONY: demo test setup system-deps lint dryrun-paper clean

demo: setup
	snakemake --cores $(CORES)
	@echo; echo "Result tables:"; ls results/tables/*.md

test: setup
	ruff check src tests benchmarks
	python -m pytest

setup: system-deps $(VENV)/.installed

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

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@

lint: setup
	ruff check src tests benchmarks
	snakemake --lint

dryrun-paper: setup
	snakemake -n --configfile config/experiments/bloomzmms.yaml

clean:
	rm -rf results resources logs .snakemake
