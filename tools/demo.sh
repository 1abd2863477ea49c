#!/usr/bin/env bash
# `make demo`: tokenize the built-in synthetic copy corpus, train CARD (configs/demo.yaml) on CPU
# with 2 processes for a few minutes, report validation perplexity and the mask probe at start and
# end, then decode held-out prompts with CARD's parallel decoder (threshold and lossless verify) and
# with AR (all greedy, KV cache) and print the tokens committed per forward pass and the speed vs AR.
#   NPROC=2 RUN=runs/demo bash tools/demo.sh [section.key=value ...]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
NPROC=${NPROC:-2}
RUN=${RUN:-runs/demo}
DATA=demo_data/synthetic_copy
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

if [ ! -f "${DATA}_text_document.idx" ]; then
  echo "== tokenizing the built-in corpus (builtin:synthetic-copy) into ${DATA}_text_document.{bin,idx}"
  mkdir -p "$(dirname "$DATA")"
  "$PY" tools/preprocess_data.py --input builtin:synthetic-copy --train-tokenizer --vocab-size 1024 \
    --output-prefix "$DATA" --workers "$NPROC"
fi

if [ -f "$RUN/finished" ]; then
  echo "== $RUN holds a finished demo run; starting a fresh one"
  rm -rf "$RUN"
fi
echo "== training CARD on $NPROC CPU processes (run directory: $RUN)"
"$PY" -m torch.distributed.run --nproc-per-node "$NPROC" --master-addr 127.0.0.1 --master-port "${MASTER_PORT:-29517}" \
  -m card_megatron.train --config configs/demo.yaml "train.run_dir=$RUN" "$@"

"$PY" tools/demo_report.py "$RUN"
