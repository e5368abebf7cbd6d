#!/usr/bin/env bash
# The one entry point for every run: one process, several local processes, or one task of a cluster job.
#
#   ./launch.sh experiments.gpt --preset=llama_small                     # one process, all local devices
#   ./launch.sh --num_processes=2 --devices_per_process=4 experiments.gpt --mesh=data:2,fsdp:2,tensor:2
#   srun --ntasks=16 --nodes=2 ./launch.sh experiments.gpt --preset=gpt2  # SLURM: one task per srun rank
#   COORDINATOR_ADDRESS=host0:12355 NUM_PROCESSES=4 PROCESS_ID=$RANK ./launch.sh experiments.gpt   # other clusters
#
# Launcher options come before the module; everything after it goes to the module. The processes of a run find
# each other through COORDINATOR_ADDRESS / NUM_PROCESSES / PROCESS_ID, read by llmjax/distributed.py:
# --num_processes starts them here (coordinator on localhost, a free port); under SLURM they come from SLURM_PROCID,
# SLURM_NTASKS and the first host of SLURM_JOB_NODELIST (port: $COORDINATOR_PORT, default 12355); otherwise the
# caller sets them. --devices_per_process=N gives each process N XLA CPU devices (no effect on GPU/TPU).
# If one local process fails, the others are stopped (they would wait on it in a collective until a timeout).
set -euo pipefail

usage() {
  echo "usage: $0 [--num_processes=N] [--devices_per_process=N] MODULE [module flags...]" >&2
  exit 2
}

num_processes=1
devices_per_process=""
while [[ $# -gt 0 && $1 == --* ]]; do
  case $1 in
    --num_processes=*) num_processes=${1#*=} ;;
    --devices_per_process=*) devices_per_process=${1#*=} ;;
    *) echo "error: unknown launcher option $1 (launcher options go before the module)" >&2; usage ;;
  esac
  shift
done
[[ $# -ge 1 ]] || usage
module=$1
shift
for n in "$num_processes" ${devices_per_process:+"$devices_per_process"}; do
  [[ $n =~ ^[1-9][0-9]*$ ]] || { echo "error: process and device counts must be positive integers, got $n" >&2; exit 2; }
done

cd "$(dirname "$0")"
python=${PYTHON:-python}
if [[ -n $devices_per_process ]]; then
  export XLA_FLAGS="${XLA_FLAGS:-} --xla_force_host_platform_device_count=$devices_per_process"
fi

if [[ -n ${SLURM_PROCID:-} && ${SLURM_NTASKS:-1} -gt 1 && -z ${COORDINATOR_ADDRESS:-} ]]; then
  [[ $num_processes == 1 ]] || { echo "error: under srun the task count comes from SLURM; drop --num_processes" >&2; exit 2; }
  nodelist=${SLURM_STEP_NODELIST:-$SLURM_JOB_NODELIST}
  hosts=$(scontrol show hostnames "$nodelist")  # no pipe into head: its early exit would SIGPIPE scontrol (pipefail)
  COORDINATOR_ADDRESS="${hosts%%$'\n'*}:${COORDINATOR_PORT:-12355}"
  export COORDINATOR_ADDRESS NUM_PROCESSES=$SLURM_NTASKS PROCESS_ID=$SLURM_PROCID
fi

if [[ $num_processes == 1 ]]; then
  exec "$python" -m "$module" "$@"
fi

port=$("$python" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
pids=()
stop_all() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
}
trap 'stop_all; wait; exit 143' TERM INT
for ((rank = 0; rank < num_processes; rank++)); do
  COORDINATOR_ADDRESS=localhost:$port NUM_PROCESSES=$num_processes PROCESS_ID=$rank \
    "$python" -m "$module" "$@" &
  pids+=($!)
done
status=0
for _ in "${pids[@]}"; do
  wait -n || {
    code=$?
    [[ $status != 0 ]] || status=$code  # report the first failure, not the kills that follow it
    stop_all
  }
done
exit $status
