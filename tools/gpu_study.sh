#!/usr/bin/env bash
# The study's gpu plan end to end on a lent GPU, in one call (restartable: a second call continues
# where a timed-out one stopped). Copies the report (study.md, study.json, PNGs) to ${OUT:-gpu_out}/study-gpu.
#   bash tools/gpu_study.sh            # TIMEOUT=540 by default
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_out}
PY=${PY:-python3}
STUDY=${STUDY:-/tmp/study-gpu}
mkdir -p "$OUT/study-gpu"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 WANDB_MODE=offline
nvidia-smi --query-gpu=name,memory.total --format=csv | tee "$OUT/study-gpu/device.txt"
[ -f card_megatron/_indexer*.so ] || "$PY" setup.py build_ext --inplace -q >/dev/null 2>&1
timeout "${TIMEOUT:-540}" "$PY" tools/study.py --plan gpu --out "$STUDY" 2>&1 | tee "$OUT/study-gpu/study.log" | tail -40
cp "$STUDY"/study.* "$STUDY"/*.png "$OUT/study-gpu/" 2>/dev/null
for r in "$STUDY"/runs/*; do [ -f "$r/eval.jsonl" ] && cp "$r/eval.jsonl" "$OUT/study-gpu/$(basename "$r").eval.jsonl"; done
ls "$OUT/study-gpu"
