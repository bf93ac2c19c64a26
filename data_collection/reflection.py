"""Reflection: the thought that leads from a deviated step back to the expert's action (STeCa §3.2).

The reflecting model sees the history up to the deviated step and its observation, is told that the step was
not optimal and what the ground-truth next action is, and writes the thought; the action stays the expert's.
Backends: `chat`, an OpenAI-compatible chat endpoint (GPT-4o in the paper; key and URL only from the
environment: REFLECT_API_KEY / REFLECT_BASE_URL, else OPENAI_*; never logged), or `self`, the SFT policy
through eval_agent.llm (the paper's self-generation variant). Replies are cleaned into one `Thought:` line and the expert's `Action:`, invalid ones asked again, and
every raw reply is cached on disk, so a rerun asks nothing. `--reflect_prompt original` sends the published
code's `Human:`/`Gpt:` transcript and request instead of chat turns. docs/data_collection.md has the details.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import hashlib
import json
import logging
import re
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Protocol

import httpx
from tqdm import tqdm

from eval_agent.cli import check_policy_model, count, natural, non_negative
from eval_agent.guard import weights_fingerprint
from eval_agent.llm import DEFAULT_STOP, BackendUnavailable, GenerationConfig
from eval_agent.llm.openai_http import HTTPClient, Refused, RetryPolicy, chat_choice
from eval_agent.llm.reflect_endpoint import reflection_endpoint
from eval_agent.redaction import redact
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
# `--reflect_prompt original`: the published code's request (data_cali_*.py), verbatim, appended to the
# history rendered as a `Human: ...` / `Gpt: ...` transcript and sent as one user message.
ORIGINAL_REQUEST = (
    "\n\nAbove is the interaction history. However, the last step is not optimal and may lead to a wrong direction. "
    "The next step ground truth action is: {action}. Please provide the thought which would lead the agent to generate "
    "the ground truth action and be aware of the last non-optimal action. The thought should follow the format of the "
    "interaction history."
)
PROMPT_STYLES = ("ours", "original")
DEFAULT_CHAT_MODEL = "gpt-4o"
OPENAI_URL = "https://api.openai.com/v1"  # the chat endpoint when no base URL is set
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

def transcript(history: list[dict[str, str]]) -> str:
    """The original's `convert_to_text`: `Human: <turn>` / `Gpt: <turn>` (values stripped), blank lines between."""
    speaker = {"user": "Human", "assistant": "Gpt"}
    return "\n\n".join(f"{speaker[m['role']]}: {m['content'].strip()}" for m in history)


def reflection_messages(req: ReflectionRequest, style: str = "ours") -> list[dict[str, str]]:
    """The chat sent to the reflecting model: the history as chat turns with the request appended to its last
    (observation) turn (`ours`), or the original's one user message: transcript + its request (`original`)."""
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
    if style == "original":
        return [{"role": "user", "content": transcript(history) + ORIGINAL_REQUEST.format(action=action)}]
    if style != "ours":
        raise ValueError(f"reflection prompt style must be one of {PROMPT_STYLES}, got {style!r}")
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
        key, base_url = reflection_endpoint()
        if not key and not base_url:
            raise SystemExit("error: the chat reflection backend needs REFLECT_API_KEY (or OPENAI_API_KEY; and "
                             "REFLECT_BASE_URL for an endpoint other than OpenAI's) in the environment; or use "
                             "--reflect_backend self")
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
        return BackendUnavailable(f"chat endpoint {redact(self.url)} (model {self.model!r}): {why}; set "
                                  "REFLECT_BASE_URL / REFLECT_API_KEY, or use --reflect_backend self")

    def _check(self) -> None:
        """Fail fast when the endpoint is down or refuses the key (a missing /models route is fine)."""
        try:
            response = self.client.run(self.client.get(self.url, "/models", timeout=10.0))
        except httpx.TransportError as e:
            raise self._unavailable(f"cannot connect ({type(e).__name__})") from None
        if response.status_code in (401, 403):
            raise self._unavailable(f"it rejected the key ({response.status_code}; REFLECT_API_KEY, else OPENAI_API_KEY)")

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
                raise self._unavailable(f"it rejected the key ({e.status}; REFLECT_API_KEY, else OPENAI_API_KEY)") from None
            if e.status == 404:  # every other request would fail the same way
                raise self._unavailable(f"HTTP 404: {e.message}") from None
            return Reply(text="", finish_reason="error", refused=f"refused ({e.status}): {e.message}"[:300])
        except BackendUnavailable as e:
            raise self._unavailable(str(e)) from None
        return Reply(text=text, finish_reason=finish_reason, prompt_tokens=usage.get("prompt_tokens", 0),
                     completion_tokens=usage.get("completion_tokens", 0))


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


