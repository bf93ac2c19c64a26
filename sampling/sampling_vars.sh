# Sourced by both sampling stages (generate_steps.sh, mc_rollouts.sh): the variables they share (docs/sampling.md).
KIND=${KIND:-}                             # expert | explore | both: which step records to make / roll out
MODEL=${MODEL:-}                           # the policy (HF folder or served model name); empty = the run's SFT model
NUM_SHARDS=${NUM_SHARDS:-}                 # split the tasks over machines: a task and all its steps go to one shard
SHARD_ID=${SHARD_ID:-}                     # this machine's shard, 0 .. NUM_SHARDS-1

opt --kind "$KIND"
opt --model "$MODEL"
opt --num_shards "$NUM_SHARDS"
opt --shard_id "$SHARD_ID"
