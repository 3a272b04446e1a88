#!/usr/bin/env bash
# The small-scale reproduction of the paper's mask-ratio curve (Fig. 5) and masking strategies (Fig. 6) on
# Fashion-MNIST (configs/ablation.py), offline on a CPU; `apt-get install dataset-fashion-mnist` first.
# Each setting pretrains with the online linear probe and kNN logged at its end; with OFFLINE_PROBE=1 the
# offline linear probe (configs/ablation.py:linprobe) then runs on each encoder too. docs/ablations/plot.py
# draws the figures and prints the tables from the workdirs.
#
#   bash launch/ablations.sh ROOT        # ROOT/<setting> (and ROOT/<setting>.probe); finished runs are skipped
#   python docs/ablations/plot.py ROOT   # docs/ablations/{mask_ratio,strategy}.png and the tables
set -euo pipefail
root=${1:?usage: bash launch/ablations.sh ROOT}
python=${PYTHON:-python}

run() {  # run NAME ABLATIONS: pretrain, then (OFFLINE_PROBE=1) probe the encoder offline
  local name=$1 ablations=$2
  if [[ ! -d $root/$name/encoder ]]; then
    "$python" -m mae_jax.main --config="configs/ablation.py:$ablations" --workdir="$root/$name"
  fi
  if [[ ${OFFLINE_PROBE:-0} == 1 && ! -f $root/$name.probe/classifier.safetensors ]]; then
    "$python" -m mae_jax.main --config=configs/ablation.py:linprobe --workdir="$root/$name.probe" \
      --config.init="$root/$name/encoder"
  fi
}

for ratio in 0.25 0.5 0.6 0.75 0.85 0.9; do  # Fig. 5: random masking
  run "random_$ratio" "mask_ratio=$ratio"
done
run block_0.5 masking=block,mask_ratio=0.5  # Fig. 6: block-wise at 50 % and 75 %, grid-wise at 75 %
run block_0.75 masking=block
run grid_0.75 masking=grid
