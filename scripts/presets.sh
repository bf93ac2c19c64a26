# Presets: named sets of values for the stage variables (docs/pipeline.md). A preset fills in only what is
# not set already, so any variable set by the user wins. Stage scripts and the pipeline apply PRESET.
#   paper  the paper's values: the stage defaults where the paper and the published code agree (Llama-2-7B-Chat on
#          GPUs); where they differ or the paper is silent, the published code's choice, the other one a variable
#          away (docs/paper_run.md's table): the original's bert-base-uncased [CLS] embedder, its reflection
#          prompt, its action parsing, its ALFWorld evaluation task text and its VirtualHome keep threshold; and for
#          one task family (TASK_FAMILY) the published inputs found beside its data (eval_agent/published.py):
#          expert data, instruction and one-shot example
#   tiny   SmolLM2-135M on a 2-core CPU: small counts; shows that every stage runs, not the paper's numbers
#   small  SmolLM2-135M on a 2-core CPU, VirtualHome: what calibration adds, measured in at most 90 minutes with
#          VARIANT=wo_dc (base, SFT, STeCa and STeCa w/o D_c on the same held-out items; docs/pipeline.md)
apply_preset() {
  case "$1" in
    '') ;;
    paper)
      local eval_env_args='{"task_text": "original"}'  # ALFWorld's intro paragraphs joined by one newline (D5)
      : "${EMBEDDER:=bert-cls}" "${REFLECT_PROMPT:=original}" "${ACTION_PARSE:=original}" "${EVAL_ENV_ARGS:=$eval_env_args}"
      export EMBEDDER REFLECT_PROMPT ACTION_PARSE EVAL_ENV_ARGS
      case "${TASK_FAMILY:-${TASK:-}}" in
        virtualhome) : "${KEEP_THRESHOLD:=1e-22}"; export KEEP_THRESHOLD ;;  # data_explored_vh.py's (D6)
      esac
      case "${TASK_FAMILY:-${TASK:-}}" in
        alfworld|virtualhome)
          local line name
          while IFS= read -r line; do
            name=${line%%=*}
            [ -n "$line" ] && [ -z "${!name:-}" ] && eval "export $line"  # NAME=path, quoted by the Python side
          done < <("${PYTHON:-.venv/bin/python}" -m eval_agent.published --task_family "${TASK_FAMILY:-$TASK}") ;;
      esac ;;
    tiny)
      # one SFT epoch in 8 steps of 1 trajectory, in half the time of 16 in 8 steps of 2 and about as far (ALFWorld,
      # 3 tasks a split: step accuracy 6/24 both, valid actions 14/24 vs 16/24); no warmup step (learning rate 0)
      : "${EXPERT_LIMIT:=${SFT_LIMIT:-8}}" "${SFT_EPOCHS:=1}" "${SFT_LR:=1e-4}" "${SFT_BATCH:=1}" "${SFT_MICRO_BATCH:=1}"
      : "${SFT_WARMUP:=0}" "${RFT_WARMUP:=0}"
      # sampling: 10 steps hold the sampled VirtualHome trajectory (9 steps); evaluation: 6, or MAX_STEPS when set
      # (success is out of reach for a 135M model either way; step accuracy, run beside it, is what moves)
      : "${EVAL_MAX_STEPS:=${MAX_STEPS:-6}}" "${SAMPLE_LIMIT:=1}" "${N:=2}" "${MAX_STEPS:=10}" "${MAX_NEW_TOKENS:=40}"
      : "${RFT_LR:=1e-5}" "${RFT_BATCH:=4}" "${EVAL_LIMIT:=3}" "${STEPS_PER_TASK:=3}" "${GRAD_CKPT:=0}"
      : "${CALIBRATION_EVAL:=0}" "${CALIBRATION_LIMIT:=1}"  # one history says nothing about Figure 4: opt in
      export EXPERT_LIMIT SFT_EPOCHS SFT_LR SFT_BATCH SFT_MICRO_BATCH SFT_WARMUP RFT_WARMUP SAMPLE_LIMIT N MAX_STEPS \
        EVAL_MAX_STEPS MAX_NEW_TOKENS RFT_LR RFT_BATCH EVAL_LIMIT STEPS_PER_TASK GRAD_CKPT CALIBRATION_EVAL \
        CALIBRATION_LIMIT ;;
    small)
      # sized to run base, SFT, STeCa and STeCa w/o D_c in 90 minutes on 2 cores (docs/pipeline.md has each why);
      # fixed before the measured run, not retuned on its held-out histories
      : "${EXPERT_LIMIT:=40}" "${SFT_EPOCHS:=1}" "${SFT_LR:=2e-4}" "${SFT_BATCH:=4}" "${SFT_MICRO_BATCH:=1}"
      : "${SFT_WARMUP:=0}" "${RFT_WARMUP:=0}" "${GRAD_CKPT:=0}"
      # the 40 SFT tasks sampled, one rollout per judged step: ~2.8 deviations a task, 100+ calibrated rows
      : "${SAMPLE_LIMIT:=40}" "${N:=1}" "${MAX_STEPS:=10}" "${MAX_NEW_TOKENS:=32}" "${CONCURRENCY:=32}"
      : "${REFLECT_BACKEND:=self}"  # no key on this machine: the SFT model reflects, labelled so (Table 3's row)
      : "${RFT_LR:=1e-4}" "${RFT_BATCH:=8}"
      # held out: the first 12 test tasks of each split, every expert step, success in 10 steps; calibration
      # ability on the SFT model's own deviations there, every model on the same histories
      : "${EVAL_LIMIT:=12}" "${EVAL_MAX_STEPS:=10}" "${CALIBRATION_EVAL:=1}" "${CALIBRATION_PROBE:=next_action}"
      : "${CALIBRATION_HISTORIES:=step_accuracy}" "${CALIBRATION_LABELS:=base sft steca}" "${CALIBRATION_LIMIT:=500}"
      export EXPERT_LIMIT SFT_EPOCHS SFT_LR SFT_BATCH SFT_MICRO_BATCH SFT_WARMUP RFT_WARMUP GRAD_CKPT SAMPLE_LIMIT N \
        MAX_STEPS MAX_NEW_TOKENS CONCURRENCY REFLECT_BACKEND RFT_LR RFT_BATCH EVAL_LIMIT EVAL_MAX_STEPS CALIBRATION_EVAL \
        CALIBRATION_PROBE CALIBRATION_HISTORIES CALIBRATION_LABELS CALIBRATION_LIMIT ;;
    *) echo "error: PRESET must be tiny, small or paper, got '$1'" >&2; exit 2 ;;
  esac
}
