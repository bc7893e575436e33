#!/usr/bin/env bash
# Continue a Snakemake run of this workflow that was killed (SIGKILL, OOM killer, lost node, power cut):
#
#   scripts/rerun_after_kill.sh [the same snakemake arguments as the killed run]
#   e.g. scripts/rerun_after_kill.sh -c2 -d runs/bloomzmms --configfile config/experiments/bloomzmms.yaml
#
# A killed Snakemake leaves its lock (.snakemake/locks) and marks the outputs of the jobs it was running as
# incomplete. This script first makes sure that nothing still runs in the working directory (no other Snakemake,
# no orphaned job): removing the lock of a live run would let two runs write the same files. Then it removes
# the stale lock (`snakemake --unlock`) and runs the same command with `--rerun-incomplete`, which deletes the
# incomplete outputs and reruns their jobs; training jobs resume from their newest intact checkpoint, target
# generation from its partial file. Exit status: that of the rerun; 3 if something still runs there.
set -euo pipefail

SNAKEMAKE=${SNAKEMAKE:-snakemake}
workdir=.
args=("$@")
for ((i = 0; i < ${#args[@]}; i++)); do
  case "${args[i]}" in
    -d | --directory) workdir=${args[i + 1]:-.} ;;
    --directory=*) workdir=${args[i]#--directory=} ;;
  esac
done
if [[ ! -d $workdir ]]; then
  echo "rerun_after_kill: working directory $workdir does not exist" >&2
  exit 2
fi
workdir=$(cd "$workdir" && pwd -P)

# Snakemake or job processes working in the run's directory: a live Snakemake changes into it, and so does every
# job it starts (`speechllm ...`, under bash or accelerate). A shell merely sitting there does not count.
busy=()
for proc in /proc/[0-9]*; do
  pid=${proc#/proc/}
  [[ $pid == "$$" ]] && continue
  cwd=$(readlink "$proc/cwd" 2>/dev/null) || continue
  [[ $cwd == "$workdir" ]] || continue
  command=$(tr '\0' ' ' <"$proc/cmdline" 2>/dev/null) || continue
  [[ $command == *rerun_after_kill* ]] && continue
  if [[ $command == *snakemake* || $command == *speechllm* ]]; then
    busy+=("$pid ${command:0:150}")
  fi
done
if ((${#busy[@]})); then
  echo "rerun_after_kill: processes still run in $workdir; wait for them or stop them first (not unlocking):" >&2
  printf '  %s\n' "${busy[@]}" >&2
  exit 3
fi

"$SNAKEMAKE" --unlock "$@" >/dev/null
exec "$SNAKEMAKE" --rerun-incomplete "$@"
