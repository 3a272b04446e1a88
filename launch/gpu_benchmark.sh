#!/usr/bin/env bash
# The GPU measurement in one go, for a fresh GPU machine: install what is missing, run every benchmark of
# mae_jax/benchmark_suite/items.py within its time budget, write one markdown report and print its path.
#
#   bash launch/gpu_benchmark.sh [--dry-run] [REPORT]   # REPORT: gpu_benchmark_<host>_<UTC time>.md here
#
# Installs setup.cfg's install_requires that are not found, and torch and transformers if missing (GPU images
# usually have them), from WHEELS=DIR (a folder of wheels: machines without network) when set, else from the
# package index; a preinstalled jax, jaxlib or CUDA plugin is pinned, never upgraded. jax comes as jax[cuda13] or
# jax[cuda12], for the CUDA version nvidia-smi reports, wherever no CUDA plugin is installed (plain jax is the CPU
# wheel). Every item then runs with JAX_PLATFORMS=cuda: without a GPU backend the suite stops in one line. The
# repository runs from its root (PYTHONPATH). --dry-run: the same items on the CPU with a tiny model (the
# plumbing, a few minutes; nothing GPU is installed).
# PYTHON picks the interpreter, BUDGET_S the seconds the benchmarks may take (450: with the install, under
# 8 minutes), ITEMS=KEY,KEY runs only those items (the report names the ones left for the next window).
set -euo pipefail

usage="usage: $0 [--dry-run] [REPORT]"
python=${PYTHON:-$(command -v python3 || echo python)}
suite_args=(--budget_s="${BUDGET_S:-450}")
mode=()
report=""
while (($#)); do
  case $1 in
    --dry-run) mode=(--dry_run) ;;
    -*) echo "$usage" >&2; exit 2 ;;
    *) [[ -z $report ]] || { echo "$usage" >&2; exit 2; }; report=$1 ;;
  esac
  shift
done
[[ -z ${ITEMS:-} ]] || suite_args+=(--items="$ITEMS")
report=${report:-gpu_benchmark_${HOSTNAME:-host}_$(date -u +%Y%m%dT%H%M%SZ).md}
[[ $report == /* ]] || report=$PWD/$report
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}" PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore

missing=$("$python" -m mae_jax.benchmark_suite --missing_requirements "${mode[@]}")
if [[ -n $missing ]]; then
  mapfile -t requirements <<<"$missing"
  pins=$(mktemp)
  trap 'rm -f "$pins"' EXIT
  "$python" -m mae_jax.benchmark_suite --jax_pins >"$pins"
  source=()
  [[ -z ${WHEELS:-} ]] || source=(--no-index --find-links "$WHEELS")
  echo "installing ${requirements[*]} (${WHEELS:+from $WHEELS, }keeping $(paste -sd' ' "$pins"))"
  "$python" -m pip install "${source[@]}" --constraint "$pins" "${requirements[@]}"
else
  echo "nothing to install: every requirement is there"
fi

status=0
"$python" -m mae_jax.benchmark_suite --report="$report" "${suite_args[@]}" "${mode[@]}" || status=$?
[[ ! -f $report ]] || echo "report: $report"
exit "$status"
