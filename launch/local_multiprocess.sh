#!/usr/bin/env bash
# Run one multi-process jaxrec training on this machine: NUM_PROCESSES copies of
# `python -m experiments.train`, connected through a coordinator on localhost —
# the same multi-controller program a TPU pod or a SLURM job runs, on one box.
#
#   bash launch/local_multiprocess.sh --config.mesh=data:2,tensor:2 \
#       --config.train.steps=20 --workdir=/tmp/lmp
#
# Every argument is passed on to experiments.train (the mesh spans all processes'
# devices: 2 processes x 2 devices = a 4-device mesh). Waits for all processes;
# when one fails the others are stopped and the script exits non-zero.
#
# Variables:
#   NUM_PROCESSES     processes to start (default 2)
#   CPU_DEVICES       faked CPU devices per process (default 2); 0 = use the real
#                     devices (e.g. GPUs, with GPUS_PER_PROCESS)
#   GPUS_PER_PROCESS  with CPU_DEVICES=0: process i sees GPUs i*G .. i*G+G-1
#                     (CUDA_VISIBLE_DEVICES); unset = every process sees all
#   COORDINATOR_HOST  coordinator host (default 127.0.0.1)
#   PORT              coordinator port (default: a free port picked with python)
#   PYTHON            interpreter (default: python)
#   LOG_DIR           if set, process i writes LOG_DIR/process_<i>.log instead of
#                     the terminal (only process 0 logs at INFO either way)
#   DRY_RUN=1         only print the commands
set -euo pipefail

NUM_PROCESSES="${NUM_PROCESSES:-2}"
CPU_DEVICES="${CPU_DEVICES:-2}"
GPUS_PER_PROCESS="${GPUS_PER_PROCESS:-}"
COORDINATOR_HOST="${COORDINATOR_HOST:-127.0.0.1}"
PYTHON="${PYTHON:-python}"
LOG_DIR="${LOG_DIR:-}"
DRY_RUN="${DRY_RUN:-0}"

cd "$(dirname "${BASH_SOURCE[0]}")/.."

if [[ -z "${PORT:-}" ]]; then
  PORT="$("$PYTHON" -c 'import socket
s = socket.socket()
s.bind(("127.0.0.1", 0))
print(s.getsockname()[1])')"
fi
if ! [[ "$NUM_PROCESSES" =~ ^[1-9][0-9]*$ ]]; then
  echo "NUM_PROCESSES must be a positive integer, got '$NUM_PROCESSES'" >&2
  exit 2
fi
if [[ -n "$LOG_DIR" && "$DRY_RUN" != 1 ]]; then
  mkdir -p "$LOG_DIR"
fi

pids=()
stop_all() {
  local pid
  for pid in ${pids[@]+"${pids[@]}"}; do
    if [[ -n "$pid" ]]; then
      kill "$pid" 2>/dev/null || true
    fi
  done
}
trap 'stop_all; exit 130' INT
trap 'stop_all; exit 143' TERM

for ((i = 0; i < NUM_PROCESSES; i++)); do
  cmd=("$PYTHON" -m experiments.train "--cpu_devices=$CPU_DEVICES"
       "--coordinator_address=$COORDINATOR_HOST:$PORT" "--num_processes=$NUM_PROCESSES"
       "--process_id=$i" "$@")
  env_prefix=()
  if [[ "$CPU_DEVICES" == 0 && -n "$GPUS_PER_PROCESS" ]]; then
    gpus="$(seq -s, $((i * GPUS_PER_PROCESS)) $((i * GPUS_PER_PROCESS + GPUS_PER_PROCESS - 1)))"
    env_prefix=(env "CUDA_VISIBLE_DEVICES=$gpus")
  fi
  full=(${env_prefix[@]+"${env_prefix[@]}"} "${cmd[@]}")
  if [[ "$DRY_RUN" == 1 ]]; then
    printf '%q ' "${full[@]}"
    if [[ -n "$LOG_DIR" ]]; then
      printf '> %q 2>&1 ' "$LOG_DIR/process_$i.log"
    fi
    printf '&\n'
    continue
  fi
  if [[ -n "$LOG_DIR" ]]; then
    "${full[@]}" >"$LOG_DIR/process_$i.log" 2>&1 &
  else
    "${full[@]}" &
  fi
  pids+=("$!")
done
if [[ "$DRY_RUN" == 1 ]]; then
  echo wait
  exit 0
fi

echo "started $NUM_PROCESSES processes (coordinator $COORDINATOR_HOST:$PORT): ${pids[*]}" >&2
status=0
running="$NUM_PROCESSES"
while ((running > 0)); do
  running=0
  for i in "${!pids[@]}"; do
    pid="${pids[$i]}"
    if [[ -z "$pid" ]]; then
      continue
    fi
    if kill -0 "$pid" 2>/dev/null; then
      running=$((running + 1))
      continue
    fi
    rc=0
    wait "$pid" || rc=$?
    pids[i]=""
    if ((rc != 0)); then
      echo "process $i (pid $pid) exited with status $rc; stopping the others" >&2
      if [[ -n "$LOG_DIR" ]]; then
        tail -n 30 "$LOG_DIR/process_$i.log" >&2 || true
      fi
      if ((status == 0)); then
        status="$rc"
      fi
    fi
  done
  if ((status != 0)); then
    stop_all
    wait || true
    break
  fi
  if ((running > 0)); then
    sleep 1
  fi
done
exit "$status"
