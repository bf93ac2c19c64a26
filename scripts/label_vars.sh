# Sourced by the evaluation scripts (eval/evaluate.sh, step_accuracy.sh, calibration.sh) after stage_lib.sh: the
# model evaluated, named as the run names its models (docs/eval.md).
LABEL=${LABEL:-}                           # base | sft | steca | any name with MODEL
MODEL=${MODEL:-}                           # the model; empty = the one LABEL names
BASE_MODEL=${BASE_MODEL:-}                 # the model LABEL=base names; empty = the embedded SmolLM2

opt --label "$LABEL"
opt --model "$MODEL"
opt --base_model "$BASE_MODEL"
