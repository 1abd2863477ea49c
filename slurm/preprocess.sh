#!/bin/bash
# Tokenize many input files in parallel on a SLURM cluster, then merge the shards.
#
#   bash slurm/preprocess.sh LIST_FILE OUTPUT_PREFIX [tools/preprocess_data.py options ...]
#
# Run it (with bash, not sbatch) from the repository root on a login node. LIST_FILE
# holds one input file per line (blank lines and # comments are skipped; relative
# paths are relative to the repository root). It submits two jobs and prints their ids:
#   1. a CPU job array, one task per input file, each running
#        tools/preprocess_data.py --input FILE --output-prefix OUTPUT_PREFIX_shards/shard_NNNNN [options]
#   2. a merge job that starts only if every array task succeeded (afterok) and runs
#        tools/preprocess_data.py --merge OUTPUT_PREFIX_shards/shard_00000_text_document ... \
#            --output-prefix OUTPUT_PREFIX_text_document
#      leaving OUTPUT_PREFIX_text_document.{bin,idx} (it is cancelled if a shard fails).
# All shards must share one tokenizer: train it once beforehand and pass it among the
# options (--tokenizer-model tok.model); --train-tokenizer is refused here. Each task
# tokenizes with --workers = its CPUs unless the options say otherwise. Documents are
# read from the JSON key "text" (the tool's default; the merge expects those shards).
#
# Environment knobs (all optional):
#   PYTHON            interpreter (default: python)
#   PREPROCESS_TOOL   the tool to run (default: tools/preprocess_data.py)
#   MAX_PARALLEL      at most this many array tasks at once (default: no limit)
#   SBATCH_OPTIONS    extra sbatch options for both jobs, e.g. "--cpus-per-task=8 --time=1:00:00"
#   SBATCH_PARTITION, SBATCH_ACCOUNT, SBATCH_TIMELIMIT, ...: read by sbatch itself
#
# The #SBATCH lines are per-task defaults for both jobs; SBATCH_OPTIONS overrides them.
#SBATCH --job-name=card-preprocess
#SBATCH --ntasks=1
#SBATCH --cpus-per-task=4
#SBATCH --time=04:00:00
# One log per array task (%A: array job id, %a: task index), in the submit directory.
#SBATCH --output=slurm-%x-%A_%a.out

set -euo pipefail

die() { echo "preprocess.sh: error: $*" >&2; exit 1; }

# Inside a job this is a copy in the spool directory: find the code via the submit dir.
if [[ -n "${SLURM_JOB_ID:-}" ]]; then ROOT=$SLURM_SUBMIT_DIR; else ROOT=$(pwd); fi
cd "$ROOT"
PYTHON=${PYTHON:-python}
# the tool imports card_megatron from this checkout (as slurm/pretrain.sh), installed or not
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
TOOL=${PREPROCESS_TOOL:-tools/preprocess_data.py}

