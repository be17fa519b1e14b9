#!/usr/bin/env bash
# Usage: launch/tpu_pod.sh --name=NAME --zone=ZONE --workdir=gs://BUCKET/RUN --config=configs/llama.py:PRESET [flags] [-- EXTRA_ARGS...]
#
# Runs a regift_jax entry point on every worker of a Cloud TPU VM slice at once.
#
# Steps, each one command; --dry-run prints them, shell-quoted, one per line, and runs nothing (it
# only reads the local git checkout to resolve --ref):
#   0. the preflight, on this machine (default; --no-preflight skips it): the run's programs
#      compiled for --accelerator-type by `python3 -m regift_jax.preflight --config=CONFIG
#      --accelerator_type=TYPE` plus the --config.* / --model= arguments after --, in the
#      checkout; a config that does not fit stops here (exit 3), before any slice is created.
#      Needs the TPU compiler here (pip install -e '.[tpu]'); applies to regift_jax.train,
#      regift_jax.generate_traces and regift_jax.evaluate with --config, not to --cmd;
#   1. create the slice (`gcloud compute tpus tpu-vm create`), or with --reuse check it exists;
#   2. put the code at --ref on every worker: --source=scp (default) copies `git archive REF` with
#      `tpu-vm scp --worker=all` (works for private repos and unpushed commits); --source=git runs
#      `git clone --repo` on the workers;
#   3. `pip install -e '.[tpu]'` on every worker (skip with --skip-setup; more with --setup=CMD);
#   4. run `python3 -m MODULE --config=CONFIG --config.workdir=WORKDIR EXTRA_ARGS` on all workers
#      (`tpu-vm ssh --worker=all`).  Each worker is one JAX process; the trainer calls
#      jax.distributed.initialize() with no arguments, which on a TPU VM finds the coordinator,
#      process count and process id from the TPU metadata.  Checkpoints and TensorBoard go to the
#      gs:// workdir (every worker must see the same directory, so a local path is refused);
#   5. with --delete, delete the slice afterwards, also when the run failed.
#
# Flags (--flag=value or --flag value):
#   --name NAME                TPU VM name (required)
#   --zone ZONE                e.g. us-west4-a (required)
#   --project PROJECT          GCP project (default: gcloud's configured project)
#   --accelerator-type TYPE    default v5litepod-16 (4 hosts x 4 v5e chips)
#   --runtime-version VERSION  default from the type: v6e v2-alpha-tpuv6e, v5p v2-alpha-tpuv5,
#                              v5e/v5litepod v2-alpha-tpuv5-lite, v4 and older tpu-ubuntu2204-base
#   --spot                     create a Spot slice
#   --service-account EMAIL    service account of the slice (needs write access to the bucket)
#   --reuse                    do not create; the slice must exist
#   --delete                   delete the slice at the end
#   --source scp|git           how the code gets to the workers (default scp)
#   --repo URL                 clone URL for --source=git (default: the checkout's origin remote)
#   --ref REF                  commit, tag or branch to run (default: the checkout's HEAD commit)
#   --remote-dir DIR           checkout directory in each worker's home (default regift_jax)
#   --python PYTHON            interpreter on the workers (default python3)
#   --pip-extra EXTRA          extra of setup.py to install (default tpu)
#   --setup CMD                further shell command run in the checkout after the install, in
#                              a subshell (repeatable), e.g. --setup='python3 -m pip install gcsfs'
#   --skip-setup               skip the code copy and install (the slice was prepared before)
#   --module MODULE            python -m entry point (default regift_jax.train; also
#                              regift_jax.generate_traces, regift_jax.evaluate, ...)
#   --cmd CMD                  run this shell command instead of `python3 -m MODULE ...`
#   --config CONFIG            --config of the entry point (required for train/generate_traces)
#   --workdir gs://...         output directory, passed as WORKDIR_FLAG=WORKDIR (required for train)
#   --workdir-flag FLAG        flag that receives --workdir (default --config.workdir)
#   --env KEY=VALUE            environment variable for the run (repeatable), e.g. LIBTPU_INIT_ARGS
#   --detach                   start the run under nohup (log: REMOTE_DIR/run.log) and return
#   --gcloud BIN               gcloud executable (default gcloud)
#   --preflight                check the config against the slice first (the default)
#   --no-preflight             skip the preflight
#   --preflight-python PYTHON  interpreter of the preflight on this machine (default python3)
#   --dry-run                  print the commands, run nothing
#   -- EXTRA_ARGS...           passed to the entry point unchanged, e.g. --config.train.num_epochs=3

