#!/usr/bin/env bash
# Stage 4: STeCa reinforced training of the run's SFT model on its weighted training set, into
# RUN_DIR/steca/model (eval_agent/layout.py). The defaults are the paper's (lr 3e-6, 1 epoch, global batch
# 15, constant schedule with 10% warmup, beta 0, 4096 tokens); RFT_BATCH must be a multiple of
# RFT_MICRO_BATCH x NPROC (the paper: 1 x 5 GPUs x 3 accumulation steps). docs/reinforced_train.md lists
# every variable with its default, e.g.
#   RFT_LR=1e-5 NPROC=5 bash Reinforced_train/steca_train.sh
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/stage_lib.sh                    # PRESET, PYTHON, TASK_FAMILY, RUN_DIR

MODEL=${MODEL:-}                               # the SFT model (policy start, reference when BETA > 0); empty = the run's
TRAIN_SET=${TRAIN_SET:-}                       # our train.jsonl or a published final_data_rft_train.json; empty = the run's
if [ -n "${DATA:-}" ]; then  # the older name of the SFT data (sft/sft.sh), never of this stage's
  echo "error: DATA names the SFT data (sft/sft.sh's EXPERT_DATA), not reinforced training's: set TRAIN_SET for" \
       "this stage, and unset DATA" >&2
  exit 2
fi
CHAT_FORMAT=${CHAT_FORMAT:-}                   # empty = the format MODEL records, else template
RFT_LR=${RFT_LR:-${LR:-}}                      # learning rate
RFT_EPOCHS=${RFT_EPOCHS:-${EPOCHS:-}}
RFT_BATCH=${RFT_BATCH:-${BATCH:-}}             # global batch; accumulation = RFT_BATCH / (RFT_MICRO_BATCH x processes)
RFT_MICRO_BATCH=${RFT_MICRO_BATCH:-${MICRO_BATCH:-}}  # rows per device and step
RFT_SCHEDULER=${RFT_SCHEDULER:-${SCHEDULER:-}}
RFT_WARMUP=${RFT_WARMUP:-${WARMUP:-}}          # warmup, a fraction of the steps
RFT_WEIGHT_DECAY=${RFT_WEIGHT_DECAY:-${WEIGHT_DECAY:-}}
RFT_MAX_LEN=${RFT_MAX_LEN:-${MAX_LEN:-}}       # tokens per sequence; longer ones lose whole trailing turns
BETA=${BETA:-}                                 # DPO term weight; 0 = weighted NLL of chosen, no reference model
WEIGHTS=${WEIGHTS:-}                           # reward (each row's reward) | uniform (every row 1: plain NLL)
REF_MODEL=${REF_MODEL:-}                       # frozen reference for BETA > 0; empty = MODEL
NLL=${NLL:-}                                   # sum (the original: summed per row) | mean (per token)
OUT=${OUT:-}                                   # the model folder; empty = the run's; its run card goes into it

args+=(--run_dir "$RUN_DIR")
opt --model_name_or_path "$MODEL"
opt --data "$TRAIN_SET"
opt --chat_format "$CHAT_FORMAT"
opt --learning_rate "$RFT_LR"
opt --num_train_epochs "$RFT_EPOCHS"
opt --global_batch_size "$RFT_BATCH"
opt --per_device_train_batch_size "$RFT_MICRO_BATCH"
opt --lr_scheduler_type "$RFT_SCHEDULER"
opt --warmup_steps "$RFT_WARMUP"
opt --weight_decay "$RFT_WEIGHT_DECAY"
opt --model_max_length "$RFT_MAX_LEN"
opt --beta "$BETA"
opt --weights "$WEIGHTS"
opt --ref_model "$REF_MODEL"
opt --nll_reduction "$NLL"
opt --output_dir "$OUT"

source scripts/train_launch.sh                 # PRECISION GRAD_CKPT ATTN SAVE SEED NPROC DIST_CONFIG
launch_training Reinforced_train.train "${args[@]}" "$@"
