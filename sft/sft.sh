#!/usr/bin/env bash
# Stage 1: SFT warm-up on expert trajectories, into RUN_DIR/sft/model (eval_agent/layout.py). The defaults
# are the paper's (3 epochs, global batch 16, lr 2e-5, cosine, warmup 0.03, 4096 tokens); set a variable to
# override one (docs/sft.md lists every one with its default), e.g.
#   SFT_LR=1e-4 NPROC=4 bash sft/sft.sh
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/stage_lib.sh                    # PRESET, PYTHON, TASK_FAMILY, RUN_DIR

BASE_MODEL=${BASE_MODEL:-${MODEL:-}}           # base model folder; empty = the embedded SmolLM2-135M-Instruct
EXPERT_DATA=${EXPERT_DATA:-${DATA:-}}          # expert trajectories (ours or a published *_sft.json); empty = the run's
CHAT_FORMAT=${CHAT_FORMAT:-}                   # template | llama-2; empty = what the model folder records, else template
SFT_ICL_NUM=${SFT_ICL_NUM:-${ICL:-}}           # in-context examples in the training prompts (the original: 0)
INSTRUCTION_FROM=${INSTRUCTION_FROM:-}         # the run's instruction (every stage's); empty = the published one beside the data, else ours
ICL_FROM=${ICL_FROM:-}                         # the run's in-context example (SFT_ICL_NUM=1); empty = likewise
ROW_INSTRUCTION=${ROW_INSTRUCTION:-}           # 1: each row's own instruction, as the original (docs/fidelity.md)
SFT_LR=${SFT_LR:-${LR:-}}                      # learning rate
SFT_EPOCHS=${SFT_EPOCHS:-${EPOCHS:-}}
SFT_BATCH=${SFT_BATCH:-${BATCH:-}}             # global batch; accumulation = SFT_BATCH / (SFT_MICRO_BATCH x processes)
SFT_MICRO_BATCH=${SFT_MICRO_BATCH:-${MICRO_BATCH:-}}  # rows per device and step
SFT_SCHEDULER=${SFT_SCHEDULER:-${SCHEDULER:-}}
SFT_WARMUP=${SFT_WARMUP:-${WARMUP:-}}          # warmup, a fraction of the steps
SFT_WEIGHT_DECAY=${SFT_WEIGHT_DECAY:-${WEIGHT_DECAY:-}}
SFT_MAX_LEN=${SFT_MAX_LEN:-${MAX_LEN:-}}       # tokens per row; longer ones lose whole trailing turns
OUT=${OUT:-}                                   # the model folder; empty = the run's; its run card goes into it

args+=(--task_family "$TASK_FAMILY" --run_dir "$RUN_DIR")
opt --model_name_or_path "$BASE_MODEL"
opt --data "$EXPERT_DATA"
opt --chat_format "$CHAT_FORMAT"
opt --icl_num "$SFT_ICL_NUM"
opt --instruction_from "$INSTRUCTION_FROM"
opt --icl_from "$ICL_FROM"
opt_bool --row_instruction "$ROW_INSTRUCTION"
opt --learning_rate "$SFT_LR"
opt --num_train_epochs "$SFT_EPOCHS"
opt --global_batch_size "$SFT_BATCH"
opt --per_device_train_batch_size "$SFT_MICRO_BATCH"
opt --lr_scheduler_type "$SFT_SCHEDULER"
opt --warmup_steps "$SFT_WARMUP"
opt --weight_decay "$SFT_WEIGHT_DECAY"
opt --model_max_length "$SFT_MAX_LEN"
opt --output_dir "$OUT"

source scripts/train_launch.sh                 # PRECISION GRAD_CKPT ATTN SAVE SEED NPROC DIST_CONFIG
launch_training sft.train "${args[@]}" "$@"
