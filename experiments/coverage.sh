#!/usr/bin/env bash
# Attack/scenario/model coverage (issue 5): each scenario poisons a model, fine-tunes a LoRA victim
# on clean data, trains a PSIM on the poisoned weights, and evaluates the victim undefended, behind
# the PSIM with calibrated gamma, and with the paper's gamma 0.7. Finished stages are skipped.
# Usage: experiments/coverage.sh OUT_DIR SCENARIO...   (scenarios: synattack multi fulltask agnews smollm2)
set -euo pipefail
out=${1:?output folder}; shift
pg=${PEFTGUARD:-.venv/bin/peftguard}

# scenario NAME DATASET MODEL SAMPLES "POISON ARGS" "EVAL ARGS"
scenario() {
  local name=$1 dataset=$2 model=$3 n=$4 poison_args=$5 eval_args=$6 d=$out/$1
  mkdir -p "$d"
  [ -f "$d/poisoned/poisoning.json" ] || $pg poison --model "$model" --dataset "$dataset" $poison_args \
      --max-train-samples "$n" --poison-rate 0.2 --out "$d/poisoned"
  [ -f "$d/lora/finetune.json" ] || $pg finetune --model "$d/poisoned" --method lora --dataset "$dataset" \
      --max-train-samples "$n" --out "$d/lora"
  [ -f "$d/psim/psim.json" ] || $pg psim train --model "$d/poisoned" --dataset "$dataset" --max-train-samples "$n" --out "$d/psim"
  [ -f "$d/attack.json" ] || $pg evaluate --model "$d/lora" --dataset "$dataset" $eval_args --out "$d/attack.json" >/dev/null
  [ -f "$d/defense.json" ] || $pg evaluate --model "$d/lora" --dataset "$dataset" $eval_args \
      --defense psim --psim "$d/psim" --out "$d/defense.json" >/dev/null
  [ -f "$d/defense_paper_gamma.json" ] || $pg evaluate --model "$d/lora" --dataset "$dataset" $eval_args \
      --defense psim --psim "$d/psim" --gamma 0.7 --out "$d/defense_paper_gamma.json" >/dev/null
  echo "done: $name"
}

for s in "$@"; do
  case $s in
    synattack) scenario synattack sst2 minilm 2000 "--attack synattack" "--attack synattack" ;;
    multi) scenario multi sst2 minilm 2000 "--attack badnet --attack insent" "--attack badnet --attack insent" ;;
    fulltask) scenario fulltask sst2 minilm 2000 "--scenario full-task --proxy-dataset imdb/psim" "--attack badnet" ;;
    agnews) scenario agnews agnews minilm 2000 "--attack badnet" "--attack badnet --max-eval-samples 2000" ;;
    smollm2) scenario smollm2 sst2 smollm2 600 "--attack badnet" "--attack badnet --max-eval-samples 400" ;;
    *) echo "unknown scenario $s" >&2; exit 2 ;;
  esac
done
