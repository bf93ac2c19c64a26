# Presets: named sets of values for the stage variables (docs/pipeline.md). A preset fills in only what is
# not set already, so any variable set by the user wins. Stage scripts and the pipeline apply PRESET.
#   paper  the paper's values: every stage's own defaults (Llama-2-7B-Chat on GPUs)
#   tiny   SmolLM2-135M on a 2-core CPU: small counts; shows that every stage runs, not the paper's numbers
apply_preset() {
  case "$1" in
    ''|paper) ;;
    tiny)
      : "${EXPERT_LIMIT:=${SFT_LIMIT:-16}}" "${SFT_EPOCHS:=2}" "${SFT_LR:=1e-4}" "${SFT_BATCH:=4}" "${SFT_MICRO_BATCH:=1}"
      : "${SAMPLE_LIMIT:=2}" "${N:=2}" "${MAX_STEPS:=12}" "${MAX_NEW_TOKENS:=40}"
      : "${RFT_LR:=1e-5}" "${RFT_BATCH:=4}" "${EVAL_LIMIT:=3}" "${GRAD_CKPT:=0}"
      export EXPERT_LIMIT SFT_EPOCHS SFT_LR SFT_BATCH SFT_MICRO_BATCH SAMPLE_LIMIT N MAX_STEPS MAX_NEW_TOKENS \
        RFT_LR RFT_BATCH EVAL_LIMIT GRAD_CKPT ;;
    *) echo "error: PRESET must be tiny or paper, got '$1'" >&2; exit 2 ;;
  esac
}
