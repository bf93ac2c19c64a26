# Sourced by the stage scripts that run episodes (sampling, evaluation): the variables they share, one name
# each (docs/pipeline.md).
SPLIT=${SPLIT:-}                      # train | seen | unseen (sampling: the split the expert data plays)
DATA_ROOT=${DATA_ROOT:-}              # task data folder; empty = $ALFWORLD_DATA / $VH_DATA, else data/<family>
MAX_STEPS=${MAX_STEPS:-}              # episode budget, a replayed prefix included (as the original)
CONCURRENCY=${CONCURRENCY:-}          # episodes in flight
ENV_WORKERS=${ENV_WORKERS:-}          # openai backend: processes stepping the environments
ENV_ARGS=${ENV_ARGS:-}                # JSON object of environment options, e.g. {"task_text": "original"}

opt --split "$SPLIT"
opt --data_root "$DATA_ROOT"
opt --max_steps "$MAX_STEPS"
opt --concurrency "$CONCURRENCY"
opt --env_workers "$ENV_WORKERS"
opt --env_args "$ENV_ARGS"
