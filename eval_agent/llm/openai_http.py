"""The one HTTP client for OpenAI-compatible servers: completions (vLLM replicas, serve_hf) for sampling and
evaluation, chat (GPT-4o or any compatible endpoint) for reflection. One retry policy for both:

- connection errors, timeouts, 429, 5xx and 200 answers that are not a valid reply (`{}`, HTML, no choices, a
  choice without text) are retried with capped exponential backoff, `Retry-After` honoured; other 4xx are not
  (the caller decides: a prompt over the context, a refused prompt, a wrong key or model name);
- with several endpoints, `sticky` routing sends every request of one route key (an episode, the N rollouts of a
  step record) to the same healthy endpoint, so its prefix cache serves them: a new key goes to the first endpoint
  of its rendezvous order that is not overloaded, and stays there; when that endpoint fails, its keys move, spread
  over the others; `least_busy` sends each request to the endpoint with the fewest in flight;
- a failing endpoint is skipped for a cool-down that grows while it keeps failing; a request's retry goes at
  once to the next endpoint of its key, or waits for the first one to come back;
- a request waits for its endpoint as long as its length asks (`request_timeout`: FIRST_ANSWER_S plus
  SECONDS_PER_TOKEN per token asked for; STECA_HTTP_TIMEOUT fixes it) with no answer from that endpoint (a
  busy endpoint answering other requests keeps a queued one waiting, up to CAP_FACTOR times that); an endpoint
  that answered nothing for DEAD_AFTER_S (STECA_HTTP_DEAD_AFTER) since its first failed request is declared
  dead, and once every endpoint is, every request fails at once: a hung server stops a run in minutes.

The client is asynchronous (httpx); each event loop gets its own connection pool, so the asynchronous episode
runner awaits requests on its own loop, while the synchronous `generate` of `OpenAIBackend` and the reflection
client run theirs on a private loop thread.

Completions send the client-rendered prompt as text with `add_special_tokens: false` (a vLLM request field), so
the server tokenizes exactly what HFBackend tokenizes. Semantics kept equal to HFBackend: vLLM refuses prompt +
max_tokens > context (HTTP 400), so on that refusal the request is sent once more with `max_tokens` null (the
server fills what is left of the context); only a prompt that does not fit by itself becomes
`finish_reason="context_overflow"`. vLLM refuses n > 1 with greedy decoding: one sample is asked for and copied.
"""
from __future__ import annotations

import asyncio
import email.utils
import hashlib
import json
import logging
import math
import os
import random
import re
import threading
import time
from collections import OrderedDict
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Coroutine, TypeVar

import httpx

from eval_agent.llm import BackendUnavailable, Completion, GenerationConfig
from eval_agent.redaction import redact, redact_library_logs

log = logging.getLogger(__name__)
redact_library_logs()  # httpx logs every request's URL, credentials included
T = TypeVar("T")

HOW_TO_START = (
    "start a server with `bash scripts/serve_vllm.sh` (GPU, vLLM) or "
    "`python -m eval_agent.llm.serve_hf --model DIR --port 8000` (CPU), and pass its base URL "
    "(e.g. http://127.0.0.1:8000/v1) in an --endpoints file or $OPENAI_BASE_URL"
)
# Requests in flight over all endpoints: 8 replicas x 128 sequences (a 7B model's KV cache holds ~64-128
# ALFWorld-length sequences on an 80 GB GPU; vLLM queues the rest itself).
MAX_REQUESTS = 1024
# vLLM's wordings: "This model's maximum context length is N tokens. However, ..." (server) and
# "The decoder prompt (length N) is longer than the maximum model length of M" (engine).
_OVERFLOW = re.compile(r"maximum context length|maximum model length|context_length_exceeded", re.I)
ROUTINGS = ("sticky", "least_busy")
FIRST_ANSWER_S = 120.0  # what a request may wait for its endpoint before its first token (queue, prefill)
SECONDS_PER_TOKEN = 0.5  # and per token it asks for: an endpoint slower than 2 tokens/s is taken for hung
CAP_FACTOR = 10  # a request waits at most this many times its timeout, however busy its endpoint
DEAD_AFTER_S = 300.0  # an endpoint that answered nothing for this long is declared dead (STECA_HTTP_DEAD_AFTER)
LOAD_SLACK = 1.1  # sticky routing keeps a key on a replica with at most 10% more requests in flight than the mean
KEY_MEMORY = 1 << 16  # route keys whose replica is remembered (the most recent)


