#!/usr/bin/env bash
# `make demo`: tokenize the built-in corpus, train CARD (configs/tiny-cpu.yaml) on CPU with
# 2 processes for a few minutes, report validation perplexity at start and end, and print a
# sample decoded with CARD's parallel decoder.
#   NPROC=2 RUN=runs/demo bash tools/demo.sh [section.key=value ...]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
NPROC=${NPROC:-2}
RUN=${RUN:-runs/demo}
DATA=demo_data/python_docs
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

if [ ! -f "${DATA}_text_document.idx" ]; then
  echo "== tokenizing the built-in corpus (builtin:python-docs) into ${DATA}_text_document.{bin,idx}"
  mkdir -p "$(dirname "$DATA")"
  "$PY" tools/preprocess_data.py --input builtin:python-docs --train-tokenizer --vocab-size 4096 \
    --output-prefix "$DATA" --workers "$NPROC"
fi

if [ -f "$RUN/finished" ]; then
  echo "== $RUN holds a finished demo run; starting a fresh one"
  rm -rf "$RUN"
fi
echo "== training CARD on $NPROC CPU processes (run directory: $RUN)"
"$PY" -m torch.distributed.run --nproc-per-node "$NPROC" --master-addr 127.0.0.1 --master-port "${MASTER_PORT:-29517}" \
  -m card_megatron.train --config configs/tiny-cpu.yaml "train.run_dir=$RUN" "$@" --summary-json "$RUN/summary.json"

"$PY" - "$RUN/summary.json" <<'PYEOF'
import json, sys
s = json.load(open(sys.argv[1]))
first, last = s.get("initial_eval"), s.get("final_eval")
if first and last:
    bound = "<= " if last["val_ppl_is_bound"] else ""
    print(f"== validation perplexity: {bound}{first['val_ppl']:.1f} at step {s['start_step']} -> "
          f"{bound}{last['val_ppl']:.1f} at step {s['end_step']}")
PYEOF

if [ -f tools/generate.py ]; then
  echo "== a sample from the trained model (CARD parallel decoding, KV cache)"
  "$PY" tools/generate.py --checkpoint "$RUN" --prompt "The default value of" --max-new-tokens 48 --seed 0
fi
