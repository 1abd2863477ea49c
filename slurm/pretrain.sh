#!/bin/bash
# Pretraining on a SLURM cluster: one srun task per node, each starting torchrun,
# which forks one training process per GPU (or PROCS_PER_NODE processes on CPU).
#
#   sbatch [sbatch options] slurm/pretrain.sh CONFIG [section.key=value ...]
#   bash slurm/pretrain.sh --dry-run CONFIG [section.key=value ...]   # print, check, launch nothing
#
# Submit from the repository root (the job finds the code in its submit directory;
# set CARD_MEGATRON_ROOT to submit from elsewhere). See docs/slurm.md.
#
# Environment knobs (all optional):
#   PYTHON           interpreter with card_megatron's requirements (default: python); checked
#                    (import card_megatron, torch, deepspeed, megatron.core) before launching
#   GPUS_PER_NODE    default: the GPUs SLURM allocated; 0 = CPU with gloo
#   PROCS_PER_NODE   training processes per node (default: GPUS_PER_NODE, or 1 on CPU)
#   NNODES           default: the job's node count (1 for a dry run outside SLURM)
#   MASTER_PORT      default: 20000 + job id mod 20000
#   TRAIN_MODULE     module torchrun starts (default: card_megatron.train)
#   TRAIN_SCRIPT     a script to start instead of TRAIN_MODULE (tests use a fake trainer)
#   MASTER_ADDR      rendezvous address (default: the first node's IPv4 address, see first_node_addr)
#   GLOO_SOCKET_IFNAME / NCCL_SOCKET_IFNAME
#                    network interface for gloo / NCCL (default: on each node, the one that
#                    routes to MASTER_ADDR; needs iproute2's `ip`)
#   REQUEUE_ON_FAILURE  1 (default): after a failed attempt that wrote a new checkpoint
#                    (a lost node), requeue the job to resume from it; 0: fail instead
#
# The #SBATCH lines below are defaults; options given to sbatch on the command line
# win. sbatch reads one option per #SBATCH line here; comments are on their own lines.
#
#SBATCH --job-name=card-pretrain
#SBATCH --nodes=2
# One task per node: that task runs torchrun, which starts the per-GPU processes.
#SBATCH --ntasks-per-node=1
# GPUs per node. On a CPU-only cluster submit with --gres=none (which replaces this
# line; --gpus-per-node=0 would not) and GPUS_PER_NODE=0.
#SBATCH --gres=gpu:8
# CPU cores per node (the one task gets them all: data loading, host-side work).
#SBATCH --cpus-per-task=64
#SBATCH --time=24:00:00
# Batch log in the submit directory; each rank's own log is in {run_dir}/logs/.
#SBATCH --output=slurm-%x-%j.out
# A requeued job keeps its id, hence its log file: append instead of truncating it.
#SBATCH --open-mode=append
# 120 s before the time limit SLURM sends USR1 to the batch shell only ("B:").
# Without B: it would go to every process of the job, and torchrun, which handles
# only TERM/INT/HUP/QUIT, would die of it at once, taking the trainer with it. The
# shell instead asks the trainer to checkpoint and then requeues the job (below).
# Raise 120 if saving a checkpoint of your model takes longer.
#SBATCH --signal=B:USR1@120
# Allow this job to be requeued (by itself after USR1, or by SLURM after a node failure).
#SBATCH --requeue

set -euo pipefail
# A USR1 that arrives while this script is still setting up is remembered (see on_usr1).
EARLY_USR1=0
trap 'EARLY_USR1=1' USR1

die() { echo "pretrain.sh: error: $*" >&2; exit 1; }