class BadReply(RuntimeError):
    """A 200 answer that is not a valid reply (`endpoint X answered ...`); retried like a server error."""

    def __init__(self, url: str, detail: str):
        super().__init__(f"endpoint {url} {detail}")
        self.detail = detail


class Refused(RuntimeError):
    """A 4xx answer other than 429: the request itself is refused, asking again would not help."""

    def __init__(self, url: str, status: int, message: str):
        super().__init__(f"endpoint {url} refused the request (HTTP {status}): {message}")
        self.url, self.status, self.message = url, status, message


class _Stalled(RuntimeError):
    """No answer from the endpoint within the request's timeout; retried like a server error."""


class _Transient(RuntimeError):
    """A 429 or 5xx answer (worth another try), with the server's Retry-After if it sent one."""

    def __init__(self, message: str, retry_after: float | None):
        super().__init__(message)
        self.retry_after = retry_after


@dataclass(frozen=True)
class RetryPolicy:
    """`retries` more attempts after the first; waits double from `backoff_s` up to `max_backoff_s`
    (jittered down by up to half, so a thousand failed requests do not come back at once); a
    server's Retry-After is waited for in full, up to `max_backoff_s`."""

    retries: int = 6
    backoff_s: float = 1.0
    max_backoff_s: float = 60.0

    def delay(self, failures: int, retry_after: float | None = None, rng: random.Random | None = None) -> float:
        """Seconds to wait after the `failures`-th consecutive failure (1-based)."""
        wait = min(self.max_backoff_s, self.backoff_s * 2 ** max(0, failures - 1))
        wait *= 1 - 0.5 * (rng or random).random()
        if retry_after is not None:
            wait = max(wait, min(retry_after, self.max_backoff_s))
        return wait


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds from a Retry-After header (delta-seconds or an HTTP date); None when absent or unreadable."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value).timestamp()
    except (TypeError, ValueError):
        return None
    return max(0.0, when - (time.time() if now is None else now))


def _snippet(body: bytes, limit: int = 80) -> str:
    text = body.decode("utf-8", "replace").strip()
    return repr(text[:limit] + ("..." if len(text) > limit else ""))


def _error_message(body: bytes) -> str:
    """The message of an error body (OpenAI `{"error": {"message"}}` or vLLM `{"message"}`), else a snippet."""
    try:
        data = json.loads(body)
    except ValueError:
        return _snippet(body, 300)
    if isinstance(data, dict):
        err = data.get("error")
        if isinstance(err, dict) and isinstance(err.get("message"), str):
            return err["message"][:300]
        if isinstance(err, str):
            return err[:300]
        if isinstance(data.get("message"), str):
            return data["message"][:300]
    return _snippet(body, 300)


