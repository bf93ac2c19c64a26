"""Reflection: the thought that leads from a deviated step back to the expert's action (STeCa §3.2).

The reflecting model sees the interaction history up to the deviated step and the observation it got,
is told that this last step was not optimal and what the ground-truth next action is, and writes the
thought that leads to that action. Only the thought is generated; the action is the expert's (an
oracle, as in the paper). Two backends:
- `chat`: an OpenAI-compatible chat endpoint (GPT-4o in the paper); key and base URL come only from
  the environment (OPENAI_API_KEY, OPENAI_BASE_URL) and are never logged or written;
- `self`: the SFT policy itself through eval_agent.llm (the paper's self-generation variant, Table 3),
  the request rendered with the model's own chat format and generated in batches.

Differences from the original (data_cali_*.py, which used the GPT-4o replies nearly raw):
- the history is sent as chat turns, and the request follows the last observation in the same user
  turn: no `Human:`/`Gpt:` transcript, whose role names the replies echoed;
- a reply is cleaned into exactly `Thought: <one line>\\nAction: <expert action>`: text before
  `Thought:` (a role prefix, a preamble) is dropped, a thought over several lines is joined, the
  reply's own `Action:` is replaced by the ground truth (as the original does) and anything after it
  dropped; a reply with no thought is invalid, asked again, then counted;
- raw replies are cached on disk per (backend, model, prompt, generation settings, attempt), so a
  rerun or a resumed run costs nothing for what was answered, and a change of the cleaning rules
  needs no new calls; requests run concurrently with exponential backoff; tokens and cost are summed.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import hashlib
import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Protocol

import httpx
from tqdm import tqdm

from eval_agent.llm import DEFAULT_STOP, BackendUnavailable, GenerationConfig
from eval_agent.llm.openai_http import HTTPClient, Refused, RetryPolicy, chat_choice
from eval_agent.store import JsonlStore
from eval_agent.trajectory import format_reply

if TYPE_CHECKING:
    from eval_agent.runner import ModelPolicy

log = logging.getLogger(__name__)

# The original's content (history; last step not optimal; the ground-truth next action; write the
# thought that leads to it, aware of the mistake, in the history's format), in the project's words.
REQUEST = (
    "The last step above was not optimal and may lead in a wrong direction. "
    "The ground-truth next action is: {action}\n"
    "Write the thought that leads to this ground-truth action, aware that the last step was not optimal. "
    "Follow the format of the history and reply with exactly two lines:\n"
    "Thought: <your thought>\n"
    "Action: {action}"
)
DEFAULT_CHAT_MODEL = "gpt-4o"
OPENAI_URL = "https://api.openai.com/v1"  # the chat endpoint when OPENAI_BASE_URL is not set
# USD per 1M (input, output) tokens, OpenAI's list prices (cached-input discounts ignored).
PRICES_PER_1M = {"gpt-4o": (2.50, 10.00), "gpt-4o-mini": (0.15, 0.60)}


@dataclass
class ReflectionRequest:
    key: str  # stable id (the deviated explore record's key)
    history: list[dict[str, str]]  # instruction, "OK", task, expert steps, the deviated step and its observation
    expert_action: str  # the ground-truth next action


@dataclass
class Reflection:
    key: str
    text: str | None  # exactly "Thought: <...>\nAction: <expert_action>"; None when invalid
    ok: bool
    backend: str  # chat | self
    model: str
    cached: bool  # every attempt was served from the on-disk cache (cost nothing now)
    attempts: int
    error: str | None  # why it is invalid after all retries
    prompt_tokens: int
    completion_tokens: int


# ---- prompt and reply cleaning ----------------------------------------------------------------------

def reflection_messages(req: ReflectionRequest) -> list[dict[str, str]]:
    """The chat sent to the reflecting model: the history, the request appended to its last (observation) turn."""
    where = f"reflection request {req.key!r}"
    action = (req.expert_action or "").strip()
    if not action or "\n" in action:
        raise ValueError(f"{where}: expert_action must be one non-empty line, got {req.expert_action!r}")
    history = req.history
    if not history or history[-1].get("role") != "user":
        raise ValueError(f"{where}: history must end with the deviated step's observation (a user turn)")
    for i, m in enumerate(history):
        if m.get("role") != ("user" if i % 2 == 0 else "assistant") or not isinstance(m.get("content"), str):
            raise ValueError(f"{where}: turn {i} must be a {'user' if i % 2 == 0 else 'assistant'} turn with text")
    last = {"role": "user", "content": history[-1]["content"].rstrip() + "\n\n" + REQUEST.format(action=action)}
    return [dict(m) for m in history[:-1]] + [last]


_MARK = r"\**\s*:\**"  # "Thought:" also as markdown "**Thought:**" / "**Thought**:"
_THOUGHT = re.compile(r"\bThought" + _MARK, re.IGNORECASE)
_ACTION = re.compile(r"\**\bAction" + _MARK, re.IGNORECASE)
# Where a thought ends: its action, a blank line (a commentary paragraph follows), or a line that
# starts another turn or another step.
_THOUGHT_END = re.compile(r"\**\bAction" + _MARK + r"|\n[ \t]*\n"
                          r"|^\s*\**(?:Observation|Thought|Human|User|Gpt|Assistant)" + _MARK,
                          re.IGNORECASE | re.MULTILINE)
PLACEHOLDER = "<your thought>"


@dataclass(frozen=True)
class Cleaned:
    text: str | None  # "Thought: ...\nAction: <expert action>", None when invalid
    error: str | None
    action_replaced: bool = False  # the reply named another action, overwritten by the ground truth


def clean_reflection(reply: str | None, expert_action: str, truncated: bool = False) -> Cleaned:
    """One `Thought:` (joined onto one line) + the ground-truth action, or why the reply is unusable.

    `truncated`: the reply hit the token limit; a thought that runs to the end of it may be cut mid-sentence.
    """
    reply = reply or ""
    if not reply.strip():
        return Cleaned(None, "empty reply")
    start = _THOUGHT.search(reply)
    if start is None:
        return Cleaned(None, "no 'Thought:' in the reply")
    body = reply[start.end():]
    end = _THOUGHT_END.search(body)
    thought = " ".join(body[: end.start() if end else len(body)].split()).strip("* ")
    if not thought or thought == PLACEHOLDER:
        return Cleaned(None, "empty thought")
    if end is None and truncated:
        return Cleaned(None, "reply cut at the token limit inside its thought")
    action_mark = _ACTION.search(body)
    action = body[action_mark.end():].strip().split("\n", 1)[0].strip("* ") if action_mark else None
    replaced = action is not None and action != expert_action.strip()
    return Cleaned(format_reply(thought, expert_action.strip()), None, replaced)


def cost_usd(model: str, prompt_tokens: int, completion_tokens: int) -> float | None:
    """Dollars for the tokens at the list price, None for a model not in the table (e.g. the policy itself)."""
    if model not in PRICES_PER_1M:
        return None
    price_in, price_out = PRICES_PER_1M[model]
    return (prompt_tokens * price_in + completion_tokens * price_out) / 1e6


# ---- backends -----------------------------------------------------------------------------------------

@dataclass
class Reply:
    text: str
    finish_reason: str = "stop"
    prompt_tokens: int = 0
    completion_tokens: int = 0
    refused: str | None = None  # the endpoint refused the request (HTTP 4xx): nothing to cache


class ReflectionModel(Protocol):
    name: str  # chat | self
    model: str
    settings: dict[str, Any]  # generation settings, part of the cache key

    def prompt_text(self, messages: list[dict[str, str]]) -> str:
        """The exact text the model is asked with (what the cache key hashes)."""

    def generate(self, prompts: list[str], attempt: int, on_reply: Callable[[int, Reply], None]) -> None:
        """Answer every prompt (by index, in any order), calling `on_reply` as each answer arrives."""


def _seed(settings: dict[str, Any], attempt: int) -> int | None:
    """Another seed per attempt, so a retry with sampling gets another reply."""
    return None if settings["seed"] is None else settings["seed"] + attempt


class ChatModel:
    """An OpenAI-compatible chat endpoint through the shared HTTP client (eval_agent.llm.openai_http: its retry
    policy, Retry-After honoured, malformed answers retried); `concurrency` requests in flight."""

    name = "chat"

    def __init__(self, model: str, settings: dict[str, Any], concurrency: int = 8, timeout: float = 120.0,
                 http_retries: int = 6):
        key = os.environ.get("OPENAI_API_KEY")
        base_url = os.environ.get("OPENAI_BASE_URL") or None
        if not key and not base_url:
            raise SystemExit("error: the chat reflection backend needs OPENAI_API_KEY (and OPENAI_BASE_URL for an "
                             "endpoint other than OpenAI's) in the environment; or use --reflect_backend self")
        self.url = (base_url or OPENAI_URL).rstrip("/")
        self.client = HTTPClient([self.url], api_key=key, timeout=timeout, max_requests=concurrency,
                                 retry=RetryPolicy(retries=http_retries), what="chat endpoint")
        self.model, self.settings = model, settings
        self._checked = False

    def prompt_text(self, messages: list[dict[str, str]]) -> str:
        return json.dumps(messages, ensure_ascii=False)

    def generate(self, prompts: list[str], attempt: int, on_reply: Callable[[int, Reply], None]) -> None:
        if not self._checked:
            self._check()
            self._checked = True
        futures = {self.client.submit(self._ask(json.loads(p), attempt)): i for i, p in enumerate(prompts)}
        try:
            for f in concurrent.futures.as_completed(futures):
                on_reply(futures[f], f.result())
        except BaseException:
            for f in futures:
                f.cancel()
            raise

    def _unavailable(self, why: str) -> BackendUnavailable:
        """A clear error naming the endpoint; the key is never part of it (the client scrubs it from messages)."""
        return BackendUnavailable(f"chat endpoint {self.url} (model {self.model!r}): {why}; set OPENAI_BASE_URL / "
                                  f"OPENAI_API_KEY, or use --reflect_backend self")

    def _check(self) -> None:
        """Fail fast when the endpoint is down or refuses the key (a missing /models route is fine)."""
        try:
            response = self.client.run(self.client.get(self.url, "/models", timeout=10.0))
        except httpx.TransportError as e:
            raise self._unavailable(f"cannot connect ({type(e).__name__})") from None
        if response.status_code in (401, 403):
            raise self._unavailable(f"it rejected OPENAI_API_KEY ({response.status_code})")

    async def _ask(self, messages: list[dict[str, str]], attempt: int) -> Reply:
        payload: dict[str, Any] = dict(model=self.model, messages=messages, temperature=self.settings["temperature"],
                                       max_tokens=self.settings["max_tokens"])
        seed = _seed(self.settings, attempt)
        if seed is not None:
            payload["seed"] = seed
        try:
            (text, finish_reason, usage), _ = await self.client.post("/chat/completions", payload, chat_choice)
        except Refused as e:
            if e.status in (401, 403):
                raise self._unavailable(f"it rejected OPENAI_API_KEY ({e.status})") from None
            if e.status == 404:  # every other request would fail the same way
                raise self._unavailable(f"HTTP 404: {e.message}") from None
            return Reply(text="", finish_reason="error", refused=f"refused ({e.status}): {e.message}"[:300])
        except BackendUnavailable as e:
            raise self._unavailable(str(e)) from None
        return Reply(text=text, finish_reason=finish_reason, prompt_tokens=usage.get("prompt_tokens", 0),
                     completion_tokens=usage.get("completion_tokens", 0))


def weights_fingerprint(model: str) -> str | None:
    """Name, size and modification time of a local model folder's weight files; None for a served name."""
    files = sorted(p for pattern in ("*.safetensors", "*.bin") for p in Path(model).glob(pattern))
    if not files:
        return None
    stats = [(p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in files]
    return hashlib.sha256(json.dumps(stats).encode()).hexdigest()[:16]


class SelfModel:
    """The SFT policy through an eval_agent.llm backend (hf in-process or openai completions servers)."""

    name = "self"

    def __init__(self, policy: ModelPolicy, settings: dict[str, Any], batch: int = 8):
        self.backend, self.chat_format = policy.backend, policy.chat_format
        self.model = policy.backend.model_name
        # the weights' identity joins the cache key: a model retrained into the same folder is a new model
        self.settings = {**settings, "stop": list(DEFAULT_STOP), "weights": weights_fingerprint(self.model)}
        self.batch = batch
        self.tokenizer = getattr(self.backend, "tokenizer", None) or self.chat_format.tokenizer

    def prompt_text(self, messages: list[dict[str, str]]) -> str:
        return self.chat_format.render(messages)

    def generate(self, prompts: list[str], attempt: int, on_reply: Callable[[int, Reply], None]) -> None:
        config = GenerationConfig(max_new_tokens=self.settings["max_tokens"], temperature=self.settings["temperature"],
                                  stop=tuple(self.settings["stop"]), seed=_seed(self.settings, attempt))
        for start in range(0, len(prompts), self.batch):  # batches, so a kill loses one batch at most
            chunk = prompts[start: start + self.batch]
            for i, (prompt, outs) in enumerate(zip(chunk, self.backend.generate(chunk, config)), start):
                n_prompt = len(self.tokenizer(prompt, add_special_tokens=False)["input_ids"]) if self.tokenizer else 0
                on_reply(i, Reply(text=outs[0].text, finish_reason=outs[0].finish_reason, prompt_tokens=n_prompt,
                                  completion_tokens=outs[0].num_tokens))


# ---- the reflector ------------------------------------------------------------------------------------

class Reflector:
    """Reflections for many requests: cached, retried while invalid, counted."""

    def __init__(self, model: ReflectionModel, cache_path: str | Path, retries: int = 2):
        self.model = model
        self.retries = retries
        self.cache = JsonlStore(cache_path)
        self.stats = {"requests": 0, "ok": 0, "invalid": 0, "retries": 0, "calls": 0, "cache_hits": 0,
                      "refused": 0, "actions_replaced": 0, "prompt_tokens": 0, "completion_tokens": 0}

    def cache_key(self, prompt_text: str, attempt: int) -> str:
        what = [self.model.name, self.model.model, prompt_text, self.model.settings]
        digest = hashlib.sha256(json.dumps(what, sort_keys=True, ensure_ascii=False).encode()).hexdigest()
        return f"{digest}-{attempt}"

    def reflect(self, requests: list[ReflectionRequest]) -> list[Reflection]:
        """One reflection per request, in order; attempt k+1 only for the requests still invalid after k."""
        prompts = [self.model.prompt_text(reflection_messages(r)) for r in requests]
        attempts = [0] * len(requests)
        tokens = [[0, 0] for _ in requests]
        called = [False] * len(requests)
        results: list[Cleaned | None] = [None] * len(requests)
        pending = list(range(len(requests)))
        for attempt in range(self.retries + 1):
            if not pending:
                break
            replies = self._replies([prompts[i] for i in pending], attempt)
            still = []
            for i, (reply, fresh) in zip(pending, replies):
                attempts[i] += 1
                called[i] |= fresh
                tokens[i][0] += reply.prompt_tokens
                tokens[i][1] += reply.completion_tokens
                results[i] = self._clean(reply, requests[i].expert_action)
                self.stats["refused"] += reply.refused is not None
                if results[i].text is None:
                    still.append(i)
            pending = still
        out = []
        for i, req in enumerate(requests):
            res = results[i]
            assert res is not None
            self.stats["actions_replaced"] += res.action_replaced
            out.append(Reflection(key=req.key, text=res.text, ok=res.text is not None, backend=self.model.name,
                                  model=self.model.model, cached=not called[i], attempts=attempts[i],
                                  error=res.error, prompt_tokens=tokens[i][0], completion_tokens=tokens[i][1]))
        self.stats["requests"] += len(out)
        self.stats["ok"] += sum(r.ok for r in out)
        self.stats["invalid"] += sum(not r.ok for r in out)
        self.stats["retries"] += sum(r.attempts - 1 for r in out)
        return out

    @staticmethod
    def _clean(reply: Reply, expert_action: str) -> Cleaned:
        if reply.refused:
            return Cleaned(None, reply.refused)
        if reply.finish_reason == "context_overflow":
            return Cleaned(None, "the prompt does not fit the model's context window")
        return clean_reflection(reply.text, expert_action, truncated=reply.finish_reason == "length")

    def _replies(self, prompts: list[str], attempt: int) -> list[tuple[Reply, bool]]:
        """(reply, asked now) per prompt: from the cache, else from the model (each prompt asked once)."""
        keys = [self.cache_key(p, attempt) for p in prompts]
        missing = list(dict.fromkeys(k for k in keys if k not in self.cache))
        fresh: dict[str, Reply] = {}
        if missing:
            by_key = {k: p for k, p in zip(keys, prompts)}
            bar = tqdm(total=len(missing), desc=f"reflect ({self.model.name}, attempt {attempt + 1})", unit="reply")

            def on_reply(j: int, reply: Reply) -> None:
                fresh[missing[j]] = reply
                self.stats["calls"] += 1
                self.stats["prompt_tokens"] += reply.prompt_tokens
                self.stats["completion_tokens"] += reply.completion_tokens
                if reply.refused is None:  # appended at once: a kill loses no answered call
                    self.cache.append({"key": missing[j], "backend": self.model.name, "model": self.model.model,
                                       "attempt": attempt, "reply": reply.text, "finish_reason": reply.finish_reason,
                                       "prompt_tokens": reply.prompt_tokens,
                                       "completion_tokens": reply.completion_tokens})
                bar.update()

            try:
                self.model.generate([by_key[k] for k in missing], attempt, on_reply)
            finally:
                bar.close()
        out = []
        for k in keys:
            if k in fresh:
                out.append((fresh[k], True))
            else:
                rec = self.cache.records[k]
                self.stats["cache_hits"] += 1
                reply = Reply(text=rec["reply"], finish_reason=rec["finish_reason"],
                              prompt_tokens=rec["prompt_tokens"], completion_tokens=rec["completion_tokens"])
                out.append((reply, False))
        return out

    def summary(self) -> dict[str, Any]:
        """Counts and what this run's calls cost (cached replies cost nothing; cost None when the price is unknown)."""
        cost = cost_usd(self.model.model, self.stats["prompt_tokens"], self.stats["completion_tokens"])
        return {"backend": self.model.name, "model": self.model.model, **self.stats,
                "cost_usd": None if cost is None else round(cost, 6), "cache": str(self.cache.path)}


# ---- command line -------------------------------------------------------------------------------------

def add_reflection_args(p: argparse.ArgumentParser) -> None:
    """Reflection options; `self` uses add_model_args' --model/--backend/--endpoints/--chat_format (and --task)."""
    g = p.add_argument_group("reflection")
    g.add_argument("--reflect_backend", choices=("auto", "chat", "self"), default="auto",
                   help="chat: an OpenAI-compatible endpoint (OPENAI_API_KEY, OPENAI_BASE_URL); self: the policy "
                        "given by --model (the paper's self-generation); auto: chat when OPENAI_API_KEY is set")
    g.add_argument("--reflect_model",
                   help=f"chat: the model name (default {DEFAULT_CHAT_MODEL}); self: default --model")
    g.add_argument("--reflect_cache",
                   help="raw-reply cache, JSONL (default: RUN_DIR/data_collection/reflection_cache.jsonl)")
    g.add_argument("--reflect_concurrency", type=int, default=8,
                   help="chat: requests in flight; self: prompts per generate call")
    g.add_argument("--reflect_retries", type=int, default=2, help="times an invalid reply is asked again")
    g.add_argument("--reflect_temperature", type=float, default=1.0, help="the original: the API default, 1.0")
    g.add_argument("--reflect_max_tokens", type=int, default=256)
    g.add_argument("--reflect_seed", type=int, default=0, help="sampling seed (+ the attempt number on retries)")
    g.add_argument("--reflect_timeout", type=float, default=120.0, help="chat: seconds per request")
    g.add_argument("--reflect_http_retries", type=int, default=6,
                   help="chat: retries with exponential backoff on connection errors, 429, 5xx and malformed answers")


def reflector_from_args(args: argparse.Namespace, cache_path: Path) -> Reflector:
    settings = {"temperature": args.reflect_temperature, "max_tokens": args.reflect_max_tokens,
                "seed": args.reflect_seed}
    kind = args.reflect_backend
    if kind == "auto":
        kind = "chat" if os.environ.get("OPENAI_API_KEY") else "self"
    model: ReflectionModel
    if kind == "chat":
        model = ChatModel(args.reflect_model or DEFAULT_CHAT_MODEL, settings, concurrency=args.reflect_concurrency,
                          timeout=args.reflect_timeout, http_retries=args.reflect_http_retries)
    else:
        from eval_agent.runner import ModelPolicy

        name = args.reflect_model or args.model
        if not name:
            raise SystemExit("error: self reflection needs --model (the SFT policy), or set OPENAI_API_KEY for chat")
        if not getattr(args, "task_family", None):
            raise SystemExit("error: self reflection needs --task_family (the policy's task family)")
        policy = ModelPolicy.build(args.task_family, name, GenerationConfig(), backend=args.backend, endpoints=args.endpoints,
                                   chat_format=args.chat_format, tokenizer=args.tokenizer)
        model = SelfModel(policy, settings, batch=args.reflect_concurrency)
    return Reflector(model, Path(args.reflect_cache or cache_path), retries=args.reflect_retries)