set -euo pipefail

USAGE_ARGS='--name=NAME --zone=ZONE --workdir=gs://BUCKET/RUN --config=CONFIG [flags] [-- EXTRA_ARGS...]'
# shellcheck source=common.sh
. "$(dirname "${BASH_SOURCE[0]}")/common.sh"

NAME="" ZONE="" PROJECT="" ACCEL="v5litepod-16" RUNTIME="" SPOT=0 SERVICE_ACCOUNT=""
REUSE=0 DELETE=0 SOURCE="scp" REPO="" REF="" REMOTE_DIR="regift_jax" PYTHON="python3"
PIP_EXTRA="tpu" SKIP_SETUP=0 MODULE="regift_jax.train" CMD="" CONFIG="" WORKDIR=""
WORKDIR_FLAG="--config.workdir" DETACH=0 GCLOUD="gcloud" PREFLIGHT=1 PREFLIGHT_PYTHON="python3"
SETUP_CMDS=() ENVS=()

on_switch() {
  case $1 in
    --reuse) REUSE=1 ;;
    --delete) DELETE=1 ;;
    --spot) SPOT=1 ;;
    --skip-setup) SKIP_SETUP=1 ;;
    --detach) DETACH=1 ;;
    --preflight) PREFLIGHT=1 ;;
    --no-preflight) PREFLIGHT=0 ;;
    *) return 1 ;;
  esac
}

on_value() {
  case $1 in
    --name) NAME=$2 ;;
    --zone) ZONE=$2 ;;
    --project) PROJECT=$2 ;;
    --accelerator-type) ACCEL=$2 ;;
    --runtime-version) RUNTIME=$2 ;;
    --service-account) SERVICE_ACCOUNT=$2 ;;
    --source) SOURCE=$2 ;;
    --repo) REPO=$2 ;;
    --ref) REF=$2 ;;
    --remote-dir) REMOTE_DIR=$2 ;;
    --python) PYTHON=$2 ;;
    --pip-extra) PIP_EXTRA=$2 ;;
    --setup) SETUP_CMDS+=("$2") ;;
    --module) MODULE=$2 ;;
    --cmd) CMD=$2 ;;
    --config) CONFIG=$2 ;;
    --workdir) WORKDIR=$2 ;;
    --workdir-flag) WORKDIR_FLAG=$2 ;;
    --env) ENVS+=("$2") ;;
    --gcloud) GCLOUD=$2 ;;
    --preflight-python) PREFLIGHT_PYTHON=$2 ;;
    *) die "unknown flag $1" ;;
  esac
}

parse_args "$@"

# ---- validation -------------------------------------------------------------------------------
[[ -n $NAME ]] || die "--name is required (the TPU VM name)"
[[ -n $ZONE ]] || die "--zone is required (e.g. --zone=us-west4-a)"
[[ $NAME =~ ^[a-z]([-a-z0-9]*[a-z0-9])?$ ]] ||
  die "--name='$NAME': use lower-case letters, digits and '-', starting with a letter"
[[ -n $ACCEL ]] || die "--accelerator-type is empty"
if [[ -z $RUNTIME ]]; then
  case $ACCEL in
    v6e-*) RUNTIME="v2-alpha-tpuv6e" ;;
    v5p-*) RUNTIME="v2-alpha-tpuv5" ;;
    v5litepod-* | v5e-*) RUNTIME="v2-alpha-tpuv5-lite" ;;
    v2-* | v3-* | v4-*) RUNTIME="tpu-ubuntu2204-base" ;;
    *) die "no default --runtime-version for --accelerator-type=$ACCEL; pass --runtime-version" ;;
  esac
