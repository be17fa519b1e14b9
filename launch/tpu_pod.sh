#!/usr/bin/env bash
# Usage: launch/tpu_pod.sh --name=NAME --zone=ZONE --workdir=gs://BUCKET/RUN --config=configs/llama.py:PRESET [flags] [-- EXTRA_ARGS...]
#
# Runs a regift_jax entry point on every worker of a Cloud TPU VM slice at once.
#
# Steps, each one gcloud (or git) command; --dry-run prints them, shell-quoted, one per line, and
# runs nothing (it only reads the local git checkout to resolve --ref):
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
#   --dry-run                  print the commands, run nothing
#   -- EXTRA_ARGS...           passed to the entry point unchanged, e.g. --config.train.num_epochs=3

set -euo pipefail

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_ROOT=$(cd "$SCRIPT_DIR/.." && pwd)
PROG=$(basename "$0")

die() {
  printf '%s: error: %s\n' "$PROG" "$*" >&2
  printf 'usage: %s --name=NAME --zone=ZONE --workdir=gs://BUCKET/RUN --config=CONFIG [flags] [-- EXTRA_ARGS...] (see --help)\n' "$PROG" >&2
  exit 2
}

usage() {
  sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p;}' "$0"
}

# Quote one word for a POSIX shell, deterministically and readably: safe words stay as they are;
# a --flag=value word keeps --flag= bare and quotes the value; other words go in single quotes,
# or in double quotes when they contain ' but nothing that is special inside double quotes.
shquote() {
  local s=$1 q="'\\''"
  if [[ -n $s && $s =~ ^[A-Za-z0-9_@%+=:,./-]+$ ]]; then
    printf '%s' "$s"
  elif [[ $s =~ ^(--?[A-Za-z0-9_.-]+=)(.*)$ ]]; then
    printf '%s' "${BASH_REMATCH[1]}"
    shquote "${BASH_REMATCH[2]}"
  elif [[ $s != *\'* ]]; then
    printf "'%s'" "$s"
  elif [[ $s != *[\$\`\\\"!]* ]]; then
    printf '"%s"' "$s"
  else
    printf "'%s'" "${s//\'/$q}"
  fi
}

# Quote every argument and join them with spaces.
join_quoted() {
  local out="" w
  for w in "$@"; do
    out+="${out:+ }$(shquote "$w")"
  done
  printf '%s' "$out"
}

DRY_RUN=0
# Print the command (shell-quoted); execute it unless --dry-run.
run() {
  if ((DRY_RUN)); then
    printf '%s\n' "$(join_quoted "$@")"
  else
    printf '+ %s\n' "$(join_quoted "$@")" >&2
    "$@"
  fi
}

NAME="" ZONE="" PROJECT="" ACCEL="v5litepod-16" RUNTIME="" SPOT=0 SERVICE_ACCOUNT=""
REUSE=0 DELETE=0 SOURCE="scp" REPO="" REF="" REMOTE_DIR="regift_jax" PYTHON="python3"
PIP_EXTRA="tpu" SKIP_SETUP=0 MODULE="regift_jax.train" CMD="" CONFIG="" WORKDIR=""
WORKDIR_FLAG="--config.workdir" DETACH=0 GCLOUD="gcloud" HAVE_EXTRA=0
SETUP_CMDS=() ENVS=() EXTRA=()

while (($#)); do
  arg=$1
  shift
  case $arg in
    --) EXTRA=("$@"); HAVE_EXTRA=1; break ;;
    -h | --help) usage; exit 0 ;;
    --dry-run) DRY_RUN=1; continue ;;
    --reuse) REUSE=1; continue ;;
    --delete) DELETE=1; continue ;;
    --spot) SPOT=1; continue ;;
    --skip-setup) SKIP_SETUP=1; continue ;;
    --detach) DETACH=1; continue ;;
    --*=*) key=${arg%%=*}; val=${arg#*=} ;;
    --*)
      key=$arg
      (($#)) || die "flag $key needs a value"
      val=$1
      shift
      ;;
    *) die "unexpected argument '$arg' (arguments for the entry point go after --)" ;;
  esac
  case $key in
    --name) NAME=$val ;;
    --zone) ZONE=$val ;;
    --project) PROJECT=$val ;;
    --accelerator-type) ACCEL=$val ;;
    --runtime-version) RUNTIME=$val ;;
    --service-account) SERVICE_ACCOUNT=$val ;;
    --source) SOURCE=$val ;;
    --repo) REPO=$val ;;
    --ref) REF=$val ;;
    --remote-dir) REMOTE_DIR=$val ;;
    --python) PYTHON=$val ;;
    --pip-extra) PIP_EXTRA=$val ;;
    --setup) SETUP_CMDS+=("$val") ;;
    --module) MODULE=$val ;;
    --cmd) CMD=$val ;;
    --config) CONFIG=$val ;;
    --workdir) WORKDIR=$val ;;
    --workdir-flag) WORKDIR_FLAG=$val ;;
    --env) ENVS+=("$val") ;;
    --gcloud) GCLOUD=$val ;;
    *) die "unknown flag $key" ;;
  esac
done

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

if [[ -n $CMD ]]; then
  [[ -z $CONFIG && -z $WORKDIR && $HAVE_EXTRA == 0 && $MODULE == regift_jax.train ]] ||
    die "--cmd replaces the whole command: do not combine it with --module, --config, --workdir or -- EXTRA_ARGS"
else
  [[ $MODULE =~ ^[A-Za-z_][A-Za-z0-9_.]*$ ]] || die "--module='$MODULE' is not a python module name"
  case $MODULE in
    regift_jax.train | regift_jax.generate_traces)
      [[ -n $CONFIG ]] || die "--config is required for $MODULE (e.g. --config=configs/llama.py:llama3_1_8b)" ;;
  esac
  if [[ $MODULE == regift_jax.train && -z $WORKDIR ]]; then
    die "--workdir is required for $MODULE (e.g. --workdir=gs://BUCKET/regift/llama3_1_8b)"
  fi
fi
if [[ -n $WORKDIR && $WORKDIR != gs://?* ]]; then
  die "--workdir='$WORKDIR' must be a gs:// path: every worker writes checkpoints to the same directory"
fi
for kv in ${ENVS[@]+"${ENVS[@]}"}; do
  [[ $kv =~ ^[A-Za-z_][A-Za-z0-9_]*= ]] || die "--env='$kv' is not KEY=VALUE"
done

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
  JOB_ARGV=("$PYTHON" -m "$MODULE")
  [[ -z $CONFIG ]] || JOB_ARGV+=(--config="$CONFIG")
  [[ -z $WORKDIR ]] || JOB_ARGV+=("$WORKDIR_FLAG=$WORKDIR")
  JOB_ARGV+=(${EXTRA[@]+"${EXTRA[@]}"})
  JOB=$(join_quoted "${JOB_ARGV[@]}")
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
