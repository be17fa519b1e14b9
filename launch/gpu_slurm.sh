#!/usr/bin/env bash
# Usage: launch/gpu_slurm.sh --nodes=2 --gpus-per-node=8 --workdir=DIR --config=configs/llama.py:PRESET [flags] [-- EXTRA_ARGS...]
#
# Runs a regift_jax entry point on SLURM GPU nodes, one JAX process per GPU.
#
# Writes an sbatch script and submits it with `sbatch` (or, with --srun, runs it with bash inside
# an allocation you already hold, e.g. from salloc).  --dry-run prints the script and the
# commands instead, and runs nothing.  The script:
#   * asks for NODES nodes with GPUS_PER_NODE GPUs and GPUS_PER_NODE/PROCS_PER_NODE tasks each;
#   * exports JAX_COORDINATOR_ADDRESS=<first node of the job>:PORT (jax.distributed reads it;
#     PORT defaults to 20000 + SLURM_JOB_ID % 20000; a JAX_COORDINATOR_ADDRESS already in the
#     environment wins);
#   * starts every task with `srun --distribution=block` (task 0, which hosts the coordinator,
#     is on the first node) and, per task, exports JAX_NUM_PROCESSES=$SLURM_NTASKS,
#     JAX_PROCESS_ID=$SLURM_PROCID and JAX_LOCAL_DEVICE_IDS = the task's GPUs
#     (SLURM_LOCALID*K .. SLURM_LOCALID*K+K-1 with K GPUs per task, or 0..K-1 when SLURM
#     already narrowed CUDA_VISIBLE_DEVICES to the task's K GPUs).  CUDA_VISIBLE_DEVICES itself
#     is left as SLURM set it: jax.distributed.initialize() maps JAX_LOCAL_DEVICE_IDS onto the
#     visible devices, and its SLURM auto-detection would otherwise pick GPU SLURM_LOCALID, which
#     does not exist once CUDA_VISIBLE_DEVICES has been cut to one GPU;
#   * runs `python -m MODULE --config=CONFIG --config.workdir=WORKDIR EXTRA_ARGS` in the checkout.
#
# Flags (--flag=value or --flag value):
#   --nodes N                  number of nodes (default 1)
#   --gpus-per-node G          GPUs per node (default 8)
#   --procs-per-node P         JAX processes per node (default G: one per GPU; 1: one per node)
#   --cpus-per-task C          CPUs per task (input pipeline threads); default: SLURM's
#   --partition P              SLURM partition
#   --time T                   time limit, e.g. 24:00:00
#   --account A                SLURM account
#   --job-name NAME            default regift
#   --sbatch-arg ARG           extra #SBATCH line, e.g. --sbatch-arg=--qos=high (repeatable)
#   --no-exclusive             share nodes (default: #SBATCH --exclusive)
#   --port PORT                coordinator port (default 20000 + SLURM_JOB_ID % 20000)
#   --repo-dir DIR             checkout on the shared file system (default: this script's repo)
#   --log-dir DIR              SLURM logs and the written script (default ./slurm_logs)
#   --script-out FILE          where to write the sbatch script (default LOG_DIR/JOB_NAME.sbatch)
#   --venv DIR                 virtual environment to activate (DIR/bin/activate)
#   --setup CMD                shell command run before srun, e.g. 'module load cuda/12.4'
#                              (repeatable)
#   --env KEY=VALUE            exported for the run (repeatable), e.g. XLA_PYTHON_CLIENT_MEM_FRACTION=.9
#   --python PYTHON            interpreter (default python)
#   --module MODULE            python -m entry point (default regift_jax.train; also
#                              regift_jax.generate_traces, regift_jax.evaluate, ...)
#   --cmd CMD                  run this shell command in every task instead of python -m MODULE
#   --config CONFIG            --config of the entry point (required for train/generate_traces)
#   --workdir DIR              output directory on the shared file system or gs://, passed as
#                              WORKDIR_FLAG=DIR (required for train; relative paths are made
#                              absolute against the current directory)
#   --workdir-flag FLAG        flag that receives --workdir (default --config.workdir)
#   --srun                     run the script with bash inside the current allocation
#   --dry-run                  print the script and the commands, run nothing
#   -- EXTRA_ARGS...           passed to the entry point unchanged, e.g. --config.train.num_epochs=3

set -euo pipefail

USAGE_ARGS='--nodes=N --gpus-per-node=G --workdir=DIR --config=CONFIG [flags] [-- EXTRA_ARGS...]'
# shellcheck source=common.sh
. "$(dirname "${BASH_SOURCE[0]}")/common.sh"

is_uint() { [[ $1 =~ ^[1-9][0-9]*$ ]]; }

