# Sourced by every stage script: the preset, and building the Python command line from the variables
# the user set. Defaults live in Python (each stage's --help; docs/<stage>.md lists them all): a script
# passes a flag only when its variable is set, so the two can never disagree.
#   opt       --flag "$VAR"   adds `--flag VALUE` when VAR is set
#   flag      --flag "$VAR"   adds `--flag` when VAR is 1
#   opt_bool  --flag "$VAR"   adds `--flag True` / `--flag False` when VAR is 1 / 0 (Trainer arguments)
# Every script collects its flags in the array `args`.

PYTHON=${PYTHON:-.venv/bin/python}
TASK_FAMILY=${TASK_FAMILY:-${TASK:-alfworld}}   # alfworld | virtualhome (TASK: the older name)

# shellcheck source=scripts/presets.sh
source "$(dirname "${BASH_SOURCE[0]}")/presets.sh"
apply_preset "${PRESET:-}"

RUN_DIR=${RUN_DIR:-outputs/${TASK_FAMILY}}      # the run directory every stage reads and writes (eval_agent/layout.py)
# the running script, from the repository root: a refused value is named by its variable (eval_agent/cli.py)
export STECA_STAGE_SCRIPT="$(basename "$(dirname "$0")")/$(basename "$0")"
args=()

opt() {
  if [ -n "$2" ]; then args+=("$1" "$2"); fi
}

flag() {
  case "$2" in
    1) args+=("$1") ;;
    ''|0) ;;
    *) echo "error: the variable for $1 takes 1 or 0, got '$2'" >&2; exit 2 ;;
  esac
}

opt_bool() {
  case "$2" in
    1) args+=("$1" True) ;;
    0) args+=("$1" False) ;;
    '') ;;
    *) echo "error: the variable for $1 takes 1 or 0, got '$2'" >&2; exit 2 ;;
  esac
}