DRY_RUN=0
if [[ "${1:-}" == "--dry-run" ]]; then DRY_RUN=1; shift; fi
[[ $# -ge 1 && "$1" != -* ]] || die "usage: sbatch [sbatch options] slurm/pretrain.sh [--dry-run] CONFIG [section.key=value ...]"
CONFIG=$1; shift
OVERRIDES=("$@")

# --------------------------------------------------------------------------- where
# sbatch runs a copy of this script from the node's spool directory, so inside a job
# the code is found through the submit directory, not through $0.
if [[ -n "${CARD_MEGATRON_ROOT:-}" ]]; then
  ROOT=$CARD_MEGATRON_ROOT
elif [[ -n "${SLURM_JOB_ID:-}" && $DRY_RUN == 0 ]]; then
  ROOT=$SLURM_SUBMIT_DIR
else
  ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
fi
cd "$ROOT"
[[ -d card_megatron ]] || die "no card_megatron/ in $ROOT: submit from the repository root or set CARD_MEGATRON_ROOT"
[[ -f "$CONFIG" ]] || die "config file not found: $CONFIG (relative paths are relative to $ROOT)"
PYTHON=${PYTHON:-python}
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
# The interpreter must import the project's requirements here, before anything is launched (a
# dry run too): otherwise every rank would fail the same way after the queue wait.
if ! IMPORT_ERROR=$("$PYTHON" -c "import card_megatron, torch, deepspeed, megatron.core" 2>&1); then
  die "PYTHON=$PYTHON cannot import the project's requirements (card_megatron, torch, deepspeed, megatron.core): $(tail -n 1 <<< "$IMPORT_ERROR")
  activate the environment (source .venv/bin/activate) or set PYTHON=/path/to/.venv/bin/python"
fi

# --------------------------------------------------------------------------- how many
NNODES=${NNODES:-${SLURM_JOB_NUM_NODES:-1}}
if [[ -z "${GPUS_PER_NODE:-}" ]]; then
  if [[ -n "${SLURM_GPUS_ON_NODE:-}" ]]; then
    GPUS_PER_NODE=$SLURM_GPUS_ON_NODE
  elif [[ -n "${CUDA_VISIBLE_DEVICES:-}" ]]; then
    IFS=, read -ra _gpus <<< "$CUDA_VISIBLE_DEVICES"; GPUS_PER_NODE=${#_gpus[@]}
  else
    GPUS_PER_NODE=0
  fi
fi
if (( GPUS_PER_NODE > 0 )); then
  PROCS_PER_NODE=${PROCS_PER_NODE:-$GPUS_PER_NODE}
  DEVICE="cuda ($GPUS_PER_NODE GPUs per node, nccl)"
else
  PROCS_PER_NODE=${PROCS_PER_NODE:-1}
  DEVICE="cpu (gloo)"
fi
WORLD_SIZE=$(( NNODES * PROCS_PER_NODE ))
CPUS_PER_NODE=${SLURM_CPUS_PER_TASK:-$(nproc)}

# --------------------------------------------------------------------------- run directory
# train.run_dir from the overrides, else one per job. A requeued job keeps its job id,
# hence its run directory, and resumes from {run_dir}/checkpoints/latest.
RUN_DIR=""
for o in ${OVERRIDES[@]+"${OVERRIDES[@]}"}; do
  if [[ $o == train.run_dir=* ]]; then RUN_DIR=${o#train.run_dir=}; fi
done
if [[ -z "$RUN_DIR" ]]; then
  RUN_DIR="runs/${SLURM_JOB_NAME:-card-pretrain}-${SLURM_JOB_ID:-dryrun}"
  OVERRIDES+=("train.run_dir=$RUN_DIR")
fi
if [[ $RUN_DIR == /* ]]; then RUN_DIR_ABS=$RUN_DIR; else RUN_DIR_ABS=$ROOT/$RUN_DIR; fi
RESTART=${SLURM_RESTART_COUNT:-0}
LOG_ROOT="$RUN_DIR/logs/job${SLURM_JOB_ID:-dryrun}-restart$RESTART"

# --------------------------------------------------------------------------- rendezvous
# The interface this node uses to reach address $1: the route's device, or, for an address
# of this node itself (the route then goes through lo), the interface that carries it.
# Defined here and also run on every node (see PER_NODE), where the answer may differ.
route_iface() {
  local addr=$1 dev=""
  command -v ip >/dev/null 2>&1 || return 0
  dev=$(ip -o route get "$addr" 2>/dev/null | sed -n 's/.* dev \([^ ]*\).*/\1/p')
  if [[ -z "$dev" || "$dev" == lo ]]; then
    dev=$(ip -o addr show to "$addr" 2>/dev/null | awk '{print $2; exit}')
  fi
  echo "${dev:-}"
}
# The first node's IPv4 address, as every node can reach it. Its name is resolved here, on
# the first node (where the batch shell runs); a name that resolves to loopback (common:
# "127.0.1.1 myhost" in /etc/hosts) would send the other nodes to themselves, so then the
# address this node uses towards the second node (or its first global address) is taken.
first_node_addr() {
  local host=$1 other=${2:-} addr="" via=""
  addr=$(getent ahostsv4 "$host" 2>/dev/null | awk '{print $1; exit}')
  if [[ -z "$addr" || "$addr" == 127.* ]] && command -v ip >/dev/null 2>&1; then
    if [[ -n "$other" ]]; then
      via=$(getent ahostsv4 "$other" 2>/dev/null | awk '{print $1; exit}')
      [[ -n "$via" && "$via" != 127.* ]] && addr=$(ip -o route get "$via" 2>/dev/null | sed -n 's/.* src \([^ ]*\).*/\1/p')
    fi
    if [[ -z "$addr" || "$addr" == 127.* ]]; then
      addr=$(ip -o -4 addr show scope global 2>/dev/null | awk '{sub(/\/.*/, "", $4); print $4; exit}')
    fi
  fi
  echo "${addr:-$host}"
}
if [[ -n "${MASTER_ADDR:-}" ]]; then
  :  # given by the user: used as it is
elif (( NNODES == 1 )); then
  MASTER_ADDR=127.0.0.1  # one node: everything stays on loopback
elif [[ -n "${SLURM_JOB_NODELIST:-}" ]]; then
  mapfile -t HOSTS < <(scontrol show hostnames "$SLURM_JOB_NODELIST")
  MASTER_ADDR=$(first_node_addr "${HOSTS[0]}" "${HOSTS[1]:-}")
else
  MASTER_ADDR=$(first_node_addr "$(hostname)")
fi
# A port derived from the job id: distinct for jobs sharing a node, stable across requeues.
MASTER_PORT=${MASTER_PORT:-$(( 20000 + ${SLURM_JOB_ID:-0} % 20000 ))}
# gloo (and NCCL's bootstrap) otherwise advertise the address the host name resolves to,
# which on many clusters is loopback or the wrong one of several networks: each node
# uses the interface that routes to the rendezvous address, unless the user chose one.
if (( GPUS_PER_NODE > 0 )); then IFACE_VARS=(GLOO_SOCKET_IFNAME NCCL_SOCKET_IFNAME); else IFACE_VARS=(GLOO_SOCKET_IFNAME); fi
if [[ -n "${GLOO_SOCKET_IFNAME:-}${NCCL_SOCKET_IFNAME:-}" ]]; then
  IFACE_NOTE="${GLOO_SOCKET_IFNAME:+GLOO_SOCKET_IFNAME=$GLOO_SOCKET_IFNAME }${NCCL_SOCKET_IFNAME:+NCCL_SOCKET_IFNAME=$NCCL_SOCKET_IFNAME }(set by you, used on every node)"
else
  IFACE_HERE=$(route_iface "$MASTER_ADDR")
  IFACE_NOTE="${IFACE_HERE:-unknown (no iproute2: the libraries choose)} on this node (${IFACE_VARS[*]}; each node takes its route to $MASTER_ADDR)"
fi

# --------------------------------------------------------------------------- environment
# Python: unbuffered output so logs are current; tracebacks on fatal signals.
export PYTHONUNBUFFERED=1
export PYTHONFAULTHANDLER=1
# Threads per process for CPU math (torchrun would otherwise force 1).
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( CPUS_PER_NODE / PROCS_PER_NODE > 0 ? CPUS_PER_NODE / PROCS_PER_NODE : 1 ))}
if (( GPUS_PER_NODE > 0 )); then
  # Megatron's tensor/sequence parallelism needs kernels to start in issue order on one stream.
  export CUDA_DEVICE_MAX_CONNECTIONS=${CUDA_DEVICE_MAX_CONNECTIONS:-1}
  # Tear the job down when a NCCL collective fails or times out, instead of hanging until the time limit.
  export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}
  # Dump NCCL's flight recorder on a timeout, to see which rank was stuck where.
  export TORCH_NCCL_DUMP_ON_TIMEOUT=${TORCH_NCCL_DUMP_ON_TIMEOUT:-1}
  # NCCL prints warnings only; set INFO to see the chosen topology and transports.
  export NCCL_DEBUG=${NCCL_DEBUG:-WARN}
  # Fewer out-of-memory failures from fragmentation with varying activation sizes.
  export PYTORCH_CUDA_ALLOC_CONF=${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}
  # Site-specific; uncomment and adapt if NCCL picks the wrong adapters (the socket interface,
  # NCCL_SOCKET_IFNAME, is chosen per node below unless you set it):
  # export NCCL_IB_HCA=mlx5              # InfiniBand adapters NCCL may use
else
  # CPU run: hide any GPU so that the trainer picks gloo, as asked.
  export CUDA_VISIBLE_DEVICES=""
fi

# --------------------------------------------------------------------------- commands
if [[ -n "${TRAIN_SCRIPT:-}" ]]; then
  TRAIN=("$TRAIN_SCRIPT")
else
  TRAIN=(-m "${TRAIN_MODULE:-card_megatron.train}")
fi
# torchrun, as "python -m torch.distributed.run" so that it uses $PYTHON. Each rank's
# stdout/stderr goes to {LOG_ROOT}/node{N}/.../attempt_0/{local rank}/ and (tee) to the batch log.
TORCHRUN=(
  "$PYTHON" -m torch.distributed.run
  --nnodes="$NNODES" --nproc-per-node="$PROCS_PER_NODE"
  --rdzv-backend=static --master-addr="$MASTER_ADDR" --master-port="$MASTER_PORT"
  --rdzv-id="${SLURM_JOB_ID:-dryrun}" --max-restarts=0
  --tee=3
)
PROGRAM=("${TRAIN[@]}" --config "$CONFIG" "${OVERRIDES[@]}")
# srun starts one task per node. Only there is SLURM_NODEID (the node rank) known, so
# the node's torchrun gets its rank and log dir through torchrun's environment
# variables PET_NODE_RANK and PET_LOG_DIR (same as --node-rank / --log-dir), set by
# the inner bash (single quotes: expanded on each node). There too each node picks its
# network interface (route_iface, above) unless the user set one, and records torchrun's
# exit status in {LOG_ROOT}/node<N>.status, so that the batch shell can say which node
# failed first (srun's --kill-on-bad-exit then stops the others).
SRUN=(srun --nodes="$NNODES" --ntasks="$NNODES" --ntasks-per-node=1 --kill-on-bad-exit=1)
if [[ -n "${SLURM_CPUS_PER_TASK:-}" ]]; then SRUN+=(--cpus-per-task="$SLURM_CPUS_PER_TASK"); fi
# shellcheck disable=SC2016  # expanded on each node, not here
PER_NODE="$(declare -f route_iface)"'
export PET_NODE_RANK=$SLURM_NODEID PET_LOG_DIR=$LOG_ROOT/node$SLURM_NODEID
NODE=${SLURMD_NODENAME:-$(hostname)}
if [[ -z "${GLOO_SOCKET_IFNAME:-}${NCCL_SOCKET_IFNAME:-}" ]]; then
  IFACE=$(route_iface "$MASTER_ADDR")
  if [[ -n "$IFACE" ]]; then
    for v in $IFACE_VAR_NAMES; do export "$v=$IFACE"; done
    echo "pretrain.sh: node $SLURM_NODEID ($NODE) reaches $MASTER_ADDR through $IFACE"
  else
    echo "pretrain.sh: node $SLURM_NODEID ($NODE): no route to $MASTER_ADDR found (is iproute2 installed?); set GLOO_SOCKET_IFNAME/NCCL_SOCKET_IFNAME" >&2
  fi
fi
rm -f "$LOG_ROOT/node$SLURM_NODEID.status"
"$@"; rc=$?
echo "$rc $NODE $(date +%s.%N)" > "$LOG_ROOT/node$SLURM_NODEID.status"
exit $rc'
IFACE_VAR_NAMES="${IFACE_VARS[*]}"
export LOG_ROOT MASTER_ADDR IFACE_VAR_NAMES

echo "pretrain.sh: $(date -Is) job ${SLURM_JOB_ID:-none} restart $RESTART on ${SLURM_JOB_NODELIST:-$(hostname)}"
echo "  device      $DEVICE"
echo "  layout      $NNODES node(s) x $PROCS_PER_NODE process(es) = world size $WORLD_SIZE"
echo "  rendezvous  $MASTER_ADDR:$MASTER_PORT"
echo "  interface   $IFACE_NOTE"
echo "  run dir     $RUN_DIR_ABS"
echo "  rank logs   $RUN_DIR_ABS/${LOG_ROOT#"$RUN_DIR"/}/node<N>/"
"$PYTHON" -m card_megatron.launch_check --world-size "$WORLD_SIZE" --config "$CONFIG" "${OVERRIDES[@]}" \
  || die "the config does not fit this job; fix the parallel sizes, node count or PROCS_PER_NODE"

if (( DRY_RUN )); then
  echo "  command     ${SRUN[*]} bash -c '<per node: interface, node rank, log dir, exit status>' \\"
  echo "                ${TORCHRUN[*]} \\"
  echo "                ${PROGRAM[*]}"
  echo "dry run: nothing launched"
  exit 0
fi
[[ -n "${SLURM_JOB_ID:-}" ]] || die "not inside a SLURM job: submit with sbatch, or use --dry-run"

# --------------------------------------------------------------------------- record
mkdir -p "$LOG_ROOT"
git -C "$ROOT" rev-parse HEAD > "$RUN_DIR/git_revision.txt.tmp" 2>/dev/null || echo unknown > "$RUN_DIR/git_revision.txt.tmp"
mv -f "$RUN_DIR/git_revision.txt.tmp" "$RUN_DIR/git_revision.txt"
echo "$(date -Is) job $SLURM_JOB_ID restart $RESTART nodes $SLURM_JOB_NODELIST world $WORLD_SIZE" >> "$RUN_DIR/jobs.txt"
START_CKPT=""
if [[ -f "$RUN_DIR/checkpoints/latest" ]]; then
  START_CKPT=$(cat "$RUN_DIR/checkpoints/latest")
  echo "  resuming    from $RUN_DIR/checkpoints/$START_CKPT"
fi
# The markers describe this attempt: one left from an earlier one must not stop this
# run at once, trigger a requeue, or hide one.
rm -f "$RUN_DIR/SAVE_AND_EXIT" "$RUN_DIR/preempted" "$RUN_DIR/finished"

# --------------------------------------------------------------------------- run
# USR1 (time limit near, or `scancel --signal=USR1 --batch JOBID`): ask every rank,
# through the shared file system, to checkpoint at the next step boundary and exit.
on_usr1() {
  echo "pretrain.sh: $(date -Is) got USR1: asking the trainer to save and exit"
  touch "$RUN_DIR/SAVE_AND_EXIT"
}
trap on_usr1 USR1
if (( EARLY_USR1 )); then on_usr1; fi

"${SRUN[@]}" bash -c "$PER_NODE" pretrain-node "${TORCHRUN[@]}" "${PROGRAM[@]}" &
STEP_PID=$!

# A trapped signal interrupts `wait`; wait again until the step has really ended.
rc=0
while :; do
  wait "$STEP_PID" && rc=0 || rc=$?
  kill -0 "$STEP_PID" 2>/dev/null || break
done
if (( rc > 128 )); then wait "$STEP_PID" && rc=0 || rc=$?; fi  # its own status, not the signal's
echo "pretrain.sh: $(date -Is) training step ended with status $rc"

if [[ -f "$RUN_DIR/finished" ]]; then
  echo "pretrain.sh: training finished"
  exit "$rc"
fi
if [[ -f "$RUN_DIR/preempted" ]]; then
  echo "pretrain.sh: checkpoint saved at step $(cat "$RUN_DIR/preempted"); requeueing job $SLURM_JOB_ID"
  rm -f "$RUN_DIR/preempted"
  scontrol requeue "$SLURM_JOB_ID" \
    || die "scontrol requeue failed; resume by hand: sbatch slurm/pretrain.sh $CONFIG ${OVERRIDES[*]}"
  exit 0
fi
if (( rc == 0 )); then
  echo "pretrain.sh: the trainer exited early without asking to be requeued (e.g. train.exit_interval); resubmit the same command to continue"
  exit 0
fi
# Which nodes failed, in the order their torchrun ended (recorded in node<N>.status; srun's
# --kill-on-bad-exit stops the others, which then usually record nothing). When a node's
# processes die, its peers lose their connections at the same moment, so the first
# failure is the likely culprit but not a certain one: the rank logs tell.
FAILED_NODES=""
while read -r _ node_id node_rc node_name; do
  FAILED_NODES+="${FAILED_NODES:+, then }node $node_id ($node_name, status $node_rc)"
done < <(for f in "$LOG_ROOT"/node*.status; do
           [[ -f "$f" ]] || continue
           read -r node_rc node_name node_time < "$f" || continue
           node_id=${f##*/node}; node_id=${node_id%.status}
           if [[ "$node_rc" != 0 ]]; then echo "${node_time:-0} $node_id $node_rc $node_name"; fi
         done | sort -n)
echo "pretrain.sh: training failed (status $rc)${FAILED_NODES:+ on $FAILED_NODES}: its processes died or lost a peer;" \
  "rank logs in $RUN_DIR_ABS/${LOG_ROOT#"$RUN_DIR"/}" >&2
# A failure after progress (a node lost, a process killed) is worth another attempt: requeue
# once this attempt has written a newer checkpoint than it started from. A failure that
# repeats before any new checkpoint (a bug, bad data) therefore stops the job, not loops it.
END_CKPT=""
if [[ -f "$RUN_DIR/checkpoints/latest" ]]; then END_CKPT=$(cat "$RUN_DIR/checkpoints/latest"); fi
if [[ "${REQUEUE_ON_FAILURE:-1}" == 1 && -n "$END_CKPT" && "$END_CKPT" != "$START_CKPT" ]]; then
  echo "pretrain.sh: this attempt reached checkpoint $END_CKPT (it started from ${START_CKPT:-none}); requeueing job $SLURM_JOB_ID to resume from it"
  scontrol requeue "$SLURM_JOB_ID" \
    || die "scontrol requeue failed; resume by hand: sbatch slurm/pretrain.sh $CONFIG ${OVERRIDES[*]}"
  exit 0
fi
echo "pretrain.sh: not requeued: no new checkpoint since this attempt started${START_CKPT:+ (from $START_CKPT)}" \
  "(or REQUEUE_ON_FAILURE=0); fix the cause and resubmit the same command to resume" >&2
exit "$rc"