# ---- asking with a cache, and the reflector ---------------------------------------------------------

@dataclass
class Answer:
    """One prompt's outcome after every attempt."""
    cleaned: Cleaned
    attempts: int
    called: bool  # some attempt was asked now (else every one came from the cache)
    prompt_tokens: int
    completion_tokens: int


class CachedAsker:
    """A model's replies to many prompts: every raw reply cached on disk by all that determines it (backend,
    model, prompt text, generation settings, attempt), a reply that cleans to nothing asked again, all counted.
    The reflector and the LLM step-reward scorer (data_collection/step_rewards.py) ask through it."""

    what = "ask"  # the progress bar's word

    def __init__(self, model: ReflectionModel, cache_path: str | Path, retries: int = 2):
        self.model = model
        self.retries = retries
        self.cache = JsonlStore(cache_path)
        self.stats = {"requests": 0, "ok": 0, "invalid": 0, "retries": 0, "calls": 0, "cache_hits": 0,
                      "refused": 0, "prompt_tokens": 0, "completion_tokens": 0}

    def cache_key(self, prompt_text: str, attempt: int) -> str:
        parts = [self.model.name, self.model.model, prompt_text, self.model.settings]
        digest = hashlib.sha256(json.dumps(parts, sort_keys=True, ensure_ascii=False).encode()).hexdigest()
        return f"{digest}-{attempt}"

    def ask(self, prompts: list[str], clean: Callable[[int, str, bool], Cleaned]) -> list[Answer]:
        """One answer per prompt, in order; `clean(i, text, truncated)` cleans prompt i's reply (text None:
        invalid). Attempt k+1 only for the prompts still invalid after k."""
        attempts = [0] * len(prompts)
        tokens = [[0, 0] for _ in prompts]
        called = [False] * len(prompts)
        results: list[Cleaned | None] = [None] * len(prompts)
        pending = list(range(len(prompts)))
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
                results[i] = self._clean(reply, partial(clean, i))
                self.stats["refused"] += reply.refused is not None
                if results[i].text is None:
                    still.append(i)
            pending = still
        out = [Answer(res, attempts[i], called[i], *tokens[i]) for i, res in enumerate(results) if res is not None]
        self.stats["requests"] += len(out)
        self.stats["ok"] += sum(a.cleaned.text is not None for a in out)
        self.stats["invalid"] += sum(a.cleaned.text is None for a in out)
        self.stats["retries"] += sum(a.attempts - 1 for a in out)
        return out

    @staticmethod
    def _clean(reply: Reply, clean: Callable[[str, bool], Cleaned]) -> Cleaned:
        if reply.refused:
            return Cleaned(None, reply.refused)
        if reply.finish_reason == "context_overflow":
            return Cleaned(None, "the prompt does not fit the model's context window")
        return clean(reply.text, reply.finish_reason == "length")

    def _replies(self, prompts: list[str], attempt: int) -> list[tuple[Reply, bool]]:
        """(reply, asked now) per prompt: from the cache, else from the model (each prompt asked once)."""
        keys = [self.cache_key(p, attempt) for p in prompts]
        missing = list(dict.fromkeys(k for k in keys if k not in self.cache))
        fresh: dict[str, Reply] = {}
        if missing:
            by_key = {k: p for k, p in zip(keys, prompts)}
            bar = tqdm(total=len(missing), desc=f"{self.what} ({self.model.name}, attempt {attempt + 1})", unit="reply")

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


