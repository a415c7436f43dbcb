#!/usr/bin/env bash
# PSIM against the baseline defenses (ONION, back-translation, SCPD, Fine-mixing) on the same runs.
#
# BadNet: the demo's artifacts (runs/demo: poisoned MiniLM, five victims, PSIM; `make demo` makes them).
# InSent: the same recipe with the InSent trigger, LoRA victim only (made here when missing).
# Every evaluation uses the same 300-sample test subset (seed 0); ONION's LM perplexities are
# cached in runs/baselines/onion_ppl.json, so the test texts are scored once for all victims.
# Writes runs/baselines/{badnet,insent}/<method>/<defense>.json and runs/baselines/results.md.
# Wall time on 2 shared CPU cores: several hours, mostly ONION's LM pass (about 13k candidate texts)
# and Fine-mixing's seven fine-tunings.
set -euo pipefail
cd "$(dirname "$0")/.."

PG=.venv/bin/peftguard
DEMO=${DEMO:-runs/demo}
OUT=${OUT:-runs/baselines}
N=${N:-300}
METHODS=${METHODS:-"full lora prompt ptuning-v1 ptuning-v2"}
mkdir -p "$OUT"

# InSent artifacts: the demo's recipe (2000 training samples, 20% clean-label poisoning, 3 epochs at 5e-5).
I=$OUT/insent
[ -f $I/poisoned/poisoning.json ] || $PG poison --model minilm --dataset sst2 --attack insent --poison-rate 0.2 \
    --max-train-samples 2000 --epochs 3 --lr 5e-5 --seed 0 --out $I/poisoned
[ -f $I/attack/lora/finetune.json ] || $PG finetune --model $I/poisoned --dataset sst2 --method lora \
    --max-train-samples 2000 --epochs 2 --seed 0 --out $I/attack/lora
[ -f $I/psim/psim.json ] || $PG psim train --model $I/poisoned --dataset sst2 --max-train-samples 2000 --seed 0 --out $I/psim

# run ATTACK METHOD VICTIM NAME [evaluate options...]: one metrics file; an expected refusal is kept as NAME.error.
run() {
    local attack=$1 method=$2 victim=$3 name=$4; shift 4
    local dir=$OUT/$attack/$method
    mkdir -p "$dir"
    [ -f "$dir/$name.json" ] && return 0
    echo "== $attack $method $name"
    if ! $PG evaluate --model "$victim" --dataset sst2 --attack "$attack" --max-eval-samples "$N" --seed 0 \
            --out "$dir/$name.json" "$@" > "$dir/$name.log" 2> "$dir/$name.err"; then
        grep '^error:' "$dir/$name.err" > "$dir/$name.error" || { cat "$dir/$name.err"; exit 1; }
        echo "   refused: $(cat "$dir/$name.error")"
    fi
}

defenses() {  # ATTACK METHOD VICTIM PSIM
    local a=$1 m=$2 v=$3 p=$4
    run $a $m $v none
    run $a $m $v psim --defense psim --psim $p
    run $a $m $v back-translation-apertium --defense back-translation --backend apertium
    run $a $m $v back-translation-precomputed --defense back-translation --backend precomputed
    run $a $m $v scpd-precomputed --defense scpd
    run $a $m $v fine-mixing --defense fine-mixing --mix-ratio 0.5 --fine-mixed $OUT/$a/$m/fine-mixed-victim
    run $a $m $v fine-mixing-0.2 --defense fine-mixing --mix-ratio 0.2 --fine-mixed $OUT/$a/$m/fine-mixed-victim-0.2
}

for m in $METHODS; do
    defenses badnet $m $DEMO/attack/$m $DEMO/psim
done
defenses insent lora $I/attack/lora $I/psim

# ONION last: its LM pass over the test texts is the slowest step (SmolLM2 on CPU); the cache makes
# every victim after the first of an attack cost only the victim's own inference.
run badnet lora $DEMO/attack/lora onion --defense onion --onion-cache $OUT/onion_ppl.json
run insent lora $I/attack/lora onion --defense onion --onion-cache $OUT/onion_ppl.json
for m in $METHODS; do
    run badnet $m $DEMO/attack/$m onion --defense onion --onion-cache $OUT/onion_ppl.json
done

# ONION's own cost, without the cache, on a 40-sample subset (the runs above reuse cached perplexities).
N=40 run badnet lora $DEMO/attack/lora onion-cost --defense onion
# ONION's bar, swept on the BadNet LoRA victim (the original code tries bars 1..100 on its scale).
run badnet lora $DEMO/attack/lora onion-sweep --defense onion --onion-cache $OUT/onion_ppl.json \
    $(for b in 0 10 20 50 100 200 500; do echo --onion-bar $b; done)
# Fine-mixing's ratio, swept on the BadNet LoRA victim (0 = the clean model fine-tuned: the floor).
for r in 0 0.8; do
    run badnet lora $DEMO/attack/lora fine-mixing-$r --defense fine-mixing --mix-ratio $r --fine-mixed $OUT/badnet/lora/fine-mixed-victim-$r
done

.venv/bin/python experiments/baselines_table.py "$OUT" | tee "$OUT/results.md"
