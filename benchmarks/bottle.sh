#!/usr/bin/env bash
# Every bottle measurement in BENCHMARKS.md, in order, from one trained run of the cpu preset.
# Usage: bash benchmarks/bottle.sh DATA_ROOT RUN OUT   (DATA_ROOT holds bottle/; RUN from `defectdiff train`)
# Train first with:
#   defectdiff train --data DATA_ROOT --category bottle --preset cpu --threads 1 --out RUN
set -euo pipefail
DATA=$1; RUN=$2; OUT=$3
mkdir -p "$OUT"
images=("$DATA/bottle/test/broken_large/000.png" "$DATA/bottle/test/contamination/000.png" "$DATA/bottle/test/good/000.png")
/usr/bin/time -v -o "$OUT/test.time" defectdiff test --run "$RUN" --overwrite --quiet | tee "$OUT/test.txt"
defectdiff test --run "$RUN" --alpha 0 --out "$OUT/test-alpha0" --overwrite --quiet | tee "$OUT/test-alpha0.txt"
python benchmarks/score_variants.py --run "$RUN" --threads 2 --out "$OUT/variants.json" | tee "$OUT/variants.txt"
defectdiff sweep-alpha --run "$RUN" --alphas 0,0.25,0.5,0.75,1 --out "$OUT/sweep" | tee "$OUT/sweep.txt"
defectdiff bench --data "$DATA" --categories bottle --methods ours,padim,spade --preset cpu \
    --runs "bottle=$RUN" --alpha 0 --out "$OUT/bench" --quiet | tee "$OUT/bench.txt"
python benchmarks/speed.py --run "$RUN" --threads 2 --out "$OUT/speed.json" > "$OUT/speed.txt"
python benchmarks/train_step.py --preset cpu --threads 2 > "$OUT/train_step.jsonl"
python benchmarks/train_step.py --preset cpu --threads 2 --fp32 >> "$OUT/train_step.jsonl"
defectdiff reconstruct --run "$RUN" "${images[@]}" --out "$OUT/reconstruct" | tee "$OUT/reconstruct.txt"
timeout 600 python benchmarks/train_step.py --preset paper --threads 2 --steps 1 >> "$OUT/train_step.jsonl" || \
    echo '{"preset": "paper", "error": "did not finish one step within 600 s or ran out of memory"}' >> "$OUT/train_step.jsonl"
