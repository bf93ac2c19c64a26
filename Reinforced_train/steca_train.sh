#!/usr/bin/env bash
# Stage 4: STeCa reinforced training of the SFT model on the weighted training set. Edit the values below or
# override them from the environment, e.g.  MODEL=outputs/alfworld/sft/model NPROC=5 bash Reinforced_train/steca_train.sh
# The defaults are the paper's (lr 3e-6, 1 epoch, global batch 15, constant schedule with 10% warmup, beta 0,
# 4096 tokens). BATCH must be a multiple of MICRO_BATCH x NPROC (the paper: 1 x 5 GPUs x 3 accumulation steps).
set -euo pipefail
cd "$(dirname "$0")/.."

TASK=${TASK:-alfworld}                    # alfworld | virtualhome (only names the default folders)
MODEL=${MODEL:-outputs/${TASK}/sft/model} # the SFT folder: the policy's start (and the reference when BETA > 0)
DATA=${DATA:-outputs/${TASK}/data_collection/train.jsonl}  # or a published final_data_rft_train.json
CHAT_FORMAT=${CHAT_FORMAT:-}              # empty = the format MODEL records (steca_chat_format.json), else template
LR=${LR:-3e-6}
EPOCHS=${EPOCHS:-1}
BATCH=${BATCH:-15}                        # global batch; gradient accumulation = BATCH / (MICRO_BATCH x processes)
MICRO_BATCH=${MICRO_BATCH:-1}             # per device
SCHEDULER=${SCHEDULER:-constant_with_warmup}
WARMUP=${WARMUP:-0.1}                     # fraction of the steps
WEIGHT_DECAY=${WEIGHT_DECAY:-0}
BETA=${BETA:-0}                           # DPO term weight; 0 = weighted NLL of chosen, no reference model loaded
REF_MODEL=${REF_MODEL:-}                  # frozen reference for BETA > 0; empty = MODEL
NLL=${NLL:-sum}                           # sum (the original: log-probs summed per sequence) | mean (per token)
MAX_LEN=${MAX_LEN:-4096}                  # longer sequences lose whole trailing turns
PRECISION=${PRECISION:-auto}              # auto = bf16 autocast on a GPU that has it (+ tf32), else fp32 | bf16 | fp32
SAVE_DTYPE=${SAVE_DTYPE:-}                # dtype of the saved model; empty = bf16 after bf16 training, else fp32
REPORT_TO=${REPORT_TO:-}                  # none | tensorboard | wandb; empty = tensorboard when installed
GRAD_CKPT=${GRAD_CKPT:-1}                 # activation (gradient) checkpointing
ATTN=${ATTN:-}                            # e.g. flash_attention_2 on GPUs; empty = transformers' default
SAVE=${SAVE:-epoch}                       # checkpoint every epoch (a rerun resumes from the last) | no
SEED=${SEED:-42}
NPROC=${NPROC:-1}                         # processes (GPUs, or CPU processes over gloo)
DIST_CONFIG=${DIST_CONFIG:-}              # accelerate config shared with SFT: sft/configs/fsdp.yaml | sft/configs/ds_zero3.yaml
OUT=${OUT:-outputs/${TASK}/steca/model}   # the model folder; the run card goes to its parent
PYTHON=${PYTHON:-.venv/bin/python}

args=(--model_name_or_path "$MODEL" --data "$DATA" --beta "$BETA" --nll_reduction "$NLL"
      --learning_rate "$LR" --num_train_epochs "$EPOCHS" --global_batch_size "$BATCH"
      --per_device_train_batch_size "$MICRO_BATCH" --lr_scheduler_type "$SCHEDULER" --warmup_steps "$WARMUP"
      --weight_decay "$WEIGHT_DECAY" --model_max_length "$MAX_LEN" --precision "$PRECISION"
      --save_strategy "$SAVE" --save_total_limit 1 --logging_steps 1 --seed "$SEED"
      --output_dir "$OUT")
[ -n "$CHAT_FORMAT" ] && args+=(--chat_format "$CHAT_FORMAT")
[ -n "$REF_MODEL" ] && args+=(--ref_model "$REF_MODEL")
[ "$GRAD_CKPT" = 1 ] && args+=(--activation_checkpointing)
[ -n "$ATTN" ] && args+=(--attn_implementation "$ATTN")
[ -n "$SAVE_DTYPE" ] && args+=(--save_dtype "$SAVE_DTYPE")
[ -n "$REPORT_TO" ] && args+=(--report_to "$REPORT_TO")

source scripts/train_launch.sh
launch_training Reinforced_train.train "${args[@]}" "$@"
echo "model: $OUT (summary: $OUT/train_summary.json)"