# The input files of LIST_FILE, without blank lines and comments, into the array INPUTS.
read_list() {
  INPUTS=()
  local line
  while IFS= read -r line || [[ -n "$line" ]]; do
    line=${line%%#*}
    line=${line#"${line%%[![:space:]]*}"}  # trim leading whitespace
    line=${line%"${line##*[![:space:]]}"}  # trim trailing whitespace
    [[ -n "$line" ]] && INPUTS+=("$line")
  done < "$1"
  return 0
}
shard_prefix() { printf '%s_shards/shard_%05d' "$1" "$2"; }

MODE=submit
if [[ "${1:-}" == "--shard" || "${1:-}" == "--merge" ]]; then MODE=${1#--}; shift; fi
[[ $# -ge 2 ]] || die "usage: bash slurm/preprocess.sh LIST_FILE OUTPUT_PREFIX [tools/preprocess_data.py options ...]"
LIST=$1; OUT=$2; shift 2
OPTIONS=("$@")
[[ -f "$LIST" ]] || die "list file not found: $LIST"
read_list "$LIST"
(( ${#INPUTS[@]} > 0 )) || die "no input files listed in $LIST"

case $MODE in
  submit)
    [[ -z "${SLURM_JOB_ID:-}" ]] || die "run this with bash on a login node; it submits the jobs itself"
    [[ -f "$TOOL" ]] || die "$TOOL not found: run from the repository root or set PREPROCESS_TOOL"
    for opt in ${OPTIONS[@]+"${OPTIONS[@]}"}; do
      [[ "$opt" != --train-tokenizer ]] || die "--train-tokenizer would train one tokenizer per shard; train it once first and pass it"
    done
    for f in "${INPUTS[@]}"; do [[ -e "$f" ]] || die "input listed in $LIST not found: $f"; done
    mkdir -p "${OUT}_shards"
    SELF=${BASH_SOURCE[0]}
    N=${#INPUTS[@]}
    ARRAY_SPEC="0-$(( N - 1 ))${MAX_PARALLEL:+%$MAX_PARALLEL}"
    read -ra EXTRA_SBATCH <<< "${SBATCH_OPTIONS:-}"
    ARRAY_ID=$(sbatch --parsable ${EXTRA_SBATCH[@]+"${EXTRA_SBATCH[@]}"} --array="$ARRAY_SPEC" "$SELF" --shard "$LIST" "$OUT" ${OPTIONS[@]+"${OPTIONS[@]}"})
    ARRAY_ID=${ARRAY_ID%%;*}
    # afterok: only when every task of the array succeeded; a failed shard cancels the merge.
    MERGE_ID=$(sbatch --parsable ${EXTRA_SBATCH[@]+"${EXTRA_SBATCH[@]}"} --dependency="afterok:$ARRAY_ID" --kill-on-invalid-dep=yes \
      --job-name=card-preprocess-merge --output="slurm-%x-%j.out" \
      "$SELF" --merge "$LIST" "$OUT" ${OPTIONS[@]+"${OPTIONS[@]}"})
    MERGE_ID=${MERGE_ID%%;*}
    echo "preprocess.sh: array job $ARRAY_ID ($N shards into ${OUT}_shards/), merge job $MERGE_ID -> ${OUT}_text_document.{bin,idx}"
    echo "ARRAY_JOB_ID=$ARRAY_ID MERGE_JOB_ID=$MERGE_ID"
    ;;
  shard)
    ID=${SLURM_ARRAY_TASK_ID:?"--shard runs as a task of the job array"}
    (( ID < ${#INPUTS[@]} )) || die "array task $ID but only ${#INPUTS[@]} inputs in $LIST"
    PREFIX=$(shard_prefix "$OUT" "$ID")
    echo "preprocess.sh: shard $ID: ${INPUTS[$ID]} -> $PREFIX"
    # --workers first, so that one among OPTIONS wins (argparse keeps the last).
    exec "$PYTHON" "$TOOL" --input "${INPUTS[$ID]}" --output-prefix "$PREFIX" \
      --workers "${SLURM_CPUS_PER_TASK:-1}" ${OPTIONS[@]+"${OPTIONS[@]}"}
    ;;
  merge)
    # --merge takes the exact shard prefixes ({prefix}_text_document) and output prefix.
    SHARDS=()
    for (( i = 0; i < ${#INPUTS[@]}; i++ )); do SHARDS+=("$(shard_prefix "$OUT" "$i")_text_document"); done
    MERGE_OPTIONS=()
    for opt in ${OPTIONS[@]+"${OPTIONS[@]}"}; do
      [[ "$opt" != --overwrite ]] || MERGE_OPTIONS+=(--overwrite)
    done
    echo "preprocess.sh: merging ${#SHARDS[@]} shards -> ${OUT}_text_document"
    exec "$PYTHON" "$TOOL" --merge "${SHARDS[@]}" --output-prefix "${OUT}_text_document" \
      ${MERGE_OPTIONS[@]+"${MERGE_OPTIONS[@]}"}
    ;;
esac
