"""LLM backends behind one interface: generate completions for a batch of already-rendered
prompt strings (client-side rendering, so every backend sees the exact same text).

- `hf`: in-process transformers, batched (the CPU path and the test path);
- `openai`: an OpenAI-compatible completions server (`vllm serve`, several replicas).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

# The original agent's stop words (LMAgent.stop_words).
DEFAULT_STOP = ("\nObservation:", "\nTask:", "\n---")


@dataclass
class GenerationConfig:
    max_new_tokens: int = 512
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    n: int = 1
    stop: tuple[str, ...] = DEFAULT_STOP
    seed: int | None = None


@dataclass
class Completion:
    text: str  # without the stop string, as vLLM returns it
    num_tokens: int = 0
    finish_reason: str = "stop"  # stop | length | error
    meta: dict = field(default_factory=dict)


class ContextOverflow(RuntimeError):
    """The prompt does not fit the model's context window (recorded as such, never as a generic error)."""


class BackendUnavailable(RuntimeError):
    """The server cannot be reached; the message says where and how to start one."""


class LLMBackend(Protocol):
    model_name: str

    def generate(self, prompts: list[str], config: GenerationConfig) -> list[list[Completion]]:
        """`config.n` completions for each prompt, in prompt order."""


def make_backend(kind: str, model: str, **kwargs) -> LLMBackend:
    if kind == "hf":
        from eval_agent.llm.hf import HFBackend

        return HFBackend(model, **kwargs)
    if kind == "openai":
        from eval_agent.llm.openai_http import OpenAIBackend

        return OpenAIBackend(model, **kwargs)
    raise ValueError(f"unknown backend {kind!r}; choose hf or openai")
