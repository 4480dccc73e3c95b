#!/usr/bin/env bash
# Adds N generators to a running Tandem run (one started by tandem.sbatch, or any run
# whose folder holds coordinator.json) as a separate Slurm job. The generators join
# through the coordinator, fetch the current weights and work until the run finishes;
# the job then ends on its own.
#
#   add-generators.sh RUN_DIR N [sbatch options...]
#
# e.g. add-generators.sh /shared/runs/grpo-1 16 --nodes=2 --ntasks-per-node=8 --gpus-per-node=8
#
# Prints the new job's id. The job's output goes to RUN_DIR/logs/add-generators-JOBID.out,
# each generator's log to RUN_DIR/logs/generator-JOBID-TASK.log.
#
# The coordinator's address is read from RUN_DIR/coordinator.json when the job starts; the
# generators' token from TANDEM_GENERATOR_TOKEN, else RUN_DIR/generator-token (so that file
# must be readable by the user); they never get the run's token.
#
# Settings (environment): TANDEM_BIN (default `tandem` on PATH), TANDEM_GPUS_PER_TASK
# (default 1; 0 = no GPU request), TANDEM_CPUS_PER_TASK, TANDEM_LOG and TANDEM_TLS_*
# (passed on as they are).
set -euo pipefail

die() { echo "add-generators: $*" >&2; exit 1; }

[[ $# -ge 2 ]] || die "usage: add-generators.sh RUN_DIR N [sbatch options...]"
run_dir=$1
n=$2
shift 2
[[ $n =~ ^[1-9][0-9]*$ ]] || die "N must be a positive number, not '$n'"
[[ -d $run_dir ]] || die "$run_dir is not a folder"
run_dir=$(realpath "$run_dir")
[[ -s $run_dir/coordinator.json ]] ||
    die "$run_dir/coordinator.json is missing: is the run (its coordinator) running?"
[[ -n ${TANDEM_GENERATOR_TOKEN:-} || -r $run_dir/generator-token ]] ||
    die "no generator token: set TANDEM_GENERATOR_TOKEN or make $run_dir/generator-token readable"
command -v sbatch >/dev/null || die "sbatch not found"

gpus=${TANDEM_GPUS_PER_TASK:-1}
opts=(--job-name=tandem-generators --ntasks="$n" --chdir="$run_dir"
    --output="$run_dir/logs/add-generators-%j.out")
[[ $gpus -gt 0 ]] && opts+=(--gpus-per-task="$gpus")
[[ -n ${TANDEM_CPUS_PER_TASK:-} ]] && opts+=(--cpus-per-task="$TANDEM_CPUS_PER_TASK")
mkdir -p "$run_dir/logs"

bin=${TANDEM_BIN:-tandem}
[[ $bin == */* ]] && bin=$(realpath "$bin")

# The job script: the run folder and the executable fixed here (so it works even with
# --export=NONE), the rest expanded on the job's node when it starts.
# shellcheck disable=SC2016
script="#!/bin/bash
run_dir=$(printf %q "$run_dir")
TANDEM_BIN=$(printf %q "$bin")
"'set -uo pipefail
if [[ ! -e $run_dir/coordinator.json ]]; then
    # tandem.sbatch removes it when its run ends: nothing left to join.
    echo "add-generators: $run_dir/coordinator.json is gone: the run is over" >&2
    exit 0
fi
addr=$(sed -n "s/.*\"grpc\":\"\([^\"]*\)\".*/\1/p" "$run_dir/coordinator.json")
if [[ -z $addr ]]; then
    echo "add-generators: no coordinator address in $run_dir/coordinator.json" >&2
    exit 1
fi
# Generators hold only the generator token.
if [[ -n ${TANDEM_GENERATOR_TOKEN:-} ]]; then
    TANDEM_TOKEN=$TANDEM_GENERATOR_TOKEN
else
    TANDEM_TOKEN=$(<"$run_dir/generator-token") || exit 1
fi
unset TANDEM_GENERATOR_TOKEN
export TANDEM_TOKEN TANDEM_BIN addr
echo "add-generators: $SLURM_NTASKS generator(s) joining $addr" >&2
# srun (22.05+) does not inherit the job'\''s --cpus-per-task.
cpus=()
[[ -n ${SLURM_CPUS_PER_TASK:-} ]] && cpus=(--cpus-per-task="$SLURM_CPUS_PER_TASK")
srun --kill-on-bad-exit=0 "${cpus[@]}" --output="$run_dir/logs/generator-%j-%t.log" \
    bash -c '\''exec "$TANDEM_BIN" generator --coordinator "$addr" --name "gen-$SLURM_JOB_ID-$SLURM_PROCID"'\''
'

job=$(sbatch --parsable "${opts[@]}" "$@" <<<"$script") ||
    die "sbatch failed"
job=${job%%;*}
echo "add-generators: job $job adds $n generator(s) to $run_dir" >&2
echo "$job"
