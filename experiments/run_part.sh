#!/usr/bin/env bash
# Build, audit (PSIM lens, then the classifier lens) and measure the backdoor strength of every model of one zoo
# part, JOBS models at a time, then summarize. Meant for a machine with a GPU, where many MiniLM models share one
# device; on 2 CPU cores use JOBS=1 or the per-model commands of REPRODUCTION.md.
#
#   experiments/run_part.sh PART JOBS ZOO_OUT AUDIT_OUT STRENGTH_JSON [NAME ...]
#
# With NAMEs, only those entries of the part are built and audited (the summaries still cover the whole part).
# Each step is the documented per-model command (experiments/zoo.py, audit_zoo.py, zoo_strength.py with --only), so
# a rerun resumes: a built model, a finished audit and a finished evaluation are reused. AG News models start first
# (their audits are the longest). One log per model and step under ZOO_OUT/logs.
set -euo pipefail
[ $# -ge 5 ] || { echo "usage: $0 PART JOBS ZOO_OUT AUDIT_OUT STRENGTH_JSON [NAME ...]" >&2; exit 2; }
part=$1 jobs=$2 zoo=$3 audits=$4 strength=$5
shift 5
python=${PYTHON:-python}
mkdir -p "$zoo/logs"
names=$("$python" - "$part" "$@" <<'EOF'
import sys
from pathlib import Path
sys.path.insert(0, "experiments")
from zoo import load_zoo
part, only = sys.argv[1], sys.argv[2:]
entries = [m for m in load_zoo(Path("experiments/zoo.yaml"))[1]
           if m["part"] == part and (not only or m["name"] in only)]
print(*sorted((m["name"] for m in entries), key=lambda n: "agnews" not in n))
EOF
)

# Two kinds of task share the JOBS slots: each model's chain (build, PSIM-lens audit, strength), all queued first,
# then each model's classifier-lens audit, which waits for its model's build. So under a deadline the default lens's
# audits are the ones that finish.
chain() {
    local name=$1 only=(--part "$part" --only "$1")
    if ! "$python" experiments/zoo.py experiments/zoo.yaml --out "$zoo" "${only[@]}" \
            > "$zoo/logs/$name.build.log" 2>&1; then
        echo "$name: build failed (see $zoo/logs/$name.build.log)"; touch "$zoo/logs/$name.failed"; return 0
    fi
    touch "$zoo/logs/$name.built"
    "$python" experiments/audit_zoo.py --zoo "$zoo" --out "$audits" "${only[@]}" --lens psim \
        > "$zoo/logs/$name.psim.log" 2>&1
    "$python" experiments/zoo_strength.py --zoo "$zoo" "${only[@]}" --work "$zoo/strength" \
        --out "$zoo/strength/$name.summary.json" > "$zoo/logs/$name.strength.log" 2>&1
    echo "$name: built, PSIM-lens audit and strength done"
}
classifier() {
    local name=$1
    until [ -e "$zoo/logs/$name.built" ] || [ -e "$zoo/logs/$name.failed" ]; do sleep 5; done
    [ -e "$zoo/logs/$name.built" ] || return 0
    "$python" experiments/audit_zoo.py --zoo "$zoo" --out "$audits" --part "$part" --only "$name" --lens classifier \
        > "$zoo/logs/$name.classifier.log" 2>&1
    echo "$name: classifier-lens audit done"
}
export -f chain classifier
export part zoo audits python
# zoo.json, which every step reads, lists the whole zoo; --only with no such entry writes it and builds nothing.
"$python" experiments/zoo.py experiments/zoo.yaml --out "$zoo" --part "$part" --only none-such > /dev/null
rm -f "$zoo"/logs/*.built "$zoo"/logs/*.failed
{ printf 'chain %s\n' $names; printf 'classifier %s\n' $names; } | xargs -P "$jobs" -L 1 bash -c '"$0" "$1"'
"$python" experiments/zoo_strength.py --zoo "$zoo" --part "$part" --work "$zoo/strength" --out "$strength"
"$python" experiments/audit_zoo.py --zoo "$zoo" --out "$audits" --part "$part" --lens psim --lens classifier \
    --summarize-only
