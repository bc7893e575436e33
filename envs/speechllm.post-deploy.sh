#!/usr/bin/env bash
# Run by `snakemake --sdm conda` inside the new environment, once, after it is created. The Snakefile exports
# SPEECHLLM_REPO (its own directory); the package is installed from there at the tested versions.
set -euo pipefail
repo="${SPEECHLLM_REPO:?SPEECHLLM_REPO is not set: run it through the Snakefile of speechllm}"
python -m pip install --quiet -c "$repo/requirements/constraints.txt" -e "$repo[summarization]"