def _reply(url: str, body: bytes, want: int | None) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The choices of a JSON reply (sorted by index) and its usage; a reply without them (or without `want`
    choices) is a BadReply."""
    try:
        data = json.loads(body)
    except ValueError:
        raise BadReply(url, f"answered {_snippet(body)}, not JSON") from None
    if not isinstance(data, dict):
        raise BadReply(url, f"answered {_snippet(body)}, not a JSON object")
    choices = data.get("choices")
    if not isinstance(choices, list) or not choices or not all(isinstance(c, dict) for c in choices):
        raise BadReply(url, f"answered without choices: {_snippet(body)}")
    if want is not None and len(choices) != want:
        raise BadReply(url, f"answered {len(choices)} choices for {want} asked: {_snippet(body)}")
    usage = data.get("usage")
    usage = {k: v for k, v in usage.items() if isinstance(v, int)} if isinstance(usage, dict) else {}
    return sorted(choices, key=lambda c: c["index"] if isinstance(c.get("index"), int) else 0), usage


def completion_choices(url: str, body: bytes, want: int) -> tuple[list[tuple[str, str]], int]:
    """(text, finish_reason) of each choice of a /completions reply, and its completion-token count."""
    choices, usage = _reply(url, body, want)
    if not all(isinstance(c.get("text"), str) for c in choices):
        raise BadReply(url, f"answered a choice without text: {_snippet(body)}")
    return [(c["text"], c.get("finish_reason") or "stop") for c in choices], usage.get("completion_tokens", 0)


def chat_choice(url: str, body: bytes) -> tuple[str, str, dict[str, int]]:
    """(content, finish_reason, usage) of the first choice of a /chat/completions reply."""
    choices, usage = _reply(url, body, None)
    message = choices[0].get("message")
    if not isinstance(message, dict) or not isinstance(message.get("content"), str):
        raise BadReply(url, f"answered a choice without message.content: {_snippet(body)}")
    return message["content"], choices[0].get("finish_reason") or "stop", usage


def request_timeout(max_tokens: int, fixed: float | None = None) -> float:
    """Seconds a completion request asking for `max_tokens` may wait with no answer from its endpoint: `fixed`
    (STECA_HTTP_TIMEOUT) when given, else FIRST_ANSWER_S + SECONDS_PER_TOKEN per token (512 tokens: 376 s)."""
    return fixed if fixed is not None else FIRST_ANSWER_S + SECONDS_PER_TOKEN * max_tokens


def env_seconds(name: str) -> float | None:
    """A number of seconds from the environment (None when unset); a bad value is a user error naming it."""
    value = os.environ.get(name)
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        seconds = -1.0
    if not seconds > 0:
        raise BackendUnavailable(f"{name}={value}: takes seconds, a number > 0")
    return seconds


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


def _rendezvous(key: str, url: str) -> int:
    return int.from_bytes(hashlib.blake2b(f"{url}\0{key}".encode(), digest_size=8).digest(), "big")


@dataclass
class Endpoint:
    url: str  # as given, credentials included: requests only
    inflight: int = 0
    failures: int = 0  # consecutive
    down_until: float = 0.0  # monotonic time before which it is skipped
    requests: int = 0  # answered
    errors: int = 0  # failed attempts
    last_answer: float = 0.0  # monotonic time of its last HTTP answer, whatever its status
    silent_since: float | None = None  # when the first request it has not answered since its last answer was sent
    dead: bool = False  # silent for the client's dead_after: never asked again

    @property
    def name(self) -> str:
        """The URL as messages show it: without credentials (`eval_agent.redaction`)."""
        return redact(self.url)


@dataclass
class ClientStats:
    requests: int = 0  # answered
    retries: int = 0  # attempts after a failed one
    failovers: int = 0  # retries sent to another endpoint than the failed attempt
    bad_replies: int = 0
    failed: int = 0  # requests given up after all retries


class LoopThread:
    """An event loop in a daemon thread, for synchronous callers: `submit` a coroutine, get a Future."""

    def __init__(self, name: str):
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name=name, daemon=True)
        self._thread.start()

    def submit(self, coro: Coroutine[Any, Any, T]) -> Future[T]:
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        return self.submit(coro).result()

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join()
        self.loop.close()


class HTTPClient:
    """Requests to one or several OpenAI-compatible endpoints under the retry policy and routing above.

    `max_requests` bounds the requests in flight (per event loop); `what` names the endpoints in errors
    ("endpoint", "chat endpoint"). The API key is sent as a bearer token and scrubbed from every message.
    `timeout`: a request's default timeout (`post` takes each request's own); `dead_after`: seconds without an
    answer after which an endpoint is dead (default STECA_HTTP_DEAD_AFTER, else DEAD_AFTER_S).
    """

    def __init__(self, urls: list[str], api_key: str | None = None, timeout: float = 600.0,
                 max_requests: int = MAX_REQUESTS, retry: RetryPolicy = RetryPolicy(), routing: str = "sticky",
                 what: str = "endpoint", dead_after: float | None = None):
        if routing not in ROUTINGS:
            raise ValueError(f"routing must be one of {ROUTINGS}, got {routing!r}")
        if max_requests < 1:
            raise ValueError(f"max_requests must be >= 1, got {max_requests}")
        self.endpoints = [Endpoint(u) for u in urls]
        self.api_key, self.timeout, self.max_requests = api_key, timeout, max_requests
        self.retry, self.routing, self.what = retry, routing, what
        self.dead_after = dead_after or env_seconds("STECA_HTTP_DEAD_AFTER") or DEAD_AFTER_S
        self.stats = ClientStats()
        self._pools: dict[asyncio.AbstractEventLoop, tuple[dict[str, httpx.AsyncClient], asyncio.Semaphore]] = {}
        self._thread: LoopThread | None = None
        self._next = 0
        self._rng = random.Random()
        self._assigned: OrderedDict[str, int] = OrderedDict()  # sticky: route key -> endpoint index (recent keys)

    def __getstate__(self) -> dict[str, Any]:
        """A copy for another process (the asynchronous runner's client processes): without this process's
        connection pools and loop thread, which the copy makes anew."""
        return {**self.__dict__, "_pools": {}, "_thread": None}

    # ---- synchronous use --------------------------------------------------------------------------
    def submit(self, coro: Coroutine[Any, Any, T]) -> Future[T]:
        """Run a coroutine of this client on its private loop thread (started on first use)."""
        if self._thread is None:
            self._thread = LoopThread(f"http-{self.what.replace(' ', '-')}")
        return self._thread.submit(coro)

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        return self.submit(coro).result()

    def close(self) -> None:
        """Close every connection pool and stop the loop thread; call from outside the client's loops."""
        if self._thread is not None:
            self._thread.run(self.aclose())
            self._thread.stop()
            self._thread = None

    async def aclose(self) -> None:
        """Close the connection pools of the running loop (a loop that ends must close its own)."""
        pool = self._pools.pop(asyncio.get_running_loop(), None)
        for client in (pool[0].values() if pool is not None else ()):
            await client.aclose()

    # ---- requests -----------------------------------------------------------------------------------
    def _pool(self) -> tuple[dict[str, httpx.AsyncClient], asyncio.Semaphore]:
        """The running loop's connection pools (by endpoint) and its bound on the requests in flight."""
        loop = asyncio.get_running_loop()
        if loop not in self._pools:
            self._pools[loop] = ({}, asyncio.Semaphore(self.max_requests))
        return self._pools[loop]

    def _client(self, url: str) -> httpx.AsyncClient:
        """The running loop's connection pool for endpoint `url`: one per endpoint, since httpx's pool looks over
        all its connections and queued requests for every request it places. One pool for 8 replicas with 1,024
        requests in flight cost the client ~20-40 ms of CPU a call (scripts/bench_scale.py's client measurement)."""
        clients = self._pool()[0]
        if url not in clients:
            headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
            limits = httpx.Limits(max_connections=self.max_requests, max_keepalive_connections=self.max_requests)
            timeout = httpx.Timeout(None, connect=min(self.timeout, 10.0))  # reads: `_answer` watches them
            clients[url] = httpx.AsyncClient(headers=headers, limits=limits, timeout=timeout)
        return clients[url]

    def scrub(self, text: str) -> str:
        """`text` without the API key (an error message may quote it) and without credentials in URLs."""
        return redact(text.replace(self.api_key, "***") if self.api_key and len(self.api_key) > 3 else text)

    async def get(self, url: str, path: str, timeout: float) -> httpx.Response:
        """One GET, no retries (start-up probes)."""
        return await self._client(url).get(url + path, timeout=min(timeout, self.timeout))

    def _order(self, route_key: str | None) -> list[int]:
        n = len(self.endpoints)
        if self.routing == "sticky" and route_key is not None:
            return sorted(range(n), key=lambda i: _rendezvous(route_key, self.endpoints[i].url), reverse=True)
        start = self._next
        self._next = (self._next + 1) % n
        return sorted(range(n), key=lambda i: (self.endpoints[i].inflight, (i - start) % n))

    def _pick(self, route_key: str | None) -> tuple[Endpoint, float]:
        """The endpoint for a request, and how long to wait for it (0 unless every endpoint is down).

        Sticky: the endpoint the key was given, while it is healthy and not overloaded (more requests in flight
        than LOAD_SLACK times the mean); else (a new key, a failed or overloaded endpoint) the first healthy one in
        the key's rendezvous order within that bound, which the key keeps from then on. Keys arriving in groups
        (the N rollouts of a record) and episodes ending unevenly would otherwise leave requests queued on one
        replica while another has free batch slots. Least busy: the first healthy one in `_order`.
        """
        now = time.monotonic()
        sticky = self.routing == "sticky" and route_key is not None
        if self._all_dead():
            raise BackendUnavailable(f"every {self.what} is dead: {', '.join(ep.name for ep in self.endpoints)} "
                                     f"answered nothing for {self.dead_after:g} s (STECA_HTTP_DEAD_AFTER)")
        healthy = [ep for ep in self.endpoints if not ep.dead and ep.down_until <= now]
        bound = math.ceil(LOAD_SLACK * (sum(e.inflight for e in healthy) + 1) / max(1, len(healthy)))
        if sticky and route_key in self._assigned:
            ep = self.endpoints[self._assigned[route_key]]
            if ep in healthy and ep.inflight < bound:
                self._assigned.move_to_end(route_key)
                return ep, 0.0
        order = [self.endpoints[i] for i in self._order(route_key) if not self.endpoints[i].dead]
        if not healthy:
            ep = min(order, key=lambda e: e.down_until)
            return ep, ep.down_until - now
        ep = next(e for e in order if e in healthy)
        if sticky:
            ep = next((e for e in order if e in healthy and e.inflight < bound), ep)
            self._assigned[route_key] = self.endpoints.index(ep)
            if len(self._assigned) > KEY_MEMORY:
                self._assigned.popitem(last=False)
        return ep, 0.0

    def _all_dead(self) -> bool:
        return all(ep.dead for ep in self.endpoints)

    def _failed(self, ep: Endpoint, retry_after: float | None, sent: float, answered: bool) -> None:
        """A failed attempt sent at `sent`: a cool-down, and an endpoint silent for `dead_after` is dead."""
        ep.failures += 1
        ep.errors += 1
        ep.down_until = max(ep.down_until, time.monotonic() + self.retry.delay(ep.failures, retry_after, self._rng))
        if not answered and ep.silent_since is None:
            ep.silent_since = sent
        if not ep.dead and ep.silent_since is not None and time.monotonic() - ep.silent_since >= self.dead_after:
            ep.dead = True
            log.error("%s %s answered nothing for %g s: declared dead", self.what, ep.name,
                      round(time.monotonic() - ep.silent_since, 1))

    async def _answer(self, request: Coroutine[Any, Any, httpx.Response], ep: Endpoint, timeout: float
                      ) -> httpx.Response:
        """The response to `request`, sent to `ep` now; `_Stalled` when the endpoint answers nothing (to any
        request) for `timeout` seconds after it was sent, when it has been silent for the client's `dead_after`,
        or after CAP_FACTOR x `timeout` in all."""
        sent = time.monotonic()
        task = asyncio.ensure_future(request)
        try:
            while True:
                quiet_until = max(sent, ep.last_answer) + timeout
                deadline = min(quiet_until, sent + CAP_FACTOR * timeout,
                               ep.silent_since + self.dead_after if ep.silent_since is not None else math.inf)
                done, _ = await asyncio.wait({task}, timeout=max(0.0, deadline - time.monotonic()))
                if done:
                    response = task.result()
                    ep.last_answer, ep.silent_since = time.monotonic(), None
                    return response
                now = time.monotonic()
                if ep.silent_since is not None and now - ep.silent_since >= self.dead_after:
                    raise _Stalled(f"answered nothing for {round(now - ep.silent_since, 1):g} s")
                if now >= min(max(sent, ep.last_answer) + timeout, sent + CAP_FACTOR * timeout):
                    raise _Stalled(f"no answer for {round(now - max(sent, ep.last_answer), 1):g} s (timeout "
                                   f"{round(timeout, 1):g} s)")
        finally:
            if not task.done():
                task.cancel()

    async def post(self, path: str, payload: dict[str, Any], parse: Callable[[str, bytes], T],
                   route_key: str | None = None, timeout: float | None = None) -> tuple[T, str]:
        """POST `payload` to `path` of an endpoint; `parse(url, body)` of the first valid 200 answer, and its URL.
        `timeout`: seconds the request may wait with no answer from its endpoint (default: the client's).

        Raises `Refused` for a 4xx other than 429, `BackendUnavailable` after all retries or once every endpoint
        is dead.
        """
        timeout = timeout or self.timeout
        semaphore = self._pool()[1]
        async with semaphore:
            last: Exception | None = None
            previous: Endpoint | None = None
            tried: list[str] = []
            for attempt in range(self.retry.retries + 1):
                ep, wait = self._pick(route_key)
                if wait > 0:
                    await asyncio.sleep(wait)
                if attempt:
                    self.stats.retries += 1
                    self.stats.failovers += ep is not previous
                if ep.name not in tried:
                    tried.append(ep.name)
                previous = ep
                ep.inflight += 1
                sent = time.monotonic()
                try:
                    response = await self._answer(self._client(ep.url).post(ep.url + path, json=payload), ep, timeout)
                    body = response.content
                    if response.status_code == 200:
                        result = parse(ep.name, body)
                        ep.failures, ep.down_until = 0, 0.0
                        ep.requests += 1
                        self.stats.requests += 1
                        return result, ep.url
                    message = self.scrub(_error_message(body))
                    if response.status_code == 429 or response.status_code >= 500:
                        raise _Transient(f"HTTP {response.status_code}: {message}",
                                         parse_retry_after(response.headers.get("retry-after")))
                    raise Refused(ep.name, response.status_code, message)
                except (httpx.TransportError, httpx.DecodingError, BadReply, _Transient, _Stalled) as e:
                    last = e
                    self.stats.bad_replies += isinstance(e, BadReply)
                    self._failed(ep, getattr(e, "retry_after", None), sent,
                                 answered=isinstance(e, (BadReply, _Transient, httpx.DecodingError)))
                    if self._all_dead():
                        break
                    if attempt < self.retry.retries:
                        log.warning("%s; retry %d/%d", self._happened(ep, e), attempt + 1, self.retry.retries)
                finally:
                    ep.inflight -= 1
            self.stats.failed += 1
            others = [u for u in tried if u != previous.name]
            also = f" (also tried {', '.join(others)})" if others else ""
            hint = f"; {HOW_TO_START}" if isinstance(last, httpx.TransportError) and self.what == "endpoint" else ""
            if self._all_dead():
                raise BackendUnavailable(f"every {self.what} is dead ({', '.join(p.name for p in self.endpoints)} "
                                         f"answered nothing for {self.dead_after:g} s, STECA_HTTP_DEAD_AFTER); last: "
                                         f"{self._happened(previous, last)}{hint}")
            raise BackendUnavailable(f"request failed {attempt + 1} times{also}; last: "
                                     f"{self._happened(previous, last)}{hint}")

    def _happened(self, ep: Endpoint, e: Exception | None) -> str:
        """What went wrong at `ep`, naming it: `endpoint X answered ...`, `endpoint X: HTTP 503: ...`."""
        if isinstance(e, BadReply):
            return f"{self.what} {ep.name} {e.detail}"
        return f"{self.what} {ep.name}: {self.scrub(_describe(e))}"


def _describe(e: Exception | None) -> str:
    if isinstance(e, httpx.TransportError):
        return f"{type(e).__name__}: {e}" if str(e) else f"{type(e).__name__} (cannot connect or no answer)"
    return str(e)


class OpenAIBackend:
    """Completions over HTTP, spread over all endpoints (`LLMBackend` for the round runner, `complete` for the
    asynchronous runner). Each prompt is one request carrying all n samples, so one server's prefix cache
    serves them."""

    def __init__(self, model: str, endpoints_file: str | Path | None = None, base_urls: list[str] | str | None = None,
                 max_requests: int = MAX_REQUESTS, timeout: float | None = None, max_retries: int | None = None,
                 routing: str = "sticky", retry: RetryPolicy | None = None):
        self.model_name = model
        self.urls = resolve_base_urls(endpoints_file, base_urls)
        retry = retry or RetryPolicy()
        if max_retries is not None:
            retry = RetryPolicy(max_retries, retry.backoff_s, retry.max_backoff_s)
        self.fixed_timeout = timeout if timeout is not None else env_seconds("STECA_HTTP_TIMEOUT")
        self.client = HTTPClient(self.urls, api_key=os.environ.get("OPENAI_API_KEY") or None,
                                 timeout=request_timeout(GenerationConfig.max_new_tokens, self.fixed_timeout),
                                 max_requests=max_requests, retry=retry, routing=routing)
        self._checked = False
        self._check_locks: dict[asyncio.AbstractEventLoop, asyncio.Lock] = {}

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_check_locks": {}}  # locks of this process's loops

    def generate(self, prompts: list[str], config: GenerationConfig) -> list[list[Completion]]:
        return self.client.run(self._generate(prompts, config))

    async def _generate(self, prompts: list[str], config: GenerationConfig) -> list[list[Completion]]:
        tasks = [asyncio.ensure_future(self.complete(p, config)) for p in prompts]
        try:
            return list(await asyncio.gather(*tasks))
        except BaseException:  # one failure cancels the rest (and raises as itself, not as a group)
            for t in tasks:
                t.cancel()
            raise

    def close(self) -> None:
        self.client.close()

    async def aclose(self) -> None:
        await self.client.aclose()

    async def check(self) -> None:
        """Fail fast, naming the URL, when a server is down or does not serve this model (once per backend)."""
        if self._checked:
            return
        async with self._check_locks.setdefault(asyncio.get_running_loop(), asyncio.Lock()):
            if not self._checked:
                await self._check()
                self._checked = True

    async def _check(self) -> None:
        async def probe(url: str) -> list[str] | str:
            try:
                response = await self.client.get(url, "/models", timeout=10.0)
            except httpx.TransportError as e:
                return _describe(e)
            if response.status_code != 200:
                return f"HTTP {response.status_code}: {self.client.scrub(_error_message(response.content))}"
            try:
                return [m["id"] for m in response.json()["data"]]
            except (ValueError, KeyError, TypeError):
                return f"answered {_snippet(response.content)} to GET /models"

        found = await asyncio.gather(*(probe(u) for u in self.urls))
        down = [f"{redact(u)} ({self.client.scrub(r)})" for u, r in zip(self.urls, found) if isinstance(r, str)]
        if down:
            raise BackendUnavailable(f"cannot use {', '.join(down)}: {HOW_TO_START}")
        for u, ids in zip(self.urls, found):
            if self.model_name not in ids:
                raise BackendUnavailable(f"{redact(u)} serves {ids}, not {self.model_name!r}: pass the served model "
                                         "name")

    async def complete(self, prompt: str, config: GenerationConfig, route_key: str | None = None) -> list[Completion]:
        """`config.n` completions of one prompt (`config.seed` is sent as vLLM's per-request seed)."""
        await self.check()
        try:
            return await self._request(prompt, config, config.max_new_tokens, route_key)
        except Refused as e:
            if not _OVERFLOW.search(e.message):
                raise
        try:  # the prompt may fit with a smaller budget: let the server fill the context
            return await self._request(prompt, config, None, route_key)
        except Refused as e:
            if not _OVERFLOW.search(e.message):
                raise
        return [Completion(text="", finish_reason="context_overflow") for _ in range(config.n)]

    async def _request(self, prompt: str, config: GenerationConfig, max_tokens: int | None,
                       route_key: str | None) -> list[Completion]:
        greedy_copies = config.n if config.temperature == 0 else 1
        n = config.n // greedy_copies
        payload: dict[str, Any] = dict(model=self.model_name, prompt=prompt, n=n, temperature=config.temperature,
                                       top_p=config.top_p, max_tokens=max_tokens, add_special_tokens=False)
        if config.stop:
            payload["stop"] = list(config.stop)
        if config.seed is not None:
            payload["seed"] = config.seed
        (choices, tokens), url = await self.client.post(
            "/completions", payload, lambda u, body: completion_choices(u, body, n), route_key,
            request_timeout(config.max_new_tokens, self.fixed_timeout))
        per_sample = tokens // len(choices)  # usage is the request's total; vLLM gives no per-sample count
        return [Completion(text=text, num_tokens=per_sample, finish_reason=reason, meta={"endpoint": url})
                for text, reason in choices for _ in range(greedy_copies)]

