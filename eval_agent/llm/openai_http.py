"""OpenAI-compatible completions backend: one or several `vllm serve` replicas (or `serve_hf`).

Prompts are rendered client-side and sent as text with `add_special_tokens: false` (a vLLM request
field), so the server tokenizes exactly what HFBackend tokenizes: the rendered text is the whole input.

Semantics kept equal to HFBackend:
- vLLM refuses prompt + max_tokens > context (HTTP 400). HFBackend instead shortens the budget to
  what is left of the context, so on that refusal the request is sent once more with `max_tokens`
  null (vLLM then generates up to the end of the context, which is then less than the budget asked
  for); only a prompt that does not fit by itself becomes `finish_reason="context_overflow"`.
- stop strings are cut by the server; `length` passes through.
"""
from __future__ import annotations

import asyncio
import logging
import os
import re
import threading
from pathlib import Path
from typing import Any

import openai
from openai import AsyncOpenAI

from eval_agent.llm import BackendUnavailable, Completion, GenerationConfig

log = logging.getLogger(__name__)

HOW_TO_START = (
    "start a server with `bash scripts/serve_vllm.sh` (GPU, vLLM) or "
    "`python -m eval_agent.llm.serve_hf --model DIR --port 8000` (CPU), and pass its base URL "
    "(e.g. http://127.0.0.1:8000/v1) in an --endpoints file or $OPENAI_BASE_URL"
)
# vLLM's wordings: "This model's maximum context length is N tokens. However, ..." (server) and
# "The decoder prompt (length N) is longer than the maximum model length of M" (engine).
_OVERFLOW = re.compile(r"maximum context length|maximum model length|context_length_exceeded", re.I)
# Worth another try: the server restarting, overloaded or slow.
_TRANSIENT = (openai.APIConnectionError, openai.InternalServerError, openai.RateLimitError)


def resolve_base_urls(endpoints_file: str | Path | None = None, base_urls: list[str] | str | None = None) -> list[str]:
    """Base URLs from the endpoints file (one per line, `#` comments), else `base_urls`, else $OPENAI_BASE_URL."""
    if endpoints_file:
        urls = [line.split("#", 1)[0] for line in Path(endpoints_file).read_text().splitlines()]
        where = f"endpoints file {endpoints_file}"
    elif base_urls:
        urls = base_urls.split(",") if isinstance(base_urls, str) else list(base_urls)
        where = "base_urls"
    else:
        urls = os.environ.get("OPENAI_BASE_URL", "").split(",")
        where = "$OPENAI_BASE_URL"
    urls = [u.strip().rstrip("/") for u in urls if u.strip()]
    if not urls:
        raise BackendUnavailable(f"no server URL in {where}: {HOW_TO_START}")
    return urls


