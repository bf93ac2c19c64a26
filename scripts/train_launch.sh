# Sourced by the training stages (sft/sft.sh, Reinforced_train/steca_train.sh) after their own variables:
# the knobs both share (docs/pipeline.md) and one way to start a training module under the launcher.
#   launch_training <module> <args...>
PRECISION=${PRECISION:-}          # auto | bf16 | fp32 (bf16 autocast; weights and optimizer stay fp32)
SAVE_DTYPE=${SAVE_DTYPE:-}        # the saved model's dtype: auto (bf16 after bf16 training) | bf16 | fp32
REPORT_TO=${REPORT_TO:-}          # experiment tracker: auto (tensorboard when installed) | none | tensorboard | wandb
GRAD_CKPT=${GRAD_CKPT:-}          # 1 | 0: activation checkpointing
ATTN=${ATTN:-}                    # e.g. flash_attention_2 on GPUs
SAVE=${SAVE:-}                    # epoch (a rerun resumes from the last) | no
KEEP_CHECKPOINTS=${KEEP_CHECKPOINTS:-}  # 1: keep a finished training's last checkpoint (optimizer state); default: dropped
GPU_FREE_TIMEOUT=${GPU_FREE_TIMEOUT:-60}  # seconds for other processes' GPU memory to be released before training starts
SEED=${SEED:-}                    # training seed
NPROC=${NPROC:-1}                 # processes (GPUs, or CPU processes over gloo)
DIST_CONFIG=${DIST_CONFIG:-}      # accelerate config: sft/configs/fsdp.yaml | sft/configs/ds_zero3.yaml

opt --precision "$PRECISION"
opt --save_dtype "$SAVE_DTYPE"
opt --report_to "$REPORT_TO"
opt_bool --activation_checkpointing "$GRAD_CKPT"
opt --attn_implementation "$ATTN"
opt --save_strategy "$SAVE"
opt_bool --keep_checkpoints "$KEEP_CHECKPOINTS"
opt --seed "$SEED"

launch_training() {
  local module=$1; shift
  local launch
  if [ "${STECA_FINGERPRINT:-}" = 1 ]; then  # only print the run's fingerprint: one process (eval_agent/guard.py)
    launch=("$PYTHON")
  elif [ -n "$DIST_CONFIG" ]; then     # accelerate with an FSDP or DeepSpeed config
    launch=("$PYTHON" -m accelerate.commands.launch --config_file "$DIST_CONFIG" --num_processes "$NPROC")
  elif [ "$NPROC" -gt 1 ]; then        # DDP (gloo on a CPU)
    launch=("$PYTHON" -m torch.distributed.run --nproc_per_node "$NPROC")
  else
    launch=("$PYTHON")
  fi
  if [ "${STECA_FINGERPRINT:-}" != 1 ]; then  # a server or stray process still on the GPUs: say so, not an OOM later
    "$PYTHON" -m eval_agent.gpus wait-free --timeout "$GPU_FREE_TIMEOUT" --what "training ($module)" || exit 1
  fi
  exec "${launch[@]}" -m "$module" "$@"  # exec: a signal to the script reaches the trainer
}
