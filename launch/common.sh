# shellcheck shell=bash
# Helpers shared by launch/tpu_pod.sh and launch/gpu_slurm.sh; sourced, never run.
#
# The sourcing script sets USAGE_ARGS (the argument synopsis printed by die) before sourcing,
# and defines before calling parse_args:
#   on_switch FLAG        set a flag that takes no value; return 1 when FLAG is not one
#   on_value FLAG VALUE   set a flag that takes a value; die on an unknown FLAG
# check_job, check_envs and entry_point read its MODULE, CMD, CONFIG, WORKDIR, WORKDIR_FLAG,
# PYTHON and ENVS.  --help prints the script's comment block from line 2 down to
# `set -euo pipefail`.

# shellcheck disable=SC2034  # read by the sourcing scripts
REPO_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PROG=$(basename "$0")
DRY_RUN=0
HAVE_EXTRA=0
EXTRA=()

die() {
  printf '%s: error: %s\n' "$PROG" "$*" >&2
  printf 'usage: %s %s (see --help)\n' "$PROG" "$USAGE_ARGS" >&2
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

# Print the command (shell-quoted); execute it unless --dry-run.
run() {
  if ((DRY_RUN)); then
    printf '%s\n' "$(join_quoted "$@")"
  else
    printf '+ %s\n' "$(join_quoted "$@")" >&2
    "$@"
  fi
}

# parse_args "$@": --flag=value or --flag value, switches, --dry-run, --help, and `-- EXTRA...`
# (into EXTRA, with HAVE_EXTRA=1).
parse_args() {
  local arg key val
  while (($#)); do
    arg=$1
    shift
    case $arg in
      --) EXTRA=("$@"); HAVE_EXTRA=1; return 0 ;;
      -h | --help) usage; exit 0 ;;
      --dry-run) DRY_RUN=1; continue ;;
      --*=*) key=${arg%%=*}; val=${arg#*=} ;;
      --*)
        if on_switch "$arg"; then continue; fi
        key=$arg
        (($#)) || die "flag $key needs a value"
        val=$1
        shift
        ;;
      *) die "unexpected argument '$arg' (arguments for the entry point go after --)" ;;
    esac
    on_value "$key" "$val"
  done
}

# check_job WORKDIR_HINT: the entry point flags (MODULE, CMD, CONFIG, WORKDIR) fit together;
# WORKDIR_HINT completes the message for a missing --workdir.
check_job() {
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
      die "--workdir is required for $MODULE ($1)"
    fi
  fi
}

# Every --env is KEY=VALUE.
check_envs() {
  local kv
  for kv in ${ENVS[@]+"${ENVS[@]}"}; do
    [[ $kv =~ ^[A-Za-z_][A-Za-z0-9_]*= ]] || die "--env='$kv' is not KEY=VALUE"
  done
}

# The entry point's command line, shell-quoted: PYTHON -m MODULE [--config=CONFIG]
# [WORKDIR_FLAG=WORKDIR] EXTRA...
entry_point() {
  local argv=("$PYTHON" -m "$MODULE")
  [[ -z $CONFIG ]] || argv+=(--config="$CONFIG")
  [[ -z $WORKDIR ]] || argv+=("$WORKDIR_FLAG=$WORKDIR")
  argv+=(${EXTRA[@]+"${EXTRA[@]}"})
  join_quoted "${argv[@]}"
}
