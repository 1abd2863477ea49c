#!/usr/bin/env bash
# The GPU checks, in one script: GPU tests (bf16, NCCL, CUDA corruption == CPU), the per-objective
# training benchmark on the 350M config, a short real training run of the 350M config (tokens/s, MFU),
# and the generation benchmark when a trained demo model exists. Writes logs to ${OUT:-gpu_out}/.
#   bash tools/gpu_checks.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_out}
PY=${PY:-python3}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 WANDB_MODE=offline
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/device.txt"
"$PY" -c "from card_megatron import quiet_warnings; quiet_warnings.install()
import torch, deepspeed, megatron.core
print('torch', torch.__version__, 'deepspeed', deepspeed.__version__, 'megatron-core', megatron.core.__version__)" \
  2>&1 | tee -a "$OUT/device.txt"
compgen -G 'card_megatron/_indexer*.so' >/dev/null || "$PY" setup.py build_ext --inplace -q

echo "== GPU tests"
"$PY" -m pytest -q -m gpu tests/test_gpu.py tests/test_objectives.py -p no:cacheprovider 2>&1 | tail -15 | tee "$OUT/gpu_tests.log"

echo "== per-objective step time, 350M config, bf16"
timeout 240 "$PY" tools/benchmark_train.py --config configs/gpt-350m.yaml --device cuda --steps 10 --warmup 3 \
  --rounds 1 --micro-batch-size 16 --vocab-size 32000 2>&1 | tee "$OUT/benchmark_train_gpu.log"

echo "== 350M training run (DeepSpeed, bf16): tokens/s and MFU"
D=/tmp/gpu_data; mkdir -p $D
[ -f $D/docs_text_document.idx ] || "$PY" tools/preprocess_data.py --input builtin:python-docs --train-tokenizer \
  --vocab-size 8192 --output-prefix $D/docs --workers 8 > "$OUT/preprocess.log" 2>&1
rm -rf /tmp/run350
timeout 240 "$PY" -m card_megatron.train --config configs/gpt-350m.yaml data.data_path=$D/docs_text_document \
  data.tokenizer_model=$D/docs.model train.train_iters=40 train.micro_batch_size=16 train.global_batch_size=64 \
  train.log_interval=10 train.eval_iters=1 train.eval_interval=0 logging.wandb=false train.run_dir=/tmp/run350 \
  2>&1 | tee "$OUT/train_350m.log"
cp /tmp/run350/metrics.jsonl "$OUT/metrics_350m.jsonl" 2>/dev/null

# GEN_ARGS: e.g. "--checkpoint runs/demo --judge runs/demo-arm --batch-size 16" (trained demo runs).
if [ -n "${GEN_ARGS:-}" ]; then
  echo "== generation benchmark on GPU"
  timeout 180 "$PY" tools/benchmark_generate.py --device cuda $GEN_ARGS 2>&1 | tail -30 | tee "$OUT/benchmark_generate_gpu.log"
fi
