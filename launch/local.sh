#!/usr/bin/env bash
# N CPU processes on this machine joined by jax.distributed: multi-host code paths without a cluster.
#
#   launch/local.sh [--num_processes=2] [--devices_per_process=1] [--port=12355] [--log_dir=DIR] [--dry-run] \
#       -- --config=configs/demo.py --workdir=workdir/local [--config.key=value ...]
#
# Process i runs `python -m mae_jax.main ARGS --coordinator_address=127.0.0.1:PORT --num_processes=N
# --process_id=i` on the CPU with `devices_per_process` fake devices. Process 0 writes to this terminal, the
# others to LOG_DIR/process_<i>.log. The first process to fail stops the others and the script exits with its
# code; Ctrl-C or SIGTERM to this script sends SIGTERM to all (they save at one step and exit 143).
# DRY_RUN=1 or --dry-run prints the commands instead of running them; PYTHON picks the interpreter.
set -euo pipefail

usage="usage: $0 [--num_processes=N] [--devices_per_process=K] [--port=P] [--log_dir=DIR] [--dry-run] -- MAIN_ARGS"
num_processes=2
devices_per_process=1
port=12355
log_dir=${TMPDIR:-/tmp}/mae_jax_local
dry_run=${DRY_RUN:-0}
while (($#)); do
  case $1 in
    --num_processes=*) num_processes=${1#*=} ;;
    --devices_per_process=*) devices_per_process=${1#*=} ;;
    --port=*) port=${1#*=} ;;
    --log_dir=*) log_dir=${1#*=} ;;
    --dry-run) dry_run=1 ;;
    --) shift; break ;;
    *) echo "$usage" >&2; exit 2 ;;
  esac
  shift
done
if (($# == 0)) || ! [[ $num_processes =~ ^[1-9][0-9]*$ && $devices_per_process =~ ^[1-9][0-9]*$ ]]; then
  echo "$usage" >&2
  exit 2
fi

export JAX_PLATFORMS=cpu XLA_FLAGS="--xla_force_host_platform_device_count=$devices_per_process"
((dry_run)) || mkdir -p "$log_dir"
show() { printf 'JAX_PLATFORMS=%s XLA_FLAGS=%s %q' "$JAX_PLATFORMS" "$XLA_FLAGS" "$1" && printf ' %q' "${@:2}" && echo; }

pids=()
stop() { ((${#pids[@]})) && kill -TERM "${pids[@]}" 2>/dev/null || true; }
trap stop INT TERM
for ((i = 0; i < num_processes; i++)); do
  cmd=("${PYTHON:-python}" -m mae_jax.main "$@"
    --coordinator_address="127.0.0.1:$port" --num_processes="$num_processes" --process_id="$i")
  if ((dry_run)); then
    show "${cmd[@]}"
  elif ((i == 0)); then
    "${cmd[@]}" &
    pids+=($!)
  else
    "${cmd[@]}" >"$log_dir/process_$i.log" 2>&1 &
    pids+=($!)
  fi
done
((dry_run)) && exit 0
((num_processes > 1)) && echo "local.sh: processes 1-$((num_processes - 1)) log to $log_dir/process_<i>.log"

# Poll until every process has ended (portable: no `wait -n`); the first failure stops the rest.
status=0
while ((${#pids[@]})); do
  running=()
  for pid in "${pids[@]}"; do
    if kill -0 "$pid" 2>/dev/null; then
      running+=("$pid")
      continue
    fi
    code=0
    wait "$pid" || code=$?
    if ((code != 0 && status == 0)); then
      status=$code
      stop
    fi
  done
  pids=(${running[@]+"${running[@]}"})
  ((${#pids[@]} == 0)) || sleep 1
done
exit "$status"
