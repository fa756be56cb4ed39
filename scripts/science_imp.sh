#!/usr/bin/env bash
# One-shot against iterative pruning, and full against weights rewinding, with 3 replicates each:
# LeNet-300-100 on Fashion-MNIST (docs/results.md, "Iterative pruning and replicates").
#
#   scripts/science_imp.sh ROOT DATA_DIR PART...     PART: one_shot | iterative | weights | report
#
# ROOT is the artifact root (one work directory per replicate, the replicate sets beside them);
# DATA_DIR a preprocessed data set (manifest.json + shards). Every step skips what is done: run a
# part again to resume it. Each part logs its start and end (and wall time) to ROOT/science.log.
set -euo pipefail
ROOT=$1 DATA=$2
shift 2
mkdir -p "$ROOT"
PY=${PYTHON:-python}
THREADS=${LOTTERY_THREADS:-1}
export LOTTERY_THREADS=$THREADS

# The three experiments: the default config but for these fields.
ONE_SHOT='{"rewind_points": ["0it", "1ep"], "replicates": 3}'
ITERATIVE='{"rewind_points": ["0it", "1ep"], "replicates": 3, "pruning_schedule": "iterative"}'
WEIGHTS='{"rewind_points": ["1ep"], "replicates": 3, "rewind_mode": "weights", "controls": false}'
CONTROL_MASKS=2,9,16  # the default control levels: 51.2%, 10.7% and 2.3% of the weights left

lottery() { $PY -m lottery "$@"; }
workdirs() {  # the work directory of each replicate of config $1 (and its replicate set)
    echo "$1" > "$ROOT/$2.json"
    lottery replicates --config "$ROOT/$2.json" --data "$DATA" --root "$ROOT" > "$ROOT/$2.replicates.json"
    $PY -c 'import json, sys; print(" ".join(json.load(open(sys.argv[1]))["workdirs"]))' "$ROOT/$2.replicates.json"
}
replicate_set() { $PY -c 'import json, sys; print(json.load(open(sys.argv[1]))["replicate_set"])' "$ROOT/$1.replicates.json"; }
dense() { lottery dense --config "$1" --data "$DATA" --workdir "$2" --replicate "$3" > /dev/null; }
controls() {
    for r in 0it 1ep; do for c in random_reinit random_prune; do
        lottery retrain --workdir "$1" --mask "$CONTROL_MASKS" --rewind "$r" --control "$c" > /dev/null
    done; done
}

part_one_shot() {
    local k=0
    for w in $(workdirs "$ONE_SHOT" one_shot); do
        dense "$ROOT/one_shot.json" "$w" $k; k=$((k + 1))
        lottery masks --workdir "$w" > /dev/null
        for r in 0it 1ep; do lottery retrain --workdir "$w" --mask all --rewind "$r" > /dev/null; done
        controls "$w"
    done
}

part_iterative() {
    local k=0
    for w in $(workdirs "$ITERATIVE" iterative); do
        dense "$ROOT/iterative.json" "$w" $k; k=$((k + 1))
        for r in 0it 1ep; do lottery imp --workdir "$w" --rewind "$r" > /dev/null; done
        controls "$w"
    done
}

part_weights() {
    local k=0
    for w in $(workdirs "$WEIGHTS" weights); do
        dense "$ROOT/weights.json" "$w" $k; k=$((k + 1))
        lottery masks --workdir "$w" > /dev/null
        lottery retrain --workdir "$w" --mask all --rewind 1ep > /dev/null
    done
}

part_report() {
    for name in one_shot iterative weights; do lottery report --workdir "$(replicate_set $name)" > /dev/null; done
    lottery report --compare "$(replicate_set one_shot)" "$(replicate_set iterative)" --out "$ROOT/compare-schedules"
    lottery report --compare "$(replicate_set one_shot)" "$(replicate_set weights)" --rewind 1ep --out "$ROOT/compare-rewind-modes"
}

for part in "$@"; do
    started=$(date +%s)
    echo "$(date -u +%FT%TZ) $part: start" | tee -a "$ROOT/science.log"
    "part_$part"
    echo "$(date -u +%FT%TZ) $part: done in $(( $(date +%s) - started )) s" | tee -a "$ROOT/science.log"
done