class OpenAIBackend:
    """Completions over HTTP, spread over all endpoints.

    The sync `generate` runs coroutines on a private event loop that lives in a daemon thread for
    the backend's lifetime: it can be called any number of times (also from code that runs its own
    event loop), and connections are reused between calls. `close()` stops the loop.

    Each prompt is one request carrying all n samples, so one server's prefix cache serves them;
    a request goes to the endpoint with the fewest requests in flight (ties: round robin), and a
    retry may go to another replica.
    """

    backoff_s = 0.5  # first retry delay; doubles per attempt

    def __init__(self, model: str, endpoints_file: str | Path | None = None, base_urls: list[str] | str | None = None,
                 concurrency: int = 64, timeout: float | None = None, max_retries: int = 3):
        self.model_name = model
        self.urls = resolve_base_urls(endpoints_file, base_urls)
        self.concurrency = concurrency
        self.timeout = float(timeout if timeout is not None else os.environ.get("STECA_HTTP_TIMEOUT", 600))
        self.max_retries = max_retries
        self._clients: list[AsyncOpenAI] = []
        self._checked = False
        self._inflight = [0] * len(self.urls)
        self._next = 0
        self._semaphore: asyncio.Semaphore | None = None
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="openai-backend", daemon=True)
        self._thread.start()

    def generate(self, prompts: list[str], config: GenerationConfig) -> list[list[Completion]]:
        return asyncio.run_coroutine_threadsafe(self._generate(prompts, config), self._loop).result()

    def close(self) -> None:
        if self._loop.is_closed():
            return

        async def close_clients() -> None:
            for c in self._clients:
                await c.close()

        asyncio.run_coroutine_threadsafe(close_clients(), self._loop).result()
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._loop.close()

    async def _generate(self, prompts: list[str], config: GenerationConfig) -> list[list[Completion]]:
        if not self._clients:  # created on the loop that uses them
            key = os.environ.get("OPENAI_API_KEY") or "EMPTY"
            # retries are ours (max_retries=0 here): a retry may then go to another replica
            self._clients = [AsyncOpenAI(base_url=u, api_key=key, timeout=self.timeout, max_retries=0)
                             for u in self.urls]
            self._semaphore = asyncio.Semaphore(self.concurrency)
        if not self._checked:
            await self._check()
            self._checked = True
        tasks = [asyncio.ensure_future(self._complete(p, config)) for p in prompts]
        try:
            return list(await asyncio.gather(*tasks))
        except BaseException:  # one failure cancels the rest (and raises as itself, not as a group)
            for t in tasks:
                t.cancel()
            raise

    async def _check(self) -> None:
        """Fail fast, naming the URL, when a server is down or does not serve this model."""
        async def probe(client: AsyncOpenAI) -> list[str] | Exception:
            try:
                page = await client.models.list(timeout=min(self.timeout, 10.0))
                return [m.id for m in page.data]
            except (openai.APIConnectionError, openai.APIStatusError) as e:
                return e

        found = await asyncio.gather(*(probe(c) for c in self._clients))
        down = [f"{u} ({type(r).__name__}: {r})" for u, r in zip(self.urls, found) if isinstance(r, Exception)]
        if down:
            raise BackendUnavailable(f"cannot reach {', '.join(down)}: {HOW_TO_START}")
        for u, ids in zip(self.urls, found):
            if self.model_name not in ids:
                raise BackendUnavailable(f"{u} serves {ids}, not {self.model_name!r}: pass the served model name")

    async def _complete(self, prompt: str, config: GenerationConfig) -> list[Completion]:
        assert self._semaphore is not None
        async with self._semaphore:
            try:
                return await self._request(prompt, config, config.max_new_tokens)
            except openai.BadRequestError as e:
                if not _OVERFLOW.search(str(e)):
                    raise
            try:  # the prompt may fit with a smaller budget: let the server fill the context
                return await self._request(prompt, config, None)
            except openai.BadRequestError as e:
                if not _OVERFLOW.search(str(e)):
                    raise
            return [Completion(text="", finish_reason="context_overflow") for _ in range(config.n)]

    async def _request(self, prompt: str, config: GenerationConfig, max_tokens: int | None) -> list[Completion]:
        # vLLM refuses n > 1 with greedy decoding (all samples would be the same): ask once, copy.
        greedy_copies = config.n if config.temperature == 0 else 1
        kwargs: dict[str, Any] = dict(
            model=self.model_name, prompt=prompt, n=config.n // greedy_copies, temperature=config.temperature,
            top_p=config.top_p,
            max_tokens=max_tokens, stop=list(config.stop) or None, extra_body={"add_special_tokens": False},
        )
        if config.seed is not None:
            kwargs["seed"] = config.seed
        for attempt in range(self.max_retries + 1):
            i = self._pick()
            self._inflight[i] += 1
            try:
                resp = await self._clients[i].completions.create(**kwargs)
                break
            except _TRANSIENT as e:
                if attempt == self.max_retries:
                    hint = f": {HOW_TO_START}" if isinstance(e, openai.APIConnectionError) else ""
                    raise BackendUnavailable(f"{self.urls[i]} failed {attempt + 1} times, last: "
                                             f"{type(e).__name__}: {e}{hint}") from e
                log.warning("%s: %s; retry %d/%d", self.urls[i], type(e).__name__, attempt + 1, self.max_retries)
                await asyncio.sleep(self.backoff_s * 2 ** attempt)
            finally:
                self._inflight[i] -= 1
        choices = sorted(resp.choices, key=lambda c: c.index)
        # usage is the request's total; vLLM gives no per-sample count
        per_sample = resp.usage.completion_tokens // max(1, len(choices)) if resp.usage else 0
        return [Completion(text=c.text, num_tokens=per_sample, finish_reason=c.finish_reason or "stop",
                           meta={"endpoint": self.urls[i]}) for c in choices for _ in range(greedy_copies)]

    def _pick(self) -> int:
        """The endpoint with the fewest requests in flight; ties go round robin."""
        n = len(self.urls)
        i = min(range(n), key=lambda k: (self._inflight[k], (k - self._next) % n))
        self._next = (i + 1) % n
        return i