fi
[[ $REMOTE_DIR =~ ^[A-Za-z0-9_][A-Za-z0-9_.-]*$ && $REMOTE_DIR != *..* ]] ||
  die "--remote-dir='$REMOTE_DIR': a plain directory name in the workers' home is expected"
((REUSE || !SKIP_SETUP)) || die "--skip-setup needs --reuse (a new slice has no code on it)"
((!(DETACH && DELETE))) || die "--detach and --delete exclude each other (the slice would be deleted under the run)"

check_job "e.g. --workdir=gs://BUCKET/regift/llama3_1_8b"
if [[ -n $WORKDIR && $WORKDIR != gs://?* ]]; then
  die "--workdir='$WORKDIR' must be a gs:// path: every worker writes checkpoints to the same directory"
fi
check_envs

# ---- code source ------------------------------------------------------------------------------
COMMIT=""
TARBALL=""
if ((!SKIP_SETUP)); then
  case $SOURCE in
    scp)
      [[ -z $REPO ]] || die "--repo is only used with --source=git"
      git -C "$REPO_ROOT" rev-parse --git-dir >/dev/null 2>&1 ||
        die "--source=scp needs a git checkout at $REPO_ROOT"
      COMMIT=$(git -C "$REPO_ROOT" rev-parse --verify --quiet "${REF:-HEAD}^{commit}") ||
        die "--ref='${REF:-HEAD}' is not a commit of the checkout at $REPO_ROOT"
      TARBALL="${TMPDIR:-/tmp}/regift_jax-$COMMIT.tar.gz"
      ;;
    git)
      if [[ -z $REPO ]]; then
        REPO=$(git -C "$REPO_ROOT" remote get-url origin 2>/dev/null) ||
          die "--source=git: no --repo given and the checkout has no 'origin' remote"
      fi
      if [[ -z $REF ]]; then
        REF=$(git -C "$REPO_ROOT" rev-parse --verify --quiet 'HEAD^{commit}') ||
          die "--source=git: no --ref given and the checkout's HEAD cannot be read"
      fi
      ;;
    *) die "--source='$SOURCE': expected scp or git" ;;
  esac
fi

# ---- the commands -----------------------------------------------------------------------------
G=("$GCLOUD" compute tpus tpu-vm)
LOC=(--zone="$ZONE")
[[ -z $PROJECT ]] || LOC+=(--project="$PROJECT")

ssh_all() { # ssh_all REMOTE_COMMAND: run one shell command on every worker
  run "${G[@]}" ssh "$NAME" "${LOC[@]}" --worker=all --command="$1"
}

# The entry-point command line as one shell string for the workers.
if [[ -n $CMD ]]; then
  JOB=$CMD
else
  JOB=$(entry_point)
fi
PREFIX="cd $(shquote "$REMOTE_DIR")"
for kv in ${ENVS[@]+"${ENVS[@]}"}; do
  PREFIX+=" && export $(shquote "$kv")"
done
if ((DETACH)); then
  RUN_REMOTE="$PREFIX && nohup bash -c $(shquote "$JOB") > run.log 2>&1 < /dev/null &"
else
  RUN_REMOTE="$PREFIX && $JOB"
fi

