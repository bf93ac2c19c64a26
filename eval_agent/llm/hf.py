"""In-process transformers backend: batched generation with left padding and stop strings.

Batched greedy decoding gives the same text as one prompt at a time (tested): left padding with
an attention mask, so each row's positions and attention match its unpadded run.
"""
from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from eval_agent.llm import Completion, GenerationConfig


def cut_at_stop(text: str, stop: tuple[str, ...]) -> tuple[str, bool]:
    """Text before the first stop string (vLLM returns it that way), and whether one was found."""
    cuts = [i for i in (text.find(s) for s in stop) if i >= 0]
    return (text[: min(cuts)], True) if cuts else (text, False)


class HFBackend:
    def __init__(self, model: str, device: str | None = None, dtype: torch.dtype | None = None,
                 batch_size: int = 16, max_context: int | None = None):
        self.model_name = model
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.tokenizer = AutoTokenizer.from_pretrained(model)
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        dtype = dtype or (torch.bfloat16 if self.device == "cuda" else torch.float32)
        self.model = AutoModelForCausalLM.from_pretrained(model, dtype=dtype).to(self.device).eval()
        self.batch_size = batch_size
        self.max_context = max_context or getattr(self.model.config, "max_position_embeddings", None)
        eos = self.model.generation_config.eos_token_id
        self.eos_ids = [e for e in (eos if isinstance(eos, list) else [eos]) if e is not None]
        if self.tokenizer.eos_token_id is not None and self.tokenizer.eos_token_id not in self.eos_ids:
            self.eos_ids.append(self.tokenizer.eos_token_id)

    @torch.inference_mode()
    def generate(self, prompts: list[str], config: GenerationConfig) -> list[list[Completion]]:
        if config.seed is not None:
            torch.manual_seed(config.seed)
        # n samples per prompt as n rows; long prompts first so sub-batches hold similar lengths
        rows = [(i, p) for i, p in enumerate(prompts) for _ in range(config.n)]
        lengths = {i: len(self.tokenizer(p, add_special_tokens=False)["input_ids"]) for i, p in enumerate(prompts)}
        order = sorted(range(len(rows)), key=lambda r: -lengths[rows[r][0]])
        results: list[Completion | None] = [None] * len(rows)
        fits = [r for r in order if self.max_context is None or lengths[rows[r][0]] < self.max_context]
        for r in set(order) - set(fits):
            results[r] = Completion(text="", finish_reason="context_overflow")
        for start in range(0, len(fits), self.batch_size):
            batch = fits[start: start + self.batch_size]
            done = self._generate_batch([rows[r][1] for r in batch], [lengths[rows[r][0]] for r in batch], config)
            for r, c in zip(batch, done):
                results[r] = c
        out: list[list[Completion]] = [[] for _ in prompts]
        for (i, _), c in zip(rows, results):
            out[i].append(c)
        return out

    def _generate_batch(self, prompts: list[str], lengths: list[int], config: GenerationConfig) -> list[Completion]:
        enc = self.tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(self.device)
        # Each row's own budget (what it would get alone): a long prompt must not shorten its neighbours.
        budgets = [config.max_new_tokens if self.max_context is None
                   else max(1, min(config.max_new_tokens, self.max_context - n)) for n in lengths]
        sample = config.temperature > 0
        gen = self.model.generate(
            **enc,
            max_new_tokens=max(budgets),
            do_sample=sample,
            temperature=config.temperature if sample else None,
            top_p=config.top_p if sample else None,
            top_k=0 if sample else None,
            stop_strings=list(config.stop) or None,
            tokenizer=self.tokenizer,
            eos_token_id=self.eos_ids,
            pad_token_id=self.tokenizer.pad_token_id,
        )
        new = gen[:, enc["input_ids"].shape[1]:]
        out = []
        for row, budget in zip(new.tolist(), budgets):
            row = row[:budget]
            n_eos = next((k for k, t in enumerate(row) if t in self.eos_ids), None)
            ids = row[:n_eos] if n_eos is not None else [t for t in row if t != self.tokenizer.pad_token_id]
            text, stopped = cut_at_stop(self.tokenizer.decode(ids, skip_special_tokens=True), config.stop)
            # A row that ended on a stop string is padded afterwards (pad may equal eos): that pad is no token of it.
            tokens = len(ids) + (n_eos is not None and not stopped)
            reason = "stop" if (n_eos is not None or stopped) else "length"
            out.append(Completion(text=text, num_tokens=tokens, finish_reason=reason))
        return out
