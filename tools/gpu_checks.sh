#!/usr/bin/env bash
# The GPU checks of the speed issue (23) in one call, in under 8 minutes (the steps' timeouts add
# up to 475 s): device and versions; the GPU tests (bf16, NCCL, CUDA corruption == CPU, compiled
# layers, CUDA-graph decoding == dynamic); our training step against the plain-PyTorch anchor with
# MFU and a profile by category, for the 350M config at sequence 1024 and card-1b at sequence 128
# (one GPU); and, with GEN_ARGS, the decoding table at batch 1, 16 and 64 with CUDA graphs on and
# off side by side (each AR and CARD row followed by its twin with --cuda-graphs). The study's plan is tools/gpu_study.sh (9 minutes).
#
# Restartable: a step that succeeded leaves ${OUT}/done/<step>, and a second call skips it, so a
# call cut short by the device's time limit continues where it stopped. Logs: ${OUT}/<step>.log.
# Scratch files (the tokenized corpus, run directories) go to a temporary directory of this
# call's own, removed when it ends.
#
#   bash tools/gpu_checks.sh              # OUT=gpu_out
#   DRY_RUN=1 bash tools/gpu_checks.sh    # prints each step and its command, runs nothing
#   CPU=1 bash tools/gpu_checks.sh        # the same steps on the CPU at tiny sizes: checks the script
#   GEN_ARGS="--checkpoint runs/demo --judge runs/demo-arm" bash tools/gpu_checks.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_out}
PY=${PY:-python3}
mkdir -p "$OUT/done"
WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu_checks.XXXXXX")
trap 'rm -rf -- "$WORK"' EXIT
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 WANDB_MODE=offline
failed=0

# step NAME TIMEOUT_S COMMAND...: runs COMMAND (output in $OUT/NAME.log) unless $OUT/done/NAME exists.
step() {
  local name=$1 limit=$2
  shift 2
  if [ -e "$OUT/done/$name" ]; then
    echo "== $name: done in an earlier call, skipped (rm $OUT/done/$name to rerun it)"
    return 0
  fi
  echo "== $name (at most ${limit} s): $*"
  [ -n "${DRY_RUN:-}" ] && return 0
  timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
  local rc=$?
  tail -n 20 "$OUT/$name.log"
  if [ $rc -eq 0 ]; then
    touch "$OUT/done/$name"
  else
    echo "== $name FAILED (exit $rc$([ $rc -eq 124 ] && echo ', timed out')): call the script again to retry it"
    failed=1
  fi
}

if [ -n "${CPU:-}" ]; then
  DEVICE=cpu
  # tiny sizes: the point is that every step runs, not the numbers
  ANCHOR_350M=(--config configs/tiny-cpu.yaml --seq-length 32 --micro-batch-size 2 --steps 2 --warmup 1 --profile 1)
  ANCHOR_1B=(--config configs/demo.yaml --seq-length 32 --micro-batch-size 2 --steps 2 --warmup 1 --profile 1 --anchors plain)
  GPU_TESTS=(tests/test_gpu.py -m gpu)
else
  DEVICE=cuda
  ANCHOR_350M=(--config configs/gpt-350m.yaml --seq-length 1024 --micro-batch-size 16 --vocab-size 32000
    --precision bf16 --steps 8 --warmup 3 --profile 2)
  # card-1b on one GPU: TP=1, no ZeRO; one anchor (two 1B models and their AdamW states fit in 80 GB, three may not)
  ANCHOR_1B=(--config configs/card-1b.yaml --seq-length 128 --micro-batch-size 64 --vocab-size 32000 --precision bf16
    --steps 6 --warmup 3 --profile 2 --anchors plain
    --override parallel.tensor_model_parallel_size=1 --override parallel.zero_stage=0)
  GPU_TESTS=(-m gpu tests/test_gpu.py tests/test_objectives.py)
fi

if [ -z "${DRY_RUN:-}" ]; then
  {
    if [ "$DEVICE" = cuda ]; then
      nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
    else
      echo "CPU mode: $(nproc) cores"
    fi
    "$PY" -c "from card_megatron import cli; cli.start_logging(None)
import torch, deepspeed, megatron.core
print('torch', torch.__version__, 'deepspeed', deepspeed.__version__, 'megatron-core', megatron.core.__version__)"
  } 2>&1 | tee "$OUT/device.txt"
  compgen -G 'card_megatron/_indexer*.so' >/dev/null || "$PY" setup.py build_ext --inplace -q
fi

step gpu_tests 100 "$PY" -m pytest -q -p no:cacheprovider "${GPU_TESTS[@]}"
step anchor_350m 150 "$PY" tools/benchmark_train.py --anchor --device "$DEVICE" "${ANCHOR_350M[@]}"
step anchor_card1b 150 "$PY" tools/benchmark_train.py --anchor --device "$DEVICE" "${ANCHOR_1B[@]}"
if [ -n "${GEN_ARGS:-}" ]; then
  # shellcheck disable=SC2086  # GEN_ARGS is a list of arguments
  # with CUDA graphs on and off side by side (issue 19): every AR and CARD row followed by its "graphs" twin
  for b in 1 16 64; do
    step "generate_batch$b" 25 "$PY" tools/benchmark_generate.py --device "$DEVICE" --batch-size "$b" $GEN_ARGS \
      --cuda-graphs
  done
fi
echo "== logs in $OUT/ ($(ls "$OUT"/done | wc -l) steps done)"
exit $failed