NODES=1 GPUS=8 PROCS="" CPUS="" PARTITION="" TIME="" ACCOUNT="" JOB_NAME="regift" EXCLUSIVE=1
PORT="" REPO_DIR=$REPO_ROOT LOG_DIR="slurm_logs" SCRIPT_OUT="" VENV="" PYTHON="python"
MODULE="regift_jax.train" CMD="" CONFIG="" WORKDIR="" WORKDIR_FLAG="--config.workdir"
SRUN_MODE=0
SBATCH_ARGS=() SETUP_CMDS=() ENVS=()

on_switch() {
  case $1 in
    --srun) SRUN_MODE=1 ;;
    --no-exclusive) EXCLUSIVE=0 ;;
    *) return 1 ;;
  esac
}

on_value() {
  case $1 in
    --nodes) NODES=$2 ;;
    --gpus-per-node) GPUS=$2 ;;
    --procs-per-node) PROCS=$2 ;;
    --cpus-per-task) CPUS=$2 ;;
    --partition) PARTITION=$2 ;;
    --time) TIME=$2 ;;
    --account) ACCOUNT=$2 ;;
    --job-name) JOB_NAME=$2 ;;
    --sbatch-arg) SBATCH_ARGS+=("$2") ;;
    --port) PORT=$2 ;;
    --repo-dir) REPO_DIR=$2 ;;
    --log-dir) LOG_DIR=$2 ;;
    --script-out) SCRIPT_OUT=$2 ;;
    --venv) VENV=$2 ;;
    --setup) SETUP_CMDS+=("$2") ;;
    --env) ENVS+=("$2") ;;
    --python) PYTHON=$2 ;;
    --module) MODULE=$2 ;;
    --cmd) CMD=$2 ;;
    --config) CONFIG=$2 ;;
    --workdir) WORKDIR=$2 ;;
    --workdir-flag) WORKDIR_FLAG=$2 ;;
    *) die "unknown flag $1" ;;
  esac
}

parse_args "$@"

# ---- validation -------------------------------------------------------------------------------
is_uint "$NODES" || die "--nodes='$NODES' is not a positive integer"
is_uint "$GPUS" || die "--gpus-per-node='$GPUS' is not a positive integer"
PROCS=${PROCS:-$GPUS}
is_uint "$PROCS" || die "--procs-per-node='$PROCS' is not a positive integer"
((GPUS % PROCS == 0)) || die "--gpus-per-node=$GPUS is not a multiple of --procs-per-node=$PROCS"
GPUS_PER_TASK=$((GPUS / PROCS))
[[ -z $CPUS ]] || is_uint "$CPUS" || die "--cpus-per-task='$CPUS' is not a positive integer"
[[ -z $PORT ]] || { is_uint "$PORT" && ((PORT < 65536)); } || die "--port='$PORT' is not a port number"
[[ $JOB_NAME =~ ^[A-Za-z0-9_.-]+$ ]] || die "--job-name='$JOB_NAME': letters, digits, '_', '.', '-' only"
for a in ${SBATCH_ARGS[@]+"${SBATCH_ARGS[@]}"}; do
  [[ $a == --?* && $a != *$'\n'* ]] || die "--sbatch-arg='$a' must be one sbatch option such as --qos=high"
done
check_envs
check_job "a directory all nodes can write, or gs://..."

