#!/usr/bin/env bash
# Instruction tuning (paper Table 11) with SmolLM2-135M-Instruct: the causal LM answers
# "Classify the sentiment of the input as negative or positive.\nInput: {text}\nAnswer:" with
# " negative"/" positive". Normal = clean instruction tuning; Attack = weight poisoning on
# instruction-formatted BadNet examples, model used directly; Defense = PSIM (psim train's default method,
# auto: a LoRA PSIM on this decoder-only LM; reset label words). Subsampled (N training, M test samples) to
# finish on 2 CPU cores.
# Usage: experiments/instruction.sh OUT_DIR [N] [M]   (SKIP_NORMAL=1 leaves out the Normal row)
# PSIM: the clean-data budget rule by default; PSIM_EPOCHS and PSIM_LR fix its schedule instead (the
# coverage table's rows: PSIM_EPOCHS=1 PSIM_LR=3e-4, the earlier default); each schedule has its own
# PSIM folder and defense files, so several share one poisoned model.
# Poisoning recipe: POISON_MODE (clean-label), POISON_EPOCHS (2), POISON_LR (5e-5). Measured: the clean-label
# default plants only a weak backdoor at N=300 (ASR 21%); dirty-label, 3 epochs at 1e-4 is the classic BadNet.
set -euo pipefail
out=${1:?output folder}; n=${2:-600}; m=${3:-300}
pg=${PEFTGUARD:-.venv/bin/peftguard}
common=(--model smollm2 --instruction sentiment --dataset sst2 --max-train-samples "$n" --max-eval-samples "$m")
[ -n "${SKIP_NORMAL:-}" ] || [ -f "$out/normal/finetune.json" ] || $pg finetune "${common[@]}" --method full --epochs 1 --lr 2e-5 --out "$out/normal"
[ -f "$out/poisoned/poisoning.json" ] || $pg poison "${common[@]}" --poison-rate 0.2 \
    --poison-mode "${POISON_MODE:-clean-label}" --epochs "${POISON_EPOCHS:-2}" --lr "${POISON_LR:-5e-5}" --out "$out/poisoned"
schedule=(${PSIM_EPOCHS:+--epochs "$PSIM_EPOCHS"} ${PSIM_LR:+--lr "$PSIM_LR"})
psim="psim${PSIM_EPOCHS:+-e$PSIM_EPOCHS}${PSIM_LR:+-lr$PSIM_LR}"
[ -f "$out/$psim/psim.json" ] || $pg psim train --model "$out/poisoned" --dataset sst2 --max-train-samples "$n" --max-eval-samples "$m" "${schedule[@]}" --out "$out/$psim"
for row in normal poisoned; do
  [ -d "$out/$row" ] || continue
  [ -f "$out/$row.json" ] || $pg evaluate --model "$out/$row" --max-eval-samples "$m" --out "$out/$row.json" >/dev/null
done
defense="defense${psim#psim}"
[ -f "$out/$defense.json" ] || $pg evaluate --model "$out/poisoned" --max-eval-samples "$m" --defense psim --psim "$out/$psim" --out "$out/$defense.json" >/dev/null
[ -f "$out/${defense}_paper_gamma.json" ] || $pg evaluate --model "$out/poisoned" --max-eval-samples "$m" --defense psim --psim "$out/$psim" --gamma 0.7 --out "$out/${defense}_paper_gamma.json" >/dev/null
echo "done: instruction"
