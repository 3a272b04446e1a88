#!/usr/bin/env bash
# Pretrain on a Cloud TPU VM, one host or a pod slice: create the VM or reuse it, install this checkout on every
# worker, run the same command on all of them, and after a preemption recreate the VM and run it again; the
# run resumes from the newest checkpoint in the gs:// workdir.
#
#   launch/tpu_vm.sh --name=mae-l16 --zone=us-central2-b --accelerator=v4-64 --workdir=gs://BUCKET/mae_l16 \
#       --data_dir=gs://BUCKET/tensorflow_datasets [--version=tpu-ubuntu2204-base] [--project=P] [--spot] \
#       [--max_restarts=100] [--max_retries=5] [--dry-run] -- --config=configs/vit_large.py [--config.key=value ...]
#
# Every worker runs `python -m mae_jax.main MAIN_ARGS --workdir=WORKDIR --config.dataset.data_dir=DATA_DIR`;
# `jax.distributed.initialize()` finds the other workers by itself on TPU VMs. The tracked files of this
# checkout (with uncommitted edits) are copied to ~/mae_jax on each worker and installed with Python 3.11 and
# jax[tpu]. Outcomes of a run, read from worker 0's exit status:
#   0                    done.
#   143, or none at all  stopped: JAX's preemption notice made it save and exit, or the VM or the ssh session
#                        went away. A PREEMPTED or TERMINATED VM is deleted and recreated, a STOPPED one
#                        started; then the run is started again (at most --max_restarts times).
#   anything else        an error in the run (its message is above): the script stops with that status.
# gcloud's answers are told apart: NOT_FOUND means there is no VM; any other failure of `describe` is an error,
# never taken for "no VM". A `create` refused for capacity (spot or on-demand stock-out) is tried again without
# limit; other failed calls (describe, create, start, delete, the install) are tried again up to --max_retries
# times in a row. Each try again is logged with gcloud's error and waits TPU_VM_RETRY_DELAY seconds (30),
# doubling per failure up to TPU_VM_MAX_RETRY_DELAY (600); the count and the wait start again with each run.
# DRY_RUN=1 or --dry-run prints the gcloud commands of a first start instead of running them. The run lives in
# the script's ssh sessions: start the script where it can outlive the run (tmux on a small VM).
set -euo pipefail

usage="usage: $0 --name=NAME --zone=ZONE --accelerator=TYPE --workdir=gs://... [--data_dir=DIR] [--version=V]"
usage+=" [--project=P] [--spot] [--max_restarts=N] [--max_retries=N] [--dry-run]"
usage+=" -- --config=CONFIG [--config.key=value ...]"
name='' zone='' accelerator='' workdir='' data_dir='' project='' spot=0
version='tpu-ubuntu2204-base'
max_restarts=100
max_retries=5
retry_delay=${TPU_VM_RETRY_DELAY:-30}
max_retry_delay=${TPU_VM_MAX_RETRY_DELAY:-600}
dry_run=${DRY_RUN:-0}
while (($#)); do
  case $1 in
    --name=*) name=${1#*=} ;;
    --zone=*) zone=${1#*=} ;;
    --accelerator=*) accelerator=${1#*=} ;;
    --workdir=*) workdir=${1#*=} ;;
    --data_dir=*) data_dir=${1#*=} ;;
    --version=*) version=${1#*=} ;;
    --project=*) project=${1#*=} ;;
    --spot) spot=1 ;;
    --max_restarts=*) max_restarts=${1#*=} ;;
    --max_retries=*) max_retries=${1#*=} ;;
    --dry-run) dry_run=1 ;;
    --) shift; break ;;
    *) echo "$usage" >&2; exit 2 ;;
  esac
  shift
