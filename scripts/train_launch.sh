# Sourced by the training stages (sft/sft.sh, Reinforced_train/steca_train.sh): one way to start a
# training module, reading PYTHON, NPROC and DIST_CONFIG from the calling script.
#   launch_training <module> <args...>
launch_training() {
  local module=$1; shift
  local launch
  if [ -n "$DIST_CONFIG" ]; then       # accelerate with an FSDP or DeepSpeed config
    launch=("$PYTHON" -m accelerate.commands.launch --config_file "$DIST_CONFIG" --num_processes "$NPROC")
  elif [ "$NPROC" -gt 1 ]; then        # DDP (gloo on a CPU)
    launch=("$PYTHON" -m torch.distributed.run --nproc_per_node "$NPROC")
  else
    launch=("$PYTHON")
  fi
  exec "${launch[@]}" -m "$module" "$@"  # exec: a signal to the script reaches the trainer
}
