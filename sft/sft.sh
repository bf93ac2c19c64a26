#!/usr/bin/env bash
# Stage 1: SFT warm-up on expert trajectories. Edit the values below or override them from the
# environment, e.g.  DATA=outputs/alfworld/sft/expert_train.jsonl NPROC=4 bash sft/sft.sh
# The defaults are the paper's (3 epochs, global batch 16, lr 2e-5, cosine, warmup 0.03, 4096 tokens).
set -euo pipefail
cd "$(dirname "$0")/.."

TASK=${TASK:-alfworld}                    # alfworld | virtualhome (instruction and ICL example)
MODEL=${MODEL:-models/SmolLM2-135M-Instruct}
DATA=${DATA:-outputs/${TASK}/sft/expert_train.jsonl}   # sft/make_expert_data.sh output, or a published *_sft.json
CHAT_FORMAT=${CHAT_FORMAT:-}              # template | llama-2 (the published Llama-2-7B-Chat runs); empty = template
ICL=${ICL:-0}                             # 1: train with the one-shot example in the prompt (the original: 0)
LR=${LR:-2e-5}
EPOCHS=${EPOCHS:-3}
BATCH=${BATCH:-16}                        # global batch; gradient accumulation = BATCH / (MICRO_BATCH x processes)
MICRO_BATCH=${MICRO_BATCH:-2}             # per device
SCHEDULER=${SCHEDULER:-cosine}
WARMUP=${WARMUP:-0.03}                    # fraction of the steps
WEIGHT_DECAY=${WEIGHT_DECAY:-0}
MAX_LEN=${MAX_LEN:-4096}                  # longer conversations lose whole trailing turns
PRECISION=${PRECISION:-auto}              # auto = bf16 autocast on a GPU that has it (+ tf32), else fp32 | bf16 | fp32
SAVE_DTYPE=${SAVE_DTYPE:-}                # dtype of the saved model; empty = bf16 after bf16 training, else fp32
REPORT_TO=${REPORT_TO:-}                  # none | tensorboard | wandb; empty = tensorboard when installed
GRAD_CKPT=${GRAD_CKPT:-1}                 # activation (gradient) checkpointing
ATTN=${ATTN:-}                            # e.g. flash_attention_2 on GPUs; empty = transformers' default
SAVE=${SAVE:-epoch}                       # checkpoint every epoch (a rerun resumes from the last) | no
SEED=${SEED:-42}
NPROC=${NPROC:-1}                         # processes (GPUs, or CPU processes over gloo)
DIST_CONFIG=${DIST_CONFIG:-}              # accelerate config, e.g. sft/configs/fsdp.yaml or sft/configs/ds_zero3.yaml
OUT=${OUT:-outputs/${TASK}/sft/model}     # the model folder; the run card goes to its parent
PYTHON=${PYTHON:-.venv/bin/python}

args=(--model_name_or_path "$MODEL" --data "$DATA" --task "$TASK" --icl "$ICL"
      --learning_rate "$LR" --num_train_epochs "$EPOCHS" --global_batch_size "$BATCH"
      --per_device_train_batch_size "$MICRO_BATCH" --lr_scheduler_type "$SCHEDULER" --warmup_steps "$WARMUP"
      --weight_decay "$WEIGHT_DECAY" --model_max_length "$MAX_LEN" --precision "$PRECISION"
      --save_strategy "$SAVE" --save_total_limit 1 --logging_steps 1 --seed "$SEED"
      --output_dir "$OUT")
[ -n "$CHAT_FORMAT" ] && args+=(--chat_format "$CHAT_FORMAT")
[ "$GRAD_CKPT" = 1 ] && args+=(--activation_checkpointing)
[ -n "$ATTN" ] && args+=(--attn_implementation "$ATTN")
[ -n "$SAVE_DTYPE" ] && args+=(--save_dtype "$SAVE_DTYPE")
[ -n "$REPORT_TO" ] && args+=(--report_to "$REPORT_TO")

source scripts/train_launch.sh
launch_training sft.train "${args[@]}" "$@"
echo "model: $OUT (summary: $OUT/train_summary.json)"