done
if [[ -z $name || -z $zone || -z $accelerator || $# -eq 0 ]]; then
  echo "$usage" >&2
  exit 2
fi
if [[ $workdir != gs://* ]]; then # a VM's disk is lost with it, and every worker must write the same checkpoint
  echo "tpu_vm.sh: --workdir must be a gs:// path (got '$workdir')" >&2
  exit 2
fi

main_args=("$@" --workdir="$workdir")
[[ -z $data_dir ]] || main_args+=(--config.dataset.data_dir="$data_dir")
# Remote commands (single quotes: `~` expands on the workers). Worker 0's exit status tells how the run ended.
remote_install='rm -rf ~/mae_jax ~/mae_jax_venv && mkdir ~/mae_jax && tar -xzf ~/mae_jax.tar.gz -C ~/mae_jax'
remote_install+=' && curl -LsSf https://astral.sh/uv/install.sh | sh && ~/.local/bin/uv venv -q -p 3.11 ~/mae_jax_venv'
# gcs: the workdir is a gs:// path; tpu: libtpu. The constraints pin jax and libtpu to the tested versions.
remote_install+=' && ~/.local/bin/uv pip install -q -p ~/mae_jax_venv/bin/python -e ~/mae_jax"[gcs,tpu]"'
remote_install+=' -c ~/mae_jax/constraints.txt'
remote_run='cd ~/mae_jax && . ~/mae_jax_venv/bin/activate && rm -f ~/.mae_jax_status && { python -m mae_jax.main'
remote_run+="$(printf ' %q' "${main_args[@]}")"
# shellcheck disable=SC2016 # $? and $status expand on the workers
remote_run+='; status=$?; echo $status >~/.mae_jax_status; exit $status; }'
remote_status='cat ~/.mae_jax_status 2>/dev/null'
tpu=(gcloud compute tpus tpu-vm)
where=(--zone="$zone")
[[ -z $project ]] || where+=(--project="$project")
repo=$(git -C "$(dirname "$0")" rev-parse --show-toplevel)
tarball=${TMPDIR:-/tmp}/mae_jax_$name.tar.gz

show() { # a command as one copy-pasteable line, quoting only the arguments that need it
  local arg line=()
  for arg; do
    if [[ $arg =~ ^[][A-Za-z0-9_./=:,@%+-]+$ ]]; then line+=("$arg"); else line+=("'${arg//\'/\'\\\'\'}'"); fi
  done
  echo "${line[*]}"
}
run() { if ((dry_run)); then show "$@"; else "$@"; fi; }

call_output='' gcloud_error=''
call() { # a gcloud call whose failure the caller handles: stdout in call_output, the error as one line in gcloud_error
  local out errors status=0
  if ((dry_run)); then
    show "$@"
    return 0
  fi
  out=$(mktemp) errors=$(mktemp)
  "$@" >"$out" 2>"$errors" || status=$?
  call_output=$(<"$out")
  # gcloud prints progress lines, then `ERROR: (gcloud.VERB) STATUS: message` or the operation's JSON {code, message}
  if ((status != 0)); then
    gcloud_error=$({ grep -A20 '^ERROR:' "$errors" || cat "$errors"; } | tr -s ' \n' ' ')
    gcloud_error=${gcloud_error% }
  fi
  rm -f "$out" "$errors"
  return "$status"
}

error_kind() { # how the last failed call failed: absent (no such VM), capacity (a stock-out), or error
  case $gcloud_error in
    *NOT_FOUND*) echo absent ;;
    *'no more capacity'* | *'nsufficient capacity'* | *'nsufficient reserved capacity'* | *RESOURCE_EXHAUSTED* | \
      *ZONE_RESOURCE_POOL_EXHAUSTED* | *'"code": 8,'*) echo capacity ;;
    *) echo error ;;
  esac
}

failures=0 # failed calls in a row, since the run last started or gcloud last answered with a stock-out
delay=$retry_delay
try_again_later() { # after a failed call ($1: what it did): wait, doubling; give up after --max_retries in a row
  local kind
  kind=$(error_kind)
  if [[ $kind == capacity ]]; then # an answer, not a failure to get one: errors before it were not in a row
    failures=0
    echo "tpu_vm.sh: $1: no capacity; trying again in $delay s (without limit): $gcloud_error" >&2
  elif ((++failures > max_retries)); then
    echo "tpu_vm.sh: $1 failed $failures times in a row; giving up: $gcloud_error" >&2
    exit 1
  else
    echo "tpu_vm.sh: $1 failed (try $failures of $max_retries); trying again in $delay s: $gcloud_error" >&2
  fi
  sleep "$delay"
  delay=$((delay * 2 < max_retry_delay ? delay * 2 : max_retry_delay))
}

dry_state=ABSENT # what a dry run takes describe to answer: no VM, then READY once created
read_state() { # state: READY, PREEMPTED, ... or ABSENT (gcloud said NOT_FOUND); returns 1 when gcloud could not tell
  if ((dry_run)); then
    call "${tpu[@]}" describe "$name" "${where[@]}" --format='value(state)'
    state=$dry_state
  elif call "${tpu[@]}" describe "$name" "${where[@]}" --format='value(state)'; then
    state=$call_output
    [[ -n $state ]] || { gcloud_error='describe printed no state' && return 1; }
  elif [[ $(error_kind) == absent ]]; then
    state=ABSENT
  else
    return 1
  fi
}

create() {
  local spot_flag=()
  ((spot)) && spot_flag=(--spot)
  call "${tpu[@]}" create "$name" "${where[@]}" --accelerator-type="$accelerator" --version="$version" \
    ${spot_flag[@]+"${spot_flag[@]}"} && dry_state=READY
}

install() { # output to the terminal: an install error is shown whole
  local tree='' status=0
  ((dry_run)) || tree=$(git -C "$repo" stash create) # uncommitted edits as a commit; empty if there are none
  {
    run git -C "$repo" archive --format=tar.gz -o "$tarball" "${tree:-HEAD}" &&
      run "${tpu[@]}" scp "$tarball" "$name:~/mae_jax.tar.gz" "${where[@]}" --worker=all &&
      run "${tpu[@]}" ssh "$name" "${where[@]}" --worker=all --command="$remote_install"
  } || status=$?
  ((status == 0)) || gcloud_error="exit status $status (its output is above)"
  return "$status"
}

read_status() { # worker 0's exit status of the last run; empty when it did not get to write one (a dry run: 0)
  status=0
  local query=("${tpu[@]}" ssh "$name" "${where[@]}" --worker=0 --command="$remote_status")
  if ((dry_run)); then show "${query[@]}"; else status=$("${query[@]}" 2>/dev/null) || true; fi
}

# Each pass asks for the VM's state and makes at most one change to it (create, start, delete), then asks again:
# only a READY VM is installed on and runs.
restarts=0
installed=0
while :; do
  if ! read_state; then # never create a VM that may exist
    try_again_later "describe $name"
    continue
  fi
  case $state in
    READY) ;;
    ABSENT)
      echo "tpu_vm.sh: there is no VM $name; creating it"
      create || try_again_later "create $name"
      installed=0
      continue
      ;;
    STOPPED)
      echo "tpu_vm.sh: $name is STOPPED; starting it"
      call "${tpu[@]}" start "$name" "${where[@]}" || try_again_later "start $name"
      continue
      ;;
    PREEMPTED | TERMINATED)
      echo "tpu_vm.sh: $name is $state; deleting it, to create it again"
      call "${tpu[@]}" delete "$name" "${where[@]}" --quiet || [[ $(error_kind) == absent ]] ||
        try_again_later "delete $name"
      continue
      ;;
    *) echo "tpu_vm.sh: $name is $state; checking again in $retry_delay s"; sleep "$retry_delay"; continue ;;
  esac
  if ((!installed)); then
    if ! install; then
      try_again_later "installing on $name"
      continue
    fi
    installed=1
  fi
  failures=0 delay=$retry_delay
  run "${tpu[@]}" ssh "$name" "${where[@]}" --worker=all --command="$remote_run" || true
  read_status
  case $status in
    0) echo "tpu_vm.sh: the run finished; delete the VM with: ${tpu[*]} delete $name ${where[*]}"; exit 0 ;;
    143 | "")
      if ((++restarts > max_restarts)); then
        echo "tpu_vm.sh: stopped $max_restarts times; giving up" >&2
        exit 1
      fi
      echo "tpu_vm.sh: the run stopped (preemption or lost VM); restart $restarts of $max_restarts"
      ;;
    *) echo "tpu_vm.sh: the run failed with status $status" >&2; exit "$status" ;;
  esac
done
