"""The llama-2 chat format with a Llama-2-style tokenizer (SentencePiece-like BPE: Metaspace `▁`, byte
fallback, <s>/</s>), the combination of the published Llama-2-7B-Chat runs. transformers builds one offline
from a vocabulary and merges (LlamaTokenizer, as it converts the hub's tokenizer.model): here a small one trained
on the prompts themselves. Training tokenizes a conversation in pieces cut at each answer's end; the test holds
that to the whole text's tokens (what inference sends) and the loss mask to the assistant turns exactly."""
from __future__ import annotations

import json

import pytest

from eval_agent.chat_format import ChatFormat
from eval_agent.prompts import PromptBuilder
from eval_agent.training import IGNORE, encode_conversation
from tests.helpers import trained_runs
from tests.test_sft import TRAJ


@pytest.fixture(scope="module")
def llama2_tokenizer(tmp_path_factory):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import AutoTokenizer, LlamaTokenizer

    bpe = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    bpe.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=True)
    corpus = [m["content"] for m in PromptBuilder.for_run("alfworld").messages(TRAJ)]
    special = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]  # ids 0, 1, 2, then the bytes
    bpe.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=700, special_tokens=special, show_progress=False))
    model = json.loads(bpe.to_str())["model"]
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in model["merges"]]
    out = tmp_path_factory.mktemp("llama2_tokenizer")
    LlamaTokenizer(vocab=model["vocab"], merges=merges).save_pretrained(out)
    return AutoTokenizer.from_pretrained(out)  # read back as a later stage would


def test_the_tokenizer_is_llama_2_style(llama2_tokenizer):
    tok = llama2_tokenizer
    assert type(tok).__name__ == "LlamaTokenizer"
    assert (tok.unk_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2)
    ids = tok("go to shelf 1 ünïcode", add_special_tokens=False).input_ids
    pieces = tok.convert_ids_to_tokens(ids)
    assert pieces[0].startswith("▁") and any(p.startswith("<0x") for p in pieces)  # prefix space, byte fallback
    assert tok.decode(ids) == "go to shelf 1 ünïcode"


def test_llama_2_format_tokens_and_mask(llama2_tokenizer):
    tok, fmt = llama2_tokenizer, ChatFormat("llama-2")
    messages = PromptBuilder.for_run("alfworld", icl_num=0).messages(TRAJ, include_last_observation=False)
    text, spans = fmt.render_with_spans(messages)
    enc = encode_conversation(messages, fmt, tok)
    assert enc.num_messages == len(messages)
    # the pieces give the whole text's tokens: training sees what inference sends (the text ends with the next <s>)
    whole = tok(text, add_special_tokens=False).input_ids
    assert enc.input_ids == whole[: len(enc.input_ids)] and tok.convert_ids_to_tokens(whole[len(enc.input_ids):]) == ["<s>"]
    # each trained run starts and ends exactly at an assistant span ("OK" and each step with " </s>")
    runs = trained_runs(enc.input_ids, enc.labels)
    assert len(runs) == len(spans) == 1 + len(TRAJ.steps)
    start = 0
    for run, (a, b) in zip(runs, spans):
        i = enc.labels.index(run[0], start)
        j = i + len(run)
        assert tok.decode(enc.input_ids[:i]) == text[:a] and tok.decode(enc.input_ids[:j]) == text[:b]
        assert all(label != IGNORE for label in enc.labels[i:j]) and enc.input_ids[j - 1] == tok.eos_token_id
        start = j
    # the generation prompt tokenizes as the training prefix of the first answer
    prompt = fmt.render(messages[:1])
    assert tok(prompt, add_special_tokens=False).input_ids == enc.input_ids[: len(tok(prompt, add_special_tokens=False).input_ids)]