class Reflector(CachedAsker):
    """Reflections for many requests: cached, retried while invalid, counted."""

    what = "reflect"

    def __init__(self, model: ReflectionModel, cache_path: str | Path, retries: int = 2, prompt_style: str = "ours"):
        super().__init__(model, cache_path, retries)
        self.prompt_style = prompt_style
        self.stats["actions_replaced"] = 0

    def reflect(self, requests: list[ReflectionRequest]) -> list[Reflection]:
        """One reflection per request, in order."""
        prompts = [self.model.prompt_text(reflection_messages(r, self.prompt_style)) for r in requests]
        answers = self.ask(prompts, lambda i, text, truncated: clean_reflection(text, requests[i].expert_action,
                                                                                 truncated))
        out = []
        for req, a in zip(requests, answers):
            self.stats["actions_replaced"] += a.cleaned.action_replaced
            out.append(Reflection(key=req.key, text=a.cleaned.text, ok=a.cleaned.text is not None,
                                  backend=self.model.name, model=self.model.model, cached=not a.called,
                                  attempts=a.attempts, error=a.cleaned.error, prompt_tokens=a.prompt_tokens,
                                  completion_tokens=a.completion_tokens))
        return out


# ---- command line -------------------------------------------------------------------------------------

def add_reflection_args(p: argparse.ArgumentParser) -> None:
    """Reflection options; `self` uses add_model_args' --model/--backend/--endpoints/--chat_format (and --task)."""
    g = p.add_argument_group("reflection")
    g.add_argument("--reflect_backend", choices=("auto", "chat", "self"), default="auto",
                   help="chat: an OpenAI-compatible endpoint (REFLECT_API_KEY, REFLECT_BASE_URL, else OPENAI_*); self: "
                        "the policy given by --model (the paper's self-generation); auto: chat when a key is set")
    g.add_argument("--reflect_prompt", choices=PROMPT_STYLES, default="ours",
                   help="ours: the history as chat turns, the request in the last one; original: the published "
                        "code's Human:/Gpt: transcript and request as one user message")
    g.add_argument("--reflect_model",
                   help=f"chat: the model name (default {DEFAULT_CHAT_MODEL}); self: default --model")
    g.add_argument("--reflect_cache",
                   help="raw-reply cache, JSONL (default: RUN_DIR/data_collection/reflection_cache.jsonl)")
    g.add_argument("--reflect_concurrency", type=count, default=8,
                   help="chat: requests in flight; self: prompts per generate call")
    g.add_argument("--reflect_retries", type=natural, default=2, help="times an invalid reply is asked again")
    g.add_argument("--reflect_temperature", type=non_negative, default=1.0, help="the original: the API default, 1.0")
    g.add_argument("--reflect_max_tokens", type=count, default=256)
    g.add_argument("--reflect_seed", type=int, default=0, help="sampling seed (+ the attempt number on retries)")
    g.add_argument("--reflect_timeout", type=float, default=120.0, help="chat: seconds per request")
    g.add_argument("--reflect_http_retries", type=int, default=6,
                   help="chat: retries with exponential backoff on connection errors, 429, 5xx and malformed answers")


def reflect_backend(args: argparse.Namespace) -> str:
    """chat or self: what --reflect_backend auto means here (chat when the reflection endpoint has a key)."""
    if args.reflect_backend == "auto":
        return "chat" if reflection_endpoint()[0] else "self"
    return args.reflect_backend


def reflection_model(args: argparse.Namespace, settings: dict[str, Any]) -> ReflectionModel:
    """The model --reflect_backend names (chat endpoint or the policy itself), with these generation settings."""
    if reflect_backend(args) == "chat":
        return ChatModel(args.reflect_model or DEFAULT_CHAT_MODEL, settings, concurrency=args.reflect_concurrency,
                         timeout=args.reflect_timeout, http_retries=args.reflect_http_retries)
    from eval_agent.runner import ModelPolicy

    name = args.reflect_model or args.model
    if not name:
        raise SystemExit("error: self reflection needs --model (the SFT policy), or set REFLECT_API_KEY for chat")
    if not getattr(args, "task_family", None):
        raise SystemExit("error: self reflection needs --task_family (the policy's task family)")
    check_policy_model(argparse.Namespace(**{**vars(args), "model": name}))
    policy = ModelPolicy.build(args.task_family, name, GenerationConfig(), backend=args.backend, endpoints=args.endpoints,
                               chat_format=args.chat_format, tokenizer=args.tokenizer)
    return SelfModel(policy, settings, batch=args.reflect_concurrency)


def reflector_from_args(args: argparse.Namespace, cache_path: Path) -> Reflector:
    settings = {"temperature": args.reflect_temperature, "max_tokens": args.reflect_max_tokens,
                "seed": args.reflect_seed}
    return Reflector(reflection_model(args, settings), Path(args.reflect_cache or cache_path),
                     retries=args.reflect_retries, prompt_style=args.reflect_prompt)