# 0. preflight: the programs compiled for the slice on this machine, before the slice exists.
preflight() {
  local argv=("$PREFLIGHT_PYTHON" -m regift_jax.preflight --config="$CONFIG" --accelerator_type="$ACCEL")
  local a rc=0
  for a in ${EXTRA[@]+"${EXTRA[@]}"}; do
    case $a in
      --config.*=* | --noconfig.* | --model=*) argv+=("$a") ;;
    esac
  done
  if ((DRY_RUN)); then
    run "${argv[@]}"
    return 0
  fi
  (cd "$REPO_ROOT" && run "${argv[@]}") || rc=$?
  case $rc in
    0) ;;
    3)
      printf '%s: error: %s does not fit %s (the preflight above says what would); change the config or pass --no-preflight\n' "$PROG" "$CONFIG" "$ACCEL" >&2
      exit 3
      ;;
    *)
      printf '%s: error: the preflight did not run (exit %s, see above): install the TPU compiler here (pip install -e ".[tpu]") or pass --no-preflight\n' "$PROG" "$rc" >&2
      exit 2
      ;;
  esac
}

if ((PREFLIGHT)) && [[ -z $CMD && -n $CONFIG ]]; then
  case $MODULE in
    regift_jax.train | regift_jax.generate_traces | regift_jax.evaluate) preflight ;;
  esac
fi

# 1. slice
if ((REUSE)); then
  DESCRIBE=("${G[@]}" describe "$NAME" "${LOC[@]}" --format='value(state)')
  if ((DRY_RUN)); then
    run "${DESCRIBE[@]}"
  else
    state=$(run "${DESCRIBE[@]}") || die "--reuse: cannot describe TPU VM '$NAME' in $ZONE"
    [[ $state == READY ]] || die "--reuse: TPU VM '$NAME' is in state '${state:-unknown}', not READY"
  fi
else
  CREATE=("${G[@]}" create "$NAME" "${LOC[@]}" --accelerator-type="$ACCEL" --version="$RUNTIME")
  ((!SPOT)) || CREATE+=(--spot)
  [[ -z $SERVICE_ACCOUNT ]] || CREATE+=(--service-account="$SERVICE_ACCOUNT")
  run "${CREATE[@]}"
fi

# 2.-4. Each command stops the sequence on failure (set -e does not apply inside a function
# called from a || list, hence the explicit `|| return`).
steps() {
  local d install c
  # 2. + 3. code and install
  if ((!SKIP_SETUP)); then
    d=$(shquote "$REMOTE_DIR")
    if [[ $SOURCE == scp ]]; then
      run git -C "$REPO_ROOT" archive --format=tar.gz --prefix="$REMOTE_DIR/" --output="$TARBALL" "$COMMIT" || return
      run "${G[@]}" scp "$TARBALL" "$NAME:$REMOTE_DIR.tar.gz" "${LOC[@]}" --worker=all || return
      ssh_all "rm -rf $d && tar -xzf $d.tar.gz && rm -f $d.tar.gz" || return
    else
      ssh_all "rm -rf $d && git clone --quiet $(shquote "$REPO") $d && git -C $d checkout --quiet $(shquote "$REF")" || return
    fi
    install="cd $d && $(join_quoted "$PYTHON" -m pip install --quiet --upgrade pip)"
    install+=" && $(join_quoted "$PYTHON" -m pip install --quiet -e ".[$PIP_EXTRA]")"
    for c in ${SETUP_CMDS[@]+"${SETUP_CMDS[@]}"}; do
      install+=" && ($c)"
    done
    ssh_all "$install" || return
  fi
  # 4. the run, on all workers at once
  ssh_all "$RUN_REMOTE"
}

INTERRUPTED=0
trap 'INTERRUPTED=1' INT TERM
STATUS=0
steps || STATUS=$?
((!INTERRUPTED)) || STATUS=130
trap - INT TERM

# 5. clean-up, also after a failed or interrupted run
if ((DELETE)); then
  run "${G[@]}" delete "$NAME" "${LOC[@]}" --quiet || { rc=$?; ((STATUS)) || STATUS=$rc; }
fi
if ((!DRY_RUN && DETACH && STATUS == 0)); then
  printf '%s: started; follow the log with: %s\n' "$PROG" \
    "$(join_quoted "${G[@]}" ssh "$NAME" "${LOC[@]}" --worker=0 --command="tail -f $REMOTE_DIR/run.log")" >&2
fi
exit "$STATUS"