abspath() { # absolute form of a local path (no file system access); URLs stay as they are
  case $1 in
    /* | *://*) printf '%s' "$1" ;;
    *) printf '%s/%s' "$PWD" "${1#./}" ;;
  esac
}
[[ -z $WORKDIR ]] || WORKDIR=$(abspath "$WORKDIR")
REPO_DIR=$(abspath "$REPO_DIR")
LOG_DIR=$(abspath "$LOG_DIR")
SCRIPT_OUT=$(abspath "${SCRIPT_OUT:-$LOG_DIR/$JOB_NAME.sbatch}")
[[ -z $VENV ]] || VENV=$(abspath "$VENV")

# ---- the sbatch script ------------------------------------------------------------------------
if [[ -n $CMD ]]; then
  JOB=$(join_quoted bash -c "$CMD")
else
  JOB=$(entry_point)
fi
SRUN=(srun --nodes="$NODES" --ntasks-per-node="$PROCS" --distribution=block --kill-on-bad-exit=1)
[[ -z $CPUS ]] || SRUN+=(--cpus-per-task="$CPUS")

# Per-task prologue: the JAX process layout from SLURM's task variables.  Single-quoted on
# purpose: it is expanded by each task's shell.
# shellcheck disable=SC2016
TASK_PROLOGUE='set -euo pipefail
export JAX_NUM_PROCESSES="$SLURM_NTASKS" JAX_PROCESS_ID="$SLURM_PROCID"
IFS=, read -ra visible <<< "${CUDA_VISIBLE_DEVICES:-}"
if ((${#visible[@]} == gpus_per_task && gpus_per_task < gpus_per_node)); then
  first=0  # SLURM bound this task to its own GPUs
elif ((${#visible[@]} == 0 || ${#visible[@]} == gpus_per_node)); then
  first=$((SLURM_LOCALID * gpus_per_task))
else
  echo "task $SLURM_PROCID: CUDA_VISIBLE_DEVICES=$CUDA_VISIBLE_DEVICES lists ${#visible[@]} GPUs;" \
    "expected $gpus_per_node (all) or $gpus_per_task (this task'"'"'s)" >&2
  exit 1
fi
ids=$first
for ((i = first + 1; i < first + gpus_per_task; i++)); do ids+=",$i"; done
export JAX_LOCAL_DEVICE_IDS="$ids"
exec "$@"'
TASK_PROLOGUE="gpus_per_node=$GPUS gpus_per_task=$GPUS_PER_TASK
$TASK_PROLOGUE"

# shellcheck disable=SC2016  # the script text holds expressions for the job's shell
write_script() {
  local a kv c
  printf '#!/usr/bin/env bash\n'
  printf '#SBATCH --job-name=%s\n' "$JOB_NAME"
  printf '#SBATCH --nodes=%s\n' "$NODES"
  printf '#SBATCH --ntasks-per-node=%s\n' "$PROCS"
  printf '#SBATCH --gpus-per-node=%s\n' "$GPUS"
  [[ -z $CPUS ]] || printf '#SBATCH --cpus-per-task=%s\n' "$CPUS"
  [[ -z $PARTITION ]] || printf '#SBATCH --partition=%s\n' "$PARTITION"
  [[ -z $TIME ]] || printf '#SBATCH --time=%s\n' "$TIME"
  [[ -z $ACCOUNT ]] || printf '#SBATCH --account=%s\n' "$ACCOUNT"
  ((!EXCLUSIVE)) || printf '#SBATCH --exclusive\n'
  printf '#SBATCH --chdir=%s\n' "$REPO_DIR"
  printf '#SBATCH --output=%s/%%x-%%j.out\n' "$LOG_DIR"
  for a in ${SBATCH_ARGS[@]+"${SBATCH_ARGS[@]}"}; do
    printf '#SBATCH %s\n' "$a"
  done
  printf '# Written by launch/gpu_slurm.sh: submit with sbatch, or run with bash inside an allocation.\n'
  printf 'set -euo pipefail\n'
  printf 'cd %s\n' "$(shquote "$REPO_DIR")"
  [[ -z $VENV ]] || printf '# shellcheck source=/dev/null\n. %s\n' "$(shquote "$VENV/bin/activate")"
  for c in ${SETUP_CMDS[@]+"${SETUP_CMDS[@]}"}; do
    printf '%s\n' "$c"
  done
  for kv in ${ENVS[@]+"${ENVS[@]}"}; do
    printf 'export %s\n' "$(shquote "$kv")"
  done
  if [[ -n $PORT ]]; then
    printf 'port=%s\n' "$PORT"
  else
    printf 'port=$((20000 + SLURM_JOB_ID %% 20000))\n'
  fi
  cat <<'EOF'
nodes=$(scontrol show hostnames "$SLURM_JOB_NODELIST")
export JAX_COORDINATOR_ADDRESS="${JAX_COORDINATOR_ADDRESS:-${nodes%%$'\n'*}:$port}"
EOF
  printf 'echo "JAX coordinator $JAX_COORDINATOR_ADDRESS: %s nodes x %s processes, %s GPU(s) each"\n' \
    "$NODES" "$PROCS" "$GPUS_PER_TASK"
  printf '# shellcheck disable=SC2016  # expanded by each task'"'"'s shell\n'
  printf 'task_prologue=%s\n' "$(shquote "$TASK_PROLOGUE")"
  printf '# shellcheck disable=SC2016  # the arguments are literal\n'
  printf '%s bash -c "$task_prologue" regift-task %s\n' "$(join_quoted "${SRUN[@]}")" "$JOB"
}

SCRIPT_TEXT=$(write_script)
if ((SRUN_MODE)); then
  SUBMIT=(bash "$SCRIPT_OUT")
else
  SUBMIT=(sbatch "$SCRIPT_OUT")
fi

if ((DRY_RUN)); then
  printf '# ---- %s ----\n%s\n# ---- commands ----\n' "$SCRIPT_OUT" "$SCRIPT_TEXT"
  run mkdir -p "$LOG_DIR"
  run "${SUBMIT[@]}"
  exit 0
fi

if ((SRUN_MODE)) && [[ -z ${SLURM_JOB_ID:-} ]]; then
  die "--srun runs inside an allocation, but SLURM_JOB_ID is not set (use salloc first, or drop --srun)"
fi
run mkdir -p "$LOG_DIR" "$(dirname "$SCRIPT_OUT")"
printf '%s\n' "$SCRIPT_TEXT" >"$SCRIPT_OUT"
printf '%s: wrote %s\n' "$PROG" "$SCRIPT_OUT" >&2
run "${SUBMIT[@]}"
