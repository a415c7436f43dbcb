#!/usr/bin/env bash
# PSIM on a clean (never poisoned) model: what does it cost in CA? (paper Table 9, "Defense_clean")
# Usage: experiments/defense_clean.sh DEMO_DIR OUT_DIR
# Trains a PSIM on the clean pretrained MiniLM (same recipe as the demo's), then evaluates each of
# the demo's Normal-row victims behind it with the calibrated gamma and the paper's 0.7.
set -euo pipefail
demo=${1:?demo output folder}; out=${2:?output folder}
pg=${PEFTGUARD:-.venv/bin/peftguard}
mkdir -p "$out"
[ -f "$out/psim/psim.json" ] || $pg psim train --model minilm --dataset sst2 --max-train-samples 2000 --out "$out/psim"
for method in full lora prompt ptuning-v1 ptuning-v2; do
  $pg evaluate --model "$demo/normal/$method" --dataset sst2 --defense psim --psim "$out/psim" --out "$out/$method.calibrated.json" > /dev/null
  $pg evaluate --model "$demo/normal/$method" --dataset sst2 --defense psim --psim "$out/psim" --gamma 0.7 --out "$out/$method.paper.json" > /dev/null
done
python3 - "$out" <<'PY'
import json, sys, pathlib
out = pathlib.Path(sys.argv[1])
print("| method | CA | defended CA (calibrated) | FPR | defended CA (gamma 0.7) | FPR |")
print("|---|---|---|---|---|---|")
for m in ["full", "lora", "prompt", "ptuning-v1", "ptuning-v2"]:
    c = json.loads((out / f"{m}.calibrated.json").read_text()); p = json.loads((out / f"{m}.paper.json").read_text())
    print(f"| {m} | {100*c['clean_accuracy']:.2f} | {100*c['defended_clean_accuracy']:.2f} | {100*c['false_positive_rate']:.2f} "
          f"| {100*p['defended_clean_accuracy']:.2f} | {100*p['false_positive_rate']:.2f} |")
PY
