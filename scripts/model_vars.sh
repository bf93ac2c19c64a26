# Sourced by the stage scripts that prompt a model (sampling, data collection, evaluation): the model-policy
# variables, one name each in every stage (eval_agent.runner.add_model_args has their defaults).
BACKEND=${BACKEND:-}                  # hf (in-process transformers) | openai (vLLM or any compatible server)
ENDPOINTS=${ENDPOINTS:-}              # openai backend: file with one base URL per line (else $OPENAI_BASE_URL)
CHAT_FORMAT=${CHAT_FORMAT:-}          # template | llama-2; empty = what the model folder records, else template
ICL_NUM=${ICL_NUM:-}                  # in-context examples in the prompt (the original: 1)
INSTRUCTION_FROM=${INSTRUCTION_FROM:-}  # the instruction: a published *_inst.txt or an expert file (its first row's)
ICL_FROM=${ICL_FROM:-}                # the in-context example: a published *_icl.json or an expert file (its first row)
MAX_NEW_TOKENS=${MAX_NEW_TOKENS:-}    # tokens per reply
MAX_REQUESTS=${MAX_REQUESTS:-}        # openai backend: requests in flight over all endpoints
ACTION_PARSE=${ACTION_PARSE:-}        # first_line | original (the published code: every line after Action:)

opt --backend "$BACKEND"
opt --endpoints "$ENDPOINTS"
opt --chat_format "$CHAT_FORMAT"
opt --icl_num "$ICL_NUM"
opt --instruction_from "$INSTRUCTION_FROM"
opt --icl_from "$ICL_FROM"
opt --max_new_tokens "$MAX_NEW_TOKENS"
opt --max_requests "$MAX_REQUESTS"
opt --action_parse "$ACTION_PARSE"
